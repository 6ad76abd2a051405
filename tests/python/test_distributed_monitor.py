"""The Monitor and the Lightning callback under torch.distributed (gloo on CPU, 2 and 3
processes): rank 0's records equal those of one process training on the concatenated batches, for
DDP (replicated parameters), FSDP2 (sharded DTensors) and FSDP1 (flat shards of the original
parameters); the other ranks write nothing."""

import os

import pytest
import torch
import torch.nn.functional as F

import trainscope
from distributed_util import WORLD_SIZES, fully_shard_linears, run_ranks

STEPS, BATCH, NBINS = 3, 12, 16
CONFIG = dict(grad_hist=trainscope.every(2), nbins=NBINS, maxval=0.05, weights_matrices_only=True)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))


def _batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 4, (BATCH,), generator=g)) for _ in range(STEPS)]


def _train(model, params_of, monitor, rank=0, world_size=1):
    opt = torch.optim.SGD(params_of(model), lr=0.5)
    for step, (x, y) in enumerate(_batches()):
        x, y = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()  # equal shares: the ranks' mean gradient is the whole batch's
        opt.step()
        monitor.step(step, losses.detach())
        opt.zero_grad()
    monitor.flush()


def _as_dicts(records):
    return [(r.step, dict(r.scalars), {k: (e, c) for k, (e, c) in r.histograms.items()}) for r in records]


def _ranks_monitor(rank, world_size, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    ddp = DDP(_model())
    records = []
    mon = trainscope.Monitor(ddp, sinks=[records.append, trainscope.JsonlSink(os.path.join(tmp, f"ddp{rank}.jsonl"))],
                             **CONFIG)
    _train(ddp, lambda m: m.parameters(), mon, rank, world_size)
    out["ddp"] = (_as_dicts(records), mon.writes_records, mon.names)

    model = fully_shard_linears(_model(), world_size)
    records = []
    mon = trainscope.Monitor(model, sinks=[records.append], **CONFIG)
    _train(model, lambda m: m.parameters(), mon, rank, world_size)
    out["fsdp"] = (_as_dicts(records), mon.writes_records, mon.names)

    # FSDP1 with the original parameters: flat 1-D shards of them, some empty.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    fsdp1 = FSDP1(_model(), use_orig_params=True, device_id=torch.device("cpu"))
    records = []
    mon = trainscope.Monitor(fsdp1, sinks=[records.append], **CONFIG)
    out["fsdp1_layout"] = (mon.layout.placements, mon.layout.full_dims, [p.dim() for p in mon.params])
    _train(fsdp1, lambda m: m.parameters(), mon, rank, world_size)
    out["fsdp1"] = (_as_dicts(records), mon.writes_records, mon.names)
    return out


def _reference():
    records = []
    model = _model()
    mon = trainscope.Monitor(model, sinks=[records.append], **CONFIG)
    _train(model, lambda m: m.parameters(), mon)
    return _as_dicts(records), mon.names


def _assert_records_close(got, want):
    assert [r[0] for r in got] == [r[0] for r in want]
    for (_, gs, gh), (_, ws, wh) in zip(got, want):
        assert list(gs) == list(ws)  # same names, same order
        for name in ws:
            assert gs[name] == pytest.approx(ws[name], rel=1e-5, abs=1e-7, nan_ok=True), name
        assert list(gh) == list(wh)
        for name in wh:
            assert torch.equal(gh[name][0], wh[name][0]) and torch.equal(gh[name][1], wh[name][1]), name


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_monitor_across_ranks_equals_one_process(world_size, tmp_path):
    results = run_ranks(world_size, _ranks_monitor, str(tmp_path))
    want, names = _reference()
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert results[0]["fsdp1_layout"] == (["sharded"] * 4, [2, 1, 2, 1], [1, 1, 1, 1])
    for kind in ("ddp", "fsdp", "fsdp1"):
        records, writes, got_names = results[0][kind]
        assert writes and got_names == names, kind
        _assert_records_close(records, want)
        assert "loss" in records[0][1] and "grad_hist1d" in records[0][2]
        for rank in range(1, world_size):
            records, writes, _ = results[rank][kind]
            assert records == [] and not writes, (kind, rank)
    assert os.path.exists(tmp_path / "ddp0.jsonl")
    assert not any(os.path.exists(tmp_path / f"ddp{r}.jsonl") and os.path.getsize(tmp_path / f"ddp{r}.jsonl")
                   for r in range(1, world_size))


# -- Lightning, DDP strategy on processes started by the test (as torchrun would) ----------------

def _lightning_module():
    import lightning.pytorch as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self.net(x), y, reduction="none")
            return {"loss": losses.mean(), "losses": losses.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Module()


def _probe_inputs():
    return torch.randn(10, 6, generator=torch.Generator().manual_seed(9))


def _fit(rank, world_size, tmp):
    """The Lightning run: every family on, each rank its share of every batch; and every family at
    the epoch's start or end (one epoch of STEPS steps)."""
    import lightning.pytorch as L
    import trainscope.lightning as tsl

    records, epoch_records = [], []
    cb = tsl.TrainscopeCallback(grad_hist=trainscope.every(2), nbins=NBINS, per_sample=trainscope.every(1),
                                representation=trainscope.at_steps([0, 2]), probe_inputs=_probe_inputs(),
                                probe_options=dict(batch_size=3), sinks=[records.append])
    at_epochs = tsl.TrainscopeCallback(param_metrics=tsl.at_epoch_end(), grad_hist=tsl.at_epoch_end(), nbins=NBINS,
                                       per_sample=tsl.at_epoch_start(), representation=tsl.at_epoch_start(),
                                       probe_inputs=_probe_inputs(), probe_options=dict(batch_size=3),
                                       prefix="epoch", sinks=[epoch_records.append])
    data = [(x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]) for x, y in _batches()]
    multi = dict(devices=world_size, strategy="ddp") if world_size > 1 else dict(devices=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[cb, at_epochs], logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp, **multi)
    trainer.fit(_lightning_module(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return _as_dicts(records) + _as_dicts(epoch_records)


def _ranks_lightning(rank, world_size, tmp):
    # The processes exist already (started like torchrun's): Lightning joins the process group.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    return _fit(rank, world_size, tmp)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lightning_ddp_logs_the_whole_batch_on_rank_zero(world_size, tmp_path):
    """Parameter metrics, histogram, per-sample statistics and representation metrics of a DDP run
    on 2 or 3 ranks, logged by rank 0, equal those of one process on the whole batches."""
    pytest.importorskip("lightning")
    results = run_ranks(world_size, _ranks_lightning, str(tmp_path / "ddp"))
    want = _fit(0, 1, str(tmp_path / "one"))
    assert any("trainscope" not in k and k.startswith("per_sample/") for k in want[0][1])
    assert any(k.startswith("representation/") for k in want[0][1])
    # At the epoch's start (step 0): the representation, and per_sample of its first step; at its
    # end (step STEPS - 1): the parameter metrics and the histogram of the last step.
    epoch = want[STEPS:]
    assert [r[0] for r in epoch] == [0, 0, STEPS - 1]
    assert any(k.startswith("representation/") for k in epoch[0][1])
    assert any(k.startswith("per_sample/") for k in epoch[1][1])
    assert "grad_norm" in epoch[2][1] and "loss" in epoch[2][1] and list(epoch[2][2]) == ["grad_hist1d"]
    _assert_records_close(results[0], want)
    assert all(r == [] for r in results[1:])
