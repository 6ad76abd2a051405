"""The per-element gradient variance family (SPEC.md §6): PerSampleHooks.grad_moments() against
float64 per-sample gradients from torch.func, grad_variance_stats against the definitions written
out once more, and against Cockpit's MeanGSNR, CABS and EarlyStopping on the same batch."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainscope
from trainscope import GradMoments, grad_moments_of, grad_variance_stats


def per_sample_grads(model, loss_of_one, *inputs):
    """{name: [B, *shape]} float64 gradients of each sample's loss."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, *xs):
        return loss_of_one(lambda *a: torch.func.functional_call(model, p, a), *(x[None] for x in xs))

    return torch.func.vmap(torch.func.grad(one), in_dims=(None,) + (0,) * len(inputs))(params, *inputs)


def reference_stats(grads: dict, loss: float, lr: float):
    """The three quantities from per-sample gradients, as SPEC.md §6 writes them."""
    g = torch.cat([t.reshape(t.shape[0], -1) for t in grads.values()], 1)
    b = g.shape[0]
    mean = g.mean(0)
    s = (g * g).sum(0)
    gsnr = (mean ** 2 / (s / b - mean ** 2 + 1e-5)).mean()
    var = (s - b * mean ** 2) / (b - 1)
    es = 1 - b * (mean ** 2 / (var + 1e-5)).mean()
    cabs = lr * (s - b * mean ** 2).sum() / (b * loss)
    return torch.stack([gsnr, es, cabs])


class Block(nn.Module):
    """Token embedding, LayerNorm, a Linear over positions, a Linear used twice, a tied head."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.twice = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tok):
        h = self.ln(self.emb(tok))
        h = torch.tanh(self.fc(h))
        h = self.twice(self.twice(h))
        return self.head(h)


def _models():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.GroupNorm(1, 3), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4)).double()
    block = Block().double()
    return [
        ("mlp", mlp, (torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))),
         lambda f, x, y: F.cross_entropy(f(x), y)),
        ("conv", conv, (torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))),
         lambda f, x, y: F.cross_entropy(f(x), y)),
        ("block", block, (torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4))),
         lambda f, x, y: F.cross_entropy(f(x).reshape(-1, 11), y.reshape(-1))),
    ]


@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_moments_and_stats_match_float64_per_sample_gradients(case, reduction):
    _, model, (x, y), loss_of = case
    model.zero_grad()
    hooks = trainscope.PerSampleHooks(model, loss_reduction=reduction)
    with torch.no_grad():
        losses = torch.stack([loss_of(model, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])
    with hooks:
        # The mean of the per-sample losses; "sum": their sum (every sample has as many positions).
        batch_loss = loss_of(model, x, y) * (1 if reduction == "mean" else x.shape[0])
        batch_loss.backward()
        got = hooks.grad_moments()
    ref = grad_moments_of(per_sample_grads(model, loss_of, x, y))
    assert got.batch_size == ref.batch_size == x.shape[0]
    assert set(got.grad_sum) == set(ref.grad_sum)
    for name in ref.grad_sum:
        for a, b in ((got.grad_sum[name], ref.grad_sum[name]), (got.sum_grad_sq[name], ref.sum_grad_sq[name])):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    mean_loss = float(losses.mean())
    s = grad_variance_stats(got, loss=mean_loss, lr=0.05)
    want = reference_stats(per_sample_grads(model, loss_of, x, y), mean_loss, 0.05)
    torch.testing.assert_close(s.stats, want, rtol=1e-7, atol=0)  # cabs: S − B·ḡ² cancels
    for k, q in enumerate(trainscope.GRAD_VARIANCE_STATS):
        assert s[q] is not None and torch.equal(s[q], s.stats[k])
        assert set(s.per_tensor[q]) == set(ref.grad_sum)
    # Per tensor: the same formulas over one tensor's elements.
    grads = per_sample_grads(model, loss_of, x, y)
    for name, g in grads.items():
        torch.testing.assert_close(torch.stack([s.per_tensor[q][name] for q in trainscope.GRAD_VARIANCE_STATS]),
                                   reference_stats({name: g}, mean_loss, 0.05), rtol=1e-7, atol=1e-12)


def test_moments_of_disjoint_batches_add():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    parts = []
    with trainscope.PerSampleHooks(model, loss_reduction="sum") as hooks:
        for sl in (slice(0, 4), slice(4, 10)):
            hooks.clear()
            model.zero_grad()
            F.mse_loss(model(x[sl]), y[sl], reduction="sum").backward()
            parts.append(hooks.grad_moments())
        hooks.clear()
        model.zero_grad()
        F.mse_loss(model(x), y, reduction="sum").backward()
        whole = hooks.grad_moments()
    added = parts[0] + parts[1]
    assert added.batch_size == 10
    for name in whole.grad_sum:
        torch.testing.assert_close(added.grad_sum[name], whole.grad_sum[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(added.sum_grad_sq[name], whole.sum_grad_sq[name], rtol=1e-12, atol=1e-14)


def test_numerical_trouble_is_nan_never_an_exception():
    ones = GradMoments({"w": torch.ones(3, dtype=torch.float64)}, {"w": torch.ones(3, dtype=torch.float64)}, 1)
    s = grad_variance_stats(ones, loss=1.0, lr=0.1)
    assert math.isnan(s["early_stopping"])                # a batch of one has no sample variance
    assert math.isfinite(s["mean_gsnr"]) and math.isfinite(s["cabs"])
    nan = GradMoments({"w": torch.tensor([float("nan"), 1.0], dtype=torch.float64)},
                      {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, 4)
    s = grad_variance_stats(nan, loss=float("inf"), lr=0.1)
    assert all(math.isnan(v) for v in s.stats.tolist())
    s = grad_variance_stats(nan)
    assert math.isnan(s["cabs"])                          # no loss or lr: cabs is not measured


def test_bad_arguments_name_themselves():
    m = GradMoments({"w": torch.ones(2, dtype=torch.float64)}, {"w": torch.ones(2, dtype=torch.float64)}, 3)
    with pytest.raises(TypeError, match="moments"):
        grad_variance_stats({"w": torch.ones(2)})
    with pytest.raises(KeyError, match="nope"):
        grad_variance_stats(m)["nope"]
    with pytest.raises(ValueError, match="batch_size"):
        grad_variance_stats(GradMoments(m.grad_sum, m.sum_grad_sq, 0))
    with pytest.raises(ValueError, match="samples"):
        grad_moments_of({"a": torch.ones(3, 2), "b": torch.ones(2, 2)})


def test_equals_cockpit_on_the_same_batch():
    """Cockpit v1.0.2's MeanGSNR, CABS and EarlyStopping (zero-momentum SGD, BackPACK's BatchGrad)
    on a float32 network, within 1e-4 relative."""
    cockpit = pytest.importorskip("cockpit")
    backpack = pytest.importorskip("backpack")
    from cockpit import quantities
    from cockpit.utils.schedules import linear

    torch.manual_seed(3)
    model = backpack.extend(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                          nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 5)))
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.07)
    qs = [quantities.MeanGSNR(linear(1)), quantities.EarlyStopping(linear(1)), quantities.CABS(linear(1))]
    ck = cockpit.Cockpit(model.parameters(), quantities=qs)
    hooks = trainscope.PerSampleHooks(model)
    for step in range(2):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
        opt.zero_grad()
        hooks.clear()
        out = model(x)
        loss = loss_fn(out, y)
        losses = F.cross_entropy(out, y, reduction="none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ck(step, info={"batch_size": 16, "individual_losses": losses, "loss": loss, "optimizer": opt}):
                loss.backward(create_graph=ck.create_graph(step))
        ours = grad_variance_stats(hooks.grad_moments(), loss=loss, lr=opt.param_groups[0]["lr"])
        theirs = [q.get_output()[step] for q in qs]
        for name, want in zip(("mean_gsnr", "early_stopping", "cabs"), theirs):
            assert ours[name].item() == pytest.approx(want, rel=1e-4), (step, name)
        opt.step()
    hooks.remove()


def test_monitor_records_the_family_on_its_schedule():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, grad_variance=trainscope.every(2),
                             optimizer=opt, sinks=[records.append])
    want = {}
    for step in range(4):
        x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        if step % 2 == 0:
            grads = per_sample_grads(model, lambda f, a, b: F.cross_entropy(f(a), b), x, y)
            with torch.no_grad():
                mean_loss = float(F.cross_entropy(model(x), y))
            want[step] = (reference_stats(grads, mean_loss, 0.1), grads)
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step()
        mon.step(step, losses.detach())
    mon.flush()
    assert [r.step for r in records] == [0, 2]
    for r in records:
        ref, grads = want[r.step]
        for k, q in enumerate(trainscope.GRAD_VARIANCE_STATS):
            assert r.scalars[f"grad_variance/{q}"] == pytest.approx(float(ref[k]), rel=1e-7)
        for name, g in grads.items():  # per tensor
            one = reference_stats({name: g}, 1.0, 0.1)
            assert r.scalars[f"grad_variance/mean_gsnr/{name}"] == pytest.approx(float(one[0]), rel=1e-7)
    with pytest.raises(ValueError, match="grad_variance"):
        mon.measure_now(9, metrics=["grad_variance"])
    mon.close()
    # Without an optimizer, cabs is absent; another optimizer is refused at construction.
    records.clear()
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, grad_variance=True, per_tensor=False,
                             sinks=[records.append])
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    losses = F.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    mon.step(0, losses.detach())
    mon.flush()
    assert sorted(records[0].scalars) == ["grad_variance/early_stopping", "grad_variance/mean_gsnr"]
    mon.close()
    for bad in (torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)):
        with pytest.raises(ValueError, match="optimizer"):
            trainscope.Monitor(model, grad_variance=True, optimizer=bad)


@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
def test_projections_on_a_direction_match_per_sample_gradients(case):
    """PerSampleHooks.projections (gᵢ·d, alpha's input) on a random direction, a parameter left out."""
    _, model, (x, y), loss_of = case
    torch.manual_seed(5)
    with trainscope.PerSampleHooks(model) as hooks:
        model.zero_grad()
        loss_of(model, x, y).backward()
        d = {k: torch.randn_like(v) for k, v in model.named_parameters()}
        d.pop(next(iter(d)))  # missing: zero
        got = hooks.projections(d)
    g = per_sample_grads(model, loss_of, x, y)
    want = sum(g[k].reshape(g[k].shape[0], -1) @ d[k].reshape(-1) for k in d)
    assert got.dtype == torch.float64 and got.shape == (x.shape[0],)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
