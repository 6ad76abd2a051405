"""trainscope.hist2d.grad_hist2d (SPEC.md §2 ``grad_hist2d``, §4 per axis, §5) against a float64
NumPy reference.

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
from trainscope.hist2d import Hist2d, grad_hist2d, hist2d_bin_edges
from conftest import DTYPES, requires_cuda

# ------------------------------------------------------------------------------------------------
# Reference (float64 NumPy), from the very values the library reads.


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def reference_bins(x: np.ndarray, nbins: int, maxval: float) -> np.ndarray:
    """SPEC.md §4 for finite x: floor((clamp(x, -m, m) + m) / w), w = 2m/nbins in float64; x = m
    in the last bin."""
    width = 2.0 * maxval / nbins
    bins = np.floor((np.clip(x, -maxval, maxval) + maxval) / width).astype(np.int64)
    return np.clip(bins, 0, nbins - 1)


def reference_hist2d(per_sample_grads, params, nbins_grad=100, maxval_grad=0.05, nbins_param=100,
                     maxval_param=1.0):
    """(counts [nbins_grad, nbins_param] int64, nonfinite int): every (G_t[b, j], θ_t[j]) pair,
    left out of the counts (and counted apart) when either side is NaN or ±Inf."""
    counts = np.zeros(nbins_grad * nbins_param, dtype=np.int64)
    nonfinite = 0
    for g, p in zip(per_sample_grads, params):
        pv = to_numpy64(p).ravel()
        gv = to_numpy64(g).reshape(-1, pv.size) if pv.size else np.zeros((0, 0))
        if gv.size == 0:
            continue
        pb = np.broadcast_to(pv, gv.shape).ravel()
        gb = gv.ravel()
        ok = np.isfinite(gb) & np.isfinite(pb)
        nonfinite += int(np.count_nonzero(~ok))
        flat = reference_bins(gb[ok], nbins_grad, maxval_grad) * nbins_param + reference_bins(pb[ok], nbins_param,
                                                                                              maxval_param)
        counts += np.bincount(flat, minlength=counts.size).astype(np.int64)
    return counts.reshape(nbins_grad, nbins_param), nonfinite


def reference_edges(nbins: int, maxval: float) -> np.ndarray:
    return np.linspace(-maxval, maxval, nbins + 1)


# ------------------------------------------------------------------------------------------------
# Inputs


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """An int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def randn(gen, shape, scale, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal values drawn on the CPU in float64, then rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def random_shapes(gen) -> list:
    """Parameter shapes of a small model, drawn afresh: matrices and their biases, a norm weight, a
    3-D tensor, a conv kernel, a scalar, an empty tensor and one wider than the kernel's 2048-wide
    window."""
    d = randint(gen, 3, 12)
    return [(randint(gen, 5, 20), d), (d,), (d, d), (), (0,), (randint(gen, 1, 3), d, 2),
            (randint(gen, 2, 4), 2, 3, 3), (randint(gen, 2050, 4500),)]


def make_pairs(gen, shapes, batch, dtype=torch.float32, device="cpu", dtypes=None):
    """Per-sample gradients ~ N(0, 0.03²) (inside and outside ±0.05) and parameters ~ N(0, 0.6²)
    (inside and outside ±1); ``dtypes`` gives one dtype per pair."""
    dtypes = dtypes or [dtype] * len(shapes)
    params = [randn(gen, s, 0.6, dt, device) for s, dt in zip(shapes, dtypes)]
    grads = [randn(gen, (batch, *s), 0.03, dt, device) for s, dt in zip(shapes, dtypes)]
    return grads, params


def sample_inputs(device):
    """Argument tuples for ``trainscope::grad_hist2d``."""
    gen = torch.Generator().manual_seed(1234)
    g, p = make_pairs(gen, [(5, 3), (3,), (2, 3, 4)], 4, device=device)
    g64, p64 = make_pairs(gen, [(4, 4), (4,)], 2, torch.float64, device)
    gm, pm = make_pairs(gen, [(6, 2), (5,), (7,)], 3, device=device,
                        dtypes=[torch.bfloat16, torch.float32, torch.float16])
    ge, pe = make_pairs(gen, [(6, 2), (0,), (3, 0)], 2, device=device)
    p_grad = [x.detach().clone().requires_grad_() for x in p]  # model parameters require grad
    return [
        (g, p, 100, 0.05, 100, 1.0),
        (g, p, 7, 0.01, 13, 0.5),
        (g64, p64, 3, 0.5, 2, 2.0),
        (gm, pm, 10, 0.05, 20, 1.0),
        ([x.transpose(0, 1).contiguous().transpose(0, 1) for x in g[:1]], [p[0]], 4, 0.05, 4, 1.0),
        (ge, pe, 10, 0.05, 10, 1.0),
        (g, p_grad, 20, 0.05, 30, 1.0),
    ]


def assert_hist_matches(h: Hist2d, grads, params, *, device, nbins_grad=100, maxval_grad=0.05, nbins_param=100,
                        maxval_param=1.0):
    want_counts, want_nonfinite = reference_hist2d(grads, params, nbins_grad, maxval_grad, nbins_param,
                                                   maxval_param)
    dev = torch.device(device).type
    assert h.counts.dtype == torch.int64 and h.nonfinite.dtype == torch.int64
    assert h.counts.shape == (nbins_grad, nbins_param) and h.nonfinite.shape == ()
    assert h.counts.device.type == dev and h.nonfinite.device.type == dev
    got = h.counts.cpu().numpy()
    diff = np.argwhere(got != want_counts)
    assert diff.size == 0, (f"{len(diff)} bins differ, first {diff[:5].tolist()}: "
                            f"got {[int(got[tuple(i)]) for i in diff[:5]]}, "
                            f"want {[int(want_counts[tuple(i)]) for i in diff[:5]]}")
    assert int(h.nonfinite) == want_nonfinite
    total = sum(g.numel() for g in grads)
    assert int(h.counts.sum()) + int(h.nonfinite) == total
    assert_edges(h.grad_edges, nbins_grad, maxval_grad, device)
    assert_edges(h.param_edges, nbins_param, maxval_param, device)


def assert_edges(edges: torch.Tensor, nbins: int, maxval: float, device) -> None:
    assert edges.dtype == torch.float64 and edges.shape == (nbins + 1,)
    assert edges.device.type == torch.device(device).type
    np.testing.assert_allclose(edges.cpu().numpy(), reference_edges(nbins, maxval), rtol=1e-12, atol=1e-15 * maxval)
    assert edges[0].item() == -maxval and edges[-1].item() == maxval


# ------------------------------------------------------------------------------------------------
# Against the reference


def test_matches_reference(device, dtype, gen):
    shapes = random_shapes(gen)
    batch = randint(gen, 2, 6)
    grads, params = make_pairs(gen, shapes, batch, dtype, device)
    assert_hist_matches(grad_hist2d(grads, params), grads, params, device=device)


@pytest.mark.parametrize("nbins_grad,maxval_grad,nbins_param,maxval_param", [
    (1, 0.05, 1, 1.0), (7, 0.01, 13, 0.3), (40, 0.05, 50, 1.0), (200, 0.1, 100, 2.0), (3, 1e6, 2, 1e-3),
])
def test_bin_counts_and_ranges(device, gen, nbins_grad, maxval_grad, nbins_param, maxval_param):
    grads, params = make_pairs(gen, random_shapes(gen), 3, device=device)
    h = grad_hist2d(grads, params, nbins_grad, maxval_grad, nbins_param, maxval_param)
    assert_hist_matches(h, grads, params, device=device, nbins_grad=nbins_grad, maxval_grad=maxval_grad,
                        nbins_param=nbins_param, maxval_param=maxval_param)


def test_large_histogram(device, gen):
    """Over 48 KiB of counters (the kernel's global-atomics path) and over 2^20 bins (the CPU's)."""
    grads, params = make_pairs(gen, [(300, 7), (2100,)], 4, device=device)
    for nbg, nbp in [(128, 100), (2048, 1024)]:
        h = grad_hist2d(grads, params, nbins_grad=nbg, nbins_param=nbp)
        assert_hist_matches(h, grads, params, device=device, nbins_grad=nbg, nbins_param=nbp)


def test_mixed_dtypes_across_pairs(device, gen):
    shapes = random_shapes(gen)
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(shapes))]
    grads, params = make_pairs(gen, shapes, 3, device=device, dtypes=dtypes)
    assert_hist_matches(grad_hist2d(grads, params), grads, params, device=device)


def test_non_contiguous_inputs(device, dtype, gen):
    grads, params = make_pairs(gen, [(6, 9), (5, 7, 3), (40,)], 4, dtype, device)
    nc_params = [params[0].t().contiguous().t(), params[1].permute(2, 0, 1).contiguous().permute(1, 2, 0),
                 torch.stack([params[2], params[2]], 1).reshape(80)[::2]]
    nc_grads = [grads[0].permute(1, 0, 2).contiguous().permute(1, 0, 2),
                grads[1].transpose(1, 3).contiguous().transpose(1, 3),
                torch.stack([grads[2], grads[2]], 2).reshape(4, 80)[:, ::2]]
    for g, p, g0, p0 in zip(nc_grads, nc_params, grads, params):
        assert torch.equal(g, g0) and torch.equal(p, p0)
        assert not (g.is_contiguous() and p.is_contiguous())
    h = grad_hist2d(nc_grads, nc_params)
    assert_hist_matches(h, nc_grads, nc_params, device=device)
    assert torch.equal(h.counts, grad_hist2d(grads, params).counts)


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_any_batch_size_and_empty_pairs(device, dtype, gen, batch):
    """B = 1 (a tile of one sample) and B = 0 are fine: the histogram is a sum over samples."""
    grads, params = make_pairs(gen, [(3, 4), (0,), (2, 0), (5,)], batch, dtype, device)
    assert_hist_matches(grad_hist2d(grads, params), grads, params, device=device)


def test_only_empty_pairs(device, dtype):
    grads = [torch.empty(3, 0, dtype=dtype, device=device), torch.empty(3, 2, 0, dtype=dtype, device=device)]
    params = [torch.empty(0, dtype=dtype, device=device), torch.empty(2, 0, dtype=dtype, device=device)]
    h = grad_hist2d(grads, params, nbins_grad=5, nbins_param=4)
    assert h.counts.shape == (5, 4) and int(h.counts.abs().sum()) == 0 and int(h.nonfinite) == 0
    assert h.counts.device.type == torch.device(device).type


def test_tiles_of_samples_add_up(device, gen):
    grads, params = make_pairs(gen, [(4, 5), (5,), (2100,)], 7, device=device)
    whole = grad_hist2d(grads, params).counts
    tiles = sum(grad_hist2d([g[b0:b0 + 3] for g in grads], params).counts for b0 in range(0, 7, 3))
    assert torch.equal(tiles, whole)


def test_nonfinite_on_either_side(device, dtype, gen):
    grads, params = make_pairs(gen, [(10, 3), (17,)], 4, dtype, device)
    grads[0].view(-1)[[0, 5, 77]] = float("nan")
    grads[0].view(-1)[9] = float("inf")
    grads[1].view(-1)[[3, 20]] = float("-inf")
    params[0].view(-1)[4] = float("nan")  # a whole column of pair 0: B pairs left out
    params[1][16] = float("inf")
    grads[1][0, 16] = float("nan")         # both sides non-finite: counted once
    h = grad_hist2d(grads, params)
    assert_hist_matches(h, grads, params, device=device)
    assert int(h.nonfinite) == 4 + 4 + 2 + 4


def test_edge_values_exact(device, dtype):
    """Dyadic ranges, so edges are exact in every dtype: values on the edges, at ±maxval and outside."""
    g = torch.tensor([-0.0625, 0.0625, 0.0, -0.0078125, 0.0078125, 0.05, 10.0, -10.0], dtype=torch.float64)
    p = torch.tensor([-1.0, 1.0, 0.0, 0.25, -0.25, 0.5, 100.0, -100.0], dtype=torch.float64)
    grads = [torch.stack([g, g.flip(0), g.roll(3)]).to(dtype).to(device)]
    params = [p.to(dtype).to(device)]
    h = grad_hist2d(grads, params, nbins_grad=16, maxval_grad=0.0625, nbins_param=8, maxval_param=1.0)
    assert_hist_matches(h, grads, params, device=device, nbins_grad=16, maxval_grad=0.0625, nbins_param=8,
                        maxval_param=1.0)
    corner = grad_hist2d([torch.full((2, 1), 0.0625, dtype=dtype, device=device)],
                         [torch.full((1,), 1.0, dtype=dtype, device=device)],
                         nbins_grad=16, maxval_grad=0.0625, nbins_param=8, maxval_param=1.0)
    assert int(corner.counts[15, 7]) == 2 and int(corner.counts.sum()) == 2  # x = maxval: last bin


def test_hist2d_bin_edges(device):
    ge, pe = hist2d_bin_edges(10, 0.05, 4, 2.0, device=device)
    assert_edges(ge, 10, 0.05, device)
    assert_edges(pe, 4, 2.0, device)
    np.testing.assert_array_equal(pe.cpu().numpy(), np.array([-2.0, -1.0, 0.0, 1.0, 2.0]))
    assert torch.equal(ge.cpu(), trainscope.hist_bin_edges(10, 0.05))  # the 1-D histogram's edges


@pytest.mark.parametrize("nbins_grad,maxval_grad,nbins_param,maxval_param", [(100, 0.05, 100, 1.0), (7, 0.3, 3, 2.5)])
def test_bin_centres_fill_every_bin_once(device, nbins_grad, maxval_grad, nbins_param, maxval_param):
    ge, pe = hist2d_bin_edges(nbins_grad, maxval_grad, nbins_param, maxval_param, device=device)
    gc, pc = (ge[:-1] + ge[1:]) / 2, (pe[:-1] + pe[1:]) / 2
    grads = [gc[:, None].expand(nbins_grad, nbins_param)]  # sample b: every element in grad bin b
    h = grad_hist2d(grads, [pc], nbins_grad, maxval_grad, nbins_param, maxval_param)
    assert torch.equal(h.counts.cpu(), torch.ones(nbins_grad, nbins_param, dtype=torch.int64))


def test_stride_zero_inputs(device, dtype):
    """Expanded (stride-0) tensors, e.g. one gradient broadcast to every sample."""
    g = torch.tensor([0.01, -0.02, 0.3], dtype=dtype, device=device).expand(2**12, 3)
    p = torch.tensor([0.5], dtype=dtype, device=device).expand(3)
    h = grad_hist2d([g], [p])
    assert_hist_matches(h, [g], [p], device=device)
    assert int(h.counts.max()) == 2**12


def test_dict_inputs_pair_by_name(device, gen):
    """torch.func style: {name: tensor} dicts pair by name, whatever the order of params."""
    grads, params = make_pairs(gen, [(4, 3), (3,), (2, 2)], 3, device=device)
    names = ["w", "b", "v"]
    g = dict(zip(names, grads))
    p = {k: v for k, v in reversed(list(zip(names, params)))}
    p["frozen"] = torch.zeros(99, device=device)  # a parameter without a gradient is left out
    h = grad_hist2d(g, p)
    assert_hist_matches(h, grads, params, device=device)
    assert torch.equal(grad_hist2d(g, params).counts, h.counts)  # dict + list: by position
    assert torch.equal(grad_hist2d(grads[0], params[0]).counts, grad_hist2d(grads[:1], params[:1]).counts)


def test_torch_func_per_sample_gradients(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 5, device=device), torch.randint(0, 3, (6,), device=device)

    def loss_of_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    h = grad_hist2d(grads, params, maxval_grad=0.5)
    assert_hist_matches(h, list(grads.values()), [params[k] for k in grads], device=device, maxval_grad=0.5)
    assert int(h.counts.sum()) == 6 * sum(p.numel() for p in params.values())


def test_deterministic(device, dtype, gen):
    grads, params = make_pairs(gen, [(300, 20), (2500,), (9,)], 6, dtype, device)
    first = grad_hist2d(grads, params)
    for _ in range(3):
        again = grad_hist2d(grads, params)
        assert torch.equal(again.counts, first.counts) and torch.equal(again.nonfinite, first.nonfinite)


def test_results_do_not_require_grad(device, gen):
    params = [torch.nn.Parameter(randn(gen, s, 0.5, device=device)) for s in [(4, 3), (3,)]]
    grads = [randn(gen, (2, *p.shape), 0.04, device=device) for p in params]
    h = grad_hist2d(grads, params)
    assert not h.counts.requires_grad and not h.nonfinite.requires_grad
    assert_hist_matches(h, grads, params, device=device)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile


def test_opcheck(device):
    for args in sample_inputs(device):
        torch.library.opcheck(torch.ops.trainscope.grad_hist2d.default, args)


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    grads, params = make_pairs(gen, [(6, 5), (5,), (2, 3, 4)], 3)

    def step(grads, params):
        h = grad_hist2d(grads, params, nbins_grad=16, maxval_grad=0.1, nbins_param=8)
        named = grad_hist2d(dict(zip("abc", grads)), dict(zip("cba", reversed(params))))
        return h.counts, h.nonfinite, h.grad_edges, h.param_edges, named.counts

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(step, backend=counter, fullgraph=True)(grads, params)
    want = step(grads, params)
    assert counter.frame_count == 1
    targets = {n.target for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(str(t).startswith("trainscope.grad_hist2d") for t in targets), targets
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# CUDA only: asynchrony and graph capture


@requires_cuda
def test_cuda_no_synchronisation():
    gen = torch.Generator().manual_seed(7)
    grads, params = make_pairs(gen, [(64, 32), (32,), (3000,)], 8, device="cuda")
    grad_hist2d(grads, params)  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_hist2d(grads, params)
        grad_hist2d(grads, params, nbins_grad=300)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(8)
    shapes = [(64, 32), (32,), (3, 4, 5), (3000,)]
    grads, params = make_pairs(gen, shapes, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grad_hist2d(grads, params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grad_hist2d(grads, params)
    fresh_g, fresh_p = make_pairs(gen, shapes, 8, device="cuda")
    for dst, src in zip(grads + params, fresh_g + fresh_p):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert_hist_matches(out, fresh_g, fresh_p, device="cuda")


@requires_cuda
@pytest.mark.parametrize("where", ["per_sample_grads", "params"])
def test_mixed_devices_cuda(where):
    gen = torch.Generator().manual_seed(9)
    grads, params = make_pairs(gen, [(4, 3), (3,)], 2, device="cuda")
    lists = {"per_sample_grads": grads, "params": params}
    lists[where][1] = lists[where][1].cpu()
    with pytest.raises(RuntimeError, match=rf"{where}\[1\]"):
        grad_hist2d(grads, params)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work


def _pairs():
    gen = torch.Generator().manual_seed(99)
    return make_pairs(gen, [(4, 3), (3,), (2, 2, 2)], 3)


def _swap(lst, i, t):
    return lst[:i] + [t] + lst[i + 1:]


# (call on the lists of _pairs(), pattern the error message must match)
BAD_CASES = {
    "params_shorter": (lambda g, p: grad_hist2d(g, p[:2]), r"\bparams\b"),
    "grads_shorter": (lambda g, p: grad_hist2d(g[:1], p), "per_sample_grads"),
    "param_shape": (lambda g, p: grad_hist2d(g, _swap(p, 1, torch.zeros(4))), r"params\[1\]"),
    "grad_shape": (lambda g, p: grad_hist2d(_swap(g, 2, torch.zeros(3, 2, 2, 3)), p), r"per_sample_grads\[2\]"),
    "grad_without_batch": (lambda g, p: grad_hist2d(_swap(g, 1, torch.zeros(3)), p), r"per_sample_grads\[1\]"),
    "grad_0d": (lambda g, p: grad_hist2d([torch.zeros(())], [torch.zeros(())]), r"per_sample_grads\[0\]"),
    "batch_differs": (lambda g, p: grad_hist2d(_swap(g, 1, torch.zeros(4, 3)), p), r"per_sample_grads\[1\]"),
    "pair_dtype": (lambda g, p: grad_hist2d(_swap(g, 1, g[1].double()), p), r"per_sample_grads\[1\]"),
    "int_grad": (lambda g, p: grad_hist2d(_swap(g, 2, torch.ones(3, 2, 2, 2, dtype=torch.int32)), p),
                 r"per_sample_grads\[2\]"),
    "int_param": (lambda g, p: grad_hist2d(g, _swap(p, 0, torch.ones(4, 3, dtype=torch.int64))), r"params\[0\]"),
    "bool_param": (lambda g, p: grad_hist2d(g, _swap(p, 1, torch.ones(3, dtype=torch.bool))), r"params\[1\]"),
    "none_grad": (lambda g, p: grad_hist2d(_swap(g, 1, None), p), r"per_sample_grads\[1\]"),
    "none_param": (lambda g, p: grad_hist2d(g, _swap(p, 2, None)), r"params\[2\]"),
    "empty_lists": (lambda g, p: grad_hist2d([], []), "per_sample_grads"),
    "dict_missing_name": (lambda g, p: grad_hist2d({"a": g[0], "b": g[1]}, {"a": p[0]}), r"\bparams\b.*'b'"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_lists(case):
    call, pattern = BAD_CASES[case]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        call(*_pairs())


@pytest.mark.parametrize("name,value", [
    ("nbins_grad", 0), ("nbins_grad", -1), ("nbins_grad", 2**20 + 1),
    ("nbins_param", 0), ("nbins_param", 2**20 + 1),
    ("maxval_grad", 0.0), ("maxval_grad", -0.05), ("maxval_grad", math.nan), ("maxval_grad", math.inf),
    ("maxval_param", 0.0), ("maxval_param", math.nan), ("maxval_param", -math.inf),
])
def test_bad_options(name, value):
    g, p = _pairs()
    with pytest.raises(ValueError, match=name):  # checked in Python before the op
        grad_hist2d(g, p, **{name: value})
    with pytest.raises(RuntimeError, match=name):
        torch.ops.trainscope.grad_hist2d(g, p, **{"nbins_grad": 100, "maxval_grad": 0.05, "nbins_param": 100,
                                                  "maxval_param": 1.0, name: value})
    if name.startswith("nbins") and value < 1 or name.startswith("maxval"):
        with pytest.raises(ValueError, match=name):
            hist2d_bin_edges(**{name: value})


def test_too_many_bins_in_all():
    g, p = _pairs()
    with pytest.raises(ValueError, match=r"nbins_grad \* nbins_param.*2\^24"):
        grad_hist2d(g, p, nbins_grad=8192, nbins_param=4096)
    with pytest.raises(RuntimeError, match=r"nbins_grad \* nbins_param.*2\^24"):
        torch.ops.trainscope.grad_hist2d(g, p, 8192, 0.05, 4096, 1.0)
    assert grad_hist2d(g, p, nbins_grad=4096, nbins_param=4096).counts.numel() == 2**24


def test_bad_input_raises_before_any_work():
    """A bad pair at the end of the list must raise even though the first pairs are fine."""
    g, p = _pairs()
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        grad_hist2d(g, _swap(p, 2, p[2].reshape(4, 2)))
