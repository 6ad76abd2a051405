"""Representation metrics of a model's layers on a probe set (SPEC.md §3): dead units and the four
rank measures, per layer and averaged, as Dohare et al. (Nature 2024) track them at each task
boundary of a continual-learning run::

    probe = trainscope.RepresentationProbe(model, probe_inputs)   # hooks every activation module
    r = probe()                                                    # runs 2,000 examples, no_grad
    r.per_layer["effective_rank"]      # [L] float64, in the order of r.layers
    r.summary["dead_fraction"]         # 0-d: dead units over all measured units
    r.scalars()                        # {"effective_rank": ..., "effective_rank/<layer>": ...}

A layer's representation is the output of the hooked module: [N, units], or [N, C, *spatial] where
a unit is a channel and every spatial position one more observation. The batches stream through
the C++ accumulator (``torch.classes.trainscope.RepresentationAccumulator``): per-unit active counts
and a Gram matrix per layer stay on the device, and one batched eigensolve across layers finishes
the run. Every result is a tensor on the model's device; nothing here waits for the GPU.

A diverged model (NaN or infinite weights or activations) is measured, never an error: a layer
whose activations hold NaN or ±Inf gets NaN effective and stable rank and -1 approximate ranks
(averages over layers: NaN), and its dead units follow IEEE comparisons (a NaN is active for
ReLU, NaN != 0, and inactive for tanh and sigmoid).

Under torch.distributed (by default the default process group when it is initialised;
``process_group=`` another group, or :data:`trainscope.distributed.THIS_PROCESS` for this rank
alone) the probe set is spread over the ranks and the results are those of the whole set:

- a probe *tensor* (the same on every rank) is cut into contiguous parts (``tensor_split``), one
  per rank; an iterable (a DataLoader, say with a DistributedSampler) is each rank's own share,
  capped at ceil(num_examples / W) examples per rank;
- every rank runs the same number of forward passes, since a DDP or FSDP forward is itself a
  collective: for a tensor, ceil(ceil(N / W) / batch_size) from host numbers; for an iterable,
  the ranks agree before each batch (``all_gather_object`` of the batch's shape, dtype and device
  type); a rank with no data left runs a batch of zero rows (the model must accept one), which
  adds nothing;
- :meth:`RepresentationAccumulator.result` combines: the ranks first check (one
  ``all_gather_object``) that they measured the same layers with the same units and that each
  added a batch, raising the same error on every rank otherwise; then ONE all-reduce (in C++,
  ``result_across_ranks``) sums every layer's per-unit active counts, observation count and
  ΦᵀΦ [units, units] (float64) before dead units and the batched eigensolve (``method="svd"``
  too solves the summed ΦᵀΦ: the rows stay on their ranks), and the observation counts are read
  back to the host (the one wait for the device).

``weights=True`` measures the weights this rank holds (``to_local()`` of DTensors): the whole
matrices under DDP, only this rank's shard under FSDP (not the whole matrix's ranks).
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from . import _ops  # noqa: F401  (loads the op library and its custom classes)
from ._args import check_bool, check_int, check_module
from .distributed import THIS_PROCESS, active_group, clean_param_name, group_name, local_tensor, rank_and_size
from .rank import RankMeasures, rank_measures

#: Metric names of RepresentationResult.per_layer and .summary, as logs spell them.
REPRESENTATION_METRICS = ("dead_units", "dead_fraction", "effective_rank", "approximate_rank",
                          "abs_approximate_rank", "stable_rank")

#: Activation modules the probe hooks by default, and the dead-unit criterion each gets with
#: kind="auto". Modules that are never exactly 0 (GELU, SiLU, LeakyReLU, ...) get the ReLU
#: criterion (active ⇔ a ≠ 0), under which their units are (correctly) almost never dead.
ACTIVATION_KINDS: Dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "relu", nn.PReLU: "relu", nn.ELU: "relu",
    nn.SELU: "relu", nn.CELU: "relu", nn.GELU: "relu", nn.SiLU: "relu", nn.Mish: "relu",
    nn.Softplus: "relu", nn.Hardswish: "relu",
    nn.Tanh: "tanh", nn.Hardtanh: "tanh", nn.Softsign: "tanh",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "sigmoid",
}


@dataclass
class RepresentationResult:
    """Metrics of the probed layers. Tensors live on the activations' device."""

    layers: List[str]
    per_layer: Dict[str, torch.Tensor]        # metric -> [L], in the order of ``layers``
    summary: Dict[str, torch.Tensor]          # metric -> 0-d, averaged over layers (see below)
    active_fraction: Dict[str, torch.Tensor]  # layer -> [units] float64, f_u of every unit
    units: Dict[str, int]                     # layer -> number of units
    observations: Dict[str, int]              # layer -> observations per unit (N * prod(spatial))
    weights: Optional[Dict[str, RankMeasures]] = field(default=None)  # see weight_rank_measures

    def scalars(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Flat ``{name: 0-d tensor}`` for logging: the averages under the plain metric name and
        each layer's value under ``<metric>/<layer>``; with weights, ``weight_<measure>/<layer>``."""
        out: Dict[str, torch.Tensor] = {}
        for metric in REPRESENTATION_METRICS:
            out[prefix + metric] = self.summary[metric]
            for i, layer in enumerate(self.layers):
                out[f"{prefix}{metric}/{layer}"] = self.per_layer[metric][i]
        for layer, m in (self.weights or {}).items():
            for measure in ("effective_rank", "approximate_rank", "abs_approximate_rank", "stable_rank"):
                out[f"{prefix}weight_{measure}/{layer}"] = getattr(m, measure)
        return out


class RepresentationAccumulator:
    """Streams batches of activations of several layers (one tensor per layer, same order every
    call) into per-unit active counts and Gram matrices; :meth:`result` finishes with one batched
    eigensolve. ``kinds`` is one dead-unit criterion per layer ("relu", "tanh" or "sigmoid") or
    one for all; ``method`` is "gram" (default) or "svd" (exact, keeps every row)."""

    def __init__(self, names: Sequence[str], kinds: Union[str, Sequence[str]] = "relu", eps: float = 0.01,
                 tau: float = 0.0, prop: float = 0.99, method: str = "gram"):
        if isinstance(names, str) or not hasattr(names, "__iter__"):
            raise TypeError(f"RepresentationAccumulator: names must be a list of layer names, got {names!r}")
        self.names = [str(n) for n in names]
        if not self.names:
            raise ValueError("RepresentationAccumulator: names is empty; give one name per layer")
        kinds = [kinds] * len(self.names) if isinstance(kinds, str) else [str(k) for k in kinds]
        if len(kinds) != len(self.names):
            raise ValueError(f"RepresentationAccumulator: kinds has {len(kinds)} entries but names has "
                             f"{len(self.names)}; give one kind per layer or a single kind")
        self._acc = torch.classes.trainscope.RepresentationAccumulator(
            self.names, kinds, float(eps), float(tau), float(prop), str(method))

    def add(self, acts: Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]) -> None:
        """Adds one batch: a list in the order of ``names``, or a dict keyed by them."""
        if isinstance(acts, Mapping):
            missing = [n for n in self.names if n not in acts]
            if missing:
                raise ValueError(f"RepresentationAccumulator.add: acts has no entry for layer {missing[0]!r}")
            acts = [acts[n] for n in self.names]
        self._acc.add([a.detach() for a in acts])

    def units(self) -> List[int]:
        """Units per layer, -1 for a layer no batch has reached yet."""
        return list(self._acc.units())

    def result(self, process_group=None) -> RepresentationResult:
        """The metrics of what was added; under torch.distributed (``process_group`` None: the
        default group when initialised; :data:`trainscope.distributed.THIS_PROCESS`: this rank
        alone) those of every rank's batches together — a collective, see the module docstring.
        Every rank must have added at least one batch (zero rows will do)."""
        group = active_group(process_group)
        if group is None:
            out = self._acc.result()
        else:
            self._check_ranks_agree(group)
            out = self._acc.result_across_ranks(group_name(group))
        (dead, dead_fraction, active_fraction, erank, arank, abs_arank, srank, units, observations,
         summary) = out
        per_layer = {"dead_units": dead, "dead_fraction": dead_fraction, "effective_rank": erank,
                     "approximate_rank": arank, "abs_approximate_rank": abs_arank, "stable_rank": srank}
        return RepresentationResult(
            layers=list(self.names), per_layer=per_layer, summary=dict(summary),
            active_fraction=dict(zip(self.names, active_fraction)),
            units=dict(zip(self.names, units)), observations=dict(zip(self.names, observations)))

    def reset(self) -> None:
        self._acc.reset()

    def _check_ranks_agree(self, group) -> None:
        """Every rank measured the same layers with the same units and added a batch; the same
        error on every rank otherwise (rather than a mismatched all-reduce)."""
        import torch.distributed as dist

        mine = (self.names, self.units())
        everyone = [None] * rank_and_size(group)[1]
        dist.all_gather_object(everyone, mine, group=group)
        for r, (names, units) in enumerate(everyone):
            if any(u < 0 for u in units):
                raise RuntimeError(f"RepresentationAccumulator.result: rank {r} of the process group has added no "
                                   "batch; every rank must add at least one (a batch of zero rows will do) before "
                                   "the results are combined")
            if (names, units) != everyone[0]:
                raise RuntimeError(f"RepresentationAccumulator.result: rank {r} measured layers {names} with units "
                                   f"{units}, rank 0 {everyone[0][0]} with {everyone[0][1]}; every rank must measure "
                                   "the same layers")


def weight_rank_measures(model: nn.Module, prop: float = 0.99, method: str = "gram") -> Dict[str, RankMeasures]:
    """Rank measures of every weight matrix of ``model`` (parameters named ``weight`` with at least
    two dimensions; a convolution's [out, in, *k] is measured as [out, in * prod(k)]), in one
    batched solve: ``{module name: RankMeasures of 0-d tensors}``."""
    check_module(model, "model", "weight_rank_measures")
    names, mats = [], []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            w = local_tensor(w.detach())  # this rank's part of a DTensor (FSDP2): see the module docstring
            names.append(clean_param_name(name) or "weight")
            mats.append(w.flatten(1))  # [out, in * prod(k)], also for an empty shard
    if not mats:
        return {}
    r = rank_measures(mats, prop=prop, method=method)
    return {n: RankMeasures(r.effective_rank[i], r.approximate_rank[i], r.abs_approximate_rank[i], r.stable_rank[i])
            for i, n in enumerate(names)}


# -- probe sets -----------------------------------------------------------------------------------

_PROBE_SET_FORMS = ("a tensor [N, ...] of inputs (or a NumPy array, or a nested list of numbers), an (inputs, "
                    "targets) tuple, or an iterable of such batches (a DataLoader)")


def _is_numpy_array(x) -> bool:
    np = sys.modules.get("numpy")  # an array exists only if NumPy was imported: no import here
    return np is not None and isinstance(x, np.ndarray)


def _is_nested_numbers(x) -> bool:
    """A (nested) list or tuple of numbers, judged by its first leaf (torch.as_tensor checks the rest)."""
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return isinstance(x, numbers.Number)


def _model_tensor(data, model: nn.Module) -> torch.Tensor:
    """NumPy or a nested list of numbers as a tensor on the model's device; floating values in the
    dtype of its floating parameters (a float64 array for a float32 model), integers as they are."""
    try:
        t = torch.as_tensor(data)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"RepresentationProbe: probe_set could not be converted to a tensor ({e}); pass "
                        f"{_PROBE_SET_FORMS}") from None
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        t = t.to(param.device, dtype=param.dtype if t.is_floating_point() else None)
    return t


def _as_inputs(x, model: nn.Module) -> Optional[torch.Tensor]:
    """x as a tensor of inputs when it is one (a tensor as it is; NumPy and lists of numbers
    converted), else None."""
    if isinstance(x, torch.Tensor):
        return x
    if _is_numpy_array(x) or (isinstance(x, list) and _is_nested_numbers(x)):
        return _model_tensor(x, model)
    return None


def _check_examples(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("RepresentationProbe: probe_set is a 0-d tensor; the examples go along dim 0")
    if x.shape[0] == 0:
        raise ValueError("RepresentationProbe: probe_set has no examples")
    return x


def _batch_inputs(batch, model: nn.Module) -> torch.Tensor:
    """The inputs of one batch of an iterable probe set: a tensor, or the first entry of a tuple or
    list; anything else is an error naming probe_set, raised before the model runs on it."""
    if isinstance(batch, Mapping):
        raise TypeError(f"RepresentationProbe: probe_set yields dict batches (keys {list(batch)[:6]}); the probe "
                        "runs the model on an input tensor: pass whole_batches=True with a forward(model, batch) "
                        "that runs one dict batch, or batches that are input tensors or (inputs, targets) tuples")
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    inputs = _as_inputs(x, model)
    if inputs is None or inputs.dim() == 0:
        raise TypeError(f"RepresentationProbe: probe_set yields batches of {type(batch).__name__}"
                        f"{' of ' + type(x).__name__ if x is not batch else ''}; each batch must be a tensor of "
                        "inputs [n, ...] or a tuple whose first entry is one")
    return inputs


def _first_tensor(batch) -> Optional[torch.Tensor]:
    """The first tensor of a batch (depth first through dicts, tuples and lists), None if none."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _batch_examples(batch) -> int:
    """How many examples a whole batch holds: the first dimension of its first tensor."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise TypeError(f"RepresentationProbe: a batch of {type(batch).__name__} holds no tensor with a first "
                        "(example) dimension; with whole_batches=True each batch must hold one, whose first "
                        "dimension counts its examples")
    return t.shape[0]


def _cut_batch(batch, n: int, count: int):
    """The batch's first n examples: every tensor whose first dimension is ``count`` cut to n rows,
    everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 and batch.shape[0] == count else batch
    if isinstance(batch, Mapping):
        cut = {k: _cut_batch(v, n, count) for k, v in batch.items()}
        try:
            return type(batch)(cut)
        except Exception:  # a mapping type that cannot be built from a dict
            return cut
    if isinstance(batch, (tuple, list)):
        items = [_cut_batch(v, n, count) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _loader_first_batch(loader):
    """The first batch a DataLoader over a map-style dataset forms, from its first example and
    without starting the loader (no worker processes); None where that cannot be told cheaply."""
    ds = loader.dataset
    if isinstance(ds, torch.utils.data.IterableDataset):
        return None
    try:
        if len(ds) == 0:
            return None
        item = ds[0]
        return loader.collate_fn(item if loader.batch_size is None else [item])
    except Exception:  # a dataset that cannot be read this way: its batches are checked as they come
        return None


def _probe_examples(probe_set, model: nn.Module, whole_batches: bool = False):
    """The probe set as the probe streams it: a tensor of inputs, or an iterable of batches. What
    cannot be one is an error naming probe_set, raised here, when the probe is built."""
    where = "RepresentationProbe: probe_set"
    if probe_set is None:
        raise TypeError(f"{where} is None; pass {_PROBE_SET_FORMS}")
    if whole_batches and not isinstance(probe_set, (torch.Tensor, Mapping, str, bytes)) \
            and not _is_numpy_array(probe_set) and isinstance(probe_set, Iterable) \
            and not (isinstance(probe_set, torch.utils.data.Dataset)
                     and not isinstance(probe_set, torch.utils.data.IterableDataset)):
        return probe_set  # batches of any form, each handed whole to forward
    if isinstance(probe_set, tuple) and probe_set:
        inputs = _as_inputs(probe_set[0], model)  # (inputs, targets, ...)
        if inputs is not None:
            return _check_examples(inputs)
    # An empty list is an iterable without batches: under torch.distributed a rank's share may be
    # empty; alone, calling the probe says that probe_set gave no examples.
    if isinstance(probe_set, list):
        if any(isinstance(e, torch.Tensor) or _is_numpy_array(e) for e in probe_set):
            # [x, y] or [batch, batch, ...]: either reading would be wrong for the other.
            raise TypeError(f"{where} is a list of tensors (or arrays), which could be an (inputs, targets) "
                            "pair or a list of batches; pass a tuple (inputs, targets), or torch.cat(batches) for "
                            "batches of inputs, or a list of (inputs, targets) tuples")
    inputs = _as_inputs(probe_set, model)
    if inputs is not None:
        return _check_examples(inputs)
    if isinstance(probe_set, Mapping):
        raise TypeError(f"{where} is a dict (keys {list(probe_set)[:6]}); dict inputs are not supported yet: "
                        "pass the tensor of model inputs, e.g. probe_set[<input key>]")
    if isinstance(probe_set, torch.utils.data.Dataset) and not isinstance(probe_set, torch.utils.data.IterableDataset):
        raise TypeError(f"{where} is a Dataset, which gives one example at a time; pass "
                        "torch.utils.data.DataLoader(dataset, batch_size=...)")
    if isinstance(probe_set, (str, bytes, numbers.Number)) or not isinstance(probe_set, Iterable):
        raise TypeError(f"{where} is a {type(probe_set).__name__}; pass {_PROBE_SET_FORMS}")
    if isinstance(probe_set, torch.utils.data.DataLoader):
        first = _loader_first_batch(probe_set)
        if first is not None:
            _batch_inputs(first, model)
    return probe_set


def _activation_kind(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls in ACTIVATION_KINDS:
            return ACTIVATION_KINDS[cls]
    return "relu"


def _check_kinds(kind) -> None:
    """``kind``: "auto", one of the activity kinds, or a mapping of layer names to those."""
    allowed = ("auto", "relu", "tanh", "sigmoid")
    for k in (kind.values() if isinstance(kind, Mapping) else [kind]):
        if not isinstance(k, str) or k.lower() not in allowed:
            raise ValueError(f"RepresentationProbe: kind must be one of {allowed} (or a dict of them by layer), "
                             f"got {k!r}")


class RepresentationProbe:
    """Measures the representations of chosen layers on a fixed probe set.

    - ``probe_set``: the examples: a tensor [N, ...] of inputs, or a tuple whose first entry is
      the inputs, as a dataset's (x, y); or an iterable of such batches (a DataLoader, a list of
      (x, y) tuples). A NumPy array or a nested list of numbers is converted once, here, with
      ``torch.as_tensor``, onto the model's device and, when floating, into its parameters'
      dtype. A list of tensors is refused (an (x, y) pair and a list of batches read alike: pass
      a tuple, or ``torch.cat`` the batches), as are None, dicts, a Dataset without a DataLoader,
      and a DataLoader whose batches are dicts (unless ``whole_batches``): each with an error naming
      ``probe_set`` when the probe is built, or, for an iterable it cannot look into then, before
      the model runs on the first bad batch. At most ``num_examples`` examples are used (default
      2,000).
    - ``whole_batches``: each batch of an iterable probe set goes to ``forward`` as it is (a dict,
      a tuple, ...), for models whose forward takes a whole batch or that need a ``forward`` of
      their own (e.g. one that computes a loss): the hooks capture the activations either way.
      A batch's examples are counted by the first dimension of its first tensor (depth first
      through dicts, tuples and lists); the batch that reaches ``num_examples`` is cut to it (every
      tensor whose first dimension is that count). A tensor probe set is cut into batches as
      without it.
    - ``layers``: None for every activation module of ``model`` (:data:`ACTIVATION_KINDS`), or a
      list of module names, or a dict ``{name: module}``. A module called several times in one
      forward pass gives one layer per call, named ``<name>:<call index>`` from the second call.
    - ``kind``: "auto" (by module type, :data:`ACTIVATION_KINDS`), one of "relu"/"tanh"/"sigmoid"
      for every layer, or a dict ``{layer name: kind}``; ``eps``, ``tau``: the dead-unit criterion.
    - ``prop``, ``method``: the rank measures' share and "gram"/"svd".
    - ``weights``: also measure the ranks of every weight matrix (:func:`weight_rank_measures`).
    - ``forward``: how to run the model on one batch of inputs (default ``model(x)``), or, with
      ``whole_batches``, on one whole batch.
    - ``process_group``: under torch.distributed, the ranks that share the probe set (None: the
      default group when initialised; :data:`trainscope.distributed.THIS_PROCESS`: this rank
      alone). Calling the probe is then a collective; see the module docstring.

    Calling the probe runs the probe set in batches of ``batch_size`` under ``torch.no_grad()``
    with the model in eval mode (``train_mode=True`` keeps it as it is), restores every module's
    train/eval state and removes its hooks, and returns a :class:`RepresentationResult`.
    """

    def __init__(self, model: nn.Module, probe_set, layers=None, batch_size: int = 500, kind="auto",
                 eps: float = 0.01, tau: float = 0.0, prop: float = 0.99, method: str = "gram",
                 num_examples: int = 2000, weights: bool = False, train_mode: bool = False,
                 forward: Optional[Callable[[nn.Module, torch.Tensor], object]] = None, process_group=None,
                 whole_batches: bool = False):
        self.batch_size = check_int(batch_size, "batch_size", "RepresentationProbe", low=1)
        self.num_examples = check_int(num_examples, "num_examples", "RepresentationProbe", low=1)
        self.model = check_module(model, "model", "RepresentationProbe")
        _check_kinds(kind)
        self.probe_set = probe_set
        self.whole_batches = check_bool(whole_batches, "whole_batches", "RepresentationProbe")
        # A tensor of inputs, or an iterable of batches.
        self._examples = _probe_examples(probe_set, model, self.whole_batches)
        self.kind, self.eps, self.tau, self.prop, self.method = kind, eps, tau, prop, method
        self.weights, self.train_mode = weights, train_mode
        self.forward = forward or (lambda m, x: m(x))
        self.process_group = process_group
        self.modules = self._select_modules(layers)

    def _select_modules(self, layers) -> Dict[str, nn.Module]:
        if layers is None:
            # Named by the model's own names (without DDP's "module." and the like).
            chosen = {clean_param_name(n): m for n, m in self.model.named_modules() if type(m) in ACTIVATION_KINDS}
            if not chosen:
                raise ValueError("RepresentationProbe: the model has no activation module "
                                 f"({', '.join(sorted(c.__name__ for c in ACTIVATION_KINDS))}); pass layers=")
            return chosen
        if isinstance(layers, Mapping):
            return dict(layers)
        named = dict(self.model.named_modules())
        chosen = {}
        for name in layers:
            if name not in named:
                raise ValueError(f"RepresentationProbe: layers names {name!r}, which is not a module of the model")
            chosen[name] = named[name]
        if not chosen:
            raise ValueError("RepresentationProbe: layers is empty")
        return chosen

    def _kind_of(self, name: str, module: nn.Module) -> str:
        if isinstance(self.kind, Mapping):
            base = name.split(":")[0]
            return self.kind.get(name, self.kind.get(base, _activation_kind(module)))
        return _activation_kind(module) if self.kind == "auto" else self.kind

    def _batches(self, group=None) -> Iterable[torch.Tensor]:
        data = self._examples
        if isinstance(data, torch.Tensor):
            data = data[: self.num_examples]
            if group is None:
                for start in range(0, data.shape[0], self.batch_size):
                    yield data[start:start + self.batch_size]
                return
            # This rank's contiguous part; the same number of batches on every rank (zero rows
            # where a part runs out), from host numbers alike on every rank.
            rank, world = rank_and_size(group)
            part = data.tensor_split(world)[rank]
            longest = -(-data.shape[0] // world)
            for b in range(-(-longest // self.batch_size)):
                yield part[b * self.batch_size:(b + 1) * self.batch_size]
            return
        if group is None:
            yield from self._own_batches(data, self.num_examples)
            return
        yield from self._agreed_batches(data, group)

    def _own_batches(self, data, limit: int) -> Iterable[torch.Tensor]:
        seen = 0
        for batch in data:
            if self.whole_batches:
                count = _batch_examples(batch)
                x = batch if count <= limit - seen else _cut_batch(batch, limit - seen, count)
                seen += min(count, limit - seen)
            else:
                x = _batch_inputs(batch, self.model)[: limit - seen]
                seen += x.shape[0]
            yield x
            if seen >= limit:
                return

    def _agreed_batches(self, data, group) -> Iterable[torch.Tensor]:
        """This rank's own batches of an iterable, as many on every rank: before each, the ranks
        exchange what they have (shape after the batch dim, dtype, device type, or None when done);
        a rank that is done runs zero rows shaped as another rank's batch until all are done. With
        whole_batches, a rank that is done runs its own last batch cut to zero rows, so every rank
        needs at least one batch when any has one."""
        import torch.distributed as dist

        world = rank_and_size(group)[1]
        own = iter(self._own_batches(data, -(-self.num_examples // world)))
        empty = None
        first = True
        while True:
            x = next(own, None)
            if self.whole_batches:
                mine = None if x is None else "batch"
            else:
                mine = None if x is None else (tuple(x.shape[1:]), x.dtype, x.device.type)
            everyone = [None] * world
            dist.all_gather_object(everyone, mine, group=group)
            if all(d is None for d in everyone):
                return
            if self.whole_batches:
                if first and any(d is None for d in everyone):
                    raise RuntimeError(f"RepresentationProbe: rank {everyone.index(None)} of the process group has "
                                       "no batch of the probe set; with whole_batches=True every rank needs one")
                first = False
                if x is None:
                    x = empty
                else:
                    empty = _cut_batch(x, 0, _batch_examples(x))
                yield x
                continue
            if x is None:
                if empty is None:
                    shape, dtype, device_type = next(d for d in everyone if d is not None)
                    device = (torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda"
                              else torch.device(device_type))
                    empty = torch.empty((0, *shape), dtype=dtype, device=device)
                x = empty
            else:
                empty = x[:0]
            yield x

    def __call__(self) -> RepresentationResult:
        group = active_group(self.process_group)
        calls: Dict[str, List[torch.Tensor]] = {name: [] for name in self.modules}

        def hook_for(name):
            def hook(_module, _inputs, output):
                calls[name].append(output.detach())
            return hook

        states = [(m, m.training) for m in self.model.modules()]
        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]
        acc: Optional[RepresentationAccumulator] = None
        try:
            if not self.train_mode:
                self.model.eval()
            with torch.no_grad():
                for x in self._batches(group):
                    for v in calls.values():
                        v.clear()
                    self.forward(self.model, x)
                    names, acts, kinds = [], [], []
                    for name, module in self.modules.items():
                        for i, out in enumerate(calls[name]):
                            layer = name if i == 0 else f"{name}:{i}"
                            names.append(layer)
                            acts.append(out)
                            kinds.append(self._kind_of(layer, module))
                    if acc is None:
                        if not names:
                            raise RuntimeError("RepresentationProbe: the forward pass ran none of the chosen layers")
                        acc = RepresentationAccumulator(names, kinds, self.eps, self.tau, self.prop, self.method)
                    elif names != acc.names:
                        raise RuntimeError(f"RepresentationProbe: this batch ran layers {names}, "
                                           f"the first ran {acc.names}; the probe needs the same layers every batch")
                    acc.add(acts)
        finally:
            for h in handles:
                h.remove()
            for m, training in states:
                m.training = training
        if acc is None:
            raise ValueError("RepresentationProbe: probe_set gave no examples")
        result = acc.result(process_group=group if group is not None else THIS_PROCESS)
        if self.weights:
            result.weights = weight_rank_measures(self.model, self.prop, self.method)
        return result
