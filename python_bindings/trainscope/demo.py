"""A short training loop that records every parameter-space metric each step.

    python -m trainscope.demo [--steps 30] [--device cpu|cuda] [--width 256] [--seed 0]

A small ReLU MLP learns a synthetic regression target. After each optimizer step one fused call
measures loss, grad norm, grad and weight magnitude, distance from init, update size, the
non-finite count and the gradient histogram; the table shows them per step.
"""

from __future__ import annotations

import argparse

import torch

import trainscope


def build_model(width: int, depth: int = 3) -> torch.nn.Module:
    layers, d_in = [], 16
    for _ in range(depth):
        layers += [torch.nn.Linear(d_in, width), torch.nn.ReLU()]
        d_in = width
    layers.append(torch.nn.Linear(d_in, 1))
    return torch.nn.Sequential(*layers)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(args.width).to(device)
    teacher = build_model(32).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]   # θ₀
    prev = [p.detach().clone() for p in params]   # θ before the latest step

    print(f"trainscope demo: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors on {device}")
    header = ("step", "loss", "grad_norm", "grad_mag", "weight_mag", "distance", "update", "nonfinite", "hist[in/out]")
    print("{:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>14}".format(*header))
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 16, device=device)
        with torch.no_grad():
            y = teacher(x)
        per_sample = (model(x) - y).pow(2).squeeze(1)
        opt.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        opt.step()

        s = trainscope.param_stats([p.grad for p in params], params, init, prev,
                                   refresh_prev=True, losses=per_sample.detach())
        # Printing needs the numbers on the host; a logger would drain them asynchronously.
        m = s.metrics.tolist()
        inside = int(s.hist[1:-1].sum())
        edges = int(s.hist[0] + s.hist[-1])
        print(f"{step:>5} {s.loss.item():>10.4g} {m[0]:>10.4g} {m[1]:>10.4g} {m[2]:>10.4g} "
              f"{m[3]:>10.4g} {m[4]:>10.4g} {int(s.nonfinite):>9} {inside:>7}/{edges:<6}")

    last = s.as_dict(names)
    print("\nper-layer grad norm at the last step:")
    for n in names:
        print(f"  {n:<12} {last['grad_norm/' + n].item():.4g}")


if __name__ == "__main__":
    main()
