#!/usr/bin/env python3
"""Benchmark: trainscope's dead-unit pass against the PyTorch way of counting active units.

trainscope side: per-unit active counts of one batch of activations::

    trainscope.active_counts(acts, kind, eps)

PyTorch side, per kind (units are dim 1, the sum runs over the batch and the spatial dims)::

    relu:    (acts != 0).sum(dims)
    tanh:    (acts.abs() <= 1 - eps).sum(dims)
    sigmoid: ((acts >= eps) & (acts <= 1 - eps)).sum(dims)

Shapes: [N, units] layer outputs (2000 × {256, 1024, 4096}, the probe-set size of SPEC.md §3, and
a large 16384 × 4096) and a [N, C, H, W] conv output (256 × 64 × 32 × 32), float32 and bfloat16.
Inputs are activations of the kind (ReLU of a normal, half zeros; tanh and sigmoid of scaled
normals, many saturated) with every tenth unit dead. Small inputs are rotated through enough copies
to exceed the L2 cache four times, so the timings read DRAM.

Bytes moved: every activation read once (units × 8 bytes of counts written are left out).
Achieved bandwidth = bytes moved / median time, reported against the bandwidth of a large
device-to-device copy (bytes read + bytes written) / time, measured here too.

Before timing, every case is checked: trainscope's counts must equal the float64 rule of SPEC.md
§3 exactly, and the PyTorch counts exactly, unless the PyTorch composition itself differs from
float64 (it compares in the input's dtype, with 1 - eps rounded to it); such cases are listed under
"torch_inexact". A mismatch makes the run exit 1.

Run ``python bench/bench_dead_units.py --help``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402  (same folder; stdlib only)
    add_bandwidth_results, bandwidth_bench_setup, record_failure, resolve_repeats, time_on, write_json)

GOAL_FRACTION_OF_COPY = 0.85  # of measured copy bandwidth, on inputs large enough to stream
GOAL_MIN_BYTES = 32 << 20

EPS = 0.01
DEFAULT_SHAPES = "2000x256,2000x1024,2000x4096,16384x4096,256x64x32x32"
QUICK_SHAPES = "64x32,8x4x5x5,7x33"
DEFAULT_DTYPES = "float32,bfloat16"
DEFAULT_KINDS = "relu,tanh,sigmoid"


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; expected e.g. 2000x256 or 256x64x32x32") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: at least 2 positive sizes, [N, units, *spatial]")
    return shape


# ---------------------------------------------------------------------------------------------
# Inputs and the two ways of counting.

def make_acts(torch, shape, kind, dtype, device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    z = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if kind == "relu":
        a = torch.relu(z)
    elif kind == "tanh":
        a = torch.tanh(2.5 * z)
    else:
        a = torch.sigmoid(3.0 * z)
    dead_value = 0.0 if kind == "relu" else 1.0
    a[:, ::10] = dead_value  # every tenth unit never active
    return a.to(dtype)


def reduce_dims(acts):
    return (0,) + tuple(range(2, acts.dim()))


def torch_active_counts(torch, acts, kind, eps):
    dims = reduce_dims(acts)
    if kind == "relu":
        return (acts != 0).sum(dims)
    if kind == "tanh":
        return (acts.abs() <= 1 - eps).sum(dims)
    return ((acts >= eps) & (acts <= 1 - eps)).sum(dims)


def float64_active_counts(torch, acts, kind, eps):
    """SPEC.md §3 in float64, one sample at a time (little extra memory)."""
    total = torch.zeros(acts.shape[1], dtype=torch.int64, device=acts.device)
    for lo in range(0, acts.shape[0], 256):
        total += torch_active_counts(torch, acts[lo:lo + 256].double(), kind, eps)
    return total


def verify(torch, trainscope, acts, kind, eps):
    ts = trainscope.active_counts(acts, kind, eps)
    th = torch_active_counts(torch, acts, kind, eps)
    f64 = float64_active_counts(torch, acts, kind, eps)
    ts_exact = bool(torch.equal(ts, f64))
    th_exact = bool(torch.equal(th, f64))
    ts_vs_th = bool(torch.equal(ts, th))
    report = {"trainscope_vs_float64_exact": ts_exact, "torch_vs_float64_exact": th_exact,
              "trainscope_vs_torch_exact": ts_vs_th,
              "dead_units": int((ts == 0).sum()), "units": int(ts.numel())}
    if not th_exact:
        report["torch_inexact"] = int((th != f64).sum())  # units PyTorch's own dtype miscounts
    report["ok"] = ts_exact and (ts_vs_th or not th_exact)
    return report["ok"], report



# ---------------------------------------------------------------------------------------------

def bench_case(torch, trainscope, shape, dtype_name, kind, device, args, l2_bytes):
    dtype = getattr(torch, dtype_name)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    row = {"shape": list(shape), "dtype": dtype_name, "kind": kind, "eps": EPS, "numel": numel,
           "units": shape[1], "observations_per_unit": numel // shape[1], "bytes_moved": nbytes}
    sets_needed = 1 if nbytes >= 4 * l2_bytes else max(2, min(64, math.ceil(4 * l2_bytes / nbytes)))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = sets_needed * nbytes + 3 * numel + 8 * 256 * numel // shape[0]
        if need > 0.9 * free:
            row["skipped"] = f"needs about {need / 2**30:.1f} GiB of device memory, {free / 2**30:.1f} GiB free"
            return row
    try:
        sets = [make_acts(torch, shape, kind, dtype, device, seed=1234 + k) for k in range(sets_needed)]
        row["input_sets"] = len(sets)
        row["verify"] = verify(torch, trainscope, sets[0], kind, EPS)[1]

        def ts_fn(a):
            trainscope.active_counts(a, kind, EPS)

        def torch_fn(a):
            torch_active_counts(torch, a, kind, EPS)

        ts_ms = time_on(torch, device, ts_fn, sets, args.warmup, args.repeats)
        th_ms = time_on(torch, device, torch_fn, sets, args.warmup, args.repeats)
    except Exception as e:  # noqa: BLE001  (recorded, the other cases still run)
        return record_failure(torch, row, e)
    finally:
        sets = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    add_bandwidth_results(row, ts_ms, th_ms, nbytes, args.copy_bw["GBps"])
    if device.type == "cuda" and nbytes >= GOAL_MIN_BYTES:
        row["goals"] = {"fraction_of_copy_ok": row["fraction_of_copy"] >= GOAL_FRACTION_OF_COPY}
    return row


def print_table(rows, copy_bw):
    head = (f"{'shape':>16} {'dtype':>8} {'kind':>7} {'MB':>8} {'trainscope ms':>13} {'torch ms':>9} "
            f"{'speedup':>8} {'GB/s':>8} {'% copy BW':>9}  verify")
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lead = f"{shape:>16} {r['dtype']:>8} {r['kind']:>7} {r['bytes_moved'] / 1e6:>8.1f}"
        if "skipped" in r or "error" in r:
            print(f"{lead}  {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        v = r["verify"]
        status = ("ok" if v["ok"] else "MISMATCH") + ("" if v["torch_vs_float64_exact"] else " (torch inexact)")
        print(f"{lead} {r['trainscope']['median_ms']:>13.4f} {r['torch']['median_ms']:>9.4f} "
              f"{r['speedup']:>7.2f}x {r['trainscope_GBps']:>8.1f} {100 * r['fraction_of_copy']:>8.1f}%  {status}")
    print(f"copy bandwidth (read + write): {copy_bw['GBps']:.1f} GB/s ({copy_bw['bytes'] / 2**30:.2f} GiB per copy)")
    judged = [r for r in rows if "goals" in r]
    missed = [f"{'x'.join(str(s) for s in r['shape'])} {r['dtype']} {r['kind']}"
              for r in judged if not r["goals"]["fraction_of_copy_ok"]]
    if judged:
        worst = min(r["fraction_of_copy"] for r in judged)
        print(f"goal: >= {100 * GOAL_FRACTION_OF_COPY:.0f}% of copy BW on inputs of {GOAL_MIN_BYTES >> 20} MiB and more: "
              f"{'met' if not missed else 'NOT met'} at {len(judged) - len(missed)}/{len(judged)} cases "
              f"(worst {100 * worst:.1f}%)" + (f"; below: {', '.join(missed)}" if missed else ""))
    else:
        print(f"goal: >= {100 * GOAL_FRACTION_OF_COPY:.0f}% of copy BW: not judged (no CUDA input of "
              f"{GOAL_MIN_BYTES >> 20} MiB or more in this run)")
    for r in rows:
        if "verify" in r and not r["verify"]["ok"]:
            print(f"verification failed at {r['shape']} {r['dtype']} {r['kind']}: {r['verify']}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated activation shapes N x units [x spatial...]; default {DEFAULT_SHAPES}")
    p.add_argument("--dtypes", default=DEFAULT_DTYPES, help=f"comma-separated (default {DEFAULT_DTYPES})")
    p.add_argument("--kinds", default=DEFAULT_KINDS, help=f"comma-separated (default {DEFAULT_KINDS})")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case and side (default 100; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10; 1 with --quick)")
    p.add_argument("--json", metavar="OUT.json", help="write every result and the environment here")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: tiny shapes ({QUICK_SHAPES}) unless --shapes is given, few repeats")
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    resolve_repeats(p, args, repeats=(100, 5), warmup=(10, 1))
    try:
        args.shape_list = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.kind_list = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for d in args.dtype_list:
        if d not in ("float32", "float64", "bfloat16", "float16"):
            p.error(f"unsupported dtype {d!r}")
    for k in args.kind_list:
        if k not in ("relu", "tanh", "sigmoid"):
            p.error(f"unknown kind {k!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch  # imported here: `--help` and argument errors need neither torch nor a GPU
    import trainscope

    setup = bandwidth_bench_setup(torch, trainscope, args, "bench_dead_units")
    if setup is None:
        return 2
    device, l2, env = setup

    rows = [bench_case(torch, trainscope, s, d, k, device, args, l2)
            for s in args.shape_list for d in args.dtype_list for k in args.kind_list]
    print_table(rows, args.copy_bw)

    ok = all(r.get("verify", {}).get("ok", True) and "error" not in r for r in rows)
    if args.json:
        out = {"benchmark": "dead_units", "environment": env,
               "settings": {"shapes": args.shapes, "dtypes": args.dtypes, "kinds": args.kinds, "eps": EPS,
                            "repeats": args.repeats, "warmup": args.warmup},
               "copy_bandwidth": args.copy_bw, "results": rows, "verified": ok}
        write_json(args.json, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
