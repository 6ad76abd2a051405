"""trainscope parameter-space metrics (SPEC.md §1, §4, §5) against a float64 NumPy reference.

Layout, as in pytorch/extension-cpp: ``reference_*`` functions define what each result must be,
``sample_inputs(device)`` feeds ``torch.library.opcheck``; the numeric tests run on the CPU and,
where a GPU is present, on CUDA (the CUDA variants skip cleanly without one).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainscope
from conftest import DTYPES, requires_cuda

METRICS = ("grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size", "weight_norm",
           "update_ratio")
GRAD_NORM, GRAD_MAGNITUDE, WEIGHT_MAGNITUDE, DISTANCE, UPDATE_SIZE, WEIGHT_NORM, UPDATE_RATIO = range(7)


# ------------------------------------------------------------------------------------------------
# Reference (float64 NumPy). Low-precision inputs are upcast from the very values the library reads.


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy().ravel()


def reference_hist1d(x: np.ndarray, nbins: int, maxval: float) -> np.ndarray:
    """SPEC.md §4: bin floor((clamp(x, -m, m) + m) / w), w = 2m/nbins, in float64; x = m in the
    last bin; NaN and ±Inf are left out."""
    x = x[np.isfinite(x)]
    width = 2.0 * maxval / nbins
    bins = np.floor((np.clip(x, -maxval, maxval) + maxval) / width).astype(np.int64)
    bins = np.clip(bins, 0, nbins - 1)
    return np.bincount(bins, minlength=nbins).astype(np.int64)


def reference_param_stats(grads=(), params=(), init_params=(), prev_params=(), *, histogram=True,
                          nbins=100, maxval=0.05, weights_matrices_only=False) -> dict:
    """Every output of ``trainscope::param_stats`` as float64/int64 NumPy arrays."""
    g = [to_numpy64(t) for t in grads]
    p = [to_numpy64(t) for t in params]
    p0 = [to_numpy64(t) for t in init_params]
    pp = [to_numpy64(t) for t in prev_params]
    n = max(len(g), len(p), len(p0), len(pp))
    per = np.full((n, len(METRICS)), np.nan)
    glob = np.full(len(METRICS), np.nan)

    def cat(arrays):
        return np.concatenate(arrays) if arrays else np.zeros(0)

    with np.errstate(invalid="ignore", divide="ignore"):
        if g:
            per[:, GRAD_NORM] = [np.sqrt(np.sum(x * x)) for x in g]
            per[:, GRAD_MAGNITUDE] = [np.sum(np.abs(x)) / x.size for x in g]
            glob[GRAD_NORM] = np.sqrt(np.sum(cat(g) ** 2))
            glob[GRAD_MAGNITUDE] = np.sum(np.abs(cat(g))) / cat(g).size
        if p:
            per[:, WEIGHT_MAGNITUDE] = [np.sum(np.abs(x)) / x.size for x in p]
            chosen = [x for x, t in zip(p, params) if t.dim() >= 2 or not weights_matrices_only]
            glob[WEIGHT_MAGNITUDE] = np.sum(np.abs(cat(chosen))) / cat(chosen).size
            # weight_norm: every tensor, whatever weights_matrices_only.
            per[:, WEIGHT_NORM] = [np.sqrt(np.sum(x * x)) for x in p]
            glob[WEIGHT_NORM] = np.sqrt(np.sum(cat(p) ** 2))
        if p0:
            per[:, DISTANCE] = [np.sqrt(np.sum((x - x0) ** 2)) for x, x0 in zip(p, p0)]
            glob[DISTANCE] = np.sqrt(np.sum((cat(p) - cat(p0)) ** 2))
        if pp:
            per[:, UPDATE_SIZE] = [np.sqrt(np.sum((x - xp) ** 2)) for x, xp in zip(p, pp)]
            glob[UPDATE_SIZE] = np.sqrt(np.sum((cat(p) - cat(pp)) ** 2))
            per[:, UPDATE_RATIO] = per[:, UPDATE_SIZE] / per[:, WEIGHT_NORM]
            glob[UPDATE_RATIO] = glob[UPDATE_SIZE] / glob[WEIGHT_NORM]

    nonfinite_per = np.array([np.count_nonzero(~np.isfinite(x)) for x in g] if g else [0] * n,
                             dtype=np.int64)
    nb = nbins if histogram else 0
    hist_per = np.zeros((n, nb), dtype=np.int64)
    if histogram and g:
        hist_per = np.stack([reference_hist1d(x, nbins, maxval) for x in g]).reshape(n, nb)
    return {
        "metrics": glob,
        "per_tensor": per,
        "nonfinite": np.int64(nonfinite_per.sum()),
        "nonfinite_per_tensor": nonfinite_per,
        "hist": hist_per.sum(axis=0).astype(np.int64) if n else np.zeros(nb, dtype=np.int64),
        "hist_per_tensor": hist_per,
    }


def reference_loss(losses: torch.Tensor) -> float:
    return float(np.mean(to_numpy64(losses)))


def expected_float_dtype(*lists) -> torch.dtype:
    tensors = [t for lst in lists for t in lst]
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def rtol_for(*lists) -> float:
    return 1e-12 if expected_float_dtype(*lists) == torch.float64 else 1e-5


# ------------------------------------------------------------------------------------------------
# Inputs


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """An int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def random_model_shapes(gen: torch.Generator) -> list:
    """Shapes of a small transformer-like model, drawn afresh: embedding, attention and MLP
    matrices with their biases, norm weights, a 3-D per-head tensor and a 4-D conv kernel. One
    tensor is long enough to span several of the library's chunks."""
    d = randint(gen, 4, 24)
    heads = randint(gen, 1, 4)
    ff = randint(gen, 2, 4) * d
    return [
        (randint(gen, 20, 60), d),              # token embedding
        (3 * d, d), (3 * d,),                   # qkv projection
        (heads, d, randint(gen, 2, 8)),         # per-head 3-D tensor
        (d, d), (d,),                           # output projection
        (d,), (d,),                             # layer norm
        (ff, d), (ff,), (d, ff),                # MLP
        (randint(gen, 2, 6), randint(gen, 1, 4), 3, 3),  # conv kernel
        (randint(gen, 17_000, 40_000),),        # a long flat tensor (crosses chunk boundaries)
    ]


def randn(gen, shape, scale, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal values drawn on the CPU in float64, then rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def make_lists(gen, shapes, dtype=torch.float32, device="cpu", dtypes=None) -> dict:
    """grads scaled so values fall inside and outside the default ±0.05; params, their values at
    tracking start (init) and before the last step (prev). ``dtypes`` gives one dtype per position."""
    dtypes = dtypes or [dtype] * len(shapes)
    grads, params, init, prev = [], [], [], []
    for shape, dt in zip(shapes, dtypes):
        p = randn(gen, shape, 0.5, torch.float64)
        grads.append(randn(gen, shape, 0.04, dt, device))
        params.append(p.to(dt).to(device))
        init.append((p + randn(gen, shape, 0.02, torch.float64)).to(dt).to(device))
        prev.append((p + randn(gen, shape, 0.002, torch.float64)).to(dt).to(device))
    return {"grads": grads, "params": params, "init_params": init, "prev_params": prev}


def sample_inputs(device, with_nan_outputs=False):
    """Argument tuples for ``trainscope::param_stats`` / ``param_stats_refresh_``.

    opcheck compares eager and traced outputs with ``assert_close`` and NaN != NaN there, so the
    samples whose outputs hold NaN (a list not given, an empty tensor) come separately."""
    gen = torch.Generator().manual_seed(1234)

    def lists(shapes, dtype=torch.float32, dtypes=None):
        d = make_lists(gen, shapes, dtype, device, dtypes)
        return d["grads"], d["params"], d["init_params"], d["prev_params"]

    g, p, p0, pp = lists([(5, 3), (3,), (2, 3, 4)])
    g64, p64, p064, pp64 = lists([(4, 4), (4,)], torch.float64)
    gm, pm, p0m, ppm = lists([(6, 2), (5,), (7,)], dtypes=[torch.bfloat16, torch.float32, torch.float16])
    ge, pe, p0e, ppe = lists([(6, 2), (0,), (3, 0)])
    t = [x[:1] for x in (g, p, p0, pp)]
    p_grad = [x.detach().clone().requires_grad_() for x in p]  # model parameters require grad
    if with_nan_outputs:
        return [
            (g, [], [], [], True, 7, 0.1, False),
            ([], p, p0, pp, False, 1, 1.0, False),
            ([], p, [], pp, True, 100, 0.05, False),
            (ge, pe, p0e, ppe, True, 10, 0.05, False),
        ]
    return [
        (g, p, p0, pp, True, 100, 0.05, False),
        (g, p, p0, pp, False, 1, 1.0, True),
        (g64, p64, p064, pp64, True, 3, 0.5, True),
        (gm, pm, p0m, ppm, True, 10, 0.05, False),
        tuple([x.t() for x in lst] for lst in t) + (True, 4, 0.05, False),
        (g, p_grad, p0, pp, True, 20, 0.05, False),
    ]


def sample_inputs_loss(device):
    gen = torch.Generator().manual_seed(4321)
    return [randn(gen, (n,), 1.0, dt, device).abs()
            for n, dt in [(8, torch.float32), (17, torch.float64), (33, torch.bfloat16), (5, torch.float16)]]


# ------------------------------------------------------------------------------------------------
# Checks


def assert_float_close(actual: torch.Tensor, expected, rtol: float, atol: float = 0.0) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected, rtol=rtol, atol=atol,
                               equal_nan=True)


def assert_int_equal(actual: torch.Tensor, expected) -> None:
    assert actual.dtype == torch.int64
    expected = torch.as_tensor(np.asarray(expected, dtype=np.int64))
    assert actual.shape == expected.shape
    assert torch.equal(actual.cpu(), expected), f"{actual.cpu().tolist()} != {expected.tolist()}"


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def assert_stats_match(stats: trainscope.ParamStats, ref: dict, *, device, float_dtype, rtol) -> None:
    n, nb = ref["hist_per_tensor"].shape
    dev = torch.device(device).type
    for name in ("metrics", "per_tensor", "nonfinite", "nonfinite_per_tensor", "hist", "hist_per_tensor"):
        assert getattr(stats, name).device.type == dev, name
    assert stats.metrics.dtype == float_dtype and stats.per_tensor.dtype == float_dtype
    assert stats.metrics.shape == (len(METRICS),) and stats.per_tensor.shape == (n, len(METRICS))
    assert stats.hist.shape == (nb,) and stats.hist_per_tensor.shape == (n, nb)
    assert_float_close(stats.metrics, ref["metrics"], rtol)
    assert_float_close(stats.per_tensor, ref["per_tensor"], rtol)
    assert_int_equal(stats.nonfinite, ref["nonfinite"])
    assert_int_equal(stats.nonfinite_per_tensor, ref["nonfinite_per_tensor"])
    assert_int_equal(stats.hist, ref["hist"])
    assert_int_equal(stats.hist_per_tensor, ref["hist_per_tensor"])


def finite_count(tensors) -> int:
    return sum(int(torch.isfinite(t).sum()) for t in tensors)


# ------------------------------------------------------------------------------------------------
# param_stats against the reference


def test_param_stats_matches_reference(device, dtype, gen):
    lists = make_lists(gen, random_model_shapes(gen), dtype, device)
    stats = trainscope.param_stats(**lists)
    ref = reference_param_stats(**lists)
    assert_stats_match(stats, ref, device=device, float_dtype=expected_float_dtype(*lists.values()),
                       rtol=rtol_for(*lists.values()))
    assert int(stats.hist.sum()) == finite_count(lists["grads"])
    assert stats.hist_per_tensor.sum(dim=1).tolist() == [int(torch.isfinite(t).sum()) for t in lists["grads"]]
    # Random data scaled to fill both edge bins (outliers) and the inside.
    assert stats.hist[0] > 0 and stats.hist[-1] > 0 and stats.hist[1:-1].sum() > 0


@pytest.mark.parametrize("nbins,maxval", [(1, 0.05), (7, 0.01), (64, 0.2), (1000, 0.003)])
@pytest.mark.parametrize("matrices_only", [False, True])
def test_param_stats_options(device, gen, nbins, maxval, matrices_only):
    lists = make_lists(gen, random_model_shapes(gen), torch.float32, device)
    stats = trainscope.param_stats(**lists, nbins=nbins, maxval=maxval,
                                   weight_magnitude_of="matrices" if matrices_only else "all")
    ref = reference_param_stats(**lists, nbins=nbins, maxval=maxval, weights_matrices_only=matrices_only)
    assert_stats_match(stats, ref, device=device, float_dtype=torch.float32, rtol=1e-5)


def test_param_stats_without_histogram(device, gen):
    lists = make_lists(gen, random_model_shapes(gen), torch.float32, device)
    stats = trainscope.param_stats(**lists, histogram=False)
    ref = reference_param_stats(**lists, histogram=False)
    assert_stats_match(stats, ref, device=device, float_dtype=torch.float32, rtol=1e-5)
    assert stats.hist.shape == (0,)


@pytest.mark.parametrize("given", [("grads",), ("params",), ("params", "init_params"),
                                   ("params", "prev_params"), ("grads", "params")])
def test_metrics_of_missing_inputs_are_nan(device, gen, given):
    lists = make_lists(gen, random_model_shapes(gen), torch.float32, device)
    lists = {k: v for k, v in lists.items() if k in given}
    stats = trainscope.param_stats(**lists)
    ref = reference_param_stats(**lists)
    assert_stats_match(stats, ref, device=device, float_dtype=torch.float32, rtol=1e-5)
    for j, name in enumerate(METRICS):
        assert math.isnan(float(stats[name])) == math.isnan(ref["metrics"][j]), name


def test_no_tensors_at_all_is_an_error():
    """Every list empty (or left out) is almost certainly a mistake, e.g. a model with no
    trainable parameters; the call says so instead of returning NaN for everything."""
    with pytest.raises(ValueError, match="no tensors"):
        trainscope.param_stats()
    with pytest.raises(ValueError, match="no tensors"):
        trainscope.param_stats(grads=[], params=[])
    with pytest.raises(ValueError, match="no tensors"):
        trainscope.grad_norm([])


def test_mixed_dtypes_across_positions(device, gen):
    shapes = random_model_shapes(gen)[:8]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(shapes))]
    lists = make_lists(gen, shapes, device=device, dtypes=dtypes)
    stats = trainscope.param_stats(**lists)
    ref = reference_param_stats(**lists)
    assert_stats_match(stats, ref, device=device, float_dtype=torch.float32, rtol=1e-5)


def test_float64_output_only_when_every_input_is_float64(device, gen):
    shapes = [(4, 3), (3,)]
    all64 = make_lists(gen, shapes, torch.float64, device)
    assert trainscope.param_stats(**all64).metrics.dtype == torch.float64
    mixed = make_lists(gen, shapes, device=device, dtypes=[torch.float64, torch.float32])
    assert trainscope.param_stats(**mixed).metrics.dtype == torch.float32
    assert trainscope.grad_norm(all64["grads"]).dtype == torch.float64
    assert trainscope.grad_norm(mixed["grads"]).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Strides and empty tensors


def non_contiguous_lists(gen, dtype, device) -> dict:
    """Each list a mix of transposed views, slices with a step, a channels-last 4-D tensor and a
    broadcast (stride-0) view; the grads/params/init/prev of one position differ in layout too."""
    d, ff = randint(gen, 3, 12), randint(gen, 13, 40)

    def views(scale, offset):
        base = randn(gen, (ff, d), scale, dtype, device) + offset
        big = randn(gen, (2 * ff + 1, 3 * d), scale, dtype, device) + offset
        conv = randn(gen, (4, 3, 5, 5), scale, dtype, device) + offset
        row = randn(gen, (1, d), scale, dtype, device) + offset
        return [
            base.t(),                                    # [d, ff], transposed
            big[::2, 1::3],                              # [ff+1, d], stepped slices
            conv.to(memory_format=torch.channels_last),  # 4-D, channels last
            conv.permute(0, 2, 3, 1)[..., ::2],          # 4-D, permuted and stepped
            row.expand(ff, d),                           # stride 0
            big[1::2, 0],                                # 1-D, stride 3d
        ]

    grads = views(0.04, 0.0)
    params = views(0.5, 0.0)
    # Contiguous copies of other values for init/prev at some positions, views at others.
    init = [t + 0.01 if i % 2 else (t + 0.01).contiguous() for i, t in enumerate(params)]
    prev = [(t - 0.001).contiguous() if i % 2 else t - 0.001 for i, t in enumerate(params)]
    init = [x.to(dtype) for x in init]
    prev = [x.to(dtype) for x in prev]
    assert not all(t.is_contiguous() for t in grads)
    return {"grads": grads, "params": params, "init_params": init, "prev_params": prev}


def test_non_contiguous_inputs(device, dtype, gen):
    lists = non_contiguous_lists(gen, dtype, device)
    stats = trainscope.param_stats(**lists, nbins=37)
    ref = reference_param_stats(**lists, nbins=37)
    assert_stats_match(stats, ref, device=device, float_dtype=expected_float_dtype(*lists.values()),
                       rtol=rtol_for(*lists.values()))


def test_empty_tensors_inside_list(device, dtype, gen):
    shapes = [(0,), (6, 5), (0, 4), (9,), (3, 0, 2), (2, 3, 4)]
    lists = make_lists(gen, shapes, dtype, device)
    stats = trainscope.param_stats(**lists, nbins=20)
    ref = reference_param_stats(**lists, nbins=20)
    assert_stats_match(stats, ref, device=device, float_dtype=expected_float_dtype(*lists.values()),
                       rtol=rtol_for(*lists.values()))
    for i in (0, 2, 4):  # empty: sums are 0, means are 0/0
        row = stats.per_tensor[i].cpu()
        assert row[GRAD_NORM] == 0 and row[DISTANCE] == 0 and row[UPDATE_SIZE] == 0
        assert torch.isnan(row[GRAD_MAGNITUDE]) and torch.isnan(row[WEIGHT_MAGNITUDE])
        assert int(stats.hist_per_tensor[i].sum()) == 0
    # The global values skip the empty tensors entirely.
    nonempty = {k: [t for t in v if t.numel()] for k, v in lists.items()}
    assert_float_close(stats.metrics, reference_param_stats(**nonempty, nbins=20)["metrics"],
                       rtol_for(*lists.values()))


def test_list_of_only_empty_tensors(device, dtype):
    shapes = [(0,), (0, 3), (2, 0)]
    lists = {k: [torch.empty(s, dtype=dtype, device=device) for s in shapes]
             for k in ("grads", "params", "init_params", "prev_params")}
    stats = trainscope.param_stats(**lists)
    ref = reference_param_stats(**lists)
    assert_stats_match(stats, ref, device=device, float_dtype=expected_float_dtype(*lists.values()),
                       rtol=1e-12)
    m = stats.metrics.cpu()
    assert m[GRAD_NORM] == 0 and m[DISTANCE] == 0 and m[UPDATE_SIZE] == 0
    assert torch.isnan(m[GRAD_MAGNITUDE]) and torch.isnan(m[WEIGHT_MAGNITUDE])
    assert int(stats.hist.sum()) == 0 and int(stats.nonfinite) == 0


# ------------------------------------------------------------------------------------------------
# The single-metric functions


def test_single_metric_functions(device, dtype, gen):
    lists = make_lists(gen, random_model_shapes(gen), dtype, device)
    g, p, p0, pp = lists["grads"], lists["params"], lists["init_params"], lists["prev_params"]
    ref = reference_param_stats(g, p, p0, pp)
    ref_matrices = reference_param_stats(params=p, weights_matrices_only=True)
    rtol, fdt = rtol_for(g, p), expected_float_dtype(g, p)
    cases = {
        "grad_norm": (lambda pt: trainscope.grad_norm(g, per_tensor=pt), ref, GRAD_NORM),
        "grad_magnitude": (lambda pt: trainscope.grad_magnitude(g, per_tensor=pt), ref, GRAD_MAGNITUDE),
        "weight_magnitude": (lambda pt: trainscope.weight_magnitude(p, per_tensor=pt), ref, WEIGHT_MAGNITUDE),
        "weight_magnitude_matrices": (
            lambda pt: trainscope.weight_magnitude(p, per_tensor=pt, matrices_only=True),
            ref_matrices, WEIGHT_MAGNITUDE),
        "distance": (lambda pt: trainscope.distance(p, p0, per_tensor=pt), ref, DISTANCE),
        "update_size": (lambda pt: trainscope.update_size(p, pp, per_tensor=pt), ref, UPDATE_SIZE),
        "weight_norm": (lambda pt: trainscope.weight_norm(p, per_tensor=pt), ref, WEIGHT_NORM),
        "update_ratio": (lambda pt: trainscope.update_ratio(p, pp, per_tensor=pt), ref, UPDATE_RATIO),
    }
    for name, (fn, r, col) in cases.items():
        total, per = fn(False), fn(True)
        assert total.shape == () and per.shape == (len(g),), name
        assert total.dtype == fdt and per.dtype == fdt, name
        assert total.device.type == torch.device(device).type, name
        assert_float_close(total, r["metrics"][col], rtol)
        assert_float_close(per, r["per_tensor"][:, col], rtol)
    # matrices_only changes only the global value; biases and norms really are excluded.
    assert not torch.equal(trainscope.weight_magnitude(p).cpu(),
                           trainscope.weight_magnitude(p, matrices_only=True).cpu())
    assert_bitwise_equal(trainscope.weight_magnitude(p, per_tensor=True),
                         trainscope.weight_magnitude(p, per_tensor=True, matrices_only=True))


def test_weight_magnitude_matrices_only_without_matrices_is_nan(device, gen):
    p = [randn(gen, (5,), 1.0, device=device), randn(gen, (3,), 1.0, device=device)]
    assert torch.isnan(trainscope.weight_magnitude(p, matrices_only=True)).item()
    assert not torch.isnan(trainscope.weight_magnitude(p)).item()


def test_update_ratio_of_an_sgd_step_and_of_zero_weights(device):
    """update_ratio = update_size / weight_norm: an SGD step moves θ by lr·g, so per tensor it is
    lr·‖g‖/‖θ‖. Weights that are zero and did not move give 0/0 = NaN (IEEE), and that tensor's
    NaN does not spill into the global ratio, which divides the global sums."""
    gen = torch.Generator().manual_seed(7)
    before = [torch.randn(6, 4, generator=gen, dtype=torch.float64).to(device),
              torch.randn(4, generator=gen, dtype=torch.float64).to(device)]
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device) for t in before]
    lr = 1e-3
    after = [b - lr * g for b, g in zip(before, grads)]
    per = trainscope.update_ratio(after, before, per_tensor=True).cpu()
    want = torch.stack([lr * g.norm() / a.norm() for g, a in zip(grads, after)]).cpu()
    torch.testing.assert_close(per, want, rtol=1e-12, atol=0)
    total = trainscope.update_ratio(after, before).cpu()
    want_total = lr * torch.cat([g.reshape(-1) for g in grads]).norm() / torch.cat([a.reshape(-1) for a in after]).norm()
    torch.testing.assert_close(total, want_total.cpu(), rtol=1e-12, atol=0)
    # A zero tensor that did not move: NaN for that tensor only.
    zero = [torch.zeros(3, dtype=torch.float64, device=device)]
    per = trainscope.update_ratio(after + zero, before + [z.clone() for z in zero], per_tensor=True).cpu()
    assert torch.isnan(per[2]) and torch.isfinite(per[:2]).all()
    assert torch.isfinite(trainscope.update_ratio(after + zero, before + [z.clone() for z in zero])).item()
    # weight_norm counts every tensor, whatever weights_matrices_only does to weight_magnitude.
    stats = trainscope.param_stats(params=after, weight_magnitude_of="matrices")
    torch.testing.assert_close(stats["weight_norm"].cpu(), trainscope.weight_norm(after).cpu())
    with pytest.raises(ValueError, match="prev_params is empty"):
        trainscope.update_ratio(after, [])


def test_single_tensor_and_generator_arguments(device, gen):
    t = randn(gen, (7, 3), 0.04, device=device)
    ref = reference_param_stats([t])
    assert_float_close(trainscope.grad_norm(t), ref["metrics"][GRAD_NORM], 1e-5)
    assert_float_close(trainscope.grad_norm(x for x in [t, t]), math.sqrt(2) * ref["metrics"][GRAD_NORM], 1e-5)
    assert_int_equal(trainscope.grad_hist1d(t), ref["hist"])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_grad_hist1d_and_nonfinite_count(device, dtype, gen, per_tensor):
    shapes = random_model_shapes(gen)
    grads = make_lists(gen, shapes, dtype, device)["grads"]
    grads[1].view(-1)[::7] = float("nan")
    grads[4].view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    nbins, maxval = randint(gen, 2, 150), 0.01 * randint(gen, 1, 8)
    ref = reference_param_stats(grads, nbins=nbins, maxval=maxval)
    hist = trainscope.grad_hist1d(grads, nbins=nbins, maxval=maxval, per_tensor=per_tensor)
    counts = trainscope.nonfinite_count(grads, per_tensor=per_tensor)
    assert hist.device.type == counts.device.type == torch.device(device).type
    if per_tensor:
        assert_int_equal(hist, ref["hist_per_tensor"])
        assert_int_equal(counts, ref["nonfinite_per_tensor"])
    else:
        assert_int_equal(hist, ref["hist"])
        assert_int_equal(counts, ref["nonfinite"])
        assert int(hist.sum()) == finite_count(grads)
        assert int(counts) == sum(t.numel() for t in grads) - finite_count(grads)


def test_nonfinite_counts_only_grads(device, gen):
    g = [randn(gen, (4, 4), 0.04, device=device)]
    p = [randn(gen, (4, 4), 1.0, device=device)]
    p[0][0, 0] = float("nan")
    p[0][1, 1] = float("inf")
    stats = trainscope.param_stats(g, p, [p[0].clone()], [p[0].clone()])
    assert int(stats.nonfinite) == 0 and stats.nonfinite_per_tensor.tolist() == [0]
    assert not torch.isnan(stats["grad_norm"]).item()
    assert torch.isnan(stats["weight_magnitude"]).item() or torch.isinf(stats["weight_magnitude"]).item()


@pytest.mark.parametrize("n", [1, 8, 40_000])
def test_loss(device, dtype, gen, n):
    losses = randn(gen, (n,), 1.0, torch.float64).abs().add(2.0).to(dtype).to(device)
    out = trainscope.loss(losses)
    assert out.shape == () and out.device.type == torch.device(device).type
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # 40,000 float16 losses near 3 sum past float16's largest value: accumulation is float32 or wider.
    assert_float_close(out, reference_loss(losses), 1e-12 if dtype == torch.float64 else 1e-5)
    stats = trainscope.param_stats(grads=[randn(gen, (3,), 0.1, device=device)], losses=losses)
    assert_bitwise_equal(stats.loss, out)
    assert_bitwise_equal(stats.as_dict()["loss"], out)


# ------------------------------------------------------------------------------------------------
# ParamStats accessors and hist_bin_edges


def test_param_stats_accessors(device, gen):
    lists = make_lists(gen, [(3, 2), (2,), (4, 1, 2)], torch.float32, device)
    stats = trainscope.param_stats(**lists)
    assert trainscope.METRICS == METRICS
    for j, name in enumerate(METRICS):
        assert_bitwise_equal(stats[name], stats.metrics[j])
        assert_bitwise_equal(stats.per_tensor_metric(name), stats.per_tensor[:, j])
    with pytest.raises(KeyError, match="loss_norm"):
        stats["loss_norm"]
    with pytest.raises(KeyError, match="bogus"):
        stats.per_tensor_metric("bogus")

    d = stats.as_dict(["w", "b", "conv"])
    assert "loss" not in d
    assert set(d) == {m for m in METRICS} | {f"{m}/{n}" for m in METRICS for n in ("w", "b", "conv")} \
        | {"nonfinite_grads"}
    for j, m in enumerate(METRICS):
        assert_bitwise_equal(d[m], stats.metrics[j])
        for i, n in enumerate(("w", "b", "conv")):
            assert d[f"{m}/{n}"].shape == ()
            assert_bitwise_equal(d[f"{m}/{n}"], stats.per_tensor[i, j])
    assert_bitwise_equal(d["nonfinite_grads"], stats.nonfinite)
    assert set(stats.as_dict()) == set(METRICS) | {f"{m}/{i}" for m in METRICS for i in range(3)} \
        | {"nonfinite_grads"}
    with pytest.raises(ValueError, match="names"):
        stats.as_dict(["w", "b"])


@pytest.mark.parametrize("nbins,maxval", [(100, 0.05), (1, 1.0), (7, 0.3)])
def test_hist_bin_edges(device, nbins, maxval):
    edges = trainscope.hist_bin_edges(nbins, maxval, device=device)
    assert edges.dtype == torch.float64 and edges.shape == (nbins + 1,)
    assert edges.device.type == torch.device(device).type
    expected = np.linspace(-maxval, maxval, nbins + 1)
    assert_float_close(edges, expected, 1e-12, atol=1e-15 * maxval)
    assert edges[0].item() == -maxval and edges[-1].item() == maxval
    # Bin centres land one in each bin.
    centres = ((edges[:-1] + edges[1:]) / 2).to(device)
    assert_int_equal(trainscope.grad_hist1d([centres], nbins, maxval), np.ones(nbins))


# ------------------------------------------------------------------------------------------------
# Histogram edges (SPEC.md §4)

SPECIALS = [-3.0, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 3.0,
            float("nan"), float("inf"), -float("inf")]


def test_hist_edge_values_exact(device, dtype):
    """maxval 1, 4 bins of width 0.5 (all exact in every dtype): ±maxval, bin edges, outliers,
    NaN and ±Inf."""
    x = torch.tensor(SPECIALS, dtype=dtype, device=device)
    hist = trainscope.grad_hist1d([x], nbins=4, maxval=1.0)
    assert_int_equal(hist, [3, 2, 2, 4])
    assert_int_equal(trainscope.nonfinite_count([x]), 3)
    assert int(hist.sum()) == 11
    assert_int_equal(hist, reference_hist1d(to_numpy64(x), 4, 1.0))
    stats = trainscope.param_stats(grads=[x], nbins=4, maxval=1.0)
    assert_int_equal(stats.nonfinite_per_tensor, [3])
    assert torch.isnan(stats["grad_norm"]).item()


def test_hist_exact_maxval_goes_to_last_bin(device, dtype):
    m = 0.5
    x = torch.tensor([m, -m, m, m], dtype=dtype, device=device)
    for nbins in (1, 2, 3, 10, 100):
        expected = np.zeros(nbins, dtype=np.int64)
        expected[0] += 1
        expected[-1] += 3
        assert_int_equal(trainscope.grad_hist1d(x, nbins=nbins, maxval=m), expected)


def test_hist_single_bin(device, dtype, gen):
    x = randn(gen, (50,), 1.0, dtype, device)
    x[::5] = float("nan")
    x[1] = float("inf")
    assert_int_equal(trainscope.grad_hist1d(x, nbins=1, maxval=0.05), [finite_count([x])])


def test_hist_outliers_pile_into_edge_bins(device, dtype):
    x = torch.cat([torch.full((1000,), 10.0), torch.full((500,), -7.0), torch.full((3,), 0.02)])
    x = x.to(dtype).to(device)
    hist = trainscope.grad_hist1d(x, nbins=5, maxval=0.05)
    assert_int_equal(hist, [500, 0, 0, 3, 1000])


@pytest.mark.parametrize("nbins,maxval", [(100, 0.05), (10, 0.3), (3, 1e-3), (1000, 2.5), (7, 0.1)])
def test_hist_bin_edges_float64_values(device, nbins, maxval):
    """Values on every bin edge and one ulp either side, binned exactly as the float64 formula."""
    k = np.arange(nbins + 1, dtype=np.float64)
    width = 2.0 * maxval / nbins
    edges = np.concatenate([k * width - maxval, np.linspace(-maxval, maxval, nbins + 1)])
    x = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf),
                        [maxval, -maxval, np.nextafter(maxval, np.inf), np.nextafter(-maxval, -np.inf)]])
    t = torch.from_numpy(x).to(device)
    assert_int_equal(trainscope.grad_hist1d(t, nbins, maxval), reference_hist1d(x, nbins, maxval))


def test_hist_bin_edges_in_each_dtype(device, dtype):
    """Bin edges rounded to the input dtype (so a little inside or outside) and their neighbours one
    ulp either side, binned after the exact upcast to float64."""
    nbins, maxval = 40, 0.05
    edges = torch.linspace(-maxval, maxval, nbins + 1, dtype=torch.float64).to(dtype)
    bits = edges.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[edges.element_size()])
    x = torch.cat([edges, (bits + 1).view(dtype), (bits - 1).view(dtype)]).to(device)
    assert_int_equal(trainscope.grad_hist1d(x, nbins, maxval), reference_hist1d(to_numpy64(x), nbins, maxval))


def test_hist_counts_are_exact_past_2_pow_24(device):
    """One bin gets 2^24 + 3 elements: a float32 counter would stop at 2^24 (SPEC.md §4)."""
    n = 2**24 + 3
    x = torch.zeros(1, dtype=torch.bfloat16, device=device).expand(n)  # stride 0: read via a copy
    hist = trainscope.grad_hist1d(x, nbins=4, maxval=1.0)
    assert_int_equal(hist, [0, 0, n, 0])


# ------------------------------------------------------------------------------------------------
# refresh_prev


def test_refresh_prev(device, dtype, gen):
    lists = make_lists(gen, random_model_shapes(gen), dtype, device)
    ref = reference_param_stats(**lists)  # from the old prev
    old_prev = [t.clone() for t in lists["prev_params"]]
    stats = trainscope.param_stats(**lists, refresh_prev=True)
    assert_stats_match(stats, ref, device=device, float_dtype=expected_float_dtype(*lists.values()),
                       rtol=rtol_for(*lists.values()))
    assert any(not torch.equal(a, b) for a, b in zip(old_prev, lists["params"]))
    for prev, p in zip(lists["prev_params"], lists["params"]):
        assert prev.dtype == p.dtype and torch.equal(prev, p)
    # The next step measures from the refreshed prev: no update since.
    assert float(trainscope.update_size(lists["params"], lists["prev_params"])) == 0.0


def test_update_size_refresh_prev(device, dtype, gen):
    lists = make_lists(gen, random_model_shapes(gen), dtype, device)
    p, pp = lists["params"], lists["prev_params"]
    ref = reference_param_stats(params=p, prev_params=pp)
    total = trainscope.update_size(p, pp, refresh_prev=True)
    assert_float_close(total, ref["metrics"][UPDATE_SIZE], rtol_for(p))
    assert all(torch.equal(a, b) for a, b in zip(pp, p))

    pp2 = make_lists(gen, [tuple(t.shape) for t in p], dtype, device)["prev_params"]
    ref2 = reference_param_stats(params=p, prev_params=pp2)
    per = trainscope.update_size(p, pp2, per_tensor=True, refresh_prev=True)
    assert_float_close(per, ref2["per_tensor"][:, UPDATE_SIZE], rtol_for(p))
    assert all(torch.equal(a, b) for a, b in zip(pp2, p))


def test_refresh_prev_non_contiguous(device, dtype, gen):
    """prev given as views into larger buffers: the views take the new values, the rest of each
    buffer is left alone."""
    d, ff = randint(gen, 3, 10), randint(gen, 11, 30)
    params = [randn(gen, (d, ff), 0.5, dtype, device), randn(gen, (ff, d), 0.5, dtype, device),
              randn(gen, (2, 3, 4, 5), 0.5, dtype, device)]
    buf_t = randn(gen, (ff, d), 0.5, dtype, device)
    buf_step = randn(gen, (2 * ff, 2 * d), 0.5, dtype, device)
    buf_perm = randn(gen, (2, 4, 5, 3), 0.5, dtype, device)
    prev = [buf_t.t(), buf_step[::2, 1::2], buf_perm.permute(0, 3, 1, 2)]
    keep_step = buf_step.clone()
    ref = reference_param_stats(params=params, prev_params=prev)
    stats = trainscope.param_stats(params=params, prev_params=prev, refresh_prev=True)
    assert_float_close(stats.per_tensor_metric("update_size"), ref["per_tensor"][:, UPDATE_SIZE], rtol_for(params))
    for v, p in zip(prev, params):
        assert torch.equal(v, p)
    assert torch.equal(buf_t.t(), params[0])
    assert torch.equal(buf_perm.permute(0, 3, 1, 2), params[2])
    untouched = torch.ones_like(buf_step, dtype=torch.bool)
    untouched[::2, 1::2] = False
    assert torch.equal(buf_step[untouched], keep_step[untouched])


def test_refresh_op_mutates_only_prev(device, gen):
    lists = make_lists(gen, [(6, 4), (4,)], torch.float32, device)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    torch.ops.trainscope.param_stats_refresh_(lists["grads"], lists["params"], lists["init_params"],
                                              lists["prev_params"], True, 10, 0.05, False)
    for k in ("grads", "params", "init_params"):
        assert all(torch.equal(a, b) for a, b in zip(lists[k], before[k])), k
    assert all(torch.equal(a, b) for a, b in zip(lists["prev_params"], lists["params"]))


# ------------------------------------------------------------------------------------------------
# Determinism, parameters that require grad


def test_deterministic(device, dtype, gen):
    shapes = random_model_shapes(gen) + [(300, 257)]
    lists = make_lists(gen, shapes, dtype, device)
    a = trainscope.param_stats(**lists)
    b = trainscope.param_stats(**lists)
    for name in ("metrics", "per_tensor", "nonfinite", "nonfinite_per_tensor", "hist", "hist_per_tensor"):
        assert_bitwise_equal(getattr(a, name), getattr(b, name))
    assert_bitwise_equal(trainscope.grad_norm(lists["grads"]), trainscope.grad_norm(lists["grads"]))


def test_model_parameters(device, gen):
    """The documented usage: a model's parameters (requiring grad) and their .grad."""
    torch.manual_seed(randint(gen, 0, 2**31))
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]
    prev = [p.detach().clone() for p in params]
    model(torch.randn(5, 12, device=device)).square().mean().backward()
    with torch.no_grad():
        for p in params:
            p.sub_(0.1 * p.grad)
    grads = [p.grad for p in params]
    ref = reference_param_stats(grads, params, init, prev)
    stats = trainscope.param_stats(grads=grads, params=params, init_params=init, prev_params=prev,
                                   refresh_prev=True)
    assert_stats_match(stats, ref, device=device, float_dtype=torch.float32, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(prev, params))


def test_results_do_not_require_grad(device, gen):
    """Metrics are measurements, not part of the model's graph: given parameters that require
    grad, no result may carry a grad_fn (a running sum of logged metrics would otherwise keep one
    autograd graph per step alive, and backward through it hits PyTorch's deprecated
    "autograd kernel was not registered" fallback)."""
    params = [torch.nn.Parameter(randn(gen, s, 0.5, device=device)) for s in [(4, 3), (3,)]]
    grads = [randn(gen, tuple(p.shape), 0.04, device=device) for p in params]
    init = [p.detach().clone() for p in params]
    prev = [p.detach().clone() for p in params]
    stats = trainscope.param_stats(grads, params, init, prev)
    for name in ("metrics", "per_tensor", "hist"):
        assert not getattr(stats, name).requires_grad, name
    for fn in (lambda: trainscope.weight_magnitude(params), lambda: trainscope.distance(params, init),
               lambda: trainscope.update_size(params, prev, refresh_prev=True)):
        assert not fn().requires_grad


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile


OPCHECK_WITHOUT_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op", ["param_stats", "param_stats_refresh_"])
def test_opcheck_param_stats(device, op):
    overload = getattr(torch.ops.trainscope, op).default
    for args in sample_inputs(device):
        torch.library.opcheck(overload, args)
    # NaN outputs: every check but the eager-vs-traced output comparison (NaN != NaN there);
    # test_compile_* compare those bitwise.
    for args in sample_inputs(device, with_nan_outputs=True):
        if op == "param_stats_refresh_" and not args[3]:
            continue  # refreshing needs prev_params
        torch.library.opcheck(overload, args, test_utils=OPCHECK_WITHOUT_AOT)


def test_opcheck_loss(device):
    for losses in sample_inputs_loss(device):
        torch.library.opcheck(torch.ops.trainscope.loss.default, (losses,))


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    lists = make_lists(gen, [(6, 5), (5,), (2, 3, 4)], torch.float32)

    def step(grads, params, init_params, prev_params):
        stats = trainscope.param_stats(grads, params, init_params, prev_params, nbins=16, maxval=0.1)
        return (stats.metrics, stats.per_tensor_metric("grad_norm"), stats.hist, stats.nonfinite,
                trainscope.grad_norm(grads), trainscope.grad_hist1d(grads, nbins=8))

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = compiled(*lists.values())
    want = step(*lists.values())
    assert counter.frame_count == 1
    targets = {n.target for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(str(t).startswith("trainscope.param_stats") for t in targets), targets
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b)


def test_compile_refresh_prev(gen):
    torch._dynamo.reset()
    lists = make_lists(gen, [(6, 5), (5,)], torch.float32)
    params, prev = lists["params"], lists["prev_params"]
    expected = reference_param_stats(params=params, prev_params=prev)["metrics"][UPDATE_SIZE]

    def step(params, prev_params):
        return trainscope.update_size(params, prev_params, refresh_prev=True)

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(params, prev)
    assert_float_close(got, expected, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(prev, params))


# ------------------------------------------------------------------------------------------------
# CUDA only: asynchrony and graph capture (DESIGN.md: nothing in the step waits for the GPU)


@requires_cuda
def test_cuda_no_synchronisation():
    gen = torch.Generator().manual_seed(7)
    lists = make_lists(gen, [(64, 32), (32,), (3, 4, 5, 6)], torch.float32, "cuda")
    trainscope.param_stats(**lists)  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainscope.param_stats(**lists, refresh_prev=True)
        trainscope.grad_norm(lists["grads"])
        trainscope.loss(lists["grads"][1])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(8)
    shapes = [(64, 32), (32,), (3, 4, 5, 6), (20_000,)]
    static = make_lists(gen, shapes, torch.float32, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        trainscope.param_stats(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = trainscope.param_stats(**static)
    fresh = make_lists(gen, shapes, torch.float32, "cuda")
    for k in static:
        for dst, src in zip(static[k], fresh[k]):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert_stats_match(out, reference_param_stats(**fresh), device="cuda", float_dtype=torch.float32,
                       rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work


def _lists(device="cpu", n=3):
    gen = torch.Generator().manual_seed(99)
    return make_lists(gen, [(4, 3), (3,), (2, 2, 2)][:n], torch.float32, device)


def _swap(lst, i, t):
    """A copy of ``lst`` with ``lst[i]`` replaced by ``t``."""
    return lst[:i] + [t] + lst[i + 1:]


# (call on the lists of _lists(), pattern the error message must match)
BAD_LIST_CASES = {
    "params_shorter": (lambda L: trainscope.param_stats(L["grads"], L["params"][:2]), r"\bparams\b"),
    "init_shorter": (lambda L: trainscope.param_stats(params=L["params"], init_params=L["init_params"][:1]),
                     "init_params"),
    "prev_longer": (lambda L: trainscope.update_size(L["params"][:2], L["prev_params"]), "prev_params"),
    "shape": (lambda L: trainscope.param_stats(L["grads"], _swap(L["params"], 1, L["params"][1].reshape(1, 3))),
              r"params\[1\]"),
    "shape_prev": (lambda L: trainscope.update_size(L["params"], _swap(L["prev_params"], 2, torch.zeros(8))),
                   r"prev_params\[2\]"),
    "pair_dtype": (lambda L: trainscope.distance(L["params"], _swap(L["init_params"], 0, L["params"][0].double())),
                   r"init_params\[0\]"),
    "int_grad": (lambda L: trainscope.grad_norm(_swap(L["grads"], 1, torch.ones(3, dtype=torch.int32))),
                 r"grads\[1\]"),
    "int_param": (lambda L: trainscope.weight_magnitude([torch.ones(3, 3, dtype=torch.int64)]), r"params\[0\]"),
    "int_hist": (lambda L: trainscope.grad_hist1d([torch.ones(3, dtype=torch.uint8)]), r"(tensors|grads)\[0\]"),
    "bool_grad": (lambda L: trainscope.param_stats(grads=_swap(L["grads"], 1, torch.ones(3, dtype=torch.bool))),
                  r"grads\[1\]"),
    "int_loss": (lambda L: trainscope.loss(torch.ones(4, dtype=torch.int64)), "losses"),
    "none_grad": (lambda L: trainscope.param_stats(grads=_swap(L["grads"], 1, None), params=L["params"]),
                  r"grads\[1\]"),
    "none_param": (lambda L: trainscope.weight_magnitude(_swap(L["params"], 2, None)), r"params\[2\]"),
    "none_tensors": (lambda L: trainscope.nonfinite_count([None]), r"tensors\[0\]"),
    "distance_without_init": (lambda L: trainscope.distance(L["params"], []), "init_params"),
    "update_without_prev": (lambda L: trainscope.update_size(L["params"], []), "prev_params"),
    "init_without_params": (lambda L: trainscope.param_stats(init_params=L["init_params"]), r"\bparams\b"),
}


@pytest.mark.parametrize("case", list(BAD_LIST_CASES))
def test_bad_lists(case):
    call, pattern = BAD_LIST_CASES[case]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        call(_lists())


@pytest.mark.parametrize("nbins", [0, -1])
def test_bad_nbins(nbins):
    g = _lists()["grads"]
    with pytest.raises((RuntimeError, ValueError), match="nbins"):
        trainscope.param_stats(grads=g, nbins=nbins)
    with pytest.raises((RuntimeError, ValueError), match="nbins"):
        trainscope.grad_hist1d(g, nbins=nbins)
    with pytest.raises(ValueError, match="nbins"):
        trainscope.hist_bin_edges(nbins)


@pytest.mark.parametrize("maxval", [0.0, -0.05, float("nan"), float("inf")])
def test_bad_maxval(maxval):
    g = _lists()["grads"]
    with pytest.raises((RuntimeError, ValueError), match="maxval"):
        trainscope.param_stats(grads=g, maxval=maxval)
    with pytest.raises((RuntimeError, ValueError), match="maxval"):
        trainscope.grad_hist1d(g, maxval=maxval)
    if not math.isinf(maxval):
        with pytest.raises(ValueError, match="maxval"):
            trainscope.hist_bin_edges(10, maxval)


def test_refresh_prev_needs_prev_params():
    L = _lists()
    with pytest.raises(ValueError, match="prev_params"):
        trainscope.param_stats(L["grads"], L["params"], refresh_prev=True)
    with pytest.raises((RuntimeError, ValueError), match="prev_params"):
        trainscope.update_size(L["params"], [], refresh_prev=True)
    with pytest.raises(RuntimeError, match="prev_params"):
        torch.ops.trainscope.param_stats_refresh_(L["grads"], L["params"], [], [], False, 1, 1.0, False)


def test_refresh_prev_needs_params():
    L = _lists()
    with pytest.raises((RuntimeError, ValueError), match=r"\bparams\b"):
        trainscope.param_stats(prev_params=L["prev_params"], refresh_prev=True)


def test_weight_magnitude_of_invalid():
    with pytest.raises(ValueError, match="weight_magnitude_of"):
        trainscope.param_stats(params=_lists()["params"], weight_magnitude_of="weights")


def test_bad_input_raises_before_any_work():
    """A shape mismatch at position 2 must not leave prev refreshed at positions 0 and 1."""
    L = _lists()
    before = [t.clone() for t in L["prev_params"]]
    params = L["params"][:2] + [L["params"][2].reshape(4, 2)]
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        trainscope.param_stats(params=params, prev_params=L["prev_params"], refresh_prev=True)
    assert all(torch.equal(a, b) for a, b in zip(L["prev_params"], before))


@requires_cuda
@pytest.mark.parametrize("where", ["grads", "params", "init_params", "prev_params"])
def test_mixed_devices_cuda(where):
    L = _lists("cuda")
    L[where][1] = L[where][1].cpu()
    with pytest.raises(RuntimeError, match=rf"{where}\[1\]"):
        trainscope.param_stats(**L)


def test_mixed_devices_meta():
    """Without a GPU: a 'meta' tensor among CPU tensors. Dispatch may route the call to the fake
    kernel, which has no device check to make; then there is nothing to test here."""
    L = _lists()
    L["params"][1] = torch.empty(3, device="meta")
    try:
        trainscope.param_stats(**L)
    except RuntimeError as e:
        assert "params[1]" in str(e) or "params" in str(e)
        return
    pytest.skip("a meta tensor mixed with CPU tensors dispatches to the fake kernel")
