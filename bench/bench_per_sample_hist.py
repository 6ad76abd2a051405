"""Cost of the per-sample gradient histogram from layer factors on Cockpit's 3c3d (CIFAR-10).

    python bench/bench_per_sample_hist.py [--batch 64] [--repeats 5] [--device cpu] [--profile] [--json OUT]

Times, on one batch (medians of ``--repeats``): the plain step (forward + backward), and the step
with the per-sample hooks followed by ``hooks.stats()``, by ``hooks.grad_hist1d()`` or by
``hooks.grad_hist2d()``, each with the hooks set as the Monitor sets them for a step where only
that result is due (``stats_due``: the statistics' parts are taken on the backward pass with the
weight gradient, which a step with only a histogram due does not do). What each adds to the plain
step is its cost. It checks the histogram against that of the per-sample gradients materialised by
``torch.func`` (vmap of grad) in the same dtype: the same total, and counts that differ only where a
value formed with another rounding falls on the other side of a bin edge (at most one element in
10^5).
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
        def step_then(result, stats_due):
            def run():
                hooks.stats_due = stats_due
                step()
                result()
            return run

        s_stats = timed(step_then(hooks.stats, True))
        s_h1 = timed(step_then(hooks.grad_hist1d, False))
        s_h2 = timed(step_then(hooks.grad_hist2d, False))
        # What each adds to the plain step (at least 1 µs: a ratio below stays finite).
        t_stats, t_h1, t_h2 = (max(t - plain, 1e-3) for t in (s_stats, s_h1, s_h2))

        got = hooks.grad_hist1d()
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                hooks.grad_hist1d()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    # The reference: torch.func's per-sample gradients of each sample's own loss (the hooks'
    # mean-reduced loss scales them back by B), binned by the same histogram.
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    want = trainscope.per_sample_grad_hist1d(list(grads.values()))
    del grads
    total = int(want.sum())
    moved = int((got - want).abs().sum()) // 2
    same = int(got.sum()) == total and moved <= max(1, total // 100000)
    print(f"3c3d B={args.batch} on {dev.type}, {torch.get_num_threads()} threads: plain step {plain:.1f} ms; "
          f"with stats {s_stats:.1f} ms (+{t_stats:.1f}), with grad_hist1d {s_h1:.1f} ms (+{t_h1:.1f}), "
          f"with grad_hist2d {s_h2:.1f} ms (+{t_h2:.1f}); "
          f"hist1d against torch.func's per-sample gradients: {moved} of {total} elements in another bin "
          f"({'ok' if same else 'MISMATCH'})")
    # The goal: the per-sample histogram costs at most the per-sample statistics.
    print(f"goal: grad_hist1d <= stats: {'met' if t_h1 <= t_stats else 'not met'} "
          f"({t_h1 / t_stats:.2f}x the statistics on {dev.type})")
    if args.json:
        from bench_common import write_json

        write_json(args.json, {
            "benchmark": "per_sample_hist", "model": "3c3d", "batch": args.batch, "device": dev.type,
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "ms": {"plain_step": plain, "stats": t_stats, "grad_hist1d": t_h1, "grad_hist2d": t_h2},
            "step_ms": {"stats": s_stats, "grad_hist1d": s_h1, "grad_hist2d": s_h2},
            "hist1d_over_stats": t_h1 / t_stats, "elements_in_another_bin": moved, "elements": total,
            "verified": same})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
