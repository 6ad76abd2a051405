"""Per-sample gradient statistics from layer factors (SPEC.md §2), never materialising B copies
of a layer's weights.

For ``nn.Linear`` (y = x Wᵀ + b, x [B, T, d_in]) sample i's weight gradient is
Gᵢ = Σ_t δ_itᵀ x_it, with δ = ∂loss/∂y the layer's output gradient. ‖Gᵢ‖², Gᵢ·Ḡ and ‖Ḡ‖² come
from x and δ alone, by one of two routes over the N = B·T rows:

- the Ḡ route (``"ghost"``, ``"tiled"``): Ḡ = δᵀx/B and x Ḡᵀ, two GEMMs as large as the
  backward pass's weight-gradient GEMM (about 4·N·d_in·d_out flops), with ‖Gᵢ‖² by the ghost
  norm Σ_{t,s}(x_it·x_is)(δ_it·δ_is) or, when 2T² > d_in·d_out, Gᵢ formed in bounded tiles;
- the Gram route (``"gram"``, about 2·N²·(d_in + d_out) flops): with K_x = X Xᵀ and K_δ = Δ Δᵀ
  over all N rows, the per-sample block sums S_ik of K_x ∘ K_δ are Gᵢ·G_k, so ‖Gᵢ‖² = S_ii,
  Gᵢ·Ḡ = Σ_k S_ik / B and ‖Ḡ‖² = Σ_ik S_ik / B². Far cheaper when N is small next to the weight
  (roughly N below the harmonic mean of d_in and d_out).

``"auto"`` takes the route of fewer flops. ``nn.Conv2d`` is unfolded into the same problem.

The parts are float64 whatever the inputs (as the materialised path's): GEMMs run in float32
for float32/bfloat16/float16 inputs (torch's float32 matmul precision applies; TF32 is off by
default and trainscope leaves it alone) and everything after them in float64. The Gram route
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
        stats = hooks.stats()                    # [6] in PER_SAMPLE_STATS order
        hist = hooks.grad_hist1d()               # per-sample gradient elements, int64 [100]

The functions below take one layer's input and output gradient directly; their
:class:`PerSampleParts` add up across layers (``sum(parts)``), then ``.stats()``.

The factors are exact when sample i's output depends on sample i's input alone (no batch norm
across samples between a layer and the loss). Results stay on the inputs' device; nothing
here waits for the GPU.

Under torch.distributed (DDP), :class:`PerSampleHooks` combines the ranks' shares of the batch:
its statistics and histograms are those of the whole batch, by default over the default process
group (see the class docstring for what travels and the scaling convention).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops  # noqa: F401  (loads the op library)
from ._args import check_hist_axis, register_fake
from .hist2d import hist2d_axes as _hist2d_axes
from .distributed import active_group, clean_param_name
from .per_sample_stats import PerSampleParts

#: The route: "ghost"/"tiled" (the Ḡ route, ‖Gᵢ‖² by the ghost norm or tiled), "gram" (the Gram
#: route), "auto" (the one of fewer flops; the Ḡ route tiles when 2T² > d_in·d_out).
FACTOR_METHODS = ("auto", "ghost", "tiled", "gram")

#: Layer types PerSampleHooks handles (subclasses that keep their forward are accepted too).
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

IntOrPair = Union[int, Sequence[int]]


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


# ------------------------------------------------------------------------------------------------
# One layer, from its input and output gradient


def linear_per_sample_parts(input: torch.Tensor, grad_output: torch.Tensor, has_bias: bool = True,
                            method: str = "auto") -> PerSampleParts:
    """Parts of nn.Linear's per-sample gradients (weight, and bias when ``has_bias``), float64.
    ``input`` [B, ..., d_in], ``grad_output`` [B, ..., d_out] with the same leading dims;
    ``method`` one of :data:`FACTOR_METHODS`."""
    sq, dots, msq = torch.ops.trainscope.linear_per_sample_parts(input, grad_output, bool(has_bias),
                                                                 _check_method(method))
    return PerSampleParts(sq, dots, msq)


def conv2d_per_sample_parts(input: torch.Tensor, grad_output: torch.Tensor, kernel_size: IntOrPair,
                            stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                            groups: int = 1, has_bias: bool = True, method: str = "auto") -> PerSampleParts:
    """Parts of nn.Conv2d's per-sample gradients, float64 (zero padding given as numbers; see
    :func:`layer_per_sample_parts` for a module with any padding mode)."""
    sq, dots, msq = torch.ops.trainscope.conv2d_per_sample_parts(
        input, grad_output, _pair("kernel_size", kernel_size), _pair("stride", stride),
        _pair("padding", padding), _pair("dilation", dilation), int(groups), bool(has_bias),
        _check_method(method))
    return PerSampleParts(sq, dots, msq)


def linear_per_sample_grad_hist1d(input: torch.Tensor, grad_output: torch.Tensor, has_bias: bool = True,
                                  nbins: int = 100, maxval: float = 0.05) -> torch.Tensor:
    """Exact int64 histogram [nbins] (SPEC.md §4) of the B·P per-sample gradient elements
    δᵢᵀxᵢ (and Σ_t δ_it) of an nn.Linear, formed tile by tile. Pass B·δ to bin the gradients of
    the per-sample losses of a mean-reduced loss."""
    return torch.ops.trainscope.linear_per_sample_grad_hist1d(input, grad_output, bool(has_bias),
                                                              *check_hist_axis(nbins, maxval))


def conv2d_per_sample_grad_hist1d(input: torch.Tensor, grad_output: torch.Tensor, kernel_size: IntOrPair,
                                  stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                                  groups: int = 1, has_bias: bool = True, nbins: int = 100,
                                  maxval: float = 0.05) -> torch.Tensor:
    """As :func:`linear_per_sample_grad_hist1d`, for nn.Conv2d with zero padding."""
    return torch.ops.trainscope.conv2d_per_sample_grad_hist1d(
        input, grad_output, _pair("kernel_size", kernel_size), _pair("stride", stride),
        _pair("padding", padding), _pair("dilation", dilation), int(groups), bool(has_bias),
        *check_hist_axis(nbins, maxval))


def linear_per_sample_grad_hist2d(input: torch.Tensor, grad_output: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor] = None, nbins_grad: int = 100,
                                  maxval_grad: float = 0.05, nbins_param: int = 100,
                                  maxval_param: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint histogram of (per-sample gradient element, parameter value) of an nn.Linear, as
    ``trainscope::grad_hist2d`` counts it: (counts [nbins_grad, nbins_param] int64,
    nonfinite [] int64). ``bias`` None: the layer has none (or it is not tracked)."""
    return torch.ops.trainscope.linear_per_sample_grad_hist2d(
        input, grad_output, weight, bias, *_hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param))


def conv2d_per_sample_grad_hist2d(input: torch.Tensor, grad_output: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1,
                                  padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
                                  nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                                  maxval_param: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`linear_per_sample_grad_hist2d`, for nn.Conv2d with zero padding (the kernel
    size is the weight's)."""
    return torch.ops.trainscope.conv2d_per_sample_grad_hist2d(
        input, grad_output, weight, bias, _pair("stride", stride), _pair("padding", padding),
        _pair("dilation", dilation), int(groups),
        *_hist2d_axes(nbins_grad, maxval_grad, nbins_param, maxval_param))


# ------------------------------------------------------------------------------------------------
# One module, from its input and output gradient


def _supported(module: nn.Module) -> bool:
    # A subclass that replaces forward computes something else from the same parameters.
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


def _layer_kind_error(name: Optional[str], module: nn.Module) -> TypeError:
    kinds = ", ".join(f"nn.{c.__name__}" for c in SUPPORTED_LAYERS)
    what = f"PerSampleHooks: layer {name!r} is" if name is not None else "trainscope: the module is"
    hint = " Pass layers=[...] to track only layers of those types." if name is not None else ""
    return TypeError(f"{what} {type(module).__name__}; per-sample gradients from layer factors handle "
                     f"{kinds} (subclasses that keep their forward).{hint}")


def _tracks_bias(module: nn.Module) -> bool:
    return module.bias is not None and module.bias.requires_grad


def layer_per_sample_parts(module: nn.Module, input: torch.Tensor, grad_output: torch.Tensor,
                           method: str = "auto") -> PerSampleParts:
    """Parts of the per-sample gradients of an nn.Linear or nn.Conv2d module (its trainable
    weight and bias) from the module's input and output gradient."""
    if not _supported(module):
        raise _layer_kind_error(None, module)
    if isinstance(module, nn.Linear):
        return linear_per_sample_parts(input, grad_output, _tracks_bias(module), method)
    x, padding = _conv_input(module, input)
    return conv2d_per_sample_parts(x, grad_output, module.kernel_size, module.stride, padding,
                                   module.dilation, module.groups, _tracks_bias(module), method)


def layer_per_sample_grad_hist1d(module: nn.Module, input: torch.Tensor, grad_output: torch.Tensor,
                                 nbins: int = 100, maxval: float = 0.05) -> torch.Tensor:
    """Histogram of the per-sample gradient elements of an nn.Linear or nn.Conv2d module."""
    if not _supported(module):
        raise _layer_kind_error(None, module)
    if isinstance(module, nn.Linear):
        return linear_per_sample_grad_hist1d(input, grad_output, _tracks_bias(module), nbins, maxval)
    x, padding = _conv_input(module, input)
    return conv2d_per_sample_grad_hist1d(x, grad_output, module.kernel_size, module.stride, padding,
                                         module.dilation, module.groups, _tracks_bias(module), nbins, maxval)


def layer_per_sample_grad_hist2d(module: nn.Module, input: torch.Tensor, grad_output: torch.Tensor,
                                 nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                                 maxval_param: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint (per-sample gradient, parameter value) histogram of an nn.Linear or nn.Conv2d module."""
    if not _supported(module):
        raise _layer_kind_error(None, module)
    weight = module.weight.detach()
    bias = module.bias.detach() if _tracks_bias(module) else None
    if isinstance(module, nn.Linear):
        return linear_per_sample_grad_hist2d(input, grad_output, weight, bias, nbins_grad, maxval_grad,
                                             nbins_param, maxval_param)
    x, padding = _conv_input(module, input)
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
# temporaries stay below _TILE_ELEMS elements.

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


def _layer_grad_sum(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Σᵢ gᵢ of the layer's samples, float64, flat: the weight's [d_out, k] sum, then the bias's."""
    tile = _layer_tile(module, x, grad)
    w_sum = b_sum = None
    for start in range(0, x.shape[0], tile):
        problems = _layer_problems(module, x[start:start + tile], grad[start:start + tile])
        w = torch.cat([d.reshape(-1, d.shape[-1]).T @ xx.reshape(-1, xx.shape[-1]) for xx, d in problems])
        bias = torch.cat([d.sum((0, 1)) for _, d in problems])
        w_sum, b_sum = (w, bias) if w_sum is None else (w_sum + w, b_sum + bias)
    parts = [w_sum.reshape(-1)] + ([b_sum] if _tracks_bias(module) else [])
    return torch.cat(parts)


def _layer_dots(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """gᵢ·ḡ [b] float64 of the layer's samples, ḡ the flat mean gradient of _layer_grad_sum's layout."""
    d_out = grad.shape[1] if isinstance(module, nn.Conv2d) else grad.shape[-1]
    n_w = mean.numel() - (d_out if _tracks_bias(module) else 0)
    w_mean = mean[:n_w].reshape(d_out, -1)
    b_mean = mean[n_w:] if _tracks_bias(module) else None
    tile = _layer_tile(module, x, grad)
    out = []
    for start in range(0, x.shape[0], tile):
        problems = _layer_problems(module, x[start:start + tile], grad[start:start + tile])
        o = d_out // len(problems)
        dots = 0
        for j, (xx, d) in enumerate(problems):
            dots = dots + ((xx @ w_mean[j * o:(j + 1) * o].T) * d).sum((1, 2))
            if b_mean is not None:
                dots = dots + d.sum(1) @ b_mean[j * o:(j + 1) * o]
        out.append(dots)
    return torch.cat(out)


def _layer_sq_norms(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, method: str) -> torch.Tensor:
    """‖gᵢ‖² [b] float64 by the local op (which needs two samples: a single one goes in twice,
    ‖gᵢ‖² being each sample's own)."""
    if x.shape[0] == 1:
        x, grad = torch.cat([x, x]), torch.cat([grad, grad])
        return layer_per_sample_parts(module, x, grad, method).sq_norms[:1]
    return layer_per_sample_parts(module, x, grad, method).sq_norms


def _sum_over_ranks(counts: torch.Tensor, process_group) -> torch.Tensor:
    """Additive results (histogram counts) summed over the ranks of the active group, if any."""
    group = active_group(process_group)
    if group is None:
        return counts
    import torch.distributed as dist

    counts = counts.contiguous()
    dist.all_reduce(counts, group=group)
    return counts


# ------------------------------------------------------------------------------------------------
# Module hooks


@dataclass
class _Capture:
    input: Optional[torch.Tensor] = None
    grad: Optional[torch.Tensor] = None
    out_shape: Optional[torch.Size] = None
    out_dtype: Optional[torch.dtype] = None
    generation: int = 0
    repeated: bool = False


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


class PerSampleHooks:
    """Captures the input and the output gradient of every nn.Linear and nn.Conv2d of ``model``
    (or of the listed ``layers``: modules or their names) during an ordinary forward and
    ``loss.backward()``, for per-sample gradient statistics of their trainable parameters.

    With ``layers=None`` every module that holds trainable parameters directly must be one of
    :data:`SUPPORTED_LAYERS` (TypeError otherwise: list the layers to track instead). Each
    forward pass of ``model`` with grad enabled starts a new capture; passes under
    ``torch.no_grad()`` are ignored. A layer applied more than once in one pass (weight sharing)
    makes :meth:`parts` raise: its per-sample gradient is not one δᵀx.

    Everything describes the gradients ∇ℓᵢ of the per-sample losses, as the materialised path
    does: with ``loss_reduction="mean"`` (the loss is the mean of B per-sample losses, torch's
    default) the captured gradients ∇ℓᵢ/B are scaled back by B (parts by B²); pass ``"sum"`` for a
    summed loss. A wrong choice changes only the scale: the norm, inner-product and orthogonality
    tests and the noise scale are scale-free, tr Σ̂, ‖G‖² and the histograms are not.
    :meth:`grad_hist2d` pairs gradients with the parameters' current values: call it before
    ``optimizer.step()``.

    The captured inputs are held until the next pass, :meth:`clear` or :meth:`remove`.

    **Under torch.distributed** (DDP: every rank runs forward and backward on its own share of the
    batch) :meth:`layer_parts`, :meth:`parts`, :meth:`stats`, :meth:`grad_hist1d` and
    :meth:`grad_hist2d` describe the whole batch, as one process would on the concatenated batch
    with the same ``loss_reduction``: by default over the default process group when it is
    initialised (``process_group=`` another group, or
    :data:`trainscope.distributed.THIS_PROCESS` for this rank's share alone). They are then
    collectives: call them on every rank, in the same order (a call on rank 0 alone waits for the
    others forever). With several ranks, :meth:`layer_parts` costs, per layer and in float64, the
    local Σᵢ Gᵢ = δᵀx and Σ δ (for a convolution after unfolding, per group), ONE all-reduce of
    every layer's sums and B_r (the parameter count + 1 doubles) giving the global Ḡ and b̄, then
    gᵢ·ḡ = Σ_t δ_it·(Ḡ x_it) + (Σ_t δ_it)·b̄ (one more float64 GEMM per layer) and ‖gᵢ‖² from the
    local route (``method``); :meth:`stats` adds one all-reduce of four doubles
    (:func:`trainscope.distributed.per_sample_stats_from_local_parts`), the histograms one of
    their counts. Each rank's ``loss_reduction="mean"`` is the mean over its own B_r samples (what
    DDP runs), so its captured gradients are scaled back by B_r: every rank's gᵢ is ∇ℓᵢ, and all
    six statistics, the scale-dependent ``grad_variance_trace`` and ``grad_sq_norm_unbiased``
    included, equal the single-process ones on the whole batch with a mean-reduced loss (a loss
    reduced otherwise, e.g. divided by the global batch, changes only those two and the
    histograms, as on one process). Every rank needs at least one sample (a rank without one
    raises before the first all-reduce, leaving the others waiting in it). The statistics and
    :meth:`grad_hist1d` read only the captured x and δ, never the parameters; :meth:`grad_hist2d`
    pairs gradients with the parameter values this rank holds, which must be whole (DDP).
    """

    def __init__(self, model: nn.Module, layers: Optional[Iterable[Union[nn.Module, str]]] = None, *,
                 method: str = "auto", loss_reduction: str = "mean"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleHooks: model must be an nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"PerSampleHooks: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.method = _check_method(method)
        self.loss_reduction = loss_reduction
        self._layers = self._select(model, layers)
        self._captures = {name: _Capture() for name, _ in self._layers}
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        for name, module in self._layers:
            self._handles.append(module.register_forward_hook(
                functools.partial(self._on_layer_forward, name), with_kwargs=True))

    # -- selection

    @staticmethod
    def _select(model: nn.Module, layers) -> list:
        # Layers are named by the model's own names (without DDP's "module." and the like).
        names = {m: clean_param_name(n) for n, m in model.named_modules()}
        if layers is None:
            chosen = []
            for name, module in model.named_modules():
                name = clean_param_name(name)
                if not any(p.requires_grad for p in module.parameters(recurse=False)):
                    continue
                if not _supported(module):
                    raise _layer_kind_error(name, module)
                chosen.append((name, module))
        else:
            if isinstance(layers, (nn.Module, str)):
                layers = [layers]
            chosen = []
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
                if not _supported(module):
                    raise _layer_kind_error(name, module)
                if not module.weight.requires_grad and not _tracks_bias(module):
                    raise ValueError(f"PerSampleHooks: layer {name!r} has no trainable parameters")
                chosen.append((name, module))
        for name, module in chosen:
            if not module.weight.requires_grad and _tracks_bias(module):
                raise ValueError(f"PerSampleHooks: layer {name!r} has a frozen weight and a trainable bias; "
                                 "layer factors give the weight and bias together")
        if not chosen:
            raise ValueError("PerSampleHooks: model has no trainable nn.Linear or nn.Conv2d layers")
        unique, seen, owner = [], set(), {}
        for name, module in chosen:
            if id(module) in seen:
                continue
            seen.add(id(module))
            unique.append((name, module))
            # A parameter tied across layers has one per-sample gradient, the sum of both layers'
            # δᵀx: per-layer parts would not add up to its parts.
            for p in (module.weight, module.bias):
                if p is not None and p.requires_grad:
                    if id(p) in owner:
                        raise ValueError(f"PerSampleHooks: layers {owner[id(p)]!r} and {name!r} share a "
                                         "parameter; tied parameters are not supported")
                    owner[id(p)] = name
        return unique

    @property
    def layers(self) -> list:
        """Names of the tracked layers."""
        return [name for name, _ in self._layers]

    # -- hooks

    def _on_model_forward(self, module, args):
        if torch.is_grad_enabled():
            self.clear()

    def _on_layer_forward(self, name, module, args, kwargs, output):
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        cap = self._captures[name]
        if cap.input is not None and cap.grad is None:
            cap.repeated = True  # a second application before the gradient of the first
            return
        x = args[0] if args else kwargs["input"]
        cap.generation += 1
        cap.input, cap.grad, cap.repeated = x.detach(), None, False
        cap.out_shape, cap.out_dtype = output.shape, output.dtype
        target, view = _hook_target(output)
        target.register_hook(functools.partial(self._on_grad, cap, cap.generation, view))

    @staticmethod
    def _on_grad(cap: _Capture, generation: int, view, grad: torch.Tensor):
        if cap.generation == generation:
            if view is not None:
                grad = grad.contiguous().as_strided(*view)
            cap.grad = grad.detach()

    # -- results

    def _ready(self) -> list:
        """(name, module, input, output gradient) of every layer that ran in the latest pass."""
        ready, any_grad = [], False
        for name, module in self._layers:
            cap = self._captures[name]
            if cap.input is None:
                continue
            if cap.repeated:
                raise ValueError(f"PerSampleHooks: layer {name!r} ran more than once in one forward pass "
                                 "(shared weights); its per-sample gradient is not one δᵀx. Leave it out "
                                 "with layers=[...].")
            any_grad = any_grad or cap.grad is not None
            ready.append((name, module, cap))
        if not ready:
            raise RuntimeError("PerSampleHooks: no tracked layer ran a forward pass with grad enabled since "
                               "the hooks were set up or cleared")
        if not any_grad:
            raise RuntimeError("PerSampleHooks: no output gradient was captured; call after loss.backward()")
        out = []
        for name, module, cap in ready:
            # A layer whose output did not reach the loss has zero gradient.
            grad = cap.grad if cap.grad is not None else torch.zeros(
                cap.out_shape, dtype=cap.out_dtype, device=cap.input.device)
            out.append((name, module, cap.input, grad))
        return out

    def layer_parts(self, process_group=None) -> dict:
        """{layer name: PerSampleParts} of every tracked layer that ran in the latest pass.

        Under torch.distributed (``process_group``: None for the default group when initialised,
        or a group; :data:`trainscope.distributed.THIS_PROCESS` for this rank alone) each rank's
        parts are its own samples against the global ḡ of the whole batch, tied to the group (a
        collective: every rank calls it; see the class docstring)."""
    
        group = active_group(process_group)
        if group is not None:
            return self._layer_parts_across_ranks(group)
        out = {}
        for name, module, x, g in self._ready():
            p = layer_per_sample_parts(module, x, g, self.method)
            if self.loss_reduction == "mean":  # the captured gᵢ are ∇ℓᵢ / B
                s = float(x.shape[0]) ** 2
                p = PerSampleParts(p.sq_norms * s, p.dots * s, p.mean_sq_norm * s)
            out[name] = p
        return out

    def _layer_parts_across_ranks(self, group) -> dict:
        """layer_parts over the ranks of ``group``: one all-reduce of every layer's Σᵢ gᵢ and B_r."""
        import torch.distributed as dist

        ready = self._ready()
        b = ready[0][2].shape[0]
        for name, _, x, _ in ready:
            if x.shape[0] != b:
                raise ValueError(f"PerSampleHooks: layer {name!r} saw {x.shape[0]} samples but layer "
                                 f"{ready[0][0]!r} saw {b}; every tracked layer must see the whole batch")
        if b < 1:
            raise ValueError("PerSampleHooks: this rank's batch has no samples; with the batch split over ranks "
                             "every rank needs at least one")
        # Every rank's gradients are ∇ℓᵢ of its own samples: a mean-reduced loss over this rank's B_r
        # samples gives ∇ℓᵢ / B_r, scaled back by B_r here.
        scale = float(b) if self.loss_reduction == "mean" else 1.0
        sums = [_layer_grad_sum(m, x, g) * scale for _, m, x, g in ready]
        device = sums[0].device
        packed = torch.cat([t.to(device) for t in sums] + [torch.full((1,), float(b), dtype=torch.float64,
                                                                       device=device)])
        dist.all_reduce(packed, group=group)
        total = packed[-1]  # B, on the device
        out, offset = {}, 0
        for (name, module, x, g), local_sum in zip(ready, sums):
            n = local_sum.numel()
            mean = (packed[offset:offset + n] / total).to(local_sum.device)
            offset += n
            dots = _layer_dots(module, x, g, mean) * scale
            sq = _layer_sq_norms(module, x, g, self.method) * (scale * scale)
            out[name] = PerSampleParts(sq, dots, mean.square().sum(), group)
        return out

    def parts(self, process_group=None) -> PerSampleParts:
        """PerSampleParts summed over the tracked layers (this rank's, against the global ḡ, under
        torch.distributed: see :meth:`layer_parts`)."""
        return sum(self.layer_parts(process_group).values())

    def stats(self, process_group=None) -> torch.Tensor:
        """The six statistics [6], in PER_SAMPLE_STATS order (needs B >= 2): of the whole batch over
        the ranks under torch.distributed (a collective; ``process_group`` as in :meth:`layer_parts`)."""
        return self.parts(process_group).stats()

    def _hist_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.loss_reduction == "sum":
            return grad
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return grad.to(acc) * grad.shape[0]

    def grad_hist1d(self, nbins: int = 100, maxval: float = 0.05, process_group=None) -> torch.Tensor:
        """Exact int64 histogram [nbins] of all per-sample gradient elements of the tracked layers
        (of the whole batch under torch.distributed: the ranks' counts summed, one all-reduce)."""
        hists = [layer_per_sample_grad_hist1d(m, x, self._hist_grad(g), nbins, maxval)
                 for _, m, x, g in self._ready()]
        return _sum_over_ranks(functools.reduce(torch.add, hists), process_group)

    def grad_hist2d(self, nbins_grad: int = 100, maxval_grad: float = 0.05, nbins_param: int = 100,
                    maxval_param: float = 1.0, process_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Joint histogram of (per-sample gradient element, parameter value) over the tracked
        layers: (counts [nbins_grad, nbins_param] int64, nonfinite [] int64); summed over the
        ranks under torch.distributed (one all-reduce; the parameters must be whole on every
        rank, as under DDP)."""
        results = [layer_per_sample_grad_hist2d(m, x, self._hist_grad(g), nbins_grad, maxval_grad,
                                                nbins_param, maxval_param)
                   for _, m, x, g in self._ready()]
        counts = functools.reduce(torch.add, [c for c, _ in results])
        nonfinite = functools.reduce(torch.add, [n for _, n in results])
    
        if active_group(process_group) is None:
            return counts, nonfinite
        packed = _sum_over_ranks(torch.cat([counts.reshape(-1), nonfinite.reshape(1)]), process_group)
        return packed[:-1].view_as(counts), packed[-1]

    # -- lifetime

    def clear(self) -> None:
        """Forgets the captured inputs and gradients."""
        for cap in self._captures.values():
            cap.generation += 1
            cap.input = cap.grad = None
            cap.out_shape = cap.out_dtype = None
            cap.repeated = False

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


def _fake_check(op: str, input, grad_output, conv: bool) -> None:
    """The shape and dtype checks of the kernels, so that a traced call fails as an eager one
    does, naming the argument (the kernels check the rest when they run)."""
    for name, t in (("input", input), ("grad_output", grad_output)):
        if t.dtype not in _FLOATS:
            raise RuntimeError(f"trainscope::{op}: {name} has dtype {t.dtype}; trainscope needs float32, "
                               "float64, bfloat16 or float16")
    if conv:
        if input.dim() != 4:
            raise RuntimeError(f"trainscope::{op}: input must be [B, C_in, H, W], got shape {list(input.shape)}")
        if grad_output.dim() != 4:
            raise RuntimeError(f"trainscope::{op}: grad_output must be [B, C_out, H', W'], got shape "
                               f"{list(grad_output.shape)}")
    elif input.dim() < 2:
        raise RuntimeError(f"trainscope::{op}: input must be [B, d_in] or [B, ..., d_in], got shape "
                           f"{list(input.shape)}")
    elif grad_output.dim() != input.dim():
        raise RuntimeError(f"trainscope::{op}: grad_output has shape {list(grad_output.shape)} but input has "
                           f"shape {list(input.shape)}; they must agree in every dim but the last")


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
