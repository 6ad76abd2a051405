"""What the Python benchmarks (bench/bench_*.py) share: the --device choice, timing summaries,
the recorded environment and the JSON output.

Standard library only; torch and trainscope are passed in by the caller, which imports them after
parsing its arguments (so ``--help`` and argument errors need neither). The scripts run as
``python bench/<name>.py`` from anywhere: Python puts the script's folder, this one, first on
sys.path.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback


def select_device(torch, spec, prog):
    """The torch.device of ``--device spec``; a CUDA device gets its index filled in and is made
    current. None, after saying why on stderr as ``prog``, when there is no CUDA device or the
    device type is neither cuda nor cpu (the caller exits 2)."""
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"{prog}: no CUDA device; use --device cpu", file=sys.stderr)
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        print(f"{prog}: unsupported device {spec!r}", file=sys.stderr)
        return None
    return device


def resolve_repeats(p, args, repeats, warmup):
    """Fills in args.repeats and args.warmup where not given: ``repeats`` and ``warmup`` are
    (default, default with --quick) pairs. Errors through the parser ``p``."""
    args.repeats = args.repeats if args.repeats is not None else (repeats[1] if args.quick else repeats[0])
    args.warmup = args.warmup if args.warmup is not None else (warmup[1] if args.quick else warmup[0])
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")


def summarize(ms):
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "p10_ms": q[0], "p90_ms": q[-1],
            "samples": len(ms)}


def gpu_driver_version(gpu_name):
    """The display driver's version from nvidia-smi (the row of this GPU's model), else NVML."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True)
            rows = [[f.strip() for f in line.split(",")] for line in q.stdout.splitlines() if "," in line]
            for name, version in rows:
                if name == gpu_name:
                    return version
            if rows:
                return rows[0][1]
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001  (NVML absent or unusable: the version stays unknown)
        return None


def environment(torch, trainscope, device):
    env = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "trainscope": getattr(trainscope, "__version__", None),
        "trainscope_library": getattr(trainscope, "library_path", None),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name,
            "gpu_memory_bytes": props.total_memory,
            "gpu_sm_count": props.multi_processor_count,
            "gpu_compute_capability": f"{props.major}.{props.minor}",
            "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
        })
        env["driver"] = gpu_driver_version(props.name)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


def write_json(path, data, **dump_kwargs):
    """Writes ``data`` to ``path`` (folders made as needed), indented, with a final newline;
    ``dump_kwargs`` go to json.dump (e.g. default=str)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, **dump_kwargs)
        f.write("\n")


# Timing: ``sets`` are the inputs the calls rotate through (so small inputs can be read from
# DRAM rather than L2), ``fn`` takes one of them.

def time_cuda(torch, fn, sets, warmup, repeats):
    """Per-call milliseconds from CUDA events, calls back to back (no sync between them), so a
    call whose host side is slower than its GPU work is charged for it, as in a training loop."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        fn(sets[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def time_cpu(fn, sets, warmup, repeats):
    for i in range(warmup):
        fn(sets[i % len(sets)])
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(sets[i % len(sets)])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_on(torch, device, fn, sets, warmup, repeats):
    """time_cuda on a CUDA device, time_cpu otherwise."""
    if device.type == "cuda":
        return time_cuda(torch, fn, sets, warmup, repeats)
    return time_cpu(fn, sets, warmup, repeats)


def record_failure(torch, row, error):
    """A case that raised: out of device memory is recorded as skipped (without its partial
    verification), anything else as an error with its traceback printed (the other cases still
    run; the benchmark exits 1). Returns the row."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        row.pop("verify", None)
        row["skipped"] = f"out of device memory: {str(error).splitlines()[0]}"
    else:
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def add_bandwidth_results(row, ts_ms, th_ms, nbytes, copy_gbps):
    """trainscope's and PyTorch's timings into the row: summaries, speedup, GB/s over ``nbytes``
    and trainscope's fraction of the measured copy bandwidth."""
    row["trainscope"] = summarize(ts_ms)
    row["torch"] = summarize(th_ms)
    t_ts, t_th = row["trainscope"]["median_ms"], row["torch"]["median_ms"]
    row["speedup"] = t_th / t_ts
    row["trainscope_GBps"] = nbytes / (t_ts * 1e-3) / 1e9
    row["torch_GBps"] = nbytes / (t_th * 1e-3) / 1e9
    row["fraction_of_copy"] = row["trainscope_GBps"] / copy_gbps
    return row


def copy_bandwidth(torch, device, nbytes, warmup, repeats):
    """Bandwidth of dst.copy_(src) on ``nbytes`` buffers, counting bytes read + written."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = time_cuda(torch, lambda _: dst.copy_(src), [None], warmup, repeats)
    else:
        ms = time_cpu(lambda _: dst.copy_(src), [None], warmup, repeats)
    med = statistics.median(ms)
    return {"bytes": 2 * n * 4, "median_ms": med, "GBps": 2 * n * 4 / (med * 1e-3) / 1e9}


#


def cache_and_copy_sizes(torch, device):
    """(bytes of last-level cache to outgrow, bytes for the copy-bandwidth measurement) on
    ``device``: the GPU's L2 and up to 1 GiB of free memory; on the CPU, inputs below ~128 MB are
    rotated (beyond a typical last-level cache) and the copy uses 256 MiB."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        free, _ = torch.cuda.mem_get_info(device)
        return l2, min(1 << 30, free // 8) // 4 * 4
    return 32 << 20, 256 << 20


def bandwidth_bench_setup(torch, trainscope, args, prog):
    """What the bandwidth benchmarks do before their cases: the device of ``--device`` (None when
    there is none; the caller exits 2), the cache size to outgrow, the recorded environment, and
    the measured copy bandwidth, also kept as ``args.copy_bw``. Seeds torch with 0."""
    device = select_device(torch, args.device, prog)
    if device is None:
        return None
    l2, copy_bytes = cache_and_copy_sizes(torch, device)
    torch.manual_seed(0)
    env = environment(torch, trainscope, device)
    args.copy_bw = copy_bandwidth(torch, device, copy_bytes, args.warmup + 2, max(args.repeats, 10))
    return device, l2, env


def positive_int_list(text, what, p):
    """The positive integers of a comma-separated option value; errors through the parser ``p``."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{what}: expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        p.error(f"{what}: expected positive integers, got {text!r}")
    return vals

