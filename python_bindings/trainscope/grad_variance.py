"""The per-element gradient variance and what is built on it (SPEC.md §6): ``mean_gsnr``,
``early_stopping`` and ``cabs``, as Cockpit v1.0.2 defines them.

Everything comes from two per-element sums over the B samples of a batch: Σᵢ gᵢ (B·ḡ) and
S = Σᵢ gᵢ² (the elementwise second moment, BackPACK's SumGradSquared times B²), gᵢ = ∇ℓᵢ the
gradient of sample i's loss. :meth:`trainscope.PerSampleHooks.grad_moments` gives both from layer
factors without B copies of the weights where the layer allows (an nn.Linear on [B, d] inputs:
one GEMM of the squared factors; other layers: per-sample gradients in tiles)::

    hooks = trainscope.PerSampleHooks(model)
    loss = F.cross_entropy(model(x), y); loss.backward()
    v = trainscope.grad_variance_stats(hooks.grad_moments(), loss=loss, lr=0.1)
    v["mean_gsnr"], v["early_stopping"], v["cabs"], v.per_tensor["cabs"]["fc1.weight"]

With ḡ = Σᵢ gᵢ / B:

- ``mean_gsnr``: mean over elements j of ḡ_j² / (S_j / B − ḡ_j² + ε), ε = 1e-5 (the gradient
  signal-to-noise ratio, Liu et al. 2020);
- ``early_stopping``: 1 − B · mean over j of ḡ_j² / (σ_j² + ε), σ_j² = (S_j − B ḡ_j²) / (B − 1),
  ε = 1e-5 (Mahsereci et al. 2017, eq. 7: above 0 means stop); NaN for a batch of one;
- ``cabs``: η · Σ_j (S_j − B ḡ_j²) / (B · L) (Balles et al. 2017, eq. 22: the batch size the
  CABS rule suggests for learning rate η at mean loss L).

Cockpit computes ``early_stopping`` and ``cabs`` only for SGD without momentum. Here the
statistics are computed for whatever gradients were captured: ``early_stopping`` does not involve
the optimizer at all (its derivation assumes gradient descent steps; with momentum or an adaptive
optimizer it still tests whether ḡ is distinguishable from zero given the per-element noise);
``cabs`` takes η from the caller, and :class:`trainscope.Monitor` reads it only from an SGD
optimizer without momentum (it refuses other optimizers at construction). Per tensor, each
quantity is the same formula over that tensor's elements (``per_tensor[name][parameter]``).
Float64 throughout; non-finite gradients or loss give NaN, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import register_fake

#: The quantities of this family, in ``GradVarianceStats.stats`` order.
GRAD_VARIANCE_STATS = ("mean_gsnr", "early_stopping", "cabs")


@dataclass
class GradMoments:
    """Per-parameter sums over the samples of a batch: ``grad_sum`` {name: Σᵢ gᵢ} and
    ``sum_grad_sq`` {name: Σᵢ gᵢ²} (float64, each shaped like its parameter), and the
    ``batch_size`` B. Sums of disjoint sample sets (ranks, micro-batches) add with ``+``."""

    grad_sum: Dict[str, torch.Tensor]
    sum_grad_sq: Dict[str, torch.Tensor]
    batch_size: int
    coverage: object = field(default=None, compare=False)

    def __add__(self, other: "GradMoments") -> "GradMoments":
        if not isinstance(other, GradMoments):
            return NotImplemented
        if set(other.grad_sum) != set(self.grad_sum):
            raise ValueError("GradMoments: the two hold different parameters")
        return GradMoments({k: v + other.grad_sum[k] for k, v in self.grad_sum.items()},
                           {k: v + other.sum_grad_sq[k] for k, v in self.sum_grad_sq.items()},
                           self.batch_size + other.batch_size, self.coverage)


@dataclass
class GradVarianceStats:
    """``mean_gsnr``, ``early_stopping``, ``cabs`` (0-d float64; ``cabs`` NaN without ``loss``
    and ``lr``), all three in ``stats`` [3] (:data:`GRAD_VARIANCE_STATS` order),
    ``per_tensor`` {quantity: {parameter name: 0-d float64}}, and ``coverage`` (the hooks'
    :class:`~trainscope.per_sample_factors.Coverage` when parameters were left out, else None).
    Indexable by name: ``s["cabs"]``."""

    stats: torch.Tensor
    per_tensor: Dict[str, Dict[str, torch.Tensor]]
    batch_size: int
    coverage: object = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in GRAD_VARIANCE_STATS:
            return self.stats[GRAD_VARIANCE_STATS.index(key)]
        raise KeyError(f"GradVarianceStats: unknown quantity {key!r}; the quantities are {GRAD_VARIANCE_STATS}")

    @property
    def mean_gsnr(self) -> torch.Tensor:
        return self["mean_gsnr"]

    @property
    def early_stopping(self) -> torch.Tensor:
        return self["early_stopping"]

    @property
    def cabs(self) -> torch.Tensor:
        return self["cabs"]

    def as_dict(self) -> dict:
        return {k: self[k] for k in GRAD_VARIANCE_STATS}


def grad_variance_stats(moments: GradMoments, loss: Optional[object] = None,
                        lr: Optional[float] = None) -> GradVarianceStats:
    """``mean_gsnr``, ``early_stopping`` and ``cabs`` (module docstring) of the batch that
    ``moments`` sums over. ``loss``: the batch's mean loss L (a number or a tensor; ``cabs`` is
    NaN without it or without ``lr``); ``lr``: the SGD learning rate η."""
    if not isinstance(moments, GradMoments):
        raise TypeError(f"grad_variance_stats: moments must be a GradMoments (PerSampleHooks.grad_moments()), got "
                        f"{type(moments).__name__}")
    if lr is not None:
        lr = float(lr)
    b = int(moments.batch_size)
    if b < 1:
        raise ValueError(f"grad_variance_stats: moments.batch_size must be at least 1, got {b}")
    names = list(moments.grad_sum)
    if not names:
        raise ValueError("grad_variance_stats: moments holds no parameters")
    if loss is not None:
        loss = torch.as_tensor(loss).detach().reshape(())
    rows = torch.ops.trainscope.grad_variance_stats([moments.grad_sum[n] for n in names],
                                                    [moments.sum_grad_sq[n] for n in names], b, loss, lr)
    per_tensor = {q: {n: rows[1 + t, k] for t, n in enumerate(names)} for k, q in enumerate(GRAD_VARIANCE_STATS)}
    return GradVarianceStats(rows[0], per_tensor, b, moments.coverage)


def grad_moments_of(per_sample_grads: Mapping[str, torch.Tensor]) -> GradMoments:
    """:class:`GradMoments` of materialised per-sample gradients {name: [B, *shape]} (the
    reference path; the hooks form the same sums from layer factors)."""
    items = list(per_sample_grads.items())
    if not items:
        raise ValueError("grad_moments_of: per_sample_grads is empty")
    b = items[0][1].shape[0]
    for name, g in items:
        if g.shape[0] != b:
            raise ValueError(f"grad_moments_of: per_sample_grads[{name!r}] has {g.shape[0]} samples, "
                             f"{items[0][0]!r} has {b}")
    return GradMoments({n: g.to(torch.float64).sum(0) for n, g in items},
                       {n: g.to(torch.float64).square().sum(0) for n, g in items}, b)


@register_fake("trainscope::grad_variance_stats")
def _(grad_sum, sum_grad_sq, batch_size, loss=None, lr=None):
    return grad_sum[0].new_empty((len(grad_sum) + 1, len(GRAD_VARIANCE_STATS)), dtype=torch.float64)
