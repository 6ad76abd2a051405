"""Dead units of a layer's representation (SPEC.md §3 ``dead_units``): per-unit active counts over
a probe set, exact int64, accumulated on the device::

    d = trainscope.dead_units(acts, kind="relu")   # acts [N, units] or [N, C, *spatial]
    d.count            # [] int64: units whose active fraction f_u <= tau
    d.fraction         # [] float64: count / units
    d.active_fraction  # [units] float64: f_u

    counter = trainscope.DeadUnitCounter(kind="tanh", eps=0.01)
    for x in probe_batches:
        counter.add(layer_output(x))                          # counts stay on the device
    d = counter.result()

A unit of [N, C, *spatial] activations is a channel; every spatial position is one more
observation. "Active" for one observation a, decided exactly as in float64 whatever the dtype:
ReLU a != 0; tanh |a| <= 1 - eps; sigmoid eps <= a <= 1 - eps. A NaN counts as active for ReLU
and as inactive for tanh and sigmoid. A unit is dead when f_u = active count / observations
<= tau (tau = 0: never active on any observation). Nothing here waits for the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_float, check_int, check_tensor, register_fake

KINDS = ("relu", "tanh", "sigmoid")


@dataclass
class DeadUnits:
    """Result of :func:`dead_units`. ``count`` units have an active fraction ``f_u <= tau``;
    ``fraction = count / units`` (NaN with no units); ``active_fraction[u] = f_u`` (NaN for every
    unit when there were no observations, and then no unit counts as dead)."""

    count: torch.Tensor            # [] int64
    fraction: torch.Tensor         # [] float64
    active_fraction: torch.Tensor  # [units] float64


def active_counts(acts: torch.Tensor, kind: str = "relu", eps: float = 0.01) -> torch.Tensor:
    """Per-unit active counts of one batch: ``[units]`` int64 on ``acts``' device, where ``acts`` is
    ``[N, units]`` or ``[N, C, *spatial]`` (float32/float64/bfloat16/float16, any strides) and
    ``kind`` is "relu", "tanh" or "sigmoid" (eps in [0, 0.5], the saturation margin of tanh and
    sigmoid). Each count is out of :func:`observations_per_unit` observations."""
    return torch.ops.trainscope.active_counts(check_tensor(acts, "acts", "active_counts"), str(kind),
                                              check_float(eps, "eps", "active_counts"))


def observations_per_unit(acts: torch.Tensor) -> int:
    """Observations of each unit in one batch: N times the product of the spatial sizes."""
    check_tensor(acts, "acts", "observations_per_unit")
    if acts.dim() < 2:
        raise ValueError(f"observations_per_unit: acts is {acts.dim()}-D (shape {tuple(acts.shape)}); "
                         "activations are [N, units] or [N, C, *spatial]")
    return math.prod(acts.shape[:1] + acts.shape[2:])


def dead_units_from_counts(counts: torch.Tensor, observations: int, tau: float = 0.0) -> DeadUnits:
    """The results from accumulated per-unit active counts (``[units]`` int64) and the number of
    observations per unit: ``f_u = counts[u] / observations`` in float64, dead when ``f_u <= tau``
    (tau in [0, 1]). A count outside [0, observations] cannot come from that many observations:
    its unit's ``f_u`` is NaN and it is not counted dead."""
    count, fraction, active_fraction = torch.ops.trainscope.dead_units_from_counts(
        check_tensor(counts, "counts", "dead_units_from_counts"), check_int(observations, "observations", "dead_units_from_counts", low=0),
        check_float(tau, "tau", "dead_units_from_counts"))
    return DeadUnits(count, fraction, active_fraction)


def dead_units(acts: torch.Tensor, kind: str = "relu", eps: float = 0.01, tau: float = 0.0) -> DeadUnits:
    """Dead units of one batch of activations ``acts`` (``[N, units]`` or ``[N, C, *spatial]``): the
    units active on at most a fraction ``tau`` of their observations (tau = 0: never active).
    ``kind`` and ``eps`` as in :func:`active_counts`. For a probe set larger than one batch use
    :class:`DeadUnitCounter`."""
    count, fraction, active_fraction = torch.ops.trainscope.dead_units(
        check_tensor(acts, "acts", "dead_units"), str(kind), check_float(eps, "eps", "dead_units"),
        check_float(tau, "tau", "dead_units"))
    return DeadUnits(count, fraction, active_fraction)


class DeadUnitCounter:
    """Dead units over a probe set streamed batch by batch. The per-unit counts stay on the
    activations' device between batches; the number of observations is counted on the host from
    the shapes, so neither ``add`` nor ``result`` waits for the GPU. The first batch fixes the
    number of units and the device; later batches must match. ``reset()`` forgets every batch."""

    def __init__(self, kind: str = "relu", eps: float = 0.01, tau: float = 0.0):
        kind = str(kind)
        if kind.lower() not in KINDS:
            raise ValueError(f"DeadUnitCounter: kind must be 'relu', 'tanh' or 'sigmoid', got {kind!r}")
        if not 0.0 <= eps <= 0.5:
            raise ValueError(f"DeadUnitCounter: eps must be in [0, 0.5], got {eps}")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"DeadUnitCounter: tau must be in [0, 1], got {tau}")
        self.kind, self.eps, self.tau = kind, float(eps), float(tau)
        self.counts: Optional[torch.Tensor] = None  # [units] int64 after the first add
        self.observations = 0

    def add(self, acts: torch.Tensor) -> None:
        """Adds one batch ``[N, units]`` or ``[N, C, *spatial]``."""
        check_tensor(acts, "acts", "DeadUnitCounter.add")
        if acts.dim() < 2:
            raise ValueError(f"DeadUnitCounter.add: acts is {acts.dim()}-D (shape {tuple(acts.shape)}); "
                             "activations are [N, units] or [N, C, *spatial]")
        if self.counts is None:
            counts = torch.zeros(acts.shape[1], dtype=torch.int64, device=acts.device)
        else:
            counts = self.counts
            if acts.shape[1] != counts.shape[0]:
                raise ValueError(f"DeadUnitCounter.add: acts has {acts.shape[1]} units (acts.shape[1]) but the "
                                 f"counter's earlier batches had {counts.shape[0]}")
            if acts.device != counts.device:
                raise ValueError(f"DeadUnitCounter.add: acts is on {acts.device} but the counter's earlier "
                                 f"batches were on {counts.device}")
        torch.ops.trainscope.add_active_counts_(counts, acts, self.kind, self.eps)
        self.counts = counts
        self.observations += observations_per_unit(acts)

    def result(self) -> DeadUnits:
        """The dead units of every batch added so far."""
        if self.counts is None:
            raise RuntimeError("DeadUnitCounter.result: no batch added yet; call add(acts) first")
        return dead_units_from_counts(self.counts, self.observations, self.tau)

    def reset(self) -> None:
        self.counts = None
        self.observations = 0


# Fake (meta) kernels: output shapes and dtypes for torch.compile and opcheck.
def _units(acts) -> int:
    torch._check(acts.dim() >= 2, lambda: "acts must be [N, units] or [N, C, *spatial]")
    return acts.shape[1]


@register_fake("trainscope::active_counts")
def _(acts, kind="relu", eps=0.01):
    return acts.new_empty((_units(acts),), dtype=torch.int64)


@register_fake("trainscope::add_active_counts_")
def _(counts, acts, kind="relu", eps=0.01):
    return None


@register_fake("trainscope::dead_units")
def _(acts, kind="relu", eps=0.01, tau=0.0):
    units = _units(acts)
    return (acts.new_empty((), dtype=torch.int64), acts.new_empty((), dtype=torch.float64),
            acts.new_empty((units,), dtype=torch.float64))


@register_fake("trainscope::dead_units_from_counts")
def _(counts, observations, tau=0.0):
    return (counts.new_empty((), dtype=torch.int64), counts.new_empty((), dtype=torch.float64),
            counts.new_empty((counts.shape[0],), dtype=torch.float64))
