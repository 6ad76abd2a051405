"""The per-sample statistics' cost on one layer, with and without the fused backward pass.

For each layer and batch, three backward passes of float32 ``layer(x).pow(2).mean()``:

plain       the layer's own backward pass (no hooks): the baseline
not fused   ``PerSampleHooks(fuse_weight_grad=False)``: autograd's weight gradient, then
            ``stats()`` from the captured factors
fused       ``PerSampleHooks()`` (``fuse_weight_grad=True``): the parts and the weight gradient in
            one computation on the backward pass (no weight-gradient GEMM of the layer's own),
            then ``stats()``

Reported: the median time of each (backward pass and ``stats()``, CUDA events on a GPU), and the
overhead of the two hooked ones over the plain backward pass. Verified in every run: the fused
weight gradient against the plain one, and the fused statistics against the unfused ones (rtol
1e-4 each: float32, the same sums in another order); a disagreement exits 1.

    python bench/bench_fused_backward.py [--device cuda] [--repeats 5] [--warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

# (name, constructor args, input shape): GPT-2 small's MLP and attention shapes, and convolutions
# of a ResNet-18's first and third stages at CIFAR size.
LAYERS = [
    ("Linear(768, 3072), B 2, T 1024", ("linear", 768, 3072), (2, 1024, 768)),
    ("Linear(3072, 768), B 2, T 1024", ("linear", 3072, 768), (2, 1024, 3072)),
    ("Linear(768, 768), B 8, T 256", ("linear", 768, 768), (8, 256, 768)),
    ("Conv2d(64, 64, 3), B 32, 32x32", ("conv", 64, 64), (32, 64, 32, 32)),
    ("Conv2d(256, 256, 3), B 32, 8x8", ("conv", 256, 256), (32, 256, 8, 8)),
]
QUICK_LAYERS = [
    ("Linear(16, 24), B 4, T 8", ("linear", 16, 24), (4, 8, 16)),
    ("Conv2d(4, 6, 3), B 4, 8x8", ("conv", 4, 6), (4, 4, 8, 8)),
]
MODES = ("plain", "not fused", "fused")
RTOL = 1e-4


def make_layer(torch, spec, device):
    kind, cin, cout = spec
    torch.manual_seed(0)
    layer = torch.nn.Linear(cin, cout) if kind == "linear" else torch.nn.Conv2d(cin, cout, 3, padding=1)
    return layer.to(device)


def run_case(torch, trainscope, name, spec, shape, device, args):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    row = {"layer": name, "input_shape": list(shape), "modes": {}}
    results = {}
    for mode in MODES:
        layer = make_layer(torch, spec, device)
        hooks = None if mode == "plain" else trainscope.PerSampleHooks(layer, fuse_weight_grad=mode == "fused")
        out = {}

        def step(_):
            layer.zero_grad(set_to_none=True)
            layer(x).pow(2).mean().backward()
            if hooks is not None:
                out["stats"] = hooks.stats().stats

        ms = bc.time_on(torch, device, step, [None], args.warmup, args.repeats)
        results[mode] = (layer.weight.grad.double().cpu(), out.get("stats"))
        row["modes"][mode] = {"time": bc.summarize(ms)}
        if hooks is not None:
            hooks.remove()
    base = row["modes"]["plain"]["time"]["median_ms"]
    for mode in MODES[1:]:
        row["modes"][mode]["overhead"] = row["modes"][mode]["time"]["median_ms"] / base - 1
    plain_grad, fused_grad = results["plain"][0], results["fused"][0]
    grad_err = float((fused_grad - plain_grad).abs().max() / plain_grad.abs().max())
    s_fused, s_own = results["fused"][1].cpu(), results["not fused"][1].cpu()
    stats_err = float(((s_fused - s_own).abs() / s_own.abs().clamp_min(1e-300)).max())
    row["weight_grad_max_rel_err"], row["stats_max_rel_err"] = grad_err, stats_err
    row["verified"] = grad_err <= RTOL and stats_err <= RTOL
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny layers (a smoke run)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    bc.resolve_repeats(p, args, (5, 2), (2, 1))
    import torch

    import trainscope

    device = bc.select_device(torch, args.device, "bench_fused_backward")
    if device is None:
        return 2
    rows = [run_case(torch, trainscope, name, spec, shape, device, args)
            for name, spec, shape in (QUICK_LAYERS if args.quick else LAYERS)]
    print(f"{'layer, batch':34s} {'plain ms':>9s} {'not fused':>10s} {'fused':>8s}   verified")
    for r in rows:
        m = r["modes"]
        print(f"{r['layer']:34s} {m['plain']['time']['median_ms']:9.2f} {m['not fused']['overhead']:+10.0%} "
              f"{m['fused']['overhead']:+8.0%}   {r['verified']} (weight grad {r['weight_grad_max_rel_err']:.1e}, "
              f"stats {r['stats_max_rel_err']:.1e})")
    verified = all(r["verified"] for r in rows)
    if args.json:
        bc.write_json(args.json, {"benchmark": "fused_backward", "environment": bc.environment(torch, trainscope, device),
                                  "verified": verified, "results": rows})
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
