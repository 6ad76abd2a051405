"""The normalised step length α (trainscope.alpha), checked against an exact rational re-derivation
of the noise-aware fit, against Cockpit v1.0.2's ``Alpha`` itself on the same model and batches,
and at its edges (NaN, zero update, a batch of one, the two-step bookkeeping)."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import trainscope
from trainscope.alpha import (
    VARIANCE_FLOOR,
    AlphaPoint,
    AlphaTracker,
    AlphaValue,
    alpha_from_fit,
    alpha_from_points,
    fit_quadratic,
)

B = 16
STEPS = 4
START = 2  # the start step: after two steps, momentum and Adam's moments are under way


def _net(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _batches(n: int = STEPS, b: int = B, dtype=torch.float64) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 5, generator=g, dtype=dtype), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def _optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=0.3, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05)
    raise AssertionError(kind)


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _train(kind: str, batches: list) -> list:
    """θ_s before each step s of a plain training loop (mean cross-entropy)."""
    model = _net()
    opt = _optimizer(kind, model.parameters())
    thetas = []
    for x, y in batches:
        thetas.append(_snapshot(model))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    thetas.append(_snapshot(model))
    return thetas


def _per_sample(theta: dict, x, y):
    """Per-sample losses [B] and gradients {name: [B, *shape]} at θ, float64, by torch.func."""
    net = _net()
    theta = {k: v.to(torch.float64) for k, v in theta.items()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(net, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads, losses = torch.vmap(torch.func.grad_and_value(loss_one), in_dims=(None, 0, 0))(
        theta, x.to(torch.float64), y)
    return losses, grads


def _project(grads: dict, d: dict) -> torch.Tensor:
    return sum((grads[k] * d[k]).flatten(1).sum(1) for k in d)


def _points(theta0: dict, theta1: dict, batch0, batch1):
    """Start and end points of the step θ0 → θ1, projected on its update, and that update."""
    d = {k: (theta1[k] - theta0[k]).to(torch.float64) for k in theta0}
    l0, g0 = _per_sample(theta0, *batch0)
    l1, g1 = _per_sample(theta1, *batch1)
    sq = sum(v.square().sum() for v in d.values())
    return AlphaPoint(l0, _project(g0, d), sq), AlphaPoint(l1, _project(g1, d)), d, g0


# ---------------------------------------------------------------- independent re-derivations


def _exact_moments(losses, projections, t: float):
    """Mean and ddof-1 variance of ℓᵢ and of pᵢ/t in exact rationals."""
    ls = [Fraction(float(v)) for v in losses]
    qs = [Fraction(float(v)) / Fraction(t) for v in projections]
    n = len(ls)
    f, df = sum(ls) / n, sum(qs) / n
    return f, sum((v - f) ** 2 for v in ls) / (n - 1), df, sum((v - df) ** 2 for v in qs) / (n - 1)


def _exact_alpha_of(t: float, fs, dfs, fvs, dvs) -> float:
    """α from the weighted normal equations ΦΛ⁻¹Φᵀμ = ΦΛ⁻¹y, solved in exact rationals."""
    t = Fraction(t)
    floor = Fraction(VARIANCE_FLOOR)
    var = [v if v != 0 else floor for v in list(fvs) + list(dvs)]
    rows = [(1, 0, 0), (1, t, t * t), (0, 1, 0), (0, 1, 2 * t)]
    ys = list(fs) + list(dfs)
    a = [[sum(r[i] * r[j] / v for r, v in zip(rows, var)) for j in range(3)]
         + [sum(r[i] * y / v for r, y, v in zip(rows, ys, var))] for i in range(3)]
    for c in range(3):  # Gauss-Jordan, exact
        p = next(r for r in range(c, 3) if a[r][c] != 0)
        a[c], a[p] = a[p], a[c]
        a[c] = [v / a[c][c] for v in a[c]]
        for r in range(3):
            if r != c:
                a[r] = [vr - a[r][c] * vc for vr, vc in zip(a[r], a[c])]
    mu = [a[i][3] for i in range(3)]
    if mu[2] < 0:
        return -1.0
    return float(2 * t / (-mu[1] / mu[2]) - 1)


def _exact_alpha(start: AlphaPoint, end: AlphaPoint) -> float:
    t = math.sqrt(float(start.update_sq_norm))
    f0, vf0, d0, vd0 = _exact_moments(start.losses, start.projections, t)
    f1, vf1, d1, vd1 = _exact_moments(end.losses, end.projections, t)
    return _exact_alpha_of(t, (f0, f1), (d0, d1), (vf0, vf1), (vd0, vd1))


def _lstsq_alpha(start: AlphaPoint, end: AlphaPoint) -> float:
    """α from numpy's least squares on the whitened system (Φᵀ/σ) μ = y/σ."""
    t = math.sqrt(float(start.update_sq_norm))
    obs = []
    for p in (start, end):
        q = p.projections.numpy() / t
        obs.append((p.losses.numpy().mean(), p.losses.numpy().var(ddof=1), q.mean(), q.var(ddof=1)))
    (f0, vf0, d0, vd0), (f1, vf1, d1, vd1) = obs
    phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]])
    sigma = np.sqrt([vf0, vf1, vd0, vd1])
    mu = np.linalg.lstsq(phi / sigma[:, None], np.array([f0, f1, d0, d1]) / sigma, rcond=None)[0]
    return -1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(b))


# ---------------------------------------------------------------- float64 reference


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_matches_exact_reference(kind):
    batches = _batches()
    thetas = _train(kind, batches)
    start, end, d, g0 = _points(thetas[START], thetas[START + 1], batches[START], batches[START + 1])
    if kind != "sgd":  # the update is not −lr·ḡ: the projections must be on the actual step
        lr = 0.3 if kind == "momentum" else 0.05
        sgd_dir = torch.cat([(-lr * g0[k].mean(0)).flatten() for k in d])
        assert not torch.allclose(torch.cat([v.flatten() for v in d.values()]), sgd_dir, rtol=0.05)
    alpha = alpha_from_points(start, end)
    assert alpha.dtype == torch.float64 and alpha.dim() == 0
    exact = _exact_alpha(start, end)
    assert math.isfinite(exact) and exact != -1.0
    assert _close(alpha.item(), exact, 1e-10), (alpha.item(), exact)
    assert _close(alpha.item(), _lstsq_alpha(start, end), 1e-10)


def test_fit_is_exact_with_a_zero_variance():
    """A zero variance becomes 1e-10: a weight 10¹⁰ times the others, exact here all the same."""
    rng = np.random.default_rng(3)
    for i in range(50):
        t = float(rng.uniform(0.01, 2))
        fs, dfs = rng.normal(size=2).tolist(), rng.normal(size=2).tolist()
        fvs, dvs = rng.uniform(0.01, 3, size=2).tolist(), rng.uniform(0.01, 3, size=2).tolist()
        (fvs if i % 2 else dvs)[i % 3 % 2] = 0.0
        got = alpha_from_fit(fit_quadratic(t, fs, dfs, fvs, dvs), t).item()
        exact = _exact_alpha_of(t, [Fraction(v) for v in fs], [Fraction(v) for v in dfs],
                                [Fraction(v) for v in fvs], [Fraction(v) for v in dvs])
        assert _close(got, exact, 1e-10), (i, got, exact)
    # Every variance zero (no spread at all): the floor makes it an unweighted fit, not 0/0.
    fs, dfs, zeros = [1.0, 0.9], [-1.0, 0.5], [0.0, 0.0]
    exact = _exact_alpha_of(0.1, [Fraction(v) for v in fs], [Fraction(v) for v in dfs], [0, 0], [0, 0])
    got = alpha_from_fit(fit_quadratic(0.1, fs, dfs, zeros, zeros), 0.1).item()
    assert _close(got, exact, 1e-10), (got, exact)
    def full(v):
        return torch.full((4,), v, dtype=torch.float64)
    flat = AlphaPoint(full(1.0), full(-0.1), 0.01)
    got = alpha_from_points(flat, AlphaPoint(full(0.9), full(0.05))).item()
    assert _close(got, exact, 1e-10), (got, exact)


def test_sign_convention_on_an_exact_quadratic():
    """Observations lying on L(x) = (x − m)²: α = t/m − 1 (−1/2 undershoots, 0 lands at the minimum,
    1 lands as high as it started, −1 for a concave fit)."""
    m = 0.4
    noise = torch.tensor([0.3, -0.1, -0.5, 0.3], dtype=torch.float64)  # zero-mean per-sample spread
    for t, expected in [(0.2, -0.5), (0.4, 0.0), (0.8, 1.0), (1.2, 2.0)]:
        def point(x):
            return AlphaPoint((x - m) ** 2 + noise, (2 * (x - m) + 2 * noise) * t, t * t)
        got = alpha_from_points(point(0.0), point(t)).item()
        assert abs(got - expected) < 1e-12, (t, got)
    concave = AlphaPoint(-torch.tensor([0.0, 0.1, -0.1]), torch.tensor([-0.1, -0.1, -0.1]), 0.01)
    concave_end = AlphaPoint(-torch.tensor([0.5, 0.6, 0.4]), torch.tensor([-1.0, -1.1, -0.9]) * 0.1)
    assert alpha_from_points(concave, concave_end).item() == -1.0


# ---------------------------------------------------------------- against Cockpit


def _cockpit_alpha(kind: str, batches: list, dtype) -> float:
    cockpit = pytest.importorskip("cockpit")
    backpack = pytest.importorskip("backpack")
    model = backpack.extend(_net(dtype))
    lossfn = backpack.extend(torch.nn.CrossEntropyLoss())
    individual = torch.nn.CrossEntropyLoss(reduction="none")
    quantity = cockpit.quantities.Alpha(lambda s: s == START)
    cp = cockpit.Cockpit(list(model.parameters()), quantities=[quantity])
    opt = _optimizer(kind, model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a batch of one: torch warns of its NaN variance
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            out = model(x.to(dtype))
            loss = lossfn(out, y)
            info = {"batch_size": x.shape[0], "individual_losses": individual(out, y), "loss": loss, "optimizer": opt}
            with cp(step, info=info):
                loss.backward(create_graph=cp.create_graph(step))
            opt.step()
    value = quantity.get_output()[START]
    return float("nan") if value is None else float(value)


@pytest.mark.parametrize("kind,dtype,rel", [
    ("sgd", torch.float64, 1e-12),       # Cockpit projects with BackPACK: d = −lr·Σ BatchGrad
    ("momentum", torch.float64, 1e-12),  # Cockpit stores params and BatchGrad: d = θ_{t+1} − θ_t
    ("adam", torch.float64, 1e-12),
    ("sgd", torch.float32, 1e-4),        # Cockpit's sums in float32, here float64 (measured < 1e-6)
    ("momentum", torch.float32, 1e-4),
])
def test_matches_cockpit(kind, dtype, rel):
    batches = _batches()
    ref = _cockpit_alpha(kind, batches, dtype)
    model = _net(dtype)
    opt = _optimizer(kind, model.parameters())
    thetas = []
    for x, y in batches[:START + 1]:  # the same loop, without Cockpit: the same θ_START, θ_START+1
        thetas.append(_snapshot(model))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
    thetas.append(_snapshot(model))
    batches64 = [(x.to(dtype).to(torch.float64), y) for x, y in batches]
    start, end, _, _ = _points(thetas[START], thetas[START + 1], batches64[START], batches64[START + 1])
    alpha = alpha_from_points(start, end).item()
    assert math.isfinite(ref)
    assert _close(alpha, ref, rel), (alpha, ref, abs(alpha - ref) / max(1, abs(ref)))


def test_batch_of_one_is_nan_like_cockpit():
    batches = _batches(b=1)
    assert math.isnan(_cockpit_alpha("sgd", batches, torch.float64))
    thetas = _train("sgd", batches)
    start, end, _, _ = _points(thetas[START], thetas[START + 1], batches[START], batches[START + 1])
    assert math.isnan(alpha_from_points(start, end).item())


def test_fit_matches_cockpit_functions():
    alpha_mod = pytest.importorskip("cockpit.quantities.alpha")
    rng = np.random.default_rng(7)
    n_concave = 0
    for _ in range(200):
        t = float(rng.uniform(0.01, 2))
        fs, dfs = rng.normal(size=2).tolist(), rng.normal(size=2).tolist()
        fvs, dvs = rng.uniform(0.01, 3, size=2).tolist(), rng.uniform(0.01, 3, size=2).tolist()
        mu_ref = alpha_mod._fit_quadratic(t, fs, dfs, fvs, dvs)
        mu = fit_quadratic(t, fs, dfs, fvs, dvs)
        assert np.allclose(mu.numpy(), mu_ref, rtol=1e-9, atol=1e-9)
        ref = alpha_mod._get_alpha(mu_ref, t)
        n_concave += ref == -1
        assert _close(alpha_from_fit(mu, t).item(), ref, 1e-9)
    assert n_concave > 10  # the concave branch was exercised
    # A NaN variance (a batch of one) gives a NaN fit in both.
    nan = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu_ref = alpha_mod._fit_quadratic(0.1, [1.0, 0.9], [-1.0, 0.5], [nan, nan], [nan, nan])
    assert np.isnan(alpha_mod._get_alpha(mu_ref, 0.1))
    assert torch.isnan(alpha_from_fit(fit_quadratic(0.1, [1.0, 0.9], [-1.0, 0.5], [nan, nan], [nan, nan]), 0.1))


# ---------------------------------------------------------------- edges


def _random_points(b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    start = AlphaPoint(torch.rand(b, generator=g, dtype=torch.float64) + 1,
                       -torch.rand(b, generator=g, dtype=torch.float64) * 0.1, torch.tensor(0.01, dtype=torch.float64))
    end = AlphaPoint(torch.rand(b, generator=g, dtype=torch.float64) + 0.5,
                     torch.randn(b, generator=g, dtype=torch.float64) * 0.1)
    return start, end


def test_numerical_trouble_is_nan():
    start, end = _random_points()
    assert math.isfinite(alpha_from_points(start, end).item())
    for which, field in [("start", "losses"), ("end", "losses"), ("start", "projections"), ("end", "projections")]:
        for bad in (float("nan"), float("inf")):
            s, e = _random_points()
            getattr(s if which == "start" else e, field)[3] = bad
            assert torch.isnan(alpha_from_points(s, e)), (which, field, bad)
    zero_start = AlphaPoint(start.losses, torch.zeros_like(start.projections), 0.0)
    assert torch.isnan(alpha_from_points(zero_start, AlphaPoint(end.losses, torch.zeros_like(end.projections))))
    for sq in (0.0, -1.0, float("nan"), float("inf")):
        assert torch.isnan(alpha_from_points(AlphaPoint(start.losses, start.projections, sq), end)), sq
    empty = AlphaPoint(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 0.01)
    assert torch.isnan(alpha_from_points(empty, end))


def test_degenerate_fit_is_nan():
    good = (0.1, [1.0, 0.9], [-1.0, 0.5], [1.0, 1.0], [1.0, 1.0])
    assert torch.isfinite(fit_quadratic(*good)).all()
    assert torch.isnan(fit_quadratic(0.0, *good[1:])).all()           # Cockpit: singular, logs −1
    assert torch.isnan(fit_quadratic(1e-310, *good[1:])).all()        # μ₂ overflows
    # Cockpit's normal equations are singular at t = 1e-200 (t² underflows): the fit is defined.
    assert torch.isfinite(fit_quadratic(1e-200, *good[1:])).all()
    inf = float("inf")
    assert torch.isnan(fit_quadratic(*good[:3], [inf, 1.0], good[4])).all()  # Cockpit: None
    assert torch.isnan(alpha_from_fit(torch.full((3,), float("nan")), 0.1))
    assert alpha_from_fit(torch.tensor([1.0, -1.0, -2.0]), 0.1).item() == -1.0  # concave
    # Batched: leading dimensions broadcast, one fit each.
    ts = torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64)
    f64 = torch.float64
    mu = fit_quadratic(ts, torch.tensor([[1.0, 0.9]] * 3, dtype=f64), torch.tensor([[-1.0, 0.5]] * 3, dtype=f64),
                       torch.ones(3, 2), torch.ones(3, 2))
    assert mu.shape == (3, 3)
    assert torch.equal(mu[0], fit_quadratic(*good)) and torch.isnan(mu[1]).all()


def test_bad_arguments_name_them():
    start, end = _random_points()
    with pytest.raises(TypeError, match="update_sq_norm"):
        alpha_from_points(AlphaPoint(start.losses, start.projections), end)
    with pytest.raises(ValueError, match="end.projections"):
        alpha_from_points(start, AlphaPoint(end.losses, end.projections[:, None]))
    with pytest.raises(ValueError, match="end: losses has 8 samples but projections has 7"):
        alpha_from_points(start, AlphaPoint(end.losses, end.projections[:7]))
    with pytest.raises(TypeError, match="start.losses"):
        alpha_from_points(AlphaPoint([1.0, 2.0], start.projections, 0.1), end)
    with pytest.raises(ValueError, match="dfs"):
        fit_quadratic(0.1, [1.0, 0.9], [-1.0], [1.0, 1.0], [1.0, 1.0])


def test_inputs_keep_no_graph_and_any_float_dtype():
    start, end = _random_points()
    ref = alpha_from_points(start, end)
    losses = start.losses.float().requires_grad_()
    got = alpha_from_points(AlphaPoint(losses, start.projections.float(), 0.01), (end.losses.float(), end.projections))
    assert not got.requires_grad and got.dtype == torch.float64
    assert abs(got.item() - ref.item()) < 1e-4


def test_device(device):
    start, end = _random_points()
    ref = alpha_from_points(start, end)
    on = AlphaPoint(start.losses.to(device), start.projections.to(device), start.update_sq_norm.to(device))
    got = alpha_from_points(on, AlphaPoint(end.losses.to(device), end.projections.to(device)))
    assert got.device.type == device
    assert abs(got.item() - ref.item()) <= 1e-12 * max(1, abs(ref.item()))


# ---------------------------------------------------------------- the two-step tracker


def test_tracker_pairs_start_and_end_steps():
    points = {s: _random_points(seed=s) for s in range(11)}
    tracker = AlphaTracker(trainscope.every(3))  # start points 0, 3, 6, 9
    values = []
    for step in range(10):
        assert tracker.is_end(step) == (step in (1, 4, 7))
        if tracker.is_end(step) and step != 4:  # step 4's end is skipped: step 3 yields nothing
            values.append(tracker.end(step, points[step][1].losses, points[step][1].projections))
        assert tracker.is_start(step) == (step % 3 == 0)
        s = points[step][0]
        assert tracker.start(step, s.losses, s.projections, s.update_sq_norm) == (step % 3 == 0)
        if step == 5:
            assert tracker.pending == ()  # step 3's start is dropped once its end step has passed
    assert tracker.pending == (9,)  # the run ended: no value for step 9
    assert [v.step for v in values] == [0, 6]
    for v in values:
        assert isinstance(v, AlphaValue)
        assert torch.equal(v.alpha, alpha_from_points(points[v.step][0], points[v.step + 1][1]))
    assert tracker.end(4, points[4][1].losses, points[4][1].projections) is None
    tracker.reset()
    assert tracker.pending == ()


@pytest.mark.parametrize("end_first", [True, False])
def test_tracker_consecutive_starts_either_order(end_first):
    points = {s: _random_points(seed=s) for s in range(4)}
    tracker = AlphaTracker(True)
    got = {}
    for step in range(4):
        s, e = points[step]
        if end_first:
            v = tracker.end(step, e.losses, e.projections)
            tracker.start(step, s.losses, s.projections, s.update_sq_norm)
        else:
            tracker.start(step, s.losses, s.projections, s.update_sq_norm)
            v = tracker.end(step, e.losses, e.projections)
        if v is not None:
            got[v.step] = v.alpha
    assert sorted(got) == [0, 1, 2]
    for step, a in got.items():
        assert torch.equal(a, alpha_from_points(points[step][0], points[step + 1][1]))


def test_tracker_schedules_and_bad_configuration():
    assert AlphaTracker(lambda s: s % 2 == 1).is_start(3)  # Cockpit's track_schedule
    assert AlphaTracker("every:5:0").is_start(10) and not AlphaTracker("every:5:0").is_start(11)
    assert not AlphaTracker(trainscope.at_steps([2])).is_start(3)
    for bad in (None, False, "every:0:0", "sometimes"):
        with pytest.raises(ValueError, match="schedule"):
            AlphaTracker(bad)
    with pytest.raises(TypeError, match="schedule"):
        AlphaTracker(3)
    with pytest.raises(TypeError, match="step"):
        AlphaTracker(True).start(1.5, torch.zeros(2), torch.zeros(2), 1.0)


# ---------------------------------------------------------------- in the Monitor


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_monitor_records_alpha_of_each_due_step_with_the_next(kind):
    """Monitor(alpha=every(2)): start points at steps 0 and 2, α recorded with steps 1 and 3,
    equal to α from float64 per-sample gradients of the same training run."""
    import trainscope

    batches = _batches()
    thetas = _train(kind, batches)
    model = _net()
    opt = _optimizer(kind, model.parameters())
    records = []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, alpha=trainscope.every(2),
                             sinks=[records.append])
    for step, (x, y) in enumerate(batches):
        assert mon.per_sample_hooks.enabled  # every step is a start or an end
        opt.zero_grad()
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step()
        mon.step(step, losses.detach())
    mon.flush()
    mon.close()
    got = {r.step: r.scalars["alpha"] for r in records if "alpha" in r.scalars}
    assert sorted(got) == [1, 3]
    for start in (0, 2):
        p0, p1, _, _ = _points(thetas[start], thetas[start + 1], batches[start], batches[start + 1])
        want = float(alpha_from_points(p0, p1))
        assert got[start + 1] == pytest.approx(want, rel=1e-9, abs=1e-12), (kind, start)


def test_monitor_alpha_needs_losses_and_is_never_measured_now():
    import trainscope

    model = _net()
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, alpha=True)
    x, y = _batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="per-sample losses"):
        mon.step(0)
    with pytest.raises(ValueError, match="alpha"):
        mon.measure_now(1, metrics=["alpha"])
    mon.close()


def test_opcheck():
    """The ops behind the fit (alpha_point_moments, fit_quadratic, alpha_from_fit) under
    torch.library.opcheck: schemas, fake kernels, no aliasing."""
    g = torch.Generator().manual_seed(9)
    losses, proj = torch.rand(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g)
    t = torch.tensor(0.3, dtype=torch.float64)
    pairs = [torch.rand(5, 2, generator=g, dtype=torch.float64) + 0.1 for _ in range(4)]
    ops = torch.ops.trainscope
    for op, args in [(ops.alpha_point_moments.default, (losses, proj, t)),
                     (ops.fit_quadratic.default, (t, *pairs)),
                     (ops.fit_quadratic.default, (torch.rand(5, dtype=torch.float64) + 0.1, *pairs)),
                     (ops.alpha_from_fit.default, (torch.randn(5, 3, generator=g, dtype=torch.float64), t))]:
        torch.library.opcheck(op, args)


def test_monitor_alpha_with_micro_batch_losses_describes_the_last_micro_batch():
    """Gradient accumulation: step() gets the losses of both micro-batches; the hooks hold the
    last one's forward pass, and α is that of the last micro-batches of the two steps."""
    import trainscope

    batches = _batches(4)  # two steps of two micro-batches
    model = _net()
    opt = _optimizer("sgd", model.parameters())
    records, thetas = [], []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, alpha=trainscope.at_steps([0]),
                             sinks=[records.append])
    for step in range(2):
        thetas.append(_snapshot(model))
        opt.zero_grad()
        parts = []
        for x, y in batches[2 * step:2 * step + 2]:
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            (losses.mean() / 2).backward()
            parts.append(losses.detach())
        opt.step()
        mon.step(step, parts)
    thetas.append(_snapshot(model))
    mon.flush()
    mon.close()
    (got,) = [r.scalars["alpha"] for r in records if "alpha" in r.scalars]
    p0, p1, _, _ = _points(thetas[0], thetas[1], batches[1], batches[3])
    assert got == pytest.approx(float(alpha_from_points(p0, p1)), rel=1e-9, abs=1e-12)
