"""Per-sample gradient statistics from layer factors (SPEC.md §2), never materialising B copies
of a layer's weights.

For ``nn.Linear`` (y = x Wᵀ + b, x [B, T, d_in]) sample i's weight gradient is
Gᵢ = Σ_t δ_itᵀ x_it, with δ = ∂loss/∂y the layer's output gradient. ‖Gᵢ‖², Gᵢ·Ḡ and ‖Ḡ‖² come
from x and δ alone, by one of two routes over the N = B·T rows:

- the Ḡ route (``"ghost"``, ``"tiled"``): Ḡ = δᵀx/B and x Ḡᵀ, two GEMMs as large as the
  backward pass's weight-gradient GEMM (about 4·N·d_in·d_out flops), with ‖Gᵢ‖² by the ghost
  norm Σ_{t,s}(x_it·x_is)(δ_it·δ_is) or Gᵢ formed in bounded tiles (then Σᵢ Gᵢ comes from the
  tiles; the cheaper way when 50·d_in·d_out < T²·(d_in + d_out + 100));
- the Gram route (``"gram"``, about 2·N²·(d_in + d_out) flops): with K_x = X Xᵀ and K_δ = Δ Δᵀ
  over all N rows, the per-sample block sums S_ik of K_x ∘ K_δ are Gᵢ·G_k, so ‖Gᵢ‖² = S_ii,
  Gᵢ·Ḡ = Σ_k S_ik / B and ‖Ḡ‖² = Σ_ik S_ik / B². Far cheaper when N is small next to the weight
  (roughly N below the harmonic mean of d_in and d_out).

``"auto"`` takes the route of fewer flops. ``nn.Conv2d`` is unfolded into the same problem.
The other layer kinds of :data:`SUPPORTED_LAYERS` (Embedding, the normalisation layers, Conv1d,
Conv3d, ConvTranspose1d/2d, MultiheadAttention) are measured by
:mod:`trainscope.per_sample_layers`, one class per kind, with the same parts.

The parts are float64 whatever the inputs (as the materialised path's): GEMMs run in float32
for float32/bfloat16/float16 inputs (torch's float32 matmul precision applies; TF32 is off by
default and trainscope leaves it alone; the convolutions it runs itself on a GPU are IEEE float32
whatever ``torch.backends.cudnn.conv.fp32_precision`` says, as its default is TF32) and
everything after them in float64. The Gram route
runs its GEMMs in float64 when N is small, and otherwise in float32 on rows centred on a
per-position mean, so that their rounding is relative to how much the samples differ: it stays
within SPEC.md §5's 1e-5 of float64 arithmetic however low the gradient noise (measured: 1e-7
or better). The Ḡ route's float32 Ḡ and x Ḡᵀ lose accuracy as 1/s² when per-sample gradients
differ by a relative s: norm test of float32 x, δ [64, 256] off by 2.9e-7, 2.3e-5, 7.7e-4 at
s = 0.1, 0.01, 0.001 (below 1e-8/s²). See ``per_sample_factors.h`` for the numbers.

The easy way in is :class:`PerSampleHooks`, which captures every layer's input and output
gradient during an ordinary backward::

    with trainscope.PerSampleHooks(model) as hooks:
        loss = F.cross_entropy(model(x), y)      # mean-reduced (loss_reduction="sum" otherwise)
        loss.backward()
        stats = hooks.stats()                    # PerSampleStats: stats["norm_test"], ...
        hist = hooks.grad_hist1d()               # per-sample gradient elements, int64 [100]

The functions below take one layer's input and output gradient directly; their
:class:`PerSampleParts` add up across layers (``sum(parts)``), then ``.stats()``.

A layer used more than once in a step (a model called on two batches whose losses are added, a
block applied twice, a recurrent cell unrolled over time) has one per-sample gradient, the sum
over its uses, Gᵢ = Σ_u Σ_t δ_u,itᵀ x_u,it: the functions take every use's input and output
gradient as two sequences and count each use's positions as more positions of sample i, so
every route and histogram sees the summed gradient, cross terms included. PerSampleHooks captures
every use by itself. A parameter shared by two different modules (a tied token embedding and LM
head) has as gradient the sum of both modules' contributions: PerSampleHooks measures such modules
together, cross terms exact (an Embedding tied to a Linear from their factors, other ties from
their per-sample gradients formed in tiles of samples).

The factors are exact when sample i's output depends on sample i's input alone (no batch norm
across samples between a layer and the loss). Results stay on the inputs' device; nothing
here waits for the GPU.

Under torch.distributed (DDP), :class:`PerSampleHooks` combines the ranks' shares of the batch:
its statistics and histograms are those of the whole batch, by default over the default process
group (see the class docstring for what travels and the scaling convention).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_hist_axis, register_fake
from ._lists import tensor_list
from .hist2d import hist2d_axes as _hist2d_axes
from .distributed import active_group, clean_param_name
from .per_sample_stats import PerSampleParts, PerSampleStats
from . import per_sample_layers as _layers
from .per_sample_layers import LAYER_TYPES, Materialised, any_kind_of, kind_of

#: The route: "ghost"/"tiled" (the Ḡ route, ‖Gᵢ‖² by the ghost norm or tiled), "gram" (the Gram
#: route), "auto" (the one of least work: GEMM flops and passes over their outputs).
FACTOR_METHODS = ("auto", "ghost", "tiled", "gram")

#: Layer types PerSampleHooks handles (subclasses that keep their forward are accepted too):
#: nn.Linear and nn.Conv2d by the ops here; nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
#: nn.InstanceNorm1d/2d/3d, nn.BatchNorm1d/2d/3d (with running statistics: eval mode),
#: nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d/2d and nn.MultiheadAttention by
#: :mod:`trainscope.per_sample_layers` (see there for each kind's math).
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d) + LAYER_TYPES

#: PerSampleHooks' ``on_unsupported``: a module of no supported type is an error, left out, or
#: measured by torch.func (per-sample vjps of its forward, checked to treat samples independently).
ON_UNSUPPORTED = ("error", "skip", "vmap")

IntOrPair = Union[int, Sequence[int]]

#: One use of a layer (a tensor), or every use of it in one step (a sequence of tensors, one per use).
Uses = Union[torch.Tensor, Sequence[torch.Tensor]]


def _pair(name: str, v: IntOrPair) -> list:
    if isinstance(v, int):
        return [v, v]
    v = [int(a) for a in v]
    if len(v) not in (1, 2):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v * 2 if len(v) == 1 else v


def _check_method(method: str) -> str:
    if method not in FACTOR_METHODS:
        raise ValueError(f"method must be one of {FACTOR_METHODS}, got {method!r}")
    return method


def _op_of_uses(name: str, input: Uses, grad_output: Uses) -> tuple:
    """(op overload, input, grad_output): ``.default`` for one use (two tensors), ``.uses`` for
    several (two sequences, one tensor per use), whose per-sample gradient is the sum over the uses."""
    op = getattr(torch.ops.trainscope, name)
    if isinstance(input, torch.Tensor) and isinstance(grad_output, torch.Tensor):
        return op.default, input, grad_output
    caller = f"trainscope.{name}"
    inputs, grads = tensor_list(input, "input", caller), tensor_list(grad_output, "grad_output", caller)
    if not inputs:  # an op without a tensor argument cannot dispatch
        raise ValueError(f"{caller}: input is an empty list; pass the input of every use of the layer")
    return op.uses, inputs, grads


# ------------------------------------------------------------------------------------------------
# One layer, from its input and output gradient
#
# Each function takes one use of the layer (``input`` and ``grad_output`` tensors) or every use of
# it in one step (two sequences, one tensor per use: a module called twice, a recurrent cell
# unrolled over time). Sample i's gradient is then the sum over the uses, their positions taken as
# more positions of sample i, cross terms included; row i of every use must be sample i (a use of
# another batch size is an error naming it).


def linear_per_sample_parts(input: Uses, grad_output: Uses, has_bias: bool = True,
                            method: str = "auto") -> PerSampleParts:
    """Parts of nn.Linear's per-sample gradients (weight, and bias when ``has_bias``), float64.
    ``input`` [B, ..., d_in], ``grad_output`` [B, ..., d_out] with the same leading dims (or a
    sequence of such pairs, one per use); ``method`` one of :data:`FACTOR_METHODS`."""
    op, x, d = _op_of_uses("linear_per_sample_parts", input, grad_output)
    sq, dots, msq = op(x, d, bool(has_bias), _check_method(method))
    return PerSampleParts(sq, dots, msq)


def conv2d_per_sample_parts(input: Uses, grad_output: Uses, kernel_size: IntOrPair,
                            stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                            groups: int = 1, has_bias: bool = True, method: str = "auto") -> PerSampleParts:
    """Parts of nn.Conv2d's per-sample gradients, float64 (zero padding given as numbers; see
    :func:`layer_per_sample_parts` for a module with any padding mode)."""
    op, x, d = _op_of_uses("conv2d_per_sample_parts", input, grad_output)
    sq, dots, msq = op(x, d, _pair("kernel_size", kernel_size), _pair("stride", stride),
                       _pair("padding", padding), _pair("dilation", dilation), int(groups), bool(has_bias),
                       _check_method(method))
    return PerSampleParts(sq, dots, msq)


def linear_per_sample_parts_and_weight_grad(input: torch.Tensor, grad_output: torch.Tensor, has_bias: bool = True,
                                            method: str = "auto") -> Tuple[PerSampleParts, torch.Tensor,
                                                                           Optional[torch.Tensor]]:
    """:func:`linear_per_sample_parts` of one use, the layer's weight gradient over the batch
    Σᵢ Gᵢ = δᵀx [d_out, d_in] (float32, float64 for float64 inputs), formed on the way by the Ḡ
    routes (by its own GEMM on the Gram route), and with ``has_bias`` its bias gradient [d_out]
    (float64, from the per-sample bias gradients the parts need; None otherwise): a backward pass
    that takes its gradients from here needs no weight-gradient GEMM of its own (what
    :class:`PerSampleHooks` does)."""
    op = torch.ops.trainscope.linear_per_sample_parts_and_weight_grad
    sq, dots, msq, weight_grad, bias_grad = op(input, grad_output, bool(has_bias), _check_method(method))
    return PerSampleParts(sq, dots, msq), weight_grad, bias_grad if has_bias else None


def conv2d_per_sample_parts_and_weight_grad(input: torch.Tensor, grad_output: torch.Tensor, kernel_size: IntOrPair,
                                            stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                                            groups: int = 1, has_bias: bool = True, method: str = "auto"
                                            ) -> Tuple[PerSampleParts, torch.Tensor, Optional[torch.Tensor]]:
    """:func:`conv2d_per_sample_parts` of one use, the weight gradient over the batch shaped as the
    weight [C_out, C_in/groups, kh, kw] and the bias gradient [C_out] (see
    :func:`linear_per_sample_parts_and_weight_grad`)."""
    op = torch.ops.trainscope.conv2d_per_sample_parts_and_weight_grad
    sq, dots, msq, weight_grad, bias_grad = op(
        input, grad_output, _pair("kernel_size", kernel_size), _pair("stride", stride), _pair("padding", padding),
        _pair("dilation", dilation), int(groups), bool(has_bias), _check_method(method))
    return PerSampleParts(sq, dots, msq), weight_grad, bias_grad if has_bias else None


def linear_per_sample_grad_hist1d(input: Uses, grad_output: Uses, has_bias: bool = True,
                                  nbins: int = 100, maxval: float = 0.05) -> torch.Tensor:
    """Exact int64 histogram [nbins] (SPEC.md §4) of the B·P per-sample gradient elements
    δᵢᵀxᵢ (and Σ_t δ_it) of an nn.Linear, formed tile by tile. Pass B·δ to bin the gradients of
    the per-sample losses of a mean-reduced loss."""
    op, x, d = _op_of_uses("linear_per_sample_grad_hist1d", input, grad_output)
    return op(x, d, bool(has_bias), *check_hist_axis(nbins, maxval))


def conv2d_per_sample_grad_hist1d(input: Uses, grad_output: Uses, kernel_size: IntOrPair,
                                  stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                                  groups: int = 1, has_bias: bool = True, nbins: int = 100,
                                  maxval: float = 0.05) -> torch.Tensor:
    """As :func:`linear_per_sample_grad_hist1d`, for nn.Conv2d with zero padding."""
    op, x, d = _op_of_uses("conv2d_per_sample_grad_hist1d", input, grad_output)
    return op(x, d, _pair("kernel_size", kernel_size), _pair("stride", stride), _pair("padding", padding),
              _pair("dilation", dilation), int(groups), bool(has_bias), *check_hist_axis(nbins, maxval))


def linear_per_sample_grad_hist2d(input: Uses, grad_output: Uses, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor] = None, nbins_grad: int = 100,
                                  maxval_grad: float = 0.05, nbins_param: int = 100,
                                  maxval_param: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint histogram of (per-sample gradient element, parameter value) of an nn.Linear, as
    ``trainscope::grad_hist2d`` counts it: (counts [nbins_grad, nbins_param] int64,
    nonfinite [] int64). ``bias`` None: the layer has none (or it is not tracked)."""
    op, x, d = _op_of_uses("linear_per_sample_grad_hist2d", input, grad_output)
    return op(x, d, weight, bias, *_hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param))


def conv2d_per_sample_grad_hist2d(input: Uses, grad_output: Uses, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1,
                                  padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
                                  nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                                  maxval_param: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`linear_per_sample_grad_hist2d`, for nn.Conv2d with zero padding (the kernel
    size is the weight's)."""
    op, x, d = _op_of_uses("conv2d_per_sample_grad_hist2d", input, grad_output)
    return op(x, d, weight, bias, _pair("stride", stride), _pair("padding", padding),
              _pair("dilation", dilation), int(groups),
              *_hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param))


# ------------------------------------------------------------------------------------------------
# One module, from its input and output gradient


def _supported(module: nn.Module) -> bool:
    # A subclass that replaces forward computes something else from the same parameters.
    if kind_of(module) is not None:
        return True
    if isinstance(module, nn.Conv2d):
        cls = type(module)
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _conv_input(module: nn.Conv2d, x: torch.Tensor) -> Tuple[torch.Tensor, list]:
    """The input padded as the module pads it, and the zero padding left for the op."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, list(module.padding)
    if isinstance(module.padding, str) and module.padding == "valid":
        return x, [0, 0]
    # Non-zero padding modes and "same" (whose odd remainder goes right and below, as in torch).
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), [0, 0]


def _conv_inputs(module: nn.Conv2d, input: Uses) -> Tuple[Uses, list]:
    """:func:`_conv_input` of one use (a tensor) or of every use (a sequence); the padding left
    for the op is the module's, the same for every use."""
    if isinstance(input, torch.Tensor):
        return _conv_input(module, input)
    padded = [_conv_input(module, x) for x in tensor_list(input, "input", "trainscope")]
    return [x for x, _ in padded], (padded[0][1] if padded else [0, 0])


def _layer_kind_error(name: Optional[str], module: nn.Module) -> TypeError:
    kinds = ", ".join(f"nn.{c.__name__}" for c in SUPPORTED_LAYERS)
    what = f"PerSampleHooks: layer {name!r} is" if name is not None else "trainscope: the module is"
    hint = " Pass layers=[...] to track only layers of those types." if name is not None else ""
    return TypeError(f"{what} {type(module).__name__}; per-sample gradients from layer factors handle "
                     f"{kinds} (subclasses that keep their forward).{hint}")


def _tracks_bias(module: nn.Module) -> bool:
    return module.bias is not None and module.bias.requires_grad


def _use_list(uses) -> list:
    """Every use of a layer as a list (one use given alone, or a sequence of them)."""
    return list(uses) if isinstance(uses, (list, tuple)) else [uses]


def _kind_inputs(kind, module: nn.Module, input) -> list:
    """The inputs of every use of a layer of per_sample_layers' kinds, checked as the hooks check
    the captured ones (a batch norm in train mode is refused)."""
    xs = [kind.wrap(module, x) for x in _use_list(input)]
    problem = kind.problem(module, type(module).__name__, [_Use(x, None, None) for x in xs])
    if problem is not None:
        raise ValueError(f"trainscope: {problem}")
    return xs


def layer_per_sample_parts(module: nn.Module, input: Uses, grad_output: Uses,
                           method: str = "auto", *, _kind=None) -> PerSampleParts:
    """Parts of the per-sample gradients of a module of SUPPORTED_LAYERS (its trainable
    weight and bias) from the module's input and output gradient (or those of every use of it in
    one step, as sequences: sample i's gradient is the sum over the uses). ``_kind``: the
    module's kind when the hooks chose it (torch.func for other modules)."""
    if _kind is None and not _supported(module):
        raise _layer_kind_error(None, module)
    kind = _kind or kind_of(module)
    if kind is not None:
        xs = _kind_inputs(kind, module, input)
        return kind.parts(module, xs, _use_list(grad_output), _check_method(method))
    if isinstance(module, nn.Linear):
        return linear_per_sample_parts(input, grad_output, _tracks_bias(module), method)
    x, padding = _conv_inputs(module, input)
    return conv2d_per_sample_parts(x, grad_output, module.kernel_size, module.stride, padding,
                                   module.dilation, module.groups, _tracks_bias(module), method)


def layer_per_sample_grad_hist1d(module: nn.Module, input: Uses, grad_output: Uses,
                                 nbins: int = 100, maxval: float = 0.05, *, _kind=None) -> torch.Tensor:
    """Histogram of the per-sample gradient elements of a module of SUPPORTED_LAYERS (one use,
    or every use as sequences)."""
    if _kind is None and not _supported(module):
        raise _layer_kind_error(None, module)
    kind = _kind or kind_of(module)
    if kind is not None:  # formed outright, in tiles of samples
        return Materialised([(kind, module, _kind_inputs(kind, module, input), _use_list(grad_output))]).hist1d(
            nbins, maxval, check_hist_axis)
    if isinstance(module, nn.Linear):
        return linear_per_sample_grad_hist1d(input, grad_output, _tracks_bias(module), nbins, maxval)
    x, padding = _conv_inputs(module, input)
    return conv2d_per_sample_grad_hist1d(x, grad_output, module.kernel_size, module.stride, padding,
                                         module.dilation, module.groups, _tracks_bias(module), nbins, maxval)


def layer_per_sample_grad_moments(module: nn.Module, input: Uses, grad_output: Uses, *, _kind=None) -> dict:
    """{parameter: (Σᵢ Gᵢ, Σᵢ Gᵢ²)} (float64, shaped like the parameter) of the trainable weight
    and bias of a module of SUPPORTED_LAYERS from its input and output gradient (one use, or
    every use as sequences; SPEC.md §6). nn.Linear and nn.Conv2d by the ops
    ``linear_per_sample_grad_moments`` / ``conv2d_per_sample_grad_moments`` (an nn.Linear on
    [B, d_in]: two GEMMs of the factors), other layers from per-sample gradients in tiles."""
    if _kind is None and not _supported(module):
        raise _layer_kind_error(None, module)
    kind = _kind or kind_of(module)
    if kind is not None:
        mat = Materialised([(kind, module, _kind_inputs(kind, module, input), _use_list(grad_output))])
        out = {}
        for _, tile in mat.tiles():
            for p, g in zip(mat.params, tile):
                s, q = g.sum(0), g.square().sum(0)
                out[p] = (s, q) if p not in out else (out[p][0] + s, out[p][1] + q)
        return out
    if isinstance(module, nn.Linear):
        op, x, d = _op_of_uses("linear_per_sample_grad_moments", input, grad_output)
        ws, wq, bs, bq = op(x, d, _tracks_bias(module))
    else:
        x, padding = _conv_inputs(module, input)
        op, x, d = _op_of_uses("conv2d_per_sample_grad_moments", x, grad_output)
        ws, wq, bs, bq = op(x, d, _pair("kernel_size", module.kernel_size), _pair("stride", module.stride),
                            _pair("padding", padding), _pair("dilation", module.dilation), int(module.groups),
                            _tracks_bias(module))
    out = {}
    if module.weight.requires_grad:
        out[module.weight] = (ws.view(module.weight.shape), wq.view(module.weight.shape))
    if _tracks_bias(module):
        out[module.bias] = (bs, bq)
    return out


def layer_per_sample_grad_hist2d(module: nn.Module, input: Uses, grad_output: Uses,
                                 nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                                 maxval_param: float = 1.0, *, _kind=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint (per-sample gradient, parameter value) histogram of a module of SUPPORTED_LAYERS
    (one use, or every use as sequences)."""
    if _kind is None and not _supported(module):
        raise _layer_kind_error(None, module)
    kind = _kind or kind_of(module)
    if kind is not None:  # formed outright, in tiles of samples
        return Materialised([(kind, module, _kind_inputs(kind, module, input), _use_list(grad_output))]).hist2d(
            _hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param))
    weight = module.weight.detach()
    bias = module.bias.detach() if _tracks_bias(module) else None
    if isinstance(module, nn.Linear):
        return linear_per_sample_grad_hist2d(input, grad_output, weight, bias, nbins_grad, maxval_grad,
                                             nbins_param, maxval_param)
    x, padding = _conv_inputs(module, input)
    return conv2d_per_sample_grad_hist2d(x, grad_output, weight, bias, module.stride, padding,
                                         module.dilation, module.groups, nbins_grad, maxval_grad,
                                         nbins_param, maxval_param)


# ------------------------------------------------------------------------------------------------
# One module's share of a batch split over ranks: the pieces of the cross-rank statistics
#
# Per layer, the sum of the per-sample weight gradients Σᵢ Gᵢ = δᵀx (one GEMM over all rows;
# per group after unfolding a convolution) and of the bias gradients Σ δ, then, once the global
# Ḡ and b̄ are known, the per-sample inner products gᵢ·ḡ = Σ_t δ_it·(Ḡ x_it) + (Σ_t δ_it)·b̄. Both
# in float64 (the statistics subtract nearly equal numbers), over tiles of samples whose float64
# temporaries stay below _TILE_ELEMS elements. Both are sums over the positions of a sample, so a
# layer used several times adds its uses' sums.

_TILE_ELEMS = 1 << 24


def _layer_tile(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Samples per tile of the float64 passes."""
    b = x.shape[0]
    per_sample = (x.numel() + grad.numel()) // max(b, 1)
    if isinstance(module, nn.Conv2d):
        kk = module.kernel_size[0] * module.kernel_size[1]
        per_sample += (grad.numel() // max(b, 1)) // max(module.out_channels, 1) * module.in_channels * kk
    return max(1, _TILE_ELEMS // max(2 * per_sample, 1))


def _layer_problems(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list:
    """The layer's samples as linear problems, one per conv group: [(X [b, T, k], Δ [b, T, o])],
    float64, where Gᵢ = Σ_t Δ_itᵀ X_it is sample i's gradient of the group's [o, k] block of the
    weight viewed as [d_out, -1]."""
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        return [(x.reshape(b, -1, x.shape[-1]).double(), grad.reshape(b, -1, grad.shape[-1]).double())]
    xp, padding = _conv_input(module, x)
    cols = F.unfold(xp.double(), module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride).transpose(1, 2)           # [b, L, C_in·kh·kw]
    delta = grad.double().flatten(2).transpose(1, 2)               # [b, L, C_out]
    return list(zip(cols.chunk(module.groups, dim=2), delta.chunk(module.groups, dim=2)))


def _use_grad_sum(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Σᵢ gᵢ of one use's samples, float64, flat: the weight's [d_out, k] sum, then the bias's."""
    tile = _layer_tile(module, x, grad)
    w_sum = b_sum = None
    for start in range(0, x.shape[0], tile):
        problems = _layer_problems(module, x[start:start + tile], grad[start:start + tile])
        w = torch.cat([d.reshape(-1, d.shape[-1]).T @ xx.reshape(-1, xx.shape[-1]) for xx, d in problems])
        bias = torch.cat([d.sum((0, 1)) for _, d in problems])
        w_sum, b_sum = (w, bias) if w_sum is None else (w_sum + w, b_sum + bias)
    parts = [w_sum.reshape(-1)] + ([b_sum] if _tracks_bias(module) else [])
    return torch.cat(parts)


def _layer_grad_sum(module: nn.Module, xs: List[torch.Tensor], grads: List[torch.Tensor], kind=None) -> torch.Tensor:
    """Σᵢ gᵢ of the layer's samples over its uses (inputs ``xs``, output gradients ``grads``)."""
    kind = kind or kind_of(module)
    if kind is not None:
        return kind.grad_sum(module, list(xs), list(grads))
    return functools.reduce(torch.add, [_use_grad_sum(module, x, g) for x, g in zip(xs, grads)])


def _layer_dots(module: nn.Module, xs: List[torch.Tensor], grads: List[torch.Tensor],
                mean: torch.Tensor, kind=None) -> torch.Tensor:
    """gᵢ·ḡ [b] float64 of the layer's samples over its uses, ḡ flat in _use_grad_sum's layout
    (the weight, then the tracked bias). nn.Linear and nn.Conv2d by the projection ops (a
    convolution's by the library convolution with ḡ as its weight)."""
    kind = kind or kind_of(module)
    if kind is not None:
        return kind.dots(module, list(xs), list(grads), mean)
    n_b = module.weight.shape[0] if _tracks_bias(module) else 0
    weight_dir, bias_dir = mean[:mean.numel() - n_b], (mean[mean.numel() - n_b:] if n_b else None)
    if isinstance(module, nn.Linear):
        return torch.ops.trainscope.linear_per_sample_projections.uses(list(xs), list(grads), weight_dir, bias_dir)
    x, padding = _conv_inputs(module, list(xs))
    return torch.ops.trainscope.conv2d_per_sample_projections.uses(
        x, list(grads), weight_dir.view(module.weight.shape), bias_dir, _pair("stride", module.stride),
        _pair("padding", padding), _pair("dilation", module.dilation), int(module.groups))


def _layer_sq_norms(module: nn.Module, xs: List[torch.Tensor], grads: List[torch.Tensor],
                    method: str, kind=None) -> torch.Tensor:
    """‖gᵢ‖² [b] float64 over the layer's uses by the local op (which needs two samples: a single
    one goes in twice, ‖gᵢ‖² being each sample's own)."""
    kind = kind or kind_of(module)
    if kind is not None and xs[0].shape[0] == 1:
        return Materialised([(kind, module, list(xs), list(grads))]).sq_norms()
    if xs[0].shape[0] == 1:
        xs, grads = [torch.cat([x, x]) for x in xs], [torch.cat([g, g]) for g in grads]
        return layer_per_sample_parts(module, xs, grads, method, _kind=kind).sq_norms[:1]
    return layer_per_sample_parts(module, xs, grads, method, _kind=kind).sq_norms


def _sum_over_ranks(counts: torch.Tensor, process_group) -> torch.Tensor:
    """Additive results (histogram counts) summed over the ranks of the active group, if any."""
    group = active_group(process_group)
    if group is None:
        return counts
    import torch.distributed as dist

    counts = counts.contiguous()
    dist.all_reduce(counts, group=group)
    return counts


_NO_HIST = torch.empty(0, dtype=torch.int64)


def _coverage_of(hooks) -> Optional[object]:
    """What PerSampleStats.coverage holds for ``hooks``: their ``coverage`` when they have one
    that leaves parameters out, else None (every parameter covered)."""
    coverage = getattr(hooks, "coverage", None)
    if coverage is None:
        return None
    skipped = coverage.get("skipped") if isinstance(coverage, dict) else getattr(coverage, "skipped", None)
    if skipped is not None and len(skipped) == 0:
        return None
    return coverage


# ------------------------------------------------------------------------------------------------
# Module hooks


@dataclass
class _Use:
    """One application of a layer in the current step: its input, and the gradient of its output
    once backward has reached it."""
    input: torch.Tensor
    out_shape: torch.Size
    out_dtype: torch.dtype
    grad: Optional[torch.Tensor] = None
    to_batch_first: bool = False        # the output is [L, B, ...] (MultiheadAttention, batch_first=False)
    weights_reached_loss: bool = False  # MultiheadAttention's attention weights got a gradient
    parts: Optional[PerSampleParts] = None  # taken on the backward pass (_WeightGradFromParts)


@dataclass
class _Capture:
    uses: List[_Use] = field(default_factory=list)


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (activation checkpointing runs
    forward passes there to recompute what it did not keep)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _hook_target(output: torch.Tensor):
    """The tensor whose gradient to hook, and how to read the output's gradient out of it.

    A hook on a view (nn.Linear on a [B, T, d] input with a bias returns one) misses the gradient
    that reaches the view through a later in-place change of it (an in-place ReLU), which autograd
    routes to the view's base. The base's gradient is complete, and the view's elements are read
    out of it."""
    if output._is_view():
        base = output._base
        if base.is_contiguous() and base.requires_grad:
            return base, (output.size(), output.stride(), output.storage_offset() - base.storage_offset())
    return output, None


@dataclass
class _Fused:
    """What a layer's fused backward (:class:`_WeightGradFromParts`) needs of its hooks."""
    hooks: "PerSampleHooks"
    name: str
    module: nn.Module
    use: _Use
    step: int
    output: Optional[torch.Tensor]  # the layer's output, handed over once by forward


def _plain_grads(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, needs: tuple):
    """(input, weight, bias) gradients of an nn.Linear or nn.Conv2d (zero padding) as its own
    backward pass computes them; None where not needed. Differentiable (a backward pass with
    create_graph=True runs this)."""
    need_x, need_w, need_b = needs
    if isinstance(module, nn.Conv2d):
        bias_sizes = [weight.shape[0]] if need_b else None
        return torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, list(module.stride), list(module.padding), list(module.dilation), False,
            [0, 0], module.groups, [need_x, need_w, need_b])
    rows = grad.reshape(-1, grad.shape[-1])
    return (grad.matmul(weight) if need_x else None,
            rows.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None,
            rows.sum(0) if need_b else None)


def _parts_and_weight_grad(module: nn.Module, x: torch.Tensor, d: torch.Tensor, method: str):
    if isinstance(module, nn.Conv2d):
        return conv2d_per_sample_parts_and_weight_grad(x, d, module.kernel_size, module.stride, module.padding,
                                                       module.dilation, module.groups, _tracks_bias(module), method)
    return linear_per_sample_parts_and_weight_grad(x, d, _tracks_bias(module), method)


class _WeightGradFromParts(torch.autograd.Function):
    """The output of an nn.Linear or nn.Conv2d measured alone, with a backward pass that takes the
    layer's statistics and its weight gradient together: the parts from the layer's input and
    output gradient, and the weight gradient Σᵢ Gᵢ that the Ḡ routes form on the way (their
    per-sample tiles summed, or their own Ḡ GEMM), so that no weight-gradient GEMM of the layer's
    own backward runs. The forward pass is the layer's, already run: this node replaces its graph.

    Where the parts cannot be taken there — the layer used again in the step, a second gradient
    reaching the same output (retain_graph), a backward pass with create_graph=True, or a cleared
    step — the gradients are the layer's own (:func:`_plain_grads`) and the parts are taken later
    from the captured input and output gradient, as for any other layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, fused: _Fused):
        ctx.fused = fused
        ctx.save_for_backward(x, weight)
        out, fused.output = fused.output, None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        f: _Fused = ctx.fused
        hooks, use, module = f.hooks, f.use, f.module
        current = f.step == hooks._step
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        fuse = (current and need_w and use.grad is None and not torch.is_grad_enabled()
                and len(hooks._captures[f.name].uses) == 1)
        parts = None
        if fuse:
            try:
                parts, grad_w, grad_b = _parts_and_weight_grad(module, x, grad.detach(), hooks.method)
            except RuntimeError:  # the training step goes on; stats() raises what it raises
                parts = None
        if parts is not None:
            # The input gradient alone: the weight's and the bias's came with the parts (a bias is
            # passed here exactly when it is tracked, so need_b is has_bias).
            grad_x = _plain_grads(module, x, weight, grad, (need_x, False, False))[0]
            grad_w = grad_w.to(weight.dtype)
            grad_b = grad_b.to(weight.dtype) if need_b else None
        else:
            grad_x, grad_w, grad_b = _plain_grads(module, x, weight, grad, (need_x, need_w, need_b))
        if current:
            use.parts = parts
            d = grad.detach()
            # Reached twice (backward calls through a retained graph): the gradients add up, as .grad's.
            use.grad = d if use.grad is None else use.grad + d
            hooks._backward_seen = True
        return grad_x, grad_w, grad_b, None


def _supported_by_ops(module: nn.Module) -> bool:
    """nn.Linear and nn.Conv2d, measured by the ops of this module."""
    return _supported(module) and kind_of(module) is None


def _layers_kind_error(layers: list, all_layers: bool) -> TypeError:
    kinds = ", ".join(f"nn.{c.__name__}" for c in SUPPORTED_LAYERS)
    listed = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in layers)
    hint = " Pass layers=[...] to track only supported layers, on_unsupported='skip' to measure the rest " \
        "(hooks.coverage then lists what is left out), or on_unsupported='vmap' to measure them by torch.func " \
        "(per-sample vector-Jacobian products of their forward)." if all_layers else ""
    return TypeError(f"PerSampleHooks: layer {listed} {'is' if len(layers) == 1 else 'are'} not supported; "
                     f"per-sample gradients handle {kinds} (subclasses that keep their forward).{hint}")


def _trainable_param_names(model: nn.Module) -> dict:
    """{id(parameter): (name, numel)} of the model's trainable parameters, each once."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in out:
            out[id(p)] = (clean_param_name(name), p.numel())
    return out


@dataclass
class Coverage:
    """Which trainable parameters per-sample statistics cover (:attr:`PerSampleHooks.coverage`):
    ``covered`` and ``skipped`` hold parameter names, ``fraction`` the covered share of the
    trainable parameter count, ``reasons`` {skipped name: why}."""
    covered: List[str]
    skipped: List[str]
    fraction: float
    reasons: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def as_dict(self) -> dict:
        return {"covered": self.covered, "skipped": self.skipped, "fraction": self.fraction,
                "reasons": self.reasons}


# torch's transformer layers; their self_attn's batch_first is the layout of everything inside.
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _check_transformer_layouts(model: nn.Module, layers: list, batch_first: bool) -> None:
    """ValueError when a tracked layer that takes sequences sits inside a torch transformer layer
    whose batch_first differs from the hooks': its rows would be positions, not samples (and when
    T = B no batch-size check could tell)."""
    tracked = {id(m): n for n, m in layers if any_kind_of(m) is not None and any_kind_of(m).seq_first_dims}
    for owner_name, owner in model.named_modules():
        attn = getattr(owner, "self_attn", None)
        if not isinstance(owner, _TRANSFORMER_LAYERS) or getattr(attn, "batch_first", batch_first) == batch_first:
            continue
        inside = [tracked[id(m)] for m in owner.modules() if id(m) in tracked]
        if inside:
            layout = "[B, T, ...]" if attn.batch_first else "[T, B, ...] (torch's default)"
            raise ValueError(
                f"PerSampleHooks: layer {inside[0]!r} is inside {clean_param_name(owner_name)!r} "
                f"({type(owner).__name__}, batch_first={attn.batch_first}), whose layers take {layout} inputs, "
                f"but the hooks have batch_first={batch_first}: pass batch_first={attn.batch_first} (every "
                "sequence layer of the model in that layout)")


class PerSampleHooks:
    """Captures the input and the output gradient of every layer of ``model`` that holds trainable
    parameters (or of the listed ``layers``: modules or their names) during an ordinary forward
    and ``loss.backward()``, for per-sample gradient statistics of their trainable parameters.

    Layers of :data:`SUPPORTED_LAYERS`: nn.Linear and nn.Conv2d (layer factors, the ops of this
    module); nn.Embedding (per-sample rows summed per token, no [B, V, D] tensor; padding_idx rows
    get nothing; scale_grad_by_freq is refused); nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, affine
    nn.InstanceNorm1d/2d/3d and nn.BatchNorm1d/2d/3d normalising with running statistics (eval
    mode): per-sample gradients [B, C] from the normalised input recomputed with the module's eps
    and statistics; nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d/2d (unfolded into the Linear/Conv2d
    problem); nn.MultiheadAttention (all its parameters, out_proj included: its projections as
    Linear problems on disjoint rows, from one batched recomputation of the attention between them
    from the captured query, key, value and masks; with bias_k/bias_v, add_zero_attn or a frozen
    parameter its forward recomputed in float64, one vjp per sample with torch.func.vmap, in tiles
    of samples; dropout in train mode and attention weights that reach the loss are refused; it
    reads the module's parameters when measuring, so measure before ``optimizer.step()``:
    parameters changed since the forward pass raise ValueError naming the layer). See :mod:`trainscope.per_sample_layers`.

    ``batch_first`` (True): every tracked layer's input holds the batch in dim 0 (row i is
    sample i), except nn.MultiheadAttention, which follows its own ``batch_first``. False, for a
    model in torch's sequence-first layout (nn.Transformer* and nn.MultiheadAttention by default,
    token ids [T, B]): nn.Linear, nn.LayerNorm and nn.RMSNorm on inputs of 3 or more dims and
    nn.Embedding on 2 or more hold it in dim 1 (captured as [B, T, ...] views; their weight
    gradient is then never fused), while [B, D] inputs (a classifier on pooled features),
    convolutions and the channel norms stay batch-first. A sequence layer inside an
    nn.TransformerEncoderLayer or nn.TransformerDecoderLayer whose ``batch_first`` differs from
    the hooks' raises ValueError naming it at construction: when T = B no batch-size check could
    tell positions from samples.

    ``on_unsupported``: with ``"error"`` (default) a module holding trainable parameters that is
    none of these raises TypeError naming every such module and its type; with ``"skip"`` those
    modules are left out and :attr:`coverage` lists the parameters covered and skipped and the
    covered fraction of the parameter count, so that a result never leaves something out
    silently. What is found at measurement time (a batch norm normalising with batch statistics,
    which mix the samples) raises ValueError naming the layer, or under ``"skip"`` leaves the
    layer out and reports it in :attr:`coverage`. Passes under ``torch.no_grad()`` are ignored.
    With ``"vmap"`` such a module (its own trainable parameters) is measured by torch.func
    (:class:`trainscope.per_sample_layers.GenericKind`: per-sample vector-Jacobian products of its
    forward, recomputed from the captured call with the parameters copied at the forward pass,
    checked on the first samples to treat samples independently); what cannot be measured so (a
    forward that mixes the samples, randomness, several outputs carrying gradients) raises
    ValueError naming the layer when the results are taken.

    **Tied parameters** — a parameter held by several modules (a GPT-style token embedding and LM
    head, ``head.weight = emb.weight``; two Linear sharing a weight) — have one per-sample
    gradient, the sum over the modules (SPEC.md §2). The modules are measured together (one entry
    of :meth:`layer_parts`, named "emb+head"), cross terms exact: an nn.Embedding tied to an
    nn.Linear from their factors (no [B, V, D] tensor), other ties from their per-sample gradients
    formed outright in tiles of samples (memory bounded by a tile: at least one sample's copy of
    their parameters). Tracking only some of them (``layers=[...]``) raises ValueError
    naming both modules; under ``"skip"`` a tie with an unsupported module is left out whole.

    **A layer used more than once in a step** — the model called on two batches whose losses are
    added (siamese and contrastive losses), a block applied twice, one module object appearing
    twice in a Sequential, a recurrent cell unrolled over time — has one per-sample gradient, the
    sum over its uses (SPEC.md §2). Every use is captured; the statistics and histograms are
    those of that sum, cross terms included: each use's positions count as more positions of
    sample i (:func:`linear_per_sample_parts` with a sequence of uses). A step is every forward
    pass with grad enabled since the latest backward: the first forward pass (of ``model`` or of
    a tracked layer) after a backward starts a new capture, and backward passes with
    ``retain_graph`` that reach one output twice add up its gradients, as ``.grad`` does (forward
    passes run inside backward to recompute checkpointed activations start nothing). What cannot
    be right is an error naming the layer, never a silent wrong value:

    - uses of one layer with different batch sizes (``model(x)`` with B rows and ``model(x2)``
      with B' ≠ B) cannot be paired sample by sample: :meth:`parts`, :meth:`stats` and the
      histograms raise ValueError naming the layer and the sizes;
    - layers that see different batch sizes (a position embedding of an unbatched
      ``torch.arange(T)``, whose rows are positions: expand it to [B, T]) raise ValueError naming
      them.

    A use whose output did not reach the loss contributes nothing (its output gradient is zero,
    and so is its share of the per-sample gradient), whatever its batch size; a tracked layer none
    of whose outputs reached the loss has per-sample gradients of zero (counted by the
    histograms). A parameter read outside its module's forward (``F.linear(x, self.fc.weight)``)
    is not seen by the hooks.

    Everything describes the gradients ∇ℓᵢ of the per-sample losses, as the materialised path
    does: with ``loss_reduction="mean"`` (the loss is the mean of B per-sample losses, torch's
    default) the captured gradients ∇ℓᵢ/B are scaled back by B (parts by B²); pass ``"sum"`` for a
    summed loss. A wrong choice changes only the scale: the norm, inner-product and orthogonality
    tests and the noise scale are scale-free, tr Σ̂, ‖G‖² and the histograms are not. (Two
    mean-reduced losses added, ``loss(model(x1)) + loss(model(x2))``, are 1/B times the sum of
    their per-sample losses ℓᵢ = ℓ(x1ᵢ) + ℓ(x2ᵢ): ``"mean"`` still describes ∇ℓᵢ.)
    :meth:`grad_hist2d` pairs gradients with the parameters' current values: call it before
    ``optimizer.step()``.

    The captured inputs are held until the next step, :meth:`clear` or :meth:`remove`.

    **The weight gradient taken with the statistics** (``fuse_weight_grad=True``, the default). On
    a step whose statistics are due (:attr:`stats_due`, which trainscope.Monitor sets per step), an
    nn.Linear or nn.Conv2d measured alone (used once, no tied parameter) takes its parts and its
    weight gradient in one computation on the backward pass: the Ḡ routes form Σᵢ Gᵢ anyway (from
    their per-sample tiles, or their own GEMM), so the layer's own weight-gradient GEMM is not run
    (:func:`linear_per_sample_parts_and_weight_grad`). Where the whole batch's per-sample blocks
    fit the tile budget, the statistics then cost about passes over those blocks, not GEMMs: a
    Linear(768, 768) on B = 8, T = 256, backward with statistics on a CPU, +50 % → +20 % over the
    plain backward (bench/README.md, bench_fused_backward.py). The LM head of a tied token
    embedding is fused too (its own parts are what costs GEMMs in the tie). The forward hook
    replaces the layer's output by one whose backward does this, so the hooks run first among the
    layer's forward hooks and every other one sees the replacement. The weight and bias gradients
    are the same sums as the layer's own, in another order (the bias's in float64, from the
    per-sample bias gradients the parts need; they agree to the dtype's rounding); the input
    gradient is the layer's own. Where the parts cannot be taken there (the layer used
    again in the step, a gradient reaching the output twice, ``create_graph=True``, an error), the
    layer's own gradients are returned and the parts are taken later, as for other layers: the
    training step never fails for it. Not fused: under autocast or mixed dtypes, padding modes
    other than zeros or a string padding, torch.compile, several processes.
    ``fuse_weight_grad=False`` keeps autograd's own weight gradients on every step.

    **Under torch.distributed** (DDP: every rank runs forward and backward on its own share of the
    batch) :meth:`layer_parts`, :meth:`parts`, :meth:`stats`, :meth:`grad_hist1d` and
    :meth:`grad_hist2d` describe the whole batch, as one process would on the concatenated batch
    with the same ``loss_reduction``: by default over the default process group when it is
    initialised (``process_group=`` another group, or
    :data:`trainscope.distributed.THIS_PROCESS` for this rank's share alone). They are then
    collectives: call them on every rank, in the same order (a call on rank 0 alone waits for the
    others forever). With several ranks, :meth:`layer_parts` costs, per layer and in float64, the
    local Σᵢ Gᵢ = δᵀx and Σ δ (for a convolution after unfolding, per group; summed over the uses
    of a layer used several times), ONE all-reduce of every layer's sums and B_r (the parameter
    count + 1 doubles) giving the global Ḡ and b̄, then gᵢ·ḡ = Σ_t δ_it·(Ḡ x_it) + (Σ_t δ_it)·b̄
    (one more float64 GEMM per layer and use) and ‖gᵢ‖² from the local route (``method``);
    :meth:`stats` adds one all-reduce of four doubles
    (:func:`trainscope.distributed.per_sample_stats_from_local_parts`), the histograms one of
    their counts. Each rank's ``loss_reduction="mean"`` is the mean over its own B_r samples (what
    DDP runs), so its captured gradients are scaled back by B_r: every rank's gᵢ is ∇ℓᵢ, and all
    six statistics, the scale-dependent ``grad_variance_trace`` and ``grad_sq_norm_unbiased``
    included, equal the single-process ones on the whole batch with a mean-reduced loss (a loss
    reduced otherwise, e.g. divided by the global batch, changes only those two and the
    histograms, as on one process). Every rank needs at least one sample (a rank without one
    raises before the first all-reduce, leaving the others waiting in it). The statistics and
    :meth:`grad_hist1d` read only the captured x and δ, never the parameters; :meth:`grad_hist2d`
    pairs gradients with the parameter values this rank holds, which must be whole (DDP). Every
    supported layer kind and tied parameters take this path (their Σᵢ gᵢ and gᵢ·ḡ in float64;
    MultiheadAttention's and tied modules' from their per-sample gradients, recomputed for gᵢ·ḡ).
    """

    def __init__(self, model: nn.Module, layers: Optional[Iterable[Union[nn.Module, str]]] = None, *,
                 method: str = "auto", loss_reduction: str = "mean", on_unsupported: str = "error",
                 fuse_weight_grad: bool = True, batch_first: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleHooks: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"PerSampleHooks: batch_first must be a bool, got {type(batch_first).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"PerSampleHooks: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if on_unsupported not in ON_UNSUPPORTED:
            raise ValueError(f"PerSampleHooks: on_unsupported must be one of {ON_UNSUPPORTED}, got {on_unsupported!r}")
        self.method = _check_method(method)
        self.loss_reduction = loss_reduction
        self.on_unsupported = on_unsupported
        self._layers, self._groups, self._skipped, self._generic = self._select(model, layers, on_unsupported)
        self.batch_first = batch_first
        _check_transformer_layouts(model, self._layers, batch_first)
        self._param_names = _trainable_param_names(model)
        # The Linear of an Embedding–Linear tie: its own parts (the tie's part that costs GEMMs)
        # come from its factors alone, so its backward pass can take them with its weight gradient.
        modules = dict(self._layers)
        self._fusible_heads = {
            n for g in self._groups
            if _layers.TiedEmbeddingLinear.applies([(self._any_kind(modules[k]), modules[k], None, None) for k in g])
            for n in g if isinstance(modules[n], nn.Linear)}
        self._runtime_skipped: dict = {}  # {layer name: why} of the latest step (on_unsupported="skip")
        self._captures = {name: _Capture() for name, _ in self._layers}
        self._step = 0                # stamps the gradient hooks of the current step
        self._backward_seen = False   # a gradient of the current step has arrived
        #: Off: forward passes capture nothing (and cost nothing but a check); what was captured
        #: stays until :meth:`clear`. trainscope.Monitor arms its hooks only for due steps.
        self.enabled = True
        if not isinstance(fuse_weight_grad, bool):
            raise TypeError(f"PerSampleHooks: fuse_weight_grad must be a bool, got {type(fuse_weight_grad).__name__}")
        self.fuse_weight_grad = fuse_weight_grad
        #: Whether :meth:`stats` (or :meth:`parts`, :meth:`layer_parts`) will be taken for the steps
        #: captured from now on: with ``fuse_weight_grad``, their parts are then taken on the backward
        #: pass, and nn.MultiheadAttention's projection factors are read from the training pass's
        #: graph (held until the step's results are taken) instead of recomputed afterwards.
        #: trainscope.Monitor sets it per step (False when only histograms, alpha or the gradient
        #: variance are due); the statistics are right either way.
        self.stats_due = True
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        for name, module in self._layers:
            # First among the layer's forward hooks, so that every other one sees the output that
            # carries the gradient (see _fuses).
            self._handles.append(module.register_forward_hook(
                functools.partial(self._on_layer_forward, name), with_kwargs=True, prepend=True))

    # -- selection

    @staticmethod
    def _select(model: nn.Module, layers, on_unsupported: str) -> tuple:
        """(tracked [(name, module)], tie groups [[name, ...]] of tracked modules sharing
        parameters, {id(parameter): why} of the trainable parameters left out, ids of the tracked
        modules measured by torch.func: on_unsupported="vmap")."""
        # Layers are named by the model's own names (without DDP's "module." and the like).
        names = {m: clean_param_name(n) for n, m in model.named_modules()}
        # Submodules whose parameters their parent reads itself (MultiheadAttention's out_proj).
        # (a subclass with its own forward too: its out_proj goes with it, supported or not).
        claimed = {}
        for module, name in names.items():
            if isinstance(module, nn.MultiheadAttention):
                claimed[id(module.out_proj)] = (name, module)

        def owned(module) -> list:
            kind = any_kind_of(module)
            if kind is not None:
                return [p for _, p in kind.params(module)]
            recurse = isinstance(module, nn.MultiheadAttention)
            return [p for p in module.parameters(recurse=recurse) if p.requires_grad]

        if layers is None:
            candidates = [(name, module) for module, name in names.items()
                          if id(module) not in claimed and owned(module)]
        else:
            if isinstance(layers, (nn.Module, str)):
                layers = [layers]
            candidates = []
            for layer in layers:
                if isinstance(layer, str):
                    name, module = layer, model.get_submodule(layer)
                elif isinstance(layer, nn.Module):
                    if layer not in names:
                        raise ValueError(f"PerSampleHooks: layers holds a {type(layer).__name__} that is "
                                         "not a submodule of model")
                    name, module = names[layer], layer
                else:
                    raise TypeError(f"PerSampleHooks: layers holds a {type(layer).__name__}; "
                                    "expected modules or their names")
                if id(module) in claimed:
                    parent_name, parent = claimed[id(module)]
                    raise ValueError(f"PerSampleHooks: layer {name!r} is read by its parent {parent_name!r} "
                                     f"({type(parent).__name__}), not through its own forward; track {parent_name!r}")
                if any_kind_of(module) is not None and not owned(module):
                    raise ValueError(f"PerSampleHooks: layer {name!r} has no trainable parameters")
                candidates.append((name, module))
        unique, seen = [], set()
        for name, module in candidates:  # one module listed twice (or under two names) is tracked once
            if id(module) not in seen:
                seen.add(id(module))
                unique.append((name, module))
        candidates = unique

        skipped: dict = {}
        unsupported = [(n, m) for n, m in candidates if any_kind_of(m) is None]
        if unsupported and on_unsupported == "error":
            raise _layers_kind_error(unsupported, layers is None)
        generic = {id(m) for n, m in unsupported} if on_unsupported == "vmap" else set()
        for n, m in unsupported:
            if id(m) not in generic:
                for p in owned(m):
                    skipped.setdefault(id(p), f"layer {n!r} ({type(m).__name__}) is not supported")
        chosen = [(n, m) for n, m in candidates if any_kind_of(m) is not None or id(m) in generic]
        for name, module in chosen:
            if _supported_by_ops(module) and not module.weight.requires_grad and _tracks_bias(module):
                raise ValueError(f"PerSampleHooks: layer {name!r} has a frozen weight and a trainable bias; "
                                 "layer factors give the weight and bias together")

        # Parameters shared by several modules (tied weights): those modules are measured together.
        holders: dict = {}
        for module, name in names.items():
            if id(module) in claimed:
                continue
            for p in owned(module):
                entry = holders.setdefault(id(p), [])
                if all(m is not module for _, m in entry):
                    entry.append((name, module))
        tracked = {id(m) for _, m in chosen}
        parent = {id(m): id(m) for _, m in chosen}

        def root(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        dropped = set()
        for pid, holders_of in holders.items():
            inside = [(n, m) for n, m in holders_of if id(m) in tracked]
            outside = [(n, m) for n, m in holders_of if id(m) not in tracked]
            if inside and outside:
                (n, m), (on, om) = inside[0], outside[0]
                pname = next(k for k, p in m.named_parameters() if id(p) == pid)
                why = (f"layer {n!r} ({type(m).__name__}) and module {on!r} ({type(om).__name__}) share the "
                       f"parameter {pname!r} (tied weights), and {on!r} is not measured")
                if on_unsupported != "skip" or layers is not None and any_kind_of(om) is not None:
                    raise ValueError(f"PerSampleHooks: {why}: its per-sample gradient is the sum of both modules' "
                                     f"contributions. Track both (layers=[...]) or leave both out.")
                dropped.update(id(mm) for _, mm in inside)
                skipped.setdefault(pid, why)
            for (_, a), (_, b) in zip(inside, inside[1:]):
                parent[root(id(a))] = root(id(b))
        # A tie group with a module left out is left out whole.
        dropped_roots = {root(k) for k in dropped}
        kept = []
        for n, m in chosen:
            if root(id(m)) in dropped_roots:
                for p in owned(m):
                    skipped.setdefault(id(p), f"layer {n!r} shares parameters with a module that is not measured")
            else:
                kept.append((n, m))
        if not kept:
            raise ValueError("PerSampleHooks: model has no trainable layers of the supported types "
                             f"({', '.join('nn.' + c.__name__ for c in SUPPORTED_LAYERS)})")
        by_root: dict = {}
        for n, m in kept:
            by_root.setdefault(root(id(m)), []).append(n)
        groups = [g for g in by_root.values() if len(g) > 1]
        return kept, groups, skipped, generic & {id(m) for _, m in kept}

    def _kind(self, module: nn.Module):
        """The module's kind among per_sample_layers' (None for nn.Linear and nn.Conv2d, which
        the ops measure), torch.func's for a module of no kind measured by it."""
        kind = kind_of(module)
        return _layers.GENERIC if kind is None and id(module) in self._generic else kind

    def _any_kind(self, module: nn.Module):
        """As :meth:`_kind`, nn.Linear and nn.Conv2d included."""
        kind = any_kind_of(module)
        return _layers.GENERIC if kind is None and id(module) in self._generic else kind

    @property
    def layers(self) -> list:
        """Names of the tracked layers."""
        return [name for name, _ in self._layers]

    @property
    def coverage(self) -> "Coverage":
        """Which trainable parameters of the model the statistics cover: :class:`Coverage` with
        ``covered`` and ``skipped`` (parameter names), ``fraction`` (of the trainable parameter
        count that is covered) and ``reasons`` ({skipped name: why}). Layers skipped at
        measurement time (``on_unsupported="skip"``: a batch norm in train mode) count from the
        latest :meth:`layer_parts`, :meth:`stats` or histogram."""
        skipped = dict(self._skipped)
        runtime = {}
        for name, module in self._layers:
            if name in self._runtime_skipped:
                kind = self._any_kind(module)
                for _, p in kind.params(module):
                    runtime.setdefault(id(p), self._runtime_skipped[name])
        skipped.update(runtime)
        covered, left, reasons = [], [], {}
        n_cov = n_all = 0
        tracked = self._tracked_param_ids()
        for pid, (pname, numel) in self._param_names.items():
            n_all += numel
            if pid in skipped:
                left.append(pname)
                reasons[pname] = skipped[pid]
            elif pid in tracked:
                covered.append(pname)
                n_cov += numel
            else:
                left.append(pname)
                reasons[pname] = "not in layers=[...]"
        return Coverage(covered, left, n_cov / n_all if n_all else float("nan"), reasons)

    def _tracked_param_ids(self) -> set:
        out = set()
        for _, module in self._layers:
            out.update(id(p) for _, p in self._any_kind(module).params(module))
        return out

    # -- hooks

    def _start_step_after_backward(self) -> None:
        """A forward pass after the current step's backward starts a new step; one that runs
        inside backward (recomputing checkpointed activations) belongs to the current step."""
        if self._backward_seen and not _in_backward():
            self.clear()

    def _on_model_forward(self, module, args):
        if self.enabled and torch.is_grad_enabled() and not _layers.recomputing():
            self._start_step_after_backward()

    def _on_layer_forward(self, name, module, args, kwargs, output):
        if _layers.recomputing():  # a module run again by torch.func for its per-sample gradients
            return
        kind = self._kind(module)
        out = kind.output(output) if kind is not None else output
        generic = kind is _layers.GENERIC
        if generic and out is None and self.enabled and torch.is_grad_enabled() and \
                _layers.GenericKind.output_index(output) == -1:
            # Several outputs carry gradients: held as a use that cannot be measured (an error
            # naming the layer when the results are taken), never silently left out.
            self._start_step_after_backward()
            self._captures[name].uses.append(_Use(kind.capture(module, args, kwargs, output), None, None))
            return
        if not (self.enabled and torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
            return
        self._start_step_after_backward()
        if generic:
            x = kind.capture(module, args, kwargs, output)
        elif kind is not None:
            x = kind.capture(module, args, kwargs)
        else:
            x = (args[0] if args else kwargs["input"]).detach()
        # Inputs and outputs [T, B, ...] (batch_first=False) are held as [B, T, ...] views.
        seq_first = self._seq_first(module, args, kwargs)
        if seq_first:
            x = self._any_kind(module).batch_to_front(x)
        to_batch_first = seq_first or (isinstance(kind, _layers.MHAKind) and kind.grad_to_batch_first(module)
                                       and out.dim() == 3)
        shape = out.transpose(0, 1).shape if to_batch_first else out.shape
        use = _Use(x, shape, out.dtype, to_batch_first=to_batch_first)
        self._captures[name].uses.append(use)
        if kind is None and not seq_first and self._fuses(name, module, args, kwargs, out):
            x_in = args[0] if args else kwargs["input"]
            bias = module.bias if _tracks_bias(module) else None
            return _WeightGradFromParts.apply(x_in, module.weight, bias,
                                              _Fused(self, name, module, use, self._step, out.detach()))
        target, view = _hook_target(out)
        target.register_hook(functools.partial(self._on_grad, use, self._step, view))
        if isinstance(kind, _layers.MHAKind):
            if isinstance(output[1], torch.Tensor) and output[1].requires_grad:
                output[1].register_hook(functools.partial(self._on_weights_grad, use, self._step))
            if self.stats_due and not torch.compiler.is_compiling():
                step = self._step
                kind.read_projections(module, x, out, lambda: step == self._step)

    def _seq_first(self, module: nn.Module, args, kwargs) -> bool:
        """Whether this use's input holds positions before the batch ([T, B, ...]): under
        ``batch_first=False``, for the layer kinds that take sequences, at their sequence rank."""
        if self.batch_first:
            return False
        dims = self._any_kind(module).seq_first_dims
        x = args[0] if args else kwargs.get("input")
        return dims is not None and isinstance(x, torch.Tensor) and x.dim() >= dims

    def _fuses(self, name: str, module: nn.Module, args, kwargs, out: torch.Tensor) -> bool:
        """Whether this use of an nn.Linear or nn.Conv2d gets a backward pass that takes its parts
        and its weight gradient together (:class:`_WeightGradFromParts`): statistics due; the
        layer measured alone (no tied parameter, or the Linear of an Embedding–Linear tie, whose
        own parts TiedEmbeddingLinear takes as they are); its weight trainable; input, weight and
        output of one dtype (not under autocast); a batch of two samples or more; zero padding
        given as numbers; one process; not compiled; the output neither fused by other hooks
        already nor its gradient watched.

        The layer's other forward hooks run after this one and see the replacement (a hook
        registered later with prepend=True runs before it and sees the layer's own output, whose
        gradient then no longer flows: register such a hook without prepend). A checkpoint's
        recomputation inside backward is treated as its original forward pass was (it must save
        the same tensors); that use never gets a gradient of its own, so its layer's backward
        computes its own gradients and the parts come later."""
        if not (self.fuse_weight_grad and self.stats_due and module.weight.requires_grad):
            return False
        # Fused already (by other hooks on the same model, whose hook ran first), or the output's
        # gradient already watched: this output must stay the one that reaches the loss.
        if isinstance(out.grad_fn, _WeightGradFromParts._backward_cls) or out._backward_hooks or out.retains_grad:
            return False
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not (x.dtype == out.dtype == module.weight.dtype):
            return False
        conv = isinstance(module, nn.Conv2d)
        if x.dim() < 2 or (conv and x.dim() != 4) or x.shape[0] < 2:
            return False  # unbatched, or too few samples for statistics: the layer's own backward
        if any(name in g for g in self._groups) and name not in self._fusible_heads:
            return False
        if torch.compiler.is_compiling():
            return False
        if conv and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            return False
        return active_group(None) is None

    def _on_weights_grad(self, use: _Use, step: int, grad: torch.Tensor):
        if step == self._step:
            use.weights_reached_loss = True

    def _on_grad(self, use: _Use, step: int, view, grad: torch.Tensor):
        if step != self._step:  # a use of a step that was cleared
            return
        if view is not None:
            grad = grad.contiguous().as_strided(*view)
        grad = grad.detach()
        if use.to_batch_first:
            grad = grad.transpose(0, 1)
        # Reached twice (backward calls through a retained graph): the gradients add up, as .grad's.
        use.grad = grad if use.grad is None else use.grad + grad
        self._backward_seen = True

    # -- results

    @property
    def captured(self) -> bool:
        """Whether an output gradient of the current step has been captured (the results can be
        taken)."""
        return any(u.grad is not None for cap in self._captures.values() for u in cap.uses)

    def _ready(self) -> list:
        """(name, module, inputs, output gradients) of every tracked layer that ran in the latest
        step: one input and one output gradient per use whose output reached the loss."""
        ran, any_grad = [], False
        for name, module in self._layers:
            uses = self._captures[name].uses
            if uses:
                any_grad = any_grad or any(u.grad is not None or getattr(u.input, "problem", None) is not None
                                              for u in uses)  # a generic call that cannot be measured says why
                ran.append((name, module, uses))
        if not ran:
            raise RuntimeError("PerSampleHooks: no tracked layer ran a forward pass with grad enabled since "
                               "the hooks were set up or cleared")
        if not any_grad:
            raise RuntimeError("PerSampleHooks: no output gradient was captured; call after loss.backward()")
        # What a layer's captured uses do not allow (a batch norm using batch statistics, ...).
        self._runtime_skipped = {}
        grouped = {n for g in self._groups for n in g}
        kept = []
        for name, module, uses in ran:
            kind = self._kind(module)
            problem = kind.problem(module, name, uses) if kind is not None else None
            if problem is None:
                kept.append((name, module, uses))
            elif self.on_unsupported != "skip" or name in grouped:
                raise ValueError(f"PerSampleHooks: {problem}")
            else:
                self._runtime_skipped[name] = problem
        if not kept:
            raise ValueError("PerSampleHooks: every tracked layer that ran was skipped: "
                             + "; ".join(self._runtime_skipped.values()))
        ran = kept
        out = []
        for name, module, uses in ran:
            # A use whose output did not reach the loss adds zero to every sample's gradient.
            reached = [u for u in uses if u.grad is not None]
            if not reached:  # no output of the layer reached the loss: its gradients are zero
                u = uses[0]
                out.append((name, module, [u.input],
                            [torch.zeros(u.out_shape, dtype=u.out_dtype, device=u.input.device)]))
                continue
            sizes = [u.input.shape[0] for u in reached]
            if any(b != sizes[0] for b in sizes):
                raise ValueError(
                    f"PerSampleHooks: layer {name!r} ({type(module).__name__}) was used {len(sizes)} times in "
                    f"this step with batch sizes {sizes}; its per-sample gradient adds the uses sample by sample, "
                    "so every use whose output reaches the loss must hold the same samples (row i of each use "
                    "is sample i). Leave it out with layers=[...].")
            out.append((name, module, [u.input for u in reached], [u.grad for u in reached]))
        first = out[0]
        for name, module, xs, _ in out[1:]:
            if xs[0].shape[0] != first[2][0].shape[0]:
                raise ValueError(
                    f"PerSampleHooks: layer {name!r} ({type(module).__name__}) saw {xs[0].shape[0]} samples but layer "
                    f"{first[0]!r} ({type(first[1]).__name__}) saw {first[2][0].shape[0]}; every tracked layer must "
                    "see the batch with row i being sample i (a layer applied to an unbatched input, such as a "
                    "position embedding of torch.arange(T), must take it expanded to [B, T]). Leave it out with "
                    "layers=[...]" + ("; or, if the model's sequence layers take [T, B, ...] inputs (torch's "
                                      "sequence-first layout), pass batch_first=False." if self.batch_first else "."))
        return out

    def _units(self, ready: list) -> list:
        """The layers measured together: [(name, [(name, module, inputs, grads), ...])], one entry
        per layer, or several for modules sharing parameters (named "a+b")."""
        group_of = {n: k for k, g in enumerate(self._groups) for n in g}
        units, at = [], {}
        for entry in ready:
            k = group_of.get(entry[0])
            if k is None:
                units.append((entry[0], [entry]))
            elif k in at:
                units[at[k]][1].append(entry)
            else:
                at[k] = len(units)
                units.append((entry[0], [entry]))
        return [("+".join(e[0] for e in entries), entries) for _, entries in units]

    def _together(self, entries: list, scale_grads=None):
        """The measure of modules sharing parameters: a token embedding tied to a Linear from
        their factors, other ties (and every histogram) from per-sample gradients formed in tiles."""
        kinds = [(self._any_kind(m), m, xs, scale_grads(gs) if scale_grads else gs) for _, m, xs, gs in entries]
        if scale_grads:
            return Materialised(kinds)
        heads = [n for n, m, _, _ in entries if n in self._fusible_heads]
        return _layers.together(kinds, self.method, self._parts_from_backward(heads[0]) if heads else None)

    def _parts_from_backward(self, name: str) -> Optional[PerSampleParts]:
        """The layer's parts taken on the backward pass with its weight gradient
        (:class:`_WeightGradFromParts`), when its one use of the step had them."""
        uses = self._captures[name].uses
        return uses[0].parts if len(uses) == 1 else None

    def layer_parts(self, process_group=None) -> dict:
        """{layer name: PerSampleParts} of every tracked layer that ran in the latest step (modules
        sharing parameters as one entry, their names joined by "+": "emb+head").

        Under torch.distributed (``process_group``: None for the default group when initialised,
        or a group; :data:`trainscope.distributed.THIS_PROCESS` for this rank alone) each rank's
        parts are its own samples against the global ḡ of the whole batch, tied to the group (a
        collective: every rank calls it; see the class docstring)."""
        group = active_group(process_group)
        if group is not None:
            return self._layer_parts_across_ranks(group)
        out = {}
        for name, entries in self._units(self._ready()):
            _, module, xs, gs = entries[0]
            if len(entries) == 1:
                p = self._parts_from_backward(name)
                if p is None:
                    p = layer_per_sample_parts(module, xs, gs, self.method, _kind=self._kind(module))
            else:
                p = self._together(entries).parts()
            if self.loss_reduction == "mean":  # the captured gᵢ are ∇ℓᵢ / B
                s = float(xs[0].shape[0]) ** 2
                p = PerSampleParts(p.sq_norms * s, p.dots * s, p.mean_sq_norm * s)
            out[name] = p
        return out

    def _layer_parts_across_ranks(self, group) -> dict:
        """layer_parts over the ranks of ``group``: one all-reduce of every layer's Σᵢ gᵢ and B_r."""
        import torch.distributed as dist

        ready = self._ready()
        b = ready[0][2][0].shape[0]
        for name, _, xs, _ in ready:
            if xs[0].shape[0] != b:
                raise ValueError(f"PerSampleHooks: layer {name!r} saw {xs[0].shape[0]} samples but layer "
                                 f"{ready[0][0]!r} saw {b}; every tracked layer must see the whole batch")
        if b < 1:
            raise ValueError("PerSampleHooks: this rank's batch has no samples; with the batch split over ranks "
                             "every rank needs at least one")
        # Every rank's gradients are ∇ℓᵢ of its own samples: a mean-reduced loss over this rank's B_r
        # samples gives ∇ℓᵢ / B_r, scaled back by B_r here.
        scale = float(b) if self.loss_reduction == "mean" else 1.0
        units = self._units(ready)
        together = [self._together(e) if len(e) > 1 else None for _, e in units]
        sums = [(t.grad_sum() if t is not None else _layer_grad_sum(e[0][1], e[0][2], e[0][3], self._kind(e[0][1]))) * scale
                for (_, e), t in zip(units, together)]
        device = sums[0].device
        packed = torch.cat([t.to(device) for t in sums] + [torch.full((1,), float(b), dtype=torch.float64,
                                                                       device=device)])
        dist.all_reduce(packed, group=group)
        total = packed[-1]  # B, on the device
        out, offset = {}, 0
        for (name, entries), t, local_sum in zip(units, together, sums):
            _, module, xs, gs = entries[0]
            n = local_sum.numel()
            mean = (packed[offset:offset + n] / total).to(local_sum.device)
            offset += n
            if t is not None:
                dots = t.dots(mean) * scale
                sq = t.sq_norms() * (scale * scale)
            else:
                dots = _layer_dots(module, xs, gs, mean, self._kind(module)) * scale
                sq = _layer_sq_norms(module, xs, gs, self.method, self._kind(module)) * (scale * scale)
            out[name] = PerSampleParts(sq, dots, mean.square().sum(), group)
        return out

    def parts(self, process_group=None) -> PerSampleParts:
        """PerSampleParts summed over the tracked layers (this rank's, against the global ḡ, under
        torch.distributed: see :meth:`layer_parts`)."""
        return sum(self.layer_parts(process_group).values())

    def stats(self, process_group=None) -> PerSampleStats:
        """The six statistics as a :class:`PerSampleStats`, the type ``trainscope.per_sample_stats``
        returns: ``s["norm_test"]``, ..., all six in ``s.stats`` (float64 [6], PER_SAMPLE_STATS
        order), the summed parts in ``s.parts``. Needs B >= 2. Of the whole batch over the ranks
        under torch.distributed (a collective; ``process_group`` as in :meth:`layer_parts`).

        Fields that layer factors do not give: ``hist`` is empty ([0]; :meth:`grad_hist1d` forms
        the per-sample gradients for it) and ``nonfinite`` is None (never counted here; non-finite
        gradients show as NaN or inf in the statistics). ``coverage`` is the hooks' ``coverage``
        when they report one (parameters left out), None when the statistics cover every tracked
        layer's parameters."""
        parts = self.parts(process_group)
        return PerSampleStats(parts, parts.stats(), _NO_HIST.to(parts.sq_norms.device), None,
                              _coverage_of(self))

    def _hist_grads(self, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.loss_reduction == "sum":
            return grads
        acc = [torch.float64 if g.dtype == torch.float64 else torch.float32 for g in grads]
        return [g.to(a) * g.shape[0] for g, a in zip(grads, acc)]

    def grad_hist1d(self, nbins: int = 100, maxval: float = 0.05, process_group=None) -> torch.Tensor:
        """Exact int64 histogram [nbins] of all per-sample gradient elements of the tracked layers
        (of the whole batch under torch.distributed: the ranks' counts summed, one all-reduce)."""
        nbins, maxval = check_hist_axis(nbins, maxval)
        hists = [layer_per_sample_grad_hist1d(e[0][1], e[0][2], self._hist_grads(e[0][3]), nbins, maxval,
                                              _kind=self._kind(e[0][1]))
                 if len(e) == 1 else self._together(e, self._hist_grads).hist1d(nbins, maxval, check_hist_axis)
                 for _, e in self._units(self._ready())]
        return _sum_over_ranks(functools.reduce(torch.add, hists), process_group)

    def projections(self, direction) -> torch.Tensor:
        """gᵢ · d [B] float64: each sample's gradient (gᵢ = ∇ℓᵢ) projected on a direction ``d``
        given per parameter ({parameter name: tensor shaped like it}; covered parameters missing
        from it count as zero), from layer factors (no per-sample gradient is formed for nn.Linear
        and nn.Conv2d). Linear in gᵢ, so uses and shared parameters simply add. This rank's
        samples under torch.distributed (no collective)."""
        ready = self._ready()
        scale = float(ready[0][2][0].shape[0]) if self.loss_reduction == "mean" else 1.0
        total = None

        def flat(params, device):
            return torch.cat([direction[self._param_names[id(p)][0]].detach().to(device, torch.float64).reshape(-1)
                              if self._param_names[id(p)][0] in direction
                              else torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in params])

        for _, entries in self._units(ready):
            _, module, xs, gs = entries[0]
            device = gs[0].device
            if len(entries) == 1:
                params = [p for _, p in self._any_kind(module).params(module)]
                dots = _layer_dots(module, xs, gs, flat(params, device), self._kind(module))
            else:
                t = self._together(entries)
                params = t.params if isinstance(t, Materialised) else (
                    [t.emb.weight] + ([t.head.bias] if t.bias else []))
                dots = t.dots(flat(params, device))
            total = dots if total is None else total + dots
        return total * scale

    def grad_moments(self, process_group=None) -> "GradMoments":
        """Per-element sums over the batch's samples of their gradients and squared gradients,
        Σᵢ gᵢ and S = Σᵢ gᵢ² (gᵢ = ∇ℓᵢ; float64, {parameter name: tensor shaped like it}) for
        every covered parameter: a :class:`~trainscope.grad_variance.GradMoments`, the input of
        :func:`trainscope.grad_variance_stats` (SPEC.md §6). An nn.Linear used once on [B, d]
        inputs takes one GEMM of the squared factors, S = (δ²)ᵀ x²; every other layer (positions,
        several uses, shared parameters, the layers of per_sample_layers) forms its per-sample
        gradients in tiles of samples. Under torch.distributed the sums of the whole batch over
        the ranks (one all-reduce)."""
        from .grad_variance import GradMoments

        grad_sum, sq_sum = {}, {}
        ready = self._ready()
        b = ready[0][2][0].shape[0]
        def per_sample(grads):  # float64 output gradients of the per-sample losses ℓᵢ
            scale = grads[0].shape[0] if self.loss_reduction == "mean" else 1
            return [g.to(torch.float64) * scale for g in grads]

        for _, entries in self._units(ready):
            _, module, xs, gs = entries[0]
            if len(entries) == 1:
                for p, (s, q) in layer_per_sample_grad_moments(module, xs, per_sample(gs),
                                                                _kind=self._kind(module)).items():
                    name = self._param_names[id(p)][0]
                    grad_sum[name], sq_sum[name] = s, q
                continue
            mat = self._together(entries, scale_grads=per_sample)
            for _, tile in mat.tiles():
                for p, g in zip(mat.params, tile):
                    name = self._param_names[id(p)][0]
                    s, q = g.sum(0), g.square().sum(0)
                    grad_sum[name] = s if name not in grad_sum else grad_sum[name] + s
                    sq_sum[name] = q if name not in sq_sum else sq_sum[name] + q
        group = active_group(process_group)
        if group is not None:
            import torch.distributed as dist

            names = list(grad_sum)
            device = grad_sum[names[0]].device
            packed = torch.cat([grad_sum[n].reshape(-1) for n in names] + [sq_sum[n].reshape(-1) for n in names]
                               + [torch.full((1,), float(b), dtype=torch.float64, device=device)])
            dist.all_reduce(packed, group=group)
            offset = 0
            for table in (grad_sum, sq_sum):
                for n in names:
                    k = table[n].numel()
                    table[n] = packed[offset:offset + k].view_as(table[n])
                    offset += k
            b = int(packed[-1].item())
        return GradMoments(grad_sum, sq_sum, b, _coverage_of(self))

    def grad_hist2d(self, nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                    maxval_param: float = 1.0, process_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Joint histogram of (per-sample gradient element, parameter value) over the tracked
        layers: (counts [nbins_grad, nbins_param] int64, nonfinite [] int64); summed over the
        ranks under torch.distributed (one all-reduce; the parameters must be whole on every
        rank, as under DDP)."""
        axes = _hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param)
        results = [layer_per_sample_grad_hist2d(e[0][1], e[0][2], self._hist_grads(e[0][3]), nbins_grad,
                                                maxval_grad, nbins_param, maxval_param, _kind=self._kind(e[0][1]))
                   if len(e) == 1 else self._together(e, self._hist_grads).hist2d(axes)
                   for _, e in self._units(self._ready())]
        counts = functools.reduce(torch.add, [c for c, _ in results])
        nonfinite = functools.reduce(torch.add, [n for _, n in results])

        if active_group(process_group) is None:
            return counts, nonfinite
        packed = _sum_over_ranks(torch.cat([counts.reshape(-1), nonfinite.reshape(1)]), process_group)
        return packed[:-1].view_as(counts), packed[-1]

    # -- lifetime

    def clear(self) -> None:
        """Forgets the captured inputs and gradients; the next forward pass starts a new step."""
        self._step += 1
        self._backward_seen = False
        for cap in self._captures.values():
            cap.uses = []

    def remove(self) -> None:
        """Removes the hooks and forgets what they captured."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "PerSampleHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ------------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes and dtypes for torch.compile and opcheck.


_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fake_check(op: str, input, grad_output, conv: bool, names=("input", "grad_output")) -> None:
    """The shape and dtype checks of the kernels, so that a traced call fails as an eager one
    does, naming the argument (the kernels check the rest when they run)."""
    x_name, d_name = names
    for name, t in ((x_name, input), (d_name, grad_output)):
        if t.dtype not in _FLOATS:
            raise RuntimeError(f"trainscope::{op}: {name} has dtype {t.dtype}; trainscope needs float32, "
                               "float64, bfloat16 or float16")
    if conv:
        if input.dim() != 4:
            raise RuntimeError(f"trainscope::{op}: {x_name} must be [B, C_in, H, W], got shape {list(input.shape)}")
        if grad_output.dim() != 4:
            raise RuntimeError(f"trainscope::{op}: {d_name} must be [B, C_out, H', W'], got shape "
                               f"{list(grad_output.shape)}")
    elif input.dim() < 2:
        raise RuntimeError(f"trainscope::{op}: {x_name} must be [B, d_in] or [B, ..., d_in], got shape "
                           f"{list(input.shape)}")
    elif grad_output.dim() != input.dim():
        raise RuntimeError(f"trainscope::{op}: {d_name} has shape {list(grad_output.shape)} but {x_name} has "
                           f"shape {list(input.shape)}; they must agree in every dim but the last")


def _fake_check_uses(op: str, input, grad_output, conv: bool):
    """_fake_check of every use of the ``.uses`` overloads, and their common batch size; returns
    the first use's input."""
    if len(input) == 0:
        raise RuntimeError(f"trainscope::{op}: input is an empty list; pass the input of every use of the layer")
    if len(grad_output) != len(input):
        raise RuntimeError(f"trainscope::{op}: grad_output has {len(grad_output)} tensors but input has "
                           f"{len(input)}; one output gradient per use")
    many = len(input) > 1
    for k, (x, d) in enumerate(zip(input, grad_output)):
        _fake_check(op, x, d, conv, (f"input[{k}]", f"grad_output[{k}]") if many else ("input", "grad_output"))
        if x.shape[0] != input[0].shape[0]:
            raise RuntimeError(f"trainscope::{op}: input[{k}] has batch size {x.shape[0]} but input[0] has "
                               f"{input[0].shape[0]}; row i of every use of a layer must be sample i")
    return input[0]


def _fake_check_nbins(op: str, **nbins) -> None:
    for name, n in nbins.items():
        if n < 1:
            raise RuntimeError(f"trainscope::{op}: {name} must be in [1, 1048576], got {n}")


def _parts_fake(input, grad_output):
    # float64 whatever the inputs' dtypes, as the kernels return.
    b = input.shape[0]
    f64 = torch.float64
    return (input.new_empty(b, dtype=f64), input.new_empty(b, dtype=f64), input.new_empty((), dtype=f64))


@register_fake("trainscope::linear_per_sample_parts")
def _(input, grad_output, has_bias=True, method="auto"):
    _fake_check("linear_per_sample_parts", input, grad_output, conv=False)
    return _parts_fake(input, grad_output)


@register_fake("trainscope::conv2d_per_sample_parts")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      has_bias=True, method="auto"):
    _fake_check("conv2d_per_sample_parts", input, grad_output, conv=True)
    return _parts_fake(input, grad_output)


@register_fake("trainscope::linear_per_sample_parts.uses")
def _(input, grad_output, has_bias=True, method="auto"):
    x = _fake_check_uses("linear_per_sample_parts", input, grad_output, conv=False)
    return _parts_fake(x, None)


@register_fake("trainscope::conv2d_per_sample_parts.uses")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      has_bias=True, method="auto"):
    x = _fake_check_uses("conv2d_per_sample_parts", input, grad_output, conv=True)
    return _parts_fake(x, None)


@register_fake("trainscope::linear_per_sample_parts_and_weight_grad")
def _(input, grad_output, has_bias=True, method="auto"):
    _fake_check("linear_per_sample_parts_and_weight_grad", input, grad_output, conv=False)
    weight_grad = input.new_empty((grad_output.shape[-1], input.shape[-1]), dtype=_layers.acc_dtype(input, grad_output))
    bias_grad = input.new_empty((grad_output.shape[-1] if has_bias else 0,), dtype=torch.float64)
    return (*_parts_fake(input, grad_output), weight_grad, bias_grad)


@register_fake("trainscope::conv2d_per_sample_parts_and_weight_grad")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      has_bias=True, method="auto"):
    op = "conv2d_per_sample_parts_and_weight_grad"
    _fake_check(op, input, grad_output, conv=True)
    _conv_weight_2d(op, input, grad_output, kernel_size, groups)
    shape = (grad_output.shape[1], input.shape[1] // groups, *_pair("kernel_size", kernel_size))
    bias_grad = input.new_empty((grad_output.shape[1] if has_bias else 0,), dtype=torch.float64)
    return (*_parts_fake(input, grad_output), input.new_empty(shape, dtype=_layers.acc_dtype(input, grad_output)),
            bias_grad)


def _moments_fake(input, grad_output, weight_shape, has_bias):
    # float64 [rows, cols] sums, and [rows] for the bias (empty without one), as the kernels return.
    f64 = torch.float64
    rows = weight_shape[0]
    bias = (rows,) if has_bias else (0,)
    return (input.new_empty(weight_shape, dtype=f64), input.new_empty(weight_shape, dtype=f64),
            input.new_empty(bias, dtype=f64), input.new_empty(bias, dtype=f64))


def _conv_weight_2d(op, input, grad_output, kernel_size, groups):
    kh, kw = _pair("kernel_size", kernel_size)
    c_in, c_out = input.shape[1], grad_output.shape[1]
    if groups < 1 or c_in % groups or c_out % groups:
        raise RuntimeError(f"trainscope::{op}: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    return (c_out, c_in // groups * kh * kw)


@register_fake("trainscope::linear_per_sample_grad_moments")
def _(input, grad_output, has_bias=True):
    _fake_check("linear_per_sample_grad_moments", input, grad_output, conv=False)
    return _moments_fake(input, grad_output, (grad_output.shape[-1], input.shape[-1]), has_bias)


@register_fake("trainscope::conv2d_per_sample_grad_moments")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, has_bias=True):
    op = "conv2d_per_sample_grad_moments"
    _fake_check(op, input, grad_output, conv=True)
    return _moments_fake(input, grad_output, _conv_weight_2d(op, input, grad_output, kernel_size, groups), has_bias)


@register_fake("trainscope::linear_per_sample_grad_moments.uses")
def _(input, grad_output, has_bias=True):
    x = _fake_check_uses("linear_per_sample_grad_moments", input, grad_output, conv=False)
    return _moments_fake(x, None, (grad_output[0].shape[-1], x.shape[-1]), has_bias)


@register_fake("trainscope::conv2d_per_sample_grad_moments.uses")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, has_bias=True):
    op = "conv2d_per_sample_grad_moments"
    x = _fake_check_uses(op, input, grad_output, conv=True)
    return _moments_fake(x, None, _conv_weight_2d(op, x, grad_output[0], kernel_size, groups), has_bias)


@register_fake("trainscope::linear_per_sample_projections")
def _(input, grad_output, weight_dir, bias_dir=None):
    _fake_check("linear_per_sample_projections", input, grad_output, conv=False)
    return input.new_empty(input.shape[0], dtype=torch.float64)


@register_fake("trainscope::conv2d_per_sample_projections")
def _(input, grad_output, weight_dir, bias_dir=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    _fake_check("conv2d_per_sample_projections", input, grad_output, conv=True)
    return input.new_empty(input.shape[0], dtype=torch.float64)


@register_fake("trainscope::linear_per_sample_projections.uses")
def _(input, grad_output, weight_dir, bias_dir=None):
    x = _fake_check_uses("linear_per_sample_projections", input, grad_output, conv=False)
    return x.new_empty(x.shape[0], dtype=torch.float64)


@register_fake("trainscope::conv2d_per_sample_projections.uses")
def _(input, grad_output, weight_dir, bias_dir=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x = _fake_check_uses("conv2d_per_sample_projections", input, grad_output, conv=True)
    return x.new_empty(x.shape[0], dtype=torch.float64)


@register_fake("trainscope::linear_per_sample_grad_hist1d")
def _(input, grad_output, has_bias=True, nbins=100, maxval=0.05):
    _fake_check("linear_per_sample_grad_hist1d", input, grad_output, conv=False)
    _fake_check_nbins("linear_per_sample_grad_hist1d", nbins=nbins)
    return input.new_empty(nbins, dtype=torch.int64)


@register_fake("trainscope::conv2d_per_sample_grad_hist1d")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      has_bias=True, nbins=100, maxval=0.05):
    _fake_check("conv2d_per_sample_grad_hist1d", input, grad_output, conv=True)
    _fake_check_nbins("conv2d_per_sample_grad_hist1d", nbins=nbins)
    return input.new_empty(nbins, dtype=torch.int64)


@register_fake("trainscope::linear_per_sample_grad_hist1d.uses")
def _(input, grad_output, has_bias=True, nbins=100, maxval=0.05):
    x = _fake_check_uses("linear_per_sample_grad_hist1d", input, grad_output, conv=False)
    _fake_check_nbins("linear_per_sample_grad_hist1d", nbins=nbins)
    return x.new_empty(nbins, dtype=torch.int64)


@register_fake("trainscope::conv2d_per_sample_grad_hist1d.uses")
def _(input, grad_output, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      has_bias=True, nbins=100, maxval=0.05):
    x = _fake_check_uses("conv2d_per_sample_grad_hist1d", input, grad_output, conv=True)
    _fake_check_nbins("conv2d_per_sample_grad_hist1d", nbins=nbins)
    return x.new_empty(nbins, dtype=torch.int64)


def _hist2d_fake(input, nbins_grad, nbins_param):
    return (input.new_empty((nbins_grad, nbins_param), dtype=torch.int64), input.new_empty((), dtype=torch.int64))


@register_fake("trainscope::linear_per_sample_grad_hist2d")
def _(input, grad_output, weight, bias=None, nbins_grad=100, maxval_grad=0.05, nbins_param=100,
      maxval_param=1.0):
    _fake_check("linear_per_sample_grad_hist2d", input, grad_output, conv=False)
    _fake_check_nbins("linear_per_sample_grad_hist2d", nbins_grad=nbins_grad, nbins_param=nbins_param)
    return _hist2d_fake(input, nbins_grad, nbins_param)


@register_fake("trainscope::conv2d_per_sample_grad_hist2d")
def _(input, grad_output, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      nbins_grad=100, maxval_grad=0.05, nbins_param=100, maxval_param=1.0):
    _fake_check("conv2d_per_sample_grad_hist2d", input, grad_output, conv=True)
    _fake_check_nbins("conv2d_per_sample_grad_hist2d", nbins_grad=nbins_grad, nbins_param=nbins_param)
    return _hist2d_fake(input, nbins_grad, nbins_param)


@register_fake("trainscope::linear_per_sample_grad_hist2d.uses")
def _(input, grad_output, weight, bias=None, nbins_grad=100, maxval_grad=0.05, nbins_param=100,
      maxval_param=1.0):
    x = _fake_check_uses("linear_per_sample_grad_hist2d", input, grad_output, conv=False)
    _fake_check_nbins("linear_per_sample_grad_hist2d", nbins_grad=nbins_grad, nbins_param=nbins_param)
    return _hist2d_fake(x, nbins_grad, nbins_param)


@register_fake("trainscope::conv2d_per_sample_grad_hist2d.uses")
def _(input, grad_output, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
      nbins_grad=100, maxval_grad=0.05, nbins_param=100, maxval_param=1.0):
    x = _fake_check_uses("conv2d_per_sample_grad_hist2d", input, grad_output, conv=True)
    _fake_check_nbins("conv2d_per_sample_grad_hist2d", nbins_grad=nbins_grad, nbins_param=nbins_param)
    return _hist2d_fake(x, nbins_grad, nbins_param)
