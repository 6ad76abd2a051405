#!/usr/bin/env python3
"""Benchmark: per-sample gradient statistics from layer factors (trainscope) against the peers.

Workload: an MLP of ``--layers`` nn.Linear(d, d) layers with bias and ReLU between them, float32,
on x [B, d] (T = 1) or a sequence x [B, T, d] (T > 1), trained with the mean-reduced MSE loss
against a random target, so sample i's loss ℓᵢ is the mean over its own outputs.

Ways of getting SPEC.md §2's statistics, each timed as a whole training step (the step also
delivers the ordinary training gradient):

plain       forward + loss.backward(), no statistics: the baseline.
trainscope  the same step with ``trainscope.PerSampleHooks`` attached, then ``hooks.stats()``:
            all six statistics from layer factors (ghost norm / tiled), nothing materialised.
vmap        ``torch.func.vmap(torch.func.grad(...))`` materialises B per-sample gradients (their
            mean is the training gradient), then norms, dot products and all six statistics.
einsum      the ghost norm as Opacus computes it, written here: forward and tensor hooks capture
            each layer's input x and output gradient δ, then ‖Gᵢ‖² = Σ_ts (x xᵀ)∘(δ δᵀ) by einsum
            (‖xᵢ‖²‖δᵢ‖² for T = 1), ‖bᵢ‖² = ‖Σ_t δ_it‖²; norm test only.
backpack    BackPACK's ``BatchL2Grad`` extension (PyPI backpack-for-pytorch); norm test only.
cockpit     Cockpit's ``NormTest`` quantity (PyPI cockpit-for-pytorch; it materialises
            BackPACK's BatchGrad and syncs once per step for its ``.item()``); norm test only.

BackPACK and Cockpit are optional: when they do not import, their rows say "not installed".
They are never dependencies of trainscope (bench/requirements-peers.txt pins them).

Reported per (B, d, T): plain forward and backward time; trainscope's overhead (its step minus
the plain step) as a fraction of the plain backward pass; each peer's step time; the speedup of
trainscope's step over vmap's; peak memory (torch.cuda.max_memory_allocated) of each step
relative to the plain step. Before timing, trainscope's six statistics are checked against a
float64 vmap reference on small configurations, and every method's norm test against it.

Whole models (``--models gpt2,resnet18``): a GPT-2-small-sized decoder (B 8, T 1024, tied LM
head) and a ResNet-18-sized CNN (GroupNorm, or BatchNorm in eval mode; B 128, 224×224 or 32×32),
each timed as a training step (forward + backward + SGD step) plain, with trainscope's
``PerSampleHooks`` and ``stats()``, with Opacus's ghost clipping (PyPI opacus, optional) and with
vmap per-sample gradients; overhead against the plain backward pass and peak memory against the
plain step, each row against the goals (≤ 15 %, ≤ 1.2×). A layer kind PerSampleHooks or Opacus
does not handle gives an "unsupported: <message>" row, and the run goes on.

Run ``python bench/bench_per_sample_stats.py --help``; bench/README.md explains the output.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402  (same folder; stdlib only)
    environment, positive_int_list, resolve_repeats, select_device, summarize, write_json)

# Goals of the issue this benchmark answers.
GOAL_OVERHEAD_FRACTION = 0.15   # trainscope step − plain step ≤ 15 % of the plain backward pass
GOAL_SPEEDUP_VS_VMAP = 10.0     # at B = 128, d = 4096
GOAL_SPEEDUP_AT = (128, 4096)   # (B, d), every T
GOAL_PEAK_RATIO = 1.2           # peak memory of a monitored step ≤ 1.2 × plain training

VERIFY_RTOL = 1e-3        # float32 training against the float64 vmap reference
MATERIALISED_RTOL = 1e-5  # trainscope.per_sample_stats on float64 per-sample grads (SPEC.md §5)
AGREE_RTOL = 1e-2         # grid: every method's norm test against trainscope's (all float32)

STATS = ("norm_test", "inner_test", "ortho_test", "grad_variance_trace", "grad_sq_norm_unbiased",
         "gradient_noise_scale")  # SPEC.md §2 order, as trainscope.PER_SAMPLE_STATS

METHODS = ("plain", "trainscope", "vmap", "einsum", "backpack", "cockpit")
PEERS = ("vmap", "einsum", "backpack", "cockpit")
OPTIONAL = ("backpack", "cockpit")  # third-party: their failures are recorded, not fatal

ALL_METHODS = METHODS + ("opacus",)  # opacus: the whole-model rows only (see MODEL_METHODS)

DEFAULT_GRID = {"batch_sizes": "32,128,512", "dims": "512,4096", "seq_lens": "1,128"}
QUICK_GRID = {"batch_sizes": "4,8", "dims": "16,32", "seq_lens": "1,4"}
VERIFY_CONFIGS = ((16, 32, 1), (16, 32, 8))  # (B, d, T), float32 against float64


# ---------------------------------------------------------------------------------------------
# The model and the data.

def make_model(torch, d, layers, device, dtype, seed):
    """Linear(d, d) → ReLU → … → Linear(d, d), the same weights for the same seed and device."""
    nn = torch.nn
    torch.manual_seed(seed)
    mods = []
    for i in range(layers):
        if i:
            mods.append(nn.ReLU())  # not in place: a hook on a layer output must see its gradient
        mods.append(nn.Linear(d, d, bias=True, device=device, dtype=dtype))
    return nn.Sequential(*mods)


def make_data(torch, B, d, T, device, dtype, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    shape = (B, d) if T == 1 else (B, T, d)
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    y = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return x, y


def n_params(d, layers):
    return layers * (d * d + d)


# ---------------------------------------------------------------------------------------------
# Statistics from the three parts, in float64 (SPEC.md §2). Shared by the vmap peer and the
# float64 reference; trainscope computes its own.

def stats_from_parts(torch, sq, dots, msq):
    """sq = ‖gᵢ‖² [B], dots = gᵢ·ḡ [B], msq = ‖ḡ‖² [] → the six statistics [6] (float64)."""
    sq, dots, msq = sq.double(), dots.double(), msq.double()
    B = sq.shape[0]
    s = sq.sum()
    bb = B * (B - 1)
    norm_test = (s / msq - B) / bb
    inner_test = (dots - msq).square().sum() / (bb * msq * msq)
    ortho_test = (sq - dots.square() / msq).sum() / (bb * msq)
    trace = (s - B * msq) / (B - 1)
    g2 = msq - trace / B
    return torch.stack([norm_test, inner_test, ortho_test, trace, g2, trace / g2])


def norm_test_from_sums(sq_total, msq, B):
    """Norm test from Σ‖gᵢ‖² and ‖ḡ‖² of the same scale (both from sum- or both from mean-loss)."""
    return (sq_total.double() / msq.double() - B) / (B * (B - 1))


def materialised_parts(torch, grads):
    """(‖gᵢ‖² [B], gᵢ·ḡ [B], ‖ḡ‖² []) of per-sample gradients [B, *shape], no copy of the B
    gradients: norms and a matrix-vector product read them once each."""
    sq = dots = msq = 0
    for g in grads:
        flat = g.flatten(1)
        mean = flat.mean(0)
        sq = sq + torch.linalg.vector_norm(flat, dim=1).square()
        dots = dots + flat @ mean
        msq = msq + mean.square().sum()
    return sq, dots, msq


def vmap_per_sample_grads(torch, model, x, y):
    """Per-sample gradients of ℓᵢ = mse(model(xᵢ), yᵢ), as a dict of [B, *shape] tensors."""
    from torch.func import functional_call, grad, vmap

    F = torch.nn.functional
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.mse_loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


# ---------------------------------------------------------------------------------------------
# The methods. Each factory returns (step, cleanup); step(mark) runs one training step, calls
# mark(name) at the end of each phase, and returns the statistics it computed ([6] tensor in
# STATS order, or the norm test alone), without waiting for the GPU unless the method itself does.

def _loss(torch, model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _grad_sq_norm(torch, params):
    """‖ḡ‖² of the .grad fields (the gradient of the mean loss)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).square().sum()


def _forward_backward(torch, model, x, y, mark):
    """One plain training step's phases: clear .grad, forward with the loss, backward."""
    model.zero_grad(set_to_none=True)
    loss = _loss(torch, model, x, y)
    mark("forward")
    loss.backward()
    mark("backward")


def make_plain(torch, ctx):
    model = make_model(torch, ctx["d"], ctx["layers"], ctx["device"], torch.float32, ctx["seed"])
    x, y = ctx["x"], ctx["y"]

    def step(mark):
        _forward_backward(torch, model, x, y, mark)
        return None

    return step, lambda: None


def _per_sample_hooks_class(trainscope):
    cls = getattr(trainscope, "PerSampleHooks", None)
    if cls is None:  # not exported at the top level (yet)
        from trainscope.per_sample_factors import PerSampleHooks as cls
    return cls


def make_trainscope(torch, ctx):
    import trainscope

    model = make_model(torch, ctx["d"], ctx["layers"], ctx["device"], torch.float32, ctx["seed"])
    x, y = ctx["x"], ctx["y"]
    hooks = _per_sample_hooks_class(trainscope)(model, method=ctx["method"], loss_reduction="mean")

    def step(mark):
        _forward_backward(torch, model, x, y, mark)
        s = hooks.stats().stats  # [6] in PER_SAMPLE_STATS order
        mark("stats")
        return s

    return step, hooks.remove


def make_vmap(torch, ctx):
    model = make_model(torch, ctx["d"], ctx["layers"], ctx["device"], torch.float32, ctx["seed"])
    x, y = ctx["x"], ctx["y"]

    def step(mark):
        grads = vmap_per_sample_grads(torch, model, x, y)
        mark("per-sample grads")
        # The training gradient is the mean of the per-sample ones: it is formed (and its
        # squared norm taken) in materialised_parts.
        s = stats_from_parts(torch, *materialised_parts(torch, grads.values()))
        mark("stats")
        return s

    return step, lambda: None


class _FactorCapture:
    """Each nn.Linear's input and output gradient, captured with a forward hook and a tensor
    hook on the output (the way Opacus's ghost clipping gets its activations and backprops)."""

    def __init__(self, torch, model):
        self.torch = torch
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.inputs = [None] * len(self.layers)
        self.grads = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(functools.partial(self._forward, i))
                        for i, m in enumerate(self.layers)]

    def _forward(self, i, module, args, output):
        if self.torch.is_grad_enabled() and output.requires_grad:
            self.inputs[i] = args[0].detach()
            self.grads[i] = None
            output.register_hook(functools.partial(self._grad, i))

    def _grad(self, i, g):
        self.grads[i] = g.detach()

    def clear(self):
        self.inputs = [None] * len(self.layers)
        self.grads = [None] * len(self.layers)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.inputs = self.grads = None


def einsum_ghost_sq_norms(torch, x, g):
    """‖∇W‖² + ‖∇b‖² per sample of one nn.Linear from its input x and output gradient g,
    as Opacus's ghost clipping does: [B, d] → ‖xᵢ‖²‖gᵢ‖²; [B, T, d] → Σ_ts (x xᵀ)∘(g gᵀ)."""
    if g.dim() == 2:
        w = torch.einsum("ni,ni->n", x, x) * torch.einsum("ni,ni->n", g, g)
        b = torch.einsum("ni,ni->n", g, g)
    else:
        ggT = torch.einsum("nik,njk->nij", g, g)
        aaT = torch.einsum("nik,njk->nij", x, x)
        w = torch.einsum("nij,nij->n", ggT, aaT)
        b = torch.einsum("n...k->nk", g).square().sum(1)
    return w + b


def make_einsum(torch, ctx):
    model = make_model(torch, ctx["d"], ctx["layers"], ctx["device"], torch.float32, ctx["seed"])
    x, y, B = ctx["x"], ctx["y"], ctx["B"]
    cap = _FactorCapture(torch, model)
    params = list(model.parameters())

    def step(mark):
        cap.clear()  # the previous step's captures go now, as PerSampleHooks lets them go
        _forward_backward(torch, model, x, y, mark)
        # δ of the mean loss is δᵢ/B: Σ‖gᵢ‖² comes out scaled by 1/B², as ‖ḡ‖² from .grad is
        # the mean gradient's; B² puts them on one scale.
        sq = sum(einsum_ghost_sq_norms(torch, a, g) for a, g in zip(cap.inputs, cap.grads))
        nt = norm_test_from_sums(sq.sum() * (B * B), _grad_sq_norm(torch, params), B)
        mark("stats")
        return nt

    return step, cap.remove


def make_backpack(torch, ctx):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(make_model(torch, ctx["d"], ctx["layers"], ctx["device"], torch.float32, ctx["seed"]))
    x, y, B = ctx["x"], ctx["y"], ctx["B"]
    params = list(model.parameters())

    def step(mark):
        model.zero_grad(set_to_none=True)
        loss = _loss(torch, model, x, y)
        mark("forward")
        with backpack(BatchL2Grad()):
            loss.backward()
        mark("backward")
        # batch_l2 of a mean loss is ‖gᵢ/B‖² (BackPACK's docs), hence B².
        sq = sum(p.batch_l2.sum() for p in params)
        nt = norm_test_from_sums(sq * (B * B), _grad_sq_norm(torch, params), B)
        mark("stats")
        for p in params:
            del p.batch_l2
        return nt

    return step, lambda: None


def make_cockpit(torch, ctx):
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.quantities import NormTest

    model = extend(make_model(torch, ctx["d"], ctx["layers"], ctx["device"], torch.float32, ctx["seed"]))
    x, y, B = ctx["x"], ctx["y"], ctx["B"]
    quantity = NormTest(track_schedule=lambda global_step: True)
    cockpit = Cockpit(model.parameters(), quantities=[quantity])
    counter = itertools.count()

    def step(mark):
        global_step = next(counter)
        model.zero_grad(set_to_none=True)
        loss = _loss(torch, model, x, y)
        mark("forward")
        with cockpit(global_step, info={"batch_size": B, "loss": loss}):
            loss.backward(create_graph=cockpit.create_graph(global_step))
        mark("backward+stats")  # Cockpit computes its quantities as the context closes
        theta = quantity.output.pop(global_step)  # a float: Cockpit waited for the GPU
        return torch.tensor(float(theta) ** 2, dtype=torch.float64)  # NormTest θ = sqrt(norm_test)

    return step, lambda: None


FACTORIES = {"plain": make_plain, "trainscope": make_trainscope, "vmap": make_vmap,
             "einsum": make_einsum, "backpack": make_backpack, "cockpit": make_cockpit}

STATS_COMPUTED = {"plain": [], "trainscope": list(STATS), "vmap": list(STATS),
                  "einsum": ["norm_test"], "backpack": ["norm_test"], "cockpit": ["norm_test"]}


def peer_availability():
    """{peer: (available, version or reason)} for the optional peers, imported here only."""
    out = {}
    for name, module in (("backpack", "backpack"), ("cockpit", "cockpit")):
        try:
            mod = __import__(module)
            if name == "cockpit":
                from cockpit.quantities import NormTest  # noqa: F401
            else:
                from backpack.extensions import BatchL2Grad  # noqa: F401
        except ImportError as e:
            out[name] = (False, f"not installed ({type(e).__name__}: {e})")
            continue
        except Exception as e:  # noqa: BLE001  (installed but broken: say so)
            out[name] = (False, f"import failed ({type(e).__name__}: {e})")
            continue
        version = getattr(mod, "__version__", None)
        if version in (None, "unknown"):
            try:
                import importlib.metadata as md
                version = md.version({"backpack": "backpack-for-pytorch",
                                      "cockpit": "cockpit-for-pytorch"}[name])
            except Exception:  # noqa: BLE001
                version = "unknown"
        out[name] = (True, version)
    return out


def _norm_test_of(result):
    if result is None:
        return None
    return float(result.reshape(-1)[0])


# ---------------------------------------------------------------------------------------------
# Memory: what each method needs, roughly, so configurations that cannot fit are skipped with a
# note instead of thrashing the allocator. Float32; activations saved by autograd are the input
# and the pre- and post-ReLU output of each layer.

def memory_estimate(method, B, d, T, layers):
    P = n_params(d, layers)
    act = 4 * B * T * d
    plain = 8 * P + act * (3 * layers + 4)
    ghost = 2 * 4 * B * T * T if T > 1 else 0
    per_sample = 4 * B * (d * d + d)  # one layer's B gradients
    return {
        "plain": plain,
        "trainscope": plain + act * layers + ghost,
        "einsum": plain + act * layers + ghost,
        "vmap": plain + layers * per_sample + per_sample,
        # BatchL2Grad keeps each layer's input and output; for T > 1 its einsum
        # "nmi,nmj,nki,nkj->n" contracts left to right (without opt_einsum) through Gᵢ [B, d, d].
        "backpack": plain + act * layers + (per_sample if T > 1 else 0),
        "cockpit": plain + act * layers + 2 * per_sample,  # BatchGrad of a layer and its square
    }[method]


# ---------------------------------------------------------------------------------------------
# Timing.

def time_steps(torch, device, step, warmup, repeats):
    """Runs ``warmup`` untimed steps, then ``repeats`` timed ones back to back (no
    synchronisation between them, as in a training loop). CUDA: events at the start, at every
    mark and at the end; CPU: time.perf_counter. Returns (total ms list, {phase: ms list})."""
    cuda = device.type == "cuda"

    def no_mark(_name):
        pass

    for _ in range(warmup):
        step(no_mark)
    if cuda:
        torch.cuda.synchronize(device)

    runs = []
    for _ in range(repeats):
        marks = []
        if cuda:
            def mark(name, marks=marks):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                marks.append((name, e))
        else:
            def mark(name, marks=marks):
                marks.append((name, time.perf_counter()))
        mark("start")
        step(mark)
        mark("end")
        runs.append(marks)
    if cuda:
        torch.cuda.synchronize(device)

    def ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    totals, phases = [], {}
    for marks in runs:
        totals.append(ms(marks[0][1], marks[-1][1]))
        for (_, a), (name, b) in zip(marks[:-2], marks[1:-1]):
            phases.setdefault(name, []).append(ms(a, b))
    return totals, phases


def _is_oom(torch, e):
    """An out-of-memory error, also when another exception replaced it on the way out (Cockpit's
    context computes its quantities in __exit__, even when the backward pass failed)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def free_memory_bytes(torch, device):
    """Memory a method may still take: free device memory on CUDA; on the CPU, MemAvailable of
    /proc/meminfo (None where unknown: no check)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _free_device_memory(torch, device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_method(torch, name, ctx, args):
    """One method at one configuration: time its step, measure one step's peak memory, and read
    its statistics. Returns the method's entry of the results."""
    device = ctx["device"]
    entry = {"stats_computed": STATS_COMPUTED[name]}
    if name in OPTIONAL and not args.peers_available[name][0]:
        entry.update(status="not installed", note=args.peers_available[name][1])
        return entry

    _free_device_memory(torch, device)
    est = memory_estimate(name, ctx["B"], ctx["d"], ctx["T"], ctx["layers"])
    entry["memory_estimate_bytes"] = est
    free = free_memory_bytes(torch, device)
    if free is not None and est > 0.9 * free:
        entry.update(status="skipped",
                     note=f"needs about {est / 2**30:.1f} GiB of {device.type} memory, "
                          f"{free / 2**30:.1f} GiB free")
        return entry

    step = cleanup = None
    try:
        step, cleanup = FACTORIES[name](torch, ctx)
        totals, phases = time_steps(torch, device, step, args.warmup, args.repeats)
        # One more step alone for the peak memory and the statistics.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        result = step(lambda _name: None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            entry["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            entry["allocated_before_step_bytes"] = base
        else:
            entry["peak_bytes"] = None
        entry["status"] = "ok"
        entry["step"] = summarize(totals)
        entry["phases_median_ms"] = {k: statistics.median(v) for k, v in phases.items()}
        entry["norm_test"] = _norm_test_of(result)
        if result is not None and result.numel() == len(STATS):
            entry["stats"] = dict(zip(STATS, (float(v) for v in result.double().cpu())))
    except Exception as e:  # noqa: BLE001  (recorded; decided below whether fatal)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _is_oom(torch, e):
            entry.update(status="skipped", note=f"out of device memory: {msg}")
        else:
            traceback.print_exc()
            entry.update(status="error", note=f"{type(e).__name__}: {msg}")
        del e
    finally:
        if cleanup is not None:
            try:
                cleanup()
            except Exception:  # noqa: BLE001
                pass
        step = cleanup = None
        _free_device_memory(torch, device)
    return entry


# ---------------------------------------------------------------------------------------------
# Correctness before timing.

def _rel(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - b) / abs(b)


def verify_config(torch, trainscope, B, d, T, args, device):
    """trainscope (float32 training, hooks) and every method's norm test against the six
    statistics of float64 vmap per-sample gradients; trainscope.per_sample_stats on those float64
    gradients against the same (its materialised path, SPEC.md §5's 1e-5)."""
    ctx = {"B": B, "d": d, "T": T, "layers": args.layers, "device": device, "seed": args.seed,
           "method": args.method}
    ctx["x"], ctx["y"] = make_data(torch, B, d, T, device, torch.float32, args.seed + 1)

    model64 = make_model(torch, d, args.layers, device, torch.float64, args.seed)
    ref_model = make_model(torch, d, args.layers, device, torch.float32, args.seed)
    with torch.no_grad():  # the float64 model holds the float32 model's weights exactly
        for p64, p32 in zip(model64.parameters(), ref_model.parameters()):
            p64.copy_(p32)
    del ref_model
    x64, y64 = ctx["x"].double(), ctx["y"].double()
    grads64 = vmap_per_sample_grads(torch, model64, x64, y64)
    ref = stats_from_parts(torch, *materialised_parts(torch, grads64.values()))
    ref = [float(v) for v in ref.cpu()]
    report = {"B": B, "d": d, "T": T, "layers": args.layers, "rtol": VERIFY_RTOL,
              "reference_float64": dict(zip(STATS, ref)), "methods": {}}
    ok = True

    mat = trainscope.per_sample_stats(list(grads64.values()), histogram=False)
    mat_vals = [float(v) for v in mat.stats.double().cpu()]
    mat_err = max(_rel(a, b) for a, b in zip(mat_vals, ref))
    report["trainscope_materialised_float64"] = {"max_rel_err": mat_err, "rtol": MATERIALISED_RTOL,
                                                 "ok": mat_err <= MATERIALISED_RTOL}
    ok &= mat_err <= MATERIALISED_RTOL
    del grads64, model64

    for name in METHODS[1:]:
        if name not in args.methods:
            continue
        m = {}
        if name in OPTIONAL and not args.peers_available[name][0]:
            report["methods"][name] = {"status": "not installed"}
            continue
        step = cleanup = None
        try:
            step, cleanup = FACTORIES[name](torch, ctx)
            result = step(lambda _name: None)
            vals = [float(v) for v in result.double().reshape(-1).cpu()]
            errs = {s: _rel(v, r) for s, v, r in zip(STATS, vals, ref)}
            m.update(status="ok", values=dict(zip(STATS, vals)), rel_err=errs)
            m["ok"] = max(errs.values()) <= VERIFY_RTOL
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            m.update(status="error", note=f"{type(e).__name__}: {e}", ok=name in OPTIONAL)
        finally:
            if cleanup is not None:
                cleanup()
        if m.get("status") == "ok" and not m["ok"]:
            ok = False
        elif m.get("status") == "error" and name not in OPTIONAL:
            ok = False
        report["methods"][name] = m
    report["ok"] = bool(ok)
    return report


# ---------------------------------------------------------------------------------------------

def bench_config(torch, B, d, T, args, device):
    row = {"B": B, "d": d, "T": T, "layers": args.layers, "params": n_params(d, args.layers),
           "input_shape": [B, d] if T == 1 else [B, T, d],
           "per_sample_grad_bytes": 4 * B * n_params(d, args.layers),  # what vmap materialises
           "methods": {}}
    ctx = {"B": B, "d": d, "T": T, "layers": args.layers, "device": device, "seed": args.seed,
           "method": args.method}
    data_bytes = 2 * 4 * B * T * d
    free = free_memory_bytes(torch, device)
    if free is not None:
        if memory_estimate("plain", B, d, T, args.layers) > 0.9 * free:
            row["skipped"] = (f"plain training needs about "
                              f"{memory_estimate('plain', B, d, T, args.layers) / 2**30:.1f} GiB, "
                              f"{free / 2**30:.1f} GiB free")
            return row
    try:
        ctx["x"], ctx["y"] = make_data(torch, B, d, T, device, torch.float32, args.seed + 1)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = f"the data ({data_bytes / 2**30:.1f} GiB) does not fit"
        return row

    for name in METHODS:
        if name in args.methods:
            row["methods"][name] = run_method(torch, name, ctx, args)
    ctx = None
    _free_device_memory(torch, device)

    ms = row["methods"]
    plain, ts = ms.get("plain", {}), ms.get("trainscope", {})
    if plain.get("status") == "skipped":
        row["skipped"] = f"plain step: {plain.get('note', '')}"
        return row
    if plain.get("status") != "ok":
        row["error"] = f"plain step: {plain.get('status')} {plain.get('note', '')}".strip()
        return row
    d_ = {}
    d_["plain_step_ms"] = plain["step"]["median_ms"]
    d_["plain_forward_ms"] = plain["phases_median_ms"]["forward"]
    d_["plain_backward_ms"] = plain["phases_median_ms"]["backward"]
    for name, m in ms.items():
        if name == "plain" or m.get("status") != "ok":
            continue
        m["overhead_ms"] = m["step"]["median_ms"] - d_["plain_step_ms"]
        m["overhead_fraction_of_plain_backward"] = m["overhead_ms"] / d_["plain_backward_ms"]
        if m.get("peak_bytes") and plain.get("peak_bytes"):
            m["peak_ratio_vs_plain"] = m["peak_bytes"] / plain["peak_bytes"]
        if ts.get("status") == "ok" and name != "trainscope":
            m["speedup_of_trainscope"] = m["step"]["median_ms"] / ts["step"]["median_ms"]
            ts_over = ts["step"]["median_ms"] - d_["plain_step_ms"]
            if ts_over > 0:
                m["overhead_speedup_of_trainscope"] = m["overhead_ms"] / ts_over
            m["norm_test_rel_diff_vs_trainscope"] = _rel(m["norm_test"], ts["norm_test"])
    if ts.get("status") == "ok":
        d_["trainscope_overhead_fraction"] = ts["overhead_fraction_of_plain_backward"]
        d_["trainscope_stats_fraction"] = ts["phases_median_ms"]["stats"] / d_["plain_backward_ms"]
        d_["trainscope_peak_ratio"] = ts.get("peak_ratio_vs_plain")
        vm = ms.get("vmap", {})
        d_["speedup_vs_vmap"] = vm.get("speedup_of_trainscope")
        d_["overhead_speedup_vs_vmap"] = vm.get("overhead_speedup_of_trainscope")
        goals = {"overhead_ok": d_["trainscope_overhead_fraction"] <= GOAL_OVERHEAD_FRACTION}
        if d_["trainscope_peak_ratio"] is not None:
            goals["peak_ok"] = d_["trainscope_peak_ratio"] <= GOAL_PEAK_RATIO
        if (B, d) == GOAL_SPEEDUP_AT:
            goals["speedup_vs_vmap_ok"] = (d_["speedup_vs_vmap"] is not None
                                           and d_["speedup_vs_vmap"] >= GOAL_SPEEDUP_VS_VMAP)
        row["goals"] = goals
        disagree = [n for n, m in ms.items() if n not in ("plain", "trainscope")
                    and m.get("status") == "ok" and m.get("norm_test_rel_diff_vs_trainscope") is not None
                    and not m["norm_test_rel_diff_vs_trainscope"] <= AGREE_RTOL]
        row["agree"] = not disagree
        if disagree:
            row["disagree"] = disagree
    row["derived"] = d_
    return row


# ---------------------------------------------------------------------------------------------
# Whole models: a GPT-2-small-sized decoder and a ResNet-18-sized CNN, each timed as a training
# step (forward + backward + SGD step) plain, with trainscope's per-sample statistics, with
# Opacus's ghost clipping and with torch.func vmap per-sample gradients.

MODEL_NAMES = ("gpt2", "resnet18")
MODEL_METHODS = ("plain", "trainscope", "opacus", "vmap")
# Failures recorded in the row, not fatal: Opacus (third-party), and vmap, whose coverage of a
# whole model's operators (attention, normalisation) depends on the torch version and device.
MODEL_OPTIONAL = ("opacus", "vmap")
#: Methods whose one step --profile records, and how many operators it prints.
PROFILED_METHODS = ("plain", "trainscope")
PROFILE_TOP = 12


class Unsupported(Exception):
    """A method that refuses a model (PerSampleHooks or Opacus not handling a layer kind)."""


_MODEL_CLASSES = {}


def _model_classes(torch):
    """The models' nn.Module classes, defined once torch is imported and registered under their
    names in this module, so that copy.deepcopy (Opacus's ModuleValidator.fix) can pickle them."""
    if _MODEL_CLASSES:
        return _MODEL_CLASSES
    nn = torch.nn

    class GPTBlock(nn.Module):
        def __init__(self, d, n_head):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, n_head, batch_first=True)
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
            # The mask is causal; is_causal=True tells nn.MultiheadAttention so (a faster kernel).
            # Opacus's DPMultiheadAttention refuses the hint and takes the mask alone.
            self.causal_hint = True

        def forward(self, x, mask):
            h = self.ln_1(x)
            a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=self.causal_hint)
            x = x + a
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, n_layer, d, n_head, vocab, T):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
            self.h = nn.ModuleList(GPTBlock(d, n_head) for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)
            self.lm_head.weight = self.wte.weight  # tied

        def forward(self, idx):
            t = idx.shape[-1]
            mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).triu(1)  # True: not attended
            # Positions expanded to [B, T]: every tracked layer sees the batch (the per-sample hooks need it).
            x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device).expand(idx.shape[0], t))
            for block in self.h:
                x = block(x, mask)
            return self.lm_head(self.ln_f(x))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride, norm):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.n1 = _norm_layer(nn, norm, cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.n2 = _norm_layer(nn, norm, cout)
            self.relu = nn.ReLU()  # not in place: hooks on layer outputs see their gradients
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm_layer(nn, norm, cout))

        def forward(self, x):
            out = self.relu(self.n1(self.conv1(x)))
            out = self.n2(self.conv2(out))
            return self.relu(out + (x if self.down is None else self.down(x)))

    for cls in (GPTBlock, GPT, BasicBlock):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
        _MODEL_CLASSES[cls.__name__] = cls
    return _MODEL_CLASSES


def _norm_layer(nn, norm, c):
    return nn.GroupNorm(math.gcd(32, c), c) if norm == "group" else nn.BatchNorm2d(c)


def make_gpt2(torch, n_layer, d, n_head, vocab, T, device, seed):
    """GPT-2-style decoder from torch.nn modules: token and position nn.Embedding, per block
    nn.LayerNorm → nn.MultiheadAttention (causal mask) → residual, nn.LayerNorm → Linear(d, 4d) →
    GELU(tanh) → Linear(4d, d) → residual; final nn.LayerNorm; an nn.Linear LM head whose weight
    is the token embedding's (tied). float32, GPT-2's N(0, 0.02²) initialisation."""
    cls = _model_classes(torch)["GPT"]
    torch.manual_seed(seed)
    return cls(n_layer, d, n_head, vocab, T).to(device)


def make_resnet18(torch, widths, blocks, classes, image, norm, device, seed):
    """ResNet-18 layout without torchvision: a stem (7×7/2 conv + 3×3/2 max-pool for images of
    64 pixels and up, a 3×3 conv for CIFAR-sized ones), four stages of ``blocks`` BasicBlocks
    (3×3 conv, norm, ReLU, 3×3 conv, norm, shortcut 1×1 conv + norm where the shape changes, ReLU)
    of ``widths`` channels, global average pool, nn.Linear head. ``norm``: "group" (GroupNorm with
    32 groups, or fewer where the channels do not divide) or "bn-eval" (BatchNorm2d in eval mode:
    running statistics, so sample i's output depends on sample i alone)."""
    nn = torch.nn
    block = _model_classes(torch)["BasicBlock"]
    torch.manual_seed(seed)
    big = image >= 64
    stem = ([nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), _norm_layer(nn, norm, widths[0]), nn.ReLU(),
             nn.MaxPool2d(3, 2, 1)] if big else
            [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), _norm_layer(nn, norm, widths[0]), nn.ReLU()])
    layers, cin = [], widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(block(cin, w, 2 if (i > 0 and j == 0) else 1, norm))
            cin = w
    model = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))
    model = model.to(device)
    if norm == "bn-eval":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return model


def model_config(name, args):
    """The size of one model for this run (the --quick sizes are tiny, for a CPU in seconds)."""
    if name == "gpt2":
        if args.quick:
            return {"n_layer": min(args.gpt_layers, 2), "d": 32, "n_head": 4, "vocab": 128, "T": 16, "B": 4}
        return {"n_layer": args.gpt_layers, "d": 768, "n_head": 12, "vocab": 50257, "T": args.seq_len,
                "B": args.gpt_batch}
    if args.quick:
        return {"widths": (4, 8, 16, 32), "blocks": (1, 1, 1, 1), "classes": 10, "image": 16, "B": 4,
                "norm": args.resnet_norm}
    return {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), "classes": 1000 if args.image_size >= 64 else 10,
            "image": args.image_size, "B": args.cnn_batch, "norm": args.resnet_norm}


def build_model(torch, name, cfg, device, seed):
    if name == "gpt2":
        return make_gpt2(torch, cfg["n_layer"], cfg["d"], cfg["n_head"], cfg["vocab"], cfg["T"], device, seed)
    return make_resnet18(torch, cfg["widths"], cfg["blocks"], cfg["classes"], cfg["image"], cfg["norm"],
                         device, seed)


def model_data(torch, name, cfg, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if name == "gpt2":
        tok = torch.randint(0, cfg["vocab"], (cfg["B"], cfg["T"] + 1), generator=gen)
        return tok[:, :-1].to(device), tok[:, 1:].to(device)
    x = torch.randn(cfg["B"], 3, cfg["image"], cfg["image"], generator=gen)
    y = torch.randint(0, cfg["classes"], (cfg["B"],), generator=gen)
    return x.to(device), y.to(device)


def model_loss(torch, name, logits, y, reduction="mean"):
    """Cross-entropy; for the decoder, sample i's loss is the mean over its tokens, so the
    mean-reduced loss over all tokens is the mean of the per-sample losses."""
    F = torch.nn.functional
    if name == "gpt2":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction)


def model_sizes(torch, model):
    params = list(model.parameters())  # tied parameters once
    return sum(p.numel() for p in params), len(params)


def model_memory_estimate(method, n_params, B, act_bytes):
    """Rough bytes one step of ``method`` needs: parameters, gradients and the activations of a
    plain step (``act_bytes``, counted by the caller), plus what the method adds."""
    plain = 8 * n_params + act_bytes
    return {"plain": plain,
            "trainscope": plain + act_bytes // 2,           # the captured inputs and output gradients
            "opacus": plain + act_bytes,                    # second backward, captured activations
            "vmap": plain + 4 * B * n_params + act_bytes,   # B per-sample gradients
            }[method]


def _activation_bytes(name, cfg):
    """Activations autograd keeps for the backward pass of a plain step, float32, roughly."""
    if name == "gpt2":
        B, T, d, L, V = cfg["B"], cfg["T"], cfg["d"], cfg["n_layer"], cfg["vocab"]
        per_block = B * T * d * 16 + B * cfg["n_head"] * T * T  # x, q k v, attention, MLP 4d, norms
        return 4 * (L * per_block + 3 * B * T * V)             # logits, softmax, its gradient
    B, img = cfg["B"], cfg["image"]
    side = img // 4 if img >= 64 else img
    total = 0
    for i, w in enumerate(cfg["widths"]):
        s = max(1, side >> i)
        total += cfg["blocks"][i] * 8 * w * s * s
    stem = cfg["widths"][0] * (img // 2) ** 2 * 4 if img >= 64 else cfg["widths"][0] * img * img * 3
    return 4 * B * (total + stem)


def _train_step(torch, name, model, opt, x, y, mark):
    """A plain training step's phases: clear .grad, forward with the loss, backward, SGD step."""
    opt.zero_grad(set_to_none=True)
    loss = model_loss(torch, name, model(x), y)
    mark("forward")
    loss.backward()
    mark("backward")
    return loss


def make_model_plain(torch, ctx):
    model, name = ctx["build"](), ctx["name"]
    opt = torch.optim.SGD(model.parameters(), lr=ctx["lr"])
    x, y = ctx["x"], ctx["y"]

    def step(mark):
        _train_step(torch, name, model, opt, x, y, mark)
        opt.step()
        mark("optimizer")
        return None

    return step, lambda: None


def make_model_trainscope(torch, ctx):
    import trainscope

    model, name = ctx["build"](), ctx["name"]
    opt = torch.optim.SGD(model.parameters(), lr=ctx["lr"])
    x, y = ctx["x"], ctx["y"]
    try:
        hooks = _per_sample_hooks_class(trainscope)(model, method=ctx["method"], loss_reduction="mean")
    except (TypeError, ValueError) as e:
        raise Unsupported(str(e) if str(e).startswith("PerSampleHooks") else f"PerSampleHooks: {e}") from e

    def step(mark):
        _train_step(torch, name, model, opt, x, y, mark)
        try:
            s = hooks.stats().stats  # [6] in PER_SAMPLE_STATS order
        except (TypeError, ValueError) as e:
            raise Unsupported(f"PerSampleHooks.stats(): {e}") from e
        mark("stats")
        opt.step()
        mark("optimizer")
        return s

    return step, hooks.remove


def make_model_vmap(torch, ctx):
    from torch.func import functional_call, grad, vmap

    model, name = ctx["build"](), ctx["name"]
    opt = torch.optim.SGD(model.parameters(), lr=ctx["lr"])
    x, y = ctx["x"], ctx["y"]
    named = dict(model.named_parameters())  # a tied parameter once; functional_call ties it back

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return model_loss(torch, name, out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step(mark):
        grads = per_sample({k: v.detach() for k, v in named.items()}, x, y)
        mark("per-sample grads")
        s = stats_from_parts(torch, *materialised_parts(torch, grads.values()))
        mark("stats")
        for k, p in named.items():  # the training gradient: the mean of the per-sample ones
            p.grad = grads[k].mean(0)
        del grads
        opt.step()
        mark("optimizer")
        return s

    return step, lambda: None


def make_model_opacus(torch, ctx):
    """Opacus's ghost clipping (GradSampleModuleFastGradientClipping, use_ghost_clipping=True):
    per-sample gradient norms from layer factors, clipping to max_grad_norm by a second backward
    pass, noise multiplier 0. Modules Opacus has no ghost norm for use its per-sample gradients
    (fast gradient clipping); nn.MultiheadAttention becomes Opacus's DPMultiheadAttention through
    ModuleValidator.fix, as Opacus prescribes."""
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        from opacus.validators import ModuleValidator
    except ImportError as e:
        raise ImportError(f"{type(e).__name__}: {e}") from e

    name = ctx["name"]
    x, y, B = ctx["x"], ctx["y"], ctx["B"]
    try:
        model = ctx["build"]()
        if name == "gpt2":  # nn.MultiheadAttention → DPMultiheadAttention (a BatchNorm stays: refused below)
            model = ModuleValidator.fix(model)
        for m in model.modules():
            if hasattr(m, "causal_hint"):
                m.causal_hint = False  # DPMultiheadAttention: the causal mask alone
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=1.0, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=ctx["lr"]),
                                              noise_multiplier=0.0, max_grad_norm=1.0,
                                              expected_batch_size=B, loss_reduction="mean")
        criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"),
                                               loss_reduction="mean")
    except Exception as e:  # noqa: BLE001  (Opacus refuses the model: say why, go on)
        raise Unsupported(f"Opacus: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def step(mark=lambda _name: None):
        opt.zero_grad(set_to_none=True)
        logits = gsm(x)
        if name == "gpt2":
            loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), shape=logits.shape)
        else:
            loss = criterion(logits, y)
        mark("forward")
        loss.backward()  # two backward passes: norms, then the clipped gradient
        mark("backward+clipping")
        opt.step()
        mark("optimizer")
        return None

    try:  # one step first: Opacus refuses some models only when they run
        step()
    except Exception as e:  # noqa: BLE001
        if _is_oom(torch, e):
            raise
        why = f"Opacus: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if "attn_mask is not correct" in why:
            why += (" (Opacus's DPMultiheadAttention with batch_first=True checks the mask against the batch "
                    "size instead of T)")
        raise Unsupported(why) from e
    return step, gsm._close if hasattr(gsm, "_close") else (lambda: None)


MODEL_FACTORIES = {"plain": make_model_plain, "trainscope": make_model_trainscope,
                   "opacus": make_model_opacus, "vmap": make_model_vmap}


def opacus_availability():
    try:
        import opacus
    except ImportError as e:
        return False, f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001
        return False, f"import failed ({type(e).__name__}: {e})"
    return True, getattr(opacus, "__version__", "unknown")


def _read_vm_hwm():
    """Peak resident set size of this process (VmHWM, bytes), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_vm_hwm():
    """Resets VmHWM to the current RSS (Linux: 5 into /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def profile_step(torch, device, step):
    """One step under torch.profiler: {operator: ms}. On a GPU the time of the kernels each
    operator launched itself (its children's are theirs), on a CPU the operator's own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step(lambda _name: None)
        if cuda:
            torch.cuda.synchronize(device)
    times = {}
    for e in prof.key_averages():
        if cuda:
            if str(getattr(e, "device_type", "CPU")).rsplit(".", 1)[-1] != "CPU":
                continue  # a kernel's own row: its time is already its operator's
            t = getattr(e, "self_device_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            times[e.key] = times.get(e.key, 0.0) + t / 1e3
    return times


def profile_difference(plain: dict, other: dict, top: int = PROFILE_TOP) -> list:
    """[(operator, plain ms, other ms)] of the operators ``other`` spends most time in beyond
    ``plain``, largest difference first."""
    rows = [(k, plain.get(k, 0.0), other.get(k, 0.0)) for k in set(plain) | set(other)]
    rows.sort(key=lambda r: r[2] - r[1], reverse=True)
    return [r for r in rows[:top] if r[2] > r[1]]


def run_model_method(torch, method, ctx, args):
    """One method on one model: time its step, measure one step's peak memory, keep its statistics."""
    device = ctx["device"]
    entry = {"stats_computed": list(STATS) if method in ("trainscope", "vmap") else []}
    if method == "opacus" and not args.opacus_available[0]:
        entry.update(status="not installed", note=f"{args.opacus_available[1]} "
                     "(pip install --no-deps -r bench/requirements-peers.txt)")
        return entry
    _free_device_memory(torch, device)
    est = model_memory_estimate(method, ctx["params"], ctx["B"], ctx["act_bytes"])
    entry["memory_estimate_bytes"] = est
    free = free_memory_bytes(torch, device)
    if free is not None and est > 0.9 * free:
        entry.update(status="skipped", note=f"does not fit: needs about {est / 2**30:.1f} GiB of "
                     f"{device.type} memory, {free / 2**30:.1f} GiB free")
        return entry
    step = cleanup = None
    try:
        step, cleanup = MODEL_FACTORIES[method](torch, ctx)
        totals, phases = time_steps(torch, device, step, args.warmup, args.repeats)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            entry["allocated_before_step_bytes"] = torch.cuda.memory_allocated(device)
        else:
            gc.collect()
            entry["peak_kind"] = "process RSS (VmHWM)" if _reset_vm_hwm() else None
        result = step(lambda _name: None)
        if cuda:
            torch.cuda.synchronize(device)
            entry["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            entry["peak_kind"] = "torch.cuda.max_memory_allocated"
        else:
            entry["peak_bytes"] = _read_vm_hwm() if entry["peak_kind"] else None
        entry["status"] = "ok"
        entry["step"] = summarize(totals)
        entry["phases_median_ms"] = {k: statistics.median(v) for k, v in phases.items()}
        if args.profile and method in PROFILED_METHODS:
            try:  # the profiler (CUPTI on a GPU) may be unavailable: the timings above stand
                entry["profile_ms"] = profile_step(torch, device, step)
            except Exception as e:  # noqa: BLE001
                entry["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"--profile: {method} step not profiled: {entry['profile_error']}", file=sys.stderr)
        if result is not None:
            entry["stats"] = dict(zip(STATS, (float(v) for v in result.double().cpu())))
            entry["norm_test"] = entry["stats"]["norm_test"]
    except Unsupported as e:
        note = str(e).splitlines()[0]
        entry.update(status="unsupported", note=note if len(note) <= 400 else note[:397] + "...")
    except ImportError as e:
        entry.update(status="not installed", note=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001  (recorded; decided in main whether fatal)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _is_oom(torch, e):
            entry.update(status="skipped", note=f"out of {device.type} memory: {msg}")
        else:
            traceback.print_exc()
            entry.update(status="error", note=f"{type(e).__name__}: {msg}")
        del e
    finally:
        if cleanup is not None:
            try:
                cleanup()
            except Exception:  # noqa: BLE001
                pass
        step = cleanup = None
        _free_device_memory(torch, device)
    return entry


def bench_model(torch, name, args, device):
    cfg = model_config(name, args)
    row = {"model": name, "config": dict(cfg), "methods": {}}
    if "widths" in cfg:
        row["config"]["widths"], row["config"]["blocks"] = list(cfg["widths"]), list(cfg["blocks"])
    ctx = {"name": name, "device": device, "B": cfg["B"], "method": args.method, "lr": 1e-4,
           "build": functools.partial(build_model, torch, name, cfg, device, args.seed)}
    probe = build_model(torch, name, cfg, device, args.seed)
    ctx["params"], row["tensors"] = model_sizes(torch, probe)
    row["params"] = ctx["params"]
    del probe
    ctx["act_bytes"] = _activation_bytes(name, cfg)
    ctx["x"], ctx["y"] = model_data(torch, name, cfg, device, args.seed + 1)
    for method in MODEL_METHODS:
        if method in args.model_methods:
            row["methods"][method] = run_model_method(torch, method, ctx, args)
    ctx = None
    _free_device_memory(torch, device)

    ms = row["methods"]
    plain = ms.get("plain", {})
    if plain.get("status") != "ok":
        row["error" if plain.get("status") == "error" else "skipped"] = \
            f"plain step: {plain.get('status')} {plain.get('note', '')}".strip()
        return row
    bwd = plain["phases_median_ms"]["backward"]
    row["plain_step_ms"] = plain["step"]["median_ms"]
    row["plain_backward_ms"] = bwd
    for method, m in ms.items():
        if method == "plain" or m.get("status") != "ok":
            continue
        m["overhead_ms"] = m["step"]["median_ms"] - row["plain_step_ms"]
        m["overhead_fraction_of_plain_backward"] = m["overhead_ms"] / bwd
        if m.get("peak_bytes") and plain.get("peak_bytes"):
            m["peak_ratio_vs_plain"] = m["peak_bytes"] / plain["peak_bytes"]
        m["goals"] = {"overhead_ok": m["overhead_fraction_of_plain_backward"] <= GOAL_OVERHEAD_FRACTION}
        if "peak_ratio_vs_plain" in m:
            m["goals"]["peak_ok"] = m["peak_ratio_vs_plain"] <= GOAL_PEAK_RATIO
    ts, vm = ms.get("trainscope", {}), ms.get("vmap", {})
    if "profile_ms" in plain and "profile_ms" in ts:
        row["profile_added_ms"] = [{"op": k, "plain_ms": a, "trainscope_ms": b}
                                   for k, a, b in profile_difference(plain["profile_ms"], ts["profile_ms"])]
    if ts.get("status") == "ok" and vm.get("status") == "ok":
        ts["norm_test_rel_diff_vs_vmap"] = _rel(ts["norm_test"], vm["norm_test"])
        row["agree"] = bool(ts["norm_test_rel_diff_vs_vmap"] <= AGREE_RTOL)
    return row


def _model_desc(r):
    c = r["config"]
    if r["model"] == "gpt2":
        return f"gpt2 L={c['n_layer']} d={c['d']} B={c['B']} T={c['T']}"
    return f"resnet18 {c['norm']} B={c['B']} {c['image']}x{c['image']}"


def print_model_tables(rows, args):
    cpu = args.device_obj.type != "cuda"
    suffix = " (CPU smoke run: not a result)" if cpu else ""
    peak_what = "process RSS peak (VmHWM)" if cpu else "torch.cuda.max_memory_allocated"
    print()
    print("whole models: training step (forward + backward + SGD step), median ms; ovh/bwd = (step - plain "
          f"step) / plain backward; peak x = {peak_what} / plain step's")
    head = (f"{'model':<36} {'method':<11} | {'step ms':>9} {'bwd ms':>8} {'ovh/bwd':>8} {'peak x':>7} | goals "
            f"(overhead <= {100 * GOAL_OVERHEAD_FRACTION:.0f}% of plain bwd, peak <= {GOAL_PEAK_RATIO:g}x)")
    print(head)
    print("-" * len(head))
    for r in rows:
        n = r.get("params", 0)
        desc = _model_desc(r) + (f" ({n / 1e6:.1f}M)" if n >= 1e5 else f" ({n / 1e3:.1f}K)")
        if "skipped" in r or "error" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
            print(f"{desc:<36} {'plain':<11} | {why}")
            continue
        for method, m in r["methods"].items():
            st = m.get("status")
            lead = f"{desc:<36} {method:<11} |"
            if st != "ok":
                print(f"{lead} {st}: {m.get('note', '')}")
                continue
            bwd = m["phases_median_ms"].get("backward")
            if method == "plain":
                pk = f"{m['peak_bytes'] / 2**30:.3f} GiB" if m.get("peak_bytes") else "n/a"
                print(f"{lead} {m['step']['median_ms']:>9.3f} {bwd:>8.3f} {'-':>8} {'-':>7} | baseline, peak {pk}")
                continue
            ovh = 100 * m["overhead_fraction_of_plain_backward"]
            pk = m.get("peak_ratio_vs_plain")
            g = m["goals"]
            goals = (f"overhead {'met' if g['overhead_ok'] else 'missed'}, peak "
                     + ({True: "met", False: "missed"}[g["peak_ok"]] if "peak_ok" in g else "not measured"))
            extra = ""
            if "norm_test_rel_diff_vs_vmap" in m:
                extra = f"; norm test vs vmap {m['norm_test_rel_diff_vs_vmap']:.1e}"
            bwd = f"{bwd:.3f}" if bwd is not None else "-"
            print(f"{lead} {m['step']['median_ms']:>9.3f} {bwd:>8} "
                  f"{ovh:>7.1f}% {f'{pk:.2f}' if pk else 'n/a':>7} | {goals}{extra}")
    print()
    for r in rows:
        desc = _model_desc(r)
        if "skipped" in r or "error" in r:
            print(f"goal: {desc}: not measured ({r.get('skipped') or r.get('error')})")
            continue
        for method, m in r["methods"].items():
            if method != "trainscope":  # the goals are trainscope's; the peers' rows above say how they fare
                continue
            st = m.get("status")
            if st == "unsupported":
                print(f"goal: {desc} {method}: unsupported: {m.get('note', '')}")
            elif st != "ok":
                print(f"goal: {desc} {method}: {st}: {m.get('note', '')}")
            else:
                g = m["goals"]
                ovh = 100 * m["overhead_fraction_of_plain_backward"]
                pk = m.get("peak_ratio_vs_plain")
                peak = (f"peak {pk:.2f}x plain (<= {GOAL_PEAK_RATIO:g}x) {'met' if g['peak_ok'] else 'MISSED'}"
                        if "peak_ok" in g else "peak not measured")
                print(f"goal: {desc} {method}: overhead {ovh:.1f}% of plain backward "
                      f"(<= {100 * GOAL_OVERHEAD_FRACTION:.0f}%) {'met' if g['overhead_ok'] else 'MISSED'}; "
                      f"{peak}{suffix}")
    for r in rows:
        if r.get("profile_added_ms"):
            print_profile(r, cpu)


def print_profile(r, cpu):
    """--profile: the operators trainscope's step spends its added time in."""
    what = "own CPU time" if cpu else "time of the kernels each launched itself"
    print()
    print(f"{_model_desc(r)}: one profiled step each, operators by time added over the plain step ({what})")
    print(f"  {'operator':<64} {'plain ms':>10} {'trainscope':>10} {'added':>9}")
    for e in r["profile_added_ms"]:
        print(f"  {e['op'][:64]:<64} {e['plain_ms']:>10.3f} {e['trainscope_ms']:>10.3f} "
              f"{e['trainscope_ms'] - e['plain_ms']:>9.3f}")


# ---------------------------------------------------------------------------------------------
# Output.

def _cell(m, fmt="{:.3f}"):
    if not m:
        return "-"
    st = m.get("status")
    if st == "ok":
        return fmt.format(m["step"]["median_ms"])
    return {"not installed": "n/inst", "skipped": "skip", "error": "ERROR"}.get(st, st or "-")


def print_tables(rows, verify_reports, args):
    print("correctness (float32 training against float64 vmap, rtol "
          f"{VERIFY_RTOL:g}; materialised path rtol {MATERIALISED_RTOL:g}):"
          + ("" if verify_reports else " not run (--no-verify)"))
    for rep in verify_reports:
        parts = [f"materialised {'ok' if rep['trainscope_materialised_float64']['ok'] else 'MISMATCH'}"]
        for name, m in rep["methods"].items():
            if m.get("status") == "ok":
                parts.append(f"{name} {'ok' if m['ok'] else 'MISMATCH'} "
                             f"({max(m['rel_err'].values()):.1e})")
            else:
                parts.append(f"{name} {m.get('status')}")
        print(f"  B={rep['B']} d={rep['d']} T={rep['T']}: " + ", ".join(parts))
    print()

    head = (f"{'B':>4} {'d':>5} {'T':>4} | {'plain ms':>9} {'bwd ms':>8} | {'trainscope':>10} "
            f"{'ovh/bwd':>8} {'stats/bwd':>9} | {'vmap':>9} {'speedup':>8} | {'einsum':>8} "
            f"{'backpack':>9} {'cockpit':>9} | {'peak x':>6}")
    print("step times, median ms (forward + backward [+ statistics]); ovh/bwd = (trainscope step "
          "- plain step) / plain backward")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['B']:>4} {r['d']:>5} {r['T']:>4} |"
        if "skipped" in r or "error" in r:
            print(lead + f" {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        m, dd = r["methods"], r["derived"]
        ts = m.get("trainscope", {})
        ovh = f"{100 * dd['trainscope_overhead_fraction']:.1f}%" if "trainscope_overhead_fraction" in dd else "-"
        stf = f"{100 * dd['trainscope_stats_fraction']:.1f}%" if "trainscope_stats_fraction" in dd else "-"
        sp = f"{dd['speedup_vs_vmap']:.1f}x" if dd.get("speedup_vs_vmap") else "-"
        pk = f"{dd['trainscope_peak_ratio']:.2f}" if dd.get("trainscope_peak_ratio") else "-"
        print(f"{lead} {dd['plain_step_ms']:>9.3f} {dd['plain_backward_ms']:>8.3f} | "
              f"{_cell(ts):>10} {ovh:>8} {stf:>9} | {_cell(m.get('vmap')):>9} {sp:>8} | "
              f"{_cell(m.get('einsum')):>8} {_cell(m.get('backpack')):>9} {_cell(m.get('cockpit')):>9} | "
              f"{pk:>6}" + ("" if r.get("agree", True) else f"  DISAGREE: {r['disagree']}"))

    print()
    print("peak memory of one step (max_memory_allocated), GiB for plain, ratio to plain for the others")
    head2 = f"{'B':>4} {'d':>5} {'T':>4} | {'plain GiB':>9} " + " ".join(f"{n:>10}" for n in METHODS[1:])
    print(head2)
    print("-" * len(head2))
    for r in rows:
        if "skipped" in r or "error" in r:
            continue
        m = r["methods"]
        pl = m["plain"].get("peak_bytes")
        cells = []
        for n in METHODS[1:]:
            e = m.get(n, {})
            if e.get("status") == "ok":
                cells.append(f"{e['peak_ratio_vs_plain']:.2f}" if e.get("peak_ratio_vs_plain") else "n/a")
            else:
                cells.append(_cell(e))
        print(f"{r['B']:>4} {r['d']:>5} {r['T']:>4} | {f'{pl / 2**30:.3f}' if pl else 'n/a':>9} "
              + " ".join(f"{c:>10}" for c in cells))

    notes = []
    for r in rows:
        for n, e in r.get("methods", {}).items():
            if e.get("status") in ("skipped", "error"):
                notes.append(f"  B={r['B']} d={r['d']} T={r['T']} {n}: {e['status']}: {e.get('note', '')}")
    for n in OPTIONAL:
        if n in args.methods and not args.peers_available[n][0]:
            notes.append(f"  {n}: {args.peers_available[n][1]} (pip install --no-deps -r "
                         "bench/requirements-peers.txt)")
    if notes:
        print("\nnotes:")
        print("\n".join(notes))

    print()
    cpu = args.device_obj.type != "cuda"
    suffix = " (CPU smoke run: not a result)" if cpu else ""
    timed = [r for r in rows if "goals" in r]
    over = [r for r in timed if "overhead_ok" in r["goals"]]
    bad = [f"B={r['B']} d={r['d']} T={r['T']}" for r in over if not r["goals"]["overhead_ok"]]
    print(f"goal: statistics overhead <= {100 * GOAL_OVERHEAD_FRACTION:.0f}% of the plain backward pass: "
          f"met at {len(over) - len(bad)}/{len(over)} configurations" + (f" (not met: {', '.join(bad)})" if bad else "")
          + suffix)
    sp = [r for r in timed if "speedup_vs_vmap_ok" in r["goals"]]
    if sp:
        for r in sp:
            v = r["derived"].get("speedup_vs_vmap")
            vo = r["derived"].get("overhead_speedup_vs_vmap")
            what = (f"step {v:.1f}x" + (f", statistics overhead {vo:.1f}x" if vo else "")) if v else \
                f"vmap {r['methods'].get('vmap', {}).get('status', 'not run')}"
            print(f"goal: >= {GOAL_SPEEDUP_VS_VMAP:.0f}x faster than vmap at B={r['B']} d={r['d']} T={r['T']}: "
                  f"{'met' if r['goals']['speedup_vs_vmap_ok'] else 'NOT met'} ({what})" + suffix)
    else:
        print(f"goal: >= {GOAL_SPEEDUP_VS_VMAP:.0f}x faster than vmap at B={GOAL_SPEEDUP_AT[0]}, "
              f"d={GOAL_SPEEDUP_AT[1]}: configuration not in this run")
    pk = [r for r in timed if "peak_ok" in r["goals"]]
    if pk:
        badp = [f"B={r['B']} d={r['d']} T={r['T']}" for r in pk if not r["goals"]["peak_ok"]]
        print(f"goal: peak memory <= {GOAL_PEAK_RATIO:g}x plain training: met at {len(pk) - len(badp)}/{len(pk)} "
              "configurations" + (f" (not met: {', '.join(badp)})" if badp else ""))
    else:
        print(f"goal: peak memory <= {GOAL_PEAK_RATIO:g}x plain training: not measured (no CUDA device)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default=None, help=f"B values (default {DEFAULT_GRID['batch_sizes']})")
    p.add_argument("--dims", default=None, help=f"layer widths d (default {DEFAULT_GRID['dims']})")
    p.add_argument("--seq-lens", default=None,
                   help=f"T values; 1 means 2-D input [B, d] (default {DEFAULT_GRID['seq_lens']})")
    p.add_argument("--layers", type=int, default=3, help="nn.Linear(d, d) layers in the MLP (default 3)")
    p.add_argument("--method", default="auto", choices=("auto", "gram", "ghost", "tiled"),
                   help="trainscope's way of forming ‖Gᵢ‖² (default auto)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"which to run, comma-separated among {','.join(ALL_METHODS)} (default all; "
                        "plain is always run; the MLP grid runs those of "
                        f"{','.join(METHODS)}, the models those of {','.join(MODEL_METHODS)})")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 20; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the float64 correctness check")
    p.add_argument("--json", metavar="OUT.json", help="write every result and the environment here")
    p.add_argument("--quick", "--smoke", dest="quick", action="store_true",
                   help="smoke run: B 4,8, d 16,32, T 1,4 unless given, tiny versions of the models, few repeats")
    g = p.add_argument_group("whole models (--models gpt2,resnet18)")
    g.add_argument("--models", default=",".join(("mlp",) + MODEL_NAMES),
                   help="what to run, comma-separated among mlp (the B × d × T grid above), gpt2, resnet18 "
                        "(default all three)")
    g.add_argument("--gpt-layers", type=int, default=12,
                   help="decoder blocks of the GPT-2-small-sized model (default 12, GPT-2 small; fewer on a "
                        "tight time budget)")
    g.add_argument("--gpt-batch", type=int, default=8, help="GPT-2 batch size (default 8)")
    g.add_argument("--seq-len", type=int, default=1024, help="GPT-2 context T (default 1024)")
    g.add_argument("--cnn-batch", type=int, default=128, help="ResNet-18 batch size (default 128)")
    g.add_argument("--image-size", type=int, default=224,
                   help="ResNet-18 input side: 224 (ImageNet stem, 1000 classes; default) or e.g. 32 (CIFAR "
                        "stem: 3x3 conv, no max-pool, 10 classes)")
    g.add_argument("--profile", action="store_true",
                   help="after timing, profile one plain and one trainscope step and print the operators "
                        "the statistics add time in (torch.profiler; on a GPU the kernels' time)")
    g.add_argument("--resnet-norm", default="group", choices=("group", "bn-eval"),
                   help="ResNet-18 normalisation: group (GroupNorm, default) or bn-eval (BatchNorm2d in eval "
                        "mode); BatchNorm in train mode mixes the samples and has no per-sample gradients")
    args = p.parse_args(argv)
    grid = QUICK_GRID if args.quick else DEFAULT_GRID
    args.batch_sizes = positive_int_list(args.batch_sizes or grid["batch_sizes"], "--batch-sizes", p)
    args.dims = positive_int_list(args.dims or grid["dims"], "--dims", p)
    args.seq_lens = positive_int_list(args.seq_lens or grid["seq_lens"], "--seq-lens", p)
    if min(args.batch_sizes) < 2:
        p.error("--batch-sizes: the statistics need B >= 2")
    if args.layers < 1:
        p.error("--layers must be >= 1")
    resolve_repeats(p, args, repeats=(20, 3), warmup=(3, 1))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose among {list(ALL_METHODS)}")
    args.methods = ["plain"] + [m for m in METHODS[1:] if m in methods]
    args.model_methods = ["plain"] + [m for m in MODEL_METHODS[1:] if m in methods]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"mlp", *MODEL_NAMES})
    if unknown or not models:
        p.error(f"--models: unknown {unknown or models}; choose among {['mlp', *MODEL_NAMES]}")
    args.models = [m for m in ("mlp",) + MODEL_NAMES if m in models]
    for flag in ("gpt_layers", "gpt_batch", "seq_len", "cnn_batch", "image_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.gpt_batch < 2 or args.cnn_batch < 2:
        p.error("--gpt-batch and --cnn-batch: the statistics need B >= 2")
    if args.image_size < 16 and not args.quick:
        p.error("--image-size must be >= 16")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch  # imported here: `--help` and argument errors need neither torch nor a GPU
    import trainscope

    device = select_device(torch, args.device, "bench_per_sample_stats")
    if device is None:
        return 2
    args.device_obj = device
    # Known and harmless: BackPACK's module hooks on the first layer, whose input needs no
    # gradient; Cockpit's import of pkg_resources.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    args.peers_available = peer_availability()
    args.opacus_available = opacus_availability()

    env = environment(torch, trainscope, device)
    env["peers"] = {n: {"available": a, "version" if a else "reason": v}
                    for n, (a, v) in args.peers_available.items()}
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    # Whether torch.einsum optimises the contraction order of BackPACK's four-operand einsum.
    env["opt_einsum"] = bool(torch.backends.opt_einsum.is_available())
    a, v = args.opacus_available
    env["peers"]["opacus"] = {"available": a, "version" if a else "reason": v}

    ok = True
    verify_reports = []
    run_mlp = "mlp" in args.models
    if run_mlp and not args.no_verify:
        for B, d, T in VERIFY_CONFIGS:
            try:
                rep = verify_config(torch, trainscope, B, d, T, args, device)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rep = {"B": B, "d": d, "T": T, "ok": False, "error": f"{type(e).__name__}: {e}",
                       "trainscope_materialised_float64": {"ok": False}, "methods": {}}
            verify_reports.append(rep)
            ok &= rep["ok"]
            _free_device_memory(torch, device)
        if not ok:
            print("verification failed; timing anyway, the run will exit 1", file=sys.stderr)

    rows = []
    grid = itertools.product(args.batch_sizes, args.dims, args.seq_lens) if run_mlp else ()
    for B, d, T in grid:
        try:
            row = bench_config(torch, B, d, T, args, device)
        except Exception as e:  # noqa: BLE001  (recorded, the other configurations still run)
            traceback.print_exc()
            row = {"B": B, "d": d, "T": T, "layers": args.layers, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        _free_device_memory(torch, device)
    if run_mlp:
        print_tables(rows, verify_reports, args)

    model_rows = []
    for name in args.models:
        if name == "mlp":
            continue
        try:
            row = bench_model(torch, name, args, device)
        except Exception as e:  # noqa: BLE001  (recorded, the other model still runs)
            traceback.print_exc()
            row = {"model": name, "config": model_config(name, args), "methods": {},
                   "error": f"{type(e).__name__}: {e}"}
        model_rows.append(row)
        _free_device_memory(torch, device)
    if model_rows:
        print_model_tables(model_rows, args)
    for r in model_rows:
        if "error" in r or not r.get("agree", True):
            ok = False
        for n, m in r.get("methods", {}).items():
            if m.get("status") == "error" and n not in MODEL_OPTIONAL:
                ok = False

    for r in rows:
        if "error" in r or not r.get("agree", True):
            ok = False
        for n, m in r.get("methods", {}).items():
            if m.get("status") == "error" and n not in OPTIONAL:
                ok = False
    for rep in verify_reports:
        if not rep["ok"]:
            print(f"verification failed: {json.dumps(rep)}", file=sys.stderr)

    if args.json:
        out = {"benchmark": "per_sample_stats", "environment": env,
               "settings": {"batch_sizes": args.batch_sizes, "dims": args.dims, "seq_lens": args.seq_lens,
                            "layers": args.layers, "trainscope_method": args.method,
                            "methods": args.methods, "repeats": args.repeats, "warmup": args.warmup,
                            "dtype": "float32", "loss": "mse_loss(mean)", "seed": args.seed,
                            "models": args.models, "model_methods": args.model_methods,
                            "gpt_layers": args.gpt_layers, "gpt_batch": args.gpt_batch, "seq_len": args.seq_len,
                            "cnn_batch": args.cnn_batch, "image_size": args.image_size,
                            "resnet_norm": args.resnet_norm, "model_step": "forward + backward + SGD step",
                            "model_loss": "cross_entropy(mean)"},
               "goals": {"overhead_fraction_of_plain_backward_max": GOAL_OVERHEAD_FRACTION,
                         "speedup_vs_vmap_min": GOAL_SPEEDUP_VS_VMAP,
                         "speedup_vs_vmap_at": {"B": GOAL_SPEEDUP_AT[0], "d": GOAL_SPEEDUP_AT[1]},
                         "peak_ratio_max": GOAL_PEAK_RATIO},
               "verify": verify_reports, "results": rows, "model_results": model_rows,
               "verified": bool(ok)}
        write_json(args.json, out, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
