"""trainscope.lightning's epoch schedules (at_epoch_start, at_epoch_end, every_n_epochs), probes on
the validation set (probe_inputs="val", probe_forward) and per-metric switches (metrics=): the
records hold, at the step numbers the docs give, the values computed directly from the parameters,
gradients and batches a helper callback saw."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import trainscope  # noqa: E402
import trainscope.lightning as tsl  # noqa: E402
from conftest import DEVICES  # noqa: E402
from test_lightning import (  # noqa: E402
    NAMES, Recorder, TinyRegressor, _per_sample_reference, assert_close, full_counts, read_events, reference)

needs_measure_now = pytest.mark.skipif(not hasattr(trainscope.Monitor, "measure_now"),
                                       reason="this build's Monitor has no measure_now")
needs_metrics_arg = pytest.mark.skipif("metrics" not in inspect.signature(trainscope.Monitor).parameters,
                                       reason="this build's Monitor has no metrics= argument")

GRADIENT_NAMES = ("grad_norm", "grad_magnitude", "nonfinite_count")


def data(n=24, batch=8, seed=1):  # three batches an epoch
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


class WithValidation(TinyRegressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


class DictBatches(TinyRegressor):
    """A module whose forward takes the whole (dict) batch and returns the loss."""

    def forward(self, batch):
        return nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        return self(batch)

    def validation_step(self, batch, batch_idx):
        return self(batch)


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class EpochRecorder(pl.Callback):
    """Clones the parameters at the start of each epoch, before any other callback can step."""

    def __init__(self):
        self.at_start = {}

    def on_train_epoch_start(self, trainer, m):
        self.at_start[trainer.current_epoch] = (trainer.global_step, [p.detach().clone() for p in m.parameters()])


class StepParams(pl.Callback):
    """The parameters after each optimizer step (no accumulation here: one step a batch)."""

    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in m.parameters()]


def run(tmp_path, callbacks, model=None, max_epochs=3, train=None, val=None, device="cpu", **kwargs):
    model = model or TinyRegressor()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         log_every_n_steps=1, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, train or data(), val)
    return model, logger


def by_step(records):
    """{step: scalars}, the records of one step merged (none may repeat a name)."""
    out = {}
    for r in records:
        merged = out.setdefault(r.step, {})
        assert not set(merged) & set(r.scalars), (r.step, set(merged) & set(r.scalars))
        merged.update(r.scalars)
    return out


# -- the schedules


def test_epoch_schedules_and_their_arguments():
    s = tsl.every_n_epochs(2, start=1, at="end")
    assert (s.k, s.start, s.at) == (2, 1, "end")
    assert [e for e in range(8) if s.due(e)] == [1, 3, 5, 7]
    assert [e for e in range(3) if tsl.at_epoch_start().due(e)] == [0, 1, 2]
    assert tsl.at_epoch_start().at == "start" and tsl.at_epoch_end().at == "end"
    assert tsl.every_n_epochs(1) == tsl.at_epoch_start() and tsl.every_n_epochs(1, at="end") == tsl.at_epoch_end()
    for kwargs, name in ((dict(k=0), "k"), (dict(k=1.5), "k"), (dict(k=2, start=-1), "start"),
                         (dict(k=2, at="middle"), "at")):
        with pytest.raises((TypeError, ValueError), match=name):
            tsl.every_n_epochs(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(metrics={"weight_magnitud": True}), "weight_magnitud"),
    (dict(metrics=[("grad_norm", True)]), "metrics"),
    (dict(metrics={"grad_norm": "every:0"}), "grad_norm"),
    (dict(metrics={"update_size": tsl.at_epoch_end()}), "update_size"),
    (dict(metrics={"update_ratio": tsl.at_epoch_start()}), "update_ratio"),
    (dict(metrics={"grad_norm": tsl.at_epoch_start()}), "grad_norm"),
    (dict(metrics={"loss": tsl.every_n_epochs(2)}), "loss"),
    (dict(grad_hist=tsl.at_epoch_start()), "grad_hist"),
    (dict(representation=tsl.at_epoch_start()), "probe_inputs"),
    (dict(representation=tsl.at_epoch_start(), probe_inputs="train"), "probe_inputs"),
    (dict(representation=tsl.at_epoch_start(), probe_inputs="val", num_examples=0), "num_examples"),
    (dict(representation=tsl.at_epoch_start(), probe_inputs="val", probe_forward=3), "probe_forward"),
    (dict(representation=tsl.at_epoch_start(), probe_inputs="val", num_examples=5,
          probe_options={"num_examples": 5}), "num_examples"),
])
def test_bad_configuration_fails_at_construction(kwargs, name):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=name):
        tsl.TrainscopeCallback(**kwargs)


# -- parameter metrics at the start and at the end of epochs


@needs_measure_now
@pytest.mark.parametrize("device", DEVICES)
def test_param_metrics_at_epoch_start_measure_the_parameters_each_epoch_starts_from(tmp_path, device):
    untrained = torch.cat([p.detach().abs().flatten() for p in TinyRegressor().parameters()]).mean()
    seen, records = EpochRecorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=tsl.at_epoch_start(), grad_hist=None, sinks=[records.append])
    _, logger = run(tmp_path, [seen, cb], device=device)
    assert seen.at_start[0][1][0].device.type == device
    got = by_step(records)
    assert sorted(got) == [0, 3, 6]  # the step each epoch starts with
    assert_close(got[0]["weight_magnitude"], float(untrained), "weight magnitude of the untrained network")
    init = seen.at_start[0][1]
    for epoch, (step, params) in seen.at_start.items():
        s = trainscope.param_stats([torch.zeros_like(p) for p in params], params, init, params)
        measured = ("weight_magnitude", "weight_norm", "distance")
        want = {m: float(s[m]) for m in measured}
        want.update({f"{m}/{n}": float(s.per_tensor_metric(m)[i]) for m in measured for i, n in enumerate(NAMES)})
        assert step == 3 * epoch
        for name, value in want.items():
            assert_close(got[step][name], value, f"{name} at the start of epoch {epoch}")
        # No gradients exist before the epoch's first step (never the previous epoch's), no update.
        absent = [n for n in got[step] if n.split("/")[0] in (*GRADIENT_NAMES, "update_size", "update_ratio",
                                                             "loss")]
        assert not absent, absent
    assert got[0]["distance"] == 0.0 and got[3]["distance"] > 0.0
    scalars, hists = read_events(logger)
    assert set(scalars["trainscope/weight_magnitude"]) == {0, 3, 6}
    assert "trainscope/grad_norm" not in scalars and not hists


@needs_measure_now
def test_gradient_metrics_at_epoch_end_are_those_of_the_epochs_last_step(tmp_path):
    recorder, records = Recorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=tsl.at_epoch_end(), grad_hist=tsl.at_epoch_end(),
                                sinks=[records.append])
    _, logger = run(tmp_path, [recorder, cb])
    got = by_step(records)
    assert sorted(got) == [2, 5, 8]  # each epoch's last step
    for step in (2, 5, 8):
        want, hist = reference(recorder.steps[step], recorder.init)
        for name, value in want.items():
            if not name.startswith("update_"):
                assert_close(got[step][name], value, f"{name} at the end of the epoch (step {step})")
        assert not [n for n in got[step] if n.startswith("update_")]
        counts = [r.histograms["grad_hist1d"][1] for r in records if r.step == step and r.histograms]
        assert len(counts) == 1 and torch.equal(counts[0], hist)
    scalars, hists = read_events(logger)
    assert set(scalars["trainscope/grad_norm"]) == {2, 5, 8}
    assert torch.equal(full_counts(hists["trainscope/grad_hist1d"][5]), reference(recorder.steps[5],
                                                                                  recorder.init)[1])


@needs_measure_now
def test_every_n_epochs_counts_epochs_from_start(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(param_metrics=tsl.every_n_epochs(2, start=1, at="end"), grad_hist=None,
                                sinks=[records.append])
    run(tmp_path, [cb], max_epochs=5)
    assert sorted(by_step(records)) == [5, 11]  # the ends of epochs 1 and 3
    records.clear()
    cb = tsl.TrainscopeCallback(param_metrics=tsl.every_n_epochs(2), grad_hist=None, sinks=[records.append])
    run(tmp_path, [cb], max_epochs=5)
    assert sorted(by_step(records)) == [0, 6, 12]  # the starts of epochs 0, 2 and 4


@needs_measure_now
def test_an_epoch_cut_short_by_max_steps_still_ends_with_its_last_step(tmp_path):
    recorder, records = Recorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=tsl.at_epoch_end(), grad_hist=None, sinks=[records.append])
    run(tmp_path, [recorder, cb], max_epochs=3, max_steps=4)
    got = by_step(records)
    assert sorted(got) == [2, 3]
    want, _ = reference(recorder.steps[3], recorder.init)
    assert_close(got[3]["grad_norm"], want["grad_norm"], "grad_norm at step 3")


# -- per-metric switches


@needs_measure_now
@needs_metrics_arg
def test_metrics_switch_each_metric_on_its_own_schedule(tmp_path):
    recorder, seen, records = Recorder(), EpochRecorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, per_tensor=False, sinks=[records.append],
                                metrics={"weight_magnitude": tsl.at_epoch_start(), "grad_norm": trainscope.every(2),
                                         "loss": tsl.at_epoch_end(), "distance": False})
    run(tmp_path, [recorder, seen, cb], max_epochs=2)
    got = by_step(records)
    assert {s: set(v) for s, v in got.items()} == {
        0: {"weight_magnitude", "grad_norm"}, 2: {"grad_norm", "loss"}, 3: {"weight_magnitude"},
        4: {"grad_norm"}, 5: {"loss"}}
    for step in (0, 2, 4):
        assert_close(got[step]["grad_norm"], reference(recorder.steps[step], recorder.init)[0]["grad_norm"],
                     f"grad_norm at step {step}")
    for step in (2, 5):
        assert_close(got[step]["loss"], reference(recorder.steps[step], recorder.init)[0]["loss"], f"loss at {step}")
    params = seen.at_start[1][1]
    assert_close(got[3]["weight_magnitude"], float(torch.cat([p.abs().flatten() for p in params]).mean()),
                 "weight_magnitude at the start of epoch 1")


@needs_metrics_arg
def test_metrics_off_leaves_the_rest_of_the_family_on(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(grad_hist=None, per_tensor=False, sinks=[records.append],
                                metrics={"grad_norm": False, "distance": trainscope.every(2)})
    run(tmp_path, [cb], max_epochs=1)
    assert all("grad_norm" not in r.scalars and "weight_magnitude" in r.scalars for r in records)
    assert [r.step for r in records if "distance" in r.scalars] == [0, 2]


# -- per-sample statistics at the epoch's first and last step


@needs_measure_now
@pytest.mark.parametrize("at, accumulate, steps", [("start", 1, [0, 3, 6]), ("end", 1, [2, 5, 8]),
                                                   ("start", 2, [0, 2, 4]), ("end", 2, [1, 3, 5])])
def test_per_sample_at_epoch_boundaries_is_measured_at_the_epochs_first_or_last_step(tmp_path, at, accumulate,
                                                                                      steps):
    # With accumulate_grad_batches=2 an epoch of three batches takes two steps: batches 0-1 and 2.
    recorder, records = Recorder(), []
    schedule = tsl.at_epoch_start() if at == "start" else tsl.at_epoch_end()
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, per_sample=schedule, sinks=[records.append])
    run(tmp_path, [recorder, cb], accumulate_grad_batches=accumulate)
    got = by_step(records)
    assert sorted(got) == steps
    for step in steps:
        want = _per_sample_reference(recorder.steps[step])
        assert set(got[step]) == set(want)
        if accumulate > 1:
            continue  # the step's last micro-batch, of a loss Lightning divided by 2: the steps are the point
        for name, value in want.items():
            assert_close(got[step][name], value, f"{name} at step {step}")


# -- custom quantities at epoch boundaries


class _StepSeen(trainscope.Quantity):
    key = "seen"

    def compute(self, ctx):
        return float(ctx.step)


@needs_measure_now
def test_a_custom_quantity_on_an_epoch_schedule(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, sinks=[records.append],
                                quantities=[(_StepSeen(), tsl.at_epoch_end())])
    run(tmp_path, [cb])
    assert [(r.step, r.scalars) for r in records] == [(s, {"seen": float(s)}) for s in (2, 5, 8)]


# -- representation on the validation set


def _val(n=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _probe_reference(params, x):
    model = TinyRegressor().to(params[0].device)
    x = x.to(params[0].device)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    return {f"representation/{k}": float(v) for k, v in trainscope.RepresentationProbe(model, x)().scalars().items()}


@needs_measure_now
@pytest.mark.parametrize("device", DEVICES)
def test_representation_at_epoch_start_on_the_validation_set(tmp_path, device):
    x, y = _val()
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    seen, records = EpochRecorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=tsl.at_epoch_start(),
                                probe_inputs="val", num_examples=30, sinks=[records.append])
    run(tmp_path, [seen, cb], model=WithValidation(), max_epochs=2, val=val, device=device)
    got = by_step(records)
    assert sorted(got) == [0, 3]
    for epoch, (step, params) in seen.at_start.items():
        want = _probe_reference(params, x[:30])  # the first num_examples examples of the val loader
        assert set(got[step]) == set(want)
        for name, value in want.items():
            assert_close(got[step][name], value, f"{name} at the start of epoch {epoch}")
    # The untrained network at epoch 0 differs from the trained one at epoch 1: the values move.
    assert got[0]["representation/effective_rank"] != got[3]["representation/effective_rank"]


@needs_measure_now
def test_probe_forward_runs_dict_batches_through_a_forward_that_returns_the_loss(tmp_path):
    x, y = _val()
    tx, ty = _val(24, seed=4)
    val = torch.utils.data.DataLoader(_Dicts(x, y), batch_size=16)
    train = torch.utils.data.DataLoader(_Dicts(tx, ty), batch_size=8)
    seen, records = EpochRecorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=tsl.at_epoch_end(),
                                probe_inputs="val", num_examples=20, probe_forward=lambda m, b: m(b),
                                sinks=[records.append])
    model = DictBatches()
    run(tmp_path, [seen, cb], model=model, max_epochs=1, train=train, val=val)
    (record,) = records
    assert record.step == 2
    final = [p.detach().clone() for p in model.parameters()]
    for name, value in _probe_reference(final, x[:20]).items():
        assert_close(record.scalars[name], value, name)


@needs_measure_now
def test_dict_batches_without_probe_forward_say_to_give_it(tmp_path):
    x, y = _val()
    val = torch.utils.data.DataLoader(_Dicts(x, y), batch_size=16)
    train = torch.utils.data.DataLoader(_Dicts(*_val(24, seed=4)), batch_size=8)
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=tsl.at_epoch_start(),
                                probe_inputs="val")
    with pytest.raises(TypeError, match="probe_forward"):
        run(tmp_path, [cb], model=DictBatches(), max_epochs=1, train=train, val=val)


def test_probe_inputs_val_without_a_validation_dataloader_is_an_error_naming_it(tmp_path):
    cb = tsl.RepresentationCallback("val", tsl.at_epoch_start(), num_examples=10, probe_forward=lambda m, b: m(b[0]))
    assert (cb.num_examples, cb.probe_inputs, cb.probe_options) == (10, "val", {})
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=trainscope.every(2),
                                probe_inputs="val")
    with pytest.raises(ValueError, match="probe_inputs"):
        run(tmp_path, [cb], max_epochs=1)


@needs_measure_now
def test_validation_probe_on_a_step_schedule_when_epoch_0_does_not_validate(tmp_path):
    # check_val_every_n_epoch=2: Lightning has no validation dataloader at on_train_start.
    x, y = _val()
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    recorder, records = Recorder(), []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=trainscope.at_steps([1, 4]),
                                probe_inputs="val", num_examples=25, sinks=[records.append])
    run(tmp_path, [recorder, cb], model=WithValidation(), max_epochs=2, val=val, check_val_every_n_epoch=2)
    assert [r.step for r in records] == [1, 4]
    for r in records:
        for name, value in _probe_reference(recorder.steps[r.step]["params"], x[:25]).items():
            assert_close(r.scalars[name], value, f"{name} at step {r.step}")


@needs_measure_now
def test_a_diverging_run_measured_at_epoch_boundaries_completes_with_nan(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(param_metrics=tsl.at_epoch_end(), grad_hist=tsl.at_epoch_end(),
                                per_sample=tsl.at_epoch_start(), sinks=[records.append])
    run(tmp_path, [cb], model=TinyRegressor(lr=1e4), max_epochs=4)
    last = by_step(records)[11]
    assert last["grad_norm"] != last["grad_norm"] and last["weight_magnitude"] != last["weight_magnitude"]


@needs_measure_now
def test_probe_forward_with_a_loader_of_dict_batches_given_as_probe_inputs(tmp_path):
    x, y = _val()
    probe = torch.utils.data.DataLoader(_Dicts(x, y), batch_size=16)
    train = torch.utils.data.DataLoader(_Dicts(*_val(24, seed=4)), batch_size=8)
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=trainscope.every(2),
                                probe_inputs=probe)
    with pytest.raises(TypeError, match="probe_forward"):  # when the Monitor is built, before any step
        run(tmp_path, [cb], model=DictBatches(), max_epochs=1, train=train)
    params, records = StepParams(), []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, representation=trainscope.at_steps([1]),
                                probe_inputs=probe, num_examples=35, probe_forward=lambda m, b: m(b),
                                sinks=[records.append])
    run(tmp_path, [params, cb], model=DictBatches(), max_epochs=1, train=train)
    (record,) = records
    for name, value in _probe_reference(params.after[1], x[:35]).items():
        assert_close(record.scalars[name], value, name)
