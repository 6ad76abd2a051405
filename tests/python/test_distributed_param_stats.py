"""Parameter metrics across ranks (gloo on CPU, 2 and 3 processes): every metric equals the
single-process result on the whole tensors, for sharded (FSDP-style, including real FSDP2) and
replicated (DDP-style, including real DDP) parameters."""

import pytest
import torch

import trainscope
import trainscope.distributed as tsd
from distributed_util import WORLD_SIZES, fully_shard_linears, run_ranks

NBINS, MAXVAL = 16, 0.05


def _full_tensors(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(7, 5), (3,), (2,), (4, 3, 2)]  # (2,) leaves a rank without elements at W = 3
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    init = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
    prev = [p + 0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
    grads = [0.03 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
    grads[0].view(-1)[3] = float("nan")  # non-finite counts add up too
    losses = torch.rand(10, generator=g, dtype=torch.float64).to(dtype)
    return grads, params, init, prev, losses


def _shard(t, rank, world_size):
    return t.flatten().tensor_split(world_size)[rank].clone()  # uneven flat shards, FSDP1-like


def _as_tuple(s: trainscope.ParamStats):
    return (s.metrics, s.per_tensor, s.nonfinite, s.nonfinite_per_tensor, s.hist, s.hist_per_tensor,
            s.loss)


def _ranks_param_stats(rank, world_size):
    out = {"rank_size": tsd.rank_and_size(), "is_distributed": tsd.is_distributed()}
    for dtype in (torch.float32, torch.float64):
        grads, params, init, prev, losses = _full_tensors(dtype)
        dims = [p.dim() for p in params]
        shard = lambda ts: [_shard(t, rank, world_size) for t in ts]  # noqa: E731
        local_losses = losses.tensor_split(world_size)[rank]
        prev_shards = shard(prev)
        s = tsd.param_stats_across_ranks(shard(grads), shard(params), shard(init), prev_shards,
                                         placements="sharded", full_dims=dims, nbins=NBINS, maxval=MAXVAL,
                                         weight_magnitude_of="matrices", refresh_prev=True, losses=local_losses)
        out[("sharded", dtype)] = _as_tuple(s)
        out[("refreshed", dtype)] = all(torch.equal(a, b) for a, b in zip(prev_shards, shard(params)))
        # DDP-style: every rank holds everything; rank 1's copy differs, and must not count.
        noisy = [g + 1.0 if rank == 1 else g for g in grads]
        r = tsd.param_stats_across_ranks(noisy, params, init, prev, placements="replicated",
                                         nbins=NBINS, maxval=MAXVAL)
        out[("replicated", dtype)] = _as_tuple(r)
        # Mixed: the matrices sharded, the vectors replicated.
        pl = ["sharded" if p.dim() >= 2 else "replicated" for p in params]
        parts = lambda ts: [_shard(t, rank, world_size) if q == "sharded" else t  # noqa: E731
                            for t, q in zip(ts, pl)]
        m = tsd.param_stats_across_ranks(parts(grads), parts(params), placements=pl, full_dims=dims,
                                         histogram=False)
        out[("mixed", dtype)] = _as_tuple(m)
    out["loss"] = tsd.loss_across_ranks(_full_tensors(torch.float32)[4].tensor_split(world_size)[rank])
    try:
        tsd.param_stats_across_ranks([torch.ones(3)], placements=["sharded", "sharded"])
    except ValueError as e:
        out["error"] = str(e)
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_param_stats_across_ranks_equal_single_process(world_size):
    results = run_ranks(world_size, _ranks_param_stats)
    for dtype in (torch.float32, torch.float64):
        grads, params, init, prev, losses = _full_tensors(dtype)
        ref = trainscope.param_stats(grads, params, init, prev, nbins=NBINS, maxval=MAXVAL,
                                     weight_magnitude_of="matrices", losses=losses)
        ref_all = trainscope.param_stats(grads, params, init, prev, nbins=NBINS, maxval=MAXVAL)
        ref_gp = trainscope.param_stats(grads, params, histogram=False)
        tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
        for rank, res in enumerate(results):
            assert res["rank_size"] == (rank, world_size)
            assert res["is_distributed"]
            for key, want in ((("sharded", dtype), ref), (("replicated", dtype), ref_all),
                              (("mixed", dtype), ref_gp)):
                got = res[key]
                assert got[0].dtype == want.metrics.dtype, key
                torch.testing.assert_close(got[0], want.metrics, equal_nan=True, **tol)
                torch.testing.assert_close(got[1], want.per_tensor, equal_nan=True, **tol)
                assert torch.equal(got[2], want.nonfinite) and torch.equal(got[3], want.nonfinite_per_tensor)
                assert torch.equal(got[4], want.hist) and torch.equal(got[5], want.hist_per_tensor), key
            torch.testing.assert_close(res[("sharded", dtype)][6], ref.loss, **tol)
            assert res[("refreshed", dtype)]
        # Every rank holds the same values.
        for res in results[1:]:
            for key in (("sharded", dtype), ("replicated", dtype)):
                for a, b in zip(res[key][:6], results[0][key][:6]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(results[0]["loss"], _full_tensors(torch.float32)[4].mean())
    assert "placements has 2 entries" in results[0]["error"]


# -- real DDP and FSDP2 models --------------------------------------------------------------------

def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))


def _batch(rank, world_size):
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
    return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]


def _ranks_models(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    x, y = _batch(rank, world_size)
    # DDP: replicated parameters, gradients averaged by DDP itself.
    ddp = DDP(_model())
    layout = tsd.param_layout(ddp)
    ddp_losses = torch.nn.functional.cross_entropy(ddp(x), y, reduction="none")
    ddp_losses.mean().backward()
    s = tsd.param_stats_across_ranks(layout.grads(), layout.params, layout=layout, nbins=NBINS, maxval=MAXVAL,
                                     losses=ddp_losses.detach())
    out["ddp"] = (layout.names, layout.placements, _as_tuple(s))
    out["ddp_local"] = _as_tuple(trainscope.param_stats([p.grad for p in ddp.parameters()], list(ddp.parameters()),
                                                        nbins=NBINS, maxval=MAXVAL))
    # FSDP2: every parameter a DTensor sharded on dim 0 over the mesh.
    model = fully_shard_linears(_model(), world_size)
    layout = tsd.param_layout(model)
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    # Scaled so that FSDP's averaging over ranks gives the gradient of the whole batch's mean.
    (losses.sum() * world_size / 12).backward()
    s = tsd.param_stats_across_ranks(layout.grads(), layout.params, layout=layout, nbins=NBINS, maxval=MAXVAL,
                                     weight_magnitude_of="matrices", losses=losses.detach())
    full_params = [p.full_tensor() for p in model.parameters()]
    full_grads = [p.grad.full_tensor() for p in model.parameters()]
    out["fsdp"] = (layout.names, layout.placements, _as_tuple(s))
    out["fsdp_full"] = (full_grads, full_params)
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ddp_and_fsdp2_models(world_size):
    results = run_ranks(world_size, _ranks_models)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    # One process on the whole batch: the same model, the mean loss of all 12 samples.
    model = _model()
    x = torch.cat([_batch(r, world_size)[0] for r in range(world_size)])
    y = torch.cat([_batch(r, world_size)[1] for r in range(world_size)])
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for rank, res in enumerate(results):
        ddp_names, ddp_pl, ddp = res["ddp"]
        assert ddp_names == names and ddp_pl == ["replicated"] * 4
        # DDP's averaged gradients are this rank's: the cross-rank result is rank 0's local one.
        for a, b in zip(ddp[:6], results[0]["ddp_local"][:6]):
            torch.testing.assert_close(a, b, equal_nan=True)
        torch.testing.assert_close(ddp[6], losses.detach().mean())
        fsdp_names, fsdp_pl, fsdp = res["fsdp"]
        assert fsdp_names == names and fsdp_pl == ["sharded"] * 4
        full_grads, full_params = res["fsdp_full"]
        want = trainscope.param_stats(full_grads, full_params, nbins=NBINS, maxval=MAXVAL,
                                      weight_magnitude_of="matrices")
        torch.testing.assert_close(fsdp[0], want.metrics, equal_nan=True)
        torch.testing.assert_close(fsdp[1], want.per_tensor, equal_nan=True)
        assert torch.equal(fsdp[4], want.hist) and torch.equal(fsdp[5], want.hist_per_tensor)
        torch.testing.assert_close(fsdp[6], losses.detach().mean())
        # And they are the single-process model's (same initialisation, the whole batch).
        single = trainscope.param_stats(grads, [p.detach() for p in params], nbins=NBINS, maxval=MAXVAL,
                                        weight_magnitude_of="matrices")
        torch.testing.assert_close(fsdp[0], single.metrics, equal_nan=True, rtol=1e-5, atol=1e-7)


def test_single_process_is_param_stats():
    """Without torch.distributed initialised: exactly trainscope.param_stats."""
    grads, params, init, prev, losses = _full_tensors(torch.float32)
    got = tsd.param_stats_across_ranks(grads, params, init, prev, nbins=NBINS, maxval=MAXVAL, losses=losses)
    want = trainscope.param_stats(grads, params, init, prev, nbins=NBINS, maxval=MAXVAL, losses=losses)
    for a, b in zip(_as_tuple(got), _as_tuple(want)):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()
    assert tsd.rank_and_size() == (0, 1) and not tsd.is_distributed() and tsd.group_name() == ""
    # Full dims given: the same metrics through the packed path.
    got = tsd.param_stats_across_ranks([g.flatten() for g in grads], [p.flatten() for p in params],
                                       full_dims=[p.dim() for p in params], weight_magnitude_of="matrices",
                                       nbins=NBINS, maxval=MAXVAL)
    want = trainscope.param_stats(grads, params, weight_magnitude_of="matrices", nbins=NBINS, maxval=MAXVAL)
    torch.testing.assert_close(got.metrics, want.metrics, equal_nan=True)
    torch.testing.assert_close(got.per_tensor, want.per_tensor, equal_nan=True)


def test_clean_param_name():
    assert tsd.clean_param_name("module._orig_mod.0.weight") == "0.weight"
    assert tsd.clean_param_name("_fsdp_wrapped_module.layer._checkpoint_wrapped_module.w") == "layer.w"


def test_bad_placement_names_the_argument():
    with pytest.raises(ValueError, match="placements"):
        tsd.param_stats_across_ranks([torch.ones(3)], placements="split")
    with pytest.raises(RuntimeError, match="process_group"):
        torch.ops.trainscope.param_stats_across_ranks([torch.ones(3)], [], [], [], [], [], "no-such-group")
