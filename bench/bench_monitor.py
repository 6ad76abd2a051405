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
import contextlib
import copy
import itertools
import math
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
#: Cockpit's configurations, least to most expensive; the last two hold the curvature family.
CONFIGS = ("economy", "business", "full")
CURVATURE_CONFIGS = ("business", "full")
#: Goal per configuration, on a GPU: Cockpit's overhead (step - plain step) / trainscope's.
GOAL_OVERHEAD_FACTOR = 5.0
#: trainscope's default number of Hutchinson probes (curvature_options["samples"]).
DEFAULT_CURVATURE_SAMPLES = 100
#: Agreement of the configurations' first-step per-sample statistics (GPU kernels may differ in rounding).
CONSISTENCY_RTOL = 1e-3


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
            self.lm_head = nn.Linear(d, vocab, bias=False)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)
            self.lm_head.weight = self.wte.weight  # tied

        def forward(self, idx):
            B, T = idx.shape
            # Positions expanded to [B, T]: every layer sees the batch (per-sample hooks need it).
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device).expand(B, T))
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    return GPT()


def build_workload(torch, name, args, device):
    """(model, batches, per-sample loss fn(model, batch) -> [B], description, outputs fn(model,
    batch) -> (logits [N, C], targets [N]) whose mean cross-entropy is the mean per-sample loss)."""
    nn = torch.nn
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if name == "3c3d":
        B = 8 if args.quick else args.cnn_batch
        model = make_3c3d(nn, args.quick)
        batches = [(torch.randn(B, 3, 32, 32, generator=gen).to(device),
                    torch.randint(0, 10, (B,), generator=gen).to(device)) for _ in range(4)]

        def outputs(m, batch):
            return m(batch[0]), batch[1]

        def per_sample_loss(m, batch):
            return torch.nn.functional.cross_entropy(*outputs(m, batch), reduction="none")

        desc = {"input": [B, 3, 32, 32], "batch": B, "classes": 10}
    else:
        n_layer, d, n_head, vocab = (2, 64, 4, 512) if args.quick else (12, 768, 12, 50257)
        T = min(args.seq_len, 32) if args.quick else args.seq_len
        B = 2 if args.quick else args.gpt_batch
        model = make_gpt(torch, nn, n_layer, d, n_head, vocab, T)
        batches = [torch.randint(0, vocab, (B, T + 1), generator=gen).to(device) for _ in range(4)]

        def outputs(m, batch):
            return m(batch[:, :-1]).reshape(-1, vocab).float(), batch[:, 1:].reshape(-1)

        def per_sample_loss(m, batch):
            tok = torch.nn.functional.cross_entropy(*outputs(m, batch), reduction="none")
            return tok.view(batch.shape[0], -1).mean(1)

        desc = {"n_layer": n_layer, "d_model": d, "n_head": n_head, "vocab": vocab, "seq_len": T, "batch": B}
    model = model.to(device)
    desc["parameters"] = sum(p.numel() for p in model.parameters())
    desc["tensors"] = sum(1 for _ in model.parameters())
    return model, batches, per_sample_loss, desc, outputs


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
# Cockpit's configurations, and trainscope's equivalents (trainscope.cockpit_configuration).

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


def make_cockpit_step(torch, model, outputs, label="economy"):
    """One training step under Cockpit's configuration ``label``, as its basic example's loop: the
    model and the mean cross-entropy loss module extended by BackPACK (the second-order
    extensions of HessTrace and TICDiag start from the loss module), the per-sample losses given
    as information; the backward pass builds its graph where HessMaxEV is due."""
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    model = extend(model)
    lossfunc = extend(torch.nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # Alpha supports SGD only
    cockpit = Cockpit(model.parameters(), quantities=configuration(label))
    counter = itertools.count()

    def step(batch):
        global_step = next(counter)
        opt.zero_grad()
        logits, targets = outputs(model, batch)
        loss = lossfunc(logits, targets)
        B = batch[0].shape[0] if isinstance(batch, (tuple, list)) else batch.shape[0]
        with torch.no_grad():  # values only (Alpha's variance of the losses)
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none").view(B, -1).mean(1)
        info = {"batch_size": B, "individual_losses": losses, "loss": loss, "optimizer": opt}
        with cockpit(global_step, info=info):
            loss.backward(create_graph=cockpit.create_graph(global_step))
        opt.step()

    return step


def curvature_forward_context(torch, name):
    """Where the curvature closure's forward pass runs: the attention of gpt2 on PyTorch's math
    kernel, the one whose backward is differentiable again (the fused kernels' are not)."""
    if name == "gpt2":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return lambda: sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext


def monitor_kwargs(trainscope, label, args):
    """trainscope.cockpit_configuration(label), with --curvature-samples when given."""
    kw = trainscope.cockpit_configuration(label)
    if "curvature" in kw and args.curvature_samples is not None:
        kw["curvature_options"]["samples"] = args.curvature_samples
    return kw


def promised_names(trainscope, kw):
    """(scalar names, histogram names) a record of a due step holds under the Monitor settings
    ``kw`` of cockpit_configuration (alpha: from the second step on)."""
    scalars = {m for m, s in kw.get("metrics", {}).items() if s}
    if kw.get("per_sample"):
        scalars |= {f"per_sample/{s}" for s in trainscope.PER_SAMPLE_STATS}
    if kw.get("alpha"):
        scalars.add("alpha")
    if kw.get("curvature"):
        scalars |= {f"curvature/{w}" for w in kw["curvature_options"]["which"]}
    hists = set()
    if kw.get("per_sample_hist"):
        hists.add("per_sample_grad_hist1d")
        if kw.get("per_sample_options", {}).get("hist2d"):
            hists.add("per_sample_grad_hist2d")
    return scalars, hists


def make_config_step(torch, trainscope, model, per_sample_loss, label, args, device, name):
    """One training step followed by ``monitor.step`` with trainscope's equivalent of Cockpit's
    configuration ``label``; returns (step, monitor, delivered records, the Monitor's kwargs)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    records = []
    kw = monitor_kwargs(trainscope, label, args)
    monitor = trainscope.Monitor(model, sinks=[records.append], **kw)
    counter = itertools.count()
    amp = args.amp == "bf16"
    forward_context = curvature_forward_context(torch, name)

    def closure_for(batch):
        def closure():
            # The per-sample hooks must not capture the closure's forward pass (and the curvature's
            # backward passes through it): they hold this step's training pass, which the
            # per-sample statistics and alpha are measured from after the curvature family.
            hooks = monitor.per_sample_hooks
            armed = hooks.enabled
            hooks.enabled = False
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), forward_context():
                    return per_sample_loss(model, batch)
            finally:
                hooks.enabled = armed
        return closure

    curvature = "curvature" in kw

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = per_sample_loss(model, batch)
        losses.mean().backward()
        opt.step()
        if curvature:
            monitor.step(next(counter), losses.detach(), closure=closure_for(batch))
        else:
            monitor.step(next(counter), losses.detach())

    return step, monitor, records, kw


def check_config_records(trainscope, records, kw, expect_steps):
    """Every name cockpit_configuration promises is in the records (alpha from step 1 on)."""
    problems = []
    if [r.step for r in records] != list(expect_steps):
        problems.append(f"records for steps {[r.step for r in records]}, expected {list(expect_steps)}")
    if not records:
        return problems
    scalars, hists = promised_names(trainscope, kw)
    last = records[-1]
    missing = sorted(scalars - set(last.scalars)) + sorted(hists - set(last.histograms))
    if missing:
        problems.append(f"missing at step {last.step}: {missing}")
    return problems


def check_consistent(configs):
    """The configurations measure the same first step alike: their per-sample statistics and
    loss at step 0 agree with the economy configuration's (the curvature family's closure must not
    disturb what the per-sample hooks captured)."""
    base = configs.get("economy", {}).get("_first")
    if base is None:
        return
    for label, entry in configs.items():
        first = entry.get("_first")
        if label == "economy" or first is None:
            continue
        bad = [k for k, v in base.items() if k in first and not
               abs(first[k] - v) <= CONSISTENCY_RTOL * max(abs(v), 1e-12)]
        if bad:
            entry["trainscope"]["verify"]["ok"] = False
            entry["trainscope"]["verify"]["problems"].append(
                "step 0 differs from the economy configuration's: " +
                ", ".join(f"{k} {first[k]:.6g} vs {base[k]:.6g}" for k in bad[:4]))


# ---------------------------------------------------------------------------------------------


class Arm:
    """One kind of step, timed in blocks of ``warmup`` + ``repeats`` steps, one block per round."""

    def __init__(self, fn, warmup, repeats, entry=None, records=None, monitor=None):
        self.fn, self.warmup, self.repeats, self.entry, self.records = fn, warmup, repeats, entry, records
        self.monitor = monitor
        self.ms = []
        self.failure = None


def add_cockpit_arm(torch, arms, label, pristine, outputs, warmup, repeats, entry):
    """Cockpit's step under ``label`` on a copy of the initial model, as an arm; where Cockpit
    refuses the model already, the entry says so."""
    try:
        step = make_cockpit_step(torch, copy.deepcopy(pristine), outputs, label)
    except Exception as e:  # noqa: BLE001  (Cockpit/BackPACK may not support a model: say so)
        entry["status"] = failure_status(torch, e)
        return
    arms[("cockpit", label)] = Arm(step, warmup, repeats, entry)


def failure_status(torch, e, other="unsupported: "):
    """"unsupported: <error>" (``other``) or "out of memory: <error>", with the error it was
    raised while handling (Cockpit's Alpha fails on a missing gradient after BackPACK refused a
    module)."""
    def first(x):
        return f"{type(x).__name__}: {str(x).splitlines()[0] if str(x) else ''}"

    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    cause = e.__cause__ or e.__context__
    why = f" (raised while handling {first(cause)[:200]})" if cause is not None else ""
    return ("out of memory: " if oom else other) + first(e) + why


def overhead_goal(entry, device):
    """Cockpit's overhead over trainscope's for one configuration, and the goal's verdict."""
    def short(status):  # the kind of failure; the table's notes give the error
        return status if status.startswith("skipped") else status.split(" (")[0].split(":")[0]

    if entry["trainscope"].get("status", "").startswith("skipped"):
        return "not judged", entry["trainscope"]["status"]

    ts, ck = entry["trainscope"], entry["cockpit"]
    if ts.get("status") != "ok":
        return "not judged", f"trainscope {short(ts['status'])}"
    if not ts["verify"]["ok"]:
        return "not judged", "trainscope's records failed verification"
    if ck.get("status") != "ok":
        return "not judged", f"Cockpit {short(ck['status'])}"
    t, c = ts["overhead_ms"], ck["overhead_ms"]
    factor = (math.inf if c > 0 else math.nan) if t <= 0 else c / t
    entry["overhead_factor"] = factor if math.isfinite(factor) else None
    if device.type != "cuda":
        return "not judged", "CPU run"
    entry["goal_ok"] = factor >= GOAL_OVERHEAD_FACTOR
    return ("met" if entry["goal_ok"] else "NOT met"), None


def bench_model(torch, trainscope, name, args, device, cockpit_status):
    row = {"model": name}
    try:
        model, batches, per_sample_loss, desc, outputs = build_workload(torch, name, args, device)
        row.update(desc)
        pristine = copy.deepcopy(model)  # the initial weights every other step kind starts from
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
    except torch.cuda.OutOfMemoryError as e:
        row["skipped"] = f"out of device memory: {str(e).splitlines()[0]}"
        return row
    except Exception as e:  # noqa: BLE001  (recorded; the other model still runs; exit status 1)
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
        return row

    arms = {"plain": Arm(plain, args.warmup, args.repeats),
            "trainscope": Arm(monitored, args.warmup, args.repeats, records=records)}
    row["configs"] = {}
    for label in args.config_list:
        entry = row["configs"][label] = {}
        curv = label in CURVATURE_CONFIGS
        if name not in args.config_model_list:
            entry["trainscope"] = {"status": "skipped: not in --config-models"}
            entry["cockpit"] = {"status": "skipped: not in --config-models"}
            continue
        warmup, repeats = (args.curvature_warmup, args.curvature_repeats) if curv else (args.warmup, args.repeats)
        # trainscope: the records checked on two steps (alpha arrives with the second) first.
        try:
            step, mon, recs, kw = make_config_step(torch, trainscope, copy.deepcopy(pristine), per_sample_loss,
                                                   label, args, device, name)
            n = 2
            for i in range(n):
                step(batches[i % len(batches)])
            mon.flush()
            problems = check_config_records(trainscope, recs, kw, range(n))
            entry["trainscope"] = {"status": "ok", "verify": {"ok": not problems, "problems": problems, "steps": n}}
            if "curvature" in kw:
                o = kw["curvature_options"]
                method = o.get("method", "hutchinson")
                if method == "auto":  # the records say which: an estimate comes with its standard error
                    estimated = any("curvature/hess_trace_stderr" in r.scalars for r in recs)
                    method = "auto: hutchinson" if estimated else "auto: piecewise_linear (exact)"
                entry["trainscope"]["curvature"] = {"which": list(o["which"]), "method": method,
                                                    "samples": o.get("samples", DEFAULT_CURVATURE_SAMPLES)}
            if recs:
                entry["_first"] = {k: v for k, v in recs[0].scalars.items()
                                   if k == "loss" or k.startswith("per_sample/")}
            recs.clear()
            arms[("trainscope", label)] = Arm(step, warmup, repeats, entry["trainscope"], recs, mon)
        except Exception as e:  # noqa: BLE001  (this configuration's row says so; the others run)
            if not isinstance(e, torch.cuda.OutOfMemoryError):
                traceback.print_exc()
            entry["trainscope"] = {"status": failure_status(torch, e, "error: ")}
        if not cockpit_status[0]:
            entry["cockpit"] = {"status": cockpit_status[1]}
        elif label != "economy":  # economy's Cockpit step is the one below, shared with the first table
            add_cockpit_arm(torch, arms, label, pristine, outputs, warmup, repeats,
                            entry.setdefault("cockpit", {}))
    if cockpit_status[0]:
        add_cockpit_arm(torch, arms, "economy", pristine, outputs, args.warmup, args.repeats,
                        row.setdefault("cockpit", {}))
    else:
        row["cockpit"] = {"status": cockpit_status[1]}
    if "economy" in row["configs"] and name in args.config_model_list:
        row["configs"]["economy"]["cockpit"] = row["cockpit"]
    pristine = None
    check_consistent(row["configs"])

    # Timing: every kind of step in turn, one block each per round (drift affects them alike).
    try:
        for _ in range(args.rounds):
            for key, arm in arms.items():
                if arm.failure is not None:
                    continue
                try:
                    arm.ms += time_on(torch, device, arm.fn, batches, arm.warmup, arm.repeats)
                except Exception as e:  # noqa: BLE001
                    if key in ("plain", "trainscope"):
                        raise
                    side, label = key
                    if side == "trainscope" and not isinstance(e, torch.cuda.OutOfMemoryError):
                        print(f"trainscope {label} on {name}:", file=sys.stderr)
                        traceback.print_exc()
                    # The status alone is kept (not the error, whose frames hold tensors).
                    arm.failure = failure_status(torch, e, "error: " if side == "trainscope" else "unsupported: ")
                    arm.fn, arm.records, arm.monitor = None, None, None  # frees its model
                    e = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        for arm in arms.values():
            if arm.monitor is not None:
                arm.monitor.flush()
                arm.monitor.close()
        monitor.flush()
    except torch.cuda.OutOfMemoryError as e:
        row["skipped"] = f"out of device memory: {str(e).splitlines()[0]}"
        return row
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
        return row

    row["records_delivered"] = len(records)
    expected = args.rounds * (args.warmup + args.repeats)
    if len(records) != expected:
        row["verify"]["ok"] = False
        row["verify"]["problems"].append(f"{len(records)} records delivered for {expected} monitored steps")
    row["plain"] = summarize(arms["plain"].ms)
    row["trainscope"] = summarize(arms["trainscope"].ms)
    plain_ms = row["plain"]["median_ms"]
    row["ratio"] = row["trainscope"]["median_ms"] / plain_ms
    if device.type == "cuda":
        row["goal_ok"] = row["ratio"] <= GOAL_RATIO

    for key, arm in arms.items():
        if key in ("plain", "trainscope"):
            continue
        side, label = key
        if arm.failure is not None:
            verify = arm.entry.get("verify")
            arm.entry.clear()
            arm.entry["status"] = arm.failure
            if verify is not None:
                arm.entry["verify"] = verify
            continue
        arm.entry.update({"status": "ok", **summarize(arm.ms)})
        arm.entry["ratio"] = arm.entry["median_ms"] / plain_ms
        arm.entry["overhead_ms"] = arm.entry["median_ms"] - plain_ms
        if side == "trainscope":
            arm.entry["records_delivered"] = len(arm.records)
            want = args.rounds * (arm.warmup + arm.repeats)
            if len(arm.records) != want:
                arm.entry["verify"]["ok"] = False
                arm.entry["verify"]["problems"].append(f"{len(arm.records)} records delivered for {want} steps")
    for label, entry in row["configs"].items():
        entry.pop("_first", None)
        entry["goal"], entry["goal_why"] = overhead_goal(entry, device)
    arms = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt_ms(x):
    return f"{x:.3f}" if x < 1000 else f"{x:.0f}"


def fmt_overhead(x):
    return f"{x:+.3f}" if abs(x) < 1000 else f"{x:+.0f}"


def print_table(rows, device, args):
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

    timed = [r for r in rows if r.get("configs") and "plain" in r]
    if timed:
        print()
        print("Cockpit's configurations, trainscope.cockpit_configuration(label) against Cockpit's "
              "configuration(label); overhead = step - plain step (medians)")
        head = (f"{'model':>6} {'config':>8} {'plain ms':>10} {'trainscope ms':>13} {'overhead':>10} "
                f"{'cockpit ms':>10} {'overhead':>10} {'cockpit/ts':>10}  verify")
        print(head)
        print("-" * len(head))
        for r in timed:
            for label, e in r["configs"].items():
                ts, ck = e["trainscope"], e["cockpit"]
                t_ms, t_over = ((fmt_ms(ts["median_ms"]), fmt_overhead(ts["overhead_ms"])) if ts["status"] == "ok"
                                else ("-", "-"))
                c_ms, c_over = ((fmt_ms(ck["median_ms"]), fmt_overhead(ck["overhead_ms"])) if ck["status"] == "ok"
                                else ("-", "-"))
                f = e.get("overhead_factor")
                factor = f"{f:.2f}x" if f is not None else ("inf" if "overhead_factor" in e else "-")
                ver = ("ok" if ts["verify"]["ok"] else "FAILED") if "verify" in ts else "-"
                print(f"{r['model']:>6} {label:>8} {r['plain']['median_ms']:>10.3f} {t_ms:>13} {t_over:>10} "
                      f"{c_ms:>10} {c_over:>10} {factor:>10}  {ver}")
        for r in timed:
            for label, e in r["configs"].items():
                for side in ("trainscope", "cockpit"):
                    st = e[side]["status"]
                    if st != "ok" and not (side == "cockpit" and label == "economy"):  # said above
                        print(f"{side} {label} on {r['model']}: {st}")
                v = e["trainscope"].get("verify")
                if v and not v["ok"]:
                    print(f"verification failed on {r['model']} {label}: {v['problems']}", file=sys.stderr)
        if any(label in CURVATURE_CONFIGS for label in args.config_list):
            k = args.curvature_samples if args.curvature_samples is not None else DEFAULT_CURVATURE_SAMPLES
            methods = sorted({f"{r['model']}: {e['trainscope']['curvature']['method']}" for r in timed
                              for e in r["configs"].values() if "curvature" in e["trainscope"]})
            print(f"note: business/full: trainscope's Hessian diagonal (hess_trace, tic_diag) by "
                  f"{'; '.join(methods) or '-'}. 'piecewise_linear' is exact (the same diagonal as Cockpit's "
                  f"BackPACK DiagHessian, from layer factors); 'hutchinson' estimates it with {k} Rademacher "
                  f"probes{f' ({args.curvature_samples_from})' if args.curvature_samples_from else ''}, one "
                  f"Hessian-vector product each, and then compares an estimate at a chosen cost with an exact value. "
                  f"hess_max_ev: Cockpit's power iteration against trainscope's Lanczos iteration, from the same "
                  f"start and with the same stopping rule (bench/README.md)")

    for r in rows:
        if "ratio" in r:
            verdict = ("met" if r["goal_ok"] else "NOT met") if device.type == "cuda" else "not judged (CPU run)"
            print(f"goal: <= {GOAL_RATIO}x the plain step on {r['model']}: {verdict} ({r['ratio']:.3f}x)")
    for r in timed:
        for label, e in r["configs"].items():
            ts, ck = e["trainscope"], e["cockpit"]
            nums = []
            if ts["status"] == "ok":
                nums.append(f"trainscope {fmt_overhead(ts['overhead_ms'])} ms")
            if ck["status"] == "ok":
                nums.append(f"Cockpit {fmt_overhead(ck['overhead_ms'])} ms")
            if "overhead_factor" in e:
                f = e["overhead_factor"]
                nums.append(f"Cockpit/trainscope {f:.2f}x" if f is not None else "trainscope's within noise")
            if label in CURVATURE_CONFIGS and args.curvature_samples is not None and ts["status"] == "ok":
                nums.append(f"{args.curvature_samples} probes ({args.curvature_samples_from})")
            verdict = e["goal"] + (f" ({e['goal_why']})" if e["goal_why"] else "")
            print(f"goal: trainscope's overhead >= {GOAL_OVERHEAD_FACTOR:g}x smaller than Cockpit's ({label}) "
                  f"on {r['model']}: {verdict}{' (' + ', '.join(nums) + ')' if nums else ''}")


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
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="Cockpit's configurations to time, trainscope's equivalent beside Cockpit's "
                        f"(comma-separated among {','.join(CONFIGS)}; default all; '' for none)")
    p.add_argument("--curvature-samples", type=int, default=None,
                   help="Hutchinson probes of trainscope's curvature family in business and full "
                        f"(default: trainscope's, {DEFAULT_CURVATURE_SAMPLES}; 8 with --quick)")
    p.add_argument("--curvature-repeats", type=int, default=None,
                   help="timed steps per block of the business and full configurations (default 10; 2 with --quick)")
    p.add_argument("--curvature-warmup", type=int, default=None,
                   help="untimed steps before each block of business and full (default 1)")
    p.add_argument("--config-models", default=None,
                   help="models on which the --configs rows run (comma-separated; default: every model of --models)")
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
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.config_list) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose among {list(CONFIGS)}")
    args.config_list = [c for c in CONFIGS if c in args.config_list]
    cm = args.config_models
    args.config_model_list = args.model_list if cm is None else [m.strip() for m in cm.split(",") if m.strip()]
    unknown = sorted(set(args.config_model_list) - set(MODELS))
    if unknown:
        p.error(f"--config-models: unknown {unknown}; choose among {list(MODELS)}")
    args.curvature_samples_from = "--curvature-samples" if args.curvature_samples is not None else None
    if args.curvature_samples is None and args.quick:
        args.curvature_samples, args.curvature_samples_from = 8, "--quick"
    args.curvature_repeats = args.curvature_repeats if args.curvature_repeats is not None else (2 if args.quick else 10)
    args.curvature_warmup = args.curvature_warmup if args.curvature_warmup is not None else 1
    if (args.curvature_samples is not None and args.curvature_samples < 1) or args.curvature_repeats < 1 \
            or args.curvature_warmup < 0:
        p.error("--curvature-samples and --curvature-repeats must be >= 1, --curvature-warmup >= 0")
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
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")  # Cockpit's HessMaxEV
    status = cockpit_available()
    env = environment(torch, trainscope, device)
    env["cockpit"] = {"available": status[0], "version" if status[0] else "reason": status[1]}
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32

    rows = [bench_model(torch, trainscope, m, args, device, status) for m in args.model_list]
    print_table(rows, device, args)

    ok = all("error" not in r and r.get("verify", {}).get("ok", True) and
             all(e["trainscope"].get("verify", {}).get("ok", True) and not e["trainscope"]["status"].startswith("error")
                 for e in r.get("configs", {}).values())
             for r in rows)
    if args.json:
        out = {"benchmark": "monitor", "environment": env,
               "settings": {"models": args.model_list, "amp": args.amp, "rounds": args.rounds,
                            "repeats": args.repeats, "warmup": args.warmup, "seq_len": args.seq_len,
                            "cnn_batch": args.cnn_batch, "gpt_batch": args.gpt_batch, "quick": args.quick,
                            "configs": args.config_list, "curvature_samples": args.curvature_samples,
                            "curvature_repeats": args.curvature_repeats, "curvature_warmup": args.curvature_warmup,
                            "config_models": args.config_model_list},
               "goal_ratio": GOAL_RATIO, "goal_overhead_factor": GOAL_OVERHEAD_FACTOR,
               "cockpit_published": COCKPIT_PUBLISHED,
               "results": rows, "verified": ok}
        write_json(args.json, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
