"""Cost of the per-sample gradient histogram from layer factors on Cockpit's 3c3d (CIFAR-10).

    python bench/bench_per_sample_hist.py [--batch 64] [--repeats 5] [--device cpu] [--profile] [--json OUT]

Times, on one batch: the plain step (forward + backward), ``hooks.stats()``,
``hooks.grad_hist1d()`` and ``hooks.grad_hist2d()`` (median of ``--repeats``), and checks the
histogram against the per-layer ops (``layer_per_sample_grad_hist1d``, the path it took before:
the reference counts, and the "before" time).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="the small 3c3d of bench_monitor --quick, batch 16, 2 repeats")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table for grad_hist1d")
    p.add_argument("--json", metavar="OUT.json", help="write the times and the check here")
    args = p.parse_args(argv)
    if args.quick:  # the smoke run of the GPU check's dry run: seconds
        args.batch, args.repeats = min(args.batch, 16), min(args.repeats, 2)

    import torch
    import torch.nn.functional as F
    from torch import nn

    import trainscope
    from trainscope.per_sample_factors import layer_per_sample_grad_hist1d
    from bench_monitor import make_3c3d

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = make_3c3d(nn, args.quick).to(dev)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        out = []
        for _ in range(args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(out[1:])

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    plain = timed(step)
    with trainscope.PerSampleHooks(model) as hooks:
        step()
        t_stats = timed(lambda: hooks.stats())
        t_h1 = timed(lambda: hooks.grad_hist1d())
        t_h2 = timed(lambda: hooks.grad_hist2d())

        def per_layer_ops():  # the reference, and the path grad_hist1d took before: the layer ops
            return sum(layer_per_sample_grad_hist1d(m, xs, hooks._hist_grads(gs)) for _, m, xs, gs in hooks._ready())

        t_old = timed(per_layer_ops)
        same = torch.equal(hooks.grad_hist1d(), per_layer_ops())
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                hooks.grad_hist1d()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"3c3d B={args.batch} on {dev.type}, {torch.get_num_threads()} threads: plain step {plain:.1f} ms, "
          f"stats {t_stats:.1f} ms, grad_hist1d {t_h1:.1f} ms (per-layer ops, as before: {t_old:.1f} ms), "
          f"grad_hist2d {t_h2:.1f} ms; "
          f"hist1d equals the per-layer ops: {same}")
    # The goal: the per-sample histogram costs at most the per-sample statistics.
    print(f"goal: grad_hist1d <= stats: {'met' if t_h1 <= t_stats else 'not met'} "
          f"({t_h1 / t_stats:.2f}x the statistics on {dev.type})")
    if args.json:
        from bench_common import write_json

        write_json(args.json, {
            "benchmark": "per_sample_hist", "model": "3c3d", "batch": args.batch, "device": dev.type,
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "ms": {"plain_step": plain, "stats": t_stats, "grad_hist1d": t_h1, "grad_hist2d": t_h2,
                   "per_layer_ops": t_old},
            "hist1d_over_stats": t_h1 / t_stats, "verified": same})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
