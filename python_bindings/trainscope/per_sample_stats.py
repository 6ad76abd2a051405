"""Per-sample gradient statistics (SPEC.md §2).

Every statistic is a function of three additive parts — per-sample squared norms ‖gᵢ‖², inner
products gᵢ·ḡ with the mean gradient, and ‖ḡ‖² — so layers measured separately add their
:class:`PerSampleParts` before the statistics are taken. From materialised per-sample gradients::

    grads = torch.func.vmap(torch.func.grad(loss_of_one_sample), ...)(...)   # each [B, *shape]
    s = trainscope.per_sample_stats(list(grads.values()))
    s["norm_test"], s["gradient_noise_scale"], s.hist

Scaling every gᵢ by one constant c (per-sample gradients of a mean-reduced loss carry c = 1/B)
leaves the norm, inner-product and orthogonality tests and the gradient noise scale unchanged;
grad_variance_trace and grad_sq_norm_unbiased are quadratic in g and scale by c². Everything
stays on the inputs' device; nothing here waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_hist_axis, register_fake
from ._lists import tensor_list

#: Order of ``PerSampleStats.stats``.
PER_SAMPLE_STATS = ("norm_test", "inner_test", "ortho_test", "grad_variance_trace",
                    "grad_sq_norm_unbiased", "gradient_noise_scale")


@dataclass
class PerSampleParts:
    """‖gᵢ‖² [B], gᵢ·ḡ [B] and ‖ḡ‖² []; parts of different layers add with ``+``.

    ``group``: None when the parts are the whole batch's; otherwise the torch.distributed process
    group over whose ranks the batch is split: the parts are this rank's samples, taken against
    the global ḡ (as :func:`trainscope.distributed.per_sample_stats_across_ranks` and
    ``PerSampleHooks.parts()`` under torch.distributed return them), and :meth:`stats` combines
    them across the group (a collective)."""

    sq_norms: torch.Tensor
    dots: torch.Tensor
    mean_sq_norm: torch.Tensor
    group: object = field(default=None, compare=False)

    @property
    def batch_size(self) -> int:
        return self.sq_norms.shape[0]

    def __add__(self, other: "PerSampleParts") -> "PerSampleParts":
        if not isinstance(other, PerSampleParts):
            return NotImplemented
        if other.batch_size != self.batch_size:
            raise ValueError(f"PerSampleParts: batch sizes differ ({self.batch_size} and {other.batch_size})")
        if other.group is not self.group:
            raise ValueError("PerSampleParts: parts of one batch split over ranks (against the global mean) and "
                             "parts of a whole batch (or of another process group) do not add up")
        return PerSampleParts(self.sq_norms + other.sq_norms, self.dots + other.dots,
                              self.mean_sq_norm + other.mean_sq_norm, self.group)

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)  # so sum(list_of_parts) works

    def stats(self) -> torch.Tensor:
        """The six statistics, in PER_SAMPLE_STATS order (of the whole batch over ``group``'s ranks
        when the parts have a group: then a collective)."""
        if self.group is not None:
            from .distributed import per_sample_stats_from_local_parts

            return per_sample_stats_from_local_parts(self, self.group)
        return torch.ops.trainscope.per_sample_stats_from_parts(self.sq_norms, self.dots, self.mean_sq_norm)


@dataclass
class PerSampleStats:
    """Results of :func:`per_sample_stats` and of ``PerSampleHooks.stats()`` (one type for both):
    the statistics by name (``s["norm_test"]``), all six in ``s.stats``.

    - ``parts``: the additive parts the statistics were taken from (tied to a process group when
      they are one rank's share of a batch split over ranks);
    - ``stats``: [6] float64 in PER_SAMPLE_STATS order;
    - ``hist``: [nbins] int64 per-sample gradient histogram, [0] without one. ``PerSampleHooks``
      never fills it (``stats()`` forms no per-sample gradient): its ``grad_hist1d()`` does;
    - ``nonfinite``: [] int64 count of non-finite per-sample gradient elements; None when not
      counted: ``PerSampleHooks`` works from layer factors and never sees the elements (a
      non-finite input or output gradient shows as NaN or inf in the statistics instead);
    - ``coverage``: which parameters the statistics cover, None when they cover every trainable
      parameter (always None for materialised gradients, which are whatever was passed in).
      ``PerSampleHooks`` reports its ``coverage`` here when it leaves parameters out."""

    parts: PerSampleParts
    stats: torch.Tensor                 # [6] in PER_SAMPLE_STATS order
    hist: torch.Tensor                  # [nbins] int64 ([0] without histogram)
    nonfinite: Optional[torch.Tensor]   # [] int64; None: not counted (PerSampleHooks)
    coverage: Optional[object] = None   # None: every trainable parameter

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.stats[PER_SAMPLE_STATS.index(name)]
        except ValueError:
            raise KeyError(f"unknown statistic {name!r}; expected one of {PER_SAMPLE_STATS}") from None

    def as_dict(self) -> dict:
        """{name: 0-d tensor} of the six statistics, and ``per_sample_nonfinite`` when counted."""
        out = {name: self.stats[i] for i, name in enumerate(PER_SAMPLE_STATS)}
        if self.nonfinite is not None:
            out["per_sample_nonfinite"] = self.nonfinite
        return out


PerSampleInput = Union[PerSampleParts, torch.Tensor, Iterable[torch.Tensor]]


def _as_grad_list(per_sample_grads) -> list:
    out = tensor_list(per_sample_grads, "per_sample_grads")
    if not out:
        raise ValueError("per_sample_grads is empty")
    return out


def per_sample_stats(per_sample_grads, *, histogram: bool = True, nbins: int = 100,
                     maxval: float = 0.05) -> PerSampleStats:
    """All of SPEC.md §2 from materialised per-sample gradients (a tensor, a list of tensors or a
    dict of them, each [B, *param_shape]) in one fused pass; with ``histogram`` also the exact
    histogram of all B·P per-sample gradient elements."""
    sq, dots, msq, hist, nonfinite = torch.ops.trainscope.per_sample_parts(
        _as_grad_list(per_sample_grads), bool(histogram), *check_hist_axis(nbins, maxval))
    parts = PerSampleParts(sq, dots, msq)
    return PerSampleStats(parts, parts.stats(), hist, nonfinite)


def per_sample_parts(per_sample_grads) -> PerSampleParts:
    """Only the additive parts of materialised per-sample gradients, for combining with others."""
    sq, dots, msq, _, _ = torch.ops.trainscope.per_sample_parts(_as_grad_list(per_sample_grads), False, 1, 1.0)
    return PerSampleParts(sq, dots, msq)


def _stats_of(x: PerSampleInput) -> torch.Tensor:
    return x.stats() if isinstance(x, PerSampleParts) else per_sample_parts(x).stats()


def norm_test(per_sample: PerSampleInput) -> torch.Tensor:
    """(Σ‖gᵢ‖²/‖ḡ‖² − B) / (B(B−1)); Cockpit's NormTest is its square root. Takes per-sample
    gradients or :class:`PerSampleParts`."""
    return _stats_of(per_sample)[0]


def inner_test(per_sample: PerSampleInput) -> torch.Tensor:
    """Σ (gᵢ·ḡ − ‖ḡ‖²)² / (B(B−1)‖ḡ‖⁴); Cockpit's InnerTest is its square root."""
    return _stats_of(per_sample)[1]


def ortho_test(per_sample: PerSampleInput) -> torch.Tensor:
    """Σ ‖gᵢ − (gᵢ·ḡ/‖ḡ‖²) ḡ‖² / (B(B−1)‖ḡ‖²); Cockpit's OrthoTest is its square root."""
    return _stats_of(per_sample)[2]


def gradient_noise_scale(per_sample: PerSampleInput) -> torch.Tensor:
    """B_simple = tr Σ̂ / ‖G‖² (McCandlish et al. 2018). Both parts, to smooth before dividing,
    are ``per_sample_stats(...)["grad_variance_trace"]`` and ``["grad_sq_norm_unbiased"]``."""
    return _stats_of(per_sample)[5]


def per_sample_grad_hist1d(per_sample_grads, nbins: int = 100, maxval: float = 0.05) -> torch.Tensor:
    """Exact int64 histogram [nbins] of all B·P per-sample gradient elements (SPEC.md §4)."""
    return torch.ops.trainscope.per_sample_parts(_as_grad_list(per_sample_grads), True,
                                                 *check_hist_axis(nbins, maxval))[3]


# Fake (meta) kernels: output shapes and dtypes for torch.compile and opcheck. Parts and
# statistics are float64 whatever the input dtype: the statistics subtract nearly equal numbers.
@register_fake("trainscope::per_sample_parts")
def _(per_sample_grads, histogram=True, nbins=100, maxval=0.05):
    if not per_sample_grads:
        raise RuntimeError("trainscope.per_sample_parts: per_sample_grads is empty")
    first = per_sample_grads[0]
    if first.dim() < 1:
        raise RuntimeError("trainscope.per_sample_parts: per_sample_grads[0] is 0-d; each entry is "
                           "[B, *param_shape] with the batch first")
    b, dev, fdt = first.shape[0], first.device, torch.float64
    return (torch.empty(b, dtype=fdt, device=dev), torch.empty(b, dtype=fdt, device=dev),
            torch.empty((), dtype=fdt, device=dev),
            torch.empty(nbins if histogram else 0, dtype=torch.int64, device=dev),
            torch.empty((), dtype=torch.int64, device=dev))


@register_fake("trainscope::per_sample_stats_from_parts")
def _(sq_norms, dots, mean_sq_norm):
    return torch.empty(len(PER_SAMPLE_STATS), dtype=torch.float64, device=sq_norms.device)
