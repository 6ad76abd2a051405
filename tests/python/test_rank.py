"""trainscope.rank against a float64 NumPy SVD reference (``numpy.linalg.svd(..., compute_uv=False)``)
on matrices Φ = U diag(σ) Vᵀ with random orthogonal U, V and controlled spectra (flat, geometric
decay to 1e-3, rank-deficient, zero), tall and wide, every dtype, both methods; batches and lists
against single calls; ``torch.library.opcheck`` on every op; ``torch.compile(fullgraph=True)``;
no autograd history on the results; bad input. CUDA variants skip without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainscope  # noqa: F401  (loads the op library)
from trainscope.rank import (
    RankMeasures,
    abs_approximate_rank,
    approximate_rank,
    effective_rank,
    rank_measures,
    rank_measures_from_grams,
    rank_measures_from_singular_values,
    stable_rank,
)
from conftest import requires_cuda

SPECTRA = ("flat", "geometric", "deficient", "zero")
SHAPES = ((80, 30), (30, 80), (40, 40))


def spectrum(kind: str, k: int) -> np.ndarray:
    i = np.arange(k, dtype=np.float64)
    if kind == "flat":
        return np.ones(k)
    if kind == "geometric":
        return 1e-3 ** (i / (k - 1))
    if kind == "deficient":
        return np.where(i < k // 3, 0.8 ** i, 0.0)
    return np.zeros(k)


def with_spectrum(n: int, m: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = min(n, m)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return (u * sigma[:k]) @ v.T


def reference(a: np.ndarray, prop: float = 0.99):
    """SPEC.md §3 from NumPy's float64 singular values."""
    s = np.linalg.svd(np.asarray(a, dtype=np.float64), compute_uv=False) if a.size else np.zeros(0)
    if s.sum() == 0:
        return 0.0, 0, 0, 0.0
    p = s / s.sum()
    p = p[p > 0]
    erank = math.exp(-(p * np.log(p)).sum())
    c2 = np.cumsum(s ** 2) / np.sum(s ** 2)
    c1 = np.cumsum(s) / s.sum()
    return erank, int(np.argmax(c2 >= prop)) + 1, int(np.argmax(c1 >= prop)) + 1, float((s ** 2).sum() / s[0] ** 2)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def check(r: RankMeasures, want, dtype, what=""):
    exact = dtype == torch.float64
    er, ar, aar, sr = want
    assert r.effective_rank.dtype == torch.float64 and r.stable_rank.dtype == torch.float64
    assert r.approximate_rank.dtype == torch.int64 and r.abs_approximate_rank.dtype == torch.int64
    got = float(r.effective_rank)
    # SPEC.md §5: effective rank 1e-3 relative; approximate ranks exact or within 1 where input
    # rounding leaves nearly equal σ at the cut.
    assert got == pytest.approx(er, rel=1e-9 if exact else 1e-3, abs=0), f"{what} effective_rank"
    assert float(r.stable_rank) == pytest.approx(sr, rel=1e-6, abs=0), f"{what} stable_rank"
    slack = 0 if exact else 1
    assert abs(int(r.approximate_rank) - ar) <= slack, f"{what} approximate_rank {int(r.approximate_rank)} vs {ar}"
    assert abs(int(r.abs_approximate_rank) - aar) <= slack, f"{what} abs_approximate_rank"


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("kind", SPECTRA)
def test_controlled_spectra_against_numpy(device, dtype, kind, method):
    for n, m in SHAPES:
        k = min(n, m)
        phi = torch.from_numpy(with_spectrum(n, m, spectrum(kind, k), seed=n * 7 + m)).to(device, dtype)
        want = reference(as_numpy(phi))  # of the input as given, its rounding included
        r = rank_measures(phi, method=method)
        assert r.effective_rank.shape == () and r.effective_rank.device == phi.device
        if kind == "zero":
            assert float(r.effective_rank) == 0 and int(r.approximate_rank) == 0
            assert int(r.abs_approximate_rank) == 0 and float(r.stable_rank) == 0
            continue
        check(r, want, dtype, f"{kind} {n}x{m} {method}")
        if kind == "deficient" and dtype == torch.float64:
            assert int(approximate_rank(phi, prop=1.0, method=method)) == k // 3


def test_single_measure_functions(device):
    phi = torch.from_numpy(with_spectrum(50, 20, spectrum("geometric", 20), 1)).to(device, torch.float32)
    r = rank_measures(phi, prop=0.9)
    assert torch.equal(effective_rank(phi), r.effective_rank)
    assert torch.equal(approximate_rank(phi, 0.9), r.approximate_rank)
    assert torch.equal(abs_approximate_rank(phi, 0.9), r.abs_approximate_rank)
    assert torch.equal(stable_rank(phi), r.stable_rank)
    s = torch.linalg.svdvals(phi.double())
    rs = rank_measures_from_singular_values(s, prop=0.9)
    assert float(rs.effective_rank) == pytest.approx(float(r.effective_rank), rel=1e-9)
    assert int(rs.approximate_rank) == int(r.approximate_rank)


def test_batch_and_list_equal_single_calls(device, dtype):
    mats = [torch.from_numpy(with_spectrum(30, 20, spectrum(k, 20), i)).to(device, dtype)
            for i, k in enumerate(("geometric", "flat", "deficient", "zero"))]
    b = rank_measures(torch.stack(mats))
    assert b.effective_rank.shape == (4,)
    for i, m in enumerate(mats):
        one = rank_measures(m)
        assert float(b.effective_rank[i]) == pytest.approx(float(one.effective_rank), rel=1e-10)
        assert int(b.approximate_rank[i]) == int(one.approximate_rank)
    shapes_list = [torch.from_numpy(with_spectrum(40, 12, spectrum("geometric", 12), 5)).to(device, dtype),
                   torch.from_numpy(with_spectrum(10, 70, spectrum("flat", 10), 6)).to(device, dtype),
                   torch.zeros(0, 9, device=device, dtype=dtype)]
    for method in ("gram", "svd"):
        lr = rank_measures(shapes_list, prop=0.95, method=method)
        assert lr.effective_rank.shape == (3,) and lr.effective_rank.device.type == torch.device(device).type
        for i, m in enumerate(shapes_list):
            one = rank_measures(m, prop=0.95, method=method)
            assert float(lr.effective_rank[i]) == pytest.approx(float(one.effective_rank), rel=1e-10)
            assert int(lr.abs_approximate_rank[i]) == int(one.abs_approximate_rank)
            assert float(lr.stable_rank[i]) == pytest.approx(float(one.stable_rank), rel=1e-10)
    # dicts and an empty list
    d = rank_measures({"a": shapes_list[0], "b": shapes_list[1]})
    assert d.effective_rank.shape == (2,)
    assert rank_measures([]).effective_rank.shape == (0,)


def test_from_grams(device):
    xs = [torch.from_numpy(with_spectrum(60, w, spectrum("geometric", w), w)).to(device) for w in (8, 25)]
    grams = [x.T @ x for x in xs]
    g = rank_measures_from_grams(grams)
    r = rank_measures(xs)
    assert torch.allclose(g.effective_rank, r.effective_rank, rtol=1e-9, atol=0)
    assert torch.equal(g.approximate_rank, r.approximate_rank)


def test_deterministic(device):
    phi = torch.from_numpy(with_spectrum(64, 48, spectrum("geometric", 48), 3)).to(device, torch.float32)
    for method in ("gram", "svd"):
        a = rank_measures([phi, phi[:, :7]], method=method)
        b = rank_measures([phi, phi[:, :7]], method=method)
        for x, y in zip((a.effective_rank, a.stable_rank, a.approximate_rank), (b.effective_rank, b.stable_rank, b.approximate_rank)):
            assert torch.equal(x, y)


def test_results_have_no_grad_fn(device):
    w = torch.nn.Parameter(torch.randn(20, 10, device=device))
    for r in (rank_measures(w), rank_measures([w, w[:5]]), rank_measures_from_singular_values(w[0].abs().sort(descending=True).values)):
        for t in (r.effective_rank, r.approximate_rank, r.abs_approximate_rank, r.stable_rank):
            assert t.grad_fn is None and not t.requires_grad


# ---------------------------------------------------------------------------------------------
# Numerical trouble is a value (SPEC.md §5): a matrix holding NaN or ±Inf gets NaN effective and
# stable rank and -1 for both approximate ranks; the other matrices of a batch or list are exact.

BAD_VALUES = [float("nan"), float("inf"), float("-inf")]
METHODS = ["gram", "svd"]


def assert_undefined(r: RankMeasures, i=None, what=""):
    pick = (lambda t: t) if i is None else (lambda t: t[i])
    assert math.isnan(float(pick(r.effective_rank))), f"{what} effective_rank {pick(r.effective_rank)}"
    assert math.isnan(float(pick(r.stable_rank))), f"{what} stable_rank {pick(r.stable_rank)}"
    assert int(pick(r.approximate_rank)) == -1, f"{what} approximate_rank {pick(r.approximate_rank)}"
    assert int(pick(r.abs_approximate_rank)) == -1, f"{what} abs_approximate_rank {pick(r.abs_approximate_rank)}"


def assert_same_measures(a: RankMeasures, b: RankMeasures, what=""):
    """The same measures: float ones to rounding (a padded solve against a solve of its own), the
    integer ones exactly."""
    for name in ("effective_rank", "stable_rank"):
        torch.testing.assert_close(getattr(a, name).reshape(-1), getattr(b, name).reshape(-1), rtol=1e-10, atol=0,
                                   msg=lambda m: f"{what} {name}: {m}")
    for name in ("approximate_rank", "abs_approximate_rank"):
        assert torch.equal(getattr(a, name).reshape(-1), getattr(b, name).reshape(-1)), (what, name)


def poisoned(x: torch.Tensor, bad: float, where=(3, 4)) -> torch.Tensor:
    x = x.clone()
    x[where] = bad
    return x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_nonfinite_matrix_is_undefined(device, dt, bad, method):
    for n, m in SHAPES:
        phi = torch.from_numpy(with_spectrum(n, m, spectrum("geometric", min(n, m)), n + m)).to(device, dt)
        r = rank_measures(poisoned(phi, bad), method=method)
        assert r.effective_rank.shape == () and r.effective_rank.device == phi.device
        assert_undefined(r, what=f"{n}x{m} {bad} {method}")
    # every single-measure function, and a matrix that is NaN throughout
    nan = torch.full((6, 4), float("nan"), device=device, dtype=dt)
    assert math.isnan(float(effective_rank(nan, method=method)))
    assert int(approximate_rank(nan, method=method)) == -1
    assert int(abs_approximate_rank(nan, method=method)) == -1
    assert math.isnan(float(stable_rank(nan, method=method)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_only_the_nonfinite_matrices_of_a_batch_or_list_are_undefined(device, bad, method):
    mats = [torch.from_numpy(with_spectrum(30, 20, spectrum(k, 20), i)).to(device, torch.float32)
            for i, k in enumerate(("geometric", "flat", "deficient", "zero"))]
    batch = torch.stack(mats)
    batch[1, 5, 7] = bad
    b = rank_measures(batch, method=method)
    assert_undefined(b, 1, f"batch {bad} {method}")
    for i in (0, 2, 3):
        assert_same_measures(RankMeasures(*(t[i] for t in (b.effective_rank, b.approximate_rank,
                                                           b.abs_approximate_rank, b.stable_rank))),
                             rank_measures(mats[i], method=method), f"batch matrix {i}")
    # A list of different shapes: the widest matrix bad (it sets the padded size), then a narrow one.
    shapes_list = [torch.from_numpy(with_spectrum(40, 12, spectrum("geometric", 12), 5)).to(device, torch.float64),
                   torch.from_numpy(with_spectrum(10, 70, spectrum("flat", 10), 6)).to(device, torch.float32),
                   torch.from_numpy(with_spectrum(25, 25, spectrum("deficient", 25), 7)).to(device, torch.float32),
                   torch.zeros(0, 9, device=device)]
    for bad_index in (2, 0):
        lst = list(shapes_list)
        lst[bad_index] = poisoned(lst[bad_index], bad)
        r = rank_measures(lst, method=method)
        assert_undefined(r, bad_index, f"list {bad} {method}")
        for i, m in enumerate(lst):
            if i != bad_index:
                one = rank_measures(m, method=method)
                assert_same_measures(RankMeasures(r.effective_rank[i], r.approximate_rank[i],
                                                  r.abs_approximate_rank[i], r.stable_rank[i]), one, f"list {i}")
                if m.numel():
                    check(one, reference(as_numpy(m)), m.dtype, f"list matrix {i}")


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_nonfinite_gram_is_undefined(device, bad):
    x = torch.from_numpy(with_spectrum(60, 8, spectrum("geometric", 8), 8)).to(device)
    good = x.T @ x
    for where in ((0, 0), (5, 2), (2, 5)):  # diagonal, lower and upper triangle
        g = poisoned(good, bad, where)
        r = rank_measures_from_grams([g])
        assert_undefined(r, 0, f"gram {bad} at {where}")
    full = torch.full((5, 5), bad, dtype=torch.float64, device=device)
    r = rank_measures_from_grams([good, full, torch.zeros(3, 3, dtype=torch.float64, device=device)])
    assert_undefined(r, 1, "gram")
    one = rank_measures_from_grams([good])
    assert_same_measures(RankMeasures(*(t[:1] for t in (r.effective_rank, r.approximate_rank,
                                                         r.abs_approximate_rank, r.stable_rank))), one, "good gram")
    assert float(r.effective_rank[2]) == 0.0 and int(r.approximate_rank[2]) == 0


def test_nonfinite_singular_values_are_undefined(device):
    s = torch.tensor([[3.0, 2.0, 1.0], [float("nan"), 1.0, 0.5], [float("inf"), 1.0, 0.0]], dtype=torch.float64,
                     device=device)
    r = rank_measures_from_singular_values(s)
    for i in (1, 2):
        assert_undefined(r, i, f"sigma row {i}")
    assert int(r.approximate_rank[0]) == 3


def test_overflowing_gram_is_undefined(device):
    """A finite float64 matrix whose Gram matrix overflows: numerical trouble, not an error."""
    x = torch.full((8, 5), 1e200, dtype=torch.float64, device=device)
    for method in METHODS:
        assert_undefined(rank_measures(x, method=method), what=method)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile

def sample_inputs(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 5, generator=g).to(device)
    b = torch.randn(4, 9, generator=g).to(device)
    return a, b


def test_opcheck(device):
    a, b = sample_inputs(device)
    ops = torch.ops.trainscope
    torch.library.opcheck(ops.rank_measures.default, ([a, b], 0.9, "gram"))
    torch.library.opcheck(ops.rank_measures.default, ([a, b], 0.99, "svd"))
    torch.library.opcheck(ops.rank_measures_batch.default, (a, 0.99, "gram"))
    torch.library.opcheck(ops.rank_measures_batch.default, (torch.stack([a, a * 2]), 0.5, "svd"))
    torch.library.opcheck(ops.rank_measures_from_singular_values.default,
                          (torch.linalg.svdvals(a.double()), 0.99))
    torch.library.opcheck(ops.rank_measures_from_singular_values.default,
                          (torch.linalg.svdvals(torch.stack([a, a]).double()), 0.9))
    torch.library.opcheck(ops.rank_measures_from_grams.default, ([(a.T @ a).double(), (b @ b.T).double()], 0.99))


def test_compile_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    a, b = sample_inputs("cpu")

    def step(a, b):
        r = rank_measures([a, b], prop=0.9)
        s = rank_measures(a, method="svd")
        return r.effective_rank, r.approximate_rank, s.stable_rank, effective_rank(torch.stack([a, a]))

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(step, backend=counter, fullgraph=True)(a, b)
    want = step(a, b)
    assert counter.frame_count == 1
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("trainscope.rank_measures") for t in targets), targets
    for x, y in zip(got, want):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("call, name", [
    (lambda: rank_measures(torch.ones(4)), "matrices"),
    (lambda: rank_measures(torch.ones(2, 2, 2, 2)), "matrices"),
    (lambda: rank_measures(torch.ones(4, 3, dtype=torch.int32)), "matrices"),
    (lambda: rank_measures([torch.ones(4, 3), torch.ones(2, 3, 4)]), "matrices"),
    (lambda: rank_measures(torch.ones(4, 3), prop=0.0), "prop"),
    (lambda: rank_measures(torch.ones(4, 3), prop=1.5), "prop"),
    (lambda: rank_measures(torch.ones(4, 3), method="eig"), "method"),
    (lambda: rank_measures_from_singular_values(torch.ones(2, 2, 2)), "sigma"),
    (lambda: rank_measures_from_grams([torch.ones(3, 4, dtype=torch.float64)]), "grams"),
])
def test_bad_input(call, name):
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        call()


@requires_cuda
def test_mixed_devices_cuda():
    with pytest.raises(RuntimeError, match=r"\bmatrices\b"):
        rank_measures([torch.ones(3, 2), torch.ones(3, 2, device="cuda")])


@requires_cuda
def test_cuda_gram_matches_svd_large():
    x = torch.from_numpy(with_spectrum(300, 200, spectrum("geometric", 200), 9)).to("cuda", torch.float32)
    g = rank_measures([x, x[:, :40]], method="gram")
    s = rank_measures([x, x[:, :40]], method="svd")
    assert torch.allclose(g.effective_rank, s.effective_rank, rtol=1e-8, atol=0)
    assert torch.equal(g.approximate_rank, s.approximate_rank)


@requires_cuda
def test_cuda_no_host_sync():
    """Neither route asks torch to synchronise: solver status stays on the device."""
    x = torch.from_numpy(with_spectrum(120, 50, spectrum("geometric", 50), 4)).to("cuda", torch.float32)
    for method in ("gram", "svd"):  # warm up handles and workspaces first
        rank_measures([x, x[:, :20]], method=method)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in ("gram", "svd"):
            rank_measures([x, x[:, :20]], method=method)
            rank_measures(x, method=method)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_nonfinite_input_no_host_sync():
    """A NaN or Inf matrix turns undefined on the device: no host synchronisation on either route
    (the Gram route both below and above the batched eigensolve's size), nor from a NaN Gram."""
    x = torch.from_numpy(with_spectrum(120, 50, spectrum("geometric", 50), 4)).to("cuda", torch.float32)
    bad = poisoned(x, float("nan"))
    inf = poisoned(x[:, :20], float("inf"))
    g = (x.T @ x).double()
    for method in METHODS:  # warm up handles and workspaces first
        rank_measures([x, x[:, :20]], method=method)
        rank_measures(x[:, :20], method=method)
    rank_measures_from_grams([g, g[:20, :20]])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = []
        for method in METHODS:
            results.append((rank_measures([bad, x[:, :20]], method=method), 0))
            results.append((rank_measures([x, inf], method=method), 1))
            results.append((rank_measures(inf, method=method), None))
        results.append((rank_measures_from_grams([poisoned(g, float("nan")), g[:20, :20]]), 0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for r, i in results:
        assert_undefined(r, i, "cuda")


@requires_cuda
@pytest.mark.parametrize("op", ["rank_measures", "rank_measures_from_grams"])
def test_cuda_graph_replay_of_nonfinite_input(op):
    """Captured once on finite input, replayed on input poisoned with NaN and Inf: the poisoned
    matrices read NaN/-1 and the others what an eager call gives (the Gram route's batched
    eigensolve, the one documented as capturable)."""
    gen = torch.Generator().manual_seed(11)

    def fresh():
        mats = [torch.randn(40, 12, generator=gen, dtype=torch.float64),
                torch.randn(9, 20, generator=gen, dtype=torch.float64)]
        return mats if op == "rank_measures" else [m.T @ m for m in mats]

    def call(inputs):
        r = rank_measures(inputs, prop=0.9) if op == "rank_measures" else rank_measures_from_grams(inputs, prop=0.9)
        return [r.effective_rank, r.approximate_rank, r.abs_approximate_rank, r.stable_rank]

    static = [m.to("cuda") for m in fresh()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(static)
    for poison in ([float("nan"), None], [None, float("inf")], [None, None]):
        for s, new, p in zip(static, fresh(), poison):
            s.copy_(new if p is None else poisoned(new, p, (1, 2)))
        graph.replay()
        got = RankMeasures(*(t.clone() for t in out))
        want = RankMeasures(*call(static))
        torch.cuda.synchronize()
        for i, p in enumerate(poison):
            if p is not None:
                assert_undefined(got, i, f"replay {poison}")
            else:  # the same kernels on the same input: the same bits
                assert float(got.effective_rank[i]) == float(want.effective_rank[i]), f"replay {poison}"
                assert float(got.stable_rank[i]) == float(want.stable_rank[i]), f"replay {poison}"
                assert int(got.approximate_rank[i]) == int(want.approximate_rank[i]), f"replay {poison}"
                assert int(got.abs_approximate_rank[i]) == int(want.abs_approximate_rank[i]), f"replay {poison}"
