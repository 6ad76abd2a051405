"""CUDA graphs and host synchronisation.

- Every tensor op of ``torch.ops.trainscope`` captured in a ``torch.cuda.CUDAGraph`` and replayed
  on fresh inputs gives exactly what an eager call on the same inputs gives (one case per op, and
  per route where the routes differ in what they launch: the rank ops' batched eigensolve, per-matrix
  syevd and gesvdj each have their own case, so a route that cannot be captured shows by name).
- A whole monitored training step (forward, per-sample losses, backward, optimizer step,
  ``Monitor.step``) captured in one graph and replayed records what an eager copy of the model,
  trained in lockstep on the same batches, records.
- An eager monitored step with every per-step family on (parameter metrics, gradient histogram,
  per-sample statistics and histograms through ``PerSampleHooks``, representation metrics) runs
  under ``torch.cuda.set_sync_debug_mode("error")``.

On the CPU: the table of graph cases covers every op the library registers (a new op without a
case fails here), and every case builds, runs on refilled inputs and is deterministic. The CUDA
tests run in the GPU check (bench/gpu_check.sh).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainscope
from conftest import requires_cuda


class _OpNamespace:
    """``torch.ops.trainscope``, noting the ops looked up while ``seen`` is a set (so that the CPU
    test can check that a case calls the op it names). A lookup, not a dispatch, is what counts:
    the cross-rank ops are composite (their kernels run aten ops), invisible to a dispatch mode."""

    seen: Optional[set] = None

    def __getattr__(self, name):
        if self.seen is not None:
            self.seen.add(name)
        return getattr(torch.ops.trainscope, name)


OPS = _OpNamespace()

#: The process group name the ops resolve as "this process only" (no torch.distributed):
#: trainscope.distributed.group_name(THIS_PROCESS), RankGroup::from_process_group("") in C++.
THIS_PROCESS = ""

# ================================================================================================
# The table: one case per op (and per route where routes launch different work)


@dataclass(frozen=True)
class GraphCase:
    """One op call with static inputs.

    ``build(gen, device)`` draws fresh random inputs from ``gen`` (on the CPU, in float64, then
    cast and moved) as a dict of tensors or lists of tensors; ``call(inputs)`` runs the op and
    returns its outputs as a flat list of tensors; ``reset(inputs)``, for ops that change their
    inputs, restores that state (from a copy kept among the inputs)."""

    id: str
    op: str
    build: Callable[[torch.Generator, str], dict]
    call: Callable[[dict], List[torch.Tensor]]
    reset: Optional[Callable[[dict], None]] = None

    def refill(self, inputs: dict, gen: torch.Generator) -> None:
        """Overwrites the static inputs in place with fresh random values (same shapes, dtypes)."""
        _copy_into(inputs, self.build(gen, "cpu"))

    def restore(self, inputs: dict) -> None:
        if self.reset is not None:
            self.reset(inputs)


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        assert dst.keys() == src.keys()
        for k in dst:
            _copy_into(dst[k], src[k])
    else:
        assert len(dst) == len(src)
        for d, s in zip(dst, src):
            _copy_into(d, s)


def _tensors_of(x) -> List[torch.Tensor]:
    """The tensors of an op result or of an inputs dict, flattened in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if x is None:
        return []
    items = x.values() if isinstance(x, dict) else x
    return [t for item in items for t in _tensors_of(item)]


def _normal(gen: torch.Generator, shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + shift


def _to(ts, device: str, dtype=torch.float32):
    if isinstance(ts, torch.Tensor):
        return ts.to(device, dtype)
    return [t.to(device, dtype) for t in ts]


# -- dead units --------------------------------------------------------------------------------


def _unit_shifts(units: int, ndim: int) -> torch.Tensor:
    """Per-unit offsets, so that some units are rarely active and others always (counts of every
    size, some units dead)."""
    return torch.linspace(-2.5, 1.0, units, dtype=torch.float64).reshape((1, units) + (1,) * (ndim - 2))


def _build_relu_acts(gen, device):
    shape = (6, 5, 3, 4)  # [N, C, H, W]: a unit is a channel
    # ReLU outputs: the zeros are the activation's own (inactive units), the rest is random.
    return {"acts": _to((_normal(gen, shape) + _unit_shifts(shape[1], 4)).clamp_min(0.0), device)}


def _build_add_counts(gen, device):
    counts = torch.randint(0, 100, (7,), generator=gen).to(device)
    return {"acts": _to(torch.tanh(_normal(gen, (24, 7), 2.0) + _unit_shifts(7, 2)), device),
            "counts0": counts, "counts": counts.clone()}


def _reset_counts(i):
    i["counts"].copy_(i["counts0"])


def _add_counts(i):
    OPS.add_active_counts_(i["counts"], i["acts"], "tanh", 0.05)  # returns nothing: counts is the output
    return [i["counts"]]


def _build_sigmoid_acts(gen, device):
    # Units shifted far enough to saturate the sigmoid (inactive) on most observations: some dead.
    return {"acts": _to(torch.sigmoid(_normal(gen, (40, 9), 2.0) + 3.6 * _unit_shifts(9, 2)), device, torch.bfloat16)}


def _build_counts(gen, device):
    return {"counts": torch.randint(0, 51, (12,), generator=gen).to(device)}


# -- parameter metrics -------------------------------------------------------------------------

#: Parameter tensors, with the dtype of each position (dtypes may be mixed across positions).
PARAM_SHAPES = [(16, 8), (8,), (3, 4, 5)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _build_param_lists(gen, device):
    params = [_normal(gen, s, 0.5) for s in PARAM_SHAPES]
    lists = {
        "grads": [_normal(gen, s, 0.02) for s in PARAM_SHAPES],
        "params": params,
        "init": [p + _normal(gen, p.shape, 0.05) for p in params],
        "prev": [p + _normal(gen, p.shape, 0.01) for p in params],
    }
    out = {k: [t.to(device, dt) for t, dt in zip(v, PARAM_DTYPES)] for k, v in lists.items()}
    out["prev0"] = [t.clone() for t in out["prev"]]  # what reset() restores prev to
    out["extra"] = _normal(gen, (2,)).to(device)      # float64 sums that travel with the pass
    return out


def _reset_prev(i):
    for p, p0 in zip(i["prev"], i["prev0"]):
        p.copy_(p0)


def _build_losses(gen, device):
    return {"losses": _to(_normal(gen, (32,)).abs() + 0.1, device)}


# -- histograms and per-sample statistics -------------------------------------------------------


def _build_hist2d(gen, device):
    shapes = [(6, 5), (5,)]
    return {"grads": _to([_normal(gen, (4,) + s, 0.02) for s in shapes], device),
            "params": _to([_normal(gen, s, 0.5) for s in shapes], device)}


def _build_per_sample_grads(gen, device):
    return {"grads": [_normal(gen, (6,) + s, 0.02).to(device, dt) for s, dt in zip(PARAM_SHAPES, PARAM_DTYPES)]}


def _build_parts(gen, device):
    b = 8
    return {"sq": (_normal(gen, (b,)).abs() + 1.0).to(device),
            "dots": _normal(gen, (b,), 0.3, 0.5).to(device),
            "msq": (_normal(gen, ()).abs() * 0.1 + 0.2).to(device),
            "extra": _normal(gen, (3,)).to(device)}


# -- per-sample gradients from layer factors ----------------------------------------------------

LIN_B, LIN_T, LIN_IN, LIN_OUT = 5, 3, 7, 4
# Conv2d: [B, C_in, H, W] = [3, 4, 7, 7], C_out 6, kernel 3x3, stride (2, 1), padding (1, 0),
# dilation (1, 2), groups 2: H' = (7 + 2 - 2 - 1) // 2 + 1 = 4, W' = (7 - 4 - 1) // 1 + 1 = 3.
CONV_GEOMETRY = dict(kernel_size=[3, 3], stride=[2, 1], padding=[1, 0], dilation=[1, 2], groups=2)
CONV_IN, CONV_OUT, CONV_GRAD_OUT = (3, 4, 7, 7), 6, (3, 6, 4, 3)
FACTOR_METHODS = ("auto", "ghost", "tiled", "gram")


def _build_linear(gen, device, two_d=False, grad_scale=0.1):
    lead = (LIN_B,) if two_d else (LIN_B, LIN_T)
    return {"x": _to(_normal(gen, lead + (LIN_IN,)), device),
            "d": _to(_normal(gen, lead + (LIN_OUT,), grad_scale), device),
            "w": _to(_normal(gen, (LIN_OUT, LIN_IN), 0.5), device),
            "b": _to(_normal(gen, (LIN_OUT,), 0.5), device)}


def _build_conv(gen, device, grad_scale=0.1):
    return {"x": _to(_normal(gen, CONV_IN), device),
            "d": _to(_normal(gen, CONV_GRAD_OUT, grad_scale), device),
            "w": _to(_normal(gen, (CONV_OUT, CONV_IN[1] // CONV_GEOMETRY["groups"], 3, 3), 0.5), device),
            "b": _to(_normal(gen, (CONV_OUT,), 0.5), device)}


def _build_linear_uses(gen, device):
    """Two uses of one nn.Linear in a step: each use's input and output gradient, one weight."""
    a, b = _build_linear(gen, device, grad_scale=0.02), _build_linear(gen, device, grad_scale=0.02)
    return {"x": [a["x"], b["x"]], "d": [a["d"], b["d"]], "w": a["w"], "b": a["b"]}


def _build_conv_uses(gen, device):
    a, b = _build_conv(gen, device, grad_scale=0.01), _build_conv(gen, device, grad_scale=0.01)
    return {"x": [a["x"], b["x"]], "d": [a["d"], b["d"]], "w": a["w"], "b": a["b"]}


def _conv_args():
    g = CONV_GEOMETRY
    return g["stride"], g["padding"], g["dilation"], g["groups"]


# -- rank measures -----------------------------------------------------------------------------
# Gram route on CUDA: the Gram matrices (the smaller side of each matrix, K = the largest of
# them) go through cusolverDnXsyevBatched when K <= 32 and cusolverDnXsyevd per matrix above;
# method="svd" runs cusolverDnDgesvdj per matrix.


def _matrix(gen, rows: int, cols: int) -> torch.Tensor:
    """Columns of decaying scale: a spread spectrum, so the approximate ranks are below full."""
    return _normal(gen, (rows, cols)) * 0.85 ** torch.arange(cols, dtype=torch.float64)


def _build_matrices(shapes, dtypes=(torch.float32, torch.float64)):
    def build(gen, device):
        return {"m": [_matrix(gen, r, c).to(device, dtypes[i % len(dtypes)]) for i, (r, c) in enumerate(shapes)]}
    return build


def _build_batch(shape):
    def build(gen, device):
        return {"m": torch.stack([_matrix(gen, *shape[1:]) for _ in range(shape[0])]).to(device, torch.float32)}
    return build


def _build_grams(sizes, rows=60):
    def build(gen, device):
        grams = []
        for k in sizes:
            x = _matrix(gen, rows, k)
            grams.append((x.T @ x).to(device))
        return {"grams": grams}
    return build


def _build_sigma(gen, device):
    sigma = (_normal(gen, (3, 12)).abs() + 0.01) * 0.8 ** torch.arange(12, dtype=torch.float64)
    return {"sigma": sigma.sort(dim=1, descending=True).values.to(device)}


#: (method, the CUDA solver it takes, matrices for rank_measures, a batch [L, n, m] for
#: rank_measures_batch, Gram sizes for rank_measures_from_grams or None). The Gram route's K is
#: the largest min(n, m) of the matrices (or the largest Gram size).
RANK_ROUTES = [
    ("gram", "syevBatched", [(50, 16), (12, 30)], (3, 40, 20), (16, 10)),   # K <= 32
    ("gram", "syevd", [(80, 40), (20, 36)], (2, 60, 48), (40, 36)),         # K > 32: per matrix
    ("svd", "gesvdj", [(50, 16), (12, 30)], (3, 40, 20), None),             # per matrix
]


def _cases() -> List[GraphCase]:
    c: List[GraphCase] = []

    def add(id, op, build, call, reset=None):
        c.append(GraphCase(id, op, build, call, reset))

    # Dead units.
    add("active_counts", "active_counts", _build_relu_acts,
        lambda i: [OPS.active_counts(i["acts"], "relu", 0.01)])
    add("add_active_counts_", "add_active_counts_", _build_add_counts, _add_counts, _reset_counts)
    add("dead_units", "dead_units", _build_sigmoid_acts,
        lambda i: list(OPS.dead_units(i["acts"], "sigmoid", 0.01, 0.1)))
    add("dead_units_from_counts", "dead_units_from_counts", _build_counts,
        lambda i: list(OPS.dead_units_from_counts(i["counts"], 50, 0.1)))

    # Parameter metrics and the loss.
    add("loss", "loss", _build_losses, lambda i: [OPS.loss(i["losses"])])
    add("param_stats", "param_stats", _build_param_lists,
        lambda i: list(OPS.param_stats(i["grads"], i["params"], i["init"], i["prev"], True, 64, 0.05, False)))
    add("param_stats_refresh_", "param_stats_refresh_", _build_param_lists,
        lambda i: list(OPS.param_stats_refresh_(i["grads"], i["params"], i["init"], i["prev"], True, 100, 0.05,
                                                True)) + list(i["prev"]),
        _reset_prev)

    # Across ranks, for this process alone. Without layouts the op is param_stats itself; with
    # full dims given it takes the cross-rank path (float64 partial sums, host constants copied
    # to the device and cached, the all-reduce of one rank a no-op), refreshing prev as it goes.
    add("param_stats_across_ranks-local", "param_stats_across_ranks", _build_param_lists,
        lambda i: list(OPS.param_stats_across_ranks(i["grads"], i["params"], i["init"], i["prev"], [], [],
                                                    THIS_PROCESS, True, 100, 0.05, False, False, i["extra"])))
    add("param_stats_across_ranks-layouts", "param_stats_across_ranks", _build_param_lists,
        lambda i: list(OPS.param_stats_across_ranks(i["grads"], i["params"], i["init"], i["prev"],
                                                    ["replicated", "sharded", "replicated"], [2, 2, 3],
                                                    THIS_PROCESS, True, 50, 0.05, True, True, i["extra"]))
        + list(i["prev"]),
        _reset_prev)
    add("loss_across_ranks", "loss_across_ranks", _build_losses,
        lambda i: [OPS.loss_across_ranks(i["losses"], THIS_PROCESS)])

    # Histograms and per-sample statistics of materialised per-sample gradients.
    add("grad_hist2d", "grad_hist2d", _build_hist2d,
        lambda i: list(OPS.grad_hist2d(i["grads"], i["params"], 32, 0.05, 16, 1.0)))
    add("per_sample_parts", "per_sample_parts", _build_per_sample_grads,
        lambda i: list(OPS.per_sample_parts(i["grads"], True, 50, 0.05)))
    add("per_sample_stats_from_parts", "per_sample_stats_from_parts", _build_parts,
        lambda i: [OPS.per_sample_stats_from_parts(i["sq"], i["dots"], i["msq"])])
    add("per_sample_stats_across_ranks", "per_sample_stats_across_ranks", _build_per_sample_grads,
        lambda i: list(OPS.per_sample_stats_across_ranks(i["grads"], THIS_PROCESS, True, 40, 0.05)))
    add("per_sample_stats_from_local_parts", "per_sample_stats_from_local_parts", _build_parts,
        lambda i: list(OPS.per_sample_stats_from_local_parts(i["sq"], i["dots"], i["msq"], THIS_PROCESS,
                                                             i["extra"])))

    # Layer factors: every route of the parts, then the histograms.
    for method in FACTOR_METHODS:
        add(f"linear_per_sample_parts-{method}", "linear_per_sample_parts", _build_linear,
            lambda i, m=method: list(OPS.linear_per_sample_parts(i["x"], i["d"], True, m)))
    add("linear_per_sample_parts-auto_2d", "linear_per_sample_parts",
        lambda gen, device: _build_linear(gen, device, two_d=True),
        lambda i: list(OPS.linear_per_sample_parts(i["x"], i["d"], False, "auto")))
    for method in FACTOR_METHODS:
        add(f"conv2d_per_sample_parts-{method}", "conv2d_per_sample_parts", _build_conv,
            lambda i, m=method: list(OPS.conv2d_per_sample_parts(i["x"], i["d"], CONV_GEOMETRY["kernel_size"],
                                                                 *_conv_args(), True, m)))
    # The parts with the weight gradient (a fused backward pass): a Ḡ route and the Gram route.
    for method in ("tiled", "gram"):
        add(f"linear_per_sample_parts_and_weight_grad-{method}", "linear_per_sample_parts_and_weight_grad",
            _build_linear,
            lambda i, m=method: list(OPS.linear_per_sample_parts_and_weight_grad(i["x"], i["d"], True, m)))
        add(f"conv2d_per_sample_parts_and_weight_grad-{method}", "conv2d_per_sample_parts_and_weight_grad",
            _build_conv,
            lambda i, m=method: list(OPS.conv2d_per_sample_parts_and_weight_grad(
                i["x"], i["d"], CONV_GEOMETRY["kernel_size"], *_conv_args(), True, m)))
    add("linear_per_sample_grad_hist1d", "linear_per_sample_grad_hist1d",
        lambda gen, device: _build_linear(gen, device, grad_scale=0.02),
        lambda i: [OPS.linear_per_sample_grad_hist1d(i["x"], i["d"], True, 50, 0.05)])
    add("conv2d_per_sample_grad_hist1d", "conv2d_per_sample_grad_hist1d",
        lambda gen, device: _build_conv(gen, device, grad_scale=0.01),
        lambda i: [OPS.conv2d_per_sample_grad_hist1d(i["x"], i["d"], CONV_GEOMETRY["kernel_size"],
                                                     *_conv_args(), True, 50, 0.05)])
    add("linear_per_sample_grad_hist2d", "linear_per_sample_grad_hist2d",
        lambda gen, device: _build_linear(gen, device, grad_scale=0.02),
        lambda i: list(OPS.linear_per_sample_grad_hist2d(i["x"], i["d"], i["w"], i["b"], 32, 0.05, 16, 1.0)))
    add("conv2d_per_sample_grad_hist2d", "conv2d_per_sample_grad_hist2d",
        lambda gen, device: _build_conv(gen, device, grad_scale=0.01),
        lambda i: list(OPS.conv2d_per_sample_grad_hist2d(i["x"], i["d"], i["w"], i["b"], *_conv_args(),
                                                         32, 0.05, 16, 1.0)))
    add("linear_per_sample_grad_moments", "linear_per_sample_grad_moments", _build_linear,
        lambda i: list(OPS.linear_per_sample_grad_moments(i["x"], i["d"], True)))
    add("linear_per_sample_grad_moments-2d", "linear_per_sample_grad_moments",
        lambda gen, device: _build_linear(gen, device, two_d=True),
        lambda i: list(OPS.linear_per_sample_grad_moments(i["x"], i["d"], True)))
    add("conv2d_per_sample_grad_moments", "conv2d_per_sample_grad_moments", _build_conv,
        lambda i: list(OPS.conv2d_per_sample_grad_moments(i["x"], i["d"], CONV_GEOMETRY["kernel_size"],
                                                          *_conv_args(), True)))
    add("linear_per_sample_projections", "linear_per_sample_projections", _build_linear,
        lambda i: [OPS.linear_per_sample_projections(i["x"], i["d"], i["w"], i["b"])])
    add("conv2d_per_sample_projections", "conv2d_per_sample_projections", _build_conv,
        lambda i: [OPS.conv2d_per_sample_projections(i["x"], i["d"], i["w"], i["b"], *_conv_args())])
    add("alpha_point_moments", "alpha_point_moments", _build_parts,
        lambda i: [OPS.alpha_point_moments(i["sq"], i["dots"], i["msq"])])
    add("fit_quadratic", "fit_quadratic", _build_parts,
        lambda i: [OPS.fit_quadratic(i["msq"], i["extra"][:2], i["dots"][:2], i["sq"][:2], i["sq"][2:4])])
    add("alpha_from_fit", "alpha_from_fit", _build_parts,
        lambda i: [OPS.alpha_from_fit(i["extra"], i["msq"])])
    add("grad_variance_stats", "grad_variance_stats", _build_per_sample_grads,
        lambda i: [OPS.grad_variance_stats([g.sum(0) for g in i["grads"]], [g.square().sum(0) for g in i["grads"]],
                                           6, i["grads"][0].abs().mean(), 0.1)])
    # The ".uses" overloads: a layer used twice in one step, its uses' positions joined per sample.
    for method in FACTOR_METHODS:
        add(f"linear_per_sample_parts.uses-{method}", "linear_per_sample_parts", _build_linear_uses,
            lambda i, m=method: list(OPS.linear_per_sample_parts.uses(i["x"], i["d"], True, m)))
    add("conv2d_per_sample_parts.uses-auto", "conv2d_per_sample_parts", _build_conv_uses,
        lambda i: list(OPS.conv2d_per_sample_parts.uses(i["x"], i["d"], CONV_GEOMETRY["kernel_size"], *_conv_args(),
                                                         True, "auto")))
    add("linear_per_sample_grad_hist1d.uses", "linear_per_sample_grad_hist1d", _build_linear_uses,
        lambda i: [OPS.linear_per_sample_grad_hist1d.uses(i["x"], i["d"], True, 50, 0.05)])
    add("conv2d_per_sample_grad_hist1d.uses", "conv2d_per_sample_grad_hist1d", _build_conv_uses,
        lambda i: [OPS.conv2d_per_sample_grad_hist1d.uses(i["x"], i["d"], CONV_GEOMETRY["kernel_size"],
                                                          *_conv_args(), True, 50, 0.05)])
    add("linear_per_sample_grad_moments.uses", "linear_per_sample_grad_moments", _build_linear_uses,
        lambda i: list(OPS.linear_per_sample_grad_moments.uses(i["x"], i["d"], True)))
    add("conv2d_per_sample_grad_moments.uses", "conv2d_per_sample_grad_moments", _build_conv_uses,
        lambda i: list(OPS.conv2d_per_sample_grad_moments.uses(i["x"], i["d"], CONV_GEOMETRY["kernel_size"],
                                                               *_conv_args(), True)))
    add("linear_per_sample_projections.uses", "linear_per_sample_projections", _build_linear_uses,
        lambda i: [OPS.linear_per_sample_projections.uses(i["x"], i["d"], i["w"], None)])
    add("conv2d_per_sample_projections.uses", "conv2d_per_sample_projections", _build_conv_uses,
        lambda i: [OPS.conv2d_per_sample_projections.uses(i["x"], i["d"], i["w"], i["b"], *_conv_args())])
    add("linear_per_sample_grad_hist2d.uses", "linear_per_sample_grad_hist2d", _build_linear_uses,
        lambda i: list(OPS.linear_per_sample_grad_hist2d.uses(i["x"], i["d"], i["w"], i["b"], 32, 0.05, 16, 1.0)))
    add("conv2d_per_sample_grad_hist2d.uses", "conv2d_per_sample_grad_hist2d", _build_conv_uses,
        lambda i: list(OPS.conv2d_per_sample_grad_hist2d.uses(i["x"], i["d"], i["w"], i["b"], *_conv_args(),
                                                              32, 0.05, 16, 1.0)))

    # Rank measures: one case per op and solver route (the K in an id is the Gram width), the
    # routes that go through cuSOLVER's per-matrix solvers last.
    add("rank_measures_from_singular_values", "rank_measures_from_singular_values", _build_sigma,
        lambda i: list(OPS.rank_measures_from_singular_values(i["sigma"], 0.9)))
    for method, route, shapes, batch, grams in RANK_ROUTES:
        k_list, k_batch = max(min(s) for s in shapes), min(batch[1:])
        add(f"rank_measures-{method}-K{k_list}-{route}", "rank_measures", _build_matrices(shapes),
            lambda i, m=method: list(OPS.rank_measures(i["m"], 0.9, m)))
        add(f"rank_measures_batch-{method}-K{k_batch}-{route}", "rank_measures_batch", _build_batch(batch),
            lambda i, m=method: list(OPS.rank_measures_batch(i["m"], 0.9, m)))
        if grams:
            add(f"rank_measures_from_grams-K{max(grams)}-{route}", "rank_measures_from_grams", _build_grams(grams),
                lambda i: list(OPS.rank_measures_from_grams(i["grams"], 0.9)))
    return c


GRAPH_CASES = _cases()

#: Registered ops that take no tensors, and why they have no graph case.
NOT_TENSOR_OPS: Dict[str, str] = {
    "schedule_due": "host-only: whether a schedule spec fires at a step number (no tensors, no device work)",
    "schedule_describe": "host-only: a schedule spec's description (no tensors, no device work)",
    "built_with_cuda": "host-only: whether the library has its CUDA kernels (no tensors, no device work)",
}

#: TorchScript custom classes of the namespace: objects with methods, not ops of the dispatcher.
CUSTOM_CLASSES: Dict[str, str] = {
    "Monitor": "the Monitor's pipeline; its graph API is checked by the whole-step test below",
    "FileSink": "host-only: writes records to files",
    "RepresentationAccumulator": "streams a probe set over many calls; its pieces (Gram updates, "
                                 "rank_measures_from_grams, dead units) are ops with cases here",
}


def _registered_ops() -> set:
    """Op names of the trainscope namespace in the dispatcher, overloads folded into their op."""
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        ns, _, rest = qualified.partition("::")
        if ns == "trainscope":
            names.add(rest.split(".", 1)[0])
    return names


def _registered_classes() -> set:
    found = set()
    for schema in torch._C._jit_get_custom_class_schemas():
        m = re.search(r"__torch__\.torch\.classes\.trainscope\.(\w+)", str(schema))
        if m:
            found.add(m.group(1))
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal: dtype, shape, and every value (NaN where the other has NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        nan_a, nan_b = a.isnan(), b.isnan()
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return torch.equal(a, b)


def _assert_same(got: List[torch.Tensor], want: List[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        assert _same(g, w), (f"{what}: output {k} differs\n  got  {g.dtype} {tuple(g.shape)} {g}\n"
                             f"  want {w.dtype} {tuple(w.shape)} {w}")


def _ids(cases):
    return [c.id for c in cases]


# ================================================================================================
# CPU: the table covers the library, and every case runs


def test_graph_cases_cover_every_registered_op():
    registered = _registered_ops()
    assert registered, "no trainscope op is registered: the op library did not load"
    covered = {c.op for c in GRAPH_CASES}
    assert not covered & NOT_TENSOR_OPS.keys(), "an op is both covered and excluded"
    missing = registered - covered - NOT_TENSOR_OPS.keys()
    assert not missing, (f"ops without a CUDA graph case: {sorted(missing)}; add a case to GRAPH_CASES "
                         "(or, for an op that takes no tensors, an entry to NOT_TENSOR_OPS with the reason)")
    unknown = (covered | NOT_TENSOR_OPS.keys()) - registered
    assert not unknown, f"cases or exclusions name ops the library does not register: {sorted(unknown)}"
    assert len({c.id for c in GRAPH_CASES}) == len(GRAPH_CASES), "case ids repeat"


def test_custom_classes_are_all_accounted_for():
    assert _registered_classes() == CUSTOM_CLASSES.keys()


@pytest.mark.parametrize("case", GRAPH_CASES, ids=_ids(GRAPH_CASES))
def test_graph_case_runs_on_cpu_and_is_deterministic(case, gen):
    inputs = case.build(gen, "cpu")
    for round_ in range(2):
        if round_:
            before = [t.clone() for t in _tensors_of(inputs)]
            case.refill(inputs, gen)
            for k, (old, new) in enumerate(zip(before, _tensors_of(inputs))):
                assert old.numel() < 4 or not torch.equal(old, new), f"refill left input tensor {k} unchanged"
        case.restore(inputs)
        OPS.seen = set()
        try:
            first = [t.clone() for t in case.call(inputs)]
        finally:
            seen, OPS.seen = OPS.seen, None
        assert seen == {case.op}, f"the call ran {sorted(seen)}, not {case.op}"
        assert first and all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in first)
        case.restore(inputs)
        second = case.call(inputs)
        _assert_same(first, second, f"{case.id} (round {round_}): a second call on the same inputs")


# ================================================================================================
# CUDA: every op captured and replayed


@requires_cuda
@pytest.mark.parametrize("case", GRAPH_CASES, ids=_ids(GRAPH_CASES))
def test_op_replayed_in_cuda_graph_equals_eager(case, gen):
    static = case.build(gen, "cuda")
    # Warm-up on a side stream: lazy initialisation, library handles, workspaces, cached constants.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        case.restore(static)
        case.call(static)
    torch.cuda.current_stream().wait_stream(side)
    case.restore(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = case.call(static)
    for round_ in range(3):
        case.refill(static, gen)
        case.restore(static)
        graph.replay()
        got = [t.clone() for t in out]
        case.restore(static)
        want = case.call(static)  # eager, the same kernels on the same inputs
        torch.cuda.synchronize()
        _assert_same(got, want, f"{case.id}, replay {round_} against an eager call")


# ================================================================================================
# A whole monitored training step


IN, HIDDEN, CLASSES, BATCH = 12, 32, 5, 16


def _mlp(gen: torch.Generator, device: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1  # weights N(0, 1/fan_in), small biases
            p.copy_(_normal(gen, p.shape, scale))
    return model.to(device)


def _batches(gen: torch.Generator, n: int, device: str):
    return [(_normal(gen, (BATCH, IN)).to(device, torch.float32),
             torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)) for _ in range(n)]


class _Collect:
    def __init__(self):
        self.records: List[trainscope.StepRecord] = []

    def __call__(self, record):
        self.records.append(record)

    @property
    def steps(self):
        return [r.step for r in self.records]


WARMUP, REPLAYS = 3, 5


@requires_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True")  # eager steps
def test_whole_monitored_training_step_in_cuda_graph_equals_eager(optimizer, gen):
    device = "cuda"
    graphed = _mlp(gen, device)
    eager = copy.deepcopy(graphed)

    def make_optimizer(model):
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)

    opt_g, opt_e = make_optimizer(graphed), make_optimizer(eager)
    got_g, got_e = _Collect(), _Collect()
    mon_g = trainscope.Monitor(graphed, nbins=64, sinks=[got_g])
    mon_e = trainscope.Monitor(eager, nbins=64, sinks=[got_e])
    batches = _batches(gen, WARMUP + REPLAYS, device)
    static_x, static_y = (t.clone() for t in batches[0])

    def graphed_step(step):  # the body that is captured: no zero_grad (grads allocated by backward)
        losses = F.cross_entropy(graphed(static_x), static_y, reduction="none")
        losses.mean().backward()
        opt_g.step()
        mon_g.step(step, losses)

    def eager_step(step):
        x, y = batches[step]
        opt_e.zero_grad(set_to_none=True)
        losses = F.cross_entropy(eager(x), y, reduction="none")
        losses.mean().backward()
        opt_e.step()
        mon_e.step(step, losses)

    # PyTorch's whole-network recipe: warm-up iterations on a side stream (optimizer state, the
    # Monitor's eager warm-up step), grads set to None before capture so that the captured
    # backward allocates them from the graph's pool.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            static_x.copy_(batches[step][0])
            static_y.copy_(batches[step][1])
            opt_g.zero_grad(set_to_none=True)
            graphed_step(step)
    torch.cuda.current_stream().wait_stream(side)
    for step in range(WARMUP):
        eager_step(step)

    opt_g.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_step(WARMUP)  # the Monitor's schedules are evaluated here, for this step
    for step in range(WARMUP, WARMUP + REPLAYS):
        static_x.copy_(batches[step][0])
        static_y.copy_(batches[step][1])
        graph.replay()
        mon_g.collect_captured(step)
        eager_step(step)
    mon_g.flush()
    mon_e.flush()

    steps = list(range(WARMUP + REPLAYS))
    assert got_g.steps == steps and got_e.steps == steps
    same_weights = all(torch.equal(a, b) for a, b in zip(graphed.parameters(), eager.parameters()))
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for rg, re_ in zip(got_g.records, got_e.records):
        where = f"step {rg.step} ({'replayed' if rg.step >= WARMUP else 'eager warm-up'})"
        assert rg.scalars.keys() == re_.scalars.keys(), where
        for name, value in re_.scalars.items():
            assert rg.scalars[name] == pytest.approx(value, rel=1e-5, nan_ok=True), (where, name)
        assert rg.scalars["update_size"] > 0, where
        assert rg.histograms.keys() == re_.histograms.keys() == {"grad_hist1d"}, where
        (edges_g, counts_g), (edges_e, counts_e) = rg.histograms["grad_hist1d"], re_.histograms["grad_hist1d"]
        assert torch.equal(edges_g, edges_e), where
        # Exact: the graph replays the very kernels the eager step launches (same shapes, dtypes,
        # strides and alignment; cuBLAS picks its algorithm from those and the workspace size, not
        # from the stream or the capture), and torch's kernels here and trainscope's are
        # deterministic, so both models stay bitwise equal and their gradients fall into the same
        # bins. The scalar tolerance above only allows for a kernel choice that would differ; a
        # count that differs means one did, and the weights then differ too (reported here).
        assert torch.equal(counts_g, counts_e), (
            f"{where}: gradient histograms differ by {(counts_g - counts_e).abs().sum().item()} counts; "
            f"weights bitwise equal at the end: {same_weights}")


# ================================================================================================
# A monitored step with every per-step family on never waits for the GPU


class _FromExtras(trainscope.Quantity):
    """Logs ``ctx.extras[key]``, a dict of 0-d device tensors computed in the training loop."""

    def __init__(self, key: str):
        self.key = key

    def compute(self, ctx):
        return ctx.extras[self.key]


@requires_cuda
def test_monitored_step_with_every_family_never_synchronises(gen):
    device = "cuda"
    model = _mlp(gen, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    got = _Collect()
    mon = trainscope.Monitor(model, param_metrics=True, grad_hist=True, sinks=[got])
    mon.add_quantity(_FromExtras("per_sample"), trainscope.every(1))
    mon.add_quantity(_FromExtras("representation"), trainscope.every(1))
    edges1 = trainscope.hist_bin_edges(100, 0.05)          # host values, computed once
    edges2 = trainscope.hist2d_bin_edges(100, 0.05, 100, 1.0)
    probe = trainscope.RepresentationProbe(model, _normal(gen, (100, IN)).to(device, torch.float32),
                                           batch_size=40)
    steps = 4
    batches = _batches(gen, steps, device)

    with trainscope.PerSampleHooks(model, loss_reduction="mean") as hooks:
        def one_step(step):
            x, y = batches[step]
            representation = probe().scalars()
            losses = F.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            per_sample = hooks.stats().as_dict()
            histograms = {"per_sample/grad_hist1d": (hooks.grad_hist1d(), edges1),
                          "per_sample/grad_hist2d": (hooks.grad_hist2d()[0], edges2)}
            opt.step()
            mon.step(step, losses.detach(), histograms=histograms, per_sample=per_sample,
                     representation=representation)

        one_step(0)  # warm-up: allocations, pinned ring slots, library handles
        torch.cuda.synchronize()
        for step in range(1, steps):
            torch.cuda.set_sync_debug_mode("error")
            try:
                one_step(step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    mon.flush()

    assert got.steps == list(range(steps))
    n_params = sum(p.numel() for p in model.parameters())
    for r in got.records:
        for name in ("loss", "grad_norm", "distance", "update_size", "per_sample/norm_test",
                     "per_sample/gradient_noise_scale", "representation/effective_rank",
                     "representation/dead_units"):
            assert name in r.scalars, (r.step, name, sorted(r.scalars))
        assert r.histograms.keys() == {"grad_hist1d", "per_sample/grad_hist1d", "per_sample/grad_hist2d"}
        assert int(r.histograms["grad_hist1d"][1].sum()) == n_params
        assert int(r.histograms["per_sample/grad_hist1d"][1].sum()) == BATCH * n_params
        assert int(r.histograms["per_sample/grad_hist2d"][1].sum()) == BATCH * n_params
