"""The Monitor: every parameter metric once per batch, with no host synchronisation::

    mon = trainscope.Monitor(model, param_metrics=trainscope.every(1), grad_hist=trainscope.every(10),
                             sinks=[trainscope.JsonlSink("runs/metrics.jsonl")])
    for step, (x, y) in enumerate(loader):
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad(); losses.mean().backward(); opt.step()
        mon.step(step, losses)            # launches, never waits
    mon.flush()                           # the one wait, at the end (or use ``with Monitor(...)``)

The work runs in C++ (``torch.classes.trainscope.Monitor``, the same code as the LibTorch
``trainscope::Monitor``): one fused pass over parameters and gradients on the current stream, the
step's values written into a slot of a device ring buffer and copied asynchronously to pinned host
memory with an event. Finished steps reach the sinks as :class:`StepRecord` at a later ``step()``,
``poll()`` or ``flush()``; only ``flush()`` and a full ring (more than ``ring_slots`` steps in
flight) wait for the GPU. A step at which nothing is due makes no record.

Names in a record: ``loss`` (when per-sample losses are given), ``grad_norm``, ``grad_magnitude``,
``weight_magnitude``, ``distance`` (with ``track_init``), ``update_size`` (with ``track_prev``),
``weight_norm``, ``update_ratio`` (update_size / weight_norm, with ``track_prev``),
``nonfinite_count``, each on its own schedule (``metrics=``) or ``param_metrics``'s; per tensor ``<metric>/<parameter name>`` (``per_tensor``); custom quantities
``<key>`` or ``<key>/<name>``; the gradient histogram ``grad_hist1d``; the per-sample statistics
``per_sample/<stat>`` and histograms ``per_sample_grad_hist1d`` / ``per_sample_grad_hist2d``
(``per_sample=``, ``per_sample_hist=``, see :class:`Monitor`). θ₀ and θ_prev cost one copy
of the parameters each; θ_prev follows the parameters at every step, so ``update_size`` always
means the latest optimizer step: call ``step()`` once per optimizer step.

Checkpoints: ``state_dict()`` holds θ₀ and θ_prev (a copy of the parameters each), the pending
requests and the latest step; ``load_state_dict()`` on a Monitor rebuilt after loading the
model's weights continues ``distance`` and ``update_size`` as if the run had not stopped
(``state_dict(param_copies=False)`` leaves the copies out). ``with Monitor(...)`` flushes on exit,
also when the block exits by an exception (an error on the way is then a warning).

CUDA graphs: ``step()`` inside ``torch.cuda.graph(...)`` captures only device work into a fixed
slot (which quantities it computes is decided at capture time, for the step number given); after
each ``graph.replay()`` call ``collect_captured(step)``. Run one eager ``step()`` first (warm-up).

Data-parallel training (DDP, FSDP): when torch.distributed is initialised the Monitor combines the
parameter metrics, the histogram and the loss over the ranks by itself (see
:mod:`trainscope.distributed`): DDP's replicated parameters count once, FSDP's shards (DTensors,
or FSDP1's original parameters) add up, per-tensor results carry the model's own parameter names,
and the loss is the mean over every rank's samples. A step with parameter metrics or the histogram
due runs one all-reduce of T·(8 + nbins) + 2 doubles, so every rank must build the Monitor alike
and call ``step()`` and ``request()`` alike (with losses on every rank or on none). Only rank 0
hands records to the sinks (``sinks_on_all_ranks=True`` for every rank). Custom quantities are
each rank's own values.
"""

from __future__ import annotations

import abc
import functools
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _ops  # noqa: F401  (loads the op library and its custom classes)
from ._args import check_bool, check_hist_axis, check_int, check_path
from . import distributed as _dist

__all__ = ["BUILTIN_METRICS", "Monitor", "Quantity", "QuantityContext", "StepRecord", "Schedule", "every", "at_steps",
           "log_spaced", "on_demand", "JsonlSink", "CsvSink"]


class Schedule:
    """When a quantity is computed. Carries the spec string the C++ side parses ("every:K:START",
    "at:S1,S2,...", "log:PER_DECADE:START", "on_demand"); ``due`` asks the C++ implementation."""

    def __init__(self, spec: str):
        self.spec = str(spec)
        self._description = torch.ops.trainscope.schedule_describe(self.spec)  # validates

    def due(self, step: int) -> bool:
        """Whether the schedule fires at ``step`` (on_demand: never by itself)."""
        return bool(torch.ops.trainscope.schedule_due(self.spec, int(step)))

    def describe(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def every(k: int, start: int = 0) -> Schedule:
    """Steps start, start + k, start + 2k, ... (k >= 1)."""
    k = check_int(k, "k", "every", low=1)
    return Schedule(f"every:{k}:{check_int(start, 'start', 'every')}")


def at_steps(steps: Iterable[int]) -> Schedule:
    """Exactly the listed steps."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise TypeError(f"at_steps: steps must be an iterable of integers, got {steps!r} ({type(steps).__name__})")
    return Schedule("at:" + ",".join(str(check_int(s, "steps", "at_steps")) for s in steps))


def log_spaced(per_decade: int = 10, start: int = 1) -> Schedule:
    """The distinct values of floor(start · 10^(i / per_decade)), i = 0, 1, ...: with the defaults
    1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, ..."""
    per_decade = check_int(per_decade, "per_decade", "log_spaced", low=1)
    return Schedule(f"log:{per_decade}:{check_int(start, 'start', 'log_spaced', low=1)}")


def on_demand() -> Schedule:
    """Only at the step after :meth:`Monitor.request` (e.g. at a task boundary)."""
    return Schedule("on_demand")


ScheduleLike = Union[Schedule, bool, str, None]


def _spec(schedule: ScheduleLike, arg: str, caller: str = "Monitor") -> str:
    """A schedule, True (every step), False/None (off), or a spec string, as the C++ spec; a bad
    one is an error naming `arg`."""
    if schedule is True:
        return "every:1:0"
    if schedule is False or schedule is None:
        return "off"
    if isinstance(schedule, Schedule):
        return schedule.spec
    if isinstance(schedule, str):
        torch.ops.trainscope.schedule_describe(schedule, arg)  # parsed in C++, whose errors name `arg`
        return schedule
    raise TypeError(f"{caller}: {arg} must be a Schedule (trainscope.every(k), at_steps, log_spaced, on_demand), "
                    f"True, False or None, got {schedule!r} ({type(schedule).__name__})")


#: The built-in metrics a record can hold, in record order; the keys of ``Monitor(metrics=...)``.
BUILTIN_METRICS = ("loss", "grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size",
                   "weight_norm", "update_ratio", "nonfinite_count")


def _metric_specs(metrics, caller: str) -> Dict[str, str]:
    """``metrics={name: schedule}`` as C++ specs, each name one of BUILTIN_METRICS ("off" for
    False/None); a bad name or schedule is an error naming it."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{caller}: metrics must be a dict {{metric name: schedule}}, got {type(metrics).__name__}")
    out = {}
    for name, schedule in metrics.items():
        if name not in BUILTIN_METRICS:
            raise ValueError(f"{caller}: metrics has the key {name!r}, which is no built-in metric; "
                             f"the keys are {', '.join(BUILTIN_METRICS)}")
        out[name] = _spec(schedule, f"metrics[{name!r}]", caller)
    return out


def _losses_tensor(losses, device: torch.device) -> Optional[torch.Tensor]:
    """Per-sample losses as one tensor: a tensor, or a list/tuple of tensors (e.g. one per
    micro-batch) and numbers, concatenated in order; numbers are placed on `device`."""
    if losses is None or isinstance(losses, torch.Tensor):
        return None if losses is None else losses.detach()
    if not isinstance(losses, (list, tuple)):
        raise TypeError("Monitor.step: losses must be a tensor of per-sample losses or a list of tensors and "
                        f"numbers, got {type(losses).__name__}")
    parts = []
    for i, v in enumerate(losses):
        if isinstance(v, torch.Tensor):
            parts.append(v.detach().reshape(-1))
        elif isinstance(v, numbers.Real):
            parts.append(torch.full((1,), float(v), dtype=torch.float64, device=device))
        else:
            raise TypeError(f"Monitor.step: losses[{i}] is a {type(v).__name__}; give tensors or numbers")
    if not parts:
        return torch.empty(0, device=device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


_NO_EDGES = torch.empty(0, dtype=torch.float64)


def _host_edges(e) -> torch.Tensor:
    t = e if isinstance(e, torch.Tensor) else torch.as_tensor(e, dtype=torch.float64)
    if t.device.type != "cpu":
        raise ValueError("Monitor.step: histogram edges must be host values (a CPU tensor or a sequence); "
                         f"got a tensor on {t.device}")
    return t.detach().to(torch.float64)


@dataclass
class StepRecord:
    """One finished step, on the host."""

    step: int
    scalars: Dict[str, float] = field(default_factory=dict)
    #: name -> (edges [nbins + 1] float64, counts [nbins] int64), CPU tensors; a 2-D histogram
    #: given to ``Monitor.step(histograms=...)`` has edges (edges0, edges1) and counts [n0, n1].
    histograms: Dict[str, Tuple[Any, torch.Tensor]] = field(default_factory=dict)


@dataclass
class QuantityContext:
    """What a custom quantity sees at a step."""

    step: int
    names: List[str]                     # parameter names
    params: List[torch.Tensor]           # the parameters
    grads: List[Optional[torch.Tensor]]  # their .grad (None where none)
    losses: Optional[torch.Tensor]       # per-sample losses of the batch, when given
    extras: Dict[str, Any]               # the keyword arguments of Monitor.step


class Quantity(abc.ABC):
    """A user-defined quantity: a unique ``key`` and ``compute(ctx)`` returning a one-element
    tensor on the parameters' device (logged as ``<key>``) or a dict of them (``<key>/<name>``,
    or ``<key>`` for the name ""). Compute without host syncs (no ``.item()``): the values travel
    with the step's other results. A Python number is accepted too (placed on the device; a
    number computed from device tensors has already waited for the GPU). ``compute`` runs under
    ``torch.no_grad()``, only when due. The key has no "/" and is not a built-in record name
    ("loss", "grad_norm", ..., "grad_hist1d") or built-in key ("param_metrics", "grad_hist")."""

    key: str = ""

    @abc.abstractmethod
    def compute(self, ctx: QuantityContext) -> Union[torch.Tensor, Mapping[str, torch.Tensor]]:
        """The quantity's values at ``ctx.step``, as device tensors."""


Sink = Callable[[StepRecord], Any]

#: Keys of the per-sample families (Monitor(per_sample=..., per_sample_hist=...)); ``request``
#: and ``due`` take them.
PER_SAMPLE_KEY = "per_sample"
PER_SAMPLE_HIST_KEY = "per_sample_hist"
#: Key of the per-element gradient variance family (Monitor(grad_variance=...), SPEC.md §6), which
#: the per-sample hooks serve as well.
GRAD_VARIANCE_KEY = "grad_variance"
#: Key of the normalised step length (Monitor(alpha=...), SPEC.md §6), a two-step quantity.
ALPHA_KEY = "alpha"
#: Key of the curvature family (Monitor(curvature=...), SPEC.md §6), which needs a closure.
CURVATURE_KEY = "curvature"
#: ``curvature_options`` keys and defaults (see :func:`trainscope.curvature.curvature_stats`).
_CURVATURE_OPTIONS = {"which": None, "method": "hutchinson", "samples": 100, "solver": "lanczos", "max_iter": 100,
                      "max_params": 10_000, "seed": 0}
#: Every key the per-sample hooks serve: measured only by step(), never by measure_now().
_HOOK_KEYS = ("per_sample", "per_sample_hist", GRAD_VARIANCE_KEY, ALPHA_KEY)
#: Record names of the per-sample histograms.
PER_SAMPLE_HIST1D_NAME = "per_sample_grad_hist1d"
PER_SAMPLE_HIST2D_NAME = "per_sample_grad_hist2d"

#: ``per_sample_options`` keys and defaults (None: the Monitor's ``nbins`` / ``maxval``).
PER_SAMPLE_OPTIONS = {"layers": None, "method": "auto", "loss_reduction": "mean", "on_unsupported": "error",
                      "fuse_weight_grad": True, "batch_first": True, "nbins": None, "maxval": None, "hist2d": False,
                      "nbins_param": 100, "maxval_param": 1.0}


def _per_sample_options(options, nbins, maxval) -> Dict[str, Any]:
    """``per_sample_options`` checked, with defaults filled in; a bad entry is an error naming it."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"Monitor: per_sample_options must be a dict, got {type(options).__name__}")
    unknown = [k for k in options if k not in PER_SAMPLE_OPTIONS]
    if unknown:
        raise ValueError(f"Monitor: per_sample_options has the unknown key {unknown[0]!r}; the keys are "
                         f"{', '.join(PER_SAMPLE_OPTIONS)}")
    o = dict(PER_SAMPLE_OPTIONS, **options)
    from .per_sample_factors import FACTOR_METHODS, ON_UNSUPPORTED

    if o["method"] not in FACTOR_METHODS:
        raise ValueError(f"Monitor: per_sample_options['method'] must be one of {FACTOR_METHODS}, got {o['method']!r}")
    if o["loss_reduction"] not in ("mean", "sum"):
        raise ValueError(f"Monitor: per_sample_options['loss_reduction'] must be 'mean' or 'sum', "
                         f"got {o['loss_reduction']!r}")
    if o["on_unsupported"] not in ON_UNSUPPORTED:
        raise ValueError(f"Monitor: per_sample_options['on_unsupported'] must be one of {ON_UNSUPPORTED}, "
                         f"got {o['on_unsupported']!r}")
    o["nbins"], o["maxval"] = check_hist_axis(nbins if o["nbins"] is None else o["nbins"],
                                              maxval if o["maxval"] is None else o["maxval"],
                                              "per_sample_options['nbins']", "per_sample_options['maxval']",
                                              caller="Monitor")
    o["hist2d"] = check_bool(o["hist2d"], "per_sample_options['hist2d']", "Monitor")
    o["fuse_weight_grad"] = check_bool(o["fuse_weight_grad"], "per_sample_options['fuse_weight_grad']", "Monitor")
    o["batch_first"] = check_bool(o["batch_first"], "per_sample_options['batch_first']", "Monitor")
    o["nbins_param"], o["maxval_param"] = check_hist_axis(o["nbins_param"], o["maxval_param"],
                                                          "per_sample_options['nbins_param']",
                                                          "per_sample_options['maxval_param']", caller="Monitor")
    if o["hist2d"]:
        from .hist2d import hist2d_axes

        try:
            hist2d_axes(o["nbins"], o["maxval"], o["nbins_param"], o["maxval_param"])
        except ValueError as e:
            raise ValueError(f"Monitor: per_sample_options: {e}") from None
    return o


def hist_bin_edges_host(nbins: int, maxval: float) -> torch.Tensor:
    """The [nbins + 1] float64 bin edges on the host."""
    from .param_stats import hist_bin_edges

    return hist_bin_edges(nbins, maxval)


class _PerSampleQuantity(Quantity):
    """The six per-sample statistics (PER_SAMPLE_STATS, ``per_sample/<name>``) of the step's batch,
    from the Monitor's armed PerSampleHooks. A batch of one sample has none: NaN (warned once)."""

    key = PER_SAMPLE_KEY

    def __init__(self, monitor: "Monitor"):
        self._monitor = monitor
        self._warned_batch = False

    def compute(self, ctx) -> Dict[str, torch.Tensor]:
        from .per_sample_stats import PER_SAMPLE_STATS

        monitor = self._monitor
        if not monitor._per_sample_ready(ctx.step):
            return {}
        try:
            stats = monitor.per_sample_hooks.stats()
        except RuntimeError as e:  # a batch of one sample: no statistics, NaN in the record
            if "B >= 2" not in str(e):
                raise
            if not self._warned_batch:
                self._warned_batch = True
                warnings.warn(f"trainscope.Monitor: the batch of step {ctx.step} has fewer than 2 samples; the "
                              "per-sample statistics need at least 2 and are NaN", RuntimeWarning, stacklevel=4)
            return {name: float("nan") for name in PER_SAMPLE_STATS}
        out = {name: stats[name] for name in PER_SAMPLE_STATS}
        if stats.coverage is not None:  # on_unsupported="skip" left parameters out: say how much is covered
            out["covered_fraction"] = float(stats.coverage.fraction)
        return out


def _cabs_lr(optimizer) -> Optional[Callable[[], float]]:
    """How the Monitor reads η for ``cabs``: None without an optimizer; from a zero-momentum SGD's
    single learning rate (read at each due step, so schedulers are followed). Any other optimizer
    is refused: CABS (Balles et al. 2017) is derived for plain SGD."""
    if optimizer is None:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Monitor: optimizer must be a torch.optim.Optimizer (for cabs), got {type(optimizer).__name__}")
    groups = optimizer.param_groups
    plain = isinstance(optimizer, torch.optim.SGD) and all(
        g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 and not g.get("nesterov", False) for g in groups)
    if not plain:
        raise ValueError(f"Monitor: optimizer: cabs (grad_variance) is defined for SGD without momentum or weight "
                         f"decay, as Cockpit's CABS is; got {type(optimizer).__name__} "
                         f"{ {k: v for k, v in groups[0].items() if k in ('momentum', 'weight_decay', 'nesterov')} }. "
                         "Pass optimizer=None to record mean_gsnr and early_stopping alone")
    if len({float(g["lr"]) for g in groups}) > 1:
        raise ValueError("Monitor: optimizer: cabs needs one learning rate; its parameter groups have several")
    return lambda: float(groups[0]["lr"])


class _GradVarianceQuantity(Quantity):
    """``grad_variance/<quantity>`` (:data:`trainscope.GRAD_VARIANCE_STATS`; ``cabs`` only with an
    SGD optimizer and the per-sample losses) and, with per_tensor, ``grad_variance/<quantity>/<parameter>``,
    from the Monitor's armed PerSampleHooks."""

    key = GRAD_VARIANCE_KEY

    def __init__(self, monitor: "Monitor", lr: Optional[Callable[[], float]], per_tensor: bool):
        self._monitor, self._lr, self._per_tensor = monitor, lr, per_tensor

    def compute(self, ctx) -> Dict[str, torch.Tensor]:
        from .grad_variance import GRAD_VARIANCE_STATS, grad_variance_stats

        monitor = self._monitor
        if not monitor._per_sample_ready(ctx.step):
            return {}
        loss = ctx.losses.mean() if ctx.losses is not None and ctx.losses.numel() else None
        lr = self._lr() if self._lr is not None else None
        v = grad_variance_stats(monitor.per_sample_hooks.grad_moments(), loss=loss, lr=lr)
        names = [q for q in GRAD_VARIANCE_STATS if q != "cabs" or (loss is not None and lr is not None)]
        out = {q: v[q] for q in names}
        if self._per_tensor:
            for q in names:
                out.update({f"{q}/{p}": t for p, t in v.per_tensor[q].items()})
        if v.coverage is not None:
            out["covered_fraction"] = float(v.coverage.fraction)
        return out


class _AlphaQuantity(Quantity):
    """``alpha``: the normalised step length of the update made at a due step s (its start point),
    recorded with step s + 1 (its end point), from the Monitor's per-sample hooks: the per-sample
    losses and the per-sample gradients projected on the update d = θ_{s+1} − θ_s at both
    points (:mod:`trainscope.alpha`). θ_s is copied when the hooks are armed for step s."""

    key = ALPHA_KEY

    def __init__(self, monitor: "Monitor"):
        from .alpha import AlphaTracker

        self._monitor = monitor
        self._tracker = AlphaTracker(lambda step: True)  # the Monitor decides which steps start
        self._theta: Optional[Dict[str, torch.Tensor]] = None  # θ_s, copied when armed for a start
        self._direction: Optional[Dict[str, torch.Tensor]] = None  # d of the start waiting for its end
        self._warned = False

    def snapshot(self) -> None:
        m = self._monitor
        self._theta = {n: p.detach().clone() for n, p in zip(m.names, m.params)}

    def is_end(self, step: int) -> bool:
        return self._tracker.is_end(step)

    def compute(self, ctx) -> Dict[str, torch.Tensor]:
        monitor = self._monitor
        theta, self._theta = self._theta, None
        if not monitor._per_sample_ready(ctx.step) or ctx.losses is None or ctx.losses.numel() == 0:
            if ctx.losses is None and not self._warned:
                self._warned = True
                warnings.warn("trainscope.Monitor: alpha needs the per-sample losses; pass them to step()",
                              RuntimeWarning, stacklevel=4)
            self._tracker.reset()
            return {}
        hooks = monitor.per_sample_hooks
        losses = ctx.losses.detach().reshape(-1).to(torch.float64)
        out = {}
        if self._direction is not None and self._tracker.is_end(ctx.step):
            value = self._tracker.end(ctx.step, *_captured_point(losses, hooks.projections(self._direction),
                                                                 hooks.loss_reduction))
            if value is not None:
                out[""] = value.alpha
        self._direction = None
        if theta is not None and monitor._m.due(ALPHA_KEY, ctx.step):
            d = {n: p.detach() - theta[n] for n, p in zip(monitor.names, monitor.params)}
            sq = functools.reduce(torch.add, [t.to(torch.float64).square().sum() for t in d.values()])
            if self._tracker.start(ctx.step, *_captured_point(losses, hooks.projections(d), hooks.loss_reduction),
                                   sq):
                self._direction = d
        return out


def _captured_point(losses: torch.Tensor, projections: torch.Tensor, loss_reduction: str):
    """(losses, projections) of the samples the hooks captured. With the losses of several
    micro-batches (gradient accumulation), those of the last one, whose forward pass the hooks
    hold; under "mean" the loss backpropagated is the mean of all N losses, so the hooks' ∇ℓᵢ
    (scaled back by the micro-batch's n) are rescaled by N / n."""
    n, total = projections.shape[0], losses.shape[0]
    if total <= n:
        return losses, projections
    return losses[-n:], projections * (total / n) if loss_reduction == "mean" else projections


def _curvature_options(options) -> Dict[str, Any]:
    """``curvature_options`` checked, with defaults filled in; a bad entry is an error naming it."""
    from .curvature import CURVATURE_STATS, METHODS, SOLVERS

    o = dict(_CURVATURE_OPTIONS)
    if options is not None:
        if not isinstance(options, Mapping):
            raise TypeError(f"Monitor: curvature_options must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - set(o))
        if unknown:
            raise ValueError(f"Monitor: curvature_options has the unknown key {unknown[0]!r}; the keys are "
                             f"{sorted(o)}")
        o.update(options)
    if o["which"] is not None:
        if isinstance(o["which"], str) or not all(w in CURVATURE_STATS for w in o["which"]) or not o["which"]:
            raise ValueError(f"Monitor: curvature_options['which'] must be a non-empty list of names from "
                             f"{CURVATURE_STATS}, got {o['which']!r}")
        o["which"] = tuple(o["which"])
    if o["method"] not in METHODS:
        raise ValueError(f"Monitor: curvature_options['method'] must be one of {METHODS}, got {o['method']!r}")
    if o["solver"] not in SOLVERS:
        raise ValueError(f"Monitor: curvature_options['solver'] must be one of {SOLVERS}, got {o['solver']!r}")
    for k in ("samples", "max_iter", "max_params"):
        o[k] = check_int(o[k], f"curvature_options[{k!r}]", "Monitor", low=1)
    o["seed"] = check_int(o["seed"], "curvature_options['seed']", "Monitor")
    return o


class _CurvatureQuantity(Quantity):
    """``curvature/<quantity>`` (:data:`trainscope.curvature.CURVATURE_STATS`, and
    ``curvature/hess_trace_stderr`` for Hutchinson's estimate) at the parameters of the step() call,
    from the ``closure`` given to :meth:`Monitor.step`, which is called only on due steps."""

    key = CURVATURE_KEY

    def __init__(self, monitor: "Monitor", options: Dict[str, Any]):
        self._monitor, self._o = monitor, options
        self._warned = False
        self._fallback_warned = False
        self._refused_warned = False

    def compute(self, ctx) -> Dict[str, torch.Tensor]:
        from .curvature import curvature_stats

        closure = ctx.extras.get("closure")
        if closure is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"trainscope.Monitor: curvature is due at step {ctx.step} but step() got no closure "
                              "(closure=lambda: per-sample losses of the step's batch); not measured",
                              RuntimeWarning, stacklevel=4)
            return {}
        o, params = self._o, [p for p in self._monitor.layout.originals if p.requires_grad]
        generator = torch.Generator(device=params[0].device).manual_seed(o["seed"] + ctx.step)
        # The closure's forward pass is not the step's: armed per-sample hooks would take it for a
        # new step and drop the capture the per-sample families of this step read.
        hooks = self._monitor.per_sample_hooks
        armed = hooks is not None and hooks.enabled
        if armed:
            hooks.enabled = False
        try:
            with torch.enable_grad():
                c = curvature_stats(closure, params, which=o["which"], method=o["method"], samples=o["samples"],
                                    solver=o["solver"], max_iter=o["max_iter"], max_params=o["max_params"],
                                    generator=generator, model=self._monitor._model)
        except ValueError as e:
            if o["method"] != "piecewise_linear":
                raise
            # Refused by the graph of the closure's forward pass, which only a due step shows: the
            # run goes on, the family reads NaN, and a warning (once) says why.
            if not self._refused_warned:
                self._refused_warned = True
                warnings.warn(f"trainscope.Monitor: curvature not measured (NaN): {e}", RuntimeWarning, stacklevel=4)
            nan = torch.full((), math.nan, dtype=torch.float64, device=params[0].device)
            return {name: nan for name in (o["which"] or ("hess_max_ev", "hess_trace", "tic_diag", "tic_trace"))}
        finally:
            if armed:
                hooks.enabled = True
        out = {}
        for name in ("hess_max_ev", "hess_trace", "tic_diag", "tic_trace"):
            value = c[name]
            if o["which"] is None or name in o["which"]:
                out[name] = value
        if c.method == "hutchinson" and "hess_trace" in out:
            out["hess_trace_stderr"] = c["hess_trace_stderr"]
        if c.fallback_reason is not None and not self._fallback_warned:
            self._fallback_warned = True
            warnings.warn(f"trainscope.Monitor: curvature method 'auto' estimates (Hutchinson, "
                          f"curvature/hess_trace_stderr recorded) because the exact route does not apply: "
                          f"{c.fallback_reason}", RuntimeWarning, stacklevel=4)
        return out


class Monitor:
    """Parameter metrics, the gradient histogram and custom quantities of a model, each on its own
    schedule, handed to sinks without blocking the training step. See the module docs.

    - ``model_or_named_params``: an ``nn.Module`` (its parameters with ``requires_grad``) or an
      iterable of ``(name, tensor)``. Gradients are read from ``p.grad`` at every step.
    - ``param_metrics``, ``grad_hist``: a :class:`Schedule`, True (every step) or False/None (off).
    - ``metrics``: each built-in metric its own switch and schedule, ``{name: schedule, True or
      False}`` with names from :data:`BUILTIN_METRICS` (``loss``, the names of
      :data:`trainscope.METRICS`, ``nonfinite_count``), e.g. ``{"weight_magnitude": every(100),
      "distance": False}``; the metrics not named follow ``param_metrics``. A step's fused pass
      reads only the arrays its due metrics need, and θ₀ (θ_prev) is kept only while
      ``distance`` (``update_size`` or ``update_ratio``) is on.
    - ``nbins``, ``maxval``: the histogram (SPEC.md §4); ``per_tensor``: also ``<metric>/<name>``;
      ``weights_matrices_only``: global weight magnitude over tensors with dim >= 2.
    - ``track_init``, ``track_prev``: keep θ₀ / θ_prev (one parameter copy each) for ``distance``
      / ``update_size`` and ``update_ratio``; off, those names are absent from the records.
    - ``ring_slots``: steps in flight before ``step()`` waits for the oldest.
    - ``sinks``: callables taking a :class:`StepRecord` (e.g. :class:`JsonlSink`).
    - ``process_group``: the group to combine over under torch.distributed (default: the
      parameters' sharding group for FSDP2, else the default group when initialised);
      ``sinks_on_all_ranks``: hand records to the sinks on every rank, not only rank 0.
    - ``per_sample``, ``per_sample_hist`` (off): the per-sample gradient statistics of SPEC.md §2
      from layer factors, ``per_sample/<stat>`` for the six :data:`trainscope.PER_SAMPLE_STATS`
      (``grad_variance_trace`` and ``grad_sq_norm_unbiased`` are the two parts of the gradient
      noise scale, to smooth before dividing), and the per-sample gradient histogram
      ``per_sample_grad_hist1d`` (with ``per_sample_options={"hist2d": True}`` also
      ``per_sample_grad_hist2d``, per-sample gradient against parameter value), recorded as
      histograms given to :meth:`step` are. The model must be an ``nn.Module`` (the C++
      Monitor, whose modules have no hooks, takes the layers' inputs and outputs from the forward
      pass instead: ``Monitor::capture_linear`` / ``capture_conv2d``). Either on, the Monitor attaches one
      :class:`trainscope.PerSampleHooks` to the model (at construction: a layer it cannot handle
      is an error then) and **arms** it only for steps where a per-sample family is due, so a
      plain loop needs nothing but ``mon.step(step, losses)`` and an undue step captures nothing.
      The rule: armed at construction iff step 0 is due (and after ``load_state_dict`` iff the
      step after the restored one is); after ``step(s)``, armed iff step s + 1 is due;
      ``request("per_sample")`` (or ``"per_sample_hist"``) arms at once, for the next step's
      forward pass. What is captured is every forward pass with grad enabled from arming to the
      backward (under ``torch.no_grad()`` nothing); a run whose first step is not step 0 and is
      due is captured only from ``request()`` on. A due step with nothing captured (armed too
      late) has no per-sample values in its record, and a warning says so once; a batch of one
      sample records NaN. :meth:`measure_now` never measures them (they need the step's own
      backward pass). ``per_sample_options``: ``layers`` (the layers to track, modules or names;
      None: every layer holding trainable parameters, all of which must be of
      :data:`trainscope.SUPPORTED_LAYERS`), ``on_unsupported`` ("error"; "skip": measure the
      supported layers, and record ``per_sample/covered_fraction``, the share of the trainable
      parameter count the statistics cover; "vmap": measure the other modules by torch.func, see
      :class:`trainscope.PerSampleHooks`), ``method`` (:data:`trainscope.per_sample_factors.FACTOR_METHODS`), ``loss_reduction`` ("mean":
      the loss is the mean of the per-sample losses, torch's default; "sum"), ``nbins`` and
      ``maxval`` of the per-sample histogram (default: the Monitor's), ``hist2d`` (False),
      ``nbins_param`` and ``maxval_param`` (100, 1.0) of its parameter axis, ``fuse_weight_grad``
      (True: on steps whose statistics are due, a Linear or Conv2d measured alone takes its
      statistics' parts and its weight gradient together on the backward pass, without a
      weight-gradient GEMM of its own; see :class:`trainscope.PerSampleHooks`), ``batch_first``
      (True; False for a model in torch's sequence-first layout, [T, B, ...]: see
      :class:`trainscope.PerSampleHooks`). The 2-D histogram
      pairs the per-sample gradients with the parameter values at ``step()``, i.e. after the
      optimizer step when ``step()`` is called after it (as ``weight_magnitude`` measures them);
      :meth:`close` (or leaving ``with Monitor(...)``) removes the hooks. Under torch.distributed
      the per-sample results are collectives over the default group (every rank calls ``step()``
      alike).
    - ``grad_variance`` (off): the per-element gradient variance family of SPEC.md §6 from the
      same hooks (armed by the same rule; ``per_sample_options`` apply):
      ``grad_variance/mean_gsnr``, ``grad_variance/early_stopping`` and, with ``optimizer`` (an
      SGD without momentum or weight decay, η read at each due step; any other optimizer is
      refused at construction) and the step's per-sample ``losses``, ``grad_variance/cabs``;
      with ``per_tensor`` also ``grad_variance/<quantity>/<parameter>``. See
      :mod:`trainscope.grad_variance`.
    - ``alpha`` (off): the normalised step length of SPEC.md §6 (Cockpit's ``Alpha``), a two-step
      quantity: a due step s is the start point (θ_s is copied when the hooks are armed for it),
      step s + 1 its end point (the hooks are armed for it too), and ``alpha`` is recorded with
      step s + 1's record, the α of the update made at step s. Needs the per-sample ``losses`` at
      both steps (with gradient accumulation, every micro-batch's, as a list or concatenated:
      alpha, like the hooks, describes the last micro-batch, the backpropagated loss being the
      mean of all of them under ``loss_reduction="mean"``, as when each micro-batch's mean loss is
      divided by their number); from the per-sample hooks (``per_sample_options`` apply). See
      :mod:`trainscope.alpha`.
    - ``curvature`` (off): the curvature family of SPEC.md §6 (``curvature/hess_max_ev``,
      ``curvature/hess_trace`` with ``curvature/hess_trace_stderr`` when estimated,
      ``curvature/tic_diag``, ``curvature/tic_trace``), which needs second derivatives: on a due
      step, :meth:`step` calls its ``closure`` argument, which must recompute the loss with a
      fresh forward pass on the step's batch (return the per-sample losses [B] for the TIC pair;
      a mean loss gives the Hessian quantities alone) at the current parameters, i.e. after the
      optimizer step when ``step()`` follows it. Steps that are not due never call it, so only
      due steps pay. ``curvature_options``: ``which`` (None: every quantity the closure allows),
      ``method`` ("hutchinson": unbiased estimates with their standard error; "exact": one
      Hessian-vector product per parameter element, small models only, up to ``max_params``;
      "piecewise_linear": exact from layer factors for networks linear in each parameter
      element, such as ReLU/max-pool CNNs and MLPs, one backward pass per output dimension;
      parameters outside the layers it covers are an error at construction, and a graph that is
      not piecewise linear, seen at the first due step, reads NaN with one warning saying why;
      "auto": that where it applies, else Hutchinson with a warning saying why),
      ``samples`` (Hutchinson probes, 100), ``solver`` (of ``hess_max_ev``: "lanczos", or
      Cockpit's "power" iteration), ``max_iter`` (its products, 100), ``seed`` (0; the
      probes of step s use seed + s). See :mod:`trainscope.curvature`. A due step without a
      closure is skipped with a warning, never an error.

    Parameter names are the model's own, without the prefixes wrappers add (``_orig_mod.`` of
    torch.compile, ``module.`` of DDP, ...; :func:`trainscope.distributed.clean_param_name`), so a
    compiled model logs the same names as the eager one; ``(name, tensor)`` pairs keep theirs.
    """

    def __init__(self, model_or_named_params, param_metrics: ScheduleLike = True, grad_hist: ScheduleLike = True,
                 nbins: int = 100, maxval: float = 0.05, per_tensor: bool = True,
                 weights_matrices_only: bool = False, track_init: bool = True, track_prev: bool = True,
                 ring_slots: int = 64, sinks: Sequence[Sink] = (), process_group=None,
                 sinks_on_all_ranks: bool = False, metrics: Optional[Mapping[str, ScheduleLike]] = None,
                 per_sample: ScheduleLike = None, per_sample_hist: ScheduleLike = None,
                 per_sample_options: Optional[Mapping[str, Any]] = None, grad_variance: ScheduleLike = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, alpha: ScheduleLike = None,
                 curvature: ScheduleLike = None, curvature_options: Optional[Mapping[str, Any]] = None):
        specs = (_spec(param_metrics, "param_metrics"), _spec(grad_hist, "grad_hist"))
        ps_specs = {PER_SAMPLE_KEY: _spec(per_sample, "per_sample"),
                    PER_SAMPLE_HIST_KEY: _spec(per_sample_hist, "per_sample_hist"),
                    GRAD_VARIANCE_KEY: _spec(grad_variance, "grad_variance"),
                    ALPHA_KEY: _spec(alpha, "alpha")}
        ps_specs = {k: v for k, v in ps_specs.items() if v != "off"}
        ps_options = _per_sample_options(per_sample_options, nbins, maxval)
        curvature_spec = _spec(curvature, "curvature")
        curvature_opts = _curvature_options(curvature_options)
        from .curvature import FACTOR_METHODS

        if curvature_spec != "off" and curvature_opts["method"] in FACTOR_METHODS:
            if not isinstance(model_or_named_params, nn.Module):
                raise ValueError(f"Monitor: curvature_options['method']={curvature_opts['method']!r} needs the model "
                                 "as an nn.Module (its forward pass is watched), got (name, tensor) pairs")
            if curvature_opts["method"] == "piecewise_linear":  # what can be known before a forward pass
                from ._curvature_factors import layers_of

                layers_of(model_or_named_params, [p for p in model_or_named_params.parameters() if p.requires_grad],
                          "Monitor: curvature_options['method']='piecewise_linear'")
        self._model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
        cabs_lr = _cabs_lr(optimizer) if GRAD_VARIANCE_KEY in ps_specs else None
        if ps_specs and not isinstance(model_or_named_params, nn.Module):
            raise ValueError(f"Monitor: {' and '.join(ps_specs)} need the model as an nn.Module (the per-sample "
                             "statistics come from hooks on its layers), got (name, tensor) pairs")
        metric_specs = _metric_specs(metrics, "Monitor")
        flags = [check_bool(v, n, "Monitor") for v, n in ((per_tensor, "per_tensor"),
                                                          (weights_matrices_only, "weights_matrices_only"),
                                                          (track_init, "track_init"), (track_prev, "track_prev"))]
        hist_axis = check_hist_axis(nbins, maxval, caller="Monitor")
        ring_slots = check_int(ring_slots, "ring_slots", "Monitor", low=1)
        sinks_on_all_ranks = check_bool(sinks_on_all_ranks, "sinks_on_all_ranks", "Monitor")
        sinks = () if sinks is None else sinks
        if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable) or callable(sinks):
            raise TypeError(f"Monitor: sinks must be a list of callables, got {type(sinks).__name__}")
        self.layout = _dist.param_layout(_named_params_arg(model_or_named_params), group=process_group)
        if not self.layout.names:
            raise ValueError("Monitor: model_or_named_params has no trainable parameters (none with requires_grad)")
        self.names: List[str] = list(self.layout.names)
        self.params: List[torch.Tensor] = list(self.layout.params)  # this rank's tensors
        self.rank, self.world_size = _dist.rank_and_size(self.layout.group)
        across = self.world_size > 1 or self.layout.any_sharded
        # DTensor gradients live on the DTensors, not on their local tensors: passed at each step.
        self._grads_from_layout = any(p is not q for p, q in zip(self.layout.originals, self.layout.params))
        self._m = torch.classes.trainscope.Monitor(
            self.names, self.params, *specs, *hist_axis, *flags, ring_slots,
            self.layout.process_group if self.world_size > 1 else "",
            list(self.layout.placements) if across else [], list(self.layout.full_dims) if across else [],
            sinks_on_all_ranks, list(metric_specs), list(metric_specs.values()))
        self._quantities: List[Quantity] = []
        self._sinks: List[Sink] = []
        for s in sinks:
            self.add_sink(s)
        if curvature_spec != "off":  # no hooks: a closure on due steps
            self._m.add_external_quantity(CURVATURE_KEY, curvature_spec)
            self._quantities.append(_CurvatureQuantity(self, curvature_opts))
        # Per-sample statistics: hooks on the model, armed for due steps alone.
        self.per_sample_hooks = None
        self._alpha: Optional[_AlphaQuantity] = None
        self._ps_keys: Tuple[str, ...] = tuple(ps_specs)
        self._ps_options = ps_options
        self._ps_warned = False
        if ps_specs:
            from .per_sample_factors import PerSampleHooks

            self.per_sample_hooks = PerSampleHooks(model_or_named_params, ps_options["layers"],
                                                   method=ps_options["method"],
                                                   loss_reduction=ps_options["loss_reduction"],
                                                   on_unsupported=ps_options["on_unsupported"],
                                                   fuse_weight_grad=ps_options["fuse_weight_grad"],
                                                   batch_first=ps_options["batch_first"])
            for key, spec in ps_specs.items():
                self._m.add_external_quantity(key, spec)
            if PER_SAMPLE_KEY in ps_specs:
                self._quantities.append(_PerSampleQuantity(self))
            if GRAD_VARIANCE_KEY in ps_specs:
                self._quantities.append(_GradVarianceQuantity(self, cabs_lr, flags[0]))
            self._alpha = _AlphaQuantity(self) if ALPHA_KEY in ps_specs else None
            if self._alpha is not None:
                self._quantities.append(self._alpha)
            self._ps_hist_edges = hist_bin_edges_host(ps_options["nbins"], ps_options["maxval"])
            if ps_options["hist2d"]:
                self._ps_hist2d_edges = (self._ps_hist_edges,
                                         hist_bin_edges_host(ps_options["nbins_param"], ps_options["maxval_param"]))
            self._arm_per_sample(0)  # the first step's number is not known yet: step 0

    # -- configuration ---------------------------------------------------------------------------

    def add_quantity(self, quantity: Quantity, schedule: ScheduleLike = True) -> None:
        """Registers a custom quantity under its unique ``key`` (a duplicate raises)."""
        key = getattr(quantity, "key", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"Monitor.add_quantity: {type(quantity).__name__} has no key; set a non-empty `key`")
        if not callable(getattr(quantity, "compute", None)):
            raise TypeError(f"Monitor.add_quantity: quantity {key!r} has no compute(ctx)")
        spec = _spec(schedule, "schedule")
        # Switched off: the key stays reserved, and never due.
        self._m.add_external_quantity(key, "at:" if spec == "off" else spec)
        self._quantities.append(quantity)

    def add_sink(self, sink: Sink) -> None:
        if not callable(sink):
            raise TypeError(f"Monitor.add_sink: sink must be callable, got {type(sink).__name__}")
        self._sinks.append(sink)

    def request(self, key: str) -> None:
        """Makes ``key`` due at the next step: "param_metrics" (every built-in metric), a built-in
        metric's name, "grad_hist" or a quantity's key ("per_sample", "per_sample_hist": the
        per-sample hooks are armed at once, for the next step's forward pass)."""
        self._m.request(str(key))
        if str(key) in self._ps_keys:
            self.per_sample_hooks.enabled = True
            self.per_sample_hooks.stats_due = self.per_sample_hooks.stats_due or str(key) == PER_SAMPLE_KEY
            if str(key) == ALPHA_KEY:
                self._alpha.snapshot()

    def due(self, key: str, step: int) -> bool:
        return bool(self._m.due(str(key), int(step)))

    # -- the training step -----------------------------------------------------------------------

    def step(self, step: int, losses: Optional[torch.Tensor] = None,
             histograms: Optional[Mapping[str, Tuple[torch.Tensor, Any]]] = None, **extras) -> None:
        """After ``optimizer.step()``: launches this step's work and hands finished steps to the
        sinks. ``losses`` are the batch's per-sample losses; ``extras`` reach custom quantities
        (``closure``: the curvature family's, called only when it is due).
        ``histograms`` records histograms computed on the device this step (e.g. from
        :class:`trainscope.PerSampleHooks`): ``{name: (counts, edges)}`` with int64 counts [n] and
        n + 1 edges, or counts [n0, n1] and ``(edges0, edges1)``; edges are host values (a CPU
        tensor or a sequence: reading device edges would wait for the GPU)."""
        step = check_int(step, "step", "Monitor.step")
        if self.per_sample_hooks is not None:
            histograms = self._per_sample_histograms(step, histograms)
        alpha = self._alpha
        args = self._launch_args("Monitor.step", step, losses, histograms, extras,
                                 lambda q: self._m.due(q.key, step) or (q is alpha and alpha.is_end(step)))
        try:
            self._m.step(step, *args)
        finally:
            if self.per_sample_hooks is not None:
                self.per_sample_hooks.clear()  # this step's captures are used: free them
                self._arm_per_sample(step + 1)  # after step(): its requests are spent
        self._dispatch(self._m.take_records())  # the steps that finished before this one

    # -- per-sample statistics --------------------------------------------------------------------

    def _arm_per_sample(self, next_step: int) -> None:
        """Arms the per-sample hooks iff a per-sample family is due at ``next_step``."""
        if self.per_sample_hooks is not None:
            alpha = self._alpha
            start = alpha is not None and self._m.due(ALPHA_KEY, next_step)
            if start:
                alpha.snapshot()  # θ at the start step, before its optimizer step
            self.per_sample_hooks.enabled = start or (alpha is not None and alpha.is_end(next_step)) or any(
                self._m.due(k, next_step) for k in self._ps_keys)
            # The statistics' parts then come with the weight gradients on the backward pass.
            self.per_sample_hooks.stats_due = PER_SAMPLE_KEY in self._ps_keys and self._m.due(PER_SAMPLE_KEY, next_step)

    def _per_sample_ready(self, step: int) -> bool:
        """Whether the hooks hold this step's capture; a due step without one is warned about once."""
        if self.per_sample_hooks.captured:
            return True
        if not self._ps_warned:
            self._ps_warned = True
            warnings.warn(f"trainscope.Monitor: per-sample statistics are due at step {step}, but no forward and "
                          "backward pass was captured since the hooks were armed (armed after step(s) for step "
                          "s + 1, at construction for step 0, by request() at once); they are absent from this "
                          "record", RuntimeWarning, stacklevel=4)
        return False

    def _per_sample_histograms(self, step: int, histograms):
        """``histograms`` with the per-sample histograms added when per_sample_hist is due."""
        if PER_SAMPLE_HIST_KEY not in self._ps_keys or not self._m.due(PER_SAMPLE_HIST_KEY, step):
            return histograms
        names = [PER_SAMPLE_HIST1D_NAME] + ([PER_SAMPLE_HIST2D_NAME] if self._ps_options["hist2d"] else [])
        taken = [n for n in names if n in (histograms or {})]
        if taken:
            raise ValueError(f"Monitor.step: histograms has the name {taken[0]!r}, which the per-sample "
                             "histograms (per_sample_hist) record; choose another name")
        if not self._per_sample_ready(step):
            return histograms
        o, hooks = self._ps_options, self.per_sample_hooks
        out = dict(histograms or {})
        out[PER_SAMPLE_HIST1D_NAME] = (hooks.grad_hist1d(o["nbins"], o["maxval"]), self._ps_hist_edges)
        if o["hist2d"]:
            counts, _ = hooks.grad_hist2d(o["nbins"], o["maxval"], o["nbins_param"], o["maxval_param"])
            out[PER_SAMPLE_HIST2D_NAME] = (counts, self._ps_hist2d_edges)
        return out

    def close(self) -> None:
        """Removes the per-sample hooks from the model (nothing else changes; the Monitor stays
        usable without per-sample statistics)."""
        if self.per_sample_hooks is not None:
            self.per_sample_hooks.remove()

    def measure_now(self, step: int, losses: Optional[torch.Tensor] = None, *,
                    metrics: Optional[Iterable[str]] = None, gradients: bool = False,
                    histograms: Optional[Mapping[str, Tuple[torch.Tensor, Any]]] = None, **extras) -> None:
        """Measures now, outside every schedule, and records it as step ``step``: at a task
        boundary, or at the start or end of an epoch. θ_prev and pending requests are left as
        they are, so the next :meth:`step` measures as if this call had not happened.

        ``metrics``: names to measure: built-in metric names (``loss``, ``grad_norm``,
        ``grad_magnitude``, ``weight_magnitude``, ``weight_norm``, ``distance``,
        ``nonfinite_count``; ``update_size`` and ``update_ratio`` are skipped), ``"grad_hist"``,
        ``"param_metrics"`` (every built-in metric) or custom quantities' keys; None: every
        built-in metric that is on, the histogram when on, and every custom quantity. The
        gradient metrics and the histogram only with ``gradients=True`` (the parameters'
        ``.grad`` are this point's gradients); otherwise they are absent from the record, never
        stale. ``update_size`` and ``update_ratio`` belong to an optimizer step and are never
        measured here. An unknown name, or a metric that is off, raises ValueError naming it.
        ``losses``, ``histograms`` and ``extras`` as in :meth:`step`."""
        step = check_int(step, "step", "Monitor.measure_now")
        gradients = check_bool(gradients, "gradients", "Monitor.measure_now")
        if metrics is not None:
            if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Iterable):
                raise TypeError(f"Monitor.measure_now: metrics must be a list of names, got {metrics!r}")
            metrics = [str(m) for m in metrics]
        per_sample = [m for m in (metrics or ()) if m in _HOOK_KEYS]
        if per_sample:
            raise ValueError(f"Monitor.measure_now: metrics names {per_sample[0]!r}, but the per-sample statistics "
                             "are never measured here: they need the step's own forward and backward pass "
                             "(request() it for the next step instead)")
        keys = {q.key for q in self._quantities}
        if metrics is None:
            def wanted(q):  # curvature only when named (it needs a closure)
                return q.key not in _HOOK_KEYS and q.key != CURVATURE_KEY
            builtin = []
        else:
            named = set(metrics)
            def wanted(q):
                return q.key in named
            builtin = [m for m in metrics if m not in keys]
        try:
            args = self._launch_args("Monitor.measure_now", step, losses, histograms, extras, wanted)
            self._m.measure_now(step, args[0], metrics is None, builtin, gradients, *args[1:])
        except RuntimeError as e:
            if "trainscope::Monitor::measure_now:" in str(e):
                raise ValueError(str(e).split("\n")[0]) from None
            raise
        self._dispatch(self._m.take_records())

    def _launch_args(self, caller: str, step: int, losses, histograms, extras, due):
        """What step() and measure_now() hand to the C++ Monitor after the losses: (losses, the
        due Python quantities' values, histogram names, counts, edges, second edges, gradients)."""
        losses = _losses_tensor(losses, self.params[0].device)
        if histograms is not None and not isinstance(histograms, Mapping):
            raise TypeError(f"{caller}: histograms must be a dict {{name: (counts, edges)}}, "
                            f"got {type(histograms).__name__}")
        scalars: Dict[str, torch.Tensor] = {}
        ctx = None
        grads = self.layout.grads()
        for q in self._quantities:
            if not due(q):
                continue
            if ctx is None:
                ctx = QuantityContext(step, self.names, self.params, grads, losses, dict(extras))
            with torch.no_grad():
                out = q.compute(ctx)
            items = out if isinstance(out, Mapping) else {"": out}
            for sub, t in items.items():
                name = f"{q.key}/{sub}" if sub else q.key
                scalars[name] = self._scalar(t, q.key, name)
        names, counts, edges, edges2 = [], [], [], []
        for name, h in (histograms or {}).items():
            if not (isinstance(h, (tuple, list)) and len(h) == 2 and isinstance(h[0], torch.Tensor)):
                raise TypeError(f"{caller}: histograms[{name!r}] must be a pair (counts tensor, edges), "
                                f"got {type(h).__name__}")
            c, e = h
            two_d = isinstance(e, (tuple, list)) and len(e) == 2 and not isinstance(e[0], numbers.Real)
            names.append(str(name))
            counts.append(c.detach())
            edges.append(_host_edges(e[0] if two_d else e))
            edges2.append(_host_edges(e[1]) if two_d else _NO_EDGES)
        return (losses, scalars, names, counts, edges, edges2,
                [None if g is None else g.detach() for g in grads] if self._grads_from_layout else [])

    def _scalar(self, value, key: str, name: str) -> torch.Tensor:
        """One value a quantity gave, as a 0-d float64 tensor on the parameters' device."""
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.detach().reshape(()).to(torch.float64)
        if isinstance(value, numbers.Real):  # fill, not a copy: no wait for the device
            return torch.full((), float(value), dtype=torch.float64, device=self.params[0].device)
        what = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
        raise ValueError(f"Monitor.step: quantity {key!r} gave {name!r} = {type(value).__name__}{what}; "
                         "return one-element tensors on the parameters' device (or numbers)")

    def poll(self) -> int:
        """Hands every finished step to the sinks without waiting; returns how many."""
        return self._dispatch(self._m.poll_records())

    def flush(self, *, errors: str = "raise") -> None:
        """Waits for every step in flight and hands it to the sinks, then calls ``flush()`` of the
        sinks that have one (:class:`TensorBoardSink`), so that their files are complete.
        ``errors="warn"``: an error on the way (the device, a sink) becomes a warning and every
        record that can still be delivered is; for a run that is already failing."""
        if errors not in ("raise", "warn"):
            raise ValueError(f"Monitor.flush: errors must be 'raise' or 'warn', got {errors!r}")
        if errors == "raise":
            self._dispatch(self._m.flush_records())
            self._flush_sinks()
            return
        try:
            self._dispatch(self._m.flush_records())
        except Exception as e:  # noqa: BLE001  (the run is failing already: say it, do not raise over it)
            warnings.warn(f"trainscope.Monitor: not every step in flight reached the sinks: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)
            try:  # the steps the device finished before the error
                self._dispatch(self._m.take_records())
            except Exception:  # noqa: BLE001
                pass
        try:
            self._flush_sinks()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"trainscope.Monitor: flushing a sink failed: {type(e).__name__}: {e}", RuntimeWarning,
                          stacklevel=2)

    def collect_captured(self, step: int) -> None:
        """After replaying a graph that captured ``step()``: queues the captured values as ``step``."""
        self._m.collect_captured(check_int(step, "step", "Monitor.collect_captured"))
        self._dispatch(self._m.take_records())

    def _dispatch(self, records) -> int:
        # Every record reaches every sink even when one sink raises; the first error is raised after.
        error = None
        for step, names, values, hist_names, edges, counts, edges2 in records:
            rec = StepRecord(int(step), dict(zip(names, values)),
                             {n: ((e, e2) if e2.numel() else e, c)
                              for n, e, c, e2 in zip(hist_names, edges, counts, edges2)})
            for sink in self._sinks:
                try:
                    sink(rec)
                except Exception as e:  # noqa: BLE001
                    error = error or e
        if error is not None:
            raise error
        return len(records)

    def _flush_sinks(self) -> None:
        for sink in self._sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self, param_copies: bool = True) -> Dict[str, Any]:
        """What a run resumed from a checkpoint needs to continue its curves: ``names``, θ₀
        (``init``) and θ_prev (``prev``), one tensor per parameter (the Monitor's own tensors, as
        ``nn.Module.state_dict`` gives its own: save them before the next ``step()``), the pending
        ``requested`` keys, the latest ``step`` (None before the first), and the ``rank`` and
        ``world_size`` it was taken on. Schedules are functions of the step and have no state.
        ``param_copies=False`` leaves θ₀ and θ_prev out (empty lists): a checkpoint then costs no
        parameter copies, and a Monitor loading it keeps the ones it took at construction."""
        names, init, prev, requested, has_step, step, rank, world_size = self._m.state_dict(
            check_bool(param_copies, "param_copies", "Monitor.state_dict"))
        return {"names": list(names), "init": list(init), "prev": list(prev), "requested": list(requested),
                "step": int(step) if has_step else None, "rank": int(rank), "world_size": int(world_size)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` (e.g. on a Monitor rebuilt on the model loaded from a
        checkpoint): θ₀ and θ_prev are copied in, pending requests restored. A state of other
        parameters (names, order or shapes differ), or one holding sharded parameters' shards
        from another rank, is an error naming what differs, raised before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"Monitor.load_state_dict: state must be a dict from state_dict(), got "
                            f"{type(state).__name__}")
        missing = [k for k in ("names", "init", "prev", "requested") if k not in state]
        if missing:
            raise ValueError(f"Monitor.load_state_dict: state lacks {missing}; give a dict from Monitor.state_dict()")
        step = state.get("step")
        self._m.load_state_dict([str(n) for n in state["names"]], list(state["init"]), list(state["prev"]),
                                [str(k) for k in state["requested"]], step is not None,
                                0 if step is None else check_int(step, "state['step']", "Monitor.load_state_dict"),
                                int(state.get("rank", 0)), int(state.get("world_size", 1)))
        if step is not None:
            self._arm_per_sample(int(step) + 1)
        elif any(k in self._ps_keys for k in state["requested"]):
            self._arm_per_sample(0)

    @property
    def writes_records(self) -> bool:
        """Whether this process hands records to the sinks (rank 0, or ``sinks_on_all_ranks``)."""
        return bool(self._m.writes_records())

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving by an exception: the steps in flight still reach the sinks, and a second error
        # on the way (the device that failed, a sink) is a warning, not raised over the first.
        try:
            self.flush(errors="raise" if exc_type is None else "warn")
        finally:
            self.close()


def _named_params_arg(value):
    """``model_or_named_params`` checked: an nn.Module, or (name, tensor) pairs as a list."""
    if isinstance(value, nn.Module):
        return value
    if value is None or isinstance(value, (str, bytes, torch.Tensor, Mapping)) or not isinstance(value, Iterable):
        hint = "; for a dict use .items()" if isinstance(value, Mapping) else ""
        raise TypeError("Monitor: model_or_named_params must be an nn.Module or an iterable of (name, tensor) "
                        f"pairs (e.g. model.named_parameters()), got {type(value).__name__}{hint}")
    pairs = list(value)
    for i, item in enumerate(pairs):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"Monitor: model_or_named_params[{i}] must be a (name, tensor) pair, got "
                            f"{type(item).__name__}; pass model.named_parameters(), not model.parameters()")
    return pairs


# -- file sinks: the C++ JsonlSink and CsvSink (src/monitor.cpp), one implementation of each format --

class _FileSink:
    _kind = ""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = check_path(path, "path", type(self).__name__)
        self._sink = torch.classes.trainscope.FileSink(self._kind, self.path)

    def __call__(self, record: StepRecord) -> None:
        names = list(record.scalars)
        hist_names = list(record.histograms)
        edges, counts, edges2 = [], [], []
        for n in hist_names:
            e, c = record.histograms[n]
            two_d = isinstance(e, (tuple, list))
            edges.append(e[0] if two_d else e)
            edges2.append(e[1] if two_d else _NO_EDGES)
            counts.append(c)
        self._sink.write(int(record.step), names, [float(record.scalars[n]) for n in names], hist_names,
                         edges, counts, edges2)


class JsonlSink(_FileSink):
    """Appends one JSON object per step: {"step": s, "scalars": {...}, "histograms": {"<name>":
    {"edges": [...], "counts": [...]}}}, NaN and ±Inf as null; flushes after each record."""

    _kind = "jsonl"


class CsvSink(_FileSink):
    """Appends long-format rows ``step,name,value`` (header when the file is empty), one per
    scalar; NaN and ±Inf as nan, inf, -inf; histograms are not written. Flushes per record."""

    _kind = "csv"
