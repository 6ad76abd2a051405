#!/usr/bin/env python3
"""Benchmark: trainscope.param_stats against the PyTorch way of getting the same numbers.

Measured on a GPT-style transformer's float32 parameter list (token and position embeddings;
per layer two layer norms, the qkv, attention-projection and two MLP matrices with their biases;
a final layer norm; the LM head tied to the token embedding), with n_layer and d_model chosen to
reach each requested total (see ``gpt_config``).

trainscope side: one call with every metric on, refresh_prev=True::

    trainscope.param_stats(grads, params, init, prev, histogram=True, refresh_prev=True)

PyTorch side (``torch_param_stats``): ``torch._foreach_norm`` for per-tensor grad norms and their
global norm, ``torch._foreach_sub`` + ``_foreach_norm`` for distance and update size,
``abs().mean()`` per tensor for grad and weight magnitude, clamp + ``torch.histc`` per tensor for
the gradient histogram, and ``torch._foreach_copy_`` to refresh θ_prev. trainscope also counts
non-finite gradient elements; the PyTorch side leaves that out, which favours PyTorch.

Bytes moved per float32 parameter: read g, θ, θ₀, θ_prev once each and write θ_prev once,
20 bytes. Achieved bandwidth = bytes moved / median time, reported against the bandwidth of a
large device-to-device copy (bytes read + bytes written) / time, measured here too.

Run ``python bench/bench_param_stats.py --help``; bench/README.md explains the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402  (same folder; stdlib only)
    add_bandwidth_results, bandwidth_bench_setup, record_failure, resolve_repeats, time_on, write_json)

# Goals of the issue this benchmark answers, at 125M parameters and above.
GOAL_MIN_PARAMS = 125_000_000
GOAL_FRACTION_OF_COPY = 0.85
GOAL_SPEEDUP = 4.0

NBINS = 100      # SPEC.md §4 defaults
MAXVAL = 0.05
RTOL = 1e-4      # metrics of trainscope and of the PyTorch composition must agree this closely
BYTES_PER_PARAM = 20  # fp32: read g, θ, θ₀, θ_prev; write θ_prev

DEFAULT_SIZES = "25M,125M,1B"
QUICK_SIZES = "50K,300K"


# ---------------------------------------------------------------------------------------------
# The parameter list.

def parse_size(text: str) -> int:
    """'25M' -> 25_000_000; accepts K, M, B (or G) suffixes and plain integers."""
    t = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(t[-1:], 1)
    number = t[:-1] if scale != 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; expected e.g. 25M, 125M, 1B") from None
    if value < 1000:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (at least 1K parameters)")
    return int(value)


def gpt_config(target: int) -> dict:
    """n_layer and d_model of a GPT-2-style model with about ``target`` parameters.

    Real vocabulary (50257) and context (1024) from 20M parameters up; a toy vocabulary below,
    for smoke runs. Among the shapes within 5 % of the target, the one whose d_model / n_layer is
    closest to 64 (GPT-2 small's, 768/12) wins; ties go to the closer total. bench_param_stats.cu
    makes the same choice.
    """
    if target >= 20_000_000:
        vocab, ctx, step = 50257, 1024, 64
    else:
        vocab, ctx, step = 512, 64, 16
    best_in, best_any = None, None
    for d in range(step, 8192 + 1, step):
        fixed = (vocab + ctx) * d + 2 * d
        per_layer = 12 * d * d + 13 * d
        for n_layer in range(1, 129):
            total = fixed + n_layer * per_layer
            size_err = abs(math.log(total / target))
            aspect_err = abs(math.log(d / n_layer / 64.0))
            cand = (aspect_err, size_err, d, n_layer, total)
            if size_err <= math.log(1.05) and (best_in is None or cand[:2] < best_in[:2]):
                best_in = cand
            if best_any is None or (size_err, aspect_err) < (best_any[1], best_any[0]):
                best_any = cand
    _, _, d, n_layer, total = best_in if best_in is not None else best_any
    return {"vocab": vocab, "ctx": ctx, "d_model": d, "n_layer": n_layer, "params": total}


def gpt_shapes(cfg: dict) -> list:
    """(name, shape) of every parameter, in model.parameters() order."""
    d, v, c = cfg["d_model"], cfg["vocab"], cfg["ctx"]
    shapes = [("wte", (v, d)), ("wpe", (c, d))]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (3 * d, d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def make_inputs(torch, shapes, device, seed, grad_std=0.02):
    """One input set: grads ~ N(0, grad_std²) (0.02: spread over ~40 bins, about 1 % beyond
    ±maxval so the edge bins fill; 1e-4, like real gradients, crowds nearly all into the two
    central bins), θ ~ N(0, 0.02²), θ₀ = θ + N(0, 0.01²), θ_prev = θ + N(0, 0.001²)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std)

    grads, params, init, prev = [], [], [], []
    for _, shape in shapes:
        p = randn(shape, 0.02)
        grads.append(randn(shape, grad_std))
        params.append(p)
        init.append(randn(shape, 0.01).add_(p))
        prev.append(randn(shape, 0.001).add_(p))
    return {"grads": grads, "params": params, "init": init, "prev": prev}


# ---------------------------------------------------------------------------------------------
# The two ways of computing the metrics.

def trainscope_param_stats(trainscope, s):
    return trainscope.param_stats(s["grads"], s["params"], s["init"], s["prev"], histogram=True,
                                  nbins=NBINS, maxval=MAXVAL, refresh_prev=True)


def torch_param_stats(torch, s, numel):
    """The PyTorch composition. ``numel`` is the [T] float32 tensor of element counts on the
    device, built once per parameter list (as trainscope's caller binds its lists once).

    Returns (metrics [7], per_tensor [T, 7], hist [nbins] int64, hist_per_tensor [T, nbins] int64)
    in trainscope.METRICS order. The histogram is clamp + torch.histc, what the issue calls the
    PyTorch way: its counters are float32 (they stop at 2^24 per bin) and it bins in the input's
    precision, so it is only compared with a tolerance; trainscope's histogram is checked exactly
    against ``exact_histogram`` (see ``verify``).
    """
    grads, params, init, prev = s["grads"], s["params"], s["init"], s["prev"]
    vnorm = torch.linalg.vector_norm

    grad_norms = torch.stack(torch._foreach_norm(grads))
    diff = torch._foreach_sub(params, init)
    dist = torch.stack(torch._foreach_norm(diff))
    del diff
    diff = torch._foreach_sub(params, prev)
    upd = torch.stack(torch._foreach_norm(diff))
    del diff
    gmag = torch.stack([g.abs().mean() for g in grads])
    wmag = torch.stack([p.abs().mean() for p in params])
    wnorm = torch.stack(torch._foreach_norm(params))
    hist_pt = torch.stack([torch.histc(g.clamp(-MAXVAL, MAXVAL), bins=NBINS, min=-MAXVAL, max=MAXVAL)
                           for g in grads]).to(torch.int64)
    torch._foreach_copy_(prev, params)

    total = numel.sum()
    metrics = torch.stack([vnorm(grad_norms), (gmag * numel).sum() / total,
                           (wmag * numel).sum() / total, vnorm(dist), vnorm(upd), vnorm(wnorm),
                           vnorm(upd) / vnorm(wnorm)])
    per_tensor = torch.stack([grad_norms, gmag, wmag, dist, upd, wnorm, upd / wnorm], dim=1)
    return metrics, per_tensor, hist_pt.sum(0), hist_pt


def exact_histogram(torch, g):
    """SPEC.md §4 to the letter: bin = floor((clamp(x, −m, m) + m) / w) evaluated in float64,
    x = m in the last bin, non-finite values left out, int64 counts. (Not torch.bucketize on
    linspace edges: −m + k·w rounded to float64 is not exactly the boundary the floor rule uses.)
    """
    x = g.detach().reshape(-1).to(torch.float64)
    x = x[torch.isfinite(x)]
    width = 2.0 * MAXVAL / NBINS
    b = torch.floor((x.clamp(-MAXVAL, MAXVAL) + MAXVAL) / width).to(torch.int64).clamp_(0, NBINS - 1)
    return torch.bincount(b, minlength=NBINS)


# ---------------------------------------------------------------------------------------------
# Agreement of the two.

def max_rel_err(torch, a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((a - b).abs() / den).max()) if a.numel() else 0.0


def float64_reference(torch, s):
    """(metrics [7], per_tensor [T, 7]) in float64, one tensor at a time (little extra memory)."""
    sums, numel = [], []
    for g, p, p0, pp in zip(s["grads"], s["params"], s["init"], s["prev"]):
        gd, pd = g.double(), p.double()
        sums.append(torch.stack([gd.square().sum(), gd.abs().sum(), pd.abs().sum(),
                                 (pd - p0.double()).square().sum(), (pd - pp.double()).square().sum(),
                                 pd.square().sum()]))
        numel.append(float(g.numel()))
    sums = torch.stack(sums)
    n = torch.tensor(numel, dtype=torch.float64, device=sums.device)
    per_tensor = torch.stack([sums[:, 0].sqrt(), sums[:, 1] / n, sums[:, 2] / n, sums[:, 3].sqrt(),
                              sums[:, 4].sqrt(), sums[:, 5].sqrt(), sums[:, 4].sqrt() / sums[:, 5].sqrt()], dim=1)
    tot, total = sums.sum(0), n.sum()
    metrics = torch.stack([tot[0].sqrt(), tot[1] / total, tot[2] / total, tot[3].sqrt(), tot[4].sqrt(),
                           tot[5].sqrt(), tot[4].sqrt() / tot[5].sqrt()])
    return metrics, per_tensor


def verify(torch, trainscope, s, numel):
    """Run both once from the same θ_prev (trainscope on a copy, PyTorch on the set's own, which
    it refreshes to θ as the first timed call would) and compare. Returns (ok, report).

    Every metric, global and per tensor, must agree between trainscope and the PyTorch
    composition to RTOL, and trainscope must agree with a float64 reference to RTOL. Where the
    PyTorch composition itself is off from float64 by more than RTOL (PyTorch's CPU float32 norms
    lose about 1e-3 relative on tensors of ~1e7 elements), the first check gives way to the second
    and the report says so under "torch_inaccurate".
    """
    f64_metrics, f64_per_tensor = float64_reference(torch, s)
    ts_prev = [t.clone() for t in s["prev"]]
    ts = trainscope.param_stats(s["grads"], s["params"], s["init"], ts_prev, histogram=True,
                                nbins=NBINS, maxval=MAXVAL, refresh_prev=True)
    ref_metrics, ref_per_tensor, histc, histc_pt = torch_param_stats(torch, s, numel)

    report = {"rtol": RTOL, "metrics": {}, "per_tensor": {}, "trainscope_vs_float64": {},
              "torch_vs_float64": {}, "torch_inaccurate": []}
    ok = True
    for j, name in enumerate(trainscope.METRICS):
        e_global = max_rel_err(torch, ts.metrics[j], ref_metrics[j])
        e_per_tensor = max_rel_err(torch, ts.per_tensor[:, j], ref_per_tensor[:, j])
        e_ts = max(max_rel_err(torch, ts.metrics[j], f64_metrics[j]),
                   max_rel_err(torch, ts.per_tensor[:, j], f64_per_tensor[:, j]))
        e_th = max(max_rel_err(torch, ref_metrics[j], f64_metrics[j]),
                   max_rel_err(torch, ref_per_tensor[:, j], f64_per_tensor[:, j]))
        report["metrics"][name] = e_global
        report["per_tensor"][name] = e_per_tensor
        report["trainscope_vs_float64"][name] = e_ts
        report["torch_vs_float64"][name] = e_th
        if e_th > RTOL:
            report["torch_inaccurate"].append(name)
        ok &= e_ts <= RTOL and (max(e_global, e_per_tensor) <= RTOL or e_th > RTOL)

    # θ_prev refreshed to θ by both.
    prev_ok = all(torch.equal(a, p) and torch.equal(b, p)
                  for a, b, p in zip(ts_prev, s["prev"], s["params"]))
    report["prev_refreshed"] = prev_ok
    ok &= prev_ok
    del ts_prev

    # Histogram: trainscope against the exact SPEC.md §4 rule, bin for bin, per tensor and total.
    exact_pt = torch.stack([exact_histogram(torch, g) for g in s["grads"]])
    exact = exact_pt.sum(0)
    hist_ok = torch.equal(ts.hist, exact) and torch.equal(ts.hist_per_tensor, exact_pt)
    report["hist_exact_match"] = hist_ok
    ok &= hist_ok
    nonfinite_ok = int(ts.nonfinite) == 0
    report["nonfinite_zero"] = nonfinite_ok
    ok &= nonfinite_ok

    # torch.histc, for the record: it bins in the input's precision (float32 x + m rounds, so
    # values within an ulp of an edge, 0 included, can change bin) and counts in float32. Small
    # differences are expected; more than 1e-3 of the count means the composition counts
    # something else (e.g. drops the clamped values), and the comparison would be unfair.
    finite = int(exact.sum())
    saturated = bool(float(histc_pt.max()) >= 2.0**24)
    l1 = int((histc - exact).abs().sum())
    report["torch_histc"] = {"l1_vs_exact": l1, "finite_elements": finite,
                             "saturated_at_2^24": saturated}
    if not saturated and l1 > 1e-3 * finite:
        report["torch_histc"]["note"] = "histc disagrees with the SPEC rule beyond 1e-3 of the count"
        ok = False
    report["ok"] = bool(ok)
    return bool(ok), report


def bench_size(torch, trainscope, target, device, args, l2_bytes):
    cfg = gpt_config(target)
    shapes = gpt_shapes(cfg)
    n = cfg["params"]
    row = {"size": args.size_labels[target], "target_params": target, "config": cfg,
           "params": n, "tensors": len(shapes), "bytes_moved": BYTES_PER_PARAM * n}

    # One set: 16 B/param; the PyTorch side adds one difference list (4 B/param) at a time and a
    # few per-tensor temporaries; verification a clone of θ_prev (4 B/param) and float64 / int64
    # temporaries of the largest tensor.
    per_set = 16 * n
    sets_needed = 1 if per_set >= 4 * l2_bytes else max(2, min(64, math.ceil(4 * l2_bytes / per_set)))
    largest = max(math.prod(s) for _, s in shapes)
    need = sets_needed * per_set + 8 * n + 48 * largest
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.95 * free:
            row["skipped"] = (f"needs about {need / 2**30:.1f} GiB of device memory, "
                              f"{free / 2**30:.1f} GiB free")
            return row

    try:
        sets = [make_inputs(torch, shapes, device, seed=1234 + k, grad_std=args.grad_std)
                for k in range(sets_needed)]
        numel = torch.tensor([float(math.prod(s)) for _, s in shapes], dtype=torch.float32,
                             device=device)
        row["input_sets"] = len(sets)

        row["verify"] = verify(torch, trainscope, sets[0], numel)[1]

        def ts_fn(s):
            trainscope_param_stats(trainscope, s)

        def torch_fn(s):
            torch_param_stats(torch, s, numel)

        ts_ms = time_on(torch, device, ts_fn, sets, args.warmup, args.repeats)
        th_ms = time_on(torch, device, torch_fn, sets, args.warmup, args.repeats)
    except Exception as e:  # noqa: BLE001  (recorded, the other sizes still run)
        return record_failure(torch, row, e)
    finally:
        sets = numel = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    add_bandwidth_results(row, ts_ms, th_ms, row["bytes_moved"], args.copy_bw["GBps"])
    if target >= GOAL_MIN_PARAMS:  # the requested size: "125M" builds 124.4M parameters
        row["goals"] = {"fraction_of_copy_ok": row["fraction_of_copy"] >= GOAL_FRACTION_OF_COPY,
                        "speedup_ok": row["speedup"] >= GOAL_SPEEDUP}
    return row


def print_table(rows, copy_bw):
    head = (f"{'size':>6} {'params':>13} {'tensors':>7} {'trainscope ms':>13} {'torch ms':>10} "
            f"{'speedup':>8} {'GB/s':>8} {'% copy BW':>9}  verify")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
            print(f"{r['size']:>6} {r['params']:>13,} {r['tensors']:>7}  {what}")
            continue
        print(f"{r['size']:>6} {r['params']:>13,} {r['tensors']:>7} "
              f"{r['trainscope']['median_ms']:>13.3f} {r['torch']['median_ms']:>10.3f} "
              f"{r['speedup']:>7.2f}x {r['trainscope_GBps']:>8.1f} {100 * r['fraction_of_copy']:>8.1f}%  "
              f"{'ok' if r['verify']['ok'] else 'MISMATCH'}")
    print(f"copy bandwidth (read + write): {copy_bw['GBps']:.1f} GB/s "
          f"({copy_bw['bytes'] / 2**30:.2f} GiB per copy)")
    for r in rows:
        if "goals" in r:
            g = r["goals"]
            print(f"goal at {r['size']}: >= {100 * GOAL_FRACTION_OF_COPY:.0f}% of copy BW "
                  f"{'met' if g['fraction_of_copy_ok'] else 'NOT met'}, >= {GOAL_SPEEDUP:.0f}x "
                  f"faster than PyTorch {'met' if g['speedup_ok'] else 'NOT met'}")
        if "verify" in r and not r["verify"]["ok"]:
            print(f"verification failed at {r['size']}: {json.dumps(r['verify'])}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated parameter counts (K/M/B suffixes); default {DEFAULT_SIZES}")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per size and side (default 50; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first (default 5; 1 with --quick)")
    p.add_argument("--grad-std", type=float, default=0.02,
                   help="std of the synthetic gradients (default 0.02: spread over the histogram; "
                        "1e-4 puts nearly all in the two central bins, like real gradients)")
    p.add_argument("--json", metavar="OUT.json", help="write every result and the environment here")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tiny sizes ({QUICK_SIZES}) unless --sizes is given, few repeats")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    resolve_repeats(p, args, repeats=(50, 5), warmup=(5, 1))
    if not args.grad_std > 0:
        p.error("--grad-std must be positive")
    labels = [s.strip() for s in args.sizes.split(",") if s.strip()]
    try:
        args.size_list = [parse_size(s) for s in labels]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.size_labels = dict(zip(args.size_list, labels))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch  # imported here: `--help` and argument errors need neither torch nor a GPU
    import trainscope

    setup = bandwidth_bench_setup(torch, trainscope, args, "bench_param_stats")
    if setup is None:
        return 2
    device, l2, env = setup

    rows = [bench_size(torch, trainscope, t, device, args, l2) for t in args.size_list]
    print_table(rows, args.copy_bw)

    ok = all(r.get("verify", {}).get("ok", True) and "error" not in r for r in rows)
    if args.json:
        out = {"benchmark": "param_stats", "environment": env,
               "settings": {"sizes": args.sizes, "repeats": args.repeats, "warmup": args.warmup,
                            "nbins": NBINS, "maxval": MAXVAL, "dtype": "float32",
                            "grad_std": args.grad_std,
                            "bytes_per_param": BYTES_PER_PARAM},
               "copy_bandwidth": args.copy_bw, "results": rows, "verified": ok}
        write_json(args.json, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
