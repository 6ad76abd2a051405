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
