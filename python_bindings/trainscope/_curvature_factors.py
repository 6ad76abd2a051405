"""The exact Hessian diagonal of a piecewise-linear network from layer factors (SPEC.md §6,
``method="piecewise_linear"`` of :mod:`trainscope.curvature`).

With f the network's output and ℓᵢ(fᵢ) the per-sample losses, L = (1/B) Σᵢ ℓᵢ has the Hessian

    ∇²L = (1/B) Σᵢ Jᵢᵀ Hᵢ Jᵢ  +  (1/B) Σᵢ Σ_k (∂ℓᵢ/∂f_ik) ∇²f_ik,

Jᵢ = ∂fᵢ/∂θ, Hᵢ = ∂²ℓᵢ/∂fᵢ². When f is linear in each single parameter element (every operation
between the parameters and f is linear or piecewise linear in each of its inputs: linear and
convolutional layers, ReLU, max-pool, dropout, sums; no parameter used twice and no product of
two quantities that depend on one parameter), the diagonal of every ∇²f_ik is zero almost
everywhere, so the Hessian's diagonal is that of the first term, the generalised Gauss-Newton
matrix. With Hᵢ = Σ_c λ_ic q_ic q_icᵀ (eigendecomposition, K = dim fᵢ columns):

    h_j = (1/B) Σ_c Σᵢ λ_ic (Jᵢᵀ q_ic)_j²,

for each column c one backward pass of the vectors √|λ_ic| q_ic from f to the layers' outputs,
whose per-element sums of squared per-sample gradients the layer factors give
(``layer_per_sample_grad_moments``: no per-sample gradient of an nn.Linear is formed). The
per-sample gradients of the losses, for TIC's S_j = Σᵢ gᵢⱼ², come from one more column, B·∂L/∂f.
This is what BackPACK's DiagHessian computes for such networks, for any loss whose per-sample
Hessian autograd can form (K backward passes through the loss only).

The graph between the parameters and f is checked before any of this: an operation not known to
be piecewise linear (tanh, GELU, softmax, a normalisation, ...) or a parameter used twice is a
ValueError naming it, never a Gauss-Newton number passed off as the Hessian's.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# Autograd nodes linear in each input, or piecewise linear (their second derivative is zero
# almost everywhere). Sums of inputs that depend on one parameter stay linear in it (a residual
# connection); products are bilinear, allowed when their factors depend on disjoint sets of
# parameters (_PRODUCTS names the inputs multiplied).
_PIECEWISE_LINEAR_NODES = frozenset({
    # layers
    "AddmmBackward0", "MmBackward0", "BmmBackward0", "MvBackward0", "ConvolutionBackward0",
    "EmbeddingBackward0", "MulBackward0",
    # activations and pooling
    "ReluBackward0", "LeakyReluBackward0", "LeakyReluBackward1", "ThresholdBackward0", "ThresholdBackward1",
    "HardtanhBackward0", "HardtanhBackward1", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0",
    "AbsBackward0", "MaximumBackward0", "MinimumBackward0", "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
    "AvgPool2DBackward0", "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
    "NativeDropoutBackward0",
    # sums, scalings and reshapes
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
    "MulBackward1", "DivBackward1", "NegBackward0", "SumBackward0", "SumBackward1", "MeanBackward0",
    "MeanBackward1", "CloneBackward0", "ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "AsStridedBackward0", "ExpandBackward0", "TBackward0", "PermuteBackward0",
    "TransposeBackward0", "TransposeBackward1", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "UnsqueezeBackward0", "CatBackward0", "StackBackward0", "SliceBackward0", "SelectBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "IndexBackward0", "IndexSelectBackward0",
    "ConstantPadNdBackward0", "FlipBackward0", "RepeatBackward0", "AliasBackward0",
})


# Node -> positions in next_functions of the inputs it multiplies together.
_PRODUCTS = {"MulBackward0": (0, 1), "MmBackward0": (0, 1), "BmmBackward0": (0, 1), "MvBackward0": (0, 1),
             "AddmmBackward0": (1, 2), "ConvolutionBackward0": (0, 1)}


def _node_name(node) -> str:
    return type(node).__name__


def _op_name(node_name: str) -> str:
    """The operation of an autograd node, for messages ("Tanh" of "TanhBackward0")."""
    return node_name[:-9] if node_name.endswith("Backward0") else node_name


def _param_of(node) -> Optional[torch.Tensor]:
    return getattr(node, "variable", None) if _node_name(node) == "AccumulateGrad" else None


def check_piecewise_linear(output: torch.Tensor, loss: torch.Tensor, names: Dict[int, str], caller: str) -> None:
    """ValueError unless ``output`` is linear in each single parameter element (see the module
    docstring) and ``loss`` reaches the parameters only through ``output``. ``names``: id of each
    parameter -> its name, for messages."""
    if output.grad_fn is None:
        raise ValueError(f"{caller}: the model's output does not depend on the parameters")
    # The loss's own nodes, down to the output's: no parameter may hide there.
    stack, seen = [loss.grad_fn], {output.grad_fn}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        p = _param_of(node)
        if p is not None:
            raise ValueError(f"{caller}: the loss uses the parameter {names.get(id(p), tuple(p.shape))!r} other than "
                             "through the model's output (a penalty term?); method='piecewise_linear' needs "
                             "the loss to be a function of the output alone")
        stack.extend(nf for nf, _ in node.next_functions)

    # Parameters below each node (memoised, iterative post-order) and the consumers of each one.
    below: Dict[object, frozenset] = {}
    consumers: Dict[int, int] = {}
    order, stack, visited = [], [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        order.append(node)
        for nf, _ in node.next_functions:
            if nf is not None:
                p = _param_of(nf)
                if p is not None:
                    consumers[id(p)] = consumers.get(id(p), 0) + 1
                if nf not in visited:
                    stack.append(nf)
    for node in reversed(order):  # children before parents: every node is reached from the output
        p = _param_of(node)
        if p is not None:
            below[node] = frozenset((id(p),))
            continue
        name = _node_name(node)
        if name not in _PIECEWISE_LINEAR_NODES:
            raise ValueError(f"{caller}: the model's graph has {_op_name(name)}, "
                             "which is not known to be piecewise linear; the Hessian's diagonal then differs from the "
                             "Gauss-Newton one and method='piecewise_linear' would be wrong: use "
                             "method='hutchinson' (or 'auto')")
        inputs = node.next_functions
        sets = [below.get(nf, frozenset()) for nf, _ in inputs if nf is not None]
        union = frozenset().union(*sets) if sets else frozenset()
        factors = [below.get(inputs[i][0], frozenset()) for i in _PRODUCTS.get(name, ())
                   if i < len(inputs) and inputs[i][0] is not None]
        if len(factors) == 2 and factors[0] & factors[1]:
            raise ValueError(f"{caller}: {_op_name(name)} multiplies two "
                             "quantities that depend on the same parameter, so the output is not linear in it; "
                             "use method='hutchinson' (or 'auto')")
        below[node] = union
    for pid, n in consumers.items():
        if n > 1:
            raise ValueError(f"{caller}: the parameter {names.get(pid, '?')!r} is used {n} times in one forward pass; "
                             "method='piecewise_linear' sums squared per-sample gradients layer by layer and needs "
                             "each parameter used once: use method='hutchinson' (or 'auto')")


class _Capture:
    """Forward hooks for the length of one closure call: the model's output, and for each layer
    owning a parameter of interest its input (with its version, to notice in-place changes) and
    its output, for which the rest of the network gets a copy: the gradient reaching the layer's
    output can then be asked of autograd even when a later in-place operation
    (nn.ReLU(inplace=True)) rewrites the tensor the layer returned. The model's hook is
    registered last: when the model is itself one of the layers it sees the copy."""

    def __init__(self, model: nn.Module, layers: Dict[nn.Module, str]):
        self.output = None
        self.uses: Dict[nn.Module, list] = {m: [] for m in layers}
        self._handles = [m.register_forward_hook(self._layer) for m in layers]
        self._handles.append(model.register_forward_hook(self._root))

    def _root(self, module, inputs, output):
        self.output = output

    def _layer(self, module, inputs, output):
        if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
            self.uses[module].append(None)  # ran, but not as one tensor in and one out: refused by check()
            return None
        x = inputs[0].detach()
        self.uses[module].append((x, x._version, output))
        return output.clone()  # what follows (in place or not) gets the copy

    def remove(self):
        for h in self._handles:
            h.remove()


def layers_of(model: nn.Module, params: List[torch.Tensor], caller: str) -> Dict[nn.Module, str]:
    """{layer: name} of the layers owning the parameters; a parameter outside every layer whose
    per-sample moments the factors give is a ValueError naming it."""
    from .per_sample_factors import _supported

    owner: Dict[int, Tuple[nn.Module, str, str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (m, mname, f"{mname}.{pname}" if mname else pname))
    layers: Dict[nn.Module, str] = {}
    for i, p in enumerate(params):
        if id(p) not in owner:
            raise ValueError(f"{caller}: params[{i}] is not a parameter of the model")
        m, mname, name = owner[id(p)]
        if not _supported(m):
            raise ValueError(f"{caller}: {name!r} belongs to a {type(m).__name__}, whose per-sample gradients the "
                             "layer factors do not give; method='piecewise_linear' covers nn.Linear, nn.Conv1d/2d/3d, "
                             "nn.ConvTranspose1d/2d and nn.Embedding: use method='hutchinson' (or 'auto')")
        layers[m] = mname or type(m).__name__
    return layers


class Forward:
    """One call of the closure, captured: the loss L (graph alive), the per-sample losses or
    None, the model's output and each layer's (input, input version, output) per run."""

    def __init__(self, closure, model: nn.Module, layers: Dict[nn.Module, str], caller: str):
        from .curvature import _resolve_loss

        capture = _Capture(model, layers)
        try:
            self.loss, self.per_sample = _resolve_loss(closure, caller)
        finally:
            capture.remove()
        self.model, self.layers, self.output, self.uses, self.caller = model, layers, capture.output, capture.uses, caller

    def check(self) -> None:
        """ValueError unless the Hessian's diagonal is the Gauss-Newton one here (see the module
        docstring): one output tensor, each layer run once, a piecewise-linear graph."""
        caller = self.caller
        if not isinstance(self.output, torch.Tensor):
            raise ValueError(f"{caller}: method='piecewise_linear' needs the closure to call the model once, "
                             f"returning one tensor (its output); got {type(self.output).__name__}")
        check_piecewise_linear(self.output, self.loss, {id(p): n for n, p in self.model.named_parameters()}, caller)
        for m, uses in self.uses.items():  # a layer that did not run adds no curvature
            if None in uses:
                raise ValueError(f"{caller}: the layer {self.layers[m]!r} did not take one input tensor and return "
                                 "one; method='piecewise_linear' needs both")
            if len(uses) > 1:
                raise ValueError(f"{caller}: the layer {self.layers[m]!r} ran {len(uses)} times in the closure; "
                                 "method='piecewise_linear' needs each layer used once")


def _loss_hessian_factor(loss: torch.Tensor, out: torch.Tensor, chunk: int):
    """(factor columns [K, B, K], their signs [K, B], finite flag) with
    Hᵢ/B = Σ_c σ_ic v_ic v_icᵀ, from the eigendecomposition of each sample's output Hessian of L
    (K backward passes through the loss alone), decomposed in float64. Eigenvalues within the
    rounding of forming Hᵢ in the output's dtype of zero (|λ| ≤ K·ε·max|λ|) count as zero (the
    cross-entropy's Hessian has one exact zero, which rounding makes ±1e-9 in float32, and a
    negative one costs a second pass); non-finite Hessians, and a decomposition that does not
    converge, are zeroed and flagged."""
    from .curvature import _batched_grad, _grad

    b = out.shape[0]
    k = out[0].numel()
    (gf,) = _grad(loss, [out], create_graph=True, retain_graph=True)
    gf = gf.reshape(b, k)
    if gf.requires_grad:
        onehot = torch.eye(k, dtype=gf.dtype, device=gf.device)[:, None, :].expand(k, b, k)
        rows = []
        for a in range(0, k, chunk):
            (h,) = _batched_grad([gf], [out], [onehot[a:a + chunk]])
            rows.append(h.reshape(-1, b, k))
        hess = torch.cat(rows).permute(1, 0, 2).double()  # [B, K, K]
    else:  # the loss is linear in the output
        hess = torch.zeros((b, k, k), dtype=torch.float64, device=out.device)
    hess = 0.5 * (hess + hess.transpose(1, 2))
    finite = torch.isfinite(hess).all() & torch.isfinite(gf).all()
    hess = torch.where(finite, hess, torch.zeros_like(hess))
    try:
        evals, evecs = torch.linalg.eigh(hess)  # [B, K], [B, K, K] (eigenvectors in columns)
    except torch.linalg.LinAlgError:  # the solver did not converge: NaN, never an error
        evals, evecs = torch.zeros_like(hess[:, 0]), torch.zeros_like(hess)
        finite = torch.zeros_like(finite)
    tol = k * torch.finfo(gf.dtype).eps * evals.abs().amax(1, keepdim=True)  # the rounding of forming Hᵢ
    evals = torch.where(evals.abs() <= tol, torch.zeros_like(evals), evals)
    cols = (evecs * evals.abs().sqrt()[:, None, :]).permute(2, 0, 1)  # [K(c), B, K]
    return cols, evals.sign().transpose(0, 1), finite


# Elements of output gradients rearranged at once (rows stacked as channels): a tile that stays in
# cache, not a copy of the whole [n, B, ...] batch.
_REARRANGE_TILE_ELEMS = 1 << 20


def _sum_of_squares(m: nn.Module, x: torch.Tensor, d: torch.Tensor) -> Dict[torch.Tensor, torch.Tensor]:
    """{parameter: Σ_r Σᵢ G_riⱼ²} (float64) over the per-sample gradients G_ri of layer m for
    input x [B, ...] and the output gradients of n rows d [n, B, ...]. An nn.Linear or nn.Conv2d
    takes the rows as more output channels of one layer (its per-sample gradient is then the n
    rows' stacked, each sample's input unfolded once); other layers as n·B samples."""
    from .per_sample_factors import _conv_inputs, _pair, _supported_by_ops, _tracks_bias, \
        layer_per_sample_grad_moments

    n, b = d.shape[0], d.shape[1]
    if _supported_by_ops(m) and isinstance(m, nn.Linear) and x.dim() == 2:
        # One position per sample: Σ_r Σᵢ δ_ri,a² x_ib² = Σᵢ (Σ_r δ_ri,a²) x_ib², one GEMM.
        d2 = d.double().square().sum(0)                                                  # [B, d_out]
        sq = {m.weight: d2.T @ x.double().square()} if m.weight.requires_grad else {}
        if _tracks_bias(m):
            sq[m.bias] = d2.sum(0)
        return sq
    if _supported_by_ops(m) and isinstance(m, nn.Linear):
        dout = d.shape[-1]
        dd = d.movedim(0, -2).reshape(tuple(d.shape[1:-1]) + (n * dout,))  # [B, ..., n·d_out]
        _, wq, _, bq = torch.ops.trainscope.linear_per_sample_grad_moments(x, dd, _tracks_bias(m))
        sq = {m.weight: wq.view(n, dout, -1).sum(0).view(m.weight.shape)} if m.weight.requires_grad else {}
        if _tracks_bias(m):
            sq[m.bias] = bq.view(n, dout).sum(0)
        return sq
    if _supported_by_ops(m) and isinstance(m, nn.Conv2d):
        g, cout = m.groups, d.shape[2]
        xp, padding = _conv_inputs(m, x)
        geometry = (_pair("kernel_size", m.kernel_size), _pair("stride", m.stride), _pair("padding", padding),
                    _pair("dilation", m.dilation), int(g), _tracks_bias(m))
        # Output channels group-major, as a grouped convolution lays them out: [G, n, C_out / G].
        # Rearranged a tile of samples at a time, so that no copy of all n·B output gradients is made.
        tile = max(1, _REARRANGE_TILE_ELEMS // max(1, d[:, 0].numel()))
        parts = []
        for i in range(0, b, tile):
            dt = d[:, i:i + tile]
            dd = dt.reshape((n, dt.shape[1], g, cout // g) + tuple(d.shape[3:])).permute(1, 2, 0, 3, 4, 5)
            dd = dd.reshape((dt.shape[1], n * cout) + tuple(d.shape[3:]))
            parts.append(torch.ops.trainscope.conv2d_per_sample_grad_moments(xp[i:i + tile], dd, *geometry))
        wq, bq = sum(q[1] for q in parts), sum(q[3] for q in parts)
        sq = {m.weight: wq.view((g, n, cout // g) + tuple(m.weight.shape[1:])).sum(1).view(m.weight.shape)} \
            if m.weight.requires_grad else {}
        if _tracks_bias(m):
            sq[m.bias] = bq.view(g, n, cout // g).sum(1).reshape(cout)
        return sq
    xr = x.expand((n,) + tuple(x.shape)).reshape((n * b,) + tuple(x.shape[1:]))
    dr = d.reshape((n * b,) + tuple(d.shape[2:]))
    return {p: q for p, (_, q) in layer_per_sample_grad_moments(m, xr, dr).items()}


def diag_and_sum_grad_sq(fwd: Forward, params: List[torch.Tensor], *, want_diag: bool, want_sum_grad_sq: bool,
                         chunk: int) -> Tuple[Optional[list], Optional[list]]:
    """(h, S), one float64 tensor per parameter each (None when not wanted; S needs per-sample
    losses), for a checked Forward. h is NaN on a non-finite loss Hessian. One read of the device
    (which factor columns are zero in every sample, and whether any output Hessian has a negative
    eigenvalue, which costs a second pass)."""
    from .curvature import _batched_grad

    out, caller = fwd.output, fwd.caller
    b = out.shape[0]
    mods = [m for m, uses in fwd.uses.items() if uses]
    for m in mods:
        x, version, _ = fwd.uses[m][0]
        if x._version != version:
            raise RuntimeError(f"{caller}: the input of {fwd.layers[m]!r} was modified in place after the layer "
                               "read it; method='piecewise_linear' needs it as the layer saw it")
    xs = [fwd.uses[m][0][0] for m in mods]
    zs = [fwd.uses[m][0][2] for m in mods]
    dev = params[0].device
    index = {id(p): i for i, p in enumerate(params)}
    zeros = lambda: [torch.zeros(p.shape, dtype=torch.float64, device=dev) for p in params]  # noqa: E731
    diag = zeros() if want_diag else None
    sq = zeros() if want_sum_grad_sq and fwd.per_sample is not None else None

    def add_squares(vectors: torch.Tensor, into: list, weight: float):
        """Backpropagates the rows of vectors [n, B, K] from the output to the layers and adds
        the per-element sums of squared per-sample gradients over samples and rows."""
        n = vectors.shape[0]
        go = vectors.to(out.dtype).reshape((n,) + tuple(out.shape))
        deltas = _batched_grad([out], zs, [go])  # [n, B, ...] per layer
        for m, x, d in zip(mods, xs, deltas):
            for p, q in _sum_of_squares(m, x, d).items():
                i = index.get(id(p))
                if i is not None:
                    into[i].add_(q, alpha=weight)

    if diag is not None:
        cols, signs, finite = _loss_hessian_factor(fwd.loss, out, chunk)
        # The columns with a positive, and those with a negative, part in any sample. A column zero
        # in every sample (the cross-entropy's null direction) is not propagated; a negative part
        # (an output Hessian that is not positive semidefinite) is, in a pass of its own.
        positive, negative = torch.stack([(signs > 0).any(1), (signs < 0).any(1)]).tolist()
        for weight, live, part in ((1.0, positive, signs > 0), (-1.0, negative, signs < 0)):
            used = [c for c, any_part in enumerate(live) if any_part]
            for a in range(0, len(used), chunk):
                rows = used[a:a + chunk]
                add_squares(cols[rows] * part[rows, :, None], diag, weight)
        diag = [torch.where(finite, x, torch.full_like(x, math.nan)) for x in diag]
    if sq is not None:
        (gf,) = torch.autograd.grad(fwd.loss, [out], retain_graph=True)
        add_squares((gf.double() * b).reshape(1, b, -1), sq, 1.0)  # ∂ℓᵢ/∂fᵢ = B·∂L/∂fᵢ
    return diag, sq
