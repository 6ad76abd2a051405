"""Metrics across the ranks of a torch.distributed job (DDP, FSDP).

Each rank computes partial sums on its own tensors; one all-reduce of a small tensor through the
job's process group (torch.distributed's own collectives, resolved by the group's name in C++)
adds them; every rank then holds the same global values::

    import trainscope.distributed as tsd
    layout = tsd.param_layout(model)     # names, this rank's tensors, replicated/sharded, group
    stats = tsd.param_stats_across_ranks(layout.grads(), layout.params, layout=layout)

- DDP: every rank holds every parameter (replicated): a tensor counts once, from rank 0.
- FSDP2 (``fully_shard``): parameters are DTensors sharded over the mesh; each rank's shard is
  read through ``to_local()`` and the shards' sums add up.
- FSDP1 with ``use_orig_params=True``: the original parameters are this rank's flat pieces;
  per-tensor results are named by the original parameter names.

Without an initialised process group (or with a group of one) everything is the single-process
computation. Every function here is a collective when distributed: call it on every rank, in the
same order, with lists of the same length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_hist_axis
from ._lists import tensor_list
from .param_stats import ParamStats, loss as _local_loss
from .per_sample_stats import PerSampleParts, PerSampleStats, _as_grad_list
from .per_sample_stats import per_sample_stats as _local_per_sample_stats

__all__ = [
    "ParamLayout",
    "clean_param_name",
    "group_name",
    "is_distributed",
    "local_tensor",
    "loss_across_ranks",
    "param_layout",
    "param_stats_across_ranks",
    "rank_and_size",
    "resolve_group",
]

PLACEMENTS = ("replicated", "sharded")

# Name segments wrappers add to parameter names (FSDP1, activation checkpointing, torch.compile);
# DDP and DataParallel add a leading "module". The full parameter name is the model's own.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


class _ThisProcess:
    """The process_group that means "this process's data alone", even under torch.distributed."""

    def __repr__(self) -> str:
        return "trainscope.distributed.THIS_PROCESS"


#: Pass as ``process_group`` to measure this rank's own data alone (no collective), where the
#: default (None) would combine over the default group of an initialised torch.distributed.
THIS_PROCESS = _ThisProcess()


def _dist():
    """torch.distributed when it is available and initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def resolve_group(group=None):
    """The process group to combine over: ``group`` itself, or the default group when
    torch.distributed is initialised, or None (one process; also for :data:`THIS_PROCESS`)."""
    if group is THIS_PROCESS:
        return None
    if group is not None:
        return group
    dist = _dist()
    return dist.group.WORLD if dist is not None else None


def group_name(group=None) -> str:
    """The name the C++ side resolves ``group`` by ("" for one process)."""
    g = resolve_group(group)
    if g is None:
        return ""
    name = getattr(g, "group_name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"trainscope: process_group {g!r} has no registered name")
    return name


def rank_and_size(group=None) -> Tuple[int, int]:
    """(rank, size) within ``group`` (the default group when None); (0, 1) for one process."""
    g = resolve_group(group)
    if g is None:
        return 0, 1
    dist = _dist()
    return dist.get_rank(g), dist.get_world_size(g)


def is_distributed(group=None) -> bool:
    """Whether ``group`` (default: the default group) spans more than one process."""
    return rank_and_size(group)[1] > 1


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover  (torch built without distributed)
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's part of ``t``: ``to_local()`` of a DTensor, ``t`` itself otherwise."""
    if t is None:
        return None
    return t.to_local() if _is_dtensor(t) else t


def clean_param_name(name: str) -> str:
    """The model's own parameter name, without the prefixes DDP, FSDP1, activation checkpointing
    and torch.compile add (``module.``, ``_fsdp_wrapped_module.``, ...)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    while parts and parts[0] == "module":  # DDP / DataParallel, possibly around torch.compile
        parts = [p for p in parts[1:] if p not in _WRAPPER_SEGMENTS]
    return ".".join(parts)


def _dtensor_placement(t) -> Tuple[str, object]:
    """("sharded" or "replicated", the group of the sharded mesh dimension or None)."""
    from torch.distributed.tensor import Replicate

    mesh = t.device_mesh
    shard_dims = [i for i, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if not shard_dims:
        return "replicated", None
    if len(shard_dims) > 1:
        raise ValueError("trainscope: a DTensor sharded over more than one mesh dimension is not supported; "
                         "give placements and process_group explicitly")
    return "sharded", mesh.get_group(shard_dims[0])


def _fsdp1_shapes(model: nn.Module) -> dict:
    """Original parameter name -> original shape, for FSDP1 (use_orig_params=True) modules."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return {}
    shapes = {}
    for prefix, mod in model.named_modules():
        if not isinstance(mod, FSDP):
            continue
        flat = getattr(mod, "_flat_param", None)
        if flat is None:
            flat = getattr(getattr(mod, "_handle", None), "flat_param", None)
        if flat is None or getattr(flat, "_fqns", None) is None:
            continue
        for fqn, shape in zip(flat._fqns, flat._shapes):
            full = f"{prefix}.{fqn}" if prefix else fqn
            shapes[clean_param_name(full)] = tuple(shape)
    return shapes


@dataclass
class ParamLayout:
    """A model's trainable parameters as this rank holds them, and how they lie across ranks."""

    names: List[str]                 # full parameter names (wrapper prefixes removed)
    originals: List[torch.Tensor]    # the parameters as the model holds them (DTensor or not)
    params: List[torch.Tensor]       # this rank's tensors (to_local() of DTensors)
    placements: List[str]            # "replicated" or "sharded", per parameter
    full_dims: List[int]             # the whole parameter's number of dimensions
    group: object = None             # the process group to combine over (None: one process)

    def grads(self) -> List[Optional[torch.Tensor]]:
        """This rank's gradients (``to_local()`` of DTensor gradients), None where none."""
        return [local_tensor(p.grad) for p in self.originals]

    @property
    def process_group(self) -> str:
        return group_name(self.group)

    @property
    def any_sharded(self) -> bool:
        return "sharded" in self.placements


def param_layout(model_or_named_params, group=None) -> ParamLayout:
    """Reads how a model's parameters lie across ranks: DTensors (FSDP2) by their placements,
    FSDP1 original parameters (``use_orig_params=True``) as sharded, everything else (DDP, one
    process) as replicated. A module's trainable parameters are named by the model's own names
    (:func:`clean_param_name`); ``(name, tensor)`` pairs keep theirs. ``group`` overrides the
    process group (default: the sharded mesh dimension's group for DTensors, else the default
    group)."""
    is_module = isinstance(model_or_named_params, nn.Module)
    if is_module:
        model = model_or_named_params
        # Frozen parameters have no gradients to measure.
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fsdp1 = _fsdp1_shapes(model)
    else:
        named = [(str(n), p) for n, p in model_or_named_params]
        fsdp1 = {}
    names, originals, params, placements, full_dims = [], [], [], [], []
    mesh_group = None
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"param_layout: parameter {name!r} is a {type(p).__name__}, not a tensor")
        clean = clean_param_name(name) if is_module else name  # given pairs keep their names
        if _is_dtensor(p):
            placement, g = _dtensor_placement(p)
            if g is not None:
                if mesh_group is not None and g is not mesh_group and group is None:
                    raise ValueError("param_layout: parameters are sharded over different process groups; "
                                     "pass group= explicitly")
                mesh_group = g
            shape = tuple(p.shape)
        elif clean in fsdp1:
            placement, shape = "sharded", fsdp1[clean]
        else:
            placement, shape = "replicated", tuple(p.shape)
        names.append(clean)
        originals.append(p)
        params.append(local_tensor(p).detach())
        placements.append(placement)
        full_dims.append(len(shape))
    if len(set(names)) != len(names):
        raise ValueError("param_layout: parameter names repeat once wrapper prefixes are removed; "
                         "pass (name, tensor) pairs with unique names")
    return ParamLayout(names, originals, params, placements, full_dims,
                       resolve_group(group if group is not None else mesh_group))


def _placements(layout: Optional[ParamLayout], placements, n: int) -> List[str]:
    if placements is None:
        placements = layout.placements if layout is not None else ["replicated"] * n
    elif isinstance(placements, str):
        placements = [placements] * n
    placements = list(placements)
    for p in placements:
        if p not in PLACEMENTS:
            raise ValueError(f"placements: expected 'replicated' or 'sharded', got {p!r}")
    return placements


def _zeros_for_missing(grads, params: List[torch.Tensor]):
    """A missing gradient (None: FSDP1 leaves an empty shard without one) as zeros of its
    parameter's shape, so that the lists have the same length on every rank."""
    if grads is None or isinstance(grads, torch.Tensor) or isinstance(grads, Mapping):
        return grads
    items = list(grads)
    if any(t is None for t in items):
        if len(params) != len(items):
            raise ValueError("param_stats_across_ranks: grads has None entries; give params (the same length) "
                             "so that they read as zeros")
        items = [torch.zeros_like(q) if t is None else t for t, q in zip(items, params)]
    return items


def param_stats_across_ranks(
    grads=None,
    params=None,
    init_params=None,
    prev_params=None,
    *,
    layout: Optional[ParamLayout] = None,
    placements: Union[str, Sequence[str], None] = None,
    full_dims: Optional[Sequence[int]] = None,
    process_group=None,
    histogram: bool = True,
    nbins: int = 100,
    maxval: float = 0.05,
    weight_magnitude_of: str = "all",
    refresh_prev: bool = False,
    losses: Optional[torch.Tensor] = None,
) -> ParamStats:
    """:func:`trainscope.param_stats` of tensors spread over the ranks: each rank passes its own
    parts (shards, or whole replicated tensors); every rank gets the metrics of the whole
    parameters, per tensor and globally, and the whole histograms. ``placements`` ("replicated" /
    "sharded", one or per tensor) and ``full_dims`` (the whole tensors' dims, for
    ``weight_magnitude_of="matrices"``) default to ``layout``'s (see :func:`param_layout`), else
    replicated and the local dims. ``losses`` (this rank's per-sample losses) gives the loss of the
    whole batch, in the same all-reduce. One all-reduce of T·(8 + nbins) + 2 doubles."""
    if weight_magnitude_of not in ("all", "matrices"):
        raise ValueError(f"param_stats_across_ranks: weight_magnitude_of must be 'all' or 'matrices', "
                         f"got {weight_magnitude_of!r}")
    p = [local_tensor(t) for t in tensor_list(params, "params")]
    p0, pp = tensor_list(init_params, "init_params"), tensor_list(prev_params, "prev_params")
    g = [local_tensor(t) for t in tensor_list(_zeros_for_missing(grads, p), "grads")]
    if not (g or p or p0 or pp):
        raise ValueError("param_stats_across_ranks: no tensors given (every tensor list is empty)")
    if refresh_prev and not pp:
        raise ValueError("param_stats_across_ranks: refresh_prev=True needs prev_params")
    n = max(len(g), len(p), len(p0), len(pp))
    pl = _placements(layout, placements, n)
    dims = list(full_dims) if full_dims is not None else (list(layout.full_dims) if layout is not None else [])
    if len(pl) != n:
        raise ValueError(f"param_stats_across_ranks: placements has {len(pl)} entries, the tensor lists have {n}")
    if dims and len(dims) != n:
        raise ValueError(f"param_stats_across_ranks: full_dims has {len(dims)} entries, the tensor lists have {n}")
    name = group_name(process_group if process_group is not None else (layout.group if layout is not None else None))
    extra = None
    if losses is not None:
        lt = losses.detach()
        extra = torch.cat([lt.sum(dtype=torch.float64).reshape(1),
                           torch.full((1,), float(lt.numel()), dtype=torch.float64, device=lt.device)])
    out = torch.ops.trainscope.param_stats_across_ranks(
        g, p, p0, pp, pl, [int(d) for d in dims], name, bool(histogram), *check_hist_axis(nbins, maxval),
        weight_magnitude_of == "matrices", bool(refresh_prev), extra)
    loss = None
    if losses is not None:
        dt = torch.float64 if losses.dtype == torch.float64 else torch.float32
        loss = (out[6][0] / out[6][1]).to(dt) if name else _local_loss(losses)
    return ParamStats(*out[:6], loss=loss)


def loss_across_ranks(losses: torch.Tensor, process_group=None) -> torch.Tensor:
    """Mean of the per-sample losses of the whole batch (every rank's share): one all-reduce."""
    return torch.ops.trainscope.loss_across_ranks(losses.detach(), group_name(process_group))


# ================================================================================================
# Per-sample gradient statistics across ranks
#
# The batch is split over the ranks; every statistic of SPEC.md §2 equals the single-process one
# on the concatenated batch of B = Σ_r B_r samples. They are sums over samples once every rank
# holds the global mean gradient ḡ:
#
# - per_sample_stats_across_ranks (materialised per-sample gradients): one all-reduce of the
#   parameter-sized Σᵢ gᵢ and B_r (P + 1 doubles) gives ḡ; each rank then takes ‖gᵢ‖² and gᵢ·ḡ
#   of its samples (float64) and
# - per_sample_stats_from_local_parts finishes with one all-reduce of [B_r, Σ‖gᵢ‖²,
#   Σ(gᵢ·ḡ − ‖ḡ‖²)², Σ(gᵢ·ḡ)²] (plus the histogram counts and the non-finite count, as float64,
#   exact up to 2^53).
#
# Every rank needs at least one sample (B_r >= 1) when the group has several ranks, so that
# B >= 2 holds without reading device values; a rank that fails a check raises before the first
# all-reduce, while the others wait in it: give every rank valid inputs. PerSampleHooks (layer
# factors) and RepresentationProbe use the same machinery (see their docstrings).


__all__ += ["THIS_PROCESS", "active_group", "per_sample_stats_across_ranks", "per_sample_stats_from_local_parts"]




def active_group(process_group=None):
    """The process group a metric is combined over, or None when it is this process's alone:
    ``process_group`` is :data:`THIS_PROCESS`, or torch.distributed is not initialised (with
    ``process_group=None``), or the group has one rank."""
    if process_group is THIS_PROCESS:
        return None
    g = resolve_group(process_group)
    if g is None:
        return None
    return g if rank_and_size(g)[1] > 1 else None


def per_sample_stats_across_ranks(per_sample_grads, process_group=None, histogram: bool = True, nbins: int = 100,
                                  maxval: float = 0.05) -> PerSampleStats:
    """:func:`trainscope.per_sample_stats` of a batch split over the ranks: each rank passes the
    per-sample gradients of its own samples (a tensor, list or dict, each [B_r, *param_shape], the
    same shapes on every rank, B_r >= 1). Every rank gets the statistics, histogram and non-finite
    count of the whole batch; ``parts`` are this rank's samples against the global ḡ (tied to the
    group, so ``parts.stats()`` combines again). Two all-reduces: P + 1 doubles, then
    5 + nbins. ``process_group``: None for the default group (one process when torch.distributed
    is not initialised), :data:`THIS_PROCESS` for this rank alone."""
    g = active_group(process_group)
    if g is None:
        return _local_per_sample_stats(per_sample_grads, histogram=histogram, nbins=nbins, maxval=maxval)
    sq, dots, msq, stats, hist, nonfinite = torch.ops.trainscope.per_sample_stats_across_ranks(
        _as_grad_list(per_sample_grads), group_name(g), bool(histogram), *check_hist_axis(nbins, maxval))
    return PerSampleStats(PerSampleParts(sq, dots, msq, g), stats, hist, nonfinite)


def per_sample_stats_from_local_parts(parts: PerSampleParts, process_group=None) -> torch.Tensor:
    """The six statistics [6] (float64, PER_SAMPLE_STATS order) of the whole batch from each
    rank's :class:`PerSampleParts`, taken against the *global* ḡ (the same ‖ḡ‖² on every rank):
    one all-reduce of four doubles. ``process_group``: None for ``parts.group`` if set, else the
    default group; :data:`THIS_PROCESS` (or one process) gives ``per_sample_stats_from_parts``."""
    if not isinstance(parts, PerSampleParts):
        raise TypeError(f"per_sample_stats_from_local_parts: parts must be PerSampleParts, got {type(parts).__name__}")
    g = active_group(process_group if process_group is not None else parts.group)
    stats, _ = torch.ops.trainscope.per_sample_stats_from_local_parts(
        parts.sq_norms, parts.dots, parts.mean_sq_norm, group_name(g) if g is not None else "", None)
    return stats
