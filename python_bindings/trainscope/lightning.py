"""PyTorch Lightning callbacks: trainscope's metrics through the trainer's loggers.

    import trainscope.lightning as tsl
    trainer = L.Trainer(callbacks=[tsl.TrainscopeCallback()], logger=TensorBoardLogger("runs"))

:class:`TrainscopeCallback` owns a :class:`trainscope.Monitor` over the module's trainable
parameters and, by default, logs every parameter metric (globally and per tensor) and the 1-D
gradient histogram at every optimizer step. Scalars reach every logger of the trainer through
``log_metrics`` as ``<prefix>/<metric>`` and ``<prefix>/<metric>/<parameter name>``; histograms
reach TensorBoard loggers as real histograms (``add_histogram_raw``). The per-sample gradient
statistics and histograms, the gradient variance, alpha, the curvature and the representation
metrics are off by default; give them a schedule to turn them on.
:class:`ParamMetricsCallback`, :class:`HistogramCallback`, :class:`PerSampleStatsCallback` and
:class:`RepresentationCallback` are the same callback with one family each.

When it runs: in ``on_train_batch_end`` of a batch that took an optimizer step. There the
parameters are already updated and the gradients still present (Lightning zeroes them in the next
batch's closure, just before its backward). Batches that only accumulate gradients are skipped, so
with ``accumulate_grad_batches=k`` a step is measured once, with the accumulated gradients. The
step number is the 0-based index of that optimizer step, ``trainer.global_step - 1`` (Lightning has
already counted it), which is the step Lightning logs that batch's ``self.log`` values under.
Schedules (``trainscope.every(k)``, ...) count these step numbers; Lightning's
``log_every_n_steps`` does not apply.

Epoch schedules (:func:`at_epoch_start`, :func:`at_epoch_end`, :func:`every_n_epochs`) count
epochs (``trainer.current_epoch``) and can replace the step schedule of any family and of any
entry of ``metrics=``; the Monitor measures them with ``Monitor.measure_now``, outside its step
schedules (θ_prev and pending requests untouched):

- at an epoch's start, in ``on_train_epoch_start``: before the epoch's first optimizer step, on
  the parameters the epoch starts from (epoch 0: the untrained network), logged at the step the
  epoch starts with, ``trainer.global_step``. The parameter metrics measure the parameters
  (weight_magnitude, weight_norm, distance); the gradient metrics (grad_norm, grad_magnitude,
  nonfinite_count, the histogram) and the loss do not exist there and are absent from the record
  (never the previous epoch's); update_size and update_ratio are absent.
- at an epoch's end, in ``on_train_epoch_end``: after its last optimizer step, logged at that
  step (``trainer.global_step - 1``), with that step's gradients and loss when the epoch took a
  step (else without them); update_size and update_ratio are absent.
- the per-sample statistics need a backward pass: at an epoch's start they are those of its first
  optimizer step (its gradients are taken at the parameters the epoch starts from), at its end
  those of the batch taking its last step (the epoch's last batch, ``batch_idx + 1 ==
  trainer.num_training_batches``, or the step reaching ``max_steps``), logged at that step. When
  the epoch's length is unknown (a dataloader without ``len``), the last step cannot be told in
  advance and the per-sample statistics are not measured at epoch ends (a warning says so once).

A record at an epoch's start carries the same step number as the record of the epoch's first
step (the one holds the parameters before the step, the other after); they never share a name,
since each metric has one schedule.

Nothing here waits for the GPU: ``Monitor.step`` only queues work, and the values of a step are
logged a few steps later, when the device has finished them (all of them by the end of ``fit``,
and, when ``fit`` ends by an exception, in ``on_exception``, before the loggers are finalised).

Checkpoints: the callbacks save θ₀ and θ_prev (a copy of the trainable parameters each) and
pending requests in Lightning checkpoints (``state_dict``), so a run resumed with
``fit(ckpt_path=...)`` continues its ``distance`` and ``update_size`` curves (alpha's pending start,
a due step whose end point is the next step, is not saved: a run resumed between the two records
no alpha for it). With
``checkpoint_param_copies=False`` the copies are left out: checkpoints cost nothing extra, and a
resumed run measures ``distance`` from the parameters it resumes from (as does a resumed FSDP
run, whose shards are never copied: Lightning keeps rank 0's callback state only). The Monitor is built in
``on_train_start``, after Lightning has restored the checkpoint (some strategies restore after
``on_fit_start``), so θ₀ and θ_prev are never taken from parameters about to be overwritten.
After ``fit`` the state is kept on the host (as Lightning moves the module there), for a
``trainer.save_checkpoint`` after ``fit``.

Multi-process strategies (DDP, FSDP): every rank measures, and only the global-zero process logs
(to the loggers and to ``sinks``). The Monitor combines over the ranks by itself (see
:mod:`trainscope.distributed`): DDP's replicated parameters count once, FSDP's shards add up, the
loss and the per-sample statistics cover every rank's samples, and the representation probe
splits a tensor probe set across the ranks and sums their counts and Gram matrices. Every scalar
is one ``add_scalar`` per logger: with many parameter tensors, ``per_tensor=False`` keeps the
logging cost down.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set

import torch
from torch import nn

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover  (depends on the environment)
    raise ImportError("trainscope.lightning needs Lightning 2.x: pip install lightning") from e

from . import RepresentationProbe
from ._args import check_bool, check_hist_axis, check_int
from .monitor import (ALPHA_KEY, BUILTIN_METRICS, CURVATURE_KEY, GRAD_VARIANCE_KEY, PER_SAMPLE_HIST_KEY,
                      PER_SAMPLE_KEY, Monitor, Quantity, _cabs_lr, _curvature_options, _per_sample_options, _spec,
                      at_steps, every)
from .representation import _batch_examples, _cut_batch, _loader_first_batch
from .tensorboard_sink import histogram_summary

__all__ = [
    "EpochSchedule",
    "HistogramCallback",
    "ParamMetricsCallback",
    "PerSampleStatsCallback",
    "RepresentationCallback",
    "TrainscopeCallback",
    "at_epoch_end",
    "at_epoch_start",
    "every_n_epochs",
    "histogram_summary",
]

#: Keys of the two optional families in the Monitor (and in the logged names); per_sample is the
#: Monitor's built-in per-sample family (Monitor(per_sample=...)).
REPRESENTATION_KEY = "representation"


#: The parameter metrics ``metrics=`` switches one by one (the family ``param_metrics``): loss,
#: the names of trainscope.METRICS, nonfinite_count.
PARAM_METRICS = BUILTIN_METRICS
#: Metrics of the gradients: absent at the start of an epoch (no gradients exist there).
_GRADIENT_METRICS = ("grad_norm", "grad_magnitude", "nonfinite_count")
#: Metrics of an optimizer step's update: never measured at an epoch boundary.
_UPDATE_METRICS = ("update_size", "update_ratio")

_CALLER = "TrainscopeCallback"


class EpochSchedule:
    """When the callback measures, in epochs: at the start (``at="start"``) or the end
    (``at="end"``) of epochs ``start``, ``start + k``, ``start + 2k``, ... (0-based, as
    ``trainer.current_epoch``). Made by :func:`at_epoch_start`, :func:`at_epoch_end` and
    :func:`every_n_epochs`; usable wherever :class:`TrainscopeCallback` takes a schedule (not by a
    :class:`trainscope.Monitor`, which counts steps)."""

    def __init__(self, k: int = 1, start: int = 0, at: str = "start", caller: str = "every_n_epochs"):
        self.k = check_int(k, "k", caller, low=1)
        self.start = check_int(start, "start", caller, low=0)
        if at not in ("start", "end"):
            raise ValueError(f"{caller}: at must be 'start' or 'end', got {at!r}")
        self.at = at

    def due(self, epoch: int) -> bool:
        """Whether the schedule fires at (the start or end of) epoch ``epoch``."""
        return epoch >= self.start and (epoch - self.start) % self.k == 0

    def __repr__(self) -> str:
        return f"every_n_epochs({self.k}, start={self.start}, at={self.at!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, EpochSchedule) and (other.k, other.start, other.at) == (self.k, self.start, self.at)

    def __hash__(self) -> int:
        return hash((self.k, self.start, self.at))


def at_epoch_start() -> EpochSchedule:
    """At the start of every epoch: before its first optimizer step, on the parameters the epoch
    starts from (epoch 0: the untrained network), logged at ``trainer.global_step``."""
    return EpochSchedule(1, 0, "start", "at_epoch_start")


def at_epoch_end() -> EpochSchedule:
    """At the end of every epoch: after its last optimizer step, logged at that step's number."""
    return EpochSchedule(1, 0, "end", "at_epoch_end")


def every_n_epochs(k: int, start: int = 0, at: str = "start") -> EpochSchedule:
    """At the start (or, with ``at="end"``, the end) of epochs start, start + k, ... (k >= 1)."""
    return EpochSchedule(k, start, at, "every_n_epochs")


def _same(a, b) -> bool:
    """Whether two option values agree (modules compare by identity)."""
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001  (values without a plain ==)
        return False


def _is_epoch(schedule) -> bool:
    return isinstance(schedule, EpochSchedule)


def _on(schedule, arg: str) -> bool:
    """Whether a schedule turns something on; one that is not a schedule is an error naming `arg`."""
    return _is_epoch(schedule) or _spec(schedule, arg, _CALLER) != "off"


def _enabled(schedule, arg: str) -> bool:
    """Whether a family's schedule turns it on; a schedule that is not one is an error naming `arg`."""
    return _on(schedule, arg)


def _step_only(schedule, arg: str):
    """A family measured at optimizer steps alone (it needs the step's own forward and backward
    pass, or its batch): its schedule, None when off; an epoch schedule is an error naming `arg`."""
    if _is_epoch(schedule):
        raise ValueError(f"{_CALLER}: {arg} is an epoch schedule ({schedule!r}), but {arg} is measured at optimizer "
                         "steps only (from the step's own batch): give it a step schedule (trainscope.every(k), ...)")
    return schedule if _enabled(schedule, arg) else None


def _sgd_for_cabs(trainer) -> Optional[torch.optim.Optimizer]:
    """The trainer's optimizer when cabs is defined for it (one SGD without momentum, weight decay
    or nesterov, one learning rate), else None: cabs is then not recorded."""
    optimizers = list(getattr(trainer, "optimizers", None) or ())
    if len(optimizers) != 1:
        return None
    try:
        _cabs_lr(optimizers[0])
    except (TypeError, ValueError):
        return None
    return optimizers[0]


def _step_schedule(schedule):
    """What the Monitor gets for a schedule: an epoch schedule is the step schedule that never
    fires (the callback measures it with Monitor.measure_now), on so that it can be measured."""
    return at_steps([]) if _is_epoch(schedule) else schedule


def _check_metrics(metrics) -> Dict[str, Any]:
    """``metrics=``: {name in PARAM_METRICS: schedule, epoch schedule, True or False}, checked."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{_CALLER}: metrics must be a dict {{metric name: schedule or bool}}, "
                        f"got {type(metrics).__name__}")
    out = {}
    for name, schedule in metrics.items():
        if name not in PARAM_METRICS:
            raise ValueError(f"{_CALLER}: metrics has an unknown metric {name!r}; the metrics are {PARAM_METRICS}")
        arg = f"metrics[{name!r}]"
        _on(schedule, arg)
        if _is_epoch(schedule) and name in _UPDATE_METRICS:
            raise ValueError(f"{_CALLER}: {arg} is an epoch schedule, but {name} measures an optimizer step's "
                             "update: give it a step schedule (trainscope.every(k), ...)")
        if _is_epoch(schedule) and schedule.at == "start" and name in (*_GRADIENT_METRICS, "loss"):
            raise ValueError(f"{_CALLER}: {arg} is at the start of epochs, where no gradients and no loss exist "
                             f"yet: {name} would never be measured; use at_epoch_end() or a step schedule")
        out[name] = schedule
    return out


def _quantity_with_schedule(item, i: int):
    """An entry of ``quantities``: a Quantity, or a (Quantity, schedule) pair, checked."""
    q, schedule = item if isinstance(item, tuple) and len(item) == 2 else (item, True)
    key = getattr(q, "key", None)
    if not isinstance(key, str) or not callable(getattr(q, "compute", None)):
        raise TypeError(f"{_CALLER}: quantities[{i}] must be a trainscope.Quantity (a key and compute(ctx)) or a "
                        f"(Quantity, schedule) pair, got {type(item).__name__}")
    torch.classes.trainscope.Monitor.check_quantity_key(key, f"{_CALLER}: quantities[{i}]")
    _on(schedule, f"quantities[{i}] schedule")
    return q, schedule


def _check_not_dict(batch) -> None:
    if isinstance(batch, Mapping):
        raise TypeError(f"{_CALLER}: probe_inputs gives dict batches (keys {list(batch)[:6]}); give "
                        "probe_forward=callable(module, batch) that runs one batch through the model")


class _RepresentationQuantity(Quantity):
    """Dead units and rank measures on the probe set (RepresentationProbe), after the step."""

    key = REPRESENTATION_KEY

    def __init__(self, owner: "TrainscopeCallback", pl_module: nn.Module):
        self._owner, self._module = owner, pl_module

    def compute(self, ctx) -> Dict[str, torch.Tensor]:
        return self._owner._get_probe(self._module)().scalars()


class TrainscopeCallback(Callback):
    """Measures training with trainscope and logs it through the trainer's loggers.

    Families, each a schedule over optimizer steps (``trainscope.every(k)``, ``at_steps``,
    ``log_spaced``, ``on_demand()``), ``True`` for every step, or None/False for off:

    - ``param_metrics`` (on): loss, grad_norm, grad_magnitude, weight_magnitude, weight_norm,
      distance, update_size, update_ratio, nonfinite_count; per parameter tensor too with
      ``per_tensor``; one by one with ``metrics``. The loss is the
      mean of the step's training losses (``outputs["loss"]``, or per-sample losses returned by
      ``training_step`` under ``losses_key``; over all micro-batches of the step when gradients
      accumulate). distance is from the parameters at the start of ``fit``.
    - ``grad_hist`` (on): the gradient histogram, ``nbins`` bins over [-maxval, maxval], logged as
      ``<prefix>/grad_hist1d`` to TensorBoard loggers.
    - ``per_sample`` (off): the six per-sample gradient statistics (``<prefix>/per_sample/norm_test``,
      ...) from layer factors: the Monitor's built-in per-sample family (``Monitor(per_sample=...)``),
      whose :class:`trainscope.PerSampleHooks` (``per_sample_layers``, ``per_sample_loss_reduction``)
      are attached to the module when training starts, capture only batches of due steps, and are
      removed when it ends.
      Every trainable layer must be one of ``trainscope.SUPPORTED_LAYERS`` unless ``per_sample_layers`` names a
      subset. With gradient accumulation they describe the step's last micro-batch.
    - ``per_sample_hist`` (off): the per-sample gradient histogram ``<prefix>/per_sample_grad_hist1d``
      (to TensorBoard loggers); with ``per_sample_options={"hist2d": True}`` also
      ``per_sample_grad_hist2d``, which reaches ``sinks`` only (TensorBoard has no 2-D histograms).
    - ``per_sample_options``: the Monitor's (``layers``, ``loss_reduction``, ``method``,
      ``on_unsupported``, ``nbins``, ``maxval``, ``hist2d``, ...), for every family from the
      per-sample hooks. ``per_sample_layers`` and ``per_sample_loss_reduction`` go into it; one
      given both ways with different values is an error naming both.
    - ``grad_variance`` (off): ``<prefix>/grad_variance/mean_gsnr``, ``early_stopping`` and
      ``cabs`` (per tensor too with ``per_tensor``), from the same hooks. cabs is recorded only when
      the trainer has one optimizer, a ``torch.optim.SGD`` without momentum, weight decay or
      nesterov (one learning rate, read at each due step); with any other (Adam, ...) cabs is
      simply not recorded, and mean_gsnr and early_stopping are.
    - ``alpha`` (off): the normalised step length ``<prefix>/alpha`` of the update made at a due
      step, recorded with the next step. It needs the batch's per-sample losses:
      ``training_step`` returns them under ``losses_key`` (``{"loss": losses.mean(), "losses":
      losses}``); without them a due step is an error saying so.
    - ``curvature`` (off): ``<prefix>/curvature/hess_max_ev``, ``hess_trace`` (and
      ``hess_trace_stderr``), ``tic_diag``, ``tic_trace``, with ``curvature_options`` (``which``,
      ``method``, ``samples``, ...) as in :class:`trainscope.Monitor`. It needs
      ``curvature_loss(pl_module, batch)``, which recomputes the batch's per-sample losses [B]
      (a mean loss gives the Hessian quantities alone) by a fresh forward pass: the callback calls
      it only on due steps, after the optimizer step (at the updated parameters), with grad
      enabled and the module as training left it (train mode); without it ``curvature`` is an
      error at construction.
    - ``representation`` (off): dead units and rank measures of the activation layers on
      ``probe_inputs``, ``<prefix>/representation/<metric>[/<layer>]``: ``"val"``, the first
      ``num_examples`` (default 2,000) examples of the trainer's first validation dataloader
      (collected once, when first needed, and kept on the module's device; an error naming
      probe_inputs when the trainer has none), a tensor (moved to the module's device once), or an
      iterable of batches. A batch's examples are counted by the first dimension of its first
      tensor. ``probe_forward(module, batch)`` runs one batch of any form through the model (a
      dict, a forward that takes the whole batch or returns a loss): the probe's hooks capture the
      activations either way. Without it the probe runs ``module(batch[0])`` for tuple and list
      batches and ``module(batch)`` for tensors; dict batches are an error saying to give
      probe_forward. ``probe_options`` go to :class:`trainscope.RepresentationProbe` (layers,
      batch_size, weights, ...). The probe runs after the step's update (or at the epoch boundary),
      in eval mode and under no_grad.

    ``per_sample_hist``, ``grad_variance``, ``alpha`` and ``curvature`` are measured at optimizer
    steps only (from the step's own batch): an epoch schedule for them is an error naming the
    argument. With gradient accumulation they describe the step's last micro-batch
    (``curvature_loss`` gets that batch), as the per-sample statistics do. The hooks see the
    gradients of the loss Lightning backpropagates, divided by ``accumulate_grad_batches``: values
    with a scale (the per-sample ``grad_variance_trace`` and ``grad_sq_norm_unbiased``, the
    histograms, cabs) are those of the divided gradients; the tests, mean_gsnr, early_stopping and
    alpha (rescaled by the Monitor) are not. ``trainscope.cockpit_configuration(label)`` gives
    these arguments for Cockpit's configurations:
    ``TrainscopeCallback(**trainscope.cockpit_configuration("full"), curvature_loss=...)``.

    Every other family's schedule may instead be an epoch schedule (:func:`at_epoch_start`,
    :func:`at_epoch_end`, :func:`every_n_epochs`): see the module docs for when it runs and at
    which step number it is logged. ``grad_hist`` at the start of epochs is refused (no gradients
    exist there).

    ``metrics``: a schedule (step or epoch), True or False for single parameter metrics, keyed
    by ``loss``, ``grad_norm``, ``grad_magnitude``, ``weight_magnitude``, ``weight_norm``,
    ``distance``, ``update_size``, ``update_ratio``, ``nonfinite_count`` (``Monitor(metrics=)``);
    the metrics not named follow ``param_metrics``. Refused: an unknown name, update_size or
    update_ratio on an epoch schedule (they measure an optimizer step), and the gradient metrics
    or the loss at the start of epochs (they would never be measured).

    ``quantities``: more :class:`trainscope.Quantity` objects, as ``(quantity, schedule)`` pairs or
    alone (every step). ``sinks``: more callables receiving each finished StepRecord.
    :meth:`request` makes a quantity due at the next step (e.g. ``"representation"`` at a task
    boundary with ``representation=trainscope.on_demand()``).

    ``checkpoint_param_copies`` (on): Lightning checkpoints carry θ₀ and θ_prev (one copy of the
    trainable parameters each), so that a resumed run continues distance and update_size; off,
    checkpoints carry only the pending requests. Sharded parameters (FSDP) are never copied into
    a checkpoint (Lightning keeps rank 0's callback state only): a resumed FSDP run measures
    distance from the parameters it resumes from, and a warning says so. Parameter names are the model's own, without
    the prefixes of torch.compile (``_orig_mod.``) and other wrappers, as the representation
    layers are named. Every argument is checked here, each error naming its argument.
    """

    def __init__(self, param_metrics=every(1), grad_hist=every(1), *, per_tensor: bool = True,
                 nbins: int = 100, maxval: float = 0.05, weights_matrices_only: bool = False,
                 track_init: bool = True, track_prev: bool = True,
                 per_sample=None, per_sample_layers: Optional[Sequence] = None,
                 per_sample_loss_reduction: Optional[str] = None, per_sample_hist=None,
                 per_sample_options: Optional[Mapping[str, Any]] = None, grad_variance=None, alpha=None,
                 curvature=None, curvature_options: Optional[Mapping[str, Any]] = None,
                 curvature_loss: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                 representation=None, probe_inputs=None, probe_options: Optional[Mapping[str, Any]] = None,
                 probe_forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                 num_examples: Optional[int] = None, metrics: Optional[Mapping[str, Any]] = None,
                 quantities: Iterable = (), sinks: Iterable[Callable] = (), prefix: str = "trainscope",
                 losses_key: str = "losses", ring_slots: int = 64, checkpoint_param_copies: bool = True):
        super().__init__()
        self.param_metrics = param_metrics if _enabled(param_metrics, "param_metrics") else None
        self.grad_hist = grad_hist if _enabled(grad_hist, "grad_hist") else None
        if _is_epoch(self.grad_hist) and self.grad_hist.at == "start":
            raise ValueError(f"{_CALLER}: grad_hist is at the start of epochs, where no gradients exist: it would "
                             "never be measured; use at_epoch_end() or a step schedule")
        self.per_sample = per_sample if _enabled(per_sample, "per_sample") else None
        self.per_sample_hist = _step_only(per_sample_hist, "per_sample_hist")
        self.grad_variance = _step_only(grad_variance, "grad_variance")
        self.alpha = _step_only(alpha, "alpha")
        self.curvature = _step_only(curvature, "curvature")
        if curvature_loss is not None and not callable(curvature_loss):
            raise TypeError(f"{_CALLER}: curvature_loss must be a callable(pl_module, batch) returning the batch's "
                            f"per-sample losses, got {type(curvature_loss).__name__}")
        if self.curvature is not None and curvature_loss is None:
            raise ValueError(f"{_CALLER}: curvature needs curvature_loss, a callable(pl_module, batch) returning the "
                             "batch's per-sample losses from a fresh forward pass")
        self.curvature_loss = curvature_loss
        self.curvature_options = dict(curvature_options) if isinstance(curvature_options, Mapping) \
            else curvature_options
        _curvature_options(curvature_options)  # checked now: an error naming curvature_options
        self.representation = representation if _enabled(representation, "representation") else None
        self.metrics = _check_metrics(metrics)
        if self.representation is not None and probe_inputs is None:
            raise ValueError(f"{_CALLER}: representation metrics need probe_inputs")
        if isinstance(probe_inputs, str) and probe_inputs != "val":
            raise ValueError(f"{_CALLER}: probe_inputs must be 'val' (the validation set), a tensor or batches, "
                             f"got {probe_inputs!r}")
        if probe_forward is not None and not callable(probe_forward):
            raise TypeError(f"{_CALLER}: probe_forward must be a callable(module, batch), "
                            f"got {type(probe_forward).__name__}")
        if per_sample_loss_reduction not in (None, "mean", "sum"):
            raise ValueError(f"{_CALLER}: per_sample_loss_reduction must be 'mean' or 'sum', "
                             f"got {per_sample_loss_reduction!r}")
        if probe_options is not None and not isinstance(probe_options, Mapping):
            raise TypeError(f"{_CALLER}: probe_options must be a dict, got {type(probe_options).__name__}")
        for value, name in ((prefix, "prefix"), (losses_key, "losses_key")):
            if not isinstance(value, str):
                raise TypeError(f"{_CALLER}: {name} must be a string, got {type(value).__name__}")
        self.per_tensor = check_bool(per_tensor, "per_tensor", _CALLER)
        self.nbins, self.maxval = check_hist_axis(nbins, maxval, caller=_CALLER)
        self.per_sample_options = self._merge_per_sample_options(per_sample_options, per_sample_layers,
                                                                 per_sample_loss_reduction, self.nbins, self.maxval)
        self.weights_matrices_only = check_bool(weights_matrices_only, "weights_matrices_only", _CALLER)
        # θ₀ and θ_prev are a copy of the parameters each: keep them only for the metrics using them
        # (update_size and update_ratio are measured at optimizer steps only).
        on = {n: _on(self._metric_schedule(n), f"metrics[{n!r}]") for n in PARAM_METRICS}
        self.track_init = check_bool(track_init, "track_init", _CALLER) and on["distance"]
        self.track_prev = check_bool(track_prev, "track_prev", _CALLER) and any(
            on[n] and not _is_epoch(self._metric_schedule(n)) for n in _UPDATE_METRICS)
        self._loss_on = on["loss"]
        # The step's losses reach the Monitor for the loss metric, and for alpha and cabs.
        self._collect = self._loss_on or self.alpha is not None or self.grad_variance is not None
        self.checkpoint_param_copies = check_bool(checkpoint_param_copies, "checkpoint_param_copies", _CALLER)
        self.per_sample_layers = self.per_sample_options.get("layers")
        self.per_sample_loss_reduction = self.per_sample_options.get("loss_reduction", "mean")
        self.probe_inputs = probe_inputs
        self.probe_options = dict(probe_options or {})
        self.probe_forward = probe_forward
        if probe_forward is not None and "forward" in self.probe_options:
            raise ValueError(f"{_CALLER}: probe_forward and probe_options['forward'] are both given; "
                             "give probe_forward")
        if num_examples is not None and "num_examples" in self.probe_options:
            raise ValueError(f"{_CALLER}: num_examples and probe_options['num_examples'] are both given; "
                             "give num_examples")
        self.num_examples = check_int(self.probe_options.pop("num_examples", 2000) if num_examples is None
                                      else num_examples, "num_examples", _CALLER, low=1)
        for value, name in ((quantities, "quantities"), (sinks, "sinks")):
            if value is not None and (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)
                                      or callable(value)):
                raise TypeError(f"{_CALLER}: {name} must be a list, got {type(value).__name__}")
        self.quantities = [_quantity_with_schedule(q, i) for i, q in enumerate(quantities or ())]
        self.sinks = list(sinks or ())
        for i, sink in enumerate(self.sinks):
            if not callable(sink):
                raise TypeError(f"{_CALLER}: sinks[{i}] must be callable, got {type(sink).__name__}")
        self.prefix = prefix
        self.losses_key = losses_key
        self.ring_slots = check_int(ring_slots, "ring_slots", _CALLER, low=1)
        keys = [q.key for q, _ in self.quantities] + [k for k, on in ((PER_SAMPLE_KEY, self.per_sample),
                                                                      (PER_SAMPLE_HIST_KEY, self.per_sample_hist),
                                                                      (GRAD_VARIANCE_KEY, self.grad_variance),
                                                                      (ALPHA_KEY, self.alpha),
                                                                      (CURVATURE_KEY, self.curvature),
                                                                      (REPRESENTATION_KEY, self.representation))
                                                      if on is not None]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{_CALLER}: quantity keys repeat ({keys}); every quantity needs a unique key")
        self._keys: Set[str] = {"param_metrics", "grad_hist", *keys}
        self.monitor: Optional[Monitor] = None
        self._trainer = None
        self._seen_global_step = 0
        self._losses: List[torch.Tensor] = []
        self._losses_per_sample = True                     # every micro-batch gave per-sample losses
        self._last_losses: Optional[torch.Tensor] = None   # the latest step's, for the end of the epoch
        self._epoch_start_step: Optional[int] = None       # trainer.global_step when the epoch started
        self._per_sample_epoch: Optional[str] = None       # "start"/"end": per_sample due at an epoch's step
        self._warned_epoch_length = False
        self._probe: Optional[RepresentationProbe] = None
        self._requests: Set[str] = set()                   # requested while no Monitor exists
        self._loaded_state: Optional[Dict[str, Any]] = None  # from a checkpoint, for the next Monitor
        self._kept_state: Optional[Dict[str, Any]] = None    # the last Monitor's, after fit

    @property
    def state_key(self) -> str:
        # Two callbacks of one class with different prefixes keep apart in a checkpoint.
        return self._generate_state_key(prefix=self.prefix)

    @staticmethod
    def _merge_per_sample_options(options, layers, loss_reduction, nbins, maxval) -> Dict[str, Any]:
        """``per_sample_options`` with ``per_sample_layers`` and ``per_sample_loss_reduction`` in
        it, checked (the Monitor's rules); one given both ways, differently, is an error naming both."""
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"{_CALLER}: per_sample_options must be a dict, got {type(options).__name__}")
        out = dict(options or {})
        for value, key, arg in ((layers, "layers", "per_sample_layers"),
                                (loss_reduction, "loss_reduction", "per_sample_loss_reduction")):
            if value is None:
                continue
            if key in out and out[key] is not None and not _same(out[key], value):
                raise ValueError(f"{_CALLER}: {arg}={value!r} and per_sample_options[{key!r}]={out[key]!r} "
                                 f"disagree; give one of them")
            out[key] = value
        _per_sample_options(out, nbins, maxval)  # checked now: an error naming the entry
        return out

    def _metric_schedule(self, name: str):
        """The schedule of one parameter metric: its entry of ``metrics``, else ``param_metrics``."""
        return self.metrics[name] if name in self.metrics else self.param_metrics

    # -- building the Monitor

    def _build_monitor(self, trainer, pl_module: nn.Module) -> Monitor:
        # The module itself, not (name, tensor) pairs: names lose wrapper prefixes (torch.compile's
        # _orig_mod., FSDP's _fsdp_wrapped_module.) and FSDP1's flat shards are recognised.
        # Epoch schedules are measured by the callback (Monitor.measure_now): in the Monitor they
        # are on, on the step schedule that never fires.
        kwargs = {}
        if self.metrics:
            kwargs["metrics"] = {n: _step_schedule(s) for n, s in self.metrics.items()}
        if self.per_sample is not None:
            kwargs["per_sample"] = _step_schedule(self.per_sample)
        for key, schedule in ((PER_SAMPLE_HIST_KEY, self.per_sample_hist), (GRAD_VARIANCE_KEY, self.grad_variance),
                              (ALPHA_KEY, self.alpha)):
            if schedule is not None:
                kwargs[key] = schedule
        if any(s is not None for s in (self.per_sample, self.per_sample_hist, self.grad_variance, self.alpha)):
            kwargs["per_sample_options"] = self.per_sample_options
        if self.grad_variance is not None:
            kwargs["optimizer"] = _sgd_for_cabs(trainer)  # None: cabs is not recorded
        if self.curvature is not None:
            kwargs.update(curvature=self.curvature, curvature_options=self.curvature_options)
        monitor = Monitor(pl_module, param_metrics=_step_schedule(self.param_metrics) or False,
                          grad_hist=_step_schedule(self.grad_hist) or False, nbins=self.nbins, maxval=self.maxval,
                          per_tensor=self.per_tensor, weights_matrices_only=self.weights_matrices_only,
                          track_init=self.track_init, track_prev=self.track_prev,
                          ring_slots=self.ring_slots,
                          sinks=[self._log_record, *(_GlobalZeroSink(self, s) for s in self.sinks)], **kwargs)
        if self.representation is not None:
            if self.probe_inputs == "val":
                self._val_loader(trainer)  # an error naming probe_inputs now if there is none
            else:  # built now: a bad probe set is an error before training starts
                self._probe = self._make_probe(pl_module, self.probe_inputs)
            monitor.add_quantity(_RepresentationQuantity(self, pl_module), _step_schedule(self.representation))
        for q, schedule in self.quantities:
            monitor.add_quantity(q, _step_schedule(schedule))
        return monitor

    def _get_probe(self, pl_module: nn.Module) -> RepresentationProbe:
        if self._probe is None:  # probe_inputs="val": collected when first needed
            self._probe = self._make_probe(pl_module, self._val_batches(self._trainer, pl_module))
        return self._probe

    @staticmethod
    def _device(pl_module: nn.Module) -> torch.device:
        return next((p.device for p in pl_module.parameters()), torch.device("cpu"))

    def _val_loader(self, trainer):
        """The trainer's first validation dataloader; an error naming probe_inputs if it has none."""
        loaders = trainer.val_dataloaders
        if loaders is None:
            # Lightning sets them up before on_train_start only when epoch 0 validates; this is how
            # it does so (FitLoop.on_run_start).
            try:
                val_loop = trainer.fit_loop.epoch_loop.val_loop
                was_training = trainer.training
                trainer.validating = True
                try:
                    val_loop.setup_data()
                finally:
                    trainer.training = was_training
                loaders = trainer.val_dataloaders
            except Exception:  # noqa: BLE001  (then there is none to be had)
                loaders = None
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise ValueError(f"{_CALLER}: probe_inputs='val' needs the trainer's validation dataloader, and it has "
                             "none (give fit() val_dataloaders and the module a validation_step, with "
                             "limit_val_batches > 0), or give probe_inputs a tensor or batches")
        return loaders

    def _val_batches(self, trainer, pl_module: nn.Module) -> List[Any]:
        """The first num_examples examples of the validation dataloader, as batches on the module's
        device (a batch counts the first dimension of its first tensor; the last is cut to fit)."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        device = self._device(pl_module)
        batches, seen = [], 0
        for batch in self._val_loader(trainer):
            count = _batch_examples(batch)
            if count > self.num_examples - seen:
                batch = _cut_batch(batch, self.num_examples - seen, count)
            batches.append(move_data_to_device(batch, device))
            seen += min(count, self.num_examples - seen)
            if seen >= self.num_examples:
                break
        return batches

    def _make_probe(self, pl_module: nn.Module, inputs) -> RepresentationProbe:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        device = self._device(pl_module)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(device)  # once, not at every probe
        opts = dict(self.probe_options, num_examples=self.num_examples)
        if self.probe_forward is not None:
            forward = self.probe_forward
            # Whole batches, moved as they come (a no-op for batches already there).
            opts.update(whole_batches=True, forward=lambda m, b: forward(m, move_data_to_device(b, device)))
        else:
            if isinstance(inputs, list) and inputs:
                _check_not_dict(inputs[0])
            elif isinstance(inputs, torch.utils.data.DataLoader):
                first = _loader_first_batch(inputs)
                if first is not None:
                    _check_not_dict(first)
            # Batches from a loader are moved as they come (non-blocking from pinned memory).
            opts.setdefault("forward", lambda m, x: m(x.to(device, non_blocking=True)))
        return RepresentationProbe(pl_module, inputs, **opts)

    # -- Lightning hooks

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        self._seen_global_step = trainer.global_step
        self._epoch_start_step = trainer.global_step  # resumed mid-epoch: the steps from here
        self._losses = []
        self._losses_per_sample = True
        self._last_losses = None
        self._per_sample_epoch = None
        self._kept_state = None
        # Built here rather than in setup() or on_fit_start(): the module is on its device and a
        # checkpoint's weights are loaded by now (FSDP restores them after on_fit_start), so θ₀ is
        # the parameters training starts from, on the device they train on.
        # On every rank: under DDP/FSDP each step's metrics are collectives over the ranks.
        self.monitor = self._build_monitor(trainer, pl_module)
        if self._loaded_state is not None:
            self._apply_state(self._loaded_state)
            self._loaded_state = None
        for key in sorted(self._requests):
            self.monitor.request(key)
        self._requests.clear()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.monitor is None:
            return
        epoch = trainer.current_epoch
        self._epoch_start_step = trainer.global_step
        self._last_losses = None
        self._per_sample_epoch = (self.per_sample.at if _is_epoch(self.per_sample) and self.per_sample.due(epoch)
                                  else None)
        if self._per_sample_epoch == "start":
            # The epoch's first optimizer step: the Monitor arms its hooks for it and measures it.
            self.monitor.request(PER_SAMPLE_KEY)
            self._per_sample_epoch = None
        # Before the epoch's first optimizer step, on the parameters it starts from: no gradients.
        names = self._epoch_metrics(epoch, "start", gradients=False, losses=False)
        if names:
            self.monitor.measure_now(trainer.global_step, metrics=names, gradients=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.monitor is None:
            return
        # After the epoch's last optimizer step, logged at its number; its gradients are still there.
        stepped = self._epoch_start_step is not None and trainer.global_step > self._epoch_start_step
        losses = self._last_losses if stepped else None
        names = self._epoch_metrics(trainer.current_epoch, "end", gradients=stepped, losses=losses is not None)
        if names:
            self.monitor.measure_now(max(trainer.global_step - 1, 0), losses, metrics=names, gradients=stepped)
        self._per_sample_epoch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # per_sample at the end of an epoch: the batch taking the epoch's last optimizer step is
        # made due (a request arms the Monitor's hooks before its forward pass); the Monitor arms
        # them for steps its step schedule makes due by itself.
        if self.monitor is None or self._per_sample_epoch != "end":
            return
        if self._last_step_of_epoch(trainer, batch_idx):
            self.monitor.request(PER_SAMPLE_KEY)
            self._per_sample_epoch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        if self._collect:
            self._collect_losses(trainer, pl_module, outputs)
        if trainer.global_step == self._seen_global_step:
            return  # gradients are accumulating: no optimizer step in this batch
        self._seen_global_step = trainer.global_step
        step = trainer.global_step - 1
        losses = None
        if self._losses:
            losses = torch.cat(self._losses)
            self._losses = []
        per_sample_losses = self._losses_per_sample and losses is not None
        self._losses_per_sample = True
        if self.alpha is not None and not per_sample_losses and self.monitor.due(ALPHA_KEY, step):
            raise ValueError(f"{_CALLER}: alpha is due at step {step} and needs the batch's per-sample losses: "
                             f"return them from training_step, e.g. {{'loss': losses.mean(), "
                             f"{self.losses_key!r}: losses}} (losses_key)")
        self._last_losses = losses
        extras = {}
        if self.curvature is not None:
            extras["closure"] = self._closure(pl_module, batch)
        self.monitor.step(step, losses=losses, **extras)

    def _closure(self, pl_module, batch) -> Callable[[], torch.Tensor]:
        """The curvature family's closure: curvature_loss on the step's (last micro-)batch, called
        by the Monitor on due steps alone, at the updated parameters, with grad enabled."""
        loss_fn = self.curvature_loss

        def closure():
            with torch.enable_grad():
                return loss_fn(pl_module, batch)

        return closure

    def _last_step_of_epoch(self, trainer, batch_idx: int) -> bool:
        """Whether this batch takes the epoch's last optimizer step: the epoch's last batch, or a
        step that reaches max_steps. Unknown for an epoch of unknown length: then False (warned)."""
        n = trainer.num_training_batches
        if n == float("inf"):
            if not self._warned_epoch_length:
                self._warned_epoch_length = True
                warnings.warn(f"{_CALLER}: per_sample is at the end of epochs, but the epochs' length is unknown "
                              "(a dataloader without len): the epoch's last step cannot be told in advance, and "
                              "per_sample is not measured at epoch ends", RuntimeWarning, stacklevel=2)
            return False
        if batch_idx + 1 >= n:
            return True
        steps = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        return steps and 0 <= trainer.max_steps <= trainer.global_step + 1

    def _epoch_metrics(self, epoch: int, at: str, *, gradients: bool, losses: bool) -> List[str]:
        """The names due at the start or end of ``epoch`` for Monitor.measure_now: the parameter
        metrics, grad_hist, representation and custom quantities on epoch schedules (per_sample is
        measured at a step). Gradient metrics only with gradients, loss only with the step's
        losses, update metrics never (they belong to an optimizer step)."""
        def due(schedule) -> bool:
            return _is_epoch(schedule) and schedule.at == at and schedule.due(epoch)

        names = []
        for name in PARAM_METRICS:
            if not due(self._metric_schedule(name)) or name in _UPDATE_METRICS:
                continue
            if (name in _GRADIENT_METRICS and not gradients) or (name == "loss" and not losses):
                continue
            if name == "distance" and not self.track_init:
                continue
            names.append(name)
        if gradients and due(self.grad_hist):
            names.append("grad_hist")
        if due(self.representation):
            names.append(REPRESENTATION_KEY)
        names += [q.key for q, schedule in self.quantities if due(schedule)]
        return names

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # The run is failing: log the steps in flight (Lightning finalises the loggers next), and
        # never raise over the exception in flight. The Monitor stays: a checkpoint on exception
        # (OnExceptionCheckpoint runs after this callback) still saves its state.
        self._losses = []
        try:
            self._remove_hooks()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"{_CALLER}: removing the per-sample hooks failed: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)
        if self.monitor is not None:
            self.monitor.flush(errors="warn")

    def teardown(self, trainer, pl_module, stage) -> None:
        self._remove_hooks()
        self._probe = None  # the probe set (on the device, for probe_inputs="val")
        self._last_losses = None
        if self.monitor is not None:
            self.monitor.flush()
            # Kept on the host for a checkpoint saved after fit; the device copies go with the Monitor.
            self._kept_state = _state_on_host(self.monitor.state_dict(self._param_copies()))
            self.monitor = None  # frees θ₀, θ_prev and the ring
        self._trainer = None

    # -- checkpoints (Lightning's Callback.state_dict / load_state_dict)

    def state_dict(self) -> Dict[str, Any]:
        """θ₀, θ_prev (unless ``checkpoint_param_copies=False``) and pending requests: see
        :meth:`trainscope.Monitor.state_dict`."""
        if self.monitor is not None:
            monitor_state = self.monitor.state_dict(self._param_copies())
        else:
            monitor_state = self._loaded_state if self._loaded_state is not None else self._kept_state
        out: Dict[str, Any] = {}
        if monitor_state is not None:
            out["monitor"] = monitor_state
        if self._requests:
            out["requests"] = sorted(self._requests)
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the Monitor takes it when it is built (``on_train_start``),
        or at once if it exists. Parameters other than the checkpoint's (names or shapes) are an
        error naming what differs."""
        self._requests = {k for k in state_dict.get("requests", ()) if k in self._keys}
        state = state_dict.get("monitor")
        if state is None:
            return
        if self.monitor is not None:
            self._apply_state(state)
        else:
            self._loaded_state = state

    def _sharded_across_ranks(self) -> bool:
        return self.monitor.layout.any_sharded and self.monitor.world_size > 1

    def _param_copies(self) -> bool:
        # Lightning saves global rank 0's callback state for every rank: shards of θ₀ and θ_prev
        # from rank 0 are of no use to the others, so a sharded run saves none.
        return self.checkpoint_param_copies and not self._sharded_across_ranks()

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        # Requests of families this run has switched off are dropped: nothing to make due.
        state = dict(state, requested=[k for k in state.get("requested", ()) if k in self._keys])
        if self._sharded_across_ranks():
            state.update(init=[], prev=[])  # rank 0's shards (the same decision on every rank)
        if self.track_init and self.checkpoint_param_copies and not state["init"]:
            warnings.warn(f"{_CALLER}: the checkpoint holds no copy of the initial parameters (saved with "
                          "checkpoint_param_copies=False, or by a run with sharded parameters): distance is "
                          "measured from the parameters this run resumes from", RuntimeWarning, stacklevel=2)
        self.monitor.load_state_dict(state)

    # -- public

    def flush(self) -> None:
        """Waits for every step in flight and logs it."""
        if self.monitor is not None:
            self.monitor.flush()

    def request(self, key: str) -> None:
        """Makes the quantity ``key`` (e.g. "representation", "per_sample", "param_metrics") due at
        the next step; before training starts, at the first step. That is after the step's
        update: to measure the parameters an epoch starts from, use an epoch schedule."""
        if key not in self._keys:
            raise ValueError(f"{_CALLER}.request: unknown key {key!r}; this callback has {sorted(self._keys)}")
        if self.monitor is not None:
            self.monitor.request(key)
        else:
            self._requests.add(key)

    # -- internals

    def _collect_losses(self, trainer, pl_module, outputs) -> None:
        if isinstance(outputs, Mapping):
            if outputs.get(self.losses_key) is not None:
                self._losses.append(outputs[self.losses_key].detach().reshape(-1))
                return
            loss = outputs.get("loss")
        else:
            loss = outputs
        self._losses_per_sample = False  # a mean loss, or none
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().reshape(-1)
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for the backward
            self._losses.append(loss)

    def _remove_hooks(self) -> None:
        if self.monitor is not None:
            self.monitor.close()  # the per-sample hooks, if any

    def _tag(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _log_record(self, record) -> None:
        """Sink: a finished step's host values to every logger of the trainer."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        scalars = {self._tag(name): value for name, value in record.scalars.items()}
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=record.step)
            if not record.histograms:
                continue
            # Loggers without an experiment, or whose experiment has no histograms, get scalars only.
            add_raw = getattr(getattr(logger, "experiment", None), "add_histogram_raw", None)
            if add_raw is None:
                continue  # a logger without histograms
            for name, (edges, counts) in record.histograms.items():
                if counts.dim() != 1:
                    continue  # TensorBoard has no 2-D histograms
                summary = histogram_summary(edges, counts)
                if summary is not None:  # empty: every gradient non-finite (see nonfinite_count)
                    add_raw(self._tag(name), global_step=record.step, **summary)


class _GlobalZeroSink:
    """A user's sink, called on the global-zero process only; its ``flush`` is forwarded."""

    def __init__(self, owner: TrainscopeCallback, sink: Callable):
        self._owner, self._sink = owner, sink

    def _on_global_zero(self) -> bool:
        trainer = self._owner._trainer
        return trainer is not None and trainer.is_global_zero

    def __call__(self, record) -> None:
        if self._on_global_zero():
            self._sink(record)

    def flush(self) -> None:
        flush = getattr(self._sink, "flush", None)
        if callable(flush) and self._on_global_zero():
            flush()


def _state_on_host(state: Dict[str, Any]) -> Dict[str, Any]:
    return dict(state, init=[t.cpu() for t in state["init"]], prev=[t.cpu() for t in state["prev"]])


class ParamMetricsCallback(TrainscopeCallback):
    """The parameter metrics alone (loss, grad_norm, ..., globally and per tensor)."""

    def __init__(self, schedule=every(1), *, per_tensor: bool = True, weights_matrices_only: bool = False,
                 track_init: bool = True, track_prev: bool = True, prefix: str = "trainscope", **kwargs):
        super().__init__(param_metrics=schedule, grad_hist=None, per_tensor=per_tensor,
                         weights_matrices_only=weights_matrices_only, track_init=track_init,
                         track_prev=track_prev, prefix=prefix, **kwargs)


class HistogramCallback(TrainscopeCallback):
    """The gradient histogram alone, to TensorBoard loggers."""

    def __init__(self, schedule=every(1), *, nbins: int = 100, maxval: float = 0.05,
                 prefix: str = "trainscope", **kwargs):
        super().__init__(param_metrics=None, grad_hist=schedule, nbins=nbins, maxval=maxval,
                         prefix=prefix, **kwargs)


class PerSampleStatsCallback(TrainscopeCallback):
    """The per-sample gradient statistics alone (every 10 steps unless told otherwise)."""

    def __init__(self, schedule=every(10), *, layers: Optional[Sequence] = None, loss_reduction: Optional[str] = None,
                 prefix: str = "trainscope", **kwargs):
        super().__init__(param_metrics=None, grad_hist=None, per_sample=schedule, per_sample_layers=layers,
                         per_sample_loss_reduction=loss_reduction, prefix=prefix, **kwargs)


class RepresentationCallback(TrainscopeCallback):
    """The representation metrics alone, on ``probe_inputs`` ("val", a tensor or batches; every
    1,000 steps unless told otherwise); ``probe_forward`` and ``num_examples`` as in
    :class:`TrainscopeCallback`, ``probe_options`` go to :class:`trainscope.RepresentationProbe`."""

    def __init__(self, probe_inputs, schedule=every(1000), *, probe_forward=None, num_examples=None,
                 prefix: str = "trainscope", **probe_options):
        super().__init__(param_metrics=None, grad_hist=None, representation=schedule,
                         probe_inputs=probe_inputs, probe_options=probe_options, probe_forward=probe_forward,
                         num_examples=num_examples, prefix=prefix)
