"""trainscope.lightning with the Monitor's per-sample histogram, gradient variance, alpha and
curvature families (and Cockpit's configurations): small CPU fits whose loggers and sinks hold
each family on its own schedule, with the values the functional API gives on the parameters and
batches a helper callback saw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import trainscope  # noqa: E402
import trainscope.lightning as tsl  # noqa: E402
from trainscope.alpha import AlphaPoint, alpha_from_points  # noqa: E402
from trainscope.curvature import curvature_stats  # noqa: E402
from test_lightning import NAMES, Recorder, TinyRegressor, full_counts, loader, read_events  # noqa: E402


def per_sample_losses(module, batch):
    x, y = batch
    return ((module(x) - y) ** 2).mean(1)


class PerSampleLosses(TinyRegressor):
    """Returns its per-sample losses (alpha needs them) and takes the optimizer it is given."""

    def __init__(self, optimizer="sgd", lr=1.0, **kwargs):  # lr: α away from its clamp at -1
        super().__init__(lr=lr, **kwargs)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        losses = per_sample_losses(self, batch)
        return {"loss": losses.mean(), "losses": losses}

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.optimizer == "momentum":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(tmp_path, callbacks, *, max_steps, model=None, logger=True, **trainer_kwargs):
    tb = TensorBoardLogger(str(tmp_path), name="tb") if logger else False
    trainer = pl.Trainer(max_steps=max_steps, logger=tb, callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model or PerSampleLosses(), loader(n=48))
    return tb


def _model_at(params):
    model = TinyRegressor()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    return model


def _per_sample_point(params, batch, direction):
    """Per-sample losses and gradients projected on ``direction`` at ``params``, one sample at a time."""
    model = _model_at(params)
    x, y = batch
    losses, dots = [], []
    for i in range(x.shape[0]):
        loss = per_sample_losses(model, (x[i:i + 1], y[i:i + 1]))[0]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        losses.append(loss.detach().double())
        dots.append(sum((g.double() * d).sum() for g, d in zip(grads, direction)))
    return torch.stack(losses), torch.stack(dots)


def _alpha_reference(recorder, start):
    """α of the update made at step ``start`` from the last micro-batches of it and the next step."""
    theta0, theta1 = recorder.steps[start]["prev"], recorder.steps[start]["params"]
    d = [(b - a).double() for a, b in zip(theta0, theta1)]
    l0, p0 = _per_sample_point(theta0, recorder.steps[start]["micro"][-1][0], d)
    l1, p1 = _per_sample_point(theta1, recorder.steps[start + 1]["micro"][-1][0], d)
    sq = sum(t.square().sum() for t in d)
    return float(alpha_from_points(AlphaPoint(l0, p0, sq), AlphaPoint(l1, p1)))


class Batches(pl.Callback):
    """The batches curvature_loss was called with, by step."""

    def __init__(self):
        self.calls = {}

    def loss(self, module, batch):
        self.calls[module.trainer.global_step - 1] = [t.clone() for t in batch]
        assert torch.is_grad_enabled()
        return per_sample_losses(module, batch)


def test_each_family_logs_under_the_prefix_on_its_own_schedule(tmp_path):
    recorder, batches = Recorder(), Batches()
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, prefix="ck",
                                per_sample_hist=trainscope.every(2), grad_variance=trainscope.every(3),
                                alpha=trainscope.at_steps([1]), curvature=trainscope.every(2),
                                curvature_options={"method": "exact"}, curvature_loss=batches.loss)
    logger = fit(tmp_path, [recorder, cb], max_steps=5)
    scalars, hists = read_events(logger)

    assert set(hists) == {"ck/per_sample_grad_hist1d"} and set(hists["ck/per_sample_grad_hist1d"]) == {0, 2, 4}
    for step in (0, 2):  # the training batch's per-sample gradients, at the parameters before the step
        rec = recorder.steps[step]
        model = _model_at(rec["prev"])
        with trainscope.PerSampleHooks(model) as hooks:
            per_sample_losses(model, rec["micro"][-1][0]).mean().backward()
            want = hooks.grad_hist1d(100, 0.05)
        assert torch.equal(full_counts(hists["ck/per_sample_grad_hist1d"][step]), want), step

    names = {t for t in scalars if t.startswith("ck/grad_variance/")}
    for q in ("mean_gsnr", "early_stopping", "cabs"):  # plain SGD: cabs too
        assert {f"ck/grad_variance/{q}", f"ck/grad_variance/{q}/{NAMES[0]}"} <= names
    assert all(set(scalars[t]) == {0, 3} for t in names)

    assert set(scalars["ck/alpha"]) == {2}  # the update of step 1, recorded with step 2
    want = _alpha_reference(recorder, 1)
    assert abs(want) < 0.9 and scalars["ck/alpha"][2] == pytest.approx(want, rel=1e-4, abs=1e-6)

    assert sorted(batches.calls) == [0, 2, 4]  # curvature_loss on due steps only, on the step's batch
    for step in (0, 2, 4):
        rec = recorder.steps[step]
        assert all(torch.equal(a, b) for a, b in zip(batches.calls[step], rec["micro"][-1][0]))
        model = _model_at(rec["params"])  # after the optimizer step
        x, y = rec["micro"][-1][0]
        want = curvature_stats(lambda: per_sample_losses(model, (x, y)), list(model.parameters()), method="exact",
                               generator=torch.Generator().manual_seed(step))
        for name in ("hess_max_ev", "hess_trace", "tic_diag", "tic_trace"):
            tag = f"ck/curvature/{name}"
            assert set(scalars[tag]) == {0, 2, 4}
            assert scalars[tag][step] == pytest.approx(float(want[name]), rel=1e-5, abs=1e-7), (tag, step)
    assert not [t for t in scalars if not t.startswith(("ck/grad_variance/", "ck/alpha", "ck/curvature/"))]


FULL = {"loss", "grad_norm", "distance", "update_size", "per_sample/norm_test", "per_sample/inner_test",
        "per_sample/ortho_test", "alpha", "curvature/tic_diag", "curvature/hess_trace", "curvature/hess_max_ev"}


def test_cockpit_full_configuration_through_the_callback(tmp_path):
    records = []
    cb = tsl.TrainscopeCallback(**trainscope.cockpit_configuration("full"), curvature_loss=per_sample_losses,
                                per_tensor=False, sinks=[records.append])
    logger = fit(tmp_path, [cb], max_steps=3)
    scalars, hists = read_events(logger)
    for name in FULL:
        assert set(scalars[f"trainscope/{name}"]) == ({1, 2} if name == "alpha" else {0, 1, 2}), name
    assert set(hists) == {"trainscope/per_sample_grad_hist1d"}
    # A ReLU MLP: the Hessian diagonal is exact (method "auto", from layer factors), no stderr.
    assert "trainscope/curvature/hess_trace_stderr" not in scalars
    # TensorBoard has no 2-D histograms: the joint one reaches the sinks.
    assert all(set(r.histograms) == {"per_sample_grad_hist1d", "per_sample_grad_hist2d"} for r in records)


@pytest.mark.parametrize("optimizer, cabs", [("sgd", True), ("adam", False), ("momentum", False)])
def test_cabs_only_with_plain_sgd(tmp_path, optimizer, cabs):
    records = []
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, grad_variance=True, per_tensor=False,
                                sinks=[records.append])
    fit(tmp_path, [cb], max_steps=2, model=PerSampleLosses(optimizer), logger=False)
    assert [r.step for r in records] == [0, 1]
    for r in records:
        want = {"grad_variance/mean_gsnr", "grad_variance/early_stopping"} | ({"grad_variance/cabs"} if cabs else set())
        assert set(r.scalars) == want


def test_gradient_accumulation_describes_the_last_micro_batch(tmp_path):
    recorder, batches = Recorder(), Batches()
    cb = tsl.TrainscopeCallback(param_metrics=None, grad_hist=None, alpha=trainscope.at_steps([0]),
                                curvature=trainscope.at_steps([1]), curvature_options={"which": ["hess_trace"]},
                                curvature_loss=batches.loss, prefix="acc")
    logger = fit(tmp_path, [recorder, cb], max_steps=2, accumulate_grad_batches=2)
    scalars, _ = read_events(logger)
    assert all(len(r["micro"]) == 2 for r in recorder.steps.values())
    want = _alpha_reference(recorder, 0)
    assert abs(want) < 0.9 and scalars["acc/alpha"][1] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert sorted(batches.calls) == [1]
    assert all(torch.equal(a, b) for a, b in zip(batches.calls[1], recorder.steps[1]["micro"][-1][0]))
    assert set(scalars["acc/curvature/hess_trace"]) == {1}


def test_alpha_without_per_sample_losses_is_an_error_saying_so(tmp_path):
    cb = tsl.TrainscopeCallback(alpha=trainscope.every(2))
    with pytest.raises(ValueError, match="alpha.*per-sample losses.*losses_key"):
        fit(tmp_path, [cb], max_steps=2, model=TinyRegressor(), logger=False)


def test_alpha_pending_start_is_dropped_on_resume(tmp_path):
    data = lambda: loader(n=8, batch=8)  # noqa: E731  (one batch an epoch, a checkpoint after each)
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    config = dict(param_metrics=None, grad_hist=None, alpha=True, grad_variance=trainscope.every(2), per_tensor=False)
    whole, resumed = [], []
    trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[tsl.TrainscopeCallback(sinks=[whole.append], **config),
                                                               checkpoint],
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(PerSampleLosses(), data())
    trainer = pl.Trainer(max_steps=6, logger=False, callbacks=[tsl.TrainscopeCallback(sinks=[resumed.append], **config)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(PerSampleLosses(), data(), ckpt_path=str(ckpt_dir / "epoch=3.ckpt"))
    assert [("alpha" in r.scalars) for r in whole] == [False, True, True, True]
    # Step 3's start was pending at the checkpoint: step 4 has no alpha; step 5 has step 4's.
    assert [(r.step, "alpha" in r.scalars) for r in resumed] == [(4, False), (5, True)]
    assert "grad_variance/mean_gsnr" in resumed[0].scalars  # every(2) goes on counting steps


@pytest.mark.parametrize("kwargs, names", [
    (dict(curvature=True), ("curvature", "curvature_loss")),
    (dict(curvature=True, curvature_loss=3), ("curvature_loss",)),
    (dict(curvature=True, curvature_loss=per_sample_losses, curvature_options={"method": "newton"}),
     ("curvature_options",)),
    (dict(curvature=True, curvature_loss=per_sample_losses, curvature_options=[1]), ("curvature_options",)),
    (dict(per_sample_layers=["net.0"], per_sample_options={"layers": ["net.2"]}),
     ("per_sample_layers", "per_sample_options")),
    (dict(per_sample_loss_reduction="sum", per_sample_options={"loss_reduction": "mean"}),
     ("per_sample_loss_reduction", "per_sample_options")),
    (dict(per_sample_options={"hist_2d": True}), ("per_sample_options",)),
    (dict(per_sample_options=[1]), ("per_sample_options",)),
    (dict(per_sample_hist="sometimes"), ("per_sample_hist",)),
    (dict(grad_variance="every:0"), ("grad_variance",)),
    (dict(alpha=3), ("alpha",)),
])
def test_bad_configurations_raise_at_construction_naming_the_arguments(kwargs, names):
    with pytest.raises((TypeError, ValueError, RuntimeError)) as e:
        tsl.TrainscopeCallback(**kwargs)
    assert all(n in str(e.value) for n in names), str(e.value)


def test_per_sample_layers_and_options_agree_or_merge():
    cb = tsl.TrainscopeCallback(per_sample=True, per_sample_layers=["net.0"],
                                per_sample_options={"layers": ["net.0"], "hist2d": True})
    assert cb.per_sample_options == {"layers": ["net.0"], "hist2d": True}
    cb = tsl.PerSampleStatsCallback(loss_reduction="sum", per_sample_options={"on_unsupported": "skip"})
    assert cb.per_sample_options == {"loss_reduction": "sum", "on_unsupported": "skip"}


@pytest.mark.parametrize("arg", ["per_sample_hist", "grad_variance", "alpha", "curvature"])
@pytest.mark.parametrize("schedule", [tsl.at_epoch_start(), tsl.at_epoch_end(), tsl.every_n_epochs(2)])
def test_epoch_schedules_are_refused_for_the_step_families(arg, schedule):
    with pytest.raises(ValueError, match=f"{arg} is an epoch schedule"):
        tsl.TrainscopeCallback(**{arg: schedule}, curvature_loss=per_sample_losses)
