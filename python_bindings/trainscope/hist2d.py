"""Joint histogram of (per-sample gradient element, parameter value) (SPEC.md §2 ``grad_hist2d``,
as Cockpit's GradHist2d), exact int64 counts from one pass over the per-sample gradients::

    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.vmap(torch.func.grad(loss_of_one_sample), in_dims=(None, 0, 0))(params, x, y)
    h = trainscope.hist2d.grad_hist2d(grads, params)          # each grads[k] is [B, *params[k].shape]
    h.counts        # [nbins_grad, nbins_param] int64: gradient bin × parameter bin
    h.nonfinite     # [] int64: pairs left out because either value is NaN or ±Inf
    h.grad_edges, h.param_edges                               # float64 bin edges of each axis

Each axis is binned by SPEC.md §4 (outliers in the edge bins). Results stay on the inputs'
device; nothing here waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_hist_axis, register_fake

#: Largest nbins_grad * nbins_param (cuda/hist2d.h, kMaxHist2dBins).
MAX_HIST2D_BINS = 1 << 24
from ._lists import tensor_list


@dataclass
class Hist2d:
    """Result of :func:`grad_hist2d`. ``counts[i, j]`` holds the (gradient, parameter) pairs with
    the gradient in bin i of ``grad_edges`` and the parameter in bin j of ``param_edges``."""

    counts: torch.Tensor       # [nbins_grad, nbins_param] int64
    nonfinite: torch.Tensor    # [] int64
    grad_edges: torch.Tensor   # [nbins_grad + 1] float64
    param_edges: torch.Tensor  # [nbins_param + 1] float64


def hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param) -> Tuple[int, float, int, float]:
    """The two axes' arguments checked (each nbins an integer in [1, 2²⁰], each maxval a finite
    positive normal number, nbins_grad * nbins_param <= 2²⁴), as (int, float, int, float)."""
    axes = (*check_hist_axis(nbins_grad, maxval_grad, "nbins_grad", "maxval_grad"),
            *check_hist_axis(nbins_param, maxval_param, "nbins_param", "maxval_param"))
    if axes[0] * axes[2] > MAX_HIST2D_BINS:
        raise ValueError(f"nbins_grad * nbins_param must be at most 2^24 ({MAX_HIST2D_BINS}), got {axes[0]} * {axes[2]}")
    return axes


def hist2d_bin_edges(nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                     maxval_param: float = 1.0, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bin edges of :func:`grad_hist2d`'s two axes, float64: ``(grad_edges [nbins_grad + 1],
    param_edges [nbins_param + 1])``, each nbins + 1 equally spaced values from -maxval to maxval
    (as :func:`trainscope.hist_bin_edges`)."""
    ng, mg, npar, mp = hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param)
    return (_edges(ng, mg, device), _edges(npar, mp, device))


def _edges(nbins: int, maxval: float, device) -> torch.Tensor:
    return torch.linspace(-maxval, maxval, nbins + 1, dtype=torch.float64, device=device)


def _pair_lists(per_sample_grads, params) -> Tuple[list, list]:
    """Two position-paired lists. Two dicts (torch.func style ``{name: tensor}``) pair by name, in
    the order of ``per_sample_grads``; entries of ``params`` without a gradient are left out."""
    if isinstance(per_sample_grads, Mapping) and isinstance(params, Mapping):
        missing = [k for k in per_sample_grads if k not in params]
        if missing:
            raise ValueError(f"grad_hist2d: params has no entry for per_sample_grads {missing[0]!r}")
        grads = tensor_list(per_sample_grads, "per_sample_grads", "grad_hist2d")
        return grads, tensor_list({k: params[k] for k in per_sample_grads}, "params", "grad_hist2d")
    return tensor_list(per_sample_grads, "per_sample_grads", "grad_hist2d"), tensor_list(params, "params", "grad_hist2d")


def grad_hist2d(per_sample_grads, params, nbins_grad: int = 100, maxval_grad: float = 0.05,
                nbins_param: int = 100, maxval_param: float = 1.0) -> Hist2d:
    """Exact int64 joint histogram of every (per-sample gradient element, parameter value) pair.

    ``per_sample_grads`` and ``params`` are tensors, lists of tensors or dicts of them (paired by
    position, or by name when both are dicts); ``per_sample_grads[t]`` is ``[B, *params[t].shape]``
    with one B for the whole list (any B: histograms of sample tiles add up), in the dtype of
    ``params[t]``. The gradient axis has ``nbins_grad`` bins over [-maxval_grad, maxval_grad], the
    parameter axis ``nbins_param`` bins over [-maxval_param, maxval_param] (SPEC.md §4 each;
    nbins_grad * nbins_param <= 2^24). A pair with a NaN or ±Inf on either side is counted in
    ``nonfinite`` instead, so ``counts.sum() + nonfinite == B * sum(p.numel() for p in params)``.
    """
    grads, ps = _pair_lists(per_sample_grads, params)
    if not grads and not ps:
        raise ValueError("grad_hist2d: per_sample_grads and params are empty")
    axes = hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param)
    counts, nonfinite = torch.ops.trainscope.grad_hist2d(grads, ps, *axes)
    grad_edges, param_edges = hist2d_bin_edges(*axes, device=counts.device)
    return Hist2d(counts, nonfinite, grad_edges, param_edges)


# Fake (meta) kernel: output shapes and dtypes for torch.compile and opcheck.
@register_fake("trainscope::grad_hist2d")
def _(per_sample_grads, params, nbins_grad=100, maxval_grad=0.05, nbins_param=100, maxval_param=1.0):
    dev: Optional[torch.device] = per_sample_grads[0].device if per_sample_grads else torch.device("cpu")
    return (torch.empty((nbins_grad, nbins_param), dtype=torch.int64, device=dev),
            torch.empty((), dtype=torch.int64, device=dev))
