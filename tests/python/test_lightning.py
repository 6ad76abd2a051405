"""trainscope.lightning: Lightning fits whose TensorBoard event files (read back with TensorBoard's
EventAccumulator) hold, step by step, the values the functional API gives on the same parameters,
gradients and batches, recorded during the fit by a helper callback."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402

import trainscope  # noqa: E402
import trainscope.lightning as tsl  # noqa: E402
from conftest import DEVICES, env_with_trainscope_on_path  # noqa: E402

METRICS = trainscope.METRICS  # grad_norm, ..., update_size, weight_norm, update_ratio
NAMES = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
RTOL = 1e-5  # TensorBoard keeps scalars as float32


class TinyRegressor(pl.LightningModule):
    def __init__(self, lr=0.05, seed=0, compiled=False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        if compiled:  # parameter names gain "_orig_mod."; the eager backend keeps the test fast
            self.net = torch.compile(self.net, backend="eager")
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(n=96, batch=8):  # the default: 12 batches an epoch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 3, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


class Recorder(pl.Callback):
    """Clones what the functional API needs at every optimizer step: θ₀, the parameters before
    and after the step, the gradients, and each micro-batch with its (normalised) loss."""

    def __init__(self):
        self.init, self.prev, self.steps, self.micro, self.seen = None, None, {}, [], 0

    @staticmethod
    def _clone(m, grads=False):
        return [(p.grad if grads else p).detach().clone() for p in m.parameters()]

    def on_fit_start(self, trainer, m):
        self.init, self.seen = self._clone(m), trainer.global_step

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if not self.micro:
            self.prev = self._clone(m)

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        self.micro.append(([t.detach().clone() for t in batch], outputs["loss"].detach().clone()))
        if trainer.global_step == self.seen:
            return
        self.seen = trainer.global_step
        self.steps[trainer.global_step - 1] = {"prev": self.prev, "params": self._clone(m),
                                               "grads": self._clone(m, grads=True), "micro": self.micro}
        self.micro = []


def fit(tmp_path, callbacks, *, device="cpu", max_steps=5, trainer_cls=None, **trainer_kwargs):
    model = TinyRegressor()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = (trainer_cls or pl.Trainer)(
        max_steps=max_steps, logger=logger, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="gpu" if device == "cuda" else "cpu",
        devices=1, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model, loader())
    return model, logger


def read_events(logger):
    acc = ea.EventAccumulator(logger.log_dir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    hists = {t: {e.step: e.histogram_value for e in acc.Histograms(t)} for t in tags["histograms"]}
    return scalars, hists


def full_counts(h, nbins=100, maxval=0.05):
    """The nbins counts of a logged histogram (empty end bins were left out), from its bucket limits."""
    right = trainscope.hist_bin_edges(nbins, maxval)[1:].tolist()
    counts = [0] * nbins
    assert len(h.bucket_limit) == len(h.bucket)
    for limit, c in zip(h.bucket_limit, h.bucket):
        counts[right.index(limit)] = int(c)  # exact: the edges travel as float64
    return torch.tensor(counts)


def reference(rec, init, accumulate=1):
    """{name: value} and the histogram from trainscope's functional API for one recorded step."""
    s = trainscope.param_stats(rec["grads"], rec["params"], init, rec["prev"])
    out = {"loss": float(torch.stack([l * accumulate for _, l in rec["micro"]]).mean()),
           "nonfinite_count": float(s.nonfinite)}
    for m in METRICS:
        out[m] = float(s[m])
        for i, name in enumerate(NAMES):
            out[f"{m}/{name}"] = float(s.per_tensor_metric(m)[i])
    for i, name in enumerate(NAMES):
        out[f"nonfinite_count/{name}"] = float(s.nonfinite_per_tensor[i])
    return out, s.hist.cpu()


def assert_close(got, want, what):
    assert got == pytest.approx(want, rel=RTOL, abs=1e-7), f"{what}: logged {got}, functional API {want}"


def check_param_metrics(scalars, hists, recorder, steps, accumulate=1, prefix="trainscope"):
    assert sorted(recorder.steps) == list(steps)
    for step in steps:
        want, hist = reference(recorder.steps[step], [t for t in recorder.init], accumulate)
        for name, value in want.items():
            tag = f"{prefix}/{name}"
            assert tag in scalars, f"no {tag}; tags: {sorted(scalars)}"
            assert set(scalars[tag]) == set(steps), (tag, sorted(scalars[tag]))
            assert_close(scalars[tag][step], value, f"{tag} at step {step}")
        h = hists[f"{prefix}/grad_hist1d"][step]
        assert torch.equal(full_counts(h), hist), f"histogram at step {step}"
        assert h.num == hist.sum()
        assert set(hists[f"{prefix}/grad_hist1d"]) == set(steps)


@pytest.mark.parametrize("device", DEVICES)
def test_default_callback_logs_functional_api_values(tmp_path, device):
    recorder = Recorder()
    _, logger = fit(tmp_path, [recorder, tsl.TrainscopeCallback()], device=device, max_steps=5)
    scalars, hists = read_events(logger)
    if device == "cuda":  # the recorder cloned device tensors; the functional API runs on them too
        assert recorder.steps[0]["grads"][0].is_cuda
    check_param_metrics(scalars, hists, recorder, range(5))
    # Every name the callback logs is one it should: the defaults log nothing else.
    logged = {t for t in scalars if t.startswith("trainscope/")}
    assert logged == {f"trainscope/{name}" for name in reference(recorder.steps[0], recorder.init)[0]}
    assert set(hists) == {"trainscope/grad_hist1d"}


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path):
    recorder = Recorder()
    _, logger = fit(tmp_path, [recorder, tsl.TrainscopeCallback()], max_steps=3, accumulate_grad_batches=2)
    assert all(len(r["micro"]) == 2 for r in recorder.steps.values())
    scalars, hists = read_events(logger)
    # Steps 0, 1, 2 (not batches 0..5); loss is the mean over both micro-batches, un-normalised.
    check_param_metrics(scalars, hists, recorder, range(3), accumulate=2)


def test_histogram_summary_from_bins():
    edges = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    counts = torch.tensor([0, 3, 1, 0], dtype=torch.int64)
    s = tsl.histogram_summary(edges, counts)
    # Empty end bins left out: one bucket [-1, 0] (centre -0.5) x3 and one [0, 1] (centre 0.5) x1.
    assert s == {"min": -1.0, "max": 1.0, "num": 4.0, "sum": -1.0, "sum_squares": 1.0,
                 "bucket_limits": [0.0, 1.0], "bucket_counts": [3, 1]}
    assert tsl.histogram_summary(edges, torch.zeros(4, dtype=torch.int64)) is None


def _per_sample_reference(rec):
    """PerSampleHooks on a copy of the module holding the step's parameters before the update, on
    the step's batch: the statistics the callback should have logged for that step."""
    model = TinyRegressor()
    with torch.no_grad():
        for p, v in zip(model.parameters(), rec["prev"]):
            p.copy_(v)
    (x, y), _ = rec["micro"][-1]
    with trainscope.PerSampleHooks(model, loss_reduction="mean") as hooks:
        nn.functional.mse_loss(model(x), y).backward()
        stats = hooks.stats()
    return {f"per_sample/{n}": float(stats[n]) for n in trainscope.PER_SAMPLE_STATS}


def _representation_reference(rec, probe_inputs):
    model = TinyRegressor()
    with torch.no_grad():
        for p, v in zip(model.parameters(), rec["params"]):
            p.copy_(v)
    r = trainscope.RepresentationProbe(model, probe_inputs)()
    return {f"representation/{k}": float(v) for k, v in r.scalars().items()}


def test_family_callbacks_log_their_own_tags_on_their_schedules(tmp_path):
    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    recorder = Recorder()
    callbacks = [recorder,
                 tsl.ParamMetricsCallback(prefix="pm"),
                 tsl.HistogramCallback(trainscope.every(2), prefix="hist"),
                 tsl.PerSampleStatsCallback(trainscope.every(2), prefix="ps"),
                 tsl.RepresentationCallback(probe, trainscope.at_steps([1, 4]), prefix="rep")]
    _, logger = fit(tmp_path, callbacks, max_steps=5)
    scalars, hists = read_events(logger)
    by_prefix = lambda d, p: {t: v for t, v in d.items() if t.startswith(p + "/")}  # noqa: E731

    pm = by_prefix(scalars, "pm")
    assert set(pm) == {f"pm/{name}" for name in reference(recorder.steps[0], recorder.init)[0]}
    assert not by_prefix(hists, "pm")
    for step in range(5):
        want, _ = reference(recorder.steps[step], recorder.init)
        for name, value in want.items():
            assert_close(pm[f"pm/{name}"][step], value, f"pm/{name} at step {step}")

    assert not by_prefix(scalars, "hist")
    assert set(by_prefix(hists, "hist")) == {"hist/grad_hist1d"}
    assert set(hists["hist/grad_hist1d"]) == {0, 2, 4}
    for step in (0, 2, 4):
        _, hist = reference(recorder.steps[step], recorder.init)
        assert torch.equal(full_counts(hists["hist/grad_hist1d"][step]), hist)

    ps = by_prefix(scalars, "ps")
    assert not by_prefix(hists, "ps")
    assert set(ps) == {f"ps/per_sample/{n}" for n in trainscope.PER_SAMPLE_STATS}
    for step in (0, 2, 4):
        for name, value in _per_sample_reference(recorder.steps[step]).items():
            assert set(ps[f"ps/{name}"]) == {0, 2, 4}
            assert_close(ps[f"ps/{name}"][step], value, f"ps/{name} at step {step}")

    rep = by_prefix(scalars, "rep")
    assert not by_prefix(hists, "rep")
    assert "rep/representation/effective_rank/net.1" in rep and "rep/representation/dead_fraction" in rep
    for step in (1, 4):
        want = _representation_reference(recorder.steps[step], probe)
        assert set(rep) == {f"rep/{k}" for k in want}
        for name, value in want.items():
            assert set(rep[f"rep/{name}"]) == {1, 4}
            assert_close(rep[f"rep/{name}"][step], value, f"rep/{name} at step {step}")


def test_all_in_one_callback_flags_turn_families_on(tmp_path):
    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    cb = tsl.TrainscopeCallback(grad_hist=None, per_sample=trainscope.every(3), representation=trainscope.every(4),
                                probe_inputs=probe)
    _, logger = fit(tmp_path, [cb], max_steps=5)
    scalars, hists = read_events(logger)
    assert not hists
    assert set(scalars["trainscope/grad_norm"]) == set(range(5))
    assert set(scalars["trainscope/per_sample/norm_test"]) == {0, 3}
    assert set(scalars["trainscope/representation/effective_rank"]) == {0, 4}
    with pytest.raises(ValueError, match="probe_inputs"):
        tsl.TrainscopeCallback(representation=trainscope.every(4))


class _NonZeroRankTrainer(pl.Trainer):
    """A trainer that reports being rank 1 of a DDP job (the fit itself runs in this process)."""

    @property
    def is_global_zero(self) -> bool:
        return False

    @property
    def global_rank(self) -> int:
        return 1


def test_only_global_zero_logs(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(per_sample=trainscope.every(1), sinks=[records.append])
    _, logger = fit(tmp_path, [cb], max_steps=3, trainer_cls=_NonZeroRankTrainer)
    assert records == []  # the Monitor measures on every rank (collectives), only global zero logs
    try:
        scalars, hists = read_events(logger)
    except Exception:  # noqa: BLE001  (no event file at all is fine too)
        scalars, hists = {}, {}
    assert not [t for t in list(scalars) + list(hists) if t.startswith("trainscope/")]


class _NoSyncCallback(tsl.TrainscopeCallback):
    """The callback with every per-step hook run under a guard against host synchronisation."""

    def __init__(self, guard, **kwargs):
        super().__init__(**kwargs)
        self.guard = guard

    def on_train_batch_start(self, *args):
        with self.guard():
            super().on_train_batch_start(*args)

    def on_train_batch_end(self, *args):
        with self.guard():
            super().on_train_batch_end(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_per_step_hooks_never_synchronise(tmp_path, device, monkeypatch):
    import contextlib

    if device == "cuda":
        @contextlib.contextmanager
        def guard():
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
    else:
        # On the CPU nothing can be caught waiting: forbid the calls that would wait on a GPU.
        @contextlib.contextmanager
        def guard():
            def forbidden(self, *a, **k):
                raise AssertionError("host synchronisation in a per-step hook")
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "item", forbidden)
                m.setattr(torch.Tensor, "cpu", forbidden)
                yield

    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    cb = _NoSyncCallback(guard, per_sample=trainscope.every(1), representation=trainscope.every(2),
                         probe_inputs=probe)
    _, logger = fit(tmp_path, [cb], device=device, max_steps=4)
    scalars, hists = read_events(logger)
    assert set(scalars["trainscope/grad_norm"]) == set(range(4))
    assert set(scalars["trainscope/per_sample/norm_test"]) == set(range(4))
    assert set(hists["trainscope/grad_hist1d"]) == set(range(4))


def test_import_trainscope_does_not_import_lightning():
    flags = ["-S"] if sys.flags.no_site else []
    code = "import sys, trainscope; assert 'lightning' not in sys.modules, 'lightning imported'"
    proc = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env_with_trainscope_on_path())
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# Real training runs: a run that dies, a run that diverges, a compiled model, a resumed run


class _FailsAtStep(TinyRegressor):
    def __init__(self, step, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.fail_at:
            raise RuntimeError("the run dies here")
        return super().training_step(batch, batch_idx)


def test_records_in_flight_reach_the_loggers_when_fit_dies(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(sinks=[records.append])
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=10, logger=logger, callbacks=[cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="the run dies here"):
        trainer.fit(_FailsAtStep(4), loader())
    # Step 3 was in flight when step 4 failed: on_exception logged it before the loggers closed.
    assert [r.step for r in records] == [0, 1, 2, 3]
    scalars, hists = read_events(logger)
    assert set(scalars["trainscope/grad_norm"]) == {0, 1, 2, 3}
    assert set(hists["trainscope/grad_hist1d"]) == {0, 1, 2, 3}


def test_an_error_while_logging_after_the_run_died_is_a_warning(tmp_path):
    def fails_at_step_3(record):
        if record.step == 3:
            raise OSError("disk full")

    cb = tsl.TrainscopeCallback(sinks=[fails_at_step_3])
    trainer = pl.Trainer(max_steps=10, logger=False, callbacks=[cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.warns(RuntimeWarning, match="disk full"):
        with pytest.raises(RuntimeError, match="the run dies here"):  # the run's error, not the sink's
            trainer.fit(_FailsAtStep(4), loader())


def _close_or_both_nan(got, want):
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    if math.isinf(want):
        return got == want
    return got == pytest.approx(want, rel=RTOL, abs=1e-7)


def test_a_diverging_run_completes_and_logs_nan_where_the_numbers_are_nan(tmp_path):
    # lr = 1e4: the weights blow up within a few steps, then turn NaN/Inf. Every family is on.
    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    recorder, records = Recorder(), []
    cb = tsl.TrainscopeCallback(per_sample=trainscope.every(1), representation=trainscope.every(3),
                                probe_inputs=probe, sinks=[records.append])
    model = TinyRegressor(lr=1e4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=10, logger=logger, callbacks=[recorder, cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         log_every_n_steps=1)
    trainer.fit(model, loader())
    assert [r.step for r in records] == list(range(10))
    assert math.isnan(records[-1].scalars["grad_norm"]), "the run was meant to diverge"
    scalars, hists = read_events(logger)
    for r in records:
        # What reaches the logger is what reached the sink, NaN for NaN.
        for name, value in r.scalars.items():
            logged = scalars[f"trainscope/{name}"][r.step]
            assert _close_or_both_nan(logged, value), (name, r.step, logged, value)
        # ... and what the functional API gives on the same tensors.
        rec = recorder.steps[r.step]
        want, hist = reference(rec, recorder.init)
        for name, value in want.items():
            assert _close_or_both_nan(r.scalars[name], value), (name, r.step, r.scalars[name], value)
        counts = r.histograms["grad_hist1d"][1]
        assert torch.equal(counts, hist)
        # An empty histogram (every gradient non-finite) is left out of TensorBoard; nonfinite_count says why.
        assert (r.step in hists["trainscope/grad_hist1d"]) == bool(counts.sum() > 0)
        for name, value in _per_sample_reference(rec).items():
            assert _close_or_both_nan(r.scalars[name], value), (name, r.step, r.scalars[name], value)
        if r.step % 3 == 0:
            for name, value in _representation_reference(rec, probe).items():
                assert _close_or_both_nan(r.scalars[name], value), (name, r.step, r.scalars[name], value)
    assert any(math.isnan(r.scalars["per_sample/norm_test"]) for r in records)
    assert any(math.isnan(r.scalars["representation/effective_rank"]) for r in records if r.step % 3 == 0)


def test_a_compiled_model_logs_the_tags_of_the_eager_one(tmp_path):
    probe = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    logged = {}
    for compiled in (False, True):
        records = []
        cb = tsl.TrainscopeCallback(per_sample=trainscope.every(2), representation=trainscope.every(2),
                                    probe_inputs=probe, sinks=[records.append])
        trainer = pl.Trainer(max_steps=3, logger=TensorBoardLogger(str(tmp_path), name=f"tb{compiled}"),
                             callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=1)
        model = TinyRegressor(compiled=compiled)
        assert any("_orig_mod" in n for n, _ in model.named_parameters()) == compiled
        trainer.fit(model, loader())
        logged[compiled] = (read_events(trainer.logger), records)
    (eager_scalars, eager_hists), eager_records = logged[False]
    (compiled_scalars, compiled_hists), compiled_records = logged[True]
    assert "trainscope/grad_norm/net.0.weight" in eager_scalars
    assert "trainscope/representation/effective_rank/net.1" in eager_scalars
    assert set(compiled_scalars) == set(eager_scalars)
    assert set(compiled_hists) == set(eager_hists)
    assert not [t for t in compiled_scalars if "_orig_mod" in t]
    for a, b in zip(eager_records, compiled_records):
        assert a.scalars.keys() == b.scalars.keys()
        for name, value in a.scalars.items():
            assert b.scalars[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, a.step)


def _trainer(tmp_path, name, callbacks, max_steps, **kwargs):
    return pl.Trainer(max_steps=max_steps, logger=TensorBoardLogger(str(tmp_path), name=name), callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                      log_every_n_steps=1, **kwargs)


def test_a_resumed_run_logs_what_an_uninterrupted_one_does(tmp_path):
    # One batch an epoch and a checkpoint at the end of each: the resumed run sees the batches the
    # uninterrupted one does, whichever batch of an epoch Lightning resumes at.
    data = lambda: loader(n=8, batch=8)  # noqa: E731
    ckpt_dir = tmp_path / "ckpt"
    config = dict(grad_hist=trainscope.on_demand(), per_sample=trainscope.every(3))
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    whole = []
    cb = tsl.TrainscopeCallback(sinks=[whole.append], **config)

    class RequestAfterStep4(pl.Callback):  # after cb measured step 4: pending in the checkpoint
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                cb.request("grad_hist")

    _trainer(tmp_path, "whole", [cb, RequestAfterStep4(), checkpoint], 10).fit(TinyRegressor(), data())
    state = torch.load(ckpt_dir / "epoch=4.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert state["monitor"]["step"] == 4 and state["monitor"]["requested"] == ["grad_hist"]
    assert len(state["monitor"]["init"]) == len(state["monitor"]["prev"]) == 4

    resumed = []
    cb2 = tsl.TrainscopeCallback(sinks=[resumed.append], **config)
    trainer = _trainer(tmp_path, "resumed", [cb2], 10, enable_checkpointing=False)
    trainer.fit(TinyRegressor(seed=7), data(), ckpt_path=str(ckpt_dir / "epoch=4.ckpt"))
    assert [r.step for r in resumed] == [5, 6, 7, 8, 9]
    for want, got in zip(whole[5:], resumed):
        assert got.scalars.keys() == want.scalars.keys()
        for name in ("distance", "update_size", "loss", "grad_norm", "distance/net.0.weight",
                     "update_size/net.2.bias"):
            assert got.scalars[name] == pytest.approx(want.scalars[name], rel=1e-6), (name, got.step)
    assert [bool(r.histograms) for r in resumed] == [True, False, False, False, False]
    assert "per_sample/norm_test" in resumed[1].scalars  # step 6: every(3) goes on counting steps

    # The state stays for a checkpoint saved after fit, on the host.
    after = trainer.callbacks[[type(c) for c in trainer.callbacks].index(tsl.TrainscopeCallback)].state_dict()
    assert after["monitor"]["step"] == 9 and all(t.device.type == "cpu" for t in after["monitor"]["init"])


def test_checkpoint_param_copies_off_saves_no_copies(tmp_path):
    data = lambda: loader(n=40, batch=8)  # noqa: E731
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    cb = tsl.TrainscopeCallback(checkpoint_param_copies=False)
    _trainer(tmp_path, "a", [cb, checkpoint], 5).fit(TinyRegressor(), data())
    state = torch.load(ckpt_dir / "epoch=0.ckpt", weights_only=False)["callbacks"][cb.state_key]["monitor"]
    assert state["init"] == [] and state["prev"] == []
    for copies in (False, True):  # a run that wants the copies is told they are not there
        resumed = []
        cb2 = tsl.TrainscopeCallback(checkpoint_param_copies=copies, sinks=[resumed.append])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(tmp_path, f"b{copies}", [cb2], 6, enable_checkpointing=False).fit(
                TinyRegressor(seed=7), data(), ckpt_path=str(ckpt_dir / "epoch=0.ckpt"))
        said = [w for w in caught if "no copy of the initial parameters" in str(w.message)]
        assert len(said) == int(copies)
        # distance is measured from the parameters the run resumed from: after one step, the update.
        (r,) = resumed
        assert r.step == 5 and r.scalars["distance"] == pytest.approx(r.scalars["update_size"], rel=1e-6)


def test_a_checkpoint_of_another_model_is_an_error_naming_what_differs(tmp_path):
    data = lambda: loader(n=40, batch=8)  # noqa: E731
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    cb = tsl.TrainscopeCallback()
    _trainer(tmp_path, "a", [cb, checkpoint], 5).fit(TinyRegressor(), data())
    state = torch.load(ckpt_dir / "epoch=0.ckpt", weights_only=False)["callbacks"][cb.state_key]
    state["monitor"]["init"][0] = torch.zeros(4, 6)  # as if saved for a model with another first layer
    cb2 = tsl.TrainscopeCallback()
    cb2.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"'net\.0\.weight'.*shape"):
        _trainer(tmp_path, "b", [cb2], 6, enable_checkpointing=False).fit(TinyRegressor(), data())


class _Const(trainscope.Quantity):
    def __init__(self, key):
        self.key = key

    def compute(self, ctx):
        return 1.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(per_sample="sometimes"), "per_sample"), (dict(param_metrics=3), "param_metrics"),
    (dict(representation="every:0", probe_inputs=torch.zeros(2, 6)), "representation"),
    (dict(grad_hist=trainscope.every), "grad_hist"), (dict(nbins=0), "nbins"), (dict(maxval=float("inf")), "maxval"),
    (dict(per_tensor="yes"), "per_tensor"), (dict(ring_slots=0), "ring_slots"),
    (dict(checkpoint_param_copies=None), "checkpoint_param_copies"), (dict(sinks=[3]), "sinks"),
    (dict(prefix=None), "prefix"), (dict(probe_options=[1]), "probe_options"),
    (dict(quantities=[object()]), "quantities"), (dict(quantities=_Const("x")), "quantities"),
    (dict(sinks=print), "sinks"), (dict(per_sample_loss_reduction="max"), "per_sample_loss_reduction"),
    (dict(representation=trainscope.every(2)), "probe_inputs")])
def test_callback_arguments_are_checked_at_construction(kwargs, name):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=name):
        tsl.TrainscopeCallback(**kwargs)


def test_callback_quantity_keys_are_checked_at_construction_and_requests_before_fit_count(tmp_path):
    tsl.TrainscopeCallback(quantities=None, sinks=None)  # None: none
    with pytest.raises(RuntimeError, match="grad_norm"):
        tsl.TrainscopeCallback(quantities=[_Const("grad_norm")])
    with pytest.raises(RuntimeError, match="quantities\\[0\\] schedule"):
        tsl.TrainscopeCallback(quantities=[(_Const("mine"), "every:0")])
    with pytest.raises(ValueError, match="repeat"):
        tsl.TrainscopeCallback(quantities=[_Const("per_sample")], per_sample=trainscope.every(2))
    records = []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, sinks=[records.append],
                                quantities=[(_Const("mine"), trainscope.on_demand())])
    with pytest.raises(ValueError, match="nope"):
        cb.request("nope")
    cb.request("mine")  # before fit: made due at the first step
    fit(tmp_path, [cb], max_steps=3)
    assert [(r.step, r.scalars) for r in records] == [(0, {"mine": 1.0})]
