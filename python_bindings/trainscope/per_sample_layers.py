"""Per-sample gradients of the layer kinds beyond nn.Linear and nn.Conv2d (SPEC.md §2), one class
per kind's math. :mod:`trainscope.per_sample_factors` dispatches here; every kind gives the same
float64 :class:`PerSampleParts` as the Linear/Conv2d ops (so layers add up, uses of one layer add
as more positions of a sample, and the loss_reduction scaling and the distributed path apply), and
the pieces of the distributed path: Σᵢ gᵢ (flat, float64) and gᵢ·ḡ against a given ḡ.

How each kind is measured:

- ``nn.Embedding``: sample i's gradient is its output-gradient rows δ_it added onto the rows of
  its tokens. The rows are summed per (sample, token) (a sort of the B·T keys and one index_add,
  no [B, V, D] tensor): ‖gᵢ‖² is the sum of their squares, gᵢ·ḡ gathers ḡ's rows, Σᵢ gᵢ is an
  index_add over the tokens. Positions holding ``padding_idx`` get no gradient (as in torch);
  ``max_norm`` and ``sparse`` change nothing here; ``scale_grad_by_freq`` (a gradient scaled by
  the token's count in the whole batch, so samples interact) is refused.
- normalisation layers (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, affine
  ``nn.InstanceNorm1d/2d/3d``, ``nn.BatchNorm1d/2d/3d`` using running statistics): per-sample
  gradients [B, C] are formed outright: weight Σ δ ⊙ x̂ over the positions, bias Σ δ, x̂ the
  normalised input recomputed from the captured input with the module's eps and statistics, in
  the accumulation dtype of the layer's own backward pass (float64 for float64 layers, float32
  otherwise), each sample's [C] sums then upcast to float64. A batch norm that normalises with
  batch statistics (train mode, or ``track_running_stats=False``) mixes the samples: refused,
  naming the layer.
- ``nn.Conv1d`` (as Conv2d with a height of 1), ``nn.ConvTranspose1d/2d`` (the weight gradient of
  a transposed convolution is a convolution's with input and output gradient exchanged: the
  Conv2d op on (δ, x); the bias, Σ δ, formed outright), ``nn.Conv3d`` (unfolded over three
  dimensions into the Linear op's problem, one per group).
- ``nn.MultiheadAttention``: its projections are used through ``F.multi_head_attention_forward``,
  not through modules. They are linear layers on disjoint rows of its parameters
  (:class:`LinearBlock`): in_proj reads the query, key and value (one block of 3E rows for
  self-attention on a packed weight), out_proj reads the attention output. For packed
  self-attention on a step whose statistics are due, the gradient reaching the in-projection's
  output and the attention output are read from the training pass's autograd graph (the attention
  output saved by out_proj's GEMM, the gradient by a hook on the in-projection's GEMM). Otherwise
  they are recomputed from the captured query, key, value and masks by one batched forward and
  backward of the attention between them (samples do not interact), in tiles of samples. The
  Linear ops then measure each block. A module with bias_k,
  bias_v, add_zero_attn or a frozen parameter instead has its per-sample gradients formed by
  recomputing its whole forward in float64, one vjp per sample (``torch.func.vmap``). Dropout in
  train mode (not recomputable) and attention weights that reach the loss are refused.
- any other module with trainable parameters of its own, when the hooks are asked to
  (``on_unsupported="vmap"``, :class:`GenericKind`): its forward recomputed by torch.func, one
  vjp per sample from the captured call, after a check on the first samples that it treats the
  samples independently.

A parameter shared by several modules (tied weights): a token embedding tied to a Linear (a
GPT-style LM head) by :class:`TiedEmbeddingLinear`, from their factors (no [B, V, D] tensor; the
head by the Linear op, the embedding's share of ḡ on the batch's tokens' rows, the cross term
Σ_{t,s} δh_is[tok_it] (δe_it·x_is)); any other tie by :class:`Materialised`: the
per-sample gradients of every module holding it are formed in tiles of samples and added, so the
cross terms between the modules are exact; memory is bounded by one tile.
"""

from __future__ import annotations

import inspect
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._curvature_factors import _param_of
from .per_sample_stats import PerSampleParts

#: float64 elements of the temporaries of one tile of samples.
TILE_ELEMS = 1 << 24


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of per-sample work on these tensors: float64 when all are, float32
    otherwise (as the op library's kernels accumulate)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _cat_positions(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uses of a layer as more positions of each sample: [b, T_u, k] tensors joined along dim 1."""
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), dim=1)


def dense_parts(g: torch.Tensor) -> PerSampleParts:
    """Parts of per-sample gradients [B, P] (float64) formed outright."""
    mean = g.mean(0)
    return PerSampleParts((g * g).sum(1), g @ mean, mean @ mean)


def _flat(grads: List[torch.Tensor]) -> torch.Tensor:
    b = grads[0].shape[0]
    return torch.cat([g.reshape(b, -1) for g in grads], dim=1)


# ------------------------------------------------------------------------------------------------
# Kinds


class LayerKind:
    """One layer kind's math. ``xs``/``gs``: the captured input and output gradient of each use
    (row i of each is sample i). The defaults form per-sample gradients in tiles (:meth:`grads`)."""

    base: type = nn.Module
    forwards: Tuple = ()
    #: The fewest input dims at which the layer's input holds positions before the batch
    #: ([T, B, ...]) when PerSampleHooks(batch_first=False); None: the batch is always dim 0
    #: (convolutions and the channel norms, batch-first by definition) or the layer says itself
    #: (nn.MultiheadAttention's batch_first).
    seq_first_dims: Optional[int] = None

    def matches(self, module: nn.Module) -> bool:
        if not isinstance(module, self.base):
            return False
        cls = type(module)
        return all(getattr(cls, attr) is fn for attr, fn in self.forwards)

    def params(self, module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        """(name in the module, parameter) of the trainable parameters the kind measures."""
        return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]

    def capture(self, module: nn.Module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        return x.detach()

    def wrap(self, module, x):
        """An input given directly (not captured by the hooks) as the kind holds a captured one."""
        return x

    def batch_to_front(self, x):
        """A captured input [T, B, ...] as [B, T, ...] (a view)."""
        return x.transpose(0, 1)

    def output(self, output):
        """The output tensor whose gradient is captured (None: nothing to capture)."""
        return output if isinstance(output, torch.Tensor) else None

    def problem(self, module: nn.Module, name: str, uses) -> Optional[str]:
        """Why the captured uses cannot be measured (None: they can)."""
        return None

    def per_sample_elems(self, module: nn.Module, xs, gs) -> int:
        """float64 elements of :meth:`grads`'s temporaries per sample (for the tile size)."""
        b = max(xs[0].shape[0], 1)
        return sum(p.numel() for _, p in self.params(module)) + sum(
            (x.numel() + g.numel()) // b for x, g in zip(xs, gs))

    def grads(self, module: nn.Module, xs, gs) -> List[torch.Tensor]:
        """Per-sample gradients [b, *p.shape] float64 of :meth:`params` (summed over the uses)."""
        raise NotImplementedError

    # Defaults from the per-sample gradients.
    def parts(self, module, xs, gs, method: str = "auto") -> PerSampleParts:
        return Materialised([(self, module, xs, gs)]).parts()

    def grad_sum(self, module, xs, gs) -> torch.Tensor:
        return Materialised([(self, module, xs, gs)]).grad_sum()

    def dots(self, module, xs, gs, mean: torch.Tensor) -> torch.Tensor:
        return Materialised([(self, module, xs, gs)]).dots(mean)


class _NormKind(LayerKind):
    """Weight Σ δ ⊙ x̂ and bias Σ δ over the positions of each sample."""

    def xhat(self, module, x: torch.Tensor, training: bool, dtype: torch.dtype) -> torch.Tensor:
        """The normalised input x, without the affine parameters, computed in ``dtype``."""
        raise NotImplementedError

    def param_dims(self, module, x) -> int:
        """How many trailing dims of x the parameters span (the rest but dim 0 are positions)."""
        raise NotImplementedError

    def capture(self, module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        return _Tagged(x.detach(), module.training)

    def wrap(self, module, x):
        """An input given as a plain tensor (not captured by the hooks) is taken in the module's
        current mode."""
        return x if isinstance(x, _Tagged) else _Tagged(x.detach(), module.training)

    def batch_to_front(self, x):
        return _Tagged(x.tensor.transpose(0, 1), x.training)

    def grads(self, module, xs, gs):
        w = module.weight if module.weight is not None and module.weight.requires_grad else None
        b = getattr(module, "bias", None)
        b = b if b is not None and b.requires_grad else None
        gw = gb = 0
        for x, g in zip(xs, gs):
            t = x.tensor
            # x̂ and the products in the layer's accumulation dtype, as the layer's own backward
            # pass: float64 copies of activations would cost several passes over each of them.
            acc = acc_dtype(t, g)
            d = g.to(acc)
            shape_dims = self.param_dims(module, t)
            if shape_dims > 0:   # parameters over trailing dims (LayerNorm, RMSNorm)
                dims = tuple(range(1, t.dim() - shape_dims))
            else:                # parameters over channels, dim 1 (GroupNorm, InstanceNorm, BatchNorm)
                dims = tuple(range(2, t.dim()))
            if w is not None:
                prod = d * self.xhat(module, t, x.training, acc)
                gw = gw + (prod.sum(dims) if dims else prod).double()
            if b is not None:
                gb = gb + (d.sum(dims) if dims else d).double()
        return ([gw] if w is not None else []) + ([gb] if b is not None else [])

    def per_sample_elems(self, module, xs, gs):
        return 3 * super().per_sample_elems(module, xs, gs)


class _Tagged:
    """A captured input with the module's train/eval mode at that time."""

    def __init__(self, tensor: torch.Tensor, training: bool):
        self.tensor, self.training = tensor, training

    @property
    def shape(self):
        return self.tensor.shape

    @property
    def device(self):
        return self.tensor.device

    def numel(self):
        return self.tensor.numel()

    def __getitem__(self, index):
        return _Tagged(self.tensor[index], self.training)

    def __len__(self):
        return self.tensor.shape[0]


class LayerNormKind(_NormKind):
    base = nn.LayerNorm
    seq_first_dims = 3
    forwards = (("forward", nn.LayerNorm.forward),)

    def param_dims(self, module, x):
        return len(module.normalized_shape)

    def xhat(self, module, x, training, dtype):
        return F.layer_norm(x.to(dtype), module.normalized_shape, None, None, module.eps)


class RMSNormKind(_NormKind):
    base = getattr(nn, "RMSNorm", ())
    seq_first_dims = 3
    forwards = (("forward", nn.RMSNorm.forward),) if hasattr(nn, "RMSNorm") else ()

    def matches(self, module):
        return hasattr(nn, "RMSNorm") and super().matches(module)

    def param_dims(self, module, x):
        return len(module.normalized_shape)

    def xhat(self, module, x, training, dtype):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps  # the layer's own
        return F.rms_norm(x.to(dtype), module.normalized_shape, None, eps)


class GroupNormKind(_NormKind):
    base = nn.GroupNorm
    forwards = (("forward", nn.GroupNorm.forward),)

    def param_dims(self, module, x):
        return 0

    def xhat(self, module, x, training, dtype):
        return F.group_norm(x.to(dtype), module.num_groups, None, None, module.eps)


def _running_xhat(module, x: torch.Tensor) -> torch.Tensor:
    """x normalised by the module's running statistics (eval mode), in x's dtype."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = module.running_mean.to(x.dtype).reshape(shape), module.running_var.to(x.dtype).reshape(shape)
    return (x - mean) * torch.rsqrt(var + module.eps)


class InstanceNormKind(_NormKind):
    base = nn.modules.instancenorm._InstanceNorm
    forwards = (("forward", nn.modules.instancenorm._InstanceNorm.forward),)

    def param_dims(self, module, x):
        return 0

    def problem(self, module, name, uses):
        for u in uses:
            if u.input.tensor.dim() == module._get_no_batch_dim():
                return (f"layer {name!r} ({type(module).__name__}) ran on an unbatched input of shape "
                        f"{list(u.input.shape)}; per-sample gradients need a batch dim")
        return None

    def xhat(self, module, x, training, dtype):
        x = x.to(dtype)
        if training or not module.track_running_stats:  # each sample's own statistics
            return F.instance_norm(x, None, None, eps=module.eps)
        return _running_xhat(module, x)


class BatchNormKind(_NormKind):
    base = nn.modules.batchnorm._BatchNorm
    forwards = (("forward", nn.modules.batchnorm._BatchNorm.forward),)

    def param_dims(self, module, x):
        return 0

    def problem(self, module, name, uses):
        if module.running_mean is None or any(u.input.training for u in uses):
            return (f"layer {name!r} ({type(module).__name__}) normalised with batch statistics (train mode or "
                    "track_running_stats=False), which mix the samples: per-sample gradients are not defined. "
                    "Measure with the batch norms in eval mode, or pass on_unsupported='skip' to leave them out "
                    "(reported in hooks.coverage)")
        return None

    def xhat(self, module, x, training, dtype):
        return _running_xhat(module, x.to(dtype))


# ------------------------------------------------------------------------------------------------
# Embedding


def _group_ids(keys: torch.Tensor) -> torch.Tensor:
    """The group of each of the N keys [N]: 0 .. U-1 over the U distinct keys in sorted order, so
    that N rows (groups U .. N-1 left empty) hold them without reading U on the host (no sync)."""
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.empty_like(order).scatter_(0, order, torch.cumsum(starts.long(), 0) - 1)


class EmbeddingKind(LayerKind):
    base = nn.Embedding
    seq_first_dims = 2
    forwards = (("forward", nn.Embedding.forward),)

    def problem(self, module, name, uses):
        if module.scale_grad_by_freq:
            return (f"layer {name!r} (Embedding) has scale_grad_by_freq=True: its gradient divides by each "
                    "token's count in the whole batch, which mixes the samples")
        return None

    def _rows(self, module, xs, gs):
        """(rows [N, D], sample of each row [N], token of each row [N]): sample i's gradient rows
        summed per (sample, token), N = the number of positions (unused rows are zero)."""
        b = xs[0].shape[0]
        toks = _cat_positions([x.reshape(b, -1) for x in xs])                      # [b, T]
        deltas = _cat_positions([g.reshape(b, -1, g.shape[-1]) for g in gs]).double()  # [b, T, D]
        t = toks.shape[1]
        if module.padding_idx is not None:
            deltas = deltas * (toks != module.padding_idx).unsqueeze(-1)
        samples = torch.arange(b, device=toks.device).repeat_interleave(t)
        toks = toks.reshape(-1)
        keys = samples * module.num_embeddings + toks
        group = _group_ids(keys)                                                   # row of each position
        n, d = keys.shape[0], deltas.shape[-1]
        rows = deltas.new_zeros(n, d).index_add_(0, group, deltas.reshape(n, d))
        row_sample = torch.zeros_like(samples).scatter_(0, group, samples)
        row_tok = torch.zeros_like(toks).scatter_(0, group, toks)
        return rows, row_sample, row_tok, b

    def parts(self, module, xs, gs, method="auto"):
        if not module.weight.requires_grad:
            raise ValueError("Embedding: the weight is frozen")
        rows, row_sample, row_tok, b = self._rows(module, xs, gs)
        sq = rows.new_zeros(b).index_add_(0, row_sample, (rows * rows).sum(1))
        mean = rows.new_zeros(module.num_embeddings, rows.shape[1]).index_add_(0, row_tok, rows) / b
        dots = rows.new_zeros(b).index_add_(0, row_sample, (rows * mean[row_tok]).sum(1))
        return PerSampleParts(sq, dots, (mean * mean).sum())

    def grad_sum(self, module, xs, gs):
        rows, _, row_tok, _ = self._rows(module, xs, gs)
        return rows.new_zeros(module.num_embeddings, rows.shape[1]).index_add_(0, row_tok, rows).reshape(-1)

    def dots(self, module, xs, gs, mean):
        rows, row_sample, row_tok, b = self._rows(module, xs, gs)
        mean = mean.reshape(module.num_embeddings, -1).to(rows)
        return rows.new_zeros(b).index_add_(0, row_sample, (rows * mean[row_tok]).sum(1))

    def per_sample_elems(self, module, xs, gs):
        return module.weight.numel() + super().per_sample_elems(module, xs, gs)

    def grads(self, module, xs, gs):
        rows, row_sample, row_tok, b = self._rows(module, xs, gs)
        v = module.num_embeddings
        out = rows.new_zeros(b * v, rows.shape[1]).index_add_(0, row_sample * v + row_tok, rows)
        return [out.reshape(b, v, -1)]


# ------------------------------------------------------------------------------------------------
# Linear and Conv2d (for tied parameters and histograms; their parts come from the ops)


class LinearKind(LayerKind):
    base = nn.Linear
    seq_first_dims = 3
    forwards = (("forward", nn.Linear.forward),)

    def grads(self, module, xs, gs):
        b = xs[0].shape[0]
        x = _cat_positions([x.reshape(b, -1, x.shape[-1]) for x in xs]).double()
        d = _cat_positions([g.reshape(b, -1, g.shape[-1]) for g in gs]).double()
        out = []
        if module.weight.requires_grad:
            out.append(torch.einsum("bto,bti->boi", d, x))
        if module.bias is not None and module.bias.requires_grad:
            out.append(d.sum(1))
        return out


def conv_padded(module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, list]:
    """The input padded as a convolution module pads it, and the zero padding left (any dims)."""
    n = x.dim() - 2
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, list(module.padding)
    if isinstance(module.padding, str) and module.padding == "valid":
        return x, [0] * n
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), [0] * n


def _unfold_nd(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Patches [b, L, C·prod(kernel)] of a [b, C, *spatial] input (any number of spatial dims),
    channel-major as a convolution weight viewed as [C_out, -1]."""
    n = x.dim() - 2
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    if any(pad):
        x = F.pad(x, pad)
    for k in range(n):
        span = dilation[k] * (kernel[k] - 1) + 1
        x = x.unfold(2 + k, span, stride[k])
    # [b, C, *out, *span] -> dilated kernel taps
    sl = (slice(None),) * (2 + n) + tuple(slice(None, None, d) for d in dilation)
    x = x[sl]
    b, c = x.shape[:2]
    out = x.shape[2:2 + n]
    perm = [0] + list(range(2, 2 + n)) + [1] + list(range(2 + n, 2 + 2 * n))
    length = 1
    for o in out:
        length *= o
    return x.permute(perm).reshape(b, length, -1)


class _ConvKind(LayerKind):
    """Convolutions as linear problems: per group, X [b, T, k] and Δ [b, T, o] with sample i's
    gradient of the group's block of the weight (viewed as [rows, -1]) Σ_t Δ_itᵀ X_it."""

    transposed = False

    def problems(self, module, x, g) -> list:
        raise NotImplementedError

    def _weight_bias(self, module):
        w = module.weight.requires_grad
        b = module.bias is not None and module.bias.requires_grad
        return w, b

    def bias_grad(self, module, xs, gs) -> torch.Tensor:
        """Σ over positions of δ, [b, C_out], summed over the uses."""
        out = 0
        for g in gs:
            out = out + g.double().flatten(2).sum(2)
        return out

    def grads(self, module, xs, gs):
        w, bias = self._weight_bias(module)
        out = []
        if w:
            gw = 0
            for x, g in zip(xs, gs):
                gw = gw + torch.cat([torch.einsum("bto,btk->bok", d, xx) for xx, d in self.problems(module, x, g)],
                                    dim=1)
            out.append(gw.reshape((gw.shape[0],) + tuple(module.weight.shape)))
        if bias:
            out.append(self.bias_grad(module, xs, gs))
        return out

    def per_sample_elems(self, module, xs, gs):
        b = max(xs[0].shape[0], 1)
        elems = module.weight.numel()
        for x, g in zip(xs, gs):
            positions = (x if self.transposed else g)[0, 0].numel()  # the unfolded side's positions
            elems += 2 * (x.numel() + g.numel()) // b + positions * module.weight[0].numel() * module.groups
        return elems

    def grad_sum(self, module, xs, gs):
        w, bias = self._weight_bias(module)
        tile = max(1, TILE_ELEMS // max(self.per_sample_elems(module, xs, gs), 1))
        total = None
        for a in range(0, xs[0].shape[0], tile):
            parts = []
            if w:
                ws = 0
                for x, g in zip(xs, gs):
                    ws = ws + torch.cat([d.reshape(-1, d.shape[-1]).T @ xx.reshape(-1, xx.shape[-1])
                                         for xx, d in self.problems(module, x[a:a + tile], g[a:a + tile])])
                parts.append(ws.reshape(-1))
            if bias:
                parts.append(self.bias_grad(module, [x[a:a + tile] for x in xs], [g[a:a + tile] for g in gs]).sum(0))
            s = torch.cat(parts)
            total = s if total is None else total + s
        return total

    def dots(self, module, xs, gs, mean):
        w, bias = self._weight_bias(module)
        rows = module.weight.shape[0]
        n_w = module.weight.numel() if w else 0
        w_mean = mean[:n_w].reshape(rows, -1) if w else None
        b_mean = mean[n_w:] if bias else None
        tile = max(1, TILE_ELEMS // max(self.per_sample_elems(module, xs, gs), 1))
        out = []
        for a in range(0, xs[0].shape[0], tile):
            xt, gt = [x[a:a + tile] for x in xs], [g[a:a + tile] for g in gs]
            dots = 0
            if w:
                for x, g in zip(xt, gt):
                    problems = self.problems(module, x, g)
                    o = rows // len(problems)
                    for j, (xx, d) in enumerate(problems):
                        dots = dots + ((xx @ w_mean[j * o:(j + 1) * o].T) * d).sum((1, 2))
            if bias:
                dots = dots + self.bias_grad(module, xt, gt) @ b_mean
            out.append(dots)
        return torch.cat(out)


class Conv1dKind(_ConvKind):
    base = nn.Conv1d
    forwards = (("forward", nn.Conv1d.forward), ("_conv_forward", nn.Conv1d._conv_forward))

    def problems(self, module, x, g):
        xp, padding = conv_padded(module, x)
        cols = _unfold_nd(xp.double(), module.kernel_size, module.stride, padding, module.dilation)
        delta = g.double().flatten(2).transpose(1, 2)
        return list(zip(cols.chunk(module.groups, dim=2), delta.chunk(module.groups, dim=2)))

    def parts(self, module, xs, gs, method="auto"):
        w, bias = self._weight_bias(module)
        if not w:  # a trainable bias alone: [B, C_out]
            return Materialised([(self, module, xs, gs)]).parts()
        x4, padding = [], None
        for x in xs:
            xp, padding = conv_padded(module, x)
            x4.append(xp.unsqueeze(2))
        g4 = [g.unsqueeze(2) for g in gs]
        op = torch.ops.trainscope.conv2d_per_sample_parts
        args = ([1, module.kernel_size[0]], [1, module.stride[0]], [0, padding[0]], [1, module.dilation[0]],
                int(module.groups), bool(bias), method)
        if len(x4) == 1:
            sq, dots, msq = op.default(x4[0], g4[0], *args)
        else:
            sq, dots, msq = op.uses(x4, g4, *args)
        return PerSampleParts(sq, dots, msq)


class Conv3dKind(_ConvKind):
    base = nn.Conv3d
    forwards = (("forward", nn.Conv3d.forward), ("_conv_forward", nn.Conv3d._conv_forward))

    def problems(self, module, x, g, dtype=torch.float64):
        xp, padding = conv_padded(module, x)
        cols = _unfold_nd(xp.to(dtype), module.kernel_size, module.stride, padding, module.dilation)
        delta = g.to(dtype).flatten(2).transpose(1, 2)
        return list(zip(cols.chunk(module.groups, dim=2), delta.chunk(module.groups, dim=2)))

    def parts(self, module, xs, gs, method="auto"):
        w, bias = self._weight_bias(module)
        unfolded = sum(g[0, 0].numel() * module.weight[0].numel() * module.groups * g.shape[0] for g in gs)
        if not w or unfolded > TILE_ELEMS:
            # A trainable bias alone, or patches of the whole batch above the budget: per-sample
            # gradients formed in tiles of samples (memory bounded by a tile).
            return Materialised([(self, module, xs, gs)]).parts()
        # The batch's patches: one Linear problem per group (disjoint blocks of the weight and
        # bias: their parts add).
        per_use = [self.problems(module, x, g, dtype=torch.promote_types(x.dtype, torch.float32))
                   for x, g in zip(xs, gs)]
        total = 0
        op = torch.ops.trainscope.linear_per_sample_parts
        for j in range(module.groups):
            xx = [p[j][0] for p in per_use]
            dd = [p[j][1] for p in per_use]
            if len(xx) == 1:
                sq, dots, msq = op.default(xx[0], dd[0], bool(bias), method)
            else:
                sq, dots, msq = op.uses(xx, dd, bool(bias), method)
            total = total + PerSampleParts(sq, dots, msq)
        return total


class _ConvTransposeKind(_ConvKind):
    """The weight [C_in, C_out/groups, *k] is a convolution's from δ (C_out channels) to x (C_in):
    its gradient is that convolution's weight gradient with input δ and output gradient x."""

    transposed = True

    def problems(self, module, x, g):
        cols = _unfold_nd(g.double(), module.kernel_size, module.stride, list(module.padding), module.dilation)
        xx = x.double().flatten(2).transpose(1, 2)          # the "output gradient": [b, L_in, C_in]
        return list(zip(cols.chunk(module.groups, dim=2), xx.chunk(module.groups, dim=2)))

    def bias_parts(self, module, gs) -> PerSampleParts:
        return dense_parts(self.bias_grad(module, None, gs))

    def parts(self, module, xs, gs, method="auto"):
        w, bias = self._weight_bias(module)
        if not w:  # a trainable bias alone: [B, C_out]
            return self.bias_parts(module, gs)
        d4 = [self.as2d(g) for g in gs]
        x4 = [self.as2d(x) for x in xs]
        k, s, p, dil = self.geometry(module)
        op = torch.ops.trainscope.conv2d_per_sample_parts
        args = (k, s, p, dil, int(module.groups), False, method)
        if len(x4) == 1:
            sq, dots, msq = op.default(d4[0], x4[0], *args)
        else:
            sq, dots, msq = op.uses(d4, x4, *args)
        out = PerSampleParts(sq, dots, msq)
        return out + self.bias_parts(module, gs) if bias else out


class ConvTranspose1dKind(_ConvTransposeKind):
    base = nn.ConvTranspose1d
    forwards = (("forward", nn.ConvTranspose1d.forward),)

    def as2d(self, t):
        return t.unsqueeze(2)

    def geometry(self, module):
        return ([1, module.kernel_size[0]], [1, module.stride[0]], [0, module.padding[0]], [1, module.dilation[0]])


class ConvTranspose2dKind(_ConvTransposeKind):
    base = nn.ConvTranspose2d
    forwards = (("forward", nn.ConvTranspose2d.forward),)

    def as2d(self, t):
        return t

    def geometry(self, module):
        return (list(module.kernel_size), list(module.stride), list(module.padding), list(module.dilation))


class Conv2dKind(_ConvKind):
    """nn.Conv2d's per-sample gradients formed outright (tied parameters, histograms)."""
    base = nn.Conv2d
    forwards = (("forward", nn.Conv2d.forward), ("_conv_forward", nn.Conv2d._conv_forward))

    def problems(self, module, x, g):
        xp, padding = conv_padded(module, x)
        cols = F.unfold(xp.double(), module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride).transpose(1, 2)
        delta = g.double().flatten(2).transpose(1, 2)
        return list(zip(cols.chunk(module.groups, dim=2), delta.chunk(module.groups, dim=2)))


# ------------------------------------------------------------------------------------------------
# MultiheadAttention

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class MHAInput:
    """What nn.MultiheadAttention's forward took, batch first: query, key, value [b, L|S, E], the
    key padding mask [b, S] (or None), the attention mask ([L, S] shared, or [b, heads, L, S]),
    is_causal, whether its train mode (dropout) was on, whether the input had a batch dim, and the
    version counters of the module's parameters then (None: not checked)."""

    def __init__(self, query, key, value, key_padding_mask, attn_mask, is_causal, training, per_sample_mask,
                 batched=True, versions=None):
        self.query, self.key, self.value = query, key, value
        self.key_padding_mask, self.attn_mask = key_padding_mask, attn_mask
        self.is_causal, self.training, self.per_sample_mask = is_causal, training, per_sample_mask
        self.batched, self.versions = batched, versions
        self.factors = None  # (output gradient, its _mha_factors), kept for the step's later uses
        # Read from the training pass's graph (MHAKind.read_projections), else None: the attention
        # output out_proj multiplied [L·b, E] and the gradient reaching the packed in-projection's
        # output [L·b, 3E], both sequence first.
        self.captured_y = None
        self.captured_dqkv = None

    @property
    def shape(self):
        return self.query.shape

    @property
    def device(self):
        return self.query.device

    @property
    def dtype(self):
        return self.query.dtype

    def numel(self):
        return self.query.numel() + self.key.numel() + self.value.numel()

    def __getitem__(self, index):
        kpm = self.key_padding_mask[index] if self.key_padding_mask is not None else None
        am = self.attn_mask[index] if self.per_sample_mask else self.attn_mask
        return MHAInput(self.query[index], self.key[index], self.value[index], kpm, am, self.is_causal,
                        self.training, self.per_sample_mask, self.batched)


class LinearBlock:
    """Rows ``rows`` of ``weight`` (and ``bias_rows`` of ``bias``, if any) used as a linear layer:
    sample i's gradient of those rows is Σ over the uses of Σ_t δ_itᵀ x_it (inputs [b, T, d_in],
    output gradients [b, T, d_out]). Blocks on disjoint rows add up: their parts, sums and dots are
    those of the per-sample Linear ops, which run their GEMMs in the inputs' dtype."""

    def __init__(self, weight, rows: slice, bias, bias_rows: slice, inputs: list, grads: list):
        self.weight, self.rows, self.bias, self.bias_rows = weight, rows, bias, bias_rows
        self.inputs, self.grads_out = inputs, grads

    def parts(self, method: str) -> PerSampleParts:
        sq, dots, m = torch.ops.trainscope.linear_per_sample_parts.uses(
            self.inputs, self.grads_out, self.bias is not None, method)
        return PerSampleParts(sq, dots, m)

    def grad_sum(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(Σᵢ of the weight rows' gradients, of the bias rows'), float64."""
        w = sum((d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(d.dtype)).double()
                for x, d in zip(self.inputs, self.grads_out))
        bias = sum(d.reshape(-1, d.shape[-1]).double().sum(0) for d in self.grads_out) if self.bias is not None \
            else None
        return w, bias

    def projections(self, weight_dir: torch.Tensor, bias_dir: Optional[torch.Tensor]) -> torch.Tensor:
        """Gᵢ·D [b] float64 of the block's per-sample gradients and a direction of its rows."""
        return torch.ops.trainscope.linear_per_sample_projections.uses(self.inputs, self.grads_out, weight_dir,
                                                                       bias_dir)

    def grads(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The per-sample gradients of the weight rows [b, d_out, d_in] and of the bias rows [b, d_out],
        float64."""
        w = sum(torch.einsum("btj,btk->bjk", d.double(), x.double()) for x, d in zip(self.inputs, self.grads_out))
        bias = sum(d.double().sum(1) for d in self.grads_out) if self.bias is not None else None
        return w, bias


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b view the same elements (a query that is also the key: self-attention)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as added to the scores: True (not attended) is -inf, a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _factors_of(module: nn.MultiheadAttention, x: "MHAInput", g: torch.Tensor) -> tuple:
    """_mha_factors of one captured use: as the training pass's graph gave them where it did
    (:meth:`MHAKind.read_projections`), else recomputed, once per output gradient (the statistics
    across ranks ask for Σᵢ gᵢ, gᵢ·ḡ and ‖gᵢ‖² in turn)."""
    if x.factors is None or x.factors[0] is not g:
        captured = _captured_factors(module, x)
        x.factors = (g, captured if captured is not None else _mha_factors(module, x, g))
    return x.factors[1]


def _captured_factors(module: nn.MultiheadAttention, x: "MHAInput") -> Optional[tuple]:
    """(δq, δk, δv, y) batch first from what the training pass's graph gave, or None where it gave
    nothing or not what _mha_factors would compute (another dtype, as under autocast, or shape)."""
    dqkv, y = x.captured_dqkv, x.captured_y
    if dqkv is None or y is None:
        return None
    b, l, e = x.query.shape
    dtype = torch.promote_types(x.query.dtype, module.out_proj.weight.dtype)
    if dqkv.dtype != dtype or y.dtype != dtype or dqkv.shape != (l * b, 3 * e) or y.shape != (l * b, e):
        return None
    return (*dqkv.view(l, b, 3 * e).transpose(0, 1).chunk(3, -1), y.view(l, b, e).transpose(0, 1))


def _gemm_weight(node) -> Optional[torch.Tensor]:
    """The parameter an autograd GEMM node (addmm, mm) multiplies by, reached through its
    transpose (F.linear's W x), else None."""
    for nf, _ in node.next_functions:
        if nf is not None and type(nf).__name__ == "TBackward0":
            for leaf, _ in nf.next_functions:
                if leaf is not None and _param_of(leaf) is not None:
                    return _param_of(leaf)
    return None


def _saved_left_factor(node) -> Optional[torch.Tensor]:
    """The input an addmm or mm node saved for its weight gradient (F.linear's x); None where it
    cannot be read (saved-tensor hooks that do not unpack during forward): then recomputed."""
    for attr in ("_saved_mat1", "_saved_self"):
        try:
            t = getattr(node, attr, None)
        except RuntimeError:
            return None
        if isinstance(t, torch.Tensor):
            return t
    return None


def _mha_factors(module: nn.MultiheadAttention, x: "MHAInput", g: torch.Tensor) -> tuple:
    """(δq, δk, δv, y) of one use, batch first: the gradients reaching the q, k and v projections'
    outputs [b, L|S, E] and the attention output y [b, L, E] that out_proj reads, for the output
    gradient g [b, L, E]. The attention between the projections is recomputed as
    F.multi_head_attention_forward computes it (masks merged and added to the scores, scale
    1/√head_dim, no dropout: train-mode dropout is refused before), batched over the samples,
    which do not interact, in tiles of samples; in the promoted dtype of the inputs and parameters."""
    e, heads = module.embed_dim, module.num_heads
    dtype = torch.promote_types(x.query.dtype, module.out_proj.weight.dtype)
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.detach().to(dtype).chunk(3)
    else:
        wq, wk, wv = (w.detach().to(dtype) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.detach().to(dtype).chunk(3)
    wo = module.out_proj.weight.detach().to(dtype)
    b, l, s = x.query.shape[0], x.query.shape[1], x.key.shape[1]
    step = max(1, TILE_ELEMS // max(1, 8 * (l + s) * e + 4 * heads * l * s))
    shared = None  # a mask of every sample, [L, S]
    if x.attn_mask is not None and not x.per_sample_mask:
        shared = _float_mask(x.attn_mask, dtype)
    elif x.attn_mask is None and x.is_causal:
        shared = _float_mask(torch.ones(l, s, dtype=torch.bool, device=x.device).triu(1), dtype)
    outs = []
    for a in range(0, b, step):
        sl = slice(a, a + step)
        mask = _float_mask(x.attn_mask[sl], dtype) if x.per_sample_mask and x.attn_mask is not None else shared
        if x.key_padding_mask is not None:
            kpm = _float_mask(x.key_padding_mask[sl], dtype)[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        with torch.enable_grad():
            q, k, v = (F.linear(t[sl].to(dtype), w, bias).requires_grad_()
                       for t, w, bias in ((x.query, wq, bq), (x.key, wk, bk), (x.value, wv, bv)))
            n = q.shape[0]
            heads_of = lambda t: t.view(n, t.shape[1], heads, e // heads).transpose(1, 2)  # noqa: E731
            y = F.scaled_dot_product_attention(heads_of(q), heads_of(k), heads_of(v), attn_mask=mask)
            y = y.transpose(1, 2).reshape(n, l, e)
            dy = g[sl].to(dtype) @ wo  # out_proj: out = y Woᵀ + bo
            dq, dk, dv = torch.autograd.grad(y, (q, k, v), dy)
        outs.append((dq, dk, dv, y.detach()))
    return tuple(torch.cat(parts) for parts in zip(*outs))


class MHAKind(LayerKind):
    base = nn.MultiheadAttention
    forwards = (("forward", nn.MultiheadAttention.forward),)

    def params(self, module):
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def capture(self, module, args, kwargs):
        bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        q, k, v = (t.detach() for t in (a["query"], a["key"], a["value"]))
        batched = q.dim() == 3
        if batched and not module.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        kpm = a["key_padding_mask"]
        am = a["attn_mask"]
        per_sample = batched and am is not None and am.dim() == 3  # [B·heads, L, S]
        if per_sample:
            am = am.detach().reshape(q.shape[0], module.num_heads, am.shape[-2], am.shape[-1])
        # The parameters' versions tell whether they changed since (an optimizer step).
        return MHAInput(q, k, v, None if kpm is None else kpm.detach(), None if am is None else am.detach(),
                        bool(a["is_causal"]), module.training, per_sample, batched, _versions(module))

    def output(self, output):
        return output[0] if isinstance(output, tuple) else None

    def wrap(self, module, x):
        if not isinstance(x, MHAInput):
            raise TypeError("MultiheadAttention: per-sample gradients need the query, key, value and masks the "
                            "module ran on; use PerSampleHooks, which captures them")
        return x

    def grad_to_batch_first(self, module) -> bool:
        return not module.batch_first

    def read_projections(self, module, x: MHAInput, out: torch.Tensor, current) -> None:
        """Spares :func:`_mha_factors` its recomputation of the attention, for packed
        self-attention with every parameter trainable: in the autograd graph of the module's output
        ``out``, the GEMM of out_proj saved the attention output y, which is kept, and the packed
        in-projection's GEMM gets a hook that keeps the gradient reaching its output (added up over
        backward passes through a retained graph while ``current()``). A graph without both GEMMs
        (another torch, a compiled module) leaves them None: then they are recomputed."""
        if not (self.factored(module) and module._qkv_same_embed_dim and _same_tensor(x.query, x.key)
                and _same_tensor(x.key, x.value)) or out.grad_fn is None:
            return
        w_in, w_out = module.in_proj_weight, module.out_proj.weight
        gemm_in = gemm_out = None
        stack, seen = [out.grad_fn], set()
        while stack and (gemm_in is None or gemm_out is None) and len(seen) < 256:  # the module's own nodes
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if type(node).__name__ in ("AddmmBackward0", "MmBackward0"):
                w = _gemm_weight(node)
                if w is w_out and gemm_out is None:
                    gemm_out = node
                elif w is w_in and gemm_in is None:
                    gemm_in = node
            stack.extend(nf for nf, _ in node.next_functions if nf is not None and _param_of(nf) is None)
        y = _saved_left_factor(gemm_out) if gemm_out is not None else None
        if gemm_in is None or y is None:
            return
        x.captured_y = y.detach()

        def keep(grad_inputs, grad_outputs):
            g = grad_outputs[0]
            if g is not None and current():
                g = g.detach()
                x.captured_dqkv = g if x.captured_dqkv is None else x.captured_dqkv + g

        gemm_in.register_hook(keep)

    def problem(self, module, name, uses):
        for u in uses:
            if not u.input.batched:
                return (f"layer {name!r} (MultiheadAttention) ran on an unbatched input; per-sample gradients "
                        "need a batch")
            if u.input.training and module.dropout > 0:
                return (f"layer {name!r} (MultiheadAttention) ran in train mode with dropout={module.dropout}; its "
                        "random dropout cannot be recomputed for per-sample gradients. Use dropout=0 or eval mode")
            if u.input.versions is not None and u.input.versions != _versions(module):
                return (f"layer {name!r} (MultiheadAttention): its parameters changed since its forward pass (an "
                        "optimizer step?); its per-sample gradients recompute that forward with the parameters it "
                        "ran with: measure before optimizer.step()")
            if getattr(u, "weights_reached_loss", False):
                return (f"layer {name!r} (MultiheadAttention): its attention weights reached the loss, which the "
                        "recomputation of its output does not follow")
        return None

    def per_sample_elems(self, module, xs, gs):
        p = sum(t.numel() for _, t in self.params(module))
        act = 0
        for x in xs:
            l, s = x.query.shape[1], x.key.shape[1]
            act += 8 * (l + s) * module.embed_dim + 4 * module.num_heads * l * s
        return 3 * p + act

    # The factor route: the projections are linear layers on disjoint rows of the parameters.
    def factored(self, module) -> bool:
        """Whether the projections' factors give every per-sample gradient: all parameters
        trainable, no bias_k/bias_v and no zero attention (the rest go through :meth:`grads`)."""
        return (module.bias_k is None and module.bias_v is None and not module.add_zero_attn
                and all(p.requires_grad for p in module.parameters()))

    def blocks(self, module, xs, gs) -> List[LinearBlock]:
        """The module as linear layers (see :class:`LinearBlock`): in_proj (one block of 3E rows
        when every use is self-attention on a packed weight, else one per q, k, v) and out_proj,
        each with the inputs and output gradients of every use, recomputed in the inputs' dtype."""
        e = module.embed_dim
        rows = [slice(i * e, (i + 1) * e) for i in range(3)]
        if module._qkv_same_embed_dim:
            weights = [(module.in_proj_weight, r) for r in rows]
        else:
            weights = [(w, slice(0, e)) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)]
        factors = [_factors_of(module, x, g) for x, g in zip(xs, gs)]  # (δq, δk, δv, y) per use
        bias = module.in_proj_bias
        if module._qkv_same_embed_dim and all(_same_tensor(x.query, x.key) and _same_tensor(x.key, x.value)
                                               for x in xs):
            ins = [LinearBlock(module.in_proj_weight, slice(0, 3 * e), bias, slice(0, 3 * e),
                               [x.query for x in xs], [torch.cat(f[:3], -1) for f in factors])]
        else:
            inputs = [(x.query, x.key, x.value) for x in xs]
            ins = [LinearBlock(w, r, bias, rows[i], [inp[i] for inp in inputs], [f[i] for f in factors])
                   for i, (w, r) in enumerate(weights)]
        o = module.out_proj
        return ins + [LinearBlock(o.weight, slice(0, e), o.bias, slice(0, e), [f[3] for f in factors], list(gs))]

    def _per_param(self, module, blocks, part, lead: tuple = ()) -> List[torch.Tensor]:
        """float64 [*lead, *p.shape] per parameter of :meth:`params`, each block's (weight rows,
        bias rows) from ``part(block)`` added on its rows."""
        out = {id(p): torch.zeros(lead + tuple(p.shape), dtype=torch.float64, device=p.device)
               for _, p in self.params(module)}
        for b in blocks:
            w, bias = part(b)
            out[id(b.weight)][..., b.rows, :] += w
            if bias is not None:
                out[id(b.bias)][..., b.bias_rows] += bias
        return [out[id(p)] for _, p in self.params(module)]

    def parts(self, module, xs, gs, method="auto"):
        if not self.factored(module):
            return super().parts(module, xs, gs, method)
        return sum(b.parts(method) for b in self.blocks(module, xs, gs))

    def grad_sum(self, module, xs, gs):
        if not self.factored(module):
            return super().grad_sum(module, xs, gs)
        sums = self._per_param(module, self.blocks(module, xs, gs), LinearBlock.grad_sum)
        return torch.cat([t.reshape(-1) for t in sums])

    def dots(self, module, xs, gs, mean):
        if not self.factored(module):
            return super().dots(module, xs, gs, mean)
        views, at = {}, 0
        for _, p in self.params(module):
            views[id(p)] = mean[at:at + p.numel()].view(p.shape)
            at += p.numel()
        return sum(b.projections(views[id(b.weight)][b.rows], None if b.bias is None else views[id(b.bias)][b.bias_rows])
                   for b in self.blocks(module, xs, gs))

    def grads(self, module, xs, gs):
        if self.factored(module):
            return self._per_param(module, self.blocks(module, xs, gs), LinearBlock.grads, (xs[0].shape[0],))
        names = [n for n, _ in self.params(module)]
        all_params = {n: p.detach().double() for n, p in module.named_parameters()}
        trained = {n: all_params[n] for n in names}
        frozen = {n: t for n, t in all_params.items() if n not in trained}
        total = None
        for x, g in zip(xs, gs):
            def one(q, k, v, kpm, am, delta, _x=x):
                def f(tp):
                    p = {**frozen, **tp}
                    return _mha_forward(module, p, q[None], k[None], v[None],
                                        None if kpm is None else kpm[None],
                                        am if am is None or not _x.per_sample_mask else am.reshape(-1, *am.shape[-2:]),
                                        _x.is_causal)
                _, pull = torch.func.vjp(f, trained)
                return pull(delta[None])[0]

            in_dims = (0, 0, 0, None if x.key_padding_mask is None else 0,
                       0 if x.per_sample_mask else None, 0)
            am, kpm = (m.double() if m is not None and m.is_floating_point() else m
                       for m in (x.attn_mask, x.key_padding_mask))
            out = torch.func.vmap(one, in_dims=in_dims)(x.query.double(), x.key.double(), x.value.double(),
                                                         kpm, am, g.double())
            total = out if total is None else {n: total[n] + out[n] for n in names}
        return [total[n] for n in names]


def _versions(module: nn.Module) -> tuple:
    return tuple(p._version for p in module.parameters())


def _mha_forward(module, p, q, k, v, key_padding_mask, attn_mask, is_causal):
    """nn.MultiheadAttention's output (its non-fast path, without dropout) with parameters ``p``;
    q, k, v batch first."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, _ = F.multi_head_attention_forward(
        q, k, v, module.embed_dim, module.num_heads, p.get("in_proj_weight"), p.get("in_proj_bias"),
        p.get("bias_k"), p.get("bias_v"), module.add_zero_attn, 0.0, p["out_proj.weight"], p.get("out_proj.bias"),
        training=False, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
        use_separate_proj_weight=not module._qkv_same_embed_dim, q_proj_weight=p.get("q_proj_weight"),
        k_proj_weight=p.get("k_proj_weight"), v_proj_weight=p.get("v_proj_weight"), average_attn_weights=True,
        is_causal=is_causal)
    return out.transpose(0, 1)


# ------------------------------------------------------------------------------------------------
# Any other module, by torch.func (PerSampleHooks(on_unsupported="vmap"))


class GenericCall:
    """One call of a module measured by :class:`GenericKind`: its arguments (tensors detached; the
    batched ones, whose dim 0 is the output's batch size, sliced by ``[a:b]``), a copy of the
    parameters and buffers of the module and its submodules as they were in the call (the
    optimizer may change them before the measurement), which output element's gradient is
    captured, and ``problem`` when the call cannot be measured."""

    def __init__(self, leaves, spec, batched, batch, state, out_index, problem=None):
        self.leaves, self.spec, self.batched, self.batch = leaves, spec, batched, batch
        self.state, self.out_index, self.problem = state, out_index, problem
        self.checked = None  # (the output gradient checked, GenericKind's verdict on it)

    @property
    def shape(self):
        return torch.Size([self.batch])

    @property
    def device(self):
        t = next((x for x in self.leaves if isinstance(x, torch.Tensor)), None)
        return t.device if t is not None else torch.device("cpu")

    def numel(self):
        return sum(x.numel() for x, b in zip(self.leaves, self.batched) if b)

    def __len__(self):
        return self.batch

    def __getitem__(self, index: slice):
        leaves = [x[index] if b else x for x, b in zip(self.leaves, self.batched)]
        n = len(range(*index.indices(self.batch)))
        return GenericCall(leaves, self.spec, self.batched, n, self.state, self.out_index, self.problem)


_recomputing = threading.local()


def recomputing() -> bool:
    """True while :class:`GenericKind` runs a module's forward again (on this thread): the hooks
    capture nothing then."""
    return getattr(_recomputing, "active", False)


class GenericKind(LayerKind):
    """A module of no other kind holding trainable parameters of its own (PerSampleHooks'
    ``on_unsupported="vmap"``): sample i's gradient of those parameters is the vector-Jacobian
    product of the module's forward, recomputed on sample i's rows of its batched arguments (dim 0
    of the output's batch size; other arguments as they are) with the parameters as they were in
    the call, against sample i's output gradient, by torch.func (vmap of vjp), in tiles of
    samples, in the call's dtypes. Its submodules' parameters are constants here (they are
    measured as layers of their own). That is only right when the forward treats the samples
    independently: :meth:`problem` checks it on the first samples (their per-sample gradients
    must add up to the gradient of their batch) and refuses what fails, what torch.func cannot
    transform (randomness such as dropout, data-dependent control flow, in-place updates of
    buffers) and a call whose output is not one tensor carrying the gradient. The check reads
    the device once per captured call (the verdict decides between a result and an error), at
    the measurement, never in the training step."""

    #: Samples of the check that the forward treats the samples independently.
    CHECK_SAMPLES = 4

    def matches(self, module):
        return False  # chosen per module by the hooks, never by type

    def params(self, module):
        # A MultiheadAttention subclass with its own forward reads its out_proj itself.
        recurse = isinstance(module, nn.MultiheadAttention)
        return [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]

    def output(self, output):
        if isinstance(output, torch.Tensor):
            return output
        index = self.output_index(output)
        return output[index] if index is not None and index >= 0 else None

    @staticmethod
    def output_index(output):
        """None for a tensor; the index of the one element of a tuple or list that carries a
        gradient; -1 when there is no such single element."""
        if isinstance(output, torch.Tensor):
            return None
        if isinstance(output, (tuple, list)):
            live = [i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.requires_grad]
            if len(live) == 1:
                return live[0]
        return -1

    def capture(self, module, args, kwargs, output=None):
        from torch.utils._pytree import tree_flatten

        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        index = self.output_index(output)
        out = output if index is None else (output[index] if index >= 0 else None)
        if out is None:
            return GenericCall(leaves, spec, [False] * len(leaves), 0, {}, index,
                               problem="its output is not one tensor carrying the gradient (a tuple with several, "
                                       "or another container)")
        batch = out.shape[0] if out.dim() > 0 else 0
        batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch for x in leaves]
        state = {n: t.detach().clone() for n, t in list(module.named_parameters()) + list(module.named_buffers())}
        problem = None if any(batched) else "none of its arguments holds the batch in dim 0"
        return GenericCall(leaves, spec, batched, batch, state, index, problem)

    def wrap(self, module, x):
        if not isinstance(x, GenericCall):
            raise TypeError(f"{type(module).__name__}: per-sample gradients by torch.func need the call the "
                            "module ran; use PerSampleHooks(on_unsupported='vmap'), which captures it")
        return x

    def per_sample_elems(self, module, xs, gs):
        b = max(xs[0].shape[0], 1)
        return 2 * sum(p.numel() for _, p in self.params(module)) + sum(
            (x.numel() + g.numel()) // b for x, g in zip(xs, gs))

    def _vjps(self, module, call: GenericCall, grad: torch.Tensor, per_sample: bool) -> dict:
        """{name: gradient} of the trained parameters: per sample ([b, *shape], vmap) or of the
        call's rows as one batch."""
        from torch.utils._pytree import tree_unflatten

        names = [n for n, _ in self.params(module)]
        trained = {n: call.state[n] for n in names}
        consts = {n: t for n, t in call.state.items() if n not in trained}

        def run(leaves, delta):
            args, kwargs = tree_unflatten(list(leaves), call.spec)

            def f(tp):
                out = torch.func.functional_call(module, {**consts, **tp}, args, kwargs)
                return out if call.out_index is None else out[call.out_index]

            _, pull = torch.func.vjp(f, trained)
            return pull(delta)[0]

        def one(*rows):
            it = iter(rows[:-1])
            leaves = [next(it)[None] if b else x for x, b in zip(call.leaves, call.batched)]
            return run(leaves, rows[-1][None])

        before = recomputing()
        _recomputing.active = True
        try:
            if not per_sample:
                return run(call.leaves, grad)
            batched = [x for x, b in zip(call.leaves, call.batched) if b]
            return torch.func.vmap(one, randomness="error")(*batched, grad)
        finally:
            _recomputing.active = before

    def problem(self, module, name, uses):
        for u in uses:
            if u.input.problem is not None:
                return f"layer {name!r} ({type(module).__name__}): {u.input.problem}"
        for u in uses:
            if u.grad is None:
                continue
            # Checked once per captured gradient: the results of a step are often taken several times.
            if u.input.checked is None or u.input.checked[0] is not u.grad:
                u.input.checked = (u.grad, self._check(module, name, u.input, u.grad))
            if u.input.checked[1] is not None:
                return u.input.checked[1]
        return None

    def _check(self, module, name, call: GenericCall, grad: torch.Tensor) -> Optional[str]:
        """Why the call cannot be measured (None: it can), on its first samples."""
        n = min(call.batch, self.CHECK_SAMPLES)
        try:
            with torch.enable_grad():
                each = self._vjps(module, call[0:n], grad[:n], per_sample=True)
                whole = self._vjps(module, call[0:n], grad[:n], per_sample=False)
        except Exception as e:  # noqa: BLE001  (what torch.func cannot transform, said, not raised)
            return (f"layer {name!r} ({type(module).__name__}): its forward could not be recomputed one sample "
                    f"at a time by torch.func ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        for key, g in each.items():
            total, batch = g.sum(0).double(), whole[key].double()
            eps = torch.finfo(g.dtype).eps if g.is_floating_point() else 0.0
            tol = 16 * eps ** 0.5 * float(g.double().abs().sum(0).norm() + batch.norm())
            if not torch.isfinite(total).all() or float((total - batch).norm()) > tol:
                if not torch.isfinite(batch).all():
                    continue  # non-finite gradients: NaN in the statistics, as elsewhere
                return (f"layer {name!r} ({type(module).__name__}): its per-sample gradients of {key!r} do not "
                        f"add up to the gradient of their batch, so its forward mixes the samples (batch "
                        "statistics, a sum over dim 0, ...) and per-sample gradients are not defined")
        return None

    def grads(self, module, xs, gs):
        names = [n for n, _ in self.params(module)]
        total = None
        for call, grad in zip(xs, gs):
            with torch.enable_grad():
                out = self._vjps(module, call, grad, per_sample=True)
            total = out if total is None else {n: total[n] + out[n] for n in names}
        return [total[n].double() for n in names]


#: The kind of modules measured by torch.func.
GENERIC = GenericKind()


# ------------------------------------------------------------------------------------------------
# Registry

KINDS = (LayerNormKind(), RMSNormKind(), GroupNormKind(), InstanceNormKind(), BatchNormKind(), EmbeddingKind(),
         Conv1dKind(), Conv3dKind(), ConvTranspose1dKind(), ConvTranspose2dKind(), MHAKind())

#: Kinds whose per-sample gradients can be formed outright (tied parameters, histograms) but whose
#: parts come from the ops in per_sample_factors.
_FACTOR_KINDS = (LinearKind(), Conv2dKind())

#: The layer types of :data:`KINDS`.
LAYER_TYPES = tuple(t for t in (nn.Embedding, nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm,
                                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d,
                                nn.BatchNorm2d, nn.BatchNorm3d, nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d,
                                nn.ConvTranspose2d, nn.MultiheadAttention) if t is not None)


_KIND_OF_TYPE: dict = {}  # {(type, with Linear and Conv2d): kind}: a kind depends on the type alone


def _find(module: nn.Module, kinds) -> Optional[LayerKind]:
    key = (type(module), len(kinds))
    if key not in _KIND_OF_TYPE:
        _KIND_OF_TYPE[key] = next((k for k in kinds if k.matches(module)), None)
    return _KIND_OF_TYPE[key]


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind of this module among :data:`KINDS` (None: not one of them)."""
    return _find(module, KINDS)


def any_kind_of(module: nn.Module) -> Optional[LayerKind]:
    """As :func:`kind_of`, Linear and Conv2d included."""
    return _find(module, _FACTOR_KINDS + KINDS)


# ------------------------------------------------------------------------------------------------
# Per-sample gradients formed outright, in tiles of samples


class Materialised:
    """The per-sample gradients of the parameters of one or more modules (``entries``: (kind,
    module, inputs of its uses, output gradients of its uses)), a parameter held by several
    modules taking the sum of their contributions; formed in tiles of samples whose float64
    temporaries stay near :data:`TILE_ELEMS` elements."""

    def __init__(self, entries):
        self.entries = entries
        self.params: list = []
        seen = set()
        per_sample = 0
        for kind, module, xs, gs in entries:
            for _, p in kind.params(module):
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
            per_sample += kind.per_sample_elems(module, xs, gs)
        self.batch = entries[0][2][0].shape[0]
        self.tile = max(1, TILE_ELEMS // max(per_sample, 1))
        self._kept = None

    def tiles(self):
        for a in range(0, self.batch, self.tile):
            yield a, self.grads(a, a + self.tile)

    def grads(self, a: int, b: int) -> List[torch.Tensor]:
        """[b - a, *p.shape] float64 per parameter of :attr:`params`."""
        acc = {}
        for kind, module, xs, gs in self.entries:
            got = kind.grads(module, [x[a:b] for x in xs], [g[a:b] for g in gs])
            for (_, p), g in zip(kind.params(module), got):
                acc[id(p)] = g if id(p) not in acc else acc[id(p)] + g
        return [acc[id(p)] for p in self.params]

    def grad_sum(self) -> torch.Tensor:
        total = None
        for _, g in self.tiles():
            s = _flat(g).sum(0)
            total = s if total is None else total + s
        return total

    def dots(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.cat([_flat(g) @ mean.to(torch.float64) for _, g in self.tiles()])

    def sq_norms(self) -> torch.Tensor:
        return torch.cat([(_flat(g) ** 2).sum(1) for _, g in self.tiles()])

    def parts(self) -> PerSampleParts:
        if self.tile >= self.batch:  # one tile: formed once
            return dense_parts(_flat(self.grads(0, self.batch)))
        sq, total = [], None
        for _, g in self.tiles():
            f = _flat(g)
            sq.append((f * f).sum(1))
            s = f.sum(0)
            total = s if total is None else total + s
        mean = total / self.batch
        return PerSampleParts(torch.cat(sq), self.dots(mean), mean @ mean)

    def hist1d(self, nbins: int, maxval: float, check) -> torch.Tensor:
        # The joint histogram's gradient axis, against a parameter axis of one bin (any tile size,
        # a tile of one sample included, which the per_sample_parts op refuses).
        nbins, maxval = check(nbins, maxval)
        out = None
        for _, g in self.tiles():
            zeros = [t.new_zeros(t.shape[1:]) for t in g]
            c, _ = torch.ops.trainscope.grad_hist2d(g, zeros, nbins, maxval, 1, 1.0)
            out = c[:, 0] if out is None else out + c[:, 0]
        return out

    def hist2d(self, axes) -> Tuple[torch.Tensor, torch.Tensor]:
        counts = nonfinite = None
        ps = [p.detach() for p in self.params]
        for _, g in self.tiles():
            c, n = torch.ops.trainscope.grad_hist2d([t.to(p.dtype) for t, p in zip(g, ps)], ps, *axes)
            counts, nonfinite = (c, n) if counts is None else (counts + c, nonfinite + n)
        return counts, nonfinite


# ------------------------------------------------------------------------------------------------
# A token embedding tied to a Linear output layer, from factors


class TiedEmbeddingLinear:
    """An nn.Embedding and an nn.Linear sharing one weight W [V, D] (a GPT-style token embedding
    and LM head, ``head.weight = emb.weight``), from their factors, never a [B, V, D] tensor.

    Sample i's gradient of W is Eᵢ + Hᵢ: Eᵢ = Σ_t onehot(tok_it) δe_itᵀ from the embedding (its
    output gradient δe [B, T, D]) and Hᵢ = Σ_s δh_isᵀ x_is from the head (input x [B, S, D],
    output gradient δh [B, S, V]). ‖Eᵢ + Hᵢ‖² = ‖Eᵢ‖² + ‖Hᵢ‖² + 2 Eᵢ·Hᵢ with the cross term
    Eᵢ·Hᵢ = Σ_{t,s} δh_is[tok_it] (δe_it · x_is) (a [T, S] product per sample, in tiles of
    samples and of positions), ‖Hᵢ‖² from the Linear op's route (``method``), gᵢ·ḡ gathering ḡ's
    rows for Eᵢ and Σ_s δh_is·(Ḡ x_is) for Hᵢ, Σᵢ gᵢ by an index_add and one GEMM. The head's bias,
    if trainable, is a block of its own (Σ_s δh_is). Every use of either module counts as more
    positions of sample i."""

    def __init__(self, entries, method: str = "auto", head_parts: Optional[PerSampleParts] = None):
        # head_parts: the head's own parts when already taken (on the backward pass, with its
        # weight gradient: PerSampleHooks' fused backward).
        self.given_head_parts = head_parts
        (self.emb_kind, self.emb, exs, egs), (_, self.head, hxs, hgs) = sorted(
            entries, key=lambda e: not isinstance(e[0], EmbeddingKind))
        b = exs[0].shape[0]
        self.batch = b
        self.method = method
        self.tok = _cat_positions([x.reshape(b, -1) for x in exs])                          # [b, T]
        de = _cat_positions([g.reshape(b, -1, g.shape[-1]) for g in egs])                   # [b, T, D]
        if self.emb.padding_idx is not None:
            de = de * (self.tok != self.emb.padding_idx).unsqueeze(-1).to(de.dtype)
        self.de = de
        self.x = _cat_positions([x.reshape(b, -1, x.shape[-1]) for x in hxs])               # [b, S, D]
        self.dh = _cat_positions([g.reshape(b, -1, g.shape[-1]) for g in hgs])              # [b, S, V]
        self.bias = self.head.bias is not None and self.head.bias.requires_grad
        self.vocab, self.dim = self.emb.weight.shape

    @staticmethod
    def applies(entries) -> bool:
        """Two modules, an Embedding and a Linear holding the same trainable weight, nothing else
        shared."""
        if len(entries) != 2:
            return False
        kinds = [e[0] for e in entries]
        emb = [e[1] for e in entries if isinstance(e[0], EmbeddingKind)]
        lin = [e[1] for e in entries if isinstance(e[0], LinearKind)]
        if len(emb) != 1 or len(lin) != 1 or len(kinds) != 2:
            return False
        return lin[0].weight is emb[0].weight and lin[0].weight.requires_grad and (
            lin[0].bias is None or lin[0].bias is not emb[0].weight)

    def _tile(self, per_sample: int) -> int:
        return max(1, TILE_ELEMS // max(per_sample, 1))

    def _tiles(self):
        t, s = self.tok.shape[1], self.x.shape[1]
        step = self._tile(3 * s * self.vocab + 2 * t * self.dim + 2 * s * self.dim)
        for a in range(0, self.batch, step):
            yield slice(a, a + step)

    def _cross(self) -> torch.Tensor:
        """Eᵢ·Hᵢ [b] float64."""
        t, s = self.tok.shape[1], self.x.shape[1]
        out = []
        for sl in self._tiles():
            de, tok = self.de[sl].double(), self.tok[sl]
            x, dh = self.x[sl].double(), self.dh[sl]
            b = tok.shape[0]
            tc = max(1, TILE_ELEMS // max(3 * b * s, 1))  # embedding positions per chunk
            acc = x.new_zeros(b)
            for c in range(0, t, tc):
                a_ts = de[:, c:c + tc] @ x.transpose(1, 2)                                   # [b, tc, S]
                idx = tok[:, None, c:c + tc].expand(b, s, -1)
                d_st = dh.gather(2, idx).double()                                             # [b, S, tc]
                acc = acc + (a_ts * d_st.transpose(1, 2)).sum((1, 2))
            out.append(acc)
        return torch.cat(out)

    def _head_parts(self) -> PerSampleParts:
        """The head's own parts (‖Hᵢ‖² with its bias, Hᵢ·Ḡ_H, ‖Ḡ_H‖²) by the Linear op's route."""
        if self.given_head_parts is not None:
            return self.given_head_parts
        op = torch.ops.trainscope.linear_per_sample_parts.default
        if self.batch == 1:  # the op needs two samples: one goes in twice (only ‖Hᵢ‖² is used then)
            sq, dots, m = op(torch.cat([self.x, self.x]), torch.cat([self.dh, self.dh]), self.bias, self.method)
            return PerSampleParts(sq[:1], dots[:1], m)
        return PerSampleParts(*op(self.x, self.dh, self.bias, self.method))

    def _emb_sq_norms(self) -> torch.Tensor:
        rows, row_sample, _, b = self.emb_kind._rows(self.emb, [self.tok], [self.de])
        return rows.new_zeros(b).index_add_(0, row_sample, (rows * rows).sum(1))

    def sq_norms(self, head_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖Eᵢ + Hᵢ‖² (``head_sq``: ‖Hᵢ‖² when already at hand)."""
        head_sq = self._head_parts().sq_norms if head_sq is None else head_sq
        return self._emb_sq_norms() + head_sq + 2 * self._cross()

    def grad_sum(self) -> torch.Tensor:
        """Σᵢ gᵢ: the head's by one GEMM in the layers' dtype, the embedding's rows added onto it."""
        dh = self.dh.reshape(-1, self.vocab)
        w = (dh.T @ self.x.reshape(-1, self.dim).to(dh.dtype)).double()
        w.index_add_(0, self.tok.reshape(-1), self.de.reshape(-1, self.dim).double())
        bias = [dh.sum(0, dtype=torch.float64)] if self.bias else []
        return torch.cat([w.reshape(-1)] + bias)

    def dots(self, mean: torch.Tensor) -> torch.Tensor:
        """gᵢ·ḡ: Hᵢ·ḡ by the Linear op's projections (the library's GEMM with ḡ), Eᵢ·ḡ gathering
        ḡ's rows."""
        mean = mean.double()
        n_w = self.vocab * self.dim
        w_mean = mean[:n_w].reshape(self.vocab, self.dim)
        head = torch.ops.trainscope.linear_per_sample_projections(self.x, self.dh, w_mean,
                                                                  mean[n_w:] if self.bias else None)
        return head + (self.de.double() * w_mean[self.tok]).sum((1, 2))

    def parts(self) -> PerSampleParts:
        """The head's parts from the Linear op, corrected for the embedding's share of ḡ, Ḡ_E,
        whose nonzero rows are the batch's distinct tokens (held in B·T rows, those past the
        distinct ones zero, so that nothing waits for the device):
        gᵢ·ḡ = Hᵢ·Ḡ_H + Hᵢ·Ḡ_E + Eᵢ·(Ḡ_H + Ḡ_E), ‖ḡ‖² = ‖Ḡ_H‖² + 2 Ḡ_H·Ḡ_E + ‖Ḡ_E‖², with Ḡ_H's U
        rows by a GEMM of the head's factors on those columns and Hᵢ·Ḡ_E = Σ_s δh_is[U]·(Ḡ_E[U] x_is):
        [B·S, B·T] products in place of more [B·S, V] ones. (The empty rows' Ḡ_H is that of token 0,
        but it only ever meets Ḡ_E's zero rows.)"""
        if self.batch < 2:
            mean = self.grad_sum() / self.batch
            return PerSampleParts(self.sq_norms(), self.dots(mean), mean @ mean)
        head = self._head_parts()
        b, d = self.batch, self.dim
        tok = self.tok.reshape(-1)
        inv = _group_ids(tok)                                    # [B·T]: the batch's U tokens, in B·T rows
        toks = torch.zeros_like(tok).scatter_(0, inv, tok)       # the token of each row (rows U.. are empty)
        inv = inv.reshape(self.tok.shape)
        de = self.de.double()
        ge = de.new_zeros(tok.numel(), d).index_add_(0, inv.reshape(-1), de.reshape(-1, d)) / b    # Ḡ_E's rows
        dh_u = self.dh.reshape(-1, self.vocab).index_select(1, toks)                                 # [B·S, B·T]
        gh = (dh_u.T @ self.x.reshape(-1, d).to(dh_u.dtype)).double() / b                            # Ḡ_H's rows
        ge_t = ge.to(dh_u.dtype).T
        h_ge = []
        for sl in self._tiles():
            rows = self.x[sl].reshape(-1, d)
            n = rows.shape[0]
            xg = rows.to(dh_u.dtype) @ ge_t                                                         # [b·S, B·T]
            start = sl.start * self.x.shape[1]
            h_ge.append((xg * dh_u[start:start + n]).sum(1, dtype=torch.float64).view(-1, self.x.shape[1]).sum(1))
        dots = head.dots + torch.cat(h_ge) + (de * (gh + ge)[inv]).sum((1, 2))
        mean_sq = head.mean_sq_norm + 2 * (gh * ge).sum() + (ge * ge).sum()
        return PerSampleParts(self.sq_norms(head.sq_norms), dots, mean_sq)


def together(entries, method: str = "auto", head_parts: Optional[PerSampleParts] = None):
    """The measure of modules sharing parameters: :class:`TiedEmbeddingLinear` for a token
    embedding tied to a Linear (``head_parts``: the Linear's own parts, when already taken), else
    :class:`Materialised` (per-sample gradients in tiles)."""
    if TiedEmbeddingLinear.applies(entries):
        return TiedEmbeddingLinear(entries, method, head_parts)
    return Materialised(entries)
