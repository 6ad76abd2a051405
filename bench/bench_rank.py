#!/usr/bin/env python3
"""Benchmark: rank measures of several layers' representations (trainscope) against the peers.

Workload: ``--layers`` layers of representations Φ [rows, width], float32, random with a decaying
spectrum (σ_j ∝ (1 + j)^-1 in a random orthogonal basis), one configuration per width, on the
chosen device. Ways of getting SPEC.md §3's four rank measures of every layer:

trainscope        ``trainscope.rank.rank_measures(layers)``: float64 Gram matrices (cuBLAS syrk)
                  and one batched symmetric eigensolve (cuSOLVER) for all layers.
trainscope_grams  the probe's streamed path: batches of ``--batch-rows`` rows of every layer into
                  ``trainscope.RepresentationAccumulator`` (per layer a float64 Gram matrix by
                  cuBLAS syrk, kept as rows while fewer rows than units, and per-unit active
                  counts), then one batched eigensolve for all layers.
trainscope_svd    ``rank_measures(layers, method="svd")``: float64 SVD per layer (gesvdj).
svdvals           ``torch.linalg.svdvals`` in a Python loop over the layers, measures in torch.
scipy             ``scipy.linalg.svd(..., compute_uv=False, lapack_driver="gesvd")`` on the CPU,
                  as the loss-of-plasticity reference code does (optional; "not installed"
                  without it; bench/requirements-peers.txt pins it). Host arrays, copy excluded.

Reported per width: median time of each method, the speedup of trainscope over the svdvals loop,
and each method's effective-rank relative error (worst layer) against float64 NumPy SVD
(``numpy.linalg.svd(..., compute_uv=False)``). The run exits 1 when trainscope's effective rank is
off by more than 1e-3 relative or an approximate rank by more than 1 on any layer.

Run ``python bench/bench_rank.py --help``; bench/README.md explains the output.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402  (same folder; stdlib only)
    environment, positive_int_list, resolve_repeats, select_device, summarize, write_json)

GOAL_SPEEDUP_VS_SVDVALS = 20.0
ERANK_RTOL = 1e-3   # SPEC.md §5
RANK_SLACK = 1      # approximate ranks: within 1 where the cut falls between nearly equal σ

DEFAULT = {"rows": 2000, "widths": "256,1024,4096", "batch_rows": 500}
QUICK = {"rows": 120, "widths": "16,48", "batch_rows": 50}
METHODS = ("trainscope", "trainscope_grams", "trainscope_svd", "svdvals", "scipy")


def make_layers(torch, rows, width, layers, device, seed):
    """Φ = G diag((1 + j)^-1) Qᵀ, G Gaussian, Q random orthogonal: a decaying spectrum."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(layers):
        g = torch.randn(rows, width, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
        decay = (1.0 + torch.arange(width, dtype=torch.float64)) ** -1.0
        out.append(((g * decay) @ q.T).to(device=device, dtype=torch.float32))
    return out


def measures_from_sigma(torch, s, prop=0.99):
    """SPEC.md §3 from descending σ (any dtype), as a user of svdvals would write it."""
    s1 = s.sum()
    p = s / s1
    p = p[p > 0]
    erank = torch.exp(-(p * torch.log(p)).sum())
    c2 = torch.cumsum(s * s, 0) / (s * s).sum()
    c1 = torch.cumsum(s, 0) / s1
    arank = torch.searchsorted(c2, torch.tensor(prop, dtype=c2.dtype, device=c2.device)) + 1
    aarank = torch.searchsorted(c1, torch.tensor(prop, dtype=c1.dtype, device=c1.device)) + 1
    return erank, arank, aarank, (s * s).sum() / s[0] ** 2


def numpy_reference(np, layers_np, prop=0.99):
    out = []
    for a in layers_np:
        s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
        p = s / s.sum()
        p = p[p > 0]
        c2 = np.cumsum(s ** 2) / np.sum(s ** 2)
        c1 = np.cumsum(s) / s.sum()
        out.append({"effective_rank": float(math.exp(-(p * np.log(p)).sum())),
                    "approximate_rank": int(np.argmax(c2 >= prop)) + 1,
                    "abs_approximate_rank": int(np.argmax(c1 >= prop)) + 1,
                    "stable_rank": float((s ** 2).sum() / s[0] ** 2)})
    return out


def timed(torch, fn, device, repeats, warmup):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    result = None
    for _ in range(warmup):
        result = fn()
    sync()
    ms = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        ms.append(1e3 * (time.perf_counter() - t0))
    return summarize(ms), result


def bench_width(torch, np, trainscope, scipy_linalg, width, args, device):
    layers = make_layers(torch, args.rows, width, args.layers, device, args.seed + width)
    layers_np = [x.cpu().numpy() for x in layers]
    ref = numpy_reference(np, layers_np)
    rank = trainscope.rank

    def run_trainscope():
        r = rank.rank_measures(layers)
        return r.effective_rank, r.approximate_rank, r.abs_approximate_rank, r.stable_rank

    def run_grams():
        acc = trainscope.RepresentationAccumulator([f"layer{i}" for i in range(len(layers))])
        for b in range(0, args.rows, args.batch_rows):
            acc.add([x[b:b + args.batch_rows] for x in layers])
        r = acc.result().per_layer
        return r["effective_rank"], r["approximate_rank"], r["abs_approximate_rank"], r["stable_rank"]

    def run_trainscope_svd():
        r = rank.rank_measures(layers, method="svd")
        return r.effective_rank, r.approximate_rank, r.abs_approximate_rank, r.stable_rank

    def run_svdvals():
        per = [measures_from_sigma(torch, torch.linalg.svdvals(x)) for x in layers]
        return tuple(torch.stack([p[i] for p in per]) for i in range(4))

    def run_scipy():
        per = [measures_from_sigma(torch, torch.from_numpy(
            scipy_linalg.svd(a, compute_uv=False, lapack_driver="gesvd"))) for a in layers_np]
        return tuple(torch.stack([p[i] for p in per]) for i in range(4))

    fns = {"trainscope": run_trainscope, "trainscope_grams": run_grams, "trainscope_svd": run_trainscope_svd,
           "svdvals": run_svdvals, "scipy": run_scipy}
    row = {"rows": args.rows, "width": width, "layers": args.layers, "reference": ref, "methods": {}}
    for name in METHODS:
        if name not in args.methods:
            continue
        if name == "scipy" and scipy_linalg is None:
            row["methods"][name] = {"status": "not installed"}
            continue
        try:
            stats, res = timed(torch, fns[name], torch.device("cpu") if name == "scipy" else device,
                               args.repeats, args.warmup)
        except Exception as e:  # noqa: BLE001  (recorded; a trainscope failure fails the run below)
            traceback.print_exc()
            row["methods"][name] = {"status": "error", "note": f"{type(e).__name__}: {e}"}
            continue
        erank = [float(v) for v in res[0].cpu()]
        arank = [int(v) for v in res[1].cpu()]
        aarank = [int(v) for v in res[2].cpu()]
        rel = [abs(g - r["effective_rank"]) / r["effective_rank"] for g, r in zip(erank, ref)]
        rank_diff = max(max(abs(a - r["approximate_rank"]), abs(b - r["abs_approximate_rank"]))
                        for a, b, r in zip(arank, aarank, ref))
        row["methods"][name] = {"status": "ok", "time": stats, "effective_rank": erank, "approximate_rank": arank,
                                "abs_approximate_rank": aarank, "erank_max_rel_err": max(rel),
                                "rank_max_abs_diff": rank_diff,
                                "accurate": max(rel) <= ERANK_RTOL and rank_diff <= RANK_SLACK}
    m = row["methods"]
    if m.get("trainscope", {}).get("status") == "ok" and m.get("svdvals", {}).get("status") == "ok":
        row["speedup_vs_svdvals"] = m["svdvals"]["time"]["median_ms"] / m["trainscope"]["time"]["median_ms"]
    if m.get("trainscope", {}).get("status") == "ok" and m.get("scipy", {}).get("status") == "ok":
        row["speedup_vs_scipy"] = m["scipy"]["time"]["median_ms"] / m["trainscope"]["time"]["median_ms"]
    return row


def print_table(rows, args):
    head = (f"{'width':>6} | " + " ".join(f"{n:>16}" for n in args.methods) + f" | {'speedup':>8} | "
            + "erank rel err (trainscope / svdvals)")
    print(f"median ms for {args.layers} layers of [{args.rows}, width] float32 on {args.device_obj}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['width']:>6} | ERROR: {r['error']}")
            continue
        cells = []
        for n in args.methods:
            e = r["methods"].get(n, {})
            cells.append(f"{e['time']['median_ms']:.3f}" if e.get("status") == "ok" else e.get("status", "-"))
        sp = f"{r['speedup_vs_svdvals']:.1f}x" if "speedup_vs_svdvals" in r else "-"
        errs = " / ".join(f"{r['methods'][n]['erank_max_rel_err']:.1e}" if r["methods"].get(n, {}).get("status") == "ok"
                          else "-" for n in ("trainscope", "svdvals"))
        print(f"{r['width']:>6} | " + " ".join(f"{c:>16}" for c in cells) + f" | {sp:>8} | {errs}")
    suffix = " (CPU smoke run: not a result)" if args.device_obj.type != "cuda" else ""
    sp = [r for r in rows if "speedup_vs_svdvals" in r]
    met = [r for r in sp if r["speedup_vs_svdvals"] >= GOAL_SPEEDUP_VS_SVDVALS]
    print(f"goal: >= {GOAL_SPEEDUP_VS_SVDVALS:.0f}x faster than the svdvals loop: met at {len(met)}/{len(sp)} widths"
          + suffix)
    print(f"goal: effective rank within {ERANK_RTOL:g} of float64 NumPy: "
          + ("met" if all(r.get("methods", {}).get("trainscope", {}).get("accurate") for r in rows) else "NOT met"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help=f"probe rows per layer (default {DEFAULT['rows']})")
    p.add_argument("--widths", default=None, help=f"layer widths (default {DEFAULT['widths']})")
    p.add_argument("--layers", type=int, default=4, help="layers per configuration (default 4)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help=f"rows per streamed batch of trainscope_grams (default {DEFAULT['batch_rows']})")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {','.join(METHODS)}")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT.json", help="write every result and the environment here")
    p.add_argument("--quick", action="store_true", help="smoke run: 120 rows, widths 16,48, few repeats")
    args = p.parse_args(argv)
    grid = QUICK if args.quick else DEFAULT
    args.rows = args.rows or grid["rows"]
    args.batch_rows = args.batch_rows or grid["batch_rows"]
    args.widths = positive_int_list(args.widths or grid["widths"], "--widths", p)
    if args.rows < 1 or args.layers < 1 or args.batch_rows < 1:
        p.error("--rows, --layers and --batch-rows must be >= 1")
    resolve_repeats(p, args, repeats=(10, 2), warmup=(2, 1))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose among {list(METHODS)}")
    args.methods = [m for m in METHODS if m in methods]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import numpy as np  # imported here: `--help` and argument errors need neither torch nor a GPU
    import torch
    import trainscope
    import trainscope.rank  # noqa: F401

    device = select_device(torch, args.device, "bench_rank")
    if device is None:
        return 2
    args.device_obj = device
    try:
        import scipy
        import scipy.linalg as scipy_linalg
        scipy_version = scipy.__version__
    except ImportError as e:
        scipy_linalg, scipy_version = None, f"not installed ({e})"

    env = environment(torch, trainscope, device)
    env["numpy"] = np.__version__
    env["scipy"] = scipy_version

    rows = []
    for w in args.widths:
        try:
            rows.append(bench_width(torch, np, trainscope, scipy_linalg, w, args, device))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"rows": args.rows, "width": w, "layers": args.layers, "error": f"{type(e).__name__}: {e}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, args)

    ok = True
    for r in rows:
        if "error" in r:
            ok = False
            continue
        for name in ("trainscope", "trainscope_grams", "trainscope_svd"):
            m = r["methods"].get(name)
            if m is not None and (m.get("status") != "ok" or not m["accurate"]):
                print(f"accuracy check failed: width {r['width']} {name}: {m}", file=sys.stderr)
                ok = False

    if args.json:
        write_json(args.json, {
            "benchmark": "rank", "environment": env,
            "settings": {"rows": args.rows, "widths": args.widths, "layers": args.layers,
                         "batch_rows": args.batch_rows, "methods": args.methods, "repeats": args.repeats,
                         "warmup": args.warmup, "dtype": "float32", "prop": 0.99, "seed": args.seed},
            "goals": {"speedup_vs_svdvals_min": GOAL_SPEEDUP_VS_SVDVALS, "erank_rtol": ERANK_RTOL,
                      "approximate_rank_slack": RANK_SLACK},
            "results": rows, "verified": bool(ok)}, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
