"""trainscope.dead_units (SPEC.md §3 ``dead_units``, §5) against a float64 NumPy reference.

Layout, as in pytorch/extension-cpp: ``reference_*`` functions define what each result must be,
``sample_inputs(device)`` feeds ``torch.library.opcheck``; the numeric tests run on the CPU and,
where a GPU is present, on CUDA (the CUDA variants skip cleanly without one).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainscope  # noqa: F401  (loads the op library)
from trainscope.dead_units import (DeadUnitCounter, DeadUnits, active_counts, dead_units, dead_units_from_counts,
                                   observations_per_unit)
from conftest import requires_cuda

KINDS = ["relu", "tanh", "sigmoid"]

# ------------------------------------------------------------------------------------------------
# Reference (float64 NumPy), from the very values the library reads.


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def reference_active(a: np.ndarray, kind: str, eps: float) -> np.ndarray:
    """SPEC.md §3 in float64: ReLU a != 0; tanh |a| <= 1 - eps; sigmoid eps <= a <= 1 - eps."""
    with np.errstate(invalid="ignore"):
        if kind == "relu":
            return a != 0.0
        if kind == "tanh":
            return np.abs(a) <= 1.0 - eps
        return (a >= eps) & (a <= 1.0 - eps)


def reference_counts(acts: torch.Tensor, kind: str, eps: float) -> np.ndarray:
    a = to_numpy64(acts)
    a = a.reshape(a.shape[0], a.shape[1], -1)
    return reference_active(a, kind, eps).sum(axis=(0, 2)).astype(np.int64)


def reference_results(counts: np.ndarray, observations: int, tau: float):
    """(count, fraction, active_fraction) from per-unit counts, in float64."""
    with np.errstate(invalid="ignore", divide="ignore"):
        f = counts.astype(np.float64) / np.float64(observations)
        with np.errstate(invalid="ignore"):
            dead = int(np.count_nonzero(f <= tau))
        fraction = np.float64(dead) / np.float64(counts.size)
    return dead, fraction, f


def assert_results(d: DeadUnits, counts: np.ndarray, observations: int, tau: float, device) -> None:
    dev = torch.device(device).type
    assert d.count.dtype == torch.int64 and d.count.shape == ()
    assert d.fraction.dtype == torch.float64 and d.fraction.shape == ()
    assert d.active_fraction.dtype == torch.float64 and d.active_fraction.shape == (counts.size,)
    for t in (d.count, d.fraction, d.active_fraction):
        assert t.device.type == dev
    dead, fraction, f = reference_results(counts, observations, tau)
    np.testing.assert_array_equal(d.active_fraction.cpu().numpy(), f)  # NaN matches NaN
    assert int(d.count) == dead
    np.testing.assert_array_equal(d.fraction.cpu().numpy(), fraction)


# ------------------------------------------------------------------------------------------------
# Inputs


def make_acts(gen, shape, kind, dead=(), dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Activations of ``kind`` (drawn in float64 on the CPU, then rounded once) whose units in
    ``dead`` are never active: all zero (ReLU), saturated at ±1 or ±0.995 (tanh), 0.001 or 0.999
    (sigmoid)."""
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0).double()
    if kind == "relu":
        a, dead_values = torch.relu(z), torch.zeros(shape, dtype=torch.float64)
    elif kind == "tanh":
        mag = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, 1.0, 0.995).double()
        a, dead_values = torch.tanh(2.5 * z), sign * mag
    else:
        a, dead_values = torch.sigmoid(3.0 * z), torch.where(sign < 0, 0.001, 0.999).double()
    for u in dead:
        a[:, u] = dead_values[:, u]
    return a.to(dtype).to(device)


def threshold_values(eps: float) -> torch.Tensor:
    """Values on and next to every threshold (nextafter both ways, in float64 and float32), and the
    specials."""
    anchors = torch.tensor([eps, 1.0 - eps, -(1.0 - eps), -eps, 0.0, -0.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    vals = [anchors]
    for dt in (torch.float64, torch.float32):
        a = anchors.to(dt)
        up, down = a, a
        vals.append(a.double())
        for _ in range(3):
            up = torch.nextafter(up, torch.full_like(up, math.inf))
            down = torch.nextafter(down, torch.full_like(down, -math.inf))
            vals += [up.double(), down.double()]
    vals.append(torch.tensor([math.nan, math.inf, -math.inf, 1e-40, -1e-40], dtype=torch.float64))
    return torch.cat(vals)


def sample_inputs(device):
    """Argument tuples for every op: trainscope::active_counts, add_active_counts_, dead_units,
    dead_units_from_counts."""
    gen = torch.Generator().manual_seed(1234)
    x2 = make_acts(gen, (6, 5), "relu", dead=(1,), device=device)
    x4 = make_acts(gen, (3, 4, 2, 3), "tanh", dead=(0,), dtype=torch.bfloat16, device=device)
    xs = make_acts(gen, (4, 7), "sigmoid", dtype=torch.float64, device=device).t().contiguous().t()
    xg = make_acts(gen, (5, 3), "relu", device=device).requires_grad_()
    counts = torch.tensor([0, 3, 5, 1], dtype=torch.int64, device=device)
    return {
        "active_counts": [(x2, "relu", 0.01), (x4, "tanh", 0.05), (xs, "sigmoid", 0.1), (xg, "relu", 0.01)],
        "add_active_counts_": [(torch.zeros(5, dtype=torch.int64, device=device), x2, "relu", 0.01),
                               (torch.ones(4, dtype=torch.int64, device=device), x4, "tanh", 0.0)],
        "dead_units": [(x2, "relu", 0.01, 0.0), (x4, "tanh", 0.01, 0.5), (xs, "sigmoid", 0.5, 1.0),
                       (xg, "relu", 0.01, 0.1)],
        # No observations (NaN fractions) is left out: opcheck compares outputs without equal_nan.
        "dead_units_from_counts": [(counts, 5, 0.0), (counts, 5, 0.2), (counts, 7, 1.0)],
    }


# ------------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(50, 12), (4, 6, 5, 3), (3, 4097), (33, 1023), (9, 7, 3), (1, 1), (257, 1)])
def test_matches_reference(device, dtype, gen, kind, shape):
    acts = make_acts(gen, shape, kind, dead=(0,), dtype=dtype, device=device)
    for eps in (0.0, 0.01, 0.5):
        want = reference_counts(acts, kind, eps)
        got = active_counts(acts, kind, eps)
        assert got.dtype == torch.int64 and got.device.type == torch.device(device).type
        np.testing.assert_array_equal(got.cpu().numpy(), want)
        for tau in (0.0, 0.25):
            assert_results(dead_units(acts, kind, eps, tau), want, observations_per_unit(acts), tau, device)


@pytest.mark.parametrize("kind", KINDS)
def test_known_dead_units(device, dtype, gen, kind):
    acts = make_acts(gen, (64, 10), kind, dead=(0, 4, 9), dtype=dtype, device=device)
    d = dead_units(acts, kind)
    assert int(d.count) == 3
    assert float(d.fraction) == 0.3
    af = d.active_fraction.cpu()
    assert all(af[u] == 0 for u in (0, 4, 9)) and all(af[u] > 0 for u in (1, 2, 3, 5, 6, 7, 8))

    conv = make_acts(gen, (4, 8, 3, 5), kind, dead=(2, 5), dtype=dtype, device=device)
    d4 = dead_units(conv, kind)
    assert int(d4.count) == 2
    assert_results(d4, reference_counts(conv, kind, 0.01), 4 * 15, 0.0, device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1, 1 / 3, 0.5])
def test_values_at_the_thresholds(device, dtype, kind, eps):
    """Activity is decided as in float64 on the value as stored, also right at the thresholds."""
    acts = threshold_values(eps).to(dtype).to(device).reshape(-1, 1).expand(-1, 3)
    np.testing.assert_array_equal(active_counts(acts, kind, eps).cpu().numpy(), reference_counts(acts, kind, eps))


def test_nan_and_inf(device, dtype):
    acts = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 0.5, -0.0], dtype=dtype, device=device)[:, None]
    assert active_counts(acts, "relu").tolist() == [4]   # NaN != 0
    assert active_counts(acts, "tanh").tolist() == [3]   # NaN and ±inf saturated
    assert active_counts(acts, "sigmoid").tolist() == [1]


def test_non_contiguous(device, dtype, gen):
    for kind in KINDS:
        cases = [
            make_acts(gen, (9, 20), kind, dead=(2,), dtype=dtype, device=device).t(),
            make_acts(gen, (40, 18), kind, dead=(3,), dtype=dtype, device=device)[::2, 1::2],
            make_acts(gen, (3, 8, 4, 5), kind, dead=(3,), dtype=dtype, device=device).contiguous(
                memory_format=torch.channels_last),
            make_acts(gen, (1, 6), kind, dtype=dtype, device=device).expand(64, 6),
            make_acts(gen, (5, 6, 7), kind, dtype=dtype, device=device).permute(2, 1, 0),
        ]
        for acts in cases:
            want = reference_counts(acts, kind, 0.01)
            np.testing.assert_array_equal(active_counts(acts, kind).cpu().numpy(), want)
            assert_results(dead_units(acts, kind), want, observations_per_unit(acts), 0.0, device)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_equals_one_shot(device, dtype, gen, kind):
    for shape, dead in (((37, 16), (5, 9)), ((23, 5, 3, 4), (0, 2))):
        acts = make_acts(gen, shape, kind, dead=dead, dtype=dtype, device=device)
        counter = DeadUnitCounter(kind, eps=0.05, tau=0.1)
        for lo, hi in ((0, 7), (7, 7), (7, 20), (20, shape[0])):
            counter.add(acts[lo:hi])
        once = dead_units(acts, kind, 0.05, 0.1)
        streamed = counter.result()
        assert counter.observations == observations_per_unit(acts)
        assert counter.counts.device.type == torch.device(device).type
        assert torch.equal(streamed.count, once.count) and torch.equal(streamed.fraction, once.fraction)
        assert torch.equal(streamed.active_fraction, once.active_fraction)
        assert_results(streamed, reference_counts(acts, kind, 0.05), counter.observations, 0.1, device)

        counts = torch.zeros(shape[1], dtype=torch.int64, device=device)
        torch.ops.trainscope.add_active_counts_(counts, acts[:10], kind, 0.05)
        torch.ops.trainscope.add_active_counts_(counts, acts[10:], kind, 0.05)
        assert torch.equal(counts, counter.counts)
        assert torch.equal(dead_units_from_counts(counts, counter.observations, 0.1).active_fraction,
                           once.active_fraction)

        counter.reset()
        assert counter.observations == 0 and counter.counts is None
        with pytest.raises(RuntimeError, match="add"):
            counter.result()


def test_tau_is_inclusive(device, dtype):
    acts = torch.zeros(10, 11, dtype=torch.float64)
    for u in range(11):
        acts[:u, u] = 0.5  # unit u active on u of 10 rows: f_u = u / 10
    acts = acts.to(dtype).to(device)
    for tau in (0.0, 0.1, 0.3, 0.35, 0.99, 1.0):
        d = dead_units(acts, "relu", tau=tau)
        assert int(d.count) == sum(u / 10 <= tau for u in range(11))
        assert_results(d, np.arange(11), 10, tau, device)


def test_empty(device, dtype):
    d = dead_units(torch.zeros(0, 5, dtype=dtype, device=device))
    assert int(d.count) == 0 and float(d.fraction) == 0.0
    assert torch.isnan(d.active_fraction).all()
    d = dead_units(torch.zeros(4, 0, dtype=dtype, device=device))
    assert int(d.count) == 0 and math.isnan(float(d.fraction)) and d.active_fraction.shape == (0,)
    d = dead_units(torch.zeros(4, 3, 0, 2, dtype=dtype, device=device))
    assert int(d.count) == 0 and torch.isnan(d.active_fraction).all()
    assert active_counts(torch.zeros(0, 3, dtype=dtype, device=device)).tolist() == [0, 0, 0]


def test_deterministic(device, dtype, gen):
    acts = make_acts(gen, (301, 40, 3, 3), "relu", dead=(1,), dtype=dtype, device=device)
    first = dead_units(acts)
    for _ in range(3):
        again = dead_units(acts)
        assert torch.equal(again.count, first.count) and torch.equal(again.active_fraction, first.active_fraction)


def test_results_do_not_require_grad(device, gen):
    acts = make_acts(gen, (8, 5), "tanh", dead=(1,), device=device).requires_grad_()
    d = dead_units(acts, "tanh")
    for t in (d.count, d.fraction, d.active_fraction, active_counts(acts, "tanh")):
        assert not t.requires_grad and t.grad_fn is None
    counter = DeadUnitCounter("tanh")
    counter.add(acts * 2)  # an intermediate of the graph
    assert counter.result().active_fraction.grad_fn is None
    assert_results(d, reference_counts(acts, "tanh", 0.01), 8, 0.0, device)


def test_kind_is_case_insensitive(gen):
    acts = make_acts(gen, (6, 4), "sigmoid", dead=(0,))
    assert torch.equal(active_counts(acts, "Sigmoid"), active_counts(acts, "sigmoid"))
    assert torch.equal(dead_units(acts, "RELU").count, dead_units(acts, "relu").count)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile


@pytest.mark.parametrize("op", ["active_counts", "add_active_counts_", "dead_units", "dead_units_from_counts"])
def test_opcheck(device, op):
    for args in sample_inputs(device)[op]:
        torch.library.opcheck(getattr(torch.ops.trainscope, op).default, args)


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    x = make_acts(gen, (12, 6), "relu", dead=(2,))
    y = make_acts(gen, (4, 3, 2, 5), "tanh", dead=(1,))

    def step(x, y):
        d = dead_units(torch.relu(x - 0.1), "relu", tau=0.1)
        c = active_counts(y, "tanh", 0.05)
        counts = torch.zeros(3, dtype=torch.int64)
        torch.ops.trainscope.add_active_counts_(counts, y, "tanh", 0.05)
        e = dead_units_from_counts(counts, observations_per_unit(y), 0.2)
        return d.count, d.fraction, d.active_fraction, c, counts, e.count, e.active_fraction

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(step, backend=counter, fullgraph=True)(x, y)
    want = step(x, y)
    assert counter.frame_count == 1
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("trainscope.dead_units") for t in targets), targets
    for a, b in zip(got, want):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True, rtol=0, atol=0))


# ------------------------------------------------------------------------------------------------
# CUDA only: asynchrony, graph capture, more than 2^31 elements


@requires_cuda
def test_cuda_no_synchronisation():
    gen = torch.Generator().manual_seed(7)
    acts = make_acts(gen, (64, 32, 4, 4), "relu", dead=(3,), device="cuda")
    dead_units(acts)  # warm-up (allocator, lazy init)
    counter = DeadUnitCounter()
    counter.add(acts)
    counter.result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dead_units(acts, "relu", tau=0.1)
        active_counts(acts, "tanh")
        counter.add(acts)
        counter.add(acts[:3])
        counter.result()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(8)
    acts = make_acts(gen, (100, 48), "relu", dead=(1, 7), device="cuda")
    counts = torch.zeros(48, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dead_units(acts)
        torch.ops.trainscope.add_active_counts_(counts, acts, "relu", 0.01)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dead_units(acts, "relu", tau=0.05)
        counts.zero_()
        torch.ops.trainscope.add_active_counts_(counts, acts, "relu", 0.01)
    fresh = make_acts(gen, (100, 48), "relu", dead=(2, 5, 11), device="cuda")
    acts.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    want = reference_counts(fresh, "relu", 0.01)
    assert_results(out, want, 100, 0.05, "cuda")
    np.testing.assert_array_equal(counts.cpu().numpy(), want)


@requires_cuda
def test_cuda_more_than_2_to_31_elements():
    n, units = 2**31 // 1024 + 5, 1024
    if torch.cuda.mem_get_info()[0] < n * units * 2 + 2**31:
        pytest.skip("not enough free device memory")
    row = torch.linspace(-1.0, 1.0, units, device="cuda").to(torch.bfloat16)
    acts = row.expand(n, units).contiguous()
    acts[-1].zero_()  # the last row, past element 2^31
    got = active_counts(acts, "relu")
    want = (row != 0).to(torch.int64) * (n - 1)
    assert torch.equal(got, want)
    del acts


@requires_cuda
def test_counter_rejects_another_device():
    counter = DeadUnitCounter()
    counter.add(torch.zeros(3, 4, device="cuda"))
    with pytest.raises(ValueError, match="acts"):
        counter.add(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="counts"):
        torch.ops.trainscope.add_active_counts_(torch.zeros(4, dtype=torch.int64), torch.zeros(3, 4, device="cuda"),
                                                "relu", 0.01)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work

BAD_CASES = {
    "acts_1d": (lambda: dead_units(torch.zeros(5)), r"\bacts\b"),
    "acts_0d": (lambda: active_counts(torch.zeros(())), r"\bacts\b"),
    "acts_int": (lambda: dead_units(torch.ones(4, 3, dtype=torch.int32)), r"\bacts\b"),
    "acts_long": (lambda: active_counts(torch.ones(4, 3, dtype=torch.int64)), r"\bacts\b"),
    "acts_bool": (lambda: dead_units(torch.ones(4, 3, dtype=torch.bool)), r"\bacts\b"),
    "kind": (lambda: dead_units(torch.zeros(4, 3), "gelu"), r"\bkind\b"),
    "kind_counts": (lambda: active_counts(torch.zeros(4, 3), "elu"), r"\bkind\b"),
    "eps_negative": (lambda: dead_units(torch.zeros(4, 3), "tanh", -0.01), r"\beps\b"),
    "eps_large": (lambda: active_counts(torch.zeros(4, 3), "sigmoid", 0.51), r"\beps\b"),
    "eps_nan": (lambda: dead_units(torch.zeros(4, 3), "relu", math.nan), r"\beps\b"),
    "tau_negative": (lambda: dead_units(torch.zeros(4, 3), "relu", 0.01, -0.1), r"\btau\b"),
    "tau_large": (lambda: dead_units(torch.zeros(4, 3), "relu", 0.01, 1.5), r"\btau\b"),
    "tau_nan": (lambda: dead_units_from_counts(torch.zeros(3, dtype=torch.int64), 4, math.nan), r"\btau\b"),
    "counts_shape": (lambda: torch.ops.trainscope.add_active_counts_(torch.zeros(4, dtype=torch.int64),
                                                                     torch.zeros(4, 3), "relu", 0.01), r"\bcounts\b"),
    "counts_dtype": (lambda: torch.ops.trainscope.add_active_counts_(torch.zeros(3, dtype=torch.int32),
                                                                     torch.zeros(4, 3), "relu", 0.01), r"\bcounts\b"),
    "counts_float": (lambda: dead_units_from_counts(torch.zeros(3), 4), r"\bcounts\b"),
    "counts_2d": (lambda: dead_units_from_counts(torch.zeros(3, 1, dtype=torch.int64), 4), r"\bcounts\b"),
    "observations": (lambda: dead_units_from_counts(torch.zeros(3, dtype=torch.int64), -1), r"\bobservations\b"),
    "counter_kind": (lambda: DeadUnitCounter("softplus"), r"\bkind\b"),
    "counter_eps": (lambda: DeadUnitCounter("tanh", eps=0.7), r"\beps\b"),
    "counter_tau": (lambda: DeadUnitCounter(tau=-1.0), r"\btau\b"),
    "counter_1d": (lambda: DeadUnitCounter().add(torch.zeros(3)), r"\bacts\b"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(case):
    call, pattern = BAD_CASES[case]
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call()


def test_counter_later_batch_with_other_units():
    counter = DeadUnitCounter("relu")
    counter.add(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"\bacts\b.*5 units"):
        counter.add(torch.ones(3, 5))
    with pytest.raises(RuntimeError, match=r"\bacts\b"):
        counter.add(torch.ones(3, 4, dtype=torch.int32))
    assert counter.observations == 3 and counter.counts.tolist() == [3, 3, 3, 3]
    counter.add(torch.ones(2, 4, 3))  # spatial sizes may change: each position is one observation
    assert counter.observations == 9 and int(counter.result().count) == 0


def test_bad_counts_untouched():
    counts = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="counts"):
        torch.ops.trainscope.add_active_counts_(counts, torch.ones(4, 3), "relu", 0.01)
    assert counts.tolist() == [0, 0, 0, 0]
