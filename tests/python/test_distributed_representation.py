"""Representation metrics across ranks (gloo on CPU, 2 and 3 processes): RepresentationProbe on a
probe tensor cut over the ranks, and on per-rank iterables of uneven lengths (also of whole dict
batches, whole_batches=True), plain and under DDP, gives the dead units, active fractions and rank
measures of one process on the whole probe set (also when a rank gets no examples at all, and NaN
and -1 on every rank when one rank's part holds a NaN); RepresentationAccumulator raises the same
clear error on every rank when a rank added nothing or measured other layers. One spawn per world
size."""

import pytest
import torch
from torch import nn

import trainscope
import trainscope.distributed as tsd
from distributed_util import WORLD_SIZES, run_ranks

N, BATCH = 23, 4


def _model():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 16), nn.ReLU(),
                      nn.Linear(16, 8), nn.Tanh())
    with torch.no_grad():
        m[3].bias[:4] = -100.0  # four dead units
    return m.double()


def _probe_set():
    g = torch.Generator().manual_seed(9)
    return torch.randn(N, 2, 5, 5, generator=g, dtype=torch.float64)


def _nan_probe_set():
    """The probe set with a NaN in its last example, which only the last rank streams."""
    x = _probe_set()
    x[-1, 0, 0, 0] = float("nan")
    return x


def _as_dict(r: trainscope.RepresentationResult):
    name = tsd.clean_param_name  # without DDP's "module." prefix
    return {"layers": [name(n) for n in r.layers], "per_layer": r.per_layer,
            "active_fraction": {name(k): v for k, v in r.active_fraction.items()},
            "units": {name(k): v for k, v in r.units.items()},
            "observations": {name(k): v for k, v in r.observations.items()},
            "weights": {k: (v.effective_rank, v.approximate_rank, v.abs_approximate_rank, v.stable_rank)
                        for k, v in (r.weights or {}).items()}}


def _loader(rank, world_size):
    """This rank's own share as a list of batches of uneven sizes (rank 0 has the most)."""
    part = _probe_set().tensor_split(world_size)[rank]
    sizes = [3] * (len(part) // 3) + ([len(part) % 3] if len(part) % 3 else [])
    if rank == 0:
        sizes = [1] * len(part)
    return [(x, torch.zeros(len(x))) for x in part.split(sizes)]


def _ranks(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    out["tensor"] = _as_dict(trainscope.RepresentationProbe(_model(), _probe_set(), batch_size=BATCH, weights=True)())
    out["tiny"] = _as_dict(trainscope.RepresentationProbe(_model(), _probe_set()[:2], batch_size=BATCH)())
    out["svd"] = _as_dict(trainscope.RepresentationProbe(_model(), _probe_set(), batch_size=BATCH, method="svd")())
    out["loader"] = _as_dict(trainscope.RepresentationProbe(_model(), _loader(rank, world_size), batch_size=BATCH)())
    # Whole (dict) batches: a rank that runs out runs its last batch cut to zero rows.
    dicts = [{"x": x, "y": y} for x, y in _loader(rank, world_size)]
    out["whole"] = _as_dict(trainscope.RepresentationProbe(_model(), dicts, whole_batches=True,
                                                           forward=lambda m, b: m(b["x"]))())
    out["ddp"] = _as_dict(trainscope.RepresentationProbe(DDP(_model()), (_probe_set(), None), batch_size=BATCH)())
    out["this_process"] = _as_dict(trainscope.RepresentationProbe(
        _model(), _probe_set(), batch_size=BATCH, process_group=tsd.THIS_PROCESS)())
    out["nan"] = _as_dict(trainscope.RepresentationProbe(_model(), _nan_probe_set(), batch_size=BATCH)())

    errors = {}
    acc = trainscope.RepresentationAccumulator(["a"])
    if rank != 1:
        acc.add([torch.rand(3, 4)])
    try:
        acc.result()
    except RuntimeError as e:
        errors["no_batch"] = str(e)
    acc = trainscope.RepresentationAccumulator(["a"])
    acc.add([torch.rand(3, 4 + (rank == 1))])
    try:
        acc.result()
    except RuntimeError as e:
        errors["units"] = str(e)
    out["errors"] = errors
    return out


def _assert_same(got, want, rtol=1e-9):
    assert got["layers"] == want["layers"]
    assert got["units"] == want["units"]
    assert got["observations"] == want["observations"]
    for name, t in want["per_layer"].items():
        assert got["per_layer"][name].dtype == t.dtype, name
        if t.dtype == torch.int64:
            assert torch.equal(got["per_layer"][name], t), name
        else:
            torch.testing.assert_close(got["per_layer"][name], t, rtol=rtol, atol=0, equal_nan=True)
    for layer, f in want["active_fraction"].items():
        assert torch.equal(got["active_fraction"][layer], f), layer


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_representation_across_ranks_equal_the_whole_probe_set(world_size):
    results = run_ranks(world_size, _ranks)
    x = _probe_set()
    want = _as_dict(trainscope.RepresentationProbe(_model(), x, batch_size=BATCH, weights=True)())
    assert int(want["per_layer"]["dead_units"][1]) >= 4
    tiny = _as_dict(trainscope.RepresentationProbe(_model(), x[:2], batch_size=BATCH)())
    svd = _as_dict(trainscope.RepresentationProbe(_model(), x, batch_size=BATCH, method="svd")())
    nan_want = _as_dict(trainscope.RepresentationProbe(_model(), _nan_probe_set(), batch_size=BATCH)())
    for rank, res in enumerate(results):
        for key in ("tensor", "loader", "whole", "ddp"):
            _assert_same(res[key], want)
        _assert_same(res["tiny"], tiny, rtol=1e-7)  # ΦᵀΦ summed vs one process's smaller ΦΦᵀ
        _assert_same(res["svd"], svd, rtol=1e-7)
        # Weights: whole on every rank here (no sharding), so the same as one process.
        assert res["tensor"]["weights"].keys() == want["weights"].keys()
        for layer, measures in want["weights"].items():
            for a, b in zip(res["tensor"]["weights"][layer], measures):
                torch.testing.assert_close(a, b)
        # A NaN on one rank makes the summed Gram matrices NaN: the rank measures are undefined on
        # every rank (NaN and -1), the dead units are counted as one process counts them.
        _assert_same(res["nan"], nan_want)
        assert res["nan"]["per_layer"]["approximate_rank"].tolist() == [-1, -1, -1]
        assert torch.isnan(res["nan"]["per_layer"]["effective_rank"]).all()
        # THIS_PROCESS: the whole probe set on this rank alone, no splitting.
        _assert_same(res["this_process"], want)
        assert res["tensor"]["observations"] == {"1": N * 3 * 3, "4": N, "6": N}
        assert "rank 1 of the process group has added no batch" in res["errors"]["no_batch"]
        assert "rank 1 measured layers ['a'] with units [5]" in res["errors"]["units"]
