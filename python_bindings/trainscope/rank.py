"""Rank measures of a matrix (SPEC.md §3): effective rank, approximate rank, absolute approximate
rank and stable rank, of one matrix, a batch of matrices, or a list of matrices of any shapes::

    r = trainscope.rank.rank_measures(phi)               # phi [N, units]: 0-d results
    r.effective_rank, r.approximate_rank, r.abs_approximate_rank, r.stable_rank
    rs = trainscope.rank.rank_measures([w1, w2, w3])     # [3] results, one batched solve

``method="gram"`` (default) takes σ² as the eigenvalues of the Gram matrix (the smaller of ΦᵀΦ and
ΦΦᵀ, float64) from one batched symmetric eigensolve over all matrices; ``method="svd"`` takes σ
from a float64 SVD. Eigenvalues at or below dim · 2⁻⁵² · λ_max count as zero (the solver's
rounding level). Results are float64 (effective and stable rank) and int64 (the approximate
ranks) on the input's device; nothing here waits for the GPU, and the results carry no autograd
history. A zero matrix has every measure 0.

Numerical trouble is a value, never an exception: a matrix with a NaN or infinite entry (a Gram
matrix too; by the Gram method also a finite matrix whose Gram matrix overflows float64), or
whose solve does not converge, gets NaN effective and stable rank and -1 for both approximate
ranks; the other matrices of a batch or list are measured as if alone. On CUDA this is decided on
the device (no synchronisation, CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_float, check_tensor, register_fake
from ._lists import tensor_list


@dataclass
class RankMeasures:
    """The four rank measures: 0-d tensors for one matrix, [L] for a batch or list."""

    effective_rank: torch.Tensor        # float64, exp(entropy of σ / Σσ)
    approximate_rank: torch.Tensor      # int64, smallest k with Σ_{i≤k} σᵢ² / Σσ² ≥ prop
    abs_approximate_rank: torch.Tensor  # int64, the same on σ / Σσ
    stable_rank: torch.Tensor           # float64, Σσ² / σ_max²


def rank_measures(m, prop: float = 0.99, method: str = "gram") -> RankMeasures:
    """The four measures of ``m``: a matrix [n, m] (0-d results), a batch [L, n, m] or a list
    (or dict) of matrices of any shapes on one device ([L] results). ``prop`` in (0, 1] is the
    share approximate_rank (of Σσ²) and abs_approximate_rank (of Σσ) must reach; ``method`` is
    "gram" or "svd"."""
    prop = check_float(prop, "prop", "rank_measures")
    if isinstance(m, torch.Tensor):
        return RankMeasures(*torch.ops.trainscope.rank_measures_batch(m, prop, str(method)))
    if m is None:
        raise TypeError("rank_measures: m must be a matrix, a batch or a list of matrices, got None")
    mats = tensor_list(m, "m", "rank_measures")
    if not mats:
        f = torch.empty(0, dtype=torch.float64)
        i = torch.empty(0, dtype=torch.int64)
        return RankMeasures(f, i, i.clone(), f.clone())
    return RankMeasures(*torch.ops.trainscope.rank_measures(mats, prop, str(method)))


def effective_rank(m, method: str = "gram") -> torch.Tensor:
    """exp(−Σ pₖ ln pₖ), pₖ = σₖ / Σσ (Roy & Vetterli 2007); 0 for a zero matrix."""
    return rank_measures(m, 0.99, method).effective_rank


def approximate_rank(m, prop: float = 0.99, method: str = "gram") -> torch.Tensor:
    """Smallest k with Σ_{i≤k} σᵢ² / Σσ² ≥ prop (σ descending)."""
    return rank_measures(m, prop, method).approximate_rank


def abs_approximate_rank(m, prop: float = 0.99, method: str = "gram") -> torch.Tensor:
    """Smallest k with Σ_{i≤k} σᵢ / Σσ ≥ prop (what the loss-of-plasticity scripts call "stable
    rank")."""
    return rank_measures(m, prop, method).abs_approximate_rank


def stable_rank(m, method: str = "gram") -> torch.Tensor:
    """‖Φ‖_F² / ‖Φ‖₂² = Σσ² / σ_max²."""
    return rank_measures(m, 0.99, method).stable_rank


def rank_measures_from_singular_values(sigma: torch.Tensor, prop: float = 0.99) -> RankMeasures:
    """The measures from singular values [k] (0-d results) or [L, k] ([L] results), each row in
    descending order, zeros allowed."""
    return RankMeasures(*torch.ops.trainscope.rank_measures_from_singular_values(
        check_tensor(sigma, "sigma", "rank_measures_from_singular_values"),
        check_float(prop, "prop", "rank_measures_from_singular_values")))


def rank_measures_from_grams(grams, prop: float = 0.99) -> RankMeasures:
    """The measures of symmetric positive semi-definite matrices (Gram matrices ΦᵀΦ or ΦΦᵀ, any
    sizes, one device) through one batched eigensolve: [L] results. Only the lower triangle is
    read."""
    gs = tensor_list(grams, "grams", "rank_measures_from_grams")
    if not gs:
        f = torch.empty(0, dtype=torch.float64)
        i = torch.empty(0, dtype=torch.int64)
        return RankMeasures(f, i, i.clone(), f.clone())
    return RankMeasures(*torch.ops.trainscope.rank_measures_from_grams(gs, check_float(prop, "prop",
                                                                                       "rank_measures_from_grams")))


# Fake (meta) kernels: output shapes and dtypes for torch.compile and opcheck.
def _fake(shape, device):
    f = torch.empty(shape, dtype=torch.float64, device=device)
    i = torch.empty(shape, dtype=torch.int64, device=device)
    return f, i, torch.empty_like(i), torch.empty_like(f)


@register_fake("trainscope::rank_measures")
def _(matrices, prop=0.99, method="gram"):
    dev = matrices[0].device if matrices else torch.device("cpu")
    return _fake((len(matrices),), dev)


@register_fake("trainscope::rank_measures_batch")
def _(matrices, prop=0.99, method="gram"):
    torch._check(matrices.dim() in (2, 3), lambda: "rank_measures: matrices must be [n, m] or [L, n, m]")
    return _fake(() if matrices.dim() == 2 else (matrices.shape[0],), matrices.device)


@register_fake("trainscope::rank_measures_from_singular_values")
def _(sigma, prop=0.99):
    torch._check(sigma.dim() in (1, 2), lambda: "rank_measures_from_singular_values: sigma must be [k] or [L, k]")
    return _fake(() if sigma.dim() == 1 else (sigma.shape[0],), sigma.device)


@register_fake("trainscope::rank_measures_from_grams")
def _(grams, prop=0.99):
    dev = grams[0].device if grams else torch.device("cpu")
    return _fake((len(grams),), dev)
