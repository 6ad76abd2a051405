"""Bad input to every public function: a correct result or an error naming the argument.

Cases are grouped by class of bad input, as PyTorch's OpInfo ``error_inputs`` are. Each names the
call, the exception types allowed, and a pattern the message must match (the argument's name).
"""

from __future__ import annotations

import math

import pytest
import torch

import trainscope

# ------------------------------------------------------------------------------------------------
# Histogram arguments: nbins an integer in [1, 2^20], maxval finite, positive, normal bin width


def _g():
    return [torch.randn(3, 4)]


HIST_ARGUMENT_CASES = {
    "nbins=2.7": (lambda: trainscope.grad_hist1d(_g(), nbins=2.7), TypeError, "nbins"),
    "nbins=None": (lambda: trainscope.grad_hist1d(_g(), nbins=None), TypeError, "nbins"),
    "nbins=True": (lambda: trainscope.grad_hist1d(_g(), nbins=True), TypeError, "nbins"),
    "nbins=0": (lambda: trainscope.grad_hist1d(_g(), nbins=0), ValueError, "nbins"),
    "nbins=2**21": (lambda: trainscope.grad_hist1d(_g(), nbins=2**21), ValueError, "nbins"),
    "maxval=None": (lambda: trainscope.grad_hist1d(_g(), maxval=None), TypeError, "maxval"),
    "maxval='0.1'": (lambda: trainscope.grad_hist1d(_g(), maxval="0.1"), TypeError, "maxval"),
    "maxval=inf": (lambda: trainscope.grad_hist1d(_g(), maxval=math.inf), ValueError, "maxval"),
    "maxval=nan": (lambda: trainscope.grad_hist1d(_g(), maxval=math.nan), ValueError, "maxval"),
    "maxval=0": (lambda: trainscope.grad_hist1d(_g(), maxval=0.0), ValueError, "maxval"),
    "maxval=1e-320": (lambda: trainscope.grad_hist1d(_g(), maxval=1e-320), ValueError, "maxval"),
    "maxval=1e-307 nbins=2**20": (lambda: trainscope.grad_hist1d(_g(), nbins=2**20, maxval=1e-307),
                                  ValueError, "maxval"),
    "hist_bin_edges(100, inf)": (lambda: trainscope.hist_bin_edges(100, math.inf), ValueError, "maxval"),
    "hist_bin_edges(2**40)": (lambda: trainscope.hist_bin_edges(2**40), ValueError, "nbins"),
    "op maxval=1e-310": (lambda: torch.ops.trainscope.param_stats(_g(), [], [], [], True, 100, 1e-310, False),
                         RuntimeError, "maxval"),
    "op nbins=2**21": (lambda: torch.ops.trainscope.param_stats(_g(), [], [], [], True, 2**21, 0.05, False),
                       RuntimeError, "nbins"),
    "per_sample_stats nbins=1.5": (lambda: trainscope.per_sample_stats([torch.randn(4, 3)], nbins=1.5),
                                   TypeError, "nbins"),
    "grad_hist2d maxval_param=-1": (lambda: trainscope.grad_hist2d([torch.randn(2, 3)], [torch.randn(3)],
                                                                   maxval_param=-1.0), ValueError, "maxval_param"),
    "Monitor nbins=2**21": (lambda: trainscope.Monitor(torch.nn.Linear(2, 2), nbins=2**21), ValueError, "nbins"),
    "Monitor maxval=None": (lambda: trainscope.Monitor(torch.nn.Linear(2, 2), maxval=None), TypeError, "maxval"),
}


@pytest.mark.parametrize("case", sorted(HIST_ARGUMENT_CASES))
def test_histogram_arguments(case):
    call, error, pattern = HIST_ARGUMENT_CASES[case]
    with pytest.raises(error, match=pattern):
        call()


def test_histogram_arguments_that_are_fine():
    import numpy as np
    g = _g()
    want = trainscope.grad_hist1d(g, nbins=10, maxval=0.5)
    for nbins in (np.int64(10), torch.tensor(10)):
        assert torch.equal(trainscope.grad_hist1d(g, nbins=nbins, maxval=0.5), want)
    assert torch.equal(trainscope.grad_hist1d(g, nbins=10, maxval=np.float32(0.5)), want)
    # The smallest maxval accepted still puts outliers in the edge bins (SPEC.md §4).
    tiny = 2**20 * 2.3e-308
    h = trainscope.grad_hist1d([torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)], nbins=2**20, maxval=tiny)
    assert h[0] == 1 and h[-1] == 1 and h.sum() == 3


# ------------------------------------------------------------------------------------------------
# Devices: a meta tensor among real ones (dispatched to the fake kernel) is an error naming it


DEVICE_CASES = {
    "grad_norm": (lambda m: trainscope.grad_norm([torch.randn(3), m]), r"grads\[1\]"),
    "update_size": (lambda m: trainscope.update_size([torch.randn(3)], [m]), r"prev_params\[0\]"),
    "distance": (lambda m: trainscope.distance([torch.randn(3)], [m]), r"init_params\[0\]"),
    "grad_hist1d": (lambda m: trainscope.grad_hist1d([m, torch.randn(3)]), r"grads\[1\]"),
    "per_sample_stats": (lambda m: trainscope.per_sample_stats([torch.randn(4, 3), m.expand(4, 3)]),
                         r"per_sample_grads\[1\]"),
    "grad_hist2d": (lambda m: trainscope.grad_hist2d([torch.randn(2, 3)], [m]), r"params\[0\]"),
    "active_counts": (lambda m: torch.ops.trainscope.add_active_counts_(torch.zeros(3, dtype=torch.int64),
                                                                        m.reshape(1, 3)), "acts"),
}


@pytest.mark.parametrize("case", sorted(DEVICE_CASES))
def test_meta_tensor_among_real_ones(case):
    call, pattern = DEVICE_CASES[case]
    for _ in range(3):  # never a value that changes from call to call
        with pytest.raises(RuntimeError, match=pattern):
            call(torch.empty(3, device="meta"))


def test_all_meta_is_shape_propagation():
    m = torch.empty(3, device="meta")
    assert trainscope.grad_norm([m, m]).device.type == "meta"


# ------------------------------------------------------------------------------------------------
# Wrong Python types


def test_loss_of_none_names_losses():
    with pytest.raises(TypeError, match="losses"):
        trainscope.loss(None)


# ------------------------------------------------------------------------------------------------
# The sweep: every tensor-taking public function through every class of bad input.
#
# Each API entry gives good inputs (a tuple of positional arguments: tensors, or lists of
# tensors), the name each argument goes by in messages, and what each argument is (a list of
# tensors paired by position, one tensor, a matrix, per-sample gradients [B, ...]). Each class of
# bad input turns one argument of the good inputs into a bad one and says what must happen:
# "error": an exception of an allowed type whose message names the argument;
# "same": a result equal to the one on the equivalent well-formed input (layouts, grad, inference);
# "runs": a result, no exception (NaN and Inf: the families' own tests check the values).

import dataclasses
from dataclasses import dataclass
from typing import Callable, Tuple

ERRORS = (RuntimeError, ValueError, TypeError)


@dataclass(frozen=True)
class Api:
    name: str
    call: Callable
    good: Callable[[torch.Generator], tuple]
    args: Tuple[Tuple[str, str], ...]  # per argument: (its names in messages, separated by |, its kind)
    paired: bool = False               # the list arguments are paired element by element
    any_batch: bool = False            # per-sample arguments of any B >= 1 (histograms need no pairs)


def _r(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _pl(gen):  # a list of parameter-like tensors
    return [_r(gen, 5, 4), _r(gen, 4), _r(gen, 2, 3, 2)]


def _ps(gen):  # per-sample gradients of those, B = 6
    return [_r(gen, 6, 5, 4), _r(gen, 6, 4), _r(gen, 6, 2, 3, 2)]


APIS = [
    Api("grad_norm", lambda g: trainscope.grad_norm(g, per_tensor=True), lambda gen: (_pl(gen),),
        (("grads", "list"),)),
    Api("grad_magnitude", lambda g: trainscope.grad_magnitude(g), lambda gen: (_pl(gen),), (("grads", "list"),)),
    Api("weight_magnitude", lambda p: trainscope.weight_magnitude(p, matrices_only=True), lambda gen: (_pl(gen),),
        (("params", "list"),)),
    Api("nonfinite_count", lambda t: trainscope.nonfinite_count(t), lambda gen: (_pl(gen),),
        (("tensors|grads", "list"),)),
    Api("grad_hist1d", lambda t: trainscope.grad_hist1d(t, per_tensor=True), lambda gen: (_pl(gen),),
        (("tensors|grads", "list"),)),
    Api("distance", lambda p, p0: trainscope.distance(p, p0), lambda gen: (_pl(gen), _pl(gen)),
        (("params", "list"), ("init_params", "list")), paired=True),
    Api("update_size", lambda p, pp: trainscope.update_size(p, pp), lambda gen: (_pl(gen), _pl(gen)),
        (("params", "list"), ("prev_params", "list")), paired=True),
    Api("param_stats", lambda g, p, p0, pp: trainscope.param_stats(g, p, p0, pp),
        lambda gen: (_pl(gen), _pl(gen), _pl(gen), _pl(gen)),
        (("grads", "list"), ("params", "list"), ("init_params", "list"), ("prev_params", "list")), paired=True),
    Api("per_sample_stats", lambda g: trainscope.per_sample_stats(g), lambda gen: (_ps(gen),),
        (("per_sample_grads", "per_sample"),)),
    Api("per_sample_parts", lambda g: trainscope.per_sample_parts(g), lambda gen: (_ps(gen),),
        (("per_sample_grads", "per_sample"),)),
    Api("norm_test", lambda g: trainscope.norm_test(g), lambda gen: (_ps(gen),),
        (("per_sample_grads|per_sample", "per_sample"),)),
    Api("per_sample_grad_hist1d", lambda g: trainscope.per_sample_grad_hist1d(g), lambda gen: (_ps(gen),),
        (("per_sample_grads", "per_sample"),)),
    Api("grad_hist2d", lambda g, p: trainscope.grad_hist2d(g, p), lambda gen: (_ps(gen), _pl(gen)),
        (("per_sample_grads", "per_sample"), ("params", "list")), paired=True, any_batch=True),
    Api("dead_units", lambda a: trainscope.dead_units(a), lambda gen: (_r(gen, 20, 6).relu(),),
        (("acts", "matrix"),)),
    Api("active_counts", lambda a: trainscope.active_counts(a, "tanh"), lambda gen: (_r(gen, 20, 3, 4).tanh(),),
        (("acts", "matrix"),)),
    Api("linear_per_sample_parts", lambda x, d: trainscope.linear_per_sample_parts(x, d),
        lambda gen: (_r(gen, 6, 5), _r(gen, 6, 3)), (("input", "matrix"), ("grad_output", "matrix"))),
    Api("loss", lambda x: trainscope.loss(x), lambda gen: (_r(gen, 8).abs(),), (("losses", "tensor"),)),
    Api("rank_measures", lambda m: trainscope.rank_measures(m), lambda gen: (_r(gen, 30, 7),),
        (("m|matrices", "matrix"),)),
    Api("effective_rank-svd", lambda m: trainscope.effective_rank(m, method="svd"), lambda gen: (_r(gen, 9, 12),),
        (("m|matrices", "matrix"),)),
    Api("rank_measures-list", lambda m: trainscope.rank_measures(m), lambda gen: ([_r(gen, 30, 7), _r(gen, 5, 9)],),
        (("m|matrices", "matrix_list"),)),
    Api("rank_measures_from_singular_values", lambda s: trainscope.rank_measures_from_singular_values(s),
        lambda gen: (_r(gen, 4, 6).abs().sort(dim=1, descending=True).values,), (("sigma", "tensor"),)),
]


def _non_contiguous(t):
    """The same values in a transposed (column-major) layout."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2]  # a strided view
    out = torch.empty(t.shape[::-1], dtype=t.dtype).permute(*reversed(range(t.dim())))
    return out.copy_(t)


def _stride0(t):
    """Values constant along dim 0, stored once (an expanded tensor)."""
    return t[:1].expand_as(t) if t.dim() >= 1 and t.shape[0] > 0 else t


def _inference(t):
    with torch.inference_mode():
        return t.clone()


def _map(arg, kind, fn):
    """Applies fn to the tensor of a tensor argument, or to the first tensor of a list argument."""
    if kind in ("list", "per_sample", "matrix_list"):
        return [fn(arg[0])] + list(arg[1:])
    return fn(arg)


# Each class: (id, applies to kinds, turns the argument bad, expected outcome, reference maker).
def _classes():
    nan = lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("nan"))  # noqa: E731
    inf = lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf"))  # noqa: E731
    return [
        ("None", ("tensor", "matrix"), lambda a, k: None, "error"),
        ("a number", ("list", "per_sample", "tensor", "matrix", "matrix_list"), lambda a, k: 3.0, "error"),
        ("a string", ("list", "per_sample", "tensor", "matrix", "matrix_list"), lambda a, k: "grads", "error"),
        ("None in the list", ("list", "per_sample", "matrix_list"), lambda a, k: [None] + list(a[1:]), "error"),
        ("int64 tensor", ("list", "per_sample", "tensor", "matrix", "matrix_list"),
         lambda a, k: _map(a, k, lambda t: t.to(torch.int64)), "error"),
        ("bool tensor", ("list", "per_sample", "tensor", "matrix", "matrix_list"),
         lambda a, k: _map(a, k, lambda t: t > 0), "error"),
        ("complex tensor", ("list", "per_sample", "tensor", "matrix", "matrix_list"),
         lambda a, k: _map(a, k, lambda t: t.to(torch.complex64)), "error"),
        ("0-d where a matrix is needed", ("matrix",), lambda a, k: a.sum(), "error"),
        ("1-d where a matrix is needed", ("matrix",), lambda a, k: a.reshape(-1), "error"),
        ("B = 1", ("per_sample",), lambda a, k: [t[:1] for t in a], "error unless any B"),
        ("B = 0", ("per_sample",), lambda a, k: [t[:0] for t in a], "error unless any B"),
        ("per-sample batches differ", ("per_sample",), lambda a, k: [a[0][:3]] + list(a[1:]), "error"),
        ("NaN", ("list", "per_sample", "tensor", "matrix", "matrix_list"), lambda a, k: _map(a, k, nan), "runs"),
        ("Inf", ("list", "per_sample", "tensor", "matrix", "matrix_list"), lambda a, k: _map(a, k, inf), "runs"),
        ("an empty tensor in the list", ("list", "per_sample"), lambda a, k: list(a) + [a[0][..., :0]], "runs"),
        ("non-contiguous", ("list", "per_sample", "tensor", "matrix", "matrix_list"),
         lambda a, k: _map(a, k, _non_contiguous), "same"),
        ("stride 0", ("list", "per_sample", "tensor", "matrix", "matrix_list"), lambda a, k: _map(a, k, _stride0), "same"),
        ("requires grad", ("list", "per_sample", "tensor", "matrix", "matrix_list"),
         lambda a, k: _map(a, k, lambda t: t.clone().requires_grad_()), "same"),
        ("inference tensor", ("list", "per_sample", "tensor", "matrix", "matrix_list"), lambda a, k: _map(a, k, _inference), "same"),
    ]


def _paired_classes():
    return [
        ("lists of different lengths", lambda a: list(a[:-1]), "error"),
        ("shapes differ", lambda a: [a[0].reshape(-1)] + list(a[1:]), "error"),
        ("dtypes differ", lambda a: [a[0].double()] + list(a[1:]), "error"),
    ]


def _sweep_cases():
    cases = []
    for api in APIS:
        for i, (names, kind) in enumerate(api.args):
            for cid, kinds, bad, outcome in _classes():
                if kind in kinds:
                    cases.append(pytest.param(api, i, bad, outcome, id=f"{api.name}-{names.split('|')[0]}-{cid}"))
            if api.paired and kind == "list" and i > 0:
                for cid, bad, outcome in _paired_classes():
                    cases.append(pytest.param(api, i, (lambda b: lambda a, k: b(a))(bad), outcome,
                                              id=f"{api.name}-{names.split('|')[0]}-{cid}"))
    return cases


def _tensors_of(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if dataclasses.is_dataclass(result):
        return [t for f in dataclasses.fields(result) for t in _tensors_of(getattr(result, f.name))]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors_of(r)]
    return []


def _plain(arg):
    """The well-formed equivalent of an argument: contiguous, detached, not an inference tensor."""
    if isinstance(arg, torch.Tensor):
        return arg.detach().clone(memory_format=torch.contiguous_format) if not arg.is_inference() else \
            torch.tensor(arg.tolist(), dtype=arg.dtype)
    if isinstance(arg, list):
        return [_plain(t) for t in arg]
    return arg


@pytest.mark.parametrize("api,index,bad,outcome", _sweep_cases())
def test_bad_input_sweep(api, index, bad, outcome, gen):
    args = list(api.good(gen))
    names, kind = api.args[index]
    args[index] = bad(args[index], kind)
    if outcome == "error unless any B":
        outcome = "runs" if api.any_batch else "error"
    if outcome == "runs" and api.paired and len(args[index]) > len(api.good(gen)[index]):
        # An empty tensor added to one list is added to its partners too: lists stay paired.
        for j, (_, other_kind) in enumerate(api.args):
            if j != index:
                args[j] = list(args[j]) + [args[j][0][..., :0]]
    if outcome == "error":
        with pytest.raises(ERRORS) as info:
            api.call(*args)
        message = str(info.value)
        assert any(n in message for n in names.split("|")), \
            f"{api.name}: the message does not name {names!r}: {message}"
        return
    result = api.call(*args)
    got = _tensors_of(result)
    assert got, f"{api.name} returned no tensors: {result!r}"
    if outcome == "same":
        want = _tensors_of(api.call(*[_plain(a) for a in args]))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, (g, w)
            assert not g.requires_grad, f"{api.name}: a result requires grad"
            if g.is_floating_point():
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12, equal_nan=True)
            else:
                assert torch.equal(g, w), (g, w)


# ------------------------------------------------------------------------------------------------
# A CPU-only build (CMake option TRAINSCOPE_CUDA) and CUDA tensors: every function of the sweep and
# every object a training loop builds refuses them, saying the library was built without CUDA.
# Without a GPU the CUDA tensors only say they are on cuda:0 (host memory behind them, which the
# library must not read): enough for the functions, which refuse them before any work, but not for
# the objects that first make device tensors themselves (a model's forward pass, say), which need
# a GPU. tests/cpp/test_device_check.cpp checks the same in C++.

cpu_only_build = pytest.mark.skipif(trainscope.built_with_cuda(), reason="a build with CUDA runs CUDA tensors")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BUILT_WITHOUT_CUDA = r"is on cuda:\d+; this trainscope was built without CUDA"


def _on_cuda(t):
    """``t`` on cuda:0: a copy on the GPU, or without one a tensor that only says it is there."""
    if torch.cuda.is_available():
        return t.cuda()
    host = t.detach().clone(memory_format=torch.contiguous_format)
    try:
        storage = torch._C._construct_storage_from_data_pointer(
            host.data_ptr(), torch.device("cuda", 0), host.untyped_storage().nbytes())
        out = torch._C._construct_CUDA_Tensor_From_Storage_And_Metadata(
            {"size": tuple(host.shape), "stride": host.stride(), "storage_offset": 0, "dtype": host.dtype,
             "requires_grad": False},
            torch.storage.TypedStorage(wrap_storage=storage, dtype=host.dtype, _internal=True))
    except (AttributeError, RuntimeError, TypeError) as e:  # private constructors of this torch
        pytest.skip(f"this torch makes no CUDA tensor without a GPU: {e}")
    out._host = host  # the memory behind it lives as long as it does
    return out


def _cuda(arg):
    if isinstance(arg, torch.Tensor):
        return _on_cuda(arg)
    return [_cuda(a) for a in arg] if isinstance(arg, list) else arg


@cpu_only_build
@pytest.mark.parametrize("api", APIS, ids=lambda api: api.name)
def test_cpu_only_build_refuses_cuda_tensors(api, gen):
    args = [_cuda(a) for a in api.good(gen)]
    assert all(t.device.type == "cuda" for a in args for t in (a if isinstance(a, list) else [a]))
    with pytest.raises(RuntimeError, match=BUILT_WITHOUT_CUDA):
        api.call(*args)


def _per_sample_hooks_step():
    model = _mlp().cuda()
    with trainscope.PerSampleHooks(model) as hooks:
        model(torch.randn(6, 3, device="cuda")).square().mean().backward()
        return hooks.stats()


# Objects, and functions the sweep leaves out.
CPU_ONLY_OBJECT_CASES = {
    "Monitor": lambda: trainscope.Monitor([("w", _on_cuda(torch.randn(4, 3))), ("b", _on_cuda(torch.randn(4)))]),
    "RepresentationAccumulator.add": lambda: trainscope.RepresentationAccumulator(["fc"]).add(
        [_on_cuda(torch.randn(5, 4))]),
    "dead_units_from_counts": lambda: trainscope.dead_units_from_counts(
        _on_cuda(torch.zeros(4, dtype=torch.int64)), 5),
    # These make device tensors before they reach the library: a GPU only.
    "DeadUnitCounter.add": pytest.param(lambda: trainscope.DeadUnitCounter().add(torch.randn(5, 4, device="cuda")),
                                        marks=needs_gpu),
    "RepresentationProbe": pytest.param(lambda: trainscope.RepresentationProbe(
        _mlp().cuda(), torch.randn(5, 3, device="cuda"))(), marks=needs_gpu),
    "PerSampleHooks": pytest.param(_per_sample_hooks_step, marks=needs_gpu),
    "weight_rank_measures": pytest.param(lambda: trainscope.weight_rank_measures(_mlp().cuda()), marks=needs_gpu),
}


@cpu_only_build
@pytest.mark.parametrize("call", CPU_ONLY_OBJECT_CASES.values(), ids=CPU_ONLY_OBJECT_CASES.keys())
def test_cpu_only_build_objects_refuse_cuda_tensors(call):
    with pytest.raises(RuntimeError, match=BUILT_WITHOUT_CUDA):
        call()


# ------------------------------------------------------------------------------------------------
# Arguments that make no sense for one function


def test_impossible_dead_unit_counts_are_nan_not_dead():
    counts = torch.tensor([5, -1, 2, 0, 4], dtype=torch.int64)  # 5 of 4 observations, and -1
    d = trainscope.dead_units_from_counts(counts, 4)
    f = d.active_fraction
    assert math.isnan(f[0]) and math.isnan(f[1])
    assert f[2:].tolist() == [0.5, 0.0, 1.0]
    assert int(d.count) == 1  # only unit 3; -1 is not "never active"
    assert float(d.fraction) == pytest.approx(1 / 5)
    for bad, error in ((-1, ValueError), (2.5, TypeError), (None, TypeError)):
        with pytest.raises(error, match="observations"):
            trainscope.dead_units_from_counts(counts, bad)
    with pytest.raises(TypeError, match="counts"):
        trainscope.dead_units_from_counts([1, 2], 4)


def _prev_that(kind):
    p = torch.randn(6)
    if kind == "requires grad":
        return p.clone().requires_grad_()
    if kind == "inference":
        with torch.inference_mode():
            return p.clone()
    return p[:1].expand(6)  # stride 0


@pytest.mark.parametrize("kind,pattern", [("requires grad", "requires grad"), ("inference", "inference tensor"),
                                          ("stride 0", "share memory")])
def test_refresh_prev_refuses_a_prev_it_cannot_write(kind, pattern):
    prev = _prev_that(kind)
    before = prev.detach().clone()
    with pytest.raises(RuntimeError, match=r"prev_params\[0\].*" + pattern):
        trainscope.update_size([torch.randn(6)], [prev], refresh_prev=True)
    assert torch.equal(prev.detach(), before)  # left untouched
    # Read without refreshing, the same tensors are fine.
    assert torch.isfinite(trainscope.update_size([torch.randn(6)], [prev]))


def test_refresh_prev_on_an_inference_tensor_inside_inference_mode():
    with torch.inference_mode():
        p, prev = torch.randn(6), torch.randn(6)
        trainscope.update_size([p], [prev], refresh_prev=True)
        assert torch.equal(prev, p)


def test_a_loss_with_grad_gives_a_measurement_without_one():
    x = torch.rand(8, requires_grad=True)
    out = trainscope.loss(x)
    assert not out.requires_grad and out.grad_fn is None
    assert float(out) == pytest.approx(float(x.detach().mean()))


@pytest.mark.parametrize("bad", [3.0, "grads", b"x", object()])
def test_a_list_argument_that_is_no_list_names_it(bad):
    with pytest.raises(TypeError, match="grads"):
        trainscope.grad_norm(bad)


# ------------------------------------------------------------------------------------------------
# Objects a training loop builds: wrong arguments fail at construction, naming the argument


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


CONSTRUCTOR_CASES = {
    "Monitor(None)": (lambda: trainscope.Monitor(None), "model_or_named_params"),
    "Monitor(a tensor)": (lambda: trainscope.Monitor(torch.randn(3)), "model_or_named_params"),
    "Monitor(nbins=0)": (lambda: trainscope.Monitor(_mlp(), nbins=0), "nbins"),
    "Monitor(ring_slots=0)": (lambda: trainscope.Monitor(_mlp(), ring_slots=0), "ring_slots"),
    "PerSampleHooks(None)": (lambda: trainscope.PerSampleHooks(None), "model"),
    "PerSampleHooks(layers=[5])": (lambda: trainscope.PerSampleHooks(_mlp(), layers=[5]), "layers"),
    "PerSampleHooks(method='x')": (lambda: trainscope.PerSampleHooks(_mlp(), method="x"), "method"),
    "PerSampleHooks(loss_reduction='avg')": (lambda: trainscope.PerSampleHooks(_mlp(), loss_reduction="avg"),
                                             "loss_reduction"),
    "RepresentationProbe(None, x)": (lambda: trainscope.RepresentationProbe(None, torch.randn(5, 3)), "model"),
    "RepresentationProbe(model, None)": (lambda: trainscope.RepresentationProbe(_mlp(), None), "probe_set"),
    "RepresentationProbe(batch_size=0)": (lambda: trainscope.RepresentationProbe(_mlp(), torch.randn(5, 3),
                                                                                 batch_size=0), "batch_size"),
    "RepresentationProbe(kind='swish')": (lambda: trainscope.RepresentationProbe(_mlp(), torch.randn(5, 3),
                                                                                 kind="swish"), "kind"),
    "RepresentationAccumulator(None)": (lambda: trainscope.RepresentationAccumulator(None), "names"),
    "DeadUnitCounter(kind='swish')": (lambda: trainscope.DeadUnitCounter(kind="swish"), "kind"),
    "DeadUnitCounter(eps=2)": (lambda: trainscope.DeadUnitCounter(eps=2), "eps"),
    "weight_rank_measures(None)": (lambda: trainscope.weight_rank_measures(None), "model"),
    "JsonlSink(None)": (lambda: trainscope.JsonlSink(None), "path"),
    "CsvSink('')": (lambda: trainscope.CsvSink(""), "path"),
    "TensorBoardSink(None)": (lambda: trainscope.TensorBoardSink(None), "log_dir"),
    "every(0)": (lambda: trainscope.every(0), "k"),
    "every(2.5)": (lambda: trainscope.every(2.5), "k"),
    "log_spaced(0)": (lambda: trainscope.log_spaced(0), "per_decade"),
    "at_steps(None)": (lambda: trainscope.at_steps(None), "steps"),
    "hist2d_bin_edges(None)": (lambda: trainscope.hist2d_bin_edges(None), "nbins_grad"),
    "histogram_summary(edges, counts) lengths": (
        lambda: trainscope.histogram_summary(torch.linspace(-1, 1, 5), torch.ones(3, dtype=torch.int64)), "edges"),
}


@pytest.mark.parametrize("case", sorted(CONSTRUCTOR_CASES))
def test_constructors_and_factories(case):
    call, name = CONSTRUCTOR_CASES[case]
    with pytest.raises(ERRORS, match=name):
        call()


def test_probe_set_as_a_numpy_array_is_a_tensor():
    import numpy as np
    model = _mlp()
    x = np.random.default_rng(0).standard_normal((40, 3))
    got = trainscope.RepresentationProbe(model, x)()
    want = trainscope.RepresentationProbe(model, torch.as_tensor(x, dtype=torch.float32))()
    for k in got.per_layer:
        assert torch.equal(got.per_layer[k], want.per_layer[k]), k
