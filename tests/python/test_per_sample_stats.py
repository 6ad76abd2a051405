"""trainscope per-sample gradient statistics from materialised per-sample gradients (SPEC.md §2,
§4, §5) against a float64 reference built from explicit per-sample gradients.

Layout, as in test_param_stats.py: ``reference_*`` functions define what each result must be,
``sample_inputs(device)`` feeds ``torch.library.opcheck``; the numeric tests run on the CPU and,
where a GPU is present, on CUDA (the CUDA variants skip cleanly without one, and nothing here
touches the GPU at import time).

The reference gradients come from one backward per sample of a float64 copy of each model (a small
MLP, a small CNN and a sequence model applied to [B, T, d]); ``torch.func.vmap(torch.func.grad)``
gradients of the same models are fed to trainscope and must agree with it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import trainscope
from conftest import DTYPES, requires_cuda

NAMES = ("norm_test", "inner_test", "ortho_test", "grad_variance_trace", "grad_sq_norm_unbiased",
         "gradient_noise_scale")
NORM_TEST, INNER_TEST, ORTHO_TEST, TRACE, SQ_NORM_UNBIASED, NOISE_SCALE = range(6)

#: SPEC.md §5 tolerance of float32 (and of 16-bit data read exactly as the reference reads it);
#: float64 data keep float64 accuracy.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


# ------------------------------------------------------------------------------------------------
# Reference (float64). Low-precision inputs are upcast from the very values the library reads.


def flatten64(grads) -> torch.Tensor:
    """[B, P] float64 on the CPU: every tensor of the list reshaped to [B, cols] and concatenated."""
    b = grads[0].shape[0]
    return torch.cat([g.detach().cpu().to(torch.float64).reshape(b, -1) for g in grads], dim=1)


class Reference:
    """The parts and the six statistics of SPEC.md §2, each statistic evaluated from its
    definition (the projections of the orthogonality test formed explicitly, tr Σ̂ as
    Σ‖gᵢ − ḡ‖²/(B−1)), so the reference shares no algebraic shortcut with the library.

    ``scale[k]`` bounds the sum of the magnitudes of the terms statistic k subtracts, to first
    order: a result correct to relative precision ε in its inputs is within ε·scale[k] of the
    truth. Where a statistic does not cancel, scale[k] ≈ |value|; where it does (the unbiased
    ‖G‖² = ‖ḡ‖² − tr Σ̂/B when noise dominates, hence the noise scale; Σ‖gᵢ‖²/‖ḡ‖² − B when the
    samples agree; ‖gᵢ‖² − (gᵢ·ḡ)²/‖ḡ‖² when they are nearly parallel) the tolerance follows the
    size of the terms, not of their small difference — the only place the checks are looser than
    plain relative tolerance."""

    def __init__(self, grads):
        G = flatten64(grads)
        self.batch = B = G.shape[0]
        gbar = G.mean(0)
        self.sq_norms = (G * G).sum(1)
        self.dots = G @ gbar
        self.mean_sq_norm = m = gbar @ gbar
        sum_sq, pairs = self.sq_norms.sum(), B * (B - 1.0)
        proj = G - (self.dots / m)[:, None] * gbar[None, :]
        trace = ((G - gbar) ** 2).sum() / (B - 1)
        unbiased = m - trace / B
        stats = [
            (sum_sq / m - B) / pairs,
            ((self.dots - m) ** 2).sum() / (pairs * m * m),
            (proj * proj).sum() / (pairs * m),
            trace,
            unbiased,
            trace / unbiased,
        ]
        trace_scale = (sum_sq + B * m) / (B - 1)
        unbiased_scale = m + trace_scale / B
        scale = [
            (sum_sq / m + B) / pairs,
            (2 * (self.dots - m).abs() * (self.dots.abs() + m)).sum() / (pairs * m * m) + stats[1].abs(),
            sum_sq / (pairs * m),
            trace_scale,
            unbiased_scale,
            (trace / unbiased).abs() * (trace_scale / trace.abs() + unbiased_scale / unbiased.abs()),
        ]
        self.stats = torch.stack(stats)
        self.scale = torch.stack(scale)
        # dots: Σ_c gᵢc·ḡ_c has terms of both signs; ‖ḡ‖²: each ḡ_c is a mean of terms of both
        # signs, so its error follows ā_c = mean_i |gᵢc|, not ḡ_c.
        abs_mean = G.abs().mean(0)
        self.dots_scale = G.abs() @ abs_mean
        self.mean_sq_scale = m + abs_mean @ abs_mean

    def __getitem__(self, name):
        return float(self.stats[NAMES.index(name)])


def reference_hist1d(grads, nbins: int, maxval: float) -> torch.Tensor:
    """SPEC.md §4 in float64: bin floor((clamp(x, −m, m) + m) / w), w = 2m/nbins; x = m in the
    last bin; NaN and ±Inf are left out."""
    x = flatten64(grads).reshape(-1).numpy() if grads else np.zeros(0)
    x = x[np.isfinite(x)]
    width = 2.0 * maxval / nbins
    bins = np.floor((np.clip(x, -maxval, maxval) + maxval) / width).astype(np.int64)
    bins = np.clip(bins, 0, nbins - 1)
    return torch.from_numpy(np.bincount(bins, minlength=nbins).astype(np.int64))


def nonfinite_count(grads) -> int:
    return sum(int((~torch.isfinite(g.detach().cpu().to(torch.float64))).sum()) for g in grads)


# ------------------------------------------------------------------------------------------------
# Checks


def assert_stats_close(got: torch.Tensor, ref: Reference, rtol: float) -> None:
    """Each statistic within rtol·scale of the reference (see Reference); NaN/inf must match."""
    assert got.shape == (6,) and got.dtype == torch.float64
    got = got.detach().cpu()
    for k, name in enumerate(NAMES):
        g, w, s = float(got[k]), float(ref.stats[k]), float(ref.scale[k])
        if not math.isfinite(w):
            assert (math.isnan(g) and math.isnan(w)) or g == w, f"{name}: got {g}, want {w}"
            continue
        assert abs(g - w) <= rtol * s, f"{name}: got {g!r}, want {w!r} (|diff| {abs(g - w):.3g} > {rtol}·{s:.3g})"


def assert_parts_close(parts: trainscope.PerSampleParts, ref: Reference, rtol: float, device=None) -> None:
    b = ref.batch
    assert parts.sq_norms.shape == (b,) and parts.dots.shape == (b,) and parts.mean_sq_norm.shape == ()
    for t in (parts.sq_norms, parts.dots, parts.mean_sq_norm):
        assert t.dtype == torch.float64
        if device is not None:
            assert t.device.type == torch.device(device).type
    torch.testing.assert_close(parts.sq_norms.cpu(), ref.sq_norms, rtol=rtol, atol=0.0)
    m = float(parts.mean_sq_norm)
    assert abs(m - float(ref.mean_sq_norm)) <= rtol * float(ref.mean_sq_scale), f"‖ḡ‖²: {m} vs {ref.mean_sq_norm}"
    diff = (parts.dots.cpu() - ref.dots).abs()
    assert bool((diff <= rtol * ref.dots_scale).all()), f"dots: {parts.dots.cpu()} vs {ref.dots}"


def assert_matches_reference(s: trainscope.PerSampleStats, grads, rtol: float, device, *, nbins=100,
                             maxval=0.05) -> None:
    ref = Reference(grads)
    dev = torch.device(device).type
    assert s.stats.device.type == dev and s.hist.device.type == dev and s.nonfinite.device.type == dev
    assert_parts_close(s.parts, ref, rtol, device)
    assert_stats_close(s.stats, ref, rtol)
    assert_int_equal(s.hist, reference_hist1d(grads, nbins, maxval))
    assert_int_equal(s.nonfinite, torch.tensor(nonfinite_count(grads)))


def assert_int_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.int64
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.cpu(), expected), f"{actual.cpu().tolist()} != {expected.tolist()}"


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def finite_count(grads) -> int:
    return sum(int(torch.isfinite(g).sum()) for g in grads)


# ------------------------------------------------------------------------------------------------
# Models and their per-sample gradients


class SequenceModel(nn.Module):
    """Linear layers applied to every position of [B, T, d]: T = 5 observations per sample."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def make_model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(7, 12), nn.ReLU(), nn.Linear(12, 3))
        x_shape, classes = (7,), 3
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        x_shape, classes = (2, 6, 6), 3
    else:
        model = SequenceModel()
        x_shape, classes = (5, 6), 4
    return model, x_shape, classes


def sample_loss(model, x, y):
    """ℓᵢ of one sample: cross entropy (summed over the positions of a sequence)."""
    out = model(x.unsqueeze(0))
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def make_batch(kind: str, batch: int, gen: torch.Generator):
    _, x_shape, classes = make_model(kind, 0)
    x = torch.randn((batch,) + x_shape, generator=gen, dtype=torch.float64)
    y_shape = (batch, 5) if kind == "seq" else (batch,)
    y = torch.randint(0, classes, y_shape, generator=gen)
    return x, y


def explicit_per_sample_grads(kind: str, batch: int, gen: torch.Generator, seed: int = 0):
    """The reference gradients: one backward per sample through a float64 copy of the model.
    Returns ({name: [B, *shape]} in float64, the model, x, y)."""
    model, _, _ = make_model(kind, seed)
    model64 = copy.deepcopy(model).to(torch.float64)
    x, y = make_batch(kind, batch, gen)
    names = [n for n, _ in model64.named_parameters()]
    params = [p for _, p in model64.named_parameters()]
    rows = []
    for i in range(batch):
        rows.append(torch.autograd.grad(sample_loss(model64, x[i], y[i]), params))
    grads = {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}
    return grads, model, x, y


def vmap_per_sample_grads(model, x, y, dtype=torch.float64, scale=1.0):
    """torch.func per-sample gradients of ``scale``·ℓᵢ (scale = 1/B: a mean-reduced loss)."""
    model = copy.deepcopy(model).to(dtype)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of_one(p, xi, yi):
        return scale * sample_loss(lambda inp: torch.func.functional_call(model, p, (inp,)), xi, yi)

    return torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0, 0))(params, x.to(dtype), y)


def randn(gen, shape, scale=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Normal values drawn on the CPU in float64, then rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def random_grads(gen, batch, shapes, dtype=torch.float32, device="cpu", scale=0.04, signal=0.02):
    """[B, *shape] per-sample gradients = a common signal + per-sample noise (so ‖ḡ‖ is well away
    from 0), scaled to fill the inside and both edge bins of the default histogram."""
    out = []
    for shape in shapes:
        mean = randn(gen, shape, signal, torch.float64)
        out.append((mean + randn(gen, (batch,) + tuple(shape), scale, torch.float64)).to(dtype).to(device))
    return out


MODELS = ["mlp", "cnn", "seq"]


# ------------------------------------------------------------------------------------------------
# Against explicit per-sample gradients of real models


@pytest.mark.parametrize("kind", MODELS)
def test_explicit_and_vmap_grads_match_reference(device, kind, gen):
    """The reference from B separate float64 backwards; trainscope fed the same gradients, and
    fed torch.func.vmap(grad) gradients of the same model, agrees with it."""
    batch = 9
    grads, model, x, y = explicit_per_sample_grads(kind, batch, gen)
    ref = Reference(list(grads.values()))

    explicit = [g.to(device) for g in grads.values()]
    s = trainscope.per_sample_stats(explicit)
    assert_matches_reference(s, explicit, 1e-9, device)

    vm = vmap_per_sample_grads(model, x, y)
    assert list(vm) == list(grads)
    for n in grads:
        torch.testing.assert_close(vm[n], grads[n], rtol=1e-10, atol=1e-13)
    vm_dev = {n: g.to(device) for n, g in vm.items()}
    sv = trainscope.per_sample_stats(vm_dev)
    assert_parts_close(sv.parts, ref, 1e-9, device)
    assert_stats_close(sv.stats, ref, 1e-9)
    for k, name in enumerate(NAMES):
        assert sv[name].shape == () and float(sv[name]) == float(sv.stats[k])
    # The single-statistic functions agree with the fused call (which also bins: not bitwise,
    # since a launch with a histogram may cut its work differently).
    for fn, k in ((trainscope.norm_test, NORM_TEST), (trainscope.inner_test, INNER_TEST),
                  (trainscope.ortho_test, ORTHO_TEST), (trainscope.gradient_noise_scale, NOISE_SCALE)):
        single = fn(vm_dev)
        assert single.shape == () and single.dtype == torch.float64
        torch.testing.assert_close(single, sv.stats[k], rtol=1e-12, atol=0.0)
    assert_int_equal(trainscope.per_sample_grad_hist1d(vm_dev), sv.hist)
    # The model's statistics are meaningful numbers, not a degenerate case.
    assert bool(torch.isfinite(sv.stats).all()) and float(sv.stats[TRACE]) > 0


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("dtype_batch", [(torch.float64, 6), (torch.float32, 8)],
                         ids=["float64-B6", "float32-B8"])
def test_mean_reduced_grads_give_the_same_statistics(device, kind, dtype_batch, gen):
    """gᵢ/B (per-sample gradients of a mean-reduced loss) and gᵢ give the same statistics (SPEC.md
    §2; for tr Σ̂ and ‖G‖², quadratic in g, "the same" up to the factor 1/B²). For
    float32 the batch is a power of two, so the 1/B factor is exact through the whole backward and
    the two gradient sets differ by exactly 2⁻³; float64 takes B = 6, where 1/B rounds."""
    dtype, batch = dtype_batch
    model, _, _ = make_model(kind, 3)
    x, y = make_batch(kind, batch, gen)
    summed = vmap_per_sample_grads(model, x, y, dtype)
    mean = vmap_per_sample_grads(model, x, y, dtype, scale=1.0 / batch)
    a = trainscope.per_sample_stats({n: g.to(device) for n, g in summed.items()})
    b = trainscope.per_sample_stats({n: g.to(device) for n, g in mean.items()})
    # The four ratios are scale-free. tr Σ̂ and ‖G‖² are quadratic in g, so they (like the parts)
    # scale by 1/B², and their ratio, the noise scale, does not.
    invariant = [NORM_TEST, INNER_TEST, ORTHO_TEST, NOISE_SCALE]
    torch.testing.assert_close(b.stats.cpu()[invariant], a.stats.cpu()[invariant], rtol=1e-9, atol=0.0)
    quadratic = [TRACE, SQ_NORM_UNBIASED]
    torch.testing.assert_close(b.stats.cpu()[quadratic] * batch**2, a.stats.cpu()[quadratic], rtol=1e-9, atol=0.0)
    torch.testing.assert_close(b.parts.sq_norms.cpu() * batch**2, a.parts.sq_norms.cpu(), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(b.parts.mean_sq_norm.cpu() * batch**2, a.parts.mean_sq_norm.cpu(), rtol=1e-9,
                               atol=0.0)


def test_dtypes_against_reference_of_the_same_values(device, dtype, gen):
    """Every dtype: the reference upcasts the very (rounded) values the library reads, so the
    only difference is accumulation: float64 data at 1e-9, the others at SPEC.md's 1e-5."""
    grads, _, _, _ = explicit_per_sample_grads("cnn", 7, gen)
    cast = [g.to(dtype).to(device) for g in grads.values()]
    s = trainscope.per_sample_stats(cast)
    assert_matches_reference(s, cast, RTOL[dtype], device)
    assert s.stats.dtype == torch.float64 and s.parts.sq_norms.dtype == torch.float64
    assert s.hist.dtype == torch.int64 and s.nonfinite.dtype == torch.int64 and s.nonfinite.shape == ()


def test_random_lists(device, dtype, gen):
    """Wider lists than the models give: tensors of many ranks, a 0-d parameter ([B] per-sample),
    a tensor wider than one CPU work unit (16384 columns) and than many GPU tiles, and widths
    that are not multiples of any tile."""
    shapes = [(33, 7), (7,), (), (3, 4, 5), (1,), (17000,), (2, 3, 3, 3), (257,)]
    for batch in (2, 3, 33):
        grads = random_grads(gen, batch, shapes, dtype, device)
        s = trainscope.per_sample_stats(grads)
        assert_matches_reference(s, grads, RTOL[dtype], device)
        assert int(s.hist.sum()) == finite_count(grads)
        assert s.hist[0] > 0 and s.hist[-1] > 0 and s.hist[1:-1].sum() > 0


def test_mixed_dtypes_in_one_list(device, gen):
    shapes = [(5, 4), (4,), (3, 3), (9,), (2, 7), (300,), (6,), (1,)]
    grads = random_grads(gen, 5, shapes, torch.float64, device)
    grads = [g.to(DTYPES[i % 4]) for i, g in enumerate(grads)]
    s = trainscope.per_sample_stats(grads, nbins=37)
    assert_matches_reference(s, grads, 1e-5, device, nbins=37)


# ------------------------------------------------------------------------------------------------
# Parts: additivity, PerSampleParts API


@pytest.mark.parametrize("kind", MODELS)
def test_parts_of_layers_add_up_to_the_whole_list(device, kind, gen):
    grads, _, _, _ = explicit_per_sample_grads(kind, 6, gen)
    grads = {n: g.to(torch.float32).to(device) for n, g in grads.items()}
    whole = trainscope.per_sample_parts(grads)
    per_tensor = [trainscope.per_sample_parts([g]) for g in grads.values()]
    summed = per_tensor[0]
    for p in per_tensor[1:]:
        summed = summed + p
    for combined in (summed, sum(per_tensor)):
        assert isinstance(combined, trainscope.PerSampleParts) and combined.batch_size == 6
        torch.testing.assert_close(combined.sq_norms, whole.sq_norms, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(combined.dots, whole.dots, rtol=1e-12, atol=1e-18)
        torch.testing.assert_close(combined.mean_sq_norm, whole.mean_sq_norm, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(combined.stats(), whole.stats(), rtol=1e-9, atol=0.0)
    # Two layers measured separately, as a user combining layers would.
    names = list(grads)
    half = len(names) // 2
    first = trainscope.per_sample_parts([grads[n] for n in names[:half]])
    second = trainscope.per_sample_parts({n: grads[n] for n in names[half:]})
    torch.testing.assert_close((first + second).stats(), whole.stats(), rtol=1e-9, atol=0.0)
    # Statistics of parts through the single-statistic functions, and against the reference.
    ref = Reference(list(grads.values()))
    assert_stats_close(whole.stats(), ref, 1e-9)
    assert_bitwise_equal(trainscope.norm_test(whole), whole.stats()[NORM_TEST])
    assert_bitwise_equal(trainscope.inner_test(whole), whole.stats()[INNER_TEST])
    assert_bitwise_equal(trainscope.ortho_test(whole), whole.stats()[ORTHO_TEST])
    assert_bitwise_equal(trainscope.gradient_noise_scale(whole), whole.stats()[NOISE_SCALE])


def test_parts_equal_those_of_the_fused_call(device, gen):
    grads = random_grads(gen, 4, [(6, 5), (5,), (40,)], torch.float32, device)
    p = trainscope.per_sample_parts(grads)
    s = trainscope.per_sample_stats(grads)
    for name in ("sq_norms", "dots", "mean_sq_norm"):
        torch.testing.assert_close(getattr(p, name), getattr(s.parts, name), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(p.stats(), s.stats, rtol=1e-12, atol=0.0)


def test_parts_of_different_batch_sizes_do_not_add(gen):
    a = trainscope.per_sample_parts(random_grads(gen, 4, [(3,)]))
    b = trainscope.per_sample_parts(random_grads(gen, 5, [(3,)]))
    with pytest.raises(ValueError, match="batch sizes differ"):
        a + b


def test_stats_names_and_dict():
    assert trainscope.PER_SAMPLE_STATS == NAMES
    gen = torch.Generator().manual_seed(5)
    s = trainscope.per_sample_stats(random_grads(gen, 4, [(3, 2)]))
    d = s.as_dict()
    assert list(d) == list(NAMES) + ["per_sample_nonfinite"]
    for k, name in enumerate(NAMES):
        assert_bitwise_equal(d[name], s.stats[k])
        assert_bitwise_equal(s[name], s.stats[k])
    with pytest.raises(KeyError, match="unknown statistic"):
        s["grad_norm"]


# ------------------------------------------------------------------------------------------------
# Input forms: strides, empty tensors, dicts, a single tensor


def test_non_contiguous_inputs(device, dtype, gen):
    """Transposed, strided, permuted and sliced per-sample gradients give what their contiguous
    copies give, bitwise, and match the reference."""
    b = 5
    base = random_grads(gen, b, [(11,), (4, 6, 7), (9, 3), (2, 3, 4)], dtype, device)
    wide = random_grads(gen, 2 * b, [(20,)], dtype, device)[0]
    views = [
        base[0].t().contiguous().t(),                   # [B, 11] with strides (1, B)
        base[1][:, :, ::2, 1:5],                         # [B, 4, 3, 4] strided
        base[2].permute(0, 2, 1),                        # [B, 3, 9]
        base[3].permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0),  # batch dim last in memory
        wide[::2, 3:17],                                 # every other sample, a column window
    ]
    assert not any(v.is_contiguous() for v in views)
    s = trainscope.per_sample_stats(views)
    assert_matches_reference(s, views, RTOL[dtype], device)
    c = trainscope.per_sample_stats([v.contiguous() for v in views])
    for name in ("stats", "hist", "nonfinite"):
        assert_bitwise_equal(getattr(s, name), getattr(c, name))


def test_empty_tensors_inside_list(device, dtype, gen):
    b = 4
    dense = random_grads(gen, b, [(6, 5), (9,), (2, 3)], dtype, device)
    empty = [torch.empty((b, 0), dtype=dtype, device=device), torch.empty((b, 3, 0, 2), dtype=dtype, device=device)]
    mixed = [empty[0], dense[0], empty[1], dense[1], empty[0], dense[2], empty[1]]
    s = trainscope.per_sample_stats(mixed, nbins=20)
    sd = trainscope.per_sample_stats(dense, nbins=20)
    assert_matches_reference(s, mixed, RTOL[dtype], device, nbins=20)
    for name in ("stats", "hist", "nonfinite"):
        torch.testing.assert_close(getattr(s, name), getattr(sd, name), rtol=1e-12, atol=0.0)


def test_list_of_only_empty_tensors(device, dtype):
    """No elements: every part is 0, so ‖ḡ‖ = 0 and the statistics are NaN — not an error."""
    b = 3
    grads = [torch.empty((b, 0), dtype=dtype, device=device), torch.empty((b, 2, 0), dtype=dtype, device=device)]
    s = trainscope.per_sample_stats(grads)
    assert s.parts.sq_norms.shape == (b,)
    assert float(s.parts.sq_norms.abs().sum()) == 0 and float(s.parts.mean_sq_norm) == 0
    assert int(s.hist.sum()) == 0 and int(s.nonfinite) == 0 and s.hist.shape == (100,)
    assert bool(torch.isnan(s.stats[[NORM_TEST, INNER_TEST, ORTHO_TEST, NOISE_SCALE]]).all())
    assert float(s.stats[TRACE]) == 0 and float(s.stats[SQ_NORM_UNBIASED]) == 0


def test_dict_tuple_generator_and_single_tensor_inputs(device, gen):
    grads = random_grads(gen, 4, [(5, 3), (3,), (2, 2, 2)], torch.float32, device)
    as_list = trainscope.per_sample_stats(grads)
    for form in ({"w": grads[0], "b": grads[1], "k": grads[2]}, tuple(grads), (g for g in grads)):
        other = trainscope.per_sample_stats(form)
        for name in ("stats", "hist", "nonfinite"):
            assert_bitwise_equal(getattr(other, name), getattr(as_list, name))
    single = trainscope.per_sample_stats(grads[0])
    assert_bitwise_equal(single.stats, trainscope.per_sample_stats([grads[0]]).stats)
    assert_bitwise_equal(trainscope.per_sample_parts(grads[0]).stats(), single.stats)


def test_scalar_parameter_per_sample_grads(device, gen):
    """A 0-d parameter has per-sample gradients of shape [B]: one column."""
    grads = random_grads(gen, 6, [(), (), (4,)], torch.float32, device)
    assert grads[0].shape == (6,)
    assert_matches_reference(trainscope.per_sample_stats(grads), grads, 1e-5, device)


def test_inputs_requiring_grad(device, gen):
    """Statistics are measurements: no result carries a grad_fn."""
    grads = [g.requires_grad_() for g in random_grads(gen, 4, [(3, 2), (2,)], torch.float32, device)]
    s = trainscope.per_sample_stats(grads)
    for t in (s.stats, s.hist, s.parts.sq_norms, s.parts.dots, s.parts.mean_sq_norm):
        assert not t.requires_grad
    assert not trainscope.norm_test(grads).requires_grad


# ------------------------------------------------------------------------------------------------
# Histogram and non-finite values


@pytest.mark.parametrize("nbins,maxval", [(1, 0.05), (7, 0.01), (100, 0.05), (1000, 0.003), (5000, 0.2)])
def test_histogram_is_exact(device, dtype, gen, nbins, maxval):
    grads = random_grads(gen, 6, [(40, 3), (77,), (2, 5, 5)], dtype, device)
    # Values on the rounded bin edges −m + k·w, and ±m, planted in the float64 values, then cast.
    g = grads[1].to(torch.float64).cpu()
    w = 2.0 * maxval / nbins
    k = torch.arange(g.numel(), dtype=torch.float64).remainder(nbins + 1).reshape(g.shape)
    g[:, :60] = (k * w - maxval)[:, :60]
    g[0, 60], g[1, 60], g[2, 60], g[3, 60] = maxval, -maxval, 1e4, -1e4
    grads[1] = g.to(dtype).to(device)
    h = trainscope.per_sample_grad_hist1d(grads, nbins=nbins, maxval=maxval)
    assert h.shape == (nbins,) and h.dtype == torch.int64 and h.device.type == torch.device(device).type
    assert_int_equal(h, reference_hist1d(grads, nbins, maxval))
    assert int(h.sum()) == finite_count(grads)
    s = trainscope.per_sample_stats(grads, nbins=nbins, maxval=maxval)
    assert_bitwise_equal(s.hist, h)


def test_histogram_edges_by_hand(device):
    """nbins = 4 over [−0.5, 0.5] (w = 0.25, all exact): each edge opens the bin above it, and
    x = maxval closes the last bin; outliers pile into the edge bins."""
    values = torch.tensor([[-9.0, -0.5, -0.25, 0.0, 0.25], [0.5, 9.0, -0.3, 0.1, 0.49]], device=device)
    # bin 0: −9, −0.5, −0.3; bin 1: −0.25; bin 2: 0, 0.1; bin 3: 0.25, 0.49, 0.5, 9
    assert_int_equal(trainscope.per_sample_grad_hist1d([values], nbins=4, maxval=0.5),
                     torch.tensor([3, 1, 2, 4]))


def test_without_histogram(device, gen):
    grads = random_grads(gen, 4, [(5, 3), (3,)], torch.float32, device)
    s = trainscope.per_sample_stats(grads, histogram=False)
    assert s.hist.shape == (0,) and s.hist.dtype == torch.int64
    torch.testing.assert_close(s.stats, trainscope.per_sample_stats(grads).stats, rtol=1e-12, atol=0.0)
    ref = Reference(grads)
    assert_parts_close(s.parts, ref, 1e-5, device)
    assert int(s.nonfinite) == 0


def test_nonfinite_counted_not_binned(device, dtype, gen):
    grads = random_grads(gen, 5, [(6, 4), (9,), (3, 3)], dtype, device)
    planted = [(0, (1, 2, 3), math.nan), (0, (4, 0, 0), math.inf), (2, (1, 1, 1), -math.inf),
               (2, (3, 2, 0), math.nan), (1, (2, 8), math.nan)]
    for t, idx, v in planted:
        grads[t][idx] = v
    s = trainscope.per_sample_stats(grads, nbins=13)
    assert_int_equal(s.nonfinite, torch.tensor(len(planted)))
    assert_int_equal(s.hist, reference_hist1d(grads, 13, 0.05))
    assert int(s.hist.sum()) == finite_count(grads) == sum(g.numel() for g in grads) - len(planted)
    # Samples 1, 2, 3, 4 hold non-finite values: their squared norms are not finite; sample 0's is.
    sq = s.parts.sq_norms.cpu()
    assert math.isfinite(float(sq[0])) and not bool(torch.isfinite(sq[1:]).any())
    assert_int_equal(trainscope.per_sample_grad_hist1d(grads, nbins=13, maxval=0.05), s.hist)


def test_zero_mean_gradient_gives_inf_nan_not_a_crash(device, dtype, gen):
    """gᵢ and −gᵢ in pairs: ḡ = 0 exactly (dyadic values, every partial sum exact in any order).
    IEEE arithmetic on the definitions: norm test x/0 − B = +inf, inner test 0/0 and the
    orthogonality test's projection 0/0 are NaN; tr Σ̂ = Σ‖gᵢ‖²/(B−1) stays finite."""
    half = [(torch.randint(-8, 9, (3,) + shape, generator=gen).to(torch.float64) / 16) for shape in [(4, 3), (5,)]]
    grads = [torch.cat([h, -h]).to(dtype).to(device) for h in half]
    s = trainscope.per_sample_stats(grads)
    assert float(s.parts.mean_sq_norm) == 0.0
    st = s.stats.cpu()
    assert st[NORM_TEST] == math.inf
    assert math.isnan(float(st[INNER_TEST])) and math.isnan(float(st[ORTHO_TEST]))
    ref = Reference(grads)
    assert math.isclose(float(st[TRACE]), float(ref.stats[TRACE]), rel_tol=1e-12)
    assert math.isclose(float(st[SQ_NORM_UNBIASED]), float(ref.stats[SQ_NORM_UNBIASED]), rel_tol=1e-12)
    assert math.isclose(float(st[NOISE_SCALE]), -6.0, rel_tol=1e-12)  # tr Σ̂ / (0 − tr Σ̂/B) = −B
    # All zero: 0/0 everywhere it divides by ‖ḡ‖².
    zeros = [torch.zeros((4, 3), dtype=dtype, device=device)]
    z = trainscope.per_sample_stats(zeros).stats.cpu()
    assert math.isnan(float(z[NORM_TEST])) and math.isnan(float(z[INNER_TEST])) and math.isnan(float(z[ORTHO_TEST]))
    assert float(z[TRACE]) == 0.0


# ------------------------------------------------------------------------------------------------
# Large batches (the CUDA composite fallback) and determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_large_batch_few_columns(device, dtype, gen):
    """B = 30000 with 7 columns: on CUDA no tile of B rows fits in shared memory (the narrowest one
    needs ≥ 20·B bytes), so this takes the two-pass composite path; on the CPU it is just large."""
    b = 30_000
    grads = random_grads(gen, b, [(3,), (2, 2)], dtype, device)
    s = trainscope.per_sample_stats(grads)
    assert_matches_reference(s, grads, RTOL[dtype], device)
    # Non-finite values on that path too.
    grads[1][b - 1, 1, 0] = math.nan
    grads[0][17, 2] = -math.inf
    s = trainscope.per_sample_stats(grads, nbins=11, maxval=0.1)
    assert_int_equal(s.nonfinite, torch.tensor(2))
    assert_int_equal(s.hist, reference_hist1d(grads, 11, 0.1))
    assert int(s.hist.sum()) == finite_count(grads)


def test_deterministic(device, dtype, gen):
    """The same inputs give the same bits, on repeat and — on the CPU — whatever the thread count
    (a tensor of 40000 columns is cut into several parallel units)."""
    grads = random_grads(gen, 8, [(40_000,), (33, 17), (5,)], dtype, device)
    a = trainscope.per_sample_stats(grads)
    for _ in range(2):
        b = trainscope.per_sample_stats(grads)
        for name in ("stats", "hist", "nonfinite"):
            assert_bitwise_equal(getattr(a, name), getattr(b, name))
        for name in ("sq_norms", "dots", "mean_sq_norm"):
            assert_bitwise_equal(getattr(a.parts, name), getattr(b.parts, name))
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            c = trainscope.per_sample_stats(grads)
        finally:
            torch.set_num_threads(threads)
        for name in ("stats", "hist", "nonfinite"):
            assert_bitwise_equal(getattr(a, name), getattr(c, name))


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work


def _ok(b=4, device="cpu"):
    gen = torch.Generator().manual_seed(11)
    return random_grads(gen, b, [(3, 2), (2,), (4,)], torch.float32, device)


BAD_CASES = {
    "batch_1": (lambda: trainscope.per_sample_stats(_ok(1)), r"B >= 2.*B = 1"),
    "batch_0": (lambda: trainscope.per_sample_stats([torch.zeros(0, 3)]), r"B = 0"),
    "batch_1_parts": (lambda: trainscope.per_sample_parts([torch.zeros(1, 3)]), r"B = 1"),
    "batch_1_norm_test": (lambda: trainscope.norm_test([torch.zeros(1, 3)]), r"B = 1"),
    "batch_1_hist": (lambda: trainscope.per_sample_grad_hist1d([torch.zeros(1, 3)]), r"B = 1"),
    "batch_1_from_parts": (lambda: trainscope.PerSampleParts(torch.ones(1, dtype=torch.float64),
                                                             torch.ones(1, dtype=torch.float64),
                                                             torch.tensor(1.0, dtype=torch.float64)).stats(),
                           r"B = 1"),
    "batch_mismatch": (lambda: trainscope.per_sample_stats(_ok(4) + [torch.zeros(5, 3)]),
                       r"per_sample_grads\[3\].*batch size 5"),
    "batch_mismatch_1": (lambda: trainscope.per_sample_stats([torch.zeros(4, 3), torch.zeros(3, 4)]),
                         r"per_sample_grads\[1\]"),
    "int32": (lambda: trainscope.per_sample_stats([torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.int32)]),
              r"per_sample_grads\[1\]"),
    "int64_first": (lambda: trainscope.norm_test([torch.ones(4, 3, dtype=torch.int64)]), r"per_sample_grads\[0\]"),
    "bool": (lambda: trainscope.per_sample_grad_hist1d(_ok() + [torch.ones(4, dtype=torch.bool)]),
             r"per_sample_grads\[3\]"),
    "complex": (lambda: trainscope.per_sample_parts([torch.zeros(4, 2, dtype=torch.complex64)]),
                r"per_sample_grads\[0\]"),
    "zero_dim": (lambda: trainscope.per_sample_stats([torch.zeros(4, 3), torch.tensor(1.0)]),
                 r"per_sample_grads\[1\].*0-d"),
    "zero_dim_first": (lambda: trainscope.per_sample_stats([torch.tensor(1.0), torch.zeros(4, 3)]),
                       r"per_sample_grads\[0\]"),
    "empty_list": (lambda: trainscope.per_sample_stats([]), r"per_sample_grads is empty"),
    "empty_dict": (lambda: trainscope.per_sample_parts({}), r"per_sample_grads is empty"),
    "not_a_tensor": (lambda: trainscope.per_sample_stats([torch.zeros(4, 3), [1.0, 2.0]]),
                     r"per_sample_grads\[1\]"),
    "none": (lambda: trainscope.per_sample_stats([torch.zeros(4, 3), None]), r"per_sample_grads\[1\]"),
    "nbins_0": (lambda: trainscope.per_sample_stats(_ok(), nbins=0), "nbins"),
    "nbins_negative": (lambda: trainscope.per_sample_grad_hist1d(_ok(), nbins=-3), "nbins"),
    "nbins_too_many": (lambda: trainscope.per_sample_grad_hist1d(_ok(), nbins=(1 << 20) + 1), "nbins"),
    "maxval_0": (lambda: trainscope.per_sample_stats(_ok(), maxval=0.0), "maxval"),
    "maxval_negative": (lambda: trainscope.per_sample_grad_hist1d(_ok(), maxval=-0.1), "maxval"),
    "maxval_nan": (lambda: trainscope.per_sample_stats(_ok(), maxval=float("nan")), "maxval"),
    "maxval_inf": (lambda: trainscope.per_sample_stats(_ok(), maxval=float("inf")), "maxval"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(case):
    call, pattern = BAD_CASES[case]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        call()


def test_bad_parts_shapes():
    f64 = dict(dtype=torch.float64)
    op = torch.ops.trainscope.per_sample_stats_from_parts
    with pytest.raises(RuntimeError, match="sq_norms"):
        op(torch.ones(3, 2, **f64), torch.ones(3, 2, **f64), torch.tensor(1.0, **f64))
    with pytest.raises(RuntimeError, match="dots"):
        op(torch.ones(3, **f64), torch.ones(4, **f64), torch.tensor(1.0, **f64))
    with pytest.raises(RuntimeError, match="mean_sq_norm"):
        op(torch.ones(3, **f64), torch.ones(3, **f64), torch.ones(2, **f64))
    with pytest.raises(RuntimeError, match="floating point"):
        op(torch.ones(3, dtype=torch.int64), torch.ones(3, **f64), torch.tensor(1.0, **f64))


@requires_cuda
@pytest.mark.parametrize("where", [0, 1, 2])
def test_mixed_devices_cuda(where):
    grads = _ok(4, "cuda")
    grads[where] = grads[where].cpu()
    with pytest.raises(RuntimeError, match=rf"per_sample_grads\[{max(where, 1)}\]"):
        trainscope.per_sample_stats(grads)
    with pytest.raises(RuntimeError, match=r"per_sample_grads\["):
        trainscope.per_sample_parts(grads)


@requires_cuda
def test_parts_on_different_devices_cuda():
    gen = torch.Generator().manual_seed(3)
    a = trainscope.per_sample_parts(random_grads(gen, 4, [(3,)], device="cuda"))
    b = trainscope.per_sample_parts(random_grads(gen, 4, [(3,)]))
    with pytest.raises(RuntimeError):
        (a + b).stats()
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.trainscope.per_sample_stats_from_parts(a.sq_norms, b.dots, a.mean_sq_norm)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile


def sample_inputs(device):
    """Argument tuples for ``trainscope::per_sample_parts`` (no NaN outputs: opcheck compares
    eager and traced results with assert_close, where NaN != NaN)."""
    gen = torch.Generator().manual_seed(1234)
    f32 = random_grads(gen, 4, [(5, 3), (3,), (2, 3, 4)], torch.float32, device)
    f64 = random_grads(gen, 3, [(4, 4), (4,)], torch.float64, device)
    mixed = random_grads(gen, 5, [(6, 2), (5,), (7,)], torch.float64, device)
    mixed = [mixed[0].to(torch.bfloat16), mixed[1], mixed[2].to(torch.float16)]
    empty = f32 + [torch.empty((4, 0), device=device)]
    strided = [f32[0].transpose(1, 2), f32[2][:, ::2]]
    return [
        (f32, True, 100, 0.05),
        (f32, False, 1, 1.0),
        (f64, True, 3, 0.5),
        (mixed, True, 10, 0.05),
        (empty, True, 7, 0.1),
        (strided, False, 1, 1.0),
        ([f32[1]], True, 1, 0.05),
    ]


def test_opcheck_per_sample_parts(device):
    for args in sample_inputs(device):
        torch.library.opcheck(torch.ops.trainscope.per_sample_parts.default, args)


def test_opcheck_per_sample_stats_from_parts(device):
    for grads, *_ in sample_inputs(device):
        p = trainscope.per_sample_parts(grads)
        torch.library.opcheck(torch.ops.trainscope.per_sample_stats_from_parts.default,
                              (p.sq_norms, p.dots, p.mean_sq_norm))
    # Parts of other float dtypes and a [1]-shaped ‖ḡ‖² (e.g. after an all-reduce) are accepted.
    gen = torch.Generator().manual_seed(9)
    sq = randn(gen, (6,), 1.0, torch.float32, device).abs() + 1
    dots = randn(gen, (6,), 0.1, torch.float32, device)
    torch.library.opcheck(torch.ops.trainscope.per_sample_stats_from_parts.default,
                          (sq, dots, torch.tensor([0.3], device=device)))


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    grads = random_grads(gen, 5, [(6, 5), (5,), (2, 3, 4)], torch.float32)

    def step(grads):
        s = trainscope.per_sample_stats(grads, nbins=16, maxval=0.1)
        layers = trainscope.per_sample_parts(grads[:1]) + trainscope.per_sample_parts(grads[1:])
        return (s.stats, s.hist, s.nonfinite, s.parts.sq_norms, s["gradient_noise_scale"],
                trainscope.norm_test(grads), layers.stats(), trainscope.per_sample_grad_hist1d(grads, nbins=8))

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = compiled(grads)
    want = step(grads)
    assert counter.frame_count == 1
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("trainscope.per_sample_parts") for t in targets), targets
    assert any(t.startswith("trainscope.per_sample_stats_from_parts") for t in targets), targets
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("case", ["zero_dim_first", "batch_1", "batch_mismatch_1"])
def test_compile_bad_input_names_the_argument(case):
    """Under torch.compile the same bad input still gives an error naming the argument (tracing
    runs the fake kernel first, so it must not fail in its own way before the real checks)."""
    bad = {
        "zero_dim_first": ([torch.tensor(1.0), torch.zeros(4, 3)], r"per_sample_grads\[0\]"),
        "batch_1": ([torch.zeros(1, 3)], r"B = 1"),
        "batch_mismatch_1": ([torch.zeros(4, 3), torch.zeros(3, 4)], r"per_sample_grads\[1\]"),
    }
    grads, pattern = bad[case]
    torch._dynamo.reset()
    compiled = torch.compile(lambda g: trainscope.per_sample_stats(g).stats, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=pattern):
        compiled(grads)


# ------------------------------------------------------------------------------------------------
# CUDA only: asynchrony and graph capture (DESIGN.md: nothing in the step waits for the GPU)


@requires_cuda
@pytest.mark.parametrize("batch", [8, 30_000], ids=["fused", "composite"])
def test_cuda_no_synchronisation(batch):
    gen = torch.Generator().manual_seed(7)
    shapes = [(64, 32), (32,), (3, 4, 5)] if batch < 1000 else [(3,), (2, 2)]
    grads = random_grads(gen, batch, shapes, torch.float32, "cuda")
    trainscope.per_sample_stats(grads)  # warm-up (allocator, lazy init, kernel attributes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = trainscope.per_sample_stats(grads)
        p = trainscope.per_sample_parts(grads[:1]) + trainscope.per_sample_parts(grads[1:])
        p.stats()
        trainscope.norm_test(grads)
        trainscope.gradient_noise_scale(p)
        trainscope.per_sample_grad_hist1d(grads, nbins=1000)
        s.as_dict()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("batch", [8, 130, 30_000], ids=["fused", "fused_wide_batch", "composite"])
def test_cuda_graph_capture(batch):
    gen = torch.Generator().manual_seed(8)
    shapes = [(64, 32), (32,), (3, 4, 5), (3000,)] if batch < 1000 else [(3,), (2, 2)]
    static = random_grads(gen, batch, shapes, torch.float32, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        trainscope.per_sample_stats(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = trainscope.per_sample_stats(static, nbins=50)
    for replay in range(2):
        fresh = random_grads(gen, batch, shapes, torch.float32, "cuda")
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(out, fresh, 1e-5, "cuda", nbins=50)


@requires_cuda
@pytest.mark.parametrize("batch", [2, 3, 33, 128, 1000, 4000])
def test_cuda_batches_and_wide_tensors(batch):
    """Batch sizes that change the tile width the kernel picks, with tensors wider than many tiles
    and widths that are no multiple of any."""
    gen = torch.Generator().manual_seed(batch)
    shapes = [(1000,), (3,), (17, 3), (255,), (1,)] if batch >= 1000 else [(5000,), (3,), (17, 31), (257,), (1,)]
    for dtype in (torch.float32, torch.float64):
        grads = random_grads(gen, batch, shapes, dtype, "cuda")
        assert_matches_reference(trainscope.per_sample_stats(grads), grads, RTOL[dtype], "cuda")


@requires_cuda
def test_cuda_more_tensors_than_one_launch_group():
    """More than 96 tensors: the launcher takes several launches."""
    gen = torch.Generator().manual_seed(21)
    shapes = [((i * 37) % 300 + (0 if i % 11 else -((i * 37) % 300)),) for i in range(250)]
    grads = random_grads(gen, 5, shapes, torch.float32, "cuda")
    grads = [g.to(DTYPES[i % 4]) for i, g in enumerate(grads)]
    assert_matches_reference(trainscope.per_sample_stats(grads), grads, 1e-5, "cuda")


@requires_cuda
def test_cuda_matches_cpu(gen):
    grads = random_grads(gen, 7, [(40, 9), (9,), (3, 3, 3)], torch.float32)
    a = trainscope.per_sample_stats(grads)
    b = trainscope.per_sample_stats([g.cuda() for g in grads])
    torch.testing.assert_close(b.stats.cpu(), a.stats, rtol=1e-12, atol=0.0)
    assert_int_equal(b.hist, a.hist)
