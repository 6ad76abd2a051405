"""PerSampleHooks on the layer kinds beyond nn.Linear and nn.Conv2d (trainscope.per_sample_layers):
Embedding, LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm (eval), Conv1d, Conv3d,
ConvTranspose1d/2d, MultiheadAttention; parameters shared by two modules (tied weights); and
on_unsupported / coverage. Every statistic against float64 per-sample gradients from torch.func
(vmap of grad over samples, functional_call), within 1e-6 relative, on small models: a GPT-style
decoder with a tied LM head, a ViT-style block, a ResNet-style CNN with GroupNorm and BatchNorm in
eval mode, a 1-D conv net, a Conv3d net; and each layer kind alone (with and without bias/affine,
used twice, mean and sum reductions). Sizes are tiny so that it runs in seconds on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from conftest import requires_cuda
from trainscope.per_sample_factors import PerSampleHooks

RTOL = 1e-6

# torch.func's reference runs attention through SDPA's unbatched fallback.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


# ------------------------------------------------------------------------------------------------
# Reference


def sample_loss(out: torch.Tensor) -> torch.Tensor:
    """Per-sample losses [B] of an output [B, ...] (nonlinear, so per-sample gradients differ)."""
    o = out.flatten(1)
    w = torch.linspace(-1.0, 1.5, o.shape[1], dtype=o.dtype, device=o.device)
    return (torch.sin(o) * w).sum(1) + 0.3 * (o * o).sum(1)


def reference_grads(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients [B, P] (float64) of every trainable parameter, from torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p, xi):
        out = functional_call(model, ({**p, **frozen}, buffers), (xi[None],))
        return sample_loss(out)[0]

    g = vmap(grad(one), in_dims=(None, 0))(params, x)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], dim=1)


def reference_stats(G: torch.Tensor) -> torch.Tensor:
    """The six statistics of SPEC.md §2 from their definitions, float64."""
    B = G.shape[0]
    gbar = G.mean(0)
    sq, dots, m = (G * G).sum(1), G @ gbar, gbar @ gbar
    norm = (sq.sum() / m - B) / (B * (B - 1))
    inner = ((dots - m) ** 2).sum() / (B * (B - 1) * m * m)
    ortho = ((G - (dots / m)[:, None] * gbar) ** 2).sum() / (B * (B - 1) * m)
    trace = ((G - gbar) ** 2).sum() / (B - 1)
    gsq = m - trace / B
    return torch.stack([norm, inner, ortho, trace, gsq, trace / gsq])


def hooked_stats(model, x, reduction="mean", **kw):
    with PerSampleHooks(model, loss_reduction=reduction, **kw) as hooks:
        losses = sample_loss(model(x))
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        stats = hooks.stats().stats
        cov = hooks.coverage
        parts = hooks.parts()
    return stats, cov, parts


def check(model, x, reductions=("mean", "sum"), ref_model=None, **kw):
    """Every statistic within RTOL of the torch.func reference (of ``ref_model`` if given: the
    same function), for both loss reductions; the parts too; and the coverage is complete."""
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    G = reference_grads(model if ref_model is None else ref_model.double(), x)
    ref = reference_stats(G)
    for reduction in reductions:
        model.zero_grad()
        stats, cov, parts = hooked_stats(model, x, reduction, **kw)
        torch.testing.assert_close(stats, ref, rtol=RTOL, atol=0)
        torch.testing.assert_close(parts.sq_norms, (G * G).sum(1), rtol=RTOL, atol=0)
        torch.testing.assert_close(parts.dots, G @ G.mean(0), rtol=RTOL, atol=1e-12 * float(G.abs().max()) ** 2)
        assert cov.skipped == [] and cov.fraction == 1.0, cov
    return G


def gen(seed=0):
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Normalisation layers


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm(affine):
    gen()
    ln = nn.LayerNorm(6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.3, 0.3)
    model = nn.Sequential(nn.Linear(5, 6), ln, nn.Tanh(), nn.Linear(6, 3))
    check(model, torch.randn(5, 4, 5))


def test_layernorm_without_bias_and_over_two_dims():
    gen(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm([3, 6], bias=False), nn.Linear(6, 2))
    check(model, torch.randn(4, 3, 5))


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rmsnorm(eps):
    gen(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6, eps=eps), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    check(model, torch.randn(5, 3, 5))


@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm(affine):
    gen(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4, affine=affine), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 16, 3))
    check(model, torch.randn(4, 2, 4, 4))


@pytest.mark.parametrize("track", [False, True])
def test_instancenorm(track):
    gen(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True, track_running_stats=track),
                          nn.Flatten(), nn.Linear(3 * 16, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.3, 0.3)
    if track:  # running statistics from a few forward passes, then eval mode uses them
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(4, 2, 6, 6))
        model.eval()
    check(model, torch.randn(4, 2, 6, 6))


def _bn_eval(model, shape):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval(affine):
    gen(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=affine), nn.Tanh(), nn.Linear(6, 2))
    check(_bn_eval(model, (8, 4)), torch.randn(5, 4))
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.Flatten(), nn.Linear(3 * 8, 2))
    check(_bn_eval(model, (4, 2, 3, 3, 3)), torch.randn(4, 2, 3, 3, 3))


class NormTwice(nn.Module):
    def __init__(self, norm, channels=4):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm = norm
        self.head = nn.Linear(channels * 5, 2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x)))
        return self.head(self.norm(h * 1.5 + 0.2).flatten(1))


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(2, 4), lambda: nn.BatchNorm1d(4),
                                  lambda: nn.InstanceNorm1d(4, affine=True), lambda: nn.LayerNorm(5),
                                  lambda: nn.RMSNorm([4, 5])])
def test_normalisation_layers_used_twice(norm):
    gen(34)
    model = NormTwice(norm())
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    if isinstance(model.norm, nn.BatchNorm1d):
        model = _bn_eval(model, (6, 4, 5))
    check(model, torch.randn(4, 4, 5))


def test_batchnorm_in_train_mode_is_an_error_or_skipped():
    gen(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with PerSampleHooks(model) as hooks:
        sample_loss(model(x)).mean().backward()
        with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm1d\) normalised with batch statistics"):
            hooks.stats()
    model.zero_grad()
    with PerSampleHooks(model, on_unsupported="skip") as hooks:
        sample_loss(model(x)).mean().backward()
        got = hooks.stats().stats
        cov = hooks.coverage
    assert cov.skipped == ["1.weight", "1.bias"]
    assert "batch statistics" in cov.reasons["1.weight"]
    assert cov.covered == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert cov.fraction == pytest.approx((4 * 6 + 6 + 6 * 2 + 2) / (4 * 6 + 6 + 12 + 6 * 2 + 2))
    # The skipped layer's parameters are left out: the statistics are those of the Linear layers
    # (whose per-sample gradients in train mode are those the captured factors give).
    model.zero_grad()
    with PerSampleHooks(model, layers=["0", "2"]) as hooks:
        sample_loss(model(x)).mean().backward()
        torch.testing.assert_close(got, hooks.stats().stats)


def test_layers_must_see_the_same_samples():
    """A position embedding applied to an unbatched torch.arange(T) (its rows are positions, not
    samples) is a clear error, not a wrong number."""
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(5, 4), nn.Embedding(3, 4)

        def forward(self, idx):
            return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))

    model = Unbatched()
    with PerSampleHooks(model) as hooks:
        sample_loss(model(torch.randint(0, 5, (4, 3)))).mean().backward()
        with pytest.raises(ValueError, match=r"layer 'pos' \(Embedding\) saw 3 samples but layer 'tok'.* saw 4"):
            hooks.stats()


# ------------------------------------------------------------------------------------------------
# Embedding


class TokenModel(nn.Module):
    def __init__(self, vocab=7, dim=5, padding_idx=None, twice=False, **kw):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx, **kw)
        self.lin = nn.Linear(dim, 3)
        self.twice = twice

    def forward(self, tokens):
        h = self.emb(tokens)
        if self.twice:  # the same embedding on a shifted copy of the tokens
            h = h * torch.tanh(self.emb(tokens.roll(1, dims=1)))
        return self.lin(torch.tanh(h))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("twice", [False, True])
def test_embedding(padding_idx, twice):
    gen(7)
    model = TokenModel(padding_idx=padding_idx, twice=twice)
    tokens = torch.randint(0, 7, (5, 6))
    tokens[:, 0] = 0  # repeated tokens within a sample, and padding where padding_idx=0
    tokens[:, 1] = 3
    tokens[:, 2] = 3
    check(model, tokens)


def test_embedding_with_max_norm_and_sparse():
    gen(8)
    model, tokens = TokenModel(max_norm=1.0).double(), torch.randint(0, 7, (4, 5))
    with torch.no_grad():
        model(tokens)  # renormalises the rows in place (torch.func cannot run that under vmap)
    reference = copy.deepcopy(model)
    reference.emb.max_norm = None
    check(model, tokens, ref_model=reference)
    model = TokenModel(sparse=True)
    reference = copy.deepcopy(model)
    reference.emb.sparse = False  # torch.func has no batching rule for sparse gradients
    check(model, torch.randint(0, 7, (4, 5)), ref_model=reference)


def test_embedding_scale_grad_by_freq_is_refused():
    model = TokenModel(scale_grad_by_freq=True)
    with PerSampleHooks(model) as hooks:
        sample_loss(model(torch.randint(0, 7, (4, 5)))).mean().backward()
        with pytest.raises(ValueError, match=r"'emb' \(Embedding\) has scale_grad_by_freq"):
            hooks.stats()


# ------------------------------------------------------------------------------------------------
# Convolutions


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(stride=2, padding=1, dilation=2), dict(padding="same", groups=2),
                                 dict(padding=1, padding_mode="reflect")])
def test_conv1d(bias, cfg):
    gen(9)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, bias=bias, **cfg), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 4, 9)
    model(x)  # materialise the lazy layer
    check(model, x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(stride=2, padding=1, output_padding=1),
                                 dict(stride=2, dilation=2, groups=2)])
def test_conv_transpose1d(bias, cfg):
    gen(10)
    model = nn.Sequential(nn.ConvTranspose1d(4, 6, 3, bias=bias, **cfg), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 4, 5)
    model(x)
    check(model, x)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose2d(bias):
    gen(11)
    model = nn.Sequential(nn.ConvTranspose2d(2, 4, (2, 3), stride=(2, 1), padding=(0, 1), bias=bias,
                                             groups=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 2, 3, 4)
    model(x)
    check(model, x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", [dict(padding=1), dict(stride=(1, 2, 1), dilation=(2, 1, 1), groups=2),
                                 dict(padding=1, padding_mode="circular")])
def test_conv3d(bias, cfg):
    gen(12)
    model = nn.Sequential(nn.Conv3d(2, 4, (3, 2, 2), bias=bias, **cfg), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 2, 5, 4, 4)
    model(x)
    check(model, x)


def test_conv3d_in_tiles_of_samples(monkeypatch):
    """Patches of the batch above the budget: per-sample gradients formed in tiles of samples."""
    import trainscope.per_sample_layers as layers
    gen(31)
    monkeypatch.setattr(layers, "TILE_ELEMS", 3000)
    model = nn.Sequential(nn.Conv3d(2, 4, 2, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 2, 3, 3, 3)
    model(x)
    check(model, x)
    model, x = ConvTwice(nn.Conv3d(3, 3, 3, padding=1)), torch.randn(4, 3, 3, 3, 3)
    model(x)
    check(model, x, reductions=("sum",))


class ConvTwice(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.lin = nn.LazyLinear(2)

    def forward(self, x):
        return self.lin(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("conv", [lambda: nn.Conv1d(3, 3, 3, padding=1), lambda: nn.Conv3d(3, 3, 3, padding=1),
                                  lambda: nn.ConvTranspose1d(3, 3, 3, padding=1)])
def test_convolutions_used_twice(conv):
    gen(13)
    model = ConvTwice(conv())
    x = torch.randn(4, 3, *([4] * (model.conv.weight.dim() - 2)))
    model(x)
    check(model, x)


# ------------------------------------------------------------------------------------------------
# MultiheadAttention


class Attention(nn.Module):
    def __init__(self, dim=8, heads=2, batch_first=True, causal=False, twice=False, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, **kw)
        self.head = nn.Linear(dim, 2)
        self.batch_first, self.causal, self.twice = batch_first, causal, twice

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), 1) if self.causal else None
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.attn(h, h, h, attn_mask=mask, is_causal=self.causal, need_weights=False)[0]
        if self.twice:
            h = self.attn(h, torch.tanh(h), h, attn_mask=mask, is_causal=self.causal)[0]
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention(batch_first, causal):
    gen(14)
    check(Attention(batch_first=batch_first, causal=causal), torch.randn(4, 5, 8))


@pytest.mark.parametrize("cfg", [dict(bias=False), dict(kdim=6, vdim=6), dict(add_bias_kv=True, add_zero_attn=True)])
def test_multihead_attention_variants(cfg):
    gen(15)
    if "kdim" in cfg:
        class KV(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **cfg)
                self.kv = nn.Linear(8, 6)

            def forward(self, x):
                kv = self.kv(x)
                return self.attn(x, kv, torch.tanh(kv))[0]
        check(KV(), torch.randn(4, 5, 8))
    else:
        check(Attention(**cfg), torch.randn(4, 5, 8))


def test_multihead_attention_used_twice_and_with_key_padding_mask():
    gen(16)
    check(Attention(twice=True), torch.randn(4, 5, 8))

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            kpm = x[..., 0] > 0.8  # per sample
            kpm[:, 0] = False
            return self.attn(x, x, x, key_padding_mask=kpm)[0]
    check(Padded(), torch.randn(4, 5, 8))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(bias=False), dict(causal=True), dict(padding=True)])
def test_multihead_attention_factors_from_the_training_graph(batch_first, cfg):
    """Packed self-attention: the attention output out_proj read and the gradient reaching the
    in-projection come from the training pass's graph, equal to the recomputation's; a step whose
    statistics are not due reads nothing."""
    import trainscope.per_sample_layers as layers
    gen(34)
    attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=cfg.get("bias", True)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    kpm = (x[..., 0] > 0.5) & (torch.arange(5) > 0) if cfg.get("padding") else None
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1) if cfg.get("causal") else None
    hooks = PerSampleHooks(attn)
    for due in (False, True):
        hooks.clear()
        hooks.stats_due = due
        h = x if batch_first else x.transpose(0, 1)
        out = attn(h, h, h, key_padding_mask=kpm, attn_mask=mask, is_causal=bool(mask is not None),
                   need_weights=False)[0]
        (out.tanh() ** 2).sum().backward()
        (use,) = hooks._captures[""].uses
        if not due:
            assert use.input.captured_y is None and use.input.captured_dqkv is None
            continue
        captured = layers._captured_factors(attn, use.input)
        assert captured is not None
        recomputed = layers._mha_factors(attn, use.input, use.grad)
        for a, b in zip(captured, recomputed):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    hooks.remove()


@pytest.mark.parametrize("case", ["self", "cross", "separate_weights", "twice", "frozen", "bias_kv"])
def test_multihead_attention_routes(monkeypatch, case):
    """The projections' factors measure the module unless it has bias_k/bias_v or a frozen
    parameter, which go through per-sample vjps; for packed self-attention the factors come from the
    training pass's graph, otherwise from one batched recomputation of the attention. Every route
    agrees with the reference, the histograms and per-element moments included."""
    import trainscope.per_sample_layers as layers
    calls = []
    factors = layers._mha_factors
    monkeypatch.setattr(layers, "_mha_factors", lambda *a: (calls.append(1), factors(*a))[1])
    gen(33)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(kdim=6, vdim=6) if case == "separate_weights" else dict(add_bias_kv=True) if case == "bias_kv" \
                else {}
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)
            self.kv = nn.Linear(8, 6 if case == "separate_weights" else 8)

        def forward(self, x):
            kv = self.kv(x)
            if case in ("self", "frozen", "bias_kv"):
                return self.attn(x, x, x)[0]
            h = self.attn(x, kv, torch.tanh(kv))[0]
            return self.attn(h, h, h)[0] if case == "twice" else h

    model = Net()
    if case == "frozen":
        model.attn.out_proj.bias.requires_grad_(False)
    x = torch.randn(4, 5, 8)
    G = check(model, x)
    assert bool(calls) == (case in ("cross", "separate_weights", "twice"))  # "twice": the cross-attention use
    # The per-sample gradients themselves (histogram and moments) against the reference's.
    with PerSampleHooks(model, loss_reduction="sum") as hooks:
        sample_loss(model(x.double())).sum().backward()
        lo, hi = float(G.min()), float(G.max())
        width = max(abs(lo), abs(hi)) * 1.01
        hist = hooks.grad_hist1d(nbins=7, maxval=width)
        ref = torch.histc(G.reshape(-1), bins=7, min=-width, max=width).long()
        assert torch.equal(hist.cpu(), ref)
        moments = hooks.grad_moments()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got_sq = torch.cat([moments.sum_grad_sq[n].reshape(-1) for n in names])
    # (the key bias's gradient is zero but for rounding: softmax does not see it)
    torch.testing.assert_close(got_sq, (G * G).sum(0), rtol=RTOL, atol=1e-12 * float((G * G).sum(0).max()))


def test_multihead_attention_with_dropout_in_train_mode_is_refused():
    model = Attention(dropout=0.1).double()
    with PerSampleHooks(model) as hooks:
        sample_loss(model(torch.randn(4, 5, 8, dtype=torch.float64))).mean().backward()
        with pytest.raises(ValueError, match=r"'attn' \(MultiheadAttention\) ran in train mode with dropout"):
            hooks.stats()
    model.eval()  # eval mode: no dropout
    check(model, torch.randn(4, 5, 8))


def test_multihead_attention_after_an_optimizer_step_is_refused():
    model = Attention().double()
    with PerSampleHooks(model) as hooks:
        sample_loss(model(torch.randn(4, 5, 8, dtype=torch.float64))).mean().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with pytest.raises(ValueError, match=r"'attn' \(MultiheadAttention\): its parameters changed"):
            hooks.stats()


def test_multihead_attention_in_tiles(monkeypatch):
    """Samples in several tiles give the same numbers as one tile."""
    import trainscope.per_sample_layers as layers
    gen(17)
    model = Attention()
    monkeypatch.setattr(layers, "TILE_ELEMS", 1)
    check(model, torch.randn(5, 4, 8))


# ------------------------------------------------------------------------------------------------
# Tied parameters


class TiedLM(nn.Module):
    def __init__(self, vocab=9, dim=6, head_bias=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


@pytest.mark.parametrize("head_bias", [False, True])
def test_tied_embedding_and_head(head_bias):
    gen(18)
    model = TiedLM(head_bias=head_bias)
    tokens = torch.randint(0, 9, (5, 4))
    tokens[:, 1] = tokens[:, 0]
    check(model, tokens)  # the head's own parts taken on the backward pass, with its weight gradient
    model.zero_grad()
    with PerSampleHooks(model) as hooks:
        assert hooks.layers == ["emb", "mix", "head"]
        sample_loss(model(tokens)).sum().backward()
        assert hooks._captures["head"].uses[0].parts is not None
        assert sorted(hooks.layer_parts()) == ["emb+head", "mix"]
        fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sample_loss(model(tokens)).sum().backward()  # no hooks: autograd's own gradients
    for got, want in zip(fused_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


class TiedTwice(nn.Module):
    """A tied embedding and head, each used twice, padding tokens, the head on 2-D and 3-D input."""

    def __init__(self, vocab=9, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=1)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.emb(tokens) + self.emb(tokens.flip(1)))
        return torch.cat([self.head(h), self.head(h.mean(1))[:, None]], dim=1)


@pytest.mark.parametrize("tile", [None, 40])
def test_tied_embedding_and_head_from_factors(monkeypatch, tile):
    import trainscope.per_sample_layers as layers
    gen(32)
    if tile is not None:  # tiles of one sample, and of positions
        monkeypatch.setattr(layers, "TILE_ELEMS", tile)
    tokens = torch.randint(0, 9, (5, 4))
    tokens[:, 0] = 1
    check(TiedTwice(), tokens)
    model = TiedTwice()
    with PerSampleHooks(model) as hooks:
        sample_loss(model(tokens)).mean().backward()
        units = hooks._units(hooks._ready())
        assert isinstance(hooks._together(units[0][1]), layers.TiedEmbeddingLinear)


def test_two_linear_layers_sharing_a_weight(monkeypatch):
    import trainscope.per_sample_layers as layers
    gen(19)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].weight = model[0].weight
    check(model, torch.randn(5, 3, 4))
    monkeypatch.setattr(layers, "TILE_ELEMS", 1)  # one sample per tile
    check(model, torch.randn(5, 3, 4), reductions=("mean",))


def test_tied_with_an_untracked_module_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) and module '0' \(Linear\) share the parameter "
                                         r"'weight'.*Track both"):
        PerSampleHooks(model, layers=["2"])
    with PerSampleHooks(model, layers=["0", "2"]) as hooks:
        assert hooks.layers == ["0", "2"]


# ------------------------------------------------------------------------------------------------
# on_unsupported and coverage


class Scaled(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


def test_unsupported_layers_error_or_skip():
    gen(20)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), Scaled(5), nn.Linear(5, 2))
    with pytest.raises(TypeError, match=r"layer '1' \(PReLU\), '2' \(Scaled\) are not supported.*on_unsupported"):
        PerSampleHooks(model)
    with pytest.raises(ValueError, match="on_unsupported must be"):
        PerSampleHooks(model, on_unsupported="ignore")
    model = model.double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with PerSampleHooks(model, on_unsupported="skip") as hooks:
        assert hooks.layers == ["0", "3"]
        sample_loss(model(x)).mean().backward()
        got = hooks.stats().stats
        cov = hooks.coverage
    assert cov.covered == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert cov.skipped == ["1.weight", "2.scale"]
    assert cov["fraction"] == pytest.approx(37 / 43)
    assert "PReLU" in cov.reasons["1.weight"]
    # The covered parameters' statistics are exact.
    params = {n: p.detach() for n, p in model.named_parameters()}
    keep = ["0.weight", "0.bias", "3.weight", "3.bias"]
    g = vmap(grad(lambda p, xi: sample_loss(functional_call(model, {**params, **p}, (xi[None],)))[0]),
             in_dims=(None, 0))({k: params[k] for k in keep}, x)
    G = torch.cat([g[k].reshape(5, -1) for k in keep], 1)
    torch.testing.assert_close(got, reference_stats(G), rtol=RTOL, atol=0)


def test_an_unsupported_attention_subclass_is_skipped_with_its_out_proj():
    class MyAttention(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = MyAttention(4, 2, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    model = M()
    with pytest.raises(TypeError, match=r"'attn' \(MyAttention\) is not supported"):
        PerSampleHooks(model)
    with PerSampleHooks(model, on_unsupported="skip") as hooks:
        assert hooks.layers == ["head"]
        assert hooks.coverage.skipped == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                          "attn.out_proj.bias"]


def test_explicit_layers_report_the_rest_as_skipped():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    with PerSampleHooks(model, layers=["0"]) as hooks:
        cov = hooks.coverage
    assert cov.covered == ["0.weight", "0.bias"] and cov.skipped == ["1.weight", "1.bias", "2.weight", "2.bias"]


# ------------------------------------------------------------------------------------------------
# Models


class GPT(nn.Module):
    """A GPT-2-style decoder: token and position embeddings, pre-LayerNorm causal attention and
    MLP blocks, a final LayerNorm and an LM head tied to the token embedding."""

    def __init__(self, vocab=11, block=8, dim=16, heads=2, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(dim), attn=nn.MultiheadAttention(dim, heads, batch_first=True),
                ln2=nn.LayerNorm(dim), mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)))))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device).expand(b, t)  # positions of each sample
        x = self.tok(idx) + self.pos(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device, dtype=x.dtype)
        for blk in self.blocks:
            h = blk["ln1"](x)
            x = x + blk["attn"](h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln_f(x))


@requires_cuda
def test_decoder_statistics_do_not_wait_for_the_device():
    """stats() on a decoder (tied embedding and head, attention, LayerNorm, GELU MLP) only enqueues
    work on the stream: no host synchronisation."""
    gen(40)
    model = GPT().cuda()
    idx = torch.randint(0, 11, (4, 8), device="cuda")
    with PerSampleHooks(model) as hooks:
        for check in (False, True):  # the first: warm-up (allocator, lazy initialisation)
            model.zero_grad()
            sample_loss(model(idx)).mean().backward()
            torch.cuda.synchronize()
            if check:
                torch.cuda.set_sync_debug_mode("error")
            try:
                s = hooks.stats()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(s.stats).all())


def test_gpt():
    gen(21)
    check(GPT(), torch.randint(0, 11, (4, 8)))


class ViTBlock(nn.Module):
    def __init__(self, dim=16, heads=2, patch=4, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)  # sequence first
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)  # [B, patches, dim]
        h = self.ln1(x).transpose(0, 1)
        x = x + self.attn(h, h, h)[0].transpose(0, 1)
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def test_vit_block():
    gen(22)
    check(ViTBlock(), torch.randn(4, 3, 8, 8))


class SequenceFirstLM(nn.Module):
    """torch's sequence-first layout inside (token ids [T, B], nn.TransformerEncoder with its
    default batch_first=False); batch-first outside, for the reference. A classifier on the pooled
    [B, D] features stays batch-first."""

    def __init__(self, dim=16, vocab=11, ctx=8, norm_first=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.lm, self.cls = nn.Linear(dim, vocab), nn.Linear(dim, 3)

    def forward(self, ids):                                   # ids [B, T]
        t = ids.transpose(0, 1)                               # [T, B]
        h = self.tok(t) + self.pos(torch.arange(t.shape[0])[:, None].expand_as(t))
        h = self.enc(h)                                       # [T, B, D]
        return torch.cat([self.lm(h).transpose(0, 1).flatten(1), self.cls(h.mean(0))], 1)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("t", [5, 4])  # T = B = 4: no batch size could tell positions from samples
def test_sequence_first_transformer(norm_first, t):
    gen(24)
    check(SequenceFirstLM(norm_first=norm_first), torch.randint(0, 11, (4, t)), batch_first=False)


def test_transformer_layer_in_the_other_layout_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"'enc\.layers\.0\.linear1' is inside 'enc\.layers\.0' "
                                         r"\(TransformerEncoderLayer, batch_first=False\).*pass batch_first=False"):
        PerSampleHooks(SequenceFirstLM())
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"batch_first=True\).*pass batch_first=True"):
        PerSampleHooks(model, batch_first=False)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        PerSampleHooks(model, batch_first="yes")


def test_sequence_first_inputs_without_batch_first_name_the_option():
    """Layers outside torch's transformer layers cannot be told apart by type: a batch-size
    mismatch between them says which option fixes it."""
    gen(25)

    class SeqMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(7, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, ids):                               # ids [B, T]
            h = torch.tanh(self.fc(self.emb(ids.transpose(0, 1))))   # [T, B, 6]
            return self.head(h.mean(0))

    model, ids = SeqMLP().double(), torch.randint(0, 7, (4, 5))
    with PerSampleHooks(model) as hooks:
        sample_loss(model(ids)).sum().backward()
        with pytest.raises(ValueError, match="pass batch_first=False"):
            hooks.stats()
    check(model, ids, batch_first=False)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.gn(self.stem(x)))
        h = F.relu(self.bn1(self.c1(x)))
        x = F.relu(x + self.bn2(self.c2(h)))
        return self.fc(x.mean((2, 3)))


def test_resnet_style_cnn():
    gen(23)
    model = ResNetish()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    check(_bn_eval(model, (6, 3, 6, 6)), torch.randn(4, 3, 6, 6))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.down = nn.Conv1d(6, 6, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1)
        self.norm = nn.InstanceNorm1d(4, affine=True)
        self.fc = nn.Linear(4 * 8, 2)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.up(torch.tanh(self.down(x))))
        return self.fc(self.norm(x).flatten(1))


def test_conv1d_net():
    gen(24)
    check(Conv1dNet(), torch.randn(5, 3, 8))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1)
        self.c2 = nn.Conv3d(4, 4, 2, stride=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(self.gn(x).mean((2, 3, 4)))


def test_conv3d_net():
    gen(25)
    check(Conv3dNet(), torch.randn(4, 2, 4, 4, 4))


@pytest.mark.parametrize("case", ["tied", "attention", "norms"])
def test_histograms_against_the_reference(case):
    """grad_hist1d and grad_hist2d of per-sample gradients formed outright (new kinds, tied
    parameters) count every (sample, element) as the materialised reference does."""
    from test_per_sample_factors import reference_hist1d, reference_hist2d
    gen(26)
    if case == "tied":
        model, x = TiedLM(head_bias=True), torch.randint(0, 9, (4, 3))
    elif case == "attention":
        model, x = Attention(), torch.randn(4, 5, 8)
    else:
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6),
                              nn.LayerNorm(6), nn.Linear(6, 2))
        x = torch.randn(4, 2, 5)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    G = reference_grads(model, x)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with PerSampleHooks(model) as hooks:
        sample_loss(model(x)).mean().backward()
        h = hooks.grad_hist1d(nbins=30, maxval=0.5)
        counts, nonfinite = hooks.grad_hist2d(20, 0.5, 10, 1.0)
    assert torch.equal(h, reference_hist1d(G, 30, 0.5))
    want_counts, want_nonfinite = reference_hist2d(G, params.expand_as(G), 20, 0.5, 10, 1.0)
    assert torch.equal(counts, want_counts) and int(nonfinite) == want_nonfinite


# ------------------------------------------------------------------------------------------------
# More ways in


def test_multihead_attention_with_a_per_sample_attention_mask():
    gen(27)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            b, t = x.shape[:2]
            # [B·heads, T, T]: each sample (and head) masks its own keys
            mask = (x[..., :1].transpose(1, 2) > 0.9).expand(b, t, t).repeat_interleave(2, 0).clone()
            mask[..., 0] = False
            return self.attn(x, x, x, attn_mask=mask)[0]

    check(Masked(), torch.randn(4, 5, 8))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(norm_first):
    gen(28)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    check(nn.Sequential(layer, nn.Linear(8, 2)), torch.randn(4, 5, 8))


def test_float32_models_against_the_float64_reference():
    """Float32 models (the normalisations' per-sample gradients in float32, as their own backward
    pass) against float64 per-sample gradients of a float64 copy."""
    gen(29)
    rms = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 2)) if hasattr(nn, "RMSNorm") \
        else nn.Sequential(nn.Linear(6, 2))
    for model, x in ((GPT(), torch.randint(0, 11, (4, 8))), (Conv1dNet(), torch.randn(5, 3, 8)),
                     (Conv3dNet(), torch.randn(4, 2, 4, 4, 4)),
                     (_bn_eval(ResNetish(), (6, 3, 6, 6)), torch.randn(4, 3, 6, 6)),
                     (rms, torch.randn(5, 3, 6))):
        x64 = x.double() if x.is_floating_point() else x
        ref = reference_stats(reference_grads(copy.deepcopy(model).double(), x64))
        with PerSampleHooks(model) as hooks:
            sample_loss(model(x)).mean().backward()
            got = hooks.stats().stats
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=0)


def test_layer_functions_take_the_new_kinds():
    """layer_per_sample_parts on a module of the new kinds, from its input and output gradient."""
    from trainscope.per_sample_factors import layer_per_sample_parts
    gen(30)
    ln = nn.LayerNorm(4).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    d = torch.randn(5, 3, 4, dtype=torch.float64)
    xhat = F.layer_norm(x, (4,))
    G = torch.cat([(d * xhat).sum(1), d.sum(1)], 1)
    p = layer_per_sample_parts(ln, x, d)
    torch.testing.assert_close(p.sq_norms, (G * G).sum(1))
    torch.testing.assert_close(p.dots, G @ G.mean(0))
    # Two uses: their positions add per sample.
    p2 = layer_per_sample_parts(ln, [x, x], [d, d])
    torch.testing.assert_close(p2.sq_norms, 4 * (G * G).sum(1))
    bn = nn.BatchNorm1d(4).double()
    with pytest.raises(ValueError, match="batch statistics"):
        layer_per_sample_parts(bn, torch.randn(5, 4), torch.randn(5, 4))
    with pytest.raises(TypeError, match="MultiheadAttention.*PerSampleHooks"):
        layer_per_sample_parts(nn.MultiheadAttention(4, 2), x, d)


def test_refused_inputs_name_the_layer():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with PerSampleHooks(bn) as hooks:
        sample_loss(bn(torch.randn(4, 3))).mean().backward()
        with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) normalised with batch statistics"):
            hooks.stats()
    inorm = nn.Sequential(nn.Linear(3, 4), nn.InstanceNorm1d(4, affine=True))
    with PerSampleHooks(inorm) as hooks:
        sample_loss(inorm(torch.randn(4, 3))[None]).mean().backward()  # [C=4, L=3]: unbatched
        with pytest.raises(ValueError, match=r"'1' \(InstanceNorm1d\) ran on an unbatched input"):
            hooks.stats()
    attn = nn.MultiheadAttention(4, 2)
    with PerSampleHooks(attn) as hooks:
        x = torch.randn(3, 4)  # [L, E]: unbatched, a 3-D mask [heads, L, S]
        sample_loss(attn(x, x, x, attn_mask=torch.zeros(2, 3, 3))[0][None]).mean().backward()
        with pytest.raises(ValueError, match=r"\(MultiheadAttention\) ran on an unbatched input"):
            hooks.stats()
    mha = Attention()
    with pytest.raises(ValueError, match=r"'attn.out_proj' is read by its parent 'attn'"):
        PerSampleHooks(mha, layers=["attn.out_proj"])


def test_tied_with_an_unsupported_module_under_skip():
    class Odd(nn.Module):  # an unsupported module reading the embedding's weight
        def __init__(self, emb):
            super().__init__()
            self.weight = emb.weight

        def forward(self, h):
            return h @ self.weight.T

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(5, 3), nn.Linear(3, 3)
            self.odd = Odd(self.emb)

        def forward(self, t):
            return self.odd(torch.tanh(self.lin(self.emb(t))))

    model = M()
    with pytest.raises(TypeError, match=r"'odd' \(Odd\) is not supported"):
        PerSampleHooks(model)
    with PerSampleHooks(model, on_unsupported="skip") as hooks:
        assert hooks.layers == ["lin"]
        cov = hooks.coverage
    assert cov.covered == ["lin.weight", "lin.bias"] and cov.skipped == ["emb.weight"]
    assert "Odd" in cov.reasons["emb.weight"]


@pytest.mark.parametrize("conv", [lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
                                  lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, dilation=2, groups=2),
                                  lambda: nn.ConvTranspose2d(4, 2, (2, 3), stride=(2, 1), groups=2),
                                  lambda: nn.Conv3d(4, 2, 2, padding=1, groups=2)])
def test_every_route_of_a_convolution_agrees(conv):
    """The parts from the ops, from per-sample gradients formed in tiles (ties, histograms) and
    from the distributed path's Σᵢ gᵢ and gᵢ·ḡ agree, with groups."""
    from trainscope.per_sample_layers import Materialised, kind_of
    gen(33)
    layer = conv().double()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(5, 4, *([5] * (layer.weight.dim() - 2)), dtype=torch.float64)
    model(x)
    G = reference_grads(model, x)[:, :sum(p.numel() for p in layer.parameters())]
    with PerSampleHooks(model, loss_reduction="sum") as hooks:
        sample_loss(model(x)).sum().backward()
        (_, module, xs, gs), _ = hooks._ready()
    kind = kind_of(module)
    mean = G.mean(0)
    for parts in (kind.parts(module, xs, gs), Materialised([(kind, module, xs, gs)]).parts()):
        torch.testing.assert_close(parts.sq_norms, (G * G).sum(1), rtol=RTOL, atol=0)
        torch.testing.assert_close(parts.dots, G @ mean, rtol=RTOL, atol=0)
    torch.testing.assert_close(kind.grad_sum(module, xs, gs), G.sum(0), rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(kind.dots(module, xs, gs, mean), G @ mean, rtol=RTOL, atol=0)


# ------------------------------------------------------------------------------------------------
# Other modules by torch.func (on_unsupported="vmap")


class Conv1D(nn.Module):
    """A GPT-2-style "Conv1D" (a linear layer with its weight stored [in, out], by addmm)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(x.shape[:-1] + (self.nf,))


class UpcastRMSNorm(nn.Module):
    """An RMS norm computed in float32 whatever the input dtype, scale applied after."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32) if x.dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GPT2StyleBlock(nn.Module):
    def __init__(self, dim=8, vocab=11):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.norm = UpcastRMSNorm(dim)
        self.c_fc, self.c_proj = Conv1D(2 * dim, dim), Conv1D(dim, 2 * dim)
        self.act = nn.PReLU(2 * dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.wte(ids)
        h = h + self.c_proj(self.act(self.c_fc(self.norm(h)).transpose(1, 2)).transpose(1, 2))
        return self.head(h)


def test_vmap_measures_other_modules():
    gen(26)
    check(GPT2StyleBlock(), torch.randint(0, 11, (4, 5)), on_unsupported="vmap")


def test_vmap_measures_a_module_with_two_batched_arguments_and_a_constant_one():
    gen(27)

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.randn(6))

        def forward(self, x, y, scale):
            return torch.tanh(self.g * x) * y * scale

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bil, self.gate = nn.Linear(6, 6), nn.Bilinear(6, 6, 6), Gate()

        def forward(self, x):
            h = self.fc(x)
            return self.gate(self.bil(h, x), h, torch.full((6,), 0.5, dtype=x.dtype))

    check(Model(), torch.randn(4, 6), on_unsupported="vmap")


class _Mixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.g * (x - x.mean(0))  # a batch statistic: the samples interact


class _Random(_Mixing):
    def forward(self, x):
        return F.dropout(self.g * x, 0.5, training=True)


class _TwoOutputs(_Mixing):
    def forward(self, x):
        return self.g * x, 2 * self.g * x


@pytest.mark.parametrize("module, match", [
    (_Mixing(), r"layer 'm' \(_Mixing\): its per-sample gradients of 'g' do not add up to the gradient of their batch"),
    (_Random(), r"layer 'm' \(_Random\): its forward could not be recomputed one sample at a time by torch.func"),
    (_TwoOutputs(), r"layer 'm' \(_TwoOutputs\): its output is not one tensor carrying the gradient"),
])
def test_vmap_refuses_what_it_cannot_measure(module, match):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.m = nn.Linear(6, 6), module

        def forward(self, x):
            out = self.m(self.fc(x))
            return out[0] + out[1] if isinstance(out, tuple) else out

    model = Model().double()
    with PerSampleHooks(model, on_unsupported="vmap") as hooks:
        sample_loss(model(torch.randn(5, 6, dtype=torch.float64))).mean().backward()
        with pytest.raises(ValueError, match=match):
            hooks.stats()
    with pytest.raises(TypeError, match="on_unsupported='vmap'"):
        PerSampleHooks(model)


def test_vmap_in_float32_and_after_an_optimizer_step():
    """The modules measured by torch.func in a float32 model against float64 per-sample gradients;
    measured after optimizer.step() (the Monitor's loop), from the parameters of the forward pass."""
    gen(28)
    model = GPT2StyleBlock()
    ids = torch.randint(0, 11, (4, 5))
    ref = reference_stats(reference_grads(copy.deepcopy(model).double(), ids))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with PerSampleHooks(model, on_unsupported="vmap") as hooks:
        sample_loss(model(ids)).mean().backward()
        opt.step()
        got = hooks.stats().stats
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=0)
