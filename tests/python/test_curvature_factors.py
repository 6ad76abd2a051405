"""The exact Hessian diagonal of piecewise-linear networks from layer factors
(curvature method="piecewise_linear" / "auto", SPEC.md §6): against the full float64 Hessian,
torch.func per-sample gradients and Cockpit/BackPACK (skipped without them); what it refuses."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainscope import curvature as C
from test_curvature import default_dtype, flat, param_hessian, per_sample_sum_grad_sq, rel, trainable

B = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def init(model: nn.Module, gen) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 3
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
    return model.double()


def make(kind: str, gen):
    """(model, x) of piecewise-linear kinds, float64."""
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 6), nn.LeakyReLU(0.1),
                              nn.Linear(6, 3))
        x = torch.randn(B, 5, generator=gen, dtype=torch.float64)
    elif kind == "cnn":  # 3c3d-like: conv, ReLU, max-pool, flatten, linear
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2, padding=1),
                              nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3))
        x = torch.randn(B, 2, 7, 7, generator=gen, dtype=torch.float64)
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 3))
        x = torch.randn(B, 2, 9, generator=gen, dtype=torch.float64)
    elif kind == "sequence":  # nn.Linear on [B, T, d]: several positions per sample
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.Flatten(), nn.Linear(6, 3))
        x = torch.randn(B, 3, 4, generator=gen, dtype=torch.float64)
    elif kind == "embedding":  # token embedding, flattened, linear head
        model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.ReLU(), nn.Linear(4 * 3, 3))
        x = torch.randint(0, 7, (B, 4), generator=gen)
    elif kind == "residual":  # x₁ + ReLU(W₂x₁): both terms depend on W₁, linearly
        model = Residual()
        x = torch.randn(B, 5, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return init(model, gen), x


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(h + torch.relu(self.b(h)))


LOSSES = {
    "ce": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "mse": lambda out, y: F.mse_loss(out, y, reduction="none").mean(1),
    # Not convex in the output: output Hessians with negative eigenvalues.
    "nonconvex": lambda out, y: (torch.cos(out) * y).sum(1),
}


def target(loss: str, gen):
    if loss == "ce":
        return torch.randint(0, 3, (B,), generator=gen)
    return torch.randn(B, 3, generator=gen, dtype=torch.float64)


def reference_hessian(model, x, lossf, y) -> torch.Tensor:
    """∇²L in the flattened parameters, float64 (x as given: indices stay integers)."""
    return param_hessian(model, x, lambda out: lossf(out, y).mean())


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("kind", ["mlp", "cnn", "conv1d", "sequence", "residual", "embedding"])
def test_equals_the_full_hessians_diagonal(kind, loss, gen):
    model, x = make(kind, gen)
    y = target(loss, gen)
    lossf = LOSSES[loss]
    params = trainable(model)
    H = reference_hessian(model, x, lossf, y)
    d = C.hess_diag(lambda: lossf(model(x), y), params, method="piecewise_linear", model=model)
    assert d.stderr is None and [t.shape for t in d.diag] == [p.shape for p in params]
    assert all(t.dtype == torch.float64 for t in d.diag)
    scale = max(1.0, float(H.diagonal().abs().max()))
    assert (flat(d.diag) - H.diagonal()).abs().max() <= 1e-10 * scale
    tr = C.hess_trace(lambda: lossf(model(x), y), params, method="piecewise_linear", model=model)
    assert rel(tr.trace, H.diagonal().sum()) < 1e-10 and float(tr.stderr) == 0.0
    # The Hessian is not the Gauss-Newton matrix: only its diagonal is.
    assert float(torch.linalg.eigvalsh(H)[0]) < -1e-8 or loss == "nonconvex"


@pytest.mark.parametrize("tile_elems", [1, 600, 1 << 20])
def test_grouped_convolutions_in_tiles_of_samples(tile_elems, gen, monkeypatch):
    """The convolutions' output gradients are rearranged a tile of samples at a time (one sample,
    a few, all): the same diagonal, with groups laid out as the layer lays them."""
    from trainscope import _curvature_factors as factors

    monkeypatch.setattr(factors, "_REARRANGE_TILE_ELEMS", tile_elems)
    model = init(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 2, groups=2, bias=False),
                               nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)), gen)
    x = torch.randn(B, 4, 6, 6, generator=gen, dtype=torch.float64)
    y = target("ce", gen)
    params = trainable(model)
    H = reference_hessian(model, x, LOSSES["ce"], y)
    d = C.hess_diag(lambda: LOSSES["ce"](model(x), y), params, method="piecewise_linear", model=model)
    assert (flat(d.diag) - H.diagonal()).abs().max() <= 1e-10 * max(1.0, float(H.diagonal().abs().max()))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_curvature_stats_tic_and_trace(kind, gen):
    model, x = make(kind, gen)
    y = target("ce", gen)
    params = trainable(model)
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    s = C.curvature_stats(closure, params, method="piecewise_linear", model=model, which=["hess_trace", "tic_diag",
                                                                                          "tic_trace"])
    ref = C.curvature_stats(closure, params, method="exact", which=["hess_trace", "tic_diag", "tic_trace"])
    assert s.method == "piecewise_linear" and s.samples == 0 and s.fallback_reason is None
    for name in ("hess_trace", "tic_diag", "tic_trace"):
        assert rel(s[name], ref[name]) < 1e-10, (name, float(s[name]), float(ref[name]))
    assert float(s.hess_trace_stderr) == 0.0 and math.isnan(float(s.hess_max_ev))
    # S from the factors equals torch.func's per-sample gradients.
    from trainscope import _curvature_factors as factors

    fwd = factors.Forward(closure, model, factors.layers_of(model, params, "t"), "t")
    fwd.check()
    _, sq = factors.diag_and_sum_grad_sq(fwd, params, want_diag=False, want_sum_grad_sq=True, chunk=4)
    want = per_sample_sum_grad_sq(model, x, y, "ce")
    assert (flat(sq) - flat(want)).abs().max() <= 1e-10 * float(flat(want).abs().max())
    # hess_max_ev beside it still by power iteration on the same forward pass.
    s2 = C.curvature_stats(closure, params, method="auto", model=model, max_iter=3000, rtol=1e-12, atol=0.0)
    assert s2.method == "piecewise_linear" and math.isfinite(float(s2.hess_max_ev))
    assert rel(s2.hess_trace, ref.hess_trace) < 1e-10


def test_float32_close_to_float64(gen):
    model, x = make("cnn", gen)
    y = target("ce", gen)
    h64 = C.hess_trace(lambda: F.cross_entropy(model(x), y), trainable(model), method="piecewise_linear",
                       model=model).trace
    m32, x32 = model.float(), x.float()
    h32 = C.hess_trace(lambda: F.cross_entropy(m32(x32), y), trainable(m32), method="piecewise_linear",
                       model=m32).trace
    assert h32.dtype == torch.float64 and rel(h32, h64) < 1e-5


def test_a_model_that_is_one_layer(gen):
    model = init(nn.Linear(4, 3), gen)
    x, y = torch.randn(B, 4, generator=gen, dtype=torch.float64), target("ce", gen)
    lossf = LOSSES["ce"]
    H = reference_hessian(model, x, lossf, y)
    d = C.hess_diag(lambda: lossf(model(x), y), trainable(model), method="piecewise_linear", model=model)
    assert (flat(d.diag) - H.diagonal()).abs().max() <= 1e-12


class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = nn.Linear(5, 3), nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_a_layer_the_closure_does_not_run_has_zero_curvature(gen):
    model = init(WithUnusedHead(), gen)
    x, y = torch.randn(B, 5, generator=gen, dtype=torch.float64), target("ce", gen)
    params = trainable(model)
    got = C.hess_diag(lambda: F.cross_entropy(model(x), y), params, method="piecewise_linear", model=model).diag
    want = C.hess_diag(lambda: F.cross_entropy(model(x), y), params, method="exact").diag
    assert all(float(t.abs().max()) == 0.0 for t in got[-2:])
    assert (flat(got) - flat(want)).abs().max() <= 1e-12


def test_only_some_parameters(gen):
    model, x = make("mlp", gen)
    y = target("ce", gen)
    model[0].weight.requires_grad_(False)
    params = trainable(model)
    full = C.hess_diag(lambda: F.cross_entropy(model(x), y), params, method="exact").diag
    got = C.hess_diag(lambda: F.cross_entropy(model(x), y), params, method="piecewise_linear", model=model).diag
    assert (flat(got) - flat(full)).abs().max() <= 1e-12


# ----------------------------------------------------------------------------------------------
# What it refuses, and "auto"'s fallback


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


class Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        h = self.a(x)
        return h * h


class Tied(nn.Module):
    """Two layers sharing one weight: the squared per-sample gradients of the two uses would miss
    their cross terms, so the factors refuse it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x) + self.b(torch.relu(x))


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(input=x)))  # the layer's input reaches no forward hook


REFUSED = [
    ("tanh", lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), "Tanh"),
    ("gelu", lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 3)), "Gelu"),
    ("layernorm", lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 3)),
     "NativeLayerNorm"),
    ("batchnorm", lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), "BatchNorm"),
    ("twice", Twice, "2 times"),
    ("square", Square, "same parameter"),
    ("tied", Tied, "used 2 times"),
    ("keyword", KeywordCall, "one input tensor"),
]


@pytest.mark.parametrize("name,factory,word", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_a_reason_and_auto_falls_back(name, factory, word, gen):
    model = init(factory(), gen).eval()
    x, y = torch.randn(B, 3, generator=gen, dtype=torch.float64), target("ce", gen)
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    params = trainable(model)
    with pytest.raises(ValueError, match=word):
        C.curvature_stats(closure, params, method="piecewise_linear", model=model)
    with pytest.raises(ValueError, match=word):
        C.hess_diag(closure, params, method="piecewise_linear", model=model)
    s = C.curvature_stats(closure, params, method="auto", model=model, samples=3, which=["hess_trace"],
                          generator=torch.Generator().manual_seed(0))
    assert s.method == "hutchinson" and s.samples == 3 and word in s.fallback_reason
    assert math.isfinite(float(s.hess_trace)) and math.isfinite(float(s.hess_trace_stderr))


def test_a_penalty_on_the_parameters_in_the_loss_is_refused(gen):
    model, x = make("mlp", gen)
    y = target("ce", gen)
    closure = lambda: F.cross_entropy(model(x), y) + 1e-3 * model[0].weight.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="other than through the model's output"):
        C.hess_trace(closure, trainable(model), method="piecewise_linear", model=model)


def test_bad_configuration(gen):
    model, x = make("mlp", gen)
    y = target("ce", gen)
    params = trainable(model)
    with pytest.raises(ValueError, match="model="):
        C.curvature_stats(lambda: F.cross_entropy(model(x), y), params, method="piecewise_linear")
    with pytest.raises(ValueError, match="closure"):
        C.hess_trace(F.cross_entropy(model(x), y), params, method="auto", model=model)
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        C.hess_trace(lambda: F.cross_entropy(model(x), y), params + list(other.parameters()),
                     method="piecewise_linear", model=model)


def test_nan_loss_gives_nan_without_raising(gen):
    model, x = make("cnn", gen)
    y = target("ce", gen)
    x[0, 0, 0, 0] = math.nan
    s = C.curvature_stats(lambda: F.cross_entropy(model(x), y, reduction="none"), trainable(model),
                          method="piecewise_linear", model=model, which=["hess_trace", "tic_diag", "tic_trace"])
    assert math.isnan(float(s.hess_trace)) and math.isnan(float(s.tic_diag)) and math.isnan(float(s.tic_trace))


def test_monitor_auto_is_exact_on_relu_nets_and_warns_once_when_it_estimates(gen):
    import trainscope

    for factory, exact in ((lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)), True),
                           (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), False)):
        model = init(factory(), gen)
        records, caught, closure = monitored_curvature_steps(
            model, gen, {"method": "auto", "which": ["hess_trace"], "samples": 4})
        said = [w for w in caught if "estimates (Hutchinson" in str(w.message)]
        assert len(said) == (0 if exact else 1) and (exact or "Tanh" in str(said[0].message))
        assert ("curvature/hess_trace_stderr" in records[-1].scalars) == (not exact)
        if exact:
            want = C.hess_trace(closure, trainable(model), method="exact").trace
            assert rel(records[-1].scalars["curvature/hess_trace"], want) < 1e-9
    with pytest.raises(ValueError, match="curvature_options"):
        trainscope.Monitor(list(model.named_parameters()), curvature=True,
                           curvature_options={"method": "piecewise_linear"})


def monitored_curvature_steps(model, gen, options, steps=2):
    """(records, warnings caught, closure) of ``steps`` Monitor steps with curvature_options
    ``options`` on a cross-entropy closure of one float64 batch."""
    import trainscope

    records = []
    mon = trainscope.Monitor(model, per_tensor=False, sinks=[records.append], curvature=True,
                             curvature_options=options)
    x, y = torch.randn(B, 3, generator=gen, dtype=torch.float64), target("ce", gen)
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            mon.step(step, closure().detach(), closure=closure)
        mon.flush()
    mon.close()
    return records, caught, closure


class Scaled(nn.Module):
    """A parameter of its own, used outside any layer the factors know."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_monitor_piecewise_linear_refusals_never_end_the_run(gen):
    """Parameters outside the factor layers: an error at construction naming them. A graph that
    only the closure's forward pass shows to be not piecewise linear: NaN and one warning."""
    import trainscope

    opts = {"method": "piecewise_linear", "which": ["hess_trace"]}
    with pytest.raises(ValueError, match=r"curvature_options\['method'\].*'scale'"):
        trainscope.Monitor(init(Scaled(), gen), curvature=True, curvature_options=opts)
    model = init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), gen)
    records, caught, _ = monitored_curvature_steps(model, gen, opts)
    said = [w for w in caught if "curvature not measured" in str(w.message)]
    assert len(said) == 1 and "Tanh" in str(said[0].message)
    assert len(records) == 2 and all(math.isnan(r.scalars["curvature/hess_trace"]) for r in records)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_against_backpack_diag_hessian_on_3c3d(gen):
    """BackPACK's DiagHessian (what Cockpit's HessTrace and TICDiag read) on Cockpit's own 3c3d
    net (small images), float64: the same diagonal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backpack = pytest.importorskip("backpack")
        from backpack import extensions
    import sys, os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from bench_monitor import make_3c3d

    torch.manual_seed(0)
    model = make_3c3d(nn, True).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    params = trainable(model)
    got = C.hess_diag(lambda: F.cross_entropy(model(x), y), params, method="piecewise_linear", model=model).diag
    bmodel, lossf = backpack.extend(model), backpack.extend(nn.CrossEntropyLoss())
    with default_dtype(torch.float64), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = lossf(bmodel(x), y)
        with backpack.backpack(extensions.DiagHessian()):
            loss.backward()
    want = [p.diag_h for p in params]
    for p in params:
        p.grad = None
    assert (flat(got) - flat(want)).abs().max() <= 1e-10 * float(flat(want).abs().max())


def test_a_loss_hessian_the_solver_cannot_decompose_gives_nan(gen, monkeypatch):
    model, x = make("mlp", gen)
    y = target("ce", gen)

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    s = C.curvature_stats(lambda: F.cross_entropy(model(x), y, reduction="none"), trainable(model),
                          method="piecewise_linear", model=model, which=["hess_trace", "tic_diag"])
    assert math.isnan(float(s.hess_trace)) and math.isnan(float(s.tic_diag))
