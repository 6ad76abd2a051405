"""RepresentationProbe and RepresentationAccumulator: hooks, streaming, train/eval restore, and
results equal to the single-layer functions (and to a float64 NumPy SVD) on the same activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import trainscope
from conftest import requires_cuda
from trainscope.representation import REPRESENTATION_METRICS


def _np_effective_rank(phi: np.ndarray) -> float:
    s = np.linalg.svd(phi.astype(np.float64), compute_uv=False)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class ThreeActs(nn.Module):
    """An MLP with one ReLU, one tanh and one sigmoid layer; the first four ReLU units are dead by
    construction (zero weights, negative bias) and dropout makes train mode observable."""

    def __init__(self, d_in=12, width=16, dead=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(width, width)
        self.act2 = nn.Tanh()
        self.fc3 = nn.Linear(width, 8)
        self.act3 = nn.Sigmoid()
        with torch.no_grad():
            self.fc1.weight[:dead] = 0.0
            self.fc1.bias[:dead] = -1.0

    def forward(self, x):
        h1 = self.drop(self.act1(self.fc1(x)))
        h2 = self.act2(self.fc2(h1))
        return self.act3(self.fc3(h2))


def _activations(model, x):
    with torch.no_grad():
        h1 = model.act1(model.fc1(x))
        h2 = model.act2(model.fc2(h1))
        h3 = model.act3(model.fc3(h2))
    return {"act1": h1, "act2": h2, "act3": h3}


def _model(device, seed=0):
    torch.manual_seed(seed)
    return ThreeActs().to(device)


def test_probe_matches_single_layer_functions(device):
    model = _model(device)
    x = torch.randn(300, 12, device=device)
    r = trainscope.RepresentationProbe(model, x, batch_size=64)()
    assert r.layers == ["act1", "act2", "act3"]
    acts = _activations(model.eval(), x)
    kinds = {"act1": "relu", "act2": "tanh", "act3": "sigmoid"}
    for i, layer in enumerate(r.layers):
        d = trainscope.dead_units(acts[layer], kind=kinds[layer])
        assert int(r.per_layer["dead_units"][i]) == int(d.count)
        torch.testing.assert_close(r.active_fraction[layer], d.active_fraction)
        m = trainscope.rank_measures(acts[layer])
        torch.testing.assert_close(r.per_layer["effective_rank"][i], m.effective_rank, rtol=1e-6, atol=0)
        assert int(r.per_layer["approximate_rank"][i]) == int(m.approximate_rank)
        assert int(r.per_layer["abs_approximate_rank"][i]) == int(m.abs_approximate_rank)
        torch.testing.assert_close(r.per_layer["stable_rank"][i], m.stable_rank, rtol=1e-6, atol=0)
        want = _np_effective_rank(acts[layer].double().cpu().numpy())
        assert abs(float(r.per_layer["effective_rank"][i]) - want) <= 1e-3 * want
        assert r.units[layer] == acts[layer].shape[1]
        assert r.observations[layer] == 300
    assert int(r.per_layer["dead_units"][0]) >= 4  # the constructed dead units
    for t in list(r.per_layer.values()) + list(r.summary.values()):
        assert t.device.type == torch.device(device).type


def test_summary_averages_over_layers(device):
    model = _model(device)
    r = trainscope.RepresentationProbe(model, torch.randn(200, 12, device=device))()
    pl = r.per_layer
    assert int(r.summary["dead_units"]) == int(pl["dead_units"].sum())
    total_units = sum(r.units.values())
    assert float(r.summary["dead_fraction"]) == pytest.approx(float(pl["dead_units"].sum()) / total_units)
    for metric in ("effective_rank", "approximate_rank", "abs_approximate_rank", "stable_rank"):
        assert float(r.summary[metric]) == pytest.approx(float(pl[metric].double().mean()))
    scalars = r.scalars(prefix="repr/")
    for metric in REPRESENTATION_METRICS:
        assert f"repr/{metric}" in scalars
        for layer in r.layers:
            assert f"repr/{metric}/{layer}" in scalars


def test_streamed_equals_one_batch(device):
    model = _model(device)
    x = torch.randn(257, 12, device=device)
    a = trainscope.RepresentationProbe(model, x, batch_size=13)()
    b = trainscope.RepresentationProbe(model, x, batch_size=257)()
    for metric in REPRESENTATION_METRICS:
        torch.testing.assert_close(a.per_layer[metric], b.per_layer[metric], rtol=1e-7, atol=0)


def test_svd_method_agrees_with_gram(device):
    model = _model(device)
    x = torch.randn(100, 12, device=device)
    a = trainscope.RepresentationProbe(model, x, batch_size=30, method="gram")()
    b = trainscope.RepresentationProbe(model, x, batch_size=30, method="svd")()
    torch.testing.assert_close(a.per_layer["effective_rank"], b.per_layer["effective_rank"], rtol=1e-6, atol=0)
    torch.testing.assert_close(a.per_layer["dead_units"], b.per_layer["dead_units"])


def test_restores_train_eval_state_and_removes_hooks():
    model = _model("cpu")
    model.train()
    model.fc2.eval()  # a mixed state must come back as it was
    seen_training = []
    model.drop.register_forward_pre_hook(lambda m, inp: seen_training.append(m.training))
    trainscope.RepresentationProbe(model, torch.randn(10, 12))()
    assert seen_training == [False]  # eval mode while probing
    assert model.training and model.drop.training and not model.fc2.training
    for m in (model.act1, model.act2, model.act3):
        assert len(m._forward_hooks) == 0

    class Boom(Exception):
        pass

    def failing_forward(m, x):
        m(x)
        raise Boom()

    with pytest.raises(Boom):
        trainscope.RepresentationProbe(model, torch.randn(10, 12), forward=failing_forward)()
    assert model.training and not model.fc2.training
    assert all(len(m._forward_hooks) == 0 for m in (model.act1, model.act2, model.act3))


def test_train_mode_keeps_the_state():
    model = _model("cpu").train()
    seen = []
    model.drop.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    trainscope.RepresentationProbe(model, torch.randn(10, 12), train_mode=True)()
    assert seen == [True] and model.training


def test_probe_set_forms_and_num_examples():
    model = _model("cpu")
    x = torch.randn(2500, 12)
    y = torch.zeros(2500)
    r = trainscope.RepresentationProbe(model, x)()
    assert r.observations["act1"] == 2000  # default num_examples
    r2 = trainscope.RepresentationProbe(model, (x, y), num_examples=300)()
    assert r2.observations["act1"] == 300
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    r3 = trainscope.RepresentationProbe(model, loader, num_examples=300)()
    assert r3.observations["act1"] == 300
    torch.testing.assert_close(r2.per_layer["effective_rank"], r3.per_layer["effective_rank"], rtol=1e-9, atol=0)


def _same_result(a, b, rtol=0.0):
    for metric in REPRESENTATION_METRICS:
        torch.testing.assert_close(a.per_layer[metric], b.per_layer[metric], rtol=rtol, atol=0)


def test_probe_set_from_numpy_and_lists_of_numbers(device):
    """A NumPy array or a (nested) list of numbers is converted once when the probe is built, onto
    the model's device and, when floating, into its parameters' dtype (a float64 array to a
    float32 model); as the first entry of an (x, y) tuple too."""
    np_ = pytest.importorskip("numpy")
    model = _model(device)
    x = torch.randn(50, 12)
    want = trainscope.RepresentationProbe(model, x.to(device))()
    for given in (x.double().numpy(), x.numpy(), x.tolist(), (x.double().numpy(), np_.zeros(50))):
        probe = trainscope.RepresentationProbe(model, given)
        _same_result(probe(), want)
    # A list of (x, y) batches is an iterable of batches, as a DataLoader.
    batches = [(x[:20].to(device), None), (x[20:].to(device), None)]
    _same_result(trainscope.RepresentationProbe(model, batches)(), want, rtol=1e-9)  # Gram sums in two parts


class _DictData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": torch.full((12,), float(i)), "y": torch.tensor(i)}


@pytest.mark.parametrize("probe_set, words", [
    (None, "probe_set is None"),
    ([torch.randn(5, 12), torch.randn(5, 12)], "probe_set is a list of tensors"),
    (torch.tensor(1.5), "probe_set is a 0-d tensor"),
    ({"x": torch.randn(5, 12)}, "probe_set is a dict"),
    ("probe.pt", "probe_set is a str"),
    (3.0, "probe_set is a float"),
    (torch.utils.data.DataLoader(_DictData(), batch_size=4), "probe_set yields dict batches"),
    (_DictData(), "probe_set is a Dataset"),
])
def test_probe_set_of_another_kind_fails_when_the_probe_is_built(probe_set, words):
    model = _model("cpu")
    with pytest.raises((TypeError, ValueError), match=words):
        trainscope.RepresentationProbe(model, probe_set)


def test_probe_set_without_examples():
    model = _model("cpu")
    with pytest.raises(ValueError, match="probe_set has no examples"):
        trainscope.RepresentationProbe(model, torch.randn(0, 12))
    # An empty iterable may be a rank's share under torch.distributed: alone, the call says so.
    probe = trainscope.RepresentationProbe(model, [])
    with pytest.raises(ValueError, match="probe_set gave no examples"):
        probe()


def test_probe_set_iterable_of_dict_batches_fails_before_the_forward():
    """An iterable the probe cannot look into when built (a generator here) is checked batch by
    batch: a dict batch raises an error naming probe_set before the model runs on it."""
    model = _model("cpu")
    ran = []
    model.fc1.register_forward_pre_hook(lambda m, inp: ran.append(1))

    class Batches:
        def __iter__(self):
            yield {"x": torch.randn(4, 12)}

    probe = trainscope.RepresentationProbe(model, Batches())
    with pytest.raises(TypeError, match="probe_set yields dict batches"):
        probe()
    assert not ran
    assert all(len(m._forward_hooks) == 0 for m in (model.act1, model.act2, model.act3))


def test_chosen_layers_kinds_and_repeated_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 10)
            self.act = nn.ReLU()  # applied twice

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(1)
    model = Shared()
    x = torch.randn(64, 6)
    r = trainscope.RepresentationProbe(model, x)()
    assert r.layers == ["act", "act:1"]
    h1 = torch.relu(model.fc1(x)).detach()
    h2 = torch.relu(model.fc2(h1)).detach()
    torch.testing.assert_close(r.per_layer["effective_rank"][1], trainscope.rank_measures(h2).effective_rank,
                               rtol=1e-6, atol=0)

    r2 = trainscope.RepresentationProbe(model, x, layers=["fc1"], kind={"fc1": "tanh"})()
    assert r2.layers == ["fc1"]
    d = trainscope.dead_units(model.fc1(x).detach(), kind="tanh")
    torch.testing.assert_close(r2.active_fraction["fc1"], d.active_fraction)


def test_conv_channels_are_units():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    x = torch.randn(20, 3, 6, 6)
    r = trainscope.RepresentationProbe(model, x, batch_size=7)()
    acts = model(x).detach()
    assert r.units["1"] == 8 and r.observations["1"] == 20 * 36
    phi = acts.permute(0, 2, 3, 1).reshape(-1, 8)
    want = _np_effective_rank(phi.double().numpy())
    assert abs(float(r.per_layer["effective_rank"][0]) - want) <= 1e-3 * want
    d = trainscope.dead_units(acts)
    torch.testing.assert_close(r.active_fraction["1"], d.active_fraction)


def test_weight_rank_measures():
    model = _model("cpu")
    r = trainscope.RepresentationProbe(model, torch.randn(10, 12), weights=True)()
    assert set(r.weights) == {"fc1", "fc2", "fc3"}
    m = trainscope.rank_measures(model.fc2.weight.detach())
    torch.testing.assert_close(r.weights["fc2"].effective_rank, m.effective_rank)
    assert "weight_effective_rank/fc2" in r.scalars()
    conv = nn.Conv2d(4, 6, 3)
    w = trainscope.weight_rank_measures(conv)
    torch.testing.assert_close(w["weight"].stable_rank,
                               trainscope.rank_measures(conv.weight.detach().reshape(6, -1)).stable_rank)


def test_accumulator_dict_input_and_errors():
    acc = trainscope.RepresentationAccumulator(["a", "b"], kinds=["relu", "tanh"])
    with pytest.raises(RuntimeError, match="no batch"):
        acc.result()
    a, b = torch.randn(9, 5).relu(), torch.randn(9, 3).tanh()
    acc.add({"a": a, "b": b})
    r = acc.result()
    assert r.units == {"a": 5, "b": 3}
    with pytest.raises(ValueError, match="no entry for layer 'b'"):
        acc.add({"a": a})
    with pytest.raises(RuntimeError, match="acts has 1 tensors"):
        acc.add([a])
    with pytest.raises(RuntimeError, match="layer b"):
        acc.add([a, torch.randn(9, 4)])  # units changed
    with pytest.raises(ValueError, match="kinds has 1 entries"):
        trainscope.RepresentationAccumulator(["a", "b"], kinds=["relu"])
    with pytest.raises(RuntimeError, match="kinds"):
        trainscope.RepresentationAccumulator(["a"], kinds=["softmax"])
    with pytest.raises(RuntimeError, match="prop"):
        trainscope.RepresentationAccumulator(["a"], prop=1.5)
    with pytest.raises(RuntimeError, match="method"):
        trainscope.RepresentationAccumulator(["a"], method="qr")
    acc.reset()
    with pytest.raises(RuntimeError, match="no batch"):
        acc.result()


def test_probe_argument_errors():
    model = _model("cpu")
    with pytest.raises(ValueError, match="batch_size"):
        trainscope.RepresentationProbe(model, torch.randn(4, 12), batch_size=0)
    with pytest.raises(ValueError, match="not a module"):
        trainscope.RepresentationProbe(model, torch.randn(4, 12), layers=["nope"])
    with pytest.raises(ValueError, match="no activation module"):
        trainscope.RepresentationProbe(nn.Linear(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="no examples"):
        trainscope.RepresentationProbe(model, torch.randn(0, 12))()


# ---------------------------------------------------------------------------------------------
# Numerical trouble is a value (SPEC.md §5): a diverged model still gets its result.

RANKS = ("effective_rank", "approximate_rank", "abs_approximate_rank", "stable_rank")


def _assert_layer_undefined(per_layer, i, what=""):
    assert torch.isnan(per_layer["effective_rank"][i]) and torch.isnan(per_layer["stable_rank"][i]), what
    assert int(per_layer["approximate_rank"][i]) == -1 and int(per_layer["abs_approximate_rank"][i]) == -1, what


def _assert_layer_is(per_layer, i, m, what=""):
    """Layer i's rank measures are those of the single-layer function."""
    torch.testing.assert_close(per_layer["effective_rank"][i], m.effective_rank, rtol=1e-6, atol=0, msg=what)
    torch.testing.assert_close(per_layer["stable_rank"][i], m.stable_rank, rtol=1e-6, atol=0, msg=what)
    assert int(per_layer["approximate_rank"][i]) == int(m.approximate_rank), what
    assert int(per_layer["abs_approximate_rank"][i]) == int(m.abs_approximate_rank), what


class FourActs(nn.Module):
    """ReLU, then a linear layer whose weight holds a NaN, then ReLU, tanh and sigmoid: everything
    after the NaN weight is NaN."""

    def __init__(self, bad=float("nan")):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(12, 10), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(10, 9), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(9, 8), nn.Tanh()
        self.fc4, self.act4 = nn.Linear(8, 7), nn.Sigmoid()
        with torch.no_grad():
            self.fc2.weight[0, 0] = bad

    def forward(self, x):
        return self.act4(self.fc4(self.act3(self.fc3(self.act2(self.fc2(self.act1(self.fc1(x))))))))


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_probe_of_a_model_with_a_nonfinite_weight(device, bad, method):
    torch.manual_seed(3)
    model = FourActs(bad).to(device)
    x = torch.randn(150, 12, device=device)
    r = trainscope.RepresentationProbe(model, x, batch_size=40, method=method, weights=True)()  # never raises
    assert r.layers == ["act1", "act2", "act3", "act4"]
    with torch.no_grad():
        h1 = model.act1(model.fc1(x))
        h2 = model.act2(model.fc2(h1))
        h3 = model.act3(model.fc3(h2))
        h4 = model.act4(model.fc4(h3))
    # The layer before the bad weight is measured as before; every layer after it holds a NaN or
    # an Inf (tanh and sigmoid turn ±Inf into finite values, not NaN).
    _assert_layer_is(r.per_layer, 0, trainscope.rank_measures(h1, method=method), "act1")
    for i, h in ((1, h2), (2, h3), (3, h4)):
        assert not torch.isfinite(h).all()
        _assert_layer_undefined(r.per_layer, i, r.layers[i])
    # Dead units by IEEE comparisons: NaN is active for ReLU (NaN != 0), inactive for tanh and
    # sigmoid.
    for i, (h, kind) in enumerate(((h1, "relu"), (h2, "relu"), (h3, "tanh"), (h4, "sigmoid"))):
        d = trainscope.dead_units(h, kind=kind)
        assert int(r.per_layer["dead_units"][i]) == int(d.count), r.layers[i]
        torch.testing.assert_close(r.active_fraction[r.layers[i]], d.active_fraction)
    if bad != bad:  # NaN: act2's unit 0 is NaN throughout (always active), act3 and act4 entirely (all dead)
        assert h2[:, 0].isnan().all() and h3.isnan().all() and h4.isnan().all()
        assert float(r.active_fraction["act2"][0]) == 1.0
        assert int(r.per_layer["dead_units"][2]) == 8 and int(r.per_layer["dead_units"][3]) == 7
    # The averages over layers say that a layer is undefined: NaN, never a mean over -1.
    for metric in RANKS:
        assert torch.isnan(r.summary[metric]), metric
    assert int(r.summary["dead_units"]) == int(r.per_layer["dead_units"].sum())
    # Weight ranks: the bad matrix undefined, the others exact.
    w = r.weights["fc2"]
    assert torch.isnan(w.effective_rank) and int(w.approximate_rank) == -1
    assert int(w.abs_approximate_rank) == -1 and torch.isnan(w.stable_rank)
    want = trainscope.rank_measures(model.fc3.weight.detach(), method=method)
    torch.testing.assert_close(r.weights["fc3"].effective_rank, want.effective_rank)
    assert int(r.weights["fc3"].approximate_rank) == int(want.approximate_rank)
    for name, t in r.scalars().items():
        assert isinstance(t, torch.Tensor), name


def test_probe_after_a_diverging_run():
    """Plain SGD at lr = 1e4 until the weights are no longer finite, then the probe: a result,
    each layer either undefined (non-finite activations) or its single-layer measures."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8), nn.Sigmoid(),
                          nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e4)
    x, y = torch.randn(64, 12), torch.randn(64, 4)
    for _ in range(50):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            break
    assert not all(torch.isfinite(p).all() for p in model.parameters()), "the run did not diverge"
    r = trainscope.RepresentationProbe(model, x, batch_size=20, weights=True)()
    acts, h = {}, x
    with torch.no_grad():
        for name, module in model.named_children():
            h = module(h)
            acts[name] = h
    kinds = {"1": "relu", "3": "tanh", "5": "sigmoid"}
    for i, layer in enumerate(r.layers):
        a = acts[layer]
        assert int(r.per_layer["dead_units"][i]) == int(trainscope.dead_units(a, kind=kinds[layer]).count)
        if torch.isfinite(a).all():
            _assert_layer_is(r.per_layer, i, trainscope.rank_measures(a), layer)
        else:
            _assert_layer_undefined(r.per_layer, i, layer)
    for name, m in r.weights.items():
        w = dict(model.named_modules())[name].weight
        if torch.isfinite(w).all():
            torch.testing.assert_close(m.effective_rank, trainscope.rank_measures(w.detach()).effective_rank)
        else:
            assert torch.isnan(m.effective_rank) and int(m.approximate_rank) == -1, name


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_accumulator_with_a_nonfinite_batch(device, method):
    """Layer b gets a NaN (or Inf) in one batch, in both states of the stream (rows kept, fewer
    rows than units; ΦᵀΦ accumulated): only b is undefined, a is exact."""
    gen = torch.Generator().manual_seed(4)
    for rows in (6, 40):  # 2 batches of 6 < 20 units: rows kept; of 40: ΦᵀΦ
        a = [torch.randn(rows, 20, generator=gen).relu().to(device) for _ in range(2)]
        b = [torch.randn(rows, 20, generator=gen).tanh().to(device) for _ in range(2)]
        for bad in (float("nan"), float("inf")):
            b_bad = [b[0], b[1].clone()]
            b_bad[1][2, 3] = bad
            acc = trainscope.RepresentationAccumulator(["a", "b"], kinds=["relu", "tanh"], method=method)
            for i in range(2):
                acc.add([a[i], b_bad[i]])
            r = acc.result()
            _assert_layer_is(r.per_layer, 0, trainscope.rank_measures(torch.cat(a), method=method), f"a {rows}")
            _assert_layer_undefined(r.per_layer, 1, f"b {rows} {bad}")
            d = trainscope.dead_units(torch.cat(b_bad), kind="tanh")
            torch.testing.assert_close(r.active_fraction["b"], d.active_fraction)


@requires_cuda
def test_cuda_probe_no_host_sync():
    model = _model("cuda")
    x = torch.randn(300, 12, device="cuda")
    trainscope.RepresentationProbe(model, x, batch_size=64)()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = trainscope.RepresentationProbe(model, x, batch_size=64)()
        r.scalars()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_probe_of_a_nonfinite_model_no_host_sync():
    model = FourActs().to("cuda")
    x = torch.randn(300, 12, device="cuda")
    for method in ("gram", "svd"):
        trainscope.RepresentationProbe(model, x, batch_size=64, method=method, weights=True)()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [trainscope.RepresentationProbe(model, x, batch_size=64, method=method, weights=True)()
                   for method in ("gram", "svd")]
        for r in results:
            r.scalars()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for r in results:
        for i in (1, 2, 3):
            _assert_layer_undefined(r.per_layer, i, r.layers[i])
        assert torch.isfinite(r.per_layer["effective_rank"][0])


def test_whole_batches_go_to_forward_as_they_are():
    """whole_batches=True: dict batches (or any other) reach forward whole; the activations are the
    hooks' either way, the examples are counted by the first tensor, and the batch reaching
    num_examples is cut (every tensor of that first dimension)."""
    model = _model("cpu")
    x = torch.randn(70, 12)
    want = trainscope.RepresentationProbe(model, x, num_examples=50)()
    seen = []

    def forward(m, batch):
        seen.append({k: tuple(v.shape) for k, v in batch.items()})
        return ((m(batch["x"]) - batch["y"][:, None]) ** 2).mean()  # a forward that computes a loss

    batches = [{"x": x[i:i + 20], "y": torch.zeros(20), "w": torch.ones(3)} for i in range(0, 70, 20)]
    r = trainscope.RepresentationProbe(model, batches, num_examples=50, whole_batches=True, forward=forward)()
    _same_result(r, want, rtol=1e-9)
    assert r.observations["act1"] == 50
    assert seen == [{"x": (20, 12), "y": (20,), "w": (3,)}] * 2 + [{"x": (10, 12), "y": (10,), "w": (3,)}]
    # A DataLoader of dict batches too (refused without whole_batches).
    loader = torch.utils.data.DataLoader(_DictData(), batch_size=4)
    r = trainscope.RepresentationProbe(model, loader, whole_batches=True, forward=lambda m, b: m(b["x"]))()
    _same_result(r, trainscope.RepresentationProbe(model, torch.stack([_DictData()[i]["x"] for i in range(16)]))(),
                 rtol=1e-9)
    with pytest.raises(TypeError, match="whole_batches"):
        trainscope.RepresentationProbe(model, loader, whole_batches="yes")
    with pytest.raises(TypeError, match="first"):
        trainscope.RepresentationProbe(model, [{"x": [1.0]}], whole_batches=True, forward=lambda m, b: None)()
