"""The normalised step length α (SPEC.md §6): Cockpit's ``Alpha``, a two-step quantity.

One optimizer step t moves the parameters by d = θ_{t+1} − θ_t. Along that line the mini-batch
loss is observed twice: at the start (θ_t, batch t: position 0) and at the end (θ_{t+1}, batch
t+1: position t = ‖d‖), each time as a value and a slope along d, each with its sample noise:

- value  f = mean_i ℓᵢ                  noise  σ_f² = var_i ℓᵢ          (ddof = 1)
- slope  f' = mean_i qᵢ, qᵢ = gᵢ·d / ‖d‖  noise  σ_f'² = var_i qᵢ        (ddof = 1)

with ℓᵢ the per-sample losses, gᵢ = ∇ℓᵢ the per-sample gradients at that point and both points
projected on the same d (the update of the start step). The variances are those of single
samples, not of the mean (as Cockpit takes them). A quadratic f(x) = μ₀ + μ₁x + μ₂x² is fitted to
the four observations [f(0), f(t), f'(0), f'(t)] by weighted least squares with weights 1/σ² (the
noise-aware fit of Mahsereci & Hennig's probabilistic line search, 2017), and

    α = 2t / ᾱ − 1,   ᾱ = −μ₁ / μ₂   (the step to the far side of the fitted parabola),

so α < 0: the step undershot the minimum of the fit; α ≈ 0: it stepped to the minimum; α > 0: it
overshot (α = 1 lands as high as it started). A concave fit (μ₂ < 0: still going downhill where
the step landed) gives α = −1, as in Cockpit.

Source: Cockpit v1.0.2, ``cockpit.quantities.Alpha`` (Schneider, Dangel & Hennig 2021). The same
quantity, re-derived rather than ported:

- the fit is the same weighted least-squares estimate, solved in closed form instead of with
  Cockpit's explicit inverses of the normal equations: the four observations of three
  coefficients have one consistency condition, n·y = 0 with n = (−2, 2, −t, −t) (for a quadratic
  f(t) − f(0) = t·(f'(0) + f'(t))/2); the fit moves each observation against its discrepancy
  δ = 2(f(t) − f(0)) − t(f'(0) + f'(t)) in proportion to its variance, ŷ = y − Σn·δ / (nᵀΣn),
  and μ = (f̂(0), f̂'(0), (f̂'(t) − f̂'(0)) / 2t). Equal to Cockpit's up to rounding (≈1e-12 on
  well-conditioned fits) and accurate to rounding where Cockpit's normal equations lose digits
  (a floored zero variance: Cockpit's α was off by up to 2e-4 in a random test) or break down
  (t so small that t² underflows: Cockpit returns None, the fit here is still defined). For a
  convex fit α = −f̂'(t)/f̂'(0): minus the fitted end slope over the fitted start slope;
- a variance that is exactly 0 is replaced by 1e-10 first (Cockpit's ``eps``), without a warning;
- Cockpit's BackPACK path multiplies ``grad_batch`` (∇ℓᵢ / B under a mean-reduced loss) by B; the
  inputs here are the per-sample quantities themselves, so nothing is rescaled: pass the
  projections of ∇ℓᵢ, the gradient of each sample's own loss;
- f is the mean of the per-sample losses (Cockpit takes the ``loss`` it is handed, which is that
  mean under a mean-reduced loss);
- where Cockpit's fit fails (returns None: a singular or overflowing fit, an infinite variance)
  the fit here is NaN and so is α; a zero update (t = 0), where Cockpit logs −1 (its own fit is
  singular there), also gives NaN here; NaN or infinite inputs give NaN. Nothing here raises for
  numerical trouble: only arguments of the wrong kind or shape are errors, naming the argument.
- a batch of one has no sample variance (ddof = 1 divides by zero): NaN variances and α = NaN,
  which is what Cockpit computes too (its torch ``var`` is NaN, and so is its fit).

Everything is torch float64 on the inputs' device, with no autograd history; nothing here waits
for the GPU (a result is a 0-d tensor; ``float(alpha)`` when it is logged). ::

    start = trainscope.alpha.AlphaPoint(losses_t, proj_t, update_sq_norm)   # at θ_t, batch t, on d
    end = trainscope.alpha.AlphaPoint(losses_t1, proj_t1)             # at θ_{t+1}, batch t+1, on d
    alpha = trainscope.alpha.alpha_from_points(start, end)

or, over a training loop, :class:`AlphaTracker` with a schedule of start steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_int, register_fake

__all__ = ["SAVE_SHIFT", "VARIANCE_FLOOR", "AlphaPoint", "AlphaValue", "AlphaTracker", "fit_quadratic",
           "alpha_from_fit", "alpha_from_points"]

#: Steps between a start point and its end point; α is stored under the start step (Cockpit's
#: ``Alpha.SAVE_SHIFT``).
SAVE_SHIFT = 1

#: What an exactly zero variance becomes before the fit (Cockpit's ``eps``).
VARIANCE_FLOOR = 1e-10

_F64 = torch.float64


def _device_of(*values) -> torch.device:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _f64(value, device: torch.device) -> torch.Tensor:
    """``value`` (a number, a sequence of numbers or a tensor) as a detached float64 tensor on
    ``device``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=_F64)
    return torch.as_tensor(value, dtype=_F64, device=device)


def fit_quadratic(t, fs, dfs, fs_var, dfs_var) -> torch.Tensor:
    """The noise-aware quadratic fit μ = (μ₀, μ₁, μ₂), f(x) = μ₀ + μ₁x + μ₂x², of two noisy
    observations of a function and its slope, at 0 and at ``t`` (Cockpit's ``_fit_quadratic``).

    ``fs`` = (f(0), f(t)), ``dfs`` = (f'(0), f'(t)), ``fs_var`` and ``dfs_var`` their variances:
    each a pair (a sequence of two numbers or a tensor [..., 2]; leading dimensions broadcast, with
    ``t`` too). The fit is the weighted least-squares estimate with weights 1/variance (the
    maximum-likelihood estimate under independent Gaussian noise), after an exactly zero variance
    becomes :data:`VARIANCE_FLOOR`. Returns float64 [..., 3] on the inputs' device: NaN where the
    fit is degenerate (t = 0, a NaN or infinite input, an overflowing coefficient), never an
    exception."""
    dev = _device_of(t, fs, dfs, fs_var, dfs_var)
    t, fs, dfs, fs_var, dfs_var = (_f64(v, dev) for v in (t, fs, dfs, fs_var, dfs_var))
    for name, v in (("fs", fs), ("dfs", dfs), ("fs_var", fs_var), ("dfs_var", dfs_var)):
        if v.dim() == 0 or v.shape[-1] != 2:
            raise ValueError(f"fit_quadratic: {name} must be a pair (values at 0 and at t, last dimension 2), "
                             f"got shape {tuple(v.shape)}")
    return torch.ops.trainscope.fit_quadratic(t, fs, dfs, fs_var, dfs_var)


def alpha_from_fit(mu, t) -> torch.Tensor:
    """α = 2t/ᾱ − 1 with ᾱ = −μ₁/μ₂ from a fit μ [..., 3] (as :func:`fit_quadratic` returns) and
    the step length ``t`` (Cockpit's ``_get_alpha``): −1 for a concave fit (μ₂ < 0), NaN for a NaN
    fit (where Cockpit returns None). float64 [...] on the inputs' device."""
    dev = _device_of(mu, t)
    mu, t = _f64(mu, dev), _f64(t, dev)
    if mu.dim() == 0 or mu.shape[-1] != 3:
        raise ValueError(f"alpha_from_fit: mu must hold the three coefficients (last dimension 3), "
                         f"got shape {tuple(mu.shape)}")
    return torch.ops.trainscope.alpha_from_fit(mu, t)


@dataclass
class AlphaPoint:
    """One point of the fit: at the start (θ_t, batch t) or the end (θ_{t+1}, batch t+1).

    - ``losses``: [B] the per-sample losses ℓᵢ at that point;
    - ``projections``: [B] pᵢ = gᵢ·d, gᵢ = ∇ℓᵢ at that point and d = θ_{t+1} − θ_t the update of
      the start step (the same d at both points; not divided by ‖d‖);
    - ``update_sq_norm``: ‖d‖² (a number or 0-d tensor); needed at the start point only (the end
      point's is ignored).

    Any float dtype; everything is taken in float64."""

    losses: torch.Tensor
    projections: torch.Tensor
    update_sq_norm: Union[torch.Tensor, float, None] = None


class AlphaValue(NamedTuple):
    """α of one step, under its start step (as Cockpit stores it)."""

    step: int
    alpha: torch.Tensor  # 0-d float64


def _check_point(losses, projections, where: str) -> None:
    for name, v in (("losses", losses), ("projections", projections)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where}.{name} must be a tensor [B], got {type(v).__name__}")
        if v.dim() != 1:
            raise ValueError(f"{where}.{name} must be 1-D [B], got shape {tuple(v.shape)}")
    if losses.shape[0] != projections.shape[0]:
        raise ValueError(f"{where}: losses has {losses.shape[0]} samples but projections has "
                         f"{projections.shape[0]}")


def _moments(losses: torch.Tensor, projections: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[f, σ_f², f', σ_f'²] of one point: the means and the ddof-1 variances of ℓᵢ and of
    qᵢ = pᵢ / t (NaN variances for a batch of one, NaN throughout for an empty one)."""
    return torch.ops.trainscope.alpha_point_moments(losses.detach(), projections.detach().to(losses.device), t)


def _alpha_from_moments(t: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    pair = torch.stack([start, end], dim=-1)  # [4, 2]: f, σ_f², f', σ_f'² at start and end
    return alpha_from_fit(fit_quadratic(t, pair[0], pair[2], pair[1], pair[3]), t)


def _update_length(update_sq_norm, device: torch.device, where: str) -> torch.Tensor:
    if update_sq_norm is None:
        raise TypeError(f"{where}.update_sq_norm must be ‖d‖² (a number or 0-d tensor), got None")
    sq = _f64(update_sq_norm, device)
    if sq.numel() != 1:
        raise ValueError(f"{where}.update_sq_norm must be one number ‖d‖², got shape {tuple(sq.shape)}")
    return sq.reshape(()).sqrt()  # NaN for a negative one


def _as_point(p, where: str) -> AlphaPoint:
    if isinstance(p, AlphaPoint):
        return p
    if isinstance(p, (tuple, list)) and len(p) in (2, 3):
        return AlphaPoint(*p)
    raise TypeError(f"{where} must be an AlphaPoint (losses, projections, update_sq_norm), got {type(p).__name__}")


def alpha_from_points(start, end) -> torch.Tensor:
    """α of one step from its start and end points (:class:`AlphaPoint`, or tuples
    ``(losses, projections[, update_sq_norm])``), ``start.update_sq_norm`` = ‖d‖². A 0-d float64
    tensor on ``start.losses``'s device: NaN for numerical trouble (a NaN or infinite loss or
    projection, a zero update, a batch of one, a singular fit), never an exception; arguments of
    the wrong kind or shape are errors naming them."""
    start, end = _as_point(start, "start"), _as_point(end, "end")
    _check_point(start.losses, start.projections, "start")
    _check_point(end.losses, end.projections, "end")
    t = _update_length(start.update_sq_norm, start.losses.device, "start")
    return _alpha_from_moments(t, _moments(start.losses, start.projections, t),
                               _moments(end.losses, end.projections, t))


def _schedule_fn(schedule) -> Callable[[int], bool]:
    """``schedule`` as a function step -> bool: True (every step), a trainscope Schedule (or any
    object with ``due(step)``), a schedule spec string, or a callable (Cockpit's
    ``track_schedule``)."""
    if schedule is True:
        return lambda step: True
    if schedule is None or schedule is False:
        raise ValueError(f"AlphaTracker: schedule must name the start steps (a Schedule such as trainscope.every(k), "
                         f"True for every step, or a callable step -> bool), got {schedule!r}")
    if isinstance(schedule, str):
        from .monitor import Schedule  # loads the op library, which parses specs

        try:
            return Schedule(schedule).due
        except Exception as e:  # the C++ parser's error, whatever its type
            raise ValueError(f"AlphaTracker: schedule {schedule!r} is not a schedule spec: {e}") from None
    due = getattr(schedule, "due", None)
    if callable(due):
        return due
    if callable(schedule):
        return schedule
    raise TypeError(f"AlphaTracker: schedule must be a Schedule (trainscope.every(k), at_steps, log_spaced), "
                    f"True, a spec string or a callable step -> bool, got {schedule!r} ({type(schedule).__name__})")


class AlphaTracker:
    """The two-step bookkeeping of α over a training loop (Cockpit's ``TwoStepQuantity`` with
    ``SAVE_SHIFT`` = 1): a step s the schedule names is a start point, step s + 1 its end point,
    and α is returned, under step s, once both are in::

        tracker = AlphaTracker(trainscope.every(10))
        for step, batch in enumerate(loader):
            ...                                       # forward, backward at θ_step
            if tracker.is_end(step):                  # losses, gᵢ·d_prev at θ_step, batch step
                value = tracker.end(step, losses, proj_on_d_prev)   # AlphaValue(step - 1, α)
            opt.step()                                # d = θ_{step+1} − θ_step
            if tracker.is_start(step):                # losses, gᵢ·d at θ_step, batch step
                tracker.start(step, losses, proj_on_d, d_sq_norm)

    ``schedule``: a trainscope :class:`~trainscope.Schedule` (``every(k)``, ``at_steps``,
    ``log_spaced``, ``on_demand``), a spec string, True (every step), or a callable step -> bool
    (Cockpit's ``track_schedule``). None/False or a bad spec is a ValueError and another kind a
    TypeError, both naming ``schedule``, at construction.

    A start point is kept until its end step; one whose end never comes (the run ended, step s + 1
    was skipped, the steps jumped) is dropped without a value. At a step that is both an end and a
    start, ``end`` and ``start`` may come in either order. A point's statistics are reduced to
    five numbers at once (on the inputs' device, no synchronisation); α is a 0-d float64 tensor,
    NaN for numerical trouble (see :func:`alpha_from_points`)."""

    def __init__(self, schedule):
        self._due = _schedule_fn(schedule)
        self._starts: dict = {}  # start step -> (t, [f, σ_f², f', σ_f'²])

    def is_start(self, step: int) -> bool:
        """Whether ``step`` is a start point (the schedule names it)."""
        return bool(self._due(check_int(step, "step", "AlphaTracker.is_start")))

    def is_end(self, step: int) -> bool:
        """Whether ``step`` is the end point of a start point that is waiting for it."""
        return check_int(step, "step", "AlphaTracker.is_end") - SAVE_SHIFT in self._starts

    @property
    def pending(self) -> tuple:
        """The start steps waiting for their end point."""
        return tuple(sorted(self._starts))

    def reset(self) -> None:
        """Drop every waiting start point."""
        self._starts.clear()

    def _keep_only(self, *steps: int) -> None:
        for s in [s for s in self._starts if s not in steps]:
            del self._starts[s]

    def start(self, step: int, losses: torch.Tensor, projections: torch.Tensor, update_sq_norm) -> bool:
        """Record the start point of ``step``: per-sample losses [B] at θ_step on batch ``step``,
        their gradients' projections gᵢ·d [B] on this step's update d = θ_{step+1} − θ_step, and
        ‖d‖². Returns whether it was recorded: False (nothing kept) when the schedule does not name
        ``step``. Start points older than ``step − 1`` are dropped."""
        step = check_int(step, "step", "AlphaTracker.start")
        self._keep_only(step - SAVE_SHIFT)
        if not self._due(step):
            return False
        _check_point(losses, projections, "AlphaTracker.start")
        t = _update_length(update_sq_norm, losses.device, "AlphaTracker.start")
        self._starts[step] = (t, _moments(losses, projections, t))
        return True

    def end(self, step: int, losses: torch.Tensor, projections: torch.Tensor) -> Optional[AlphaValue]:
        """Record the end point of the start at ``step − 1``: per-sample losses [B] at θ_step on
        batch ``step`` and their gradients' projections on the start step's update d. Returns
        ``AlphaValue(step − 1, α)``, or None when no start point waits for this step. Start points
        other than ``step`` itself are dropped."""
        step = check_int(step, "step", "AlphaTracker.end")
        started = self._starts.pop(step - SAVE_SHIFT, None)
        self._keep_only(step)
        if started is None:
            return None
        _check_point(losses, projections, "AlphaTracker.end")
        t, start_moments = started
        return AlphaValue(step - SAVE_SHIFT, _alpha_from_moments(t, start_moments, _moments(losses, projections, t)))


@register_fake("trainscope::alpha_point_moments")
def _(losses, projections, t):
    return t.new_empty((4,), dtype=_F64)


@register_fake("trainscope::fit_quadratic")
def _(t, fs, dfs, fs_var, dfs_var):
    lead = torch.broadcast_shapes(t.shape, *(v.shape[:-1] for v in (fs, dfs, fs_var, dfs_var)))
    return fs.new_empty(tuple(lead) + (3,), dtype=_F64)


@register_fake("trainscope::alpha_from_fit")
def _(mu, t):
    return mu.new_empty(torch.broadcast_shapes(mu.shape[:-1], t.shape), dtype=_F64)
