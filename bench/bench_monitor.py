#!/usr/bin/env python3
"""Benchmark: the overhead of a monitored training step over the unmonitored one.

Monitored = the same step followed by ``monitor.step(step, losses=per_sample_losses)`` with a
``trainscope.Monitor`` at its defaults: every parameter metric (loss, grad_norm, grad_magnitude,
weight_magnitude, distance, update_size, nonfinite_count), globally and per tensor, and the
gradient histogram, every step, its records delivered to a sink that keeps them.

Models, synthetic data, SGD (lr 0.01, momentum 0.9), float32 (``--amp bf16`` for autocast):

3c3d   Cockpit's CIFAR-10 net (DeepOBS cifar10_3c3d): conv 5×5 → 64, conv 3×3 → 96, conv 3×3
       (same) → 128, each ReLU + 3×3/2 max-pool, then dense 1152 → 512 → 256 → 10; 32×32×3
       inputs, batch 128, cross-entropy. 895,210 parameters in 12 tensors.
gpt2   a GPT-2-small-sized decoder: 12 blocks, d = 768, 12 heads, vocabulary 50,257, context
       ``--seq-len`` (default 1024), batch ``--gpt-batch`` (default 8); pre-LayerNorm blocks,
       causal ``scaled_dot_product_attention``, GELU MLP, LM head tied to the token embedding;
       next-token cross-entropy. 124,439,808 parameters in 148 tensors.

Cockpit's "economy" configuration (``cockpit.utils.configuration.configuration("economy")``:
Alpha, Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize, every
step, BackPACK-extended model and loss as Cockpit's examples set them up) runs on a copy of the same
model when Cockpit is installed (bench/requirements-peers.txt); otherwise its rows say
"not installed", and where it fails on a model the row says so with the error.

Timing: CUDA events around each step, steps back to back without synchronisation (a step whose
host side is slower than its GPU work is charged for it), ``--rounds`` alternating blocks of
plain and monitored steps (so drift affects both), median over all timed steps. Reported per
model: plain ms, monitored ms, their ratio (goal ≤ 1.05 on a GPU), Cockpit ms and its ratio.
Before timing, the monitored records are checked: one per step, every default name present, the
global grad_norm equal to torch's norm of the gradients, the histogram holding every element.

Run ``python bench/bench_monitor.py --help``; bench/README.md explains the output.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402  (same folder; stdlib only)
    environment, resolve_repeats, select_device, summarize, time_on, write_json)

GOAL_RATIO = 1.05  # monitored step time / plain step time, every step, on a GPU
# Cockpit's published economy overheads (Schneider et al., 2021): 3C3D on CIFAR-10, ResNet-50.
COCKPIT_PUBLISHED = {"3c3d": 1.51, "resnet50": 3.71}
MODELS = ("3c3d", "gpt2")
METRICS = ("loss", "grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size",
           "nonfinite_count")
PER_TENSOR = ("grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size")
CHECK_RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Models and data.

def make_3c3d(nn, quick):
    """DeepOBS's cifar10_3c3d (max-pools padded symmetrically: same output sizes as TF's "same")."""
    w = (8, 12, 16, 32, 16) if quick else (64, 96, 128, 512, 256)
    return nn.Sequential(
        nn.Conv2d(3, w[0], 5), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),            # 28 → 14
        nn.Conv2d(w[0], w[1], 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),         # 12 → 6
        nn.Conv2d(w[1], w[2], 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),  # 6 → 3
        nn.Flatten(),
        nn.Linear(3 * 3 * w[2], w[3]), nn.ReLU(), nn.Linear(w[3], w[4]), nn.ReLU(), nn.Linear(w[4], 10))


def make_gpt(torch, nn, n_layer, d, n_head, vocab, ctx):
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (t.view(B, T, n_head, d // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, d))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            return F.linear(self.ln_f(x), self.wte.weight)  # tied LM head

    return GPT()


def build_workload(torch, name, args, device):
    """(model, batches, per-sample loss fn(model, batch) -> [B], description)."""
    nn = torch.nn
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if name == "3c3d":
        B = 8 if args.quick else args.cnn_batch
        model = make_3c3d(nn, args.quick)
        batches = [(torch.randn(B, 3, 32, 32, generator=gen).to(device),
                    torch.randint(0, 10, (B,), generator=gen).to(device)) for _ in range(4)]

        def per_sample_loss(m, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(m(x), y, reduction="none")

        desc = {"input": [B, 3, 32, 32], "batch": B, "classes": 10}
    else:
        n_layer, d, n_head, vocab = (2, 64, 4, 512) if args.quick else (12, 768, 12, 50257)
        T = min(args.seq_len, 32) if args.quick else args.seq_len
        B = 2 if args.quick else args.gpt_batch
        model = make_gpt(torch, nn, n_layer, d, n_head, vocab, T)
        batches = [torch.randint(0, vocab, (B, T + 1), generator=gen).to(device) for _ in range(4)]

        def per_sample_loss(m, batch):
            logits = m(batch[:, :-1])
            tok = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1),
                                                    reduction="none")
            return tok.view(batch.shape[0], -1).mean(1)

        desc = {"n_layer": n_layer, "d_model": d, "n_head": n_head, "vocab": vocab, "seq_len": T, "batch": B}
    model = model.to(device)
    desc["parameters"] = sum(p.numel() for p in model.parameters())
    desc["tensors"] = sum(1 for _ in model.parameters())
    return model, batches, per_sample_loss, desc


# ---------------------------------------------------------------------------------------------
# Steps.

def make_steps(torch, trainscope, model, per_sample_loss, args, device):
    """(plain step, monitored step, monitor, delivered records) on one model and optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    records = []
    monitor = trainscope.Monitor(model, sinks=[records.append])  # every default, every step
    counter = itertools.count()
    amp = args.amp == "bf16"

    def train(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = per_sample_loss(model, batch)
        losses.mean().backward()
        opt.step()
        return losses

    def plain(batch):
        train(batch)

    def monitored(batch):
        losses = train(batch)
        monitor.step(next(counter), losses=losses.detach())

    return plain, monitored, monitor, records


def check_records(torch, records, model, names, expect_steps):
    """The monitored records are complete and right (see the module docstring)."""
    problems = []
    if [r.step for r in records] != list(expect_steps):
        problems.append(f"records for steps {[r.step for r in records][:8]}..., "
                        f"expected {list(expect_steps)[:8]}...")
    if not records:
        return problems
    last = records[-1]
    missing = [m for m in METRICS if m not in last.scalars]
    missing += [f"{m}/{n}" for m in PER_TENSOR for n in names if f"{m}/{n}" not in last.scalars]
    if missing:
        problems.append(f"missing scalars: {missing[:6]}{'...' if len(missing) > 6 else ''}")
    if "grad_hist1d" not in last.histograms:
        problems.append("no grad_hist1d histogram")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    want = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))
    got = last.scalars.get("grad_norm", float("nan"))
    if not abs(got - want) <= CHECK_RTOL * abs(want):
        problems.append(f"grad_norm {got} of the last step, torch says {want}")
    if "grad_hist1d" in last.histograms:
        counts = last.histograms["grad_hist1d"][1]
        elements = sum(g.numel() for g in grads) - int(last.scalars.get("nonfinite_count", 0))
        if int(counts.sum()) != elements:
            problems.append(f"the histogram holds {int(counts.sum())} values, the gradients {elements}")
    return problems


# ---------------------------------------------------------------------------------------------
# Cockpit's economy configuration.

def cockpit_available():
    try:
        import cockpit  # noqa: F401
        from cockpit.utils.configuration import configuration  # noqa: F401
        import backpack  # noqa: F401
    except ImportError as e:
        return False, f"not installed ({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001  (installed but broken: say so)
        return False, f"import failed ({type(e).__name__}: {e})"
    try:
        import importlib.metadata as md
        return True, md.version("cockpit-for-pytorch")
    except Exception:  # noqa: BLE001
        return True, "unknown"


def make_cockpit_step(torch, model, per_sample_loss, args):
    """One training step under Cockpit's economy configuration (its basic example's loop)."""
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    model = extend(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # Alpha supports SGD only
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
    counter = itertools.count()

    def step(batch):
        global_step = next(counter)
        opt.zero_grad()
        losses = per_sample_loss(model, batch)
        loss = losses.mean()
        info = {"batch_size": losses.shape[0], "individual_losses": losses, "loss": loss, "optimizer": opt}
        with cockpit(global_step, info=info):
            loss.backward(create_graph=cockpit.create_graph(global_step))
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------


def bench_model(torch, trainscope, name, args, device, cockpit_status):
    row = {"model": name}
    try:
        model, batches, per_sample_loss, desc = build_workload(torch, name, args, device)
        row.update(desc)
        cockpit_model = copy.deepcopy(model) if cockpit_status[0] else None
        plain, monitored, monitor, records = make_steps(torch, trainscope, model, per_sample_loss, args, device)
        names = [n for n, _ in model.named_parameters()]

        # Correctness first: a few monitored steps, every record delivered and right.
        n_check = 3
        for i in range(n_check):
            monitored(batches[i % len(batches)])
        monitor.flush()
        problems = check_records(torch, records, model, names, range(n_check))
        row["verify"] = {"ok": not problems, "problems": problems, "steps": n_check}
        records.clear()

        plain_ms, mon_ms = [], []
        for _ in range(args.rounds):
            plain_ms += time_on(torch, device, plain, batches, args.warmup, args.repeats)
            mon_ms += time_on(torch, device, monitored, batches, args.warmup, args.repeats)
        monitor.flush()
        row["records_delivered"] = len(records)
        expected = args.rounds * (args.warmup + args.repeats)
        if len(records) != expected:
            row["verify"]["ok"] = False
            row["verify"]["problems"].append(f"{len(records)} records delivered for {expected} monitored steps")
        row["plain"] = summarize(plain_ms)
        row["trainscope"] = summarize(mon_ms)
        row["ratio"] = row["trainscope"]["median_ms"] / row["plain"]["median_ms"]
        if device.type == "cuda":
            row["goal_ok"] = row["ratio"] <= GOAL_RATIO
        del monitor, records
    except torch.cuda.OutOfMemoryError as e:
        row["skipped"] = f"out of device memory: {str(e).splitlines()[0]}"
        return row
    except Exception as e:  # noqa: BLE001  (recorded; the other model still runs; exit status 1)
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
        return row

    if not cockpit_status[0]:
        row["cockpit"] = {"status": cockpit_status[1]}
        return row
    try:
        step = make_cockpit_step(torch, cockpit_model, per_sample_loss, args)
        c_ms = []
        for _ in range(args.rounds):
            c_ms += time_on(torch, device, step, batches, args.warmup, args.repeats)
        row["cockpit"] = {"status": "ok", **summarize(c_ms)}
        row["cockpit"]["ratio"] = row["cockpit"]["median_ms"] / row["plain"]["median_ms"]
    except Exception as e:  # noqa: BLE001  (Cockpit/BackPACK may not support a model: say so)
        first = str(e).splitlines()[0] if str(e) else ""
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower()
        row["cockpit"] = {"status": ("out of memory: " if oom else "unsupported: ") + f"{type(e).__name__}: {first}"}
    finally:
        cockpit_model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows, device):
    head = (f"{'model':>6} {'params':>12} {'plain ms':>10} {'trainscope ms':>13} {'ratio':>7} "
            f"{'cockpit ms':>10} {'cockpit x':>9}  verify")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['model']:>6} {r.get('parameters', 0):>12,}"
        if "skipped" in r or "error" in r:
            print(f"{lead}  {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        c = r["cockpit"]
        c_ms, c_x = ((f"{c['median_ms']:.3f}", f"{c['ratio']:.2f}x") if c["status"] == "ok" else ("-", "-"))
        print(f"{lead} {r['plain']['median_ms']:>10.3f} {r['trainscope']['median_ms']:>13.3f} "
              f"{r['ratio']:>6.3f}x {c_ms:>10} {c_x:>9}  {'ok' if r['verify']['ok'] else 'FAILED'}")
    for r in rows:
        c = r.get("cockpit", {})
        if c and c.get("status") != "ok":
            print(f"cockpit on {r['model']}: {c['status']}")
        if "verify" in r and not r["verify"]["ok"]:
            print(f"verification failed on {r['model']}: {r['verify']['problems']}", file=sys.stderr)
    print(f"Cockpit's published economy overhead: {COCKPIT_PUBLISHED['3c3d']}x (3C3D, CIFAR-10), "
          f"{COCKPIT_PUBLISHED['resnet50']}x (ResNet-50)")
    for r in rows:
        if "ratio" in r:
            verdict = ("met" if r["goal_ok"] else "NOT met") if device.type == "cuda" else "not judged (CPU run)"
            print(f"goal: <= {GOAL_RATIO}x the plain step on {r['model']}: {verdict} ({r['ratio']:.3f}x)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated among {','.join(MODELS)}")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--cnn-batch", type=int, default=128, help="3c3d batch size (default 128)")
    p.add_argument("--gpt-batch", type=int, default=8, help="gpt2 batch size (default 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="gpt2 context length (default 1024)")
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast (default none: float32)")
    p.add_argument("--rounds", type=int, default=None, help="alternating plain/monitored blocks (default 3; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per block (default 50; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each block (default 5; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT.json", help="write every result and the environment here")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, few steps")
    args = p.parse_args(argv)
    resolve_repeats(p, args, repeats=(50, 3), warmup=(5, 1))
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.model_list) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose among {list(MODELS)}")
    if args.rounds < 1 or min(args.cnn_batch, args.gpt_batch, args.seq_len) < 1:
        p.error("--rounds, --cnn-batch, --gpt-batch and --seq-len must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch  # imported here: `--help` and argument errors need neither torch nor a GPU
    import trainscope

    device = select_device(torch, args.device, "bench_monitor")
    if device is None:
        return 2
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    status = cockpit_available()
    env = environment(torch, trainscope, device)
    env["cockpit"] = {"available": status[0], "version" if status[0] else "reason": status[1]}
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32

    rows = [bench_model(torch, trainscope, m, args, device, status) for m in args.model_list]
    print_table(rows, device)

    ok = all("error" not in r and r.get("verify", {}).get("ok", True) for r in rows)
    if args.json:
        out = {"benchmark": "monitor", "environment": env,
               "settings": {"models": args.model_list, "amp": args.amp, "rounds": args.rounds,
                            "repeats": args.repeats, "warmup": args.warmup, "seq_len": args.seq_len,
                            "cnn_batch": args.cnn_batch, "gpt_batch": args.gpt_batch, "quick": args.quick},
               "goal_ratio": GOAL_RATIO, "cockpit_published": COCKPIT_PUBLISHED,
               "results": rows, "verified": ok}
        write_json(args.json, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
