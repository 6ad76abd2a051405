"""Per-sample gradient statistics across ranks (gloo on CPU, 2 and 3 processes): materialised
per-sample gradients (trainscope.distributed.per_sample_stats_across_ranks) and layer factors
(PerSampleHooks on nn.Linear with 2-D and 3-D input and nn.Conv2d, plain and under DDP, a model
using a Conv2d and a Linear twice each, and a model of the other layer kinds with a tied weight), each rank holding an uneven share of the batch (one sample
on a rank included), equal one process on the concatenated batch: statistics, parts, histograms.
One spawn per world size."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainscope
import trainscope.distributed as tsd
from distributed_util import WORLD_SIZES, run_ranks

NBINS, MAXVAL = 12, 0.05
#: B_r per rank: uneven, with a rank of one sample at W = 3.
SPLITS = {2: (3, 6), 3: (1, 5, 3)}
TOL = dict(rtol=1e-6, atol=0)


def _share(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return t.split(list(SPLITS[world_size]))[rank]


# -- materialised per-sample gradients ------------------------------------------------------------

def _grads(batch: int, finite: bool = False):
    g = torch.Generator().manual_seed(5)
    shapes = [(7, 5), (13,), (3, 0), (), (4, 3, 3, 3)]
    out = [0.02 * torch.randn(s, generator=g, dtype=torch.float64)
           + 0.03 * torch.randn((batch, *s), generator=g, dtype=torch.float64) for s in shapes]
    out[1] = out[1].float()  # mixed dtypes
    if not finite:
        out[0][2, 1, 1] = float("inf")  # the non-finite count adds up; the statistics go non-finite
    return out


def _materialised(rank, world_size):
    batch = sum(SPLITS[world_size])
    local = [_share(t, rank, world_size) for t in _grads(batch)]
    finite = [_share(t, rank, world_size) for t in _grads(batch, finite=True)]
    out = {}
    s = tsd.per_sample_stats_across_ranks(local, nbins=NBINS, maxval=MAXVAL)
    out["hist"], out["nonfinite"] = s.hist, s.nonfinite
    f = tsd.per_sample_stats_across_ranks({str(i): t for i, t in enumerate(finite)}, nbins=NBINS, maxval=MAXVAL)
    out["stats"], out["sq_norms"], out["dots"], out["msq"] = f.stats, f.parts.sq_norms, f.parts.dots, f.parts.mean_sq_norm
    out["recombined"] = f.parts.stats()  # parts tied to the group combine again
    out["from_local_parts"] = tsd.per_sample_stats_from_local_parts(f.parts)
    if len(finite[0]) >= 2:
        out["this_process"] = tsd.per_sample_stats_across_ranks(finite, tsd.THIS_PROCESS, histogram=False).stats
    return out


# -- layer factors ---------------------------------------------------------------------------------

class Tokens(nn.Module):
    """[B, C, H, W] -> [B, H·W, C]: positions as tokens, for a Linear on 3-D input."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, padding_mode="reflect", bias=False), nn.Tanh(),
        Tokens(), nn.Linear(3, 6), nn.ReLU(), MeanTokens(), nn.Linear(6, 4),
    ).double()


class _Reuse(nn.Module):
    """A Conv2d applied twice (its uses' positions added per sample) and a Linear block applied
    twice: per-sample gradients summed over the uses, on every rank."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.tokens, self.inp, self.pool = Tokens(), nn.Linear(2, 6), MeanTokens()
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        h = self.pool(torch.relu(self.inp(self.tokens(h))))
        return self.head(torch.tanh(self.block(torch.tanh(self.block(h)))))


def _reuse_model():
    torch.manual_seed(4)
    return _Reuse().double()


class _Kinds(nn.Module):
    """The layer kinds of trainscope.per_sample_layers (Conv1d, GroupNorm, ConvTranspose1d,
    LayerNorm, MultiheadAttention, Embedding, Conv3d, BatchNorm1d in eval mode) and an Embedding
    tied to a Linear, on the same input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose1d(4, 4, 2, stride=2)
        self.ln = nn.LayerNorm(4)
        # Without biases: the key bias's gradient is zero up to rounding (softmax ignores a shift),
        # whose sign would depend on how the batch is split and flip its histogram bin at 0.
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, bias=False)
        self.emb = nn.Embedding(6, 4)
        self.conv3 = nn.Conv3d(1, 4, 2)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 6, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.up(torch.tanh(self.gn(self.conv1(x.flatten(2)))))).transpose(1, 2)
        h = self.ln(h)
        h = (h + self.attn(h, h, h)[0]).mean(1)
        tokens = ((x.flatten(1)[:, :5] * 3).floor().clamp(-3, 2) + 3).long()
        z = self.bn(h + self.emb(tokens).mean(1) + self.conv3(x.unsqueeze(1)).mean((2, 3, 4)))
        return self.head(torch.tanh(z)) + self.proj(torch.tanh(z))[:, :4]


def _kinds_model():
    torch.manual_seed(6)
    model = _Kinds().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.8, 1.2)
    return model.eval()


def _batch(batch: int):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(batch, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (batch,), generator=g))


def _hook_results(model, x, y, reduction, process_group=None):
    with trainscope.PerSampleHooks(model, loss_reduction=reduction) as hooks:
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        layers = hooks.layer_parts(process_group)
        return {
            "stats": hooks.stats(process_group).stats,
            "layers": {name: p.stats() for name, p in layers.items()},
            "hist1d": hooks.grad_hist1d(NBINS, MAXVAL, process_group=process_group),
            "hist2d": hooks.grad_hist2d(NBINS, MAXVAL, 5, 1.0, process_group=process_group),
            "sq_norms": hooks.parts(process_group).sq_norms,
        }


def _factors(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _batch(sum(SPLITS[world_size]))
    x, y = _share(x, rank, world_size), _share(y, rank, world_size)
    out = {reduction: _hook_results(_model(), x, y, reduction) for reduction in ("mean", "sum")}
    out["ddp"] = _hook_results(DDP(_model()), x, y, "mean")
    out["reuse"] = _hook_results(_reuse_model(), x, y, "mean")
    out["reuse_ddp"] = _hook_results(DDP(_reuse_model()), x, y, "sum")
    out["kinds"] = _hook_results(_kinds_model(), x, y, "mean")
    out["kinds_ddp"] = _hook_results(DDP(_kinds_model()), x, y, "sum")
    out["this_process"] = _hook_results(_model(), x, y, "mean", tsd.THIS_PROCESS)["stats"] if x.shape[0] > 1 else None
    return out


def _ranks(rank, world_size):
    return {"materialised": _materialised(rank, world_size), "factors": _factors(rank, world_size)}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_per_sample_across_ranks_equal_the_concatenated_batch(world_size):
    results = run_ranks(world_size, _ranks)
    sizes = SPLITS[world_size]
    starts = [sum(sizes[:r]) for r in range(world_size)]

    # Materialised.
    ref_nonfinite = trainscope.per_sample_stats(_grads(sum(sizes)), nbins=NBINS, maxval=MAXVAL)
    finite = _grads(sum(sizes), finite=True)
    ref = trainscope.per_sample_stats(finite, nbins=NBINS, maxval=MAXVAL)
    for rank, res in enumerate(results):
        m = res["materialised"]
        assert torch.equal(m["hist"], ref_nonfinite.hist) and torch.equal(m["nonfinite"], ref_nonfinite.nonfinite)
        assert int(m["nonfinite"]) == 1
        for key in ("stats", "recombined", "from_local_parts"):
            torch.testing.assert_close(m[key], ref.stats, rtol=1e-10, atol=0)
        rows = slice(starts[rank], starts[rank] + sizes[rank])
        torch.testing.assert_close(m["sq_norms"], ref.parts.sq_norms[rows], rtol=1e-12, atol=0)
        torch.testing.assert_close(m["dots"], ref.parts.dots[rows], rtol=1e-10, atol=0)
        torch.testing.assert_close(m["msq"], ref.parts.mean_sq_norm, rtol=1e-12, atol=0)
        share = [t[rows] for t in finite]
        if sizes[rank] >= 2:
            torch.testing.assert_close(m["this_process"], trainscope.per_sample_stats(share, histogram=False).stats)
        assert torch.equal(m["stats"], results[0]["materialised"]["stats"])  # the same bits everywhere

    # Layer factors: one process on the whole batch, the same loss reduction.
    x, y = _batch(sum(sizes))
    for key, reduction, make in (("mean", "mean", _model), ("sum", "sum", _model), ("ddp", "mean", _model),
                                 ("reuse", "mean", _reuse_model), ("reuse_ddp", "sum", _reuse_model),
                                 ("kinds", "mean", _kinds_model), ("kinds_ddp", "sum", _kinds_model)):
        want = _hook_results(make(), x, y, reduction)
        assert set(want["layers"]) == {_model: {"0", "2", "5", "8"}, _reuse_model: {"conv", "inp", "block", "head"},
                                       _kinds_model: {"conv1", "gn", "up", "ln", "attn", "emb+proj", "conv3", "bn",
                                                      "head"}}[make]
        for rank, res in enumerate(results):
            got = res["factors"][key]
            torch.testing.assert_close(got["stats"], want["stats"], **TOL)  # all six, scale-dependent ones too
            assert set(got["layers"]) == set(want["layers"])  # the model's own names, also under DDP
            for name, stats in want["layers"].items():
                torch.testing.assert_close(got["layers"][name], stats, **TOL)
            assert torch.equal(got["hist1d"], want["hist1d"]), key
            assert torch.equal(got["hist2d"][0], want["hist2d"][0]) and torch.equal(got["hist2d"][1], want["hist2d"][1])
            rows = slice(starts[rank], starts[rank] + sizes[rank])
            torch.testing.assert_close(got["sq_norms"], want["sq_norms"][rows], **TOL)
    for rank, res in enumerate(results):
        if sizes[rank] >= 2:
            rows = slice(starts[rank], starts[rank] + sizes[rank])
            local = _hook_results(_model(), x[rows], y[rows], "mean")["stats"]
            torch.testing.assert_close(res["factors"]["this_process"], local, **TOL)
