"""Parameter-space metrics (SPEC.md §1, §4): one fused pass over gradients and parameters.

Call once per batch after ``optimizer.step()``::

    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]      # θ₀, when tracking begins
    prev = [p.detach().clone() for p in params]      # θ before the latest step
    ...
    stats = trainscope.param_stats(grads=[p.grad for p in params], params=params,
                                   init_params=init, prev_params=prev, refresh_prev=True)
    stats["grad_norm"], stats.per_tensor_metric("grad_norm"), stats.hist

Every result is a tensor on the inputs' device; nothing here waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_hist_axis, check_tensor, register_fake
from ._lists import tensor_list

#: Column order of ``ParamStats.metrics`` and ``ParamStats.per_tensor``.
METRICS = ("grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size", "weight_norm",
           "update_ratio")

TensorList = Union[torch.Tensor, Iterable[torch.Tensor], None]


@dataclass
class ParamStats:
    """Results of :func:`param_stats`. A metric whose inputs were not given is NaN."""

    metrics: torch.Tensor               # [7] in METRICS order
    per_tensor: torch.Tensor            # [T, 7]
    nonfinite: torch.Tensor             # [] int64: NaN/Inf gradient elements
    nonfinite_per_tensor: torch.Tensor  # [T] int64
    hist: torch.Tensor                  # [nbins] int64 ([0] without histogram)
    hist_per_tensor: torch.Tensor       # [T, nbins] int64
    loss: Optional[torch.Tensor] = None  # [] when per-sample losses were given

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.metrics[_metric_index(name)]

    def per_tensor_metric(self, name: str) -> torch.Tensor:
        return self.per_tensor[:, _metric_index(name)]

    def as_dict(self, names: Optional[Sequence[str]] = None) -> dict:
        """``{metric: 0-d tensor, "metric/<name>": 0-d tensor per tensor}`` for the given
        parameter names (or indices when ``names`` is None); histograms are left out."""
        out = {}
        if self.loss is not None:
            out["loss"] = self.loss
        labels = list(names) if names is not None else [str(i) for i in range(self.per_tensor.shape[0])]
        if len(labels) != self.per_tensor.shape[0]:
            raise ValueError(f"as_dict: names has {len(labels)} entries, expected {self.per_tensor.shape[0]}")
        for j, m in enumerate(METRICS):
            out[m] = self.metrics[j]
            for i, label in enumerate(labels):
                out[f"{m}/{label}"] = self.per_tensor[i, j]
        out["nonfinite_grads"] = self.nonfinite
        return out


# Fake (meta) kernels: output shapes and dtypes for torch.compile and opcheck.
def _out_dtype(*lists):
    tensors = [t for lst in lists for t in lst]
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _list_device(*lists):
    for lst in lists:
        for t in lst:
            return t.device
    return torch.device("cpu")


def _fake_param_stats(grads, params, init_params, prev_params, histogram, nbins, maxval,
                      weights_matrices_only):
    lists = (grads, params, init_params, prev_params)
    n = max(len(lst) for lst in lists)
    dev = _list_device(*lists)
    fdt = _out_dtype(*lists)
    nb = nbins if histogram else 0
    return (
        torch.empty(len(METRICS), dtype=fdt, device=dev),
        torch.empty(n, len(METRICS), dtype=fdt, device=dev),
        torch.empty((), dtype=torch.int64, device=dev),
        torch.empty(n, dtype=torch.int64, device=dev),
        torch.empty(nb, dtype=torch.int64, device=dev),
        torch.empty(n, nb, dtype=torch.int64, device=dev),
    )


@register_fake("trainscope::param_stats")
def _(grads, params, init_params, prev_params, histogram=True, nbins=100, maxval=0.05,
      weights_matrices_only=False):
    return _fake_param_stats(grads, params, init_params, prev_params, histogram, nbins, maxval,
                             weights_matrices_only)


@register_fake("trainscope::param_stats_refresh_")
def _(grads, params, init_params, prev_params, histogram=True, nbins=100, maxval=0.05,
      weights_matrices_only=False):
    return _fake_param_stats(grads, params, init_params, prev_params, histogram, nbins, maxval,
                             weights_matrices_only)


@register_fake("trainscope::loss")
def _(losses):
    dt = torch.float64 if losses.dtype == torch.float64 else torch.float32
    return torch.empty((), dtype=dt, device=losses.device)


def _metric_index(name: str) -> int:
    try:
        return METRICS.index(name)
    except ValueError:
        raise KeyError(f"unknown metric {name!r}; expected one of {METRICS}") from None


def _run(caller: str, g: list, p: list, p0: list, pp: list, *, histogram: bool = False,
         nbins: int = 100, maxval: float = 0.05, matrices_only: bool = False,
         refresh_prev: bool = False):
    """Calls the fused op; returns its six outputs."""
    if not (g or p or p0 or pp):
        raise ValueError(f"{caller}: no tensors given (every tensor list is empty)")
    if refresh_prev and not pp:
        raise ValueError(f"{caller}: refresh_prev=True needs prev_params")
    op = torch.ops.trainscope.param_stats_refresh_ if refresh_prev else torch.ops.trainscope.param_stats
    return op(g, p, p0, pp, bool(histogram), *check_hist_axis(nbins, maxval, caller=caller), bool(matrices_only))


def param_stats(
    grads: TensorList = None,
    params: TensorList = None,
    init_params: TensorList = None,
    prev_params: TensorList = None,
    *,
    histogram: bool = True,
    nbins: int = 100,
    maxval: float = 0.05,
    weight_magnitude_of: str = "all",
    refresh_prev: bool = False,
    losses: Optional[torch.Tensor] = None,
) -> ParamStats:
    """Every parameter-space metric, global and per tensor, from one pass over memory.

    Lists are paired by position. ``grads`` gives grad_norm, grad_magnitude, the non-finite
    count and (``histogram``) the gradient histogram; ``params`` gives weight_magnitude and
    weight_norm; with ``init_params`` distance; with ``prev_params`` update_size and update_ratio
    (update_size / weight_norm, per tensor and globally). ``weight_magnitude_of`` is
    ``"all"`` or ``"matrices"`` (tensors with dim >= 2, i.e. biases and norms excluded) for the
    global weight magnitude; per-tensor values are always reported. ``refresh_prev`` copies
    ``params`` into ``prev_params`` after reading them, ready for the next step.
    """
    if weight_magnitude_of not in ("all", "matrices"):
        raise ValueError(f"param_stats: weight_magnitude_of must be 'all' or 'matrices', got {weight_magnitude_of!r}")
    out = _run("param_stats", tensor_list(grads, "grads"), tensor_list(params, "params"),
               tensor_list(init_params, "init_params"), tensor_list(prev_params, "prev_params"),
               histogram=histogram, nbins=nbins, maxval=maxval,
               matrices_only=weight_magnitude_of == "matrices", refresh_prev=refresh_prev)
    return ParamStats(*out, loss=loss(losses) if losses is not None else None)


def _metric(out, index: int, per_tensor: bool) -> torch.Tensor:
    return out[1][:, index] if per_tensor else out[0][index]


def grad_norm(grads: TensorList, per_tensor: bool = False) -> torch.Tensor:
    """sqrt(Σ g²) over all gradients: 0-d, or [T] with ``per_tensor``."""
    return _metric(_run("grad_norm", tensor_list(grads, "grads"), [], [], []), 0, per_tensor)


def grad_magnitude(grads: TensorList, per_tensor: bool = False) -> torch.Tensor:
    """Σ|g| / numel (mean absolute gradient element)."""
    return _metric(_run("grad_magnitude", tensor_list(grads, "grads"), [], [], []), 1, per_tensor)


def weight_magnitude(params: TensorList, per_tensor: bool = False,
                     matrices_only: bool = False) -> torch.Tensor:
    """Σ|θ| / numel; ``matrices_only`` restricts the global value to tensors with dim >= 2."""
    out = _run("weight_magnitude", [], tensor_list(params, "params"), [], [], matrices_only=matrices_only)
    return _metric(out, 2, per_tensor)


def distance(params: TensorList, init_params: TensorList, per_tensor: bool = False) -> torch.Tensor:
    """sqrt(Σ (θ − θ₀)²): distance from the parameters when tracking began."""
    p, p0 = tensor_list(params, "params"), tensor_list(init_params, "init_params")
    if not p0:
        raise ValueError("distance: init_params is empty")
    return _metric(_run("distance", [], p, p0, []), 3, per_tensor)


def update_size(params: TensorList, prev_params: TensorList, per_tensor: bool = False,
                refresh_prev: bool = False) -> torch.Tensor:
    """sqrt(Σ (θ_after − θ_before)²) of the latest step; ``refresh_prev`` then sets prev ← params."""
    p, pp = tensor_list(params, "params"), tensor_list(prev_params, "prev_params")
    if not pp:
        raise ValueError("update_size: prev_params is empty")
    return _metric(_run("update_size", [], p, [], pp, refresh_prev=refresh_prev), 4, per_tensor)


def weight_norm(params: TensorList, per_tensor: bool = False) -> torch.Tensor:
    """sqrt(Σ θ²) over every tensor (the norm the update ratio divides by)."""
    return _metric(_run("weight_norm", [], tensor_list(params, "params"), [], []), 5, per_tensor)


def update_ratio(params: TensorList, prev_params: TensorList, per_tensor: bool = False,
                 refresh_prev: bool = False) -> torch.Tensor:
    """update_size / weight_norm of the latest step (per tensor: that tensor's; globally: the
    global ones): the update-to-weight ratio, a learning-rate diagnostic (≈ 1e-3 is the usual
    rule of thumb). ``refresh_prev`` then sets prev ← params."""
    p, pp = tensor_list(params, "params"), tensor_list(prev_params, "prev_params")
    if not pp:
        raise ValueError("update_ratio: prev_params is empty")
    return _metric(_run("update_ratio", [], p, [], pp, refresh_prev=refresh_prev), 6, per_tensor)


def grad_hist1d(tensors: TensorList, nbins: int = 100, maxval: float = 0.05,
                per_tensor: bool = False) -> torch.Tensor:
    """Exact int64 histogram (SPEC.md §4): ``nbins`` equal bins over [-maxval, maxval], outliers
    in the edge bins, NaN/Inf left out (see :func:`nonfinite_count`). [nbins] or [T, nbins]."""
    out = _run("grad_hist1d", tensor_list(tensors, "tensors"), [], [], [], histogram=True,
               nbins=nbins, maxval=maxval)
    return out[5] if per_tensor else out[4]


def nonfinite_count(tensors: TensorList, per_tensor: bool = False) -> torch.Tensor:
    """Number of NaN and ±Inf elements: 0-d int64, or [T]."""
    out = _run("nonfinite_count", tensor_list(tensors, "tensors"), [], [], [])
    return out[3] if per_tensor else out[2]


def loss(losses: torch.Tensor) -> torch.Tensor:
    """Mean of the per-sample loss vector, accumulated in at least float32."""
    return torch.ops.trainscope.loss(check_tensor(losses, "losses", "loss"))


def hist_bin_edges(nbins: int = 100, maxval: float = 0.05, device=None) -> torch.Tensor:
    """The nbins + 1 edges of :func:`grad_hist1d`'s bins (float64)."""
    nbins, maxval = check_hist_axis(nbins, maxval, caller="hist_bin_edges")
    return torch.linspace(-maxval, maxval, nbins + 1, dtype=torch.float64, device=device)
