"""The Monitor's per-sample family (per_sample=, per_sample_hist=): its records against
PerSampleHooks computed by hand on the same steps, and the arming rule (hooks capture only for
steps where a per-sample family is due)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainscope
from trainscope.monitor import PER_SAMPLE_HIST1D_NAME, PER_SAMPLE_HIST2D_NAME

STATS = trainscope.PER_SAMPLE_STATS


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(),
                         nn.Linear(5, 3))


def batch(step, b=6):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(b, 2, 6, 6, generator=g), torch.randint(0, 3, (b,), generator=g)


def captured_uses(hooks):
    return sum(len(c.uses) for c in hooks._captures.values())


def run(mon_kwargs, steps, request_before=()):
    """Trains a copy of the model for ``steps`` steps with a Monitor; returns {step: record} and,
    per step, the per-sample results PerSampleHooks give by hand on the same model and batch, and
    the hooks' captured uses just before each step() call."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, sinks=[records.append], **mon_kwargs)
    by_hand, uses = {}, {}
    for step in range(steps):
        if step in request_before:
            mon.request("per_sample")
        x, y = batch(step)
        # By hand, on a copy of the parameters before this step's update.
        ref_model = copy.deepcopy(model)
        with trainscope.PerSampleHooks(ref_model) as h:
            F.cross_entropy(ref_model(x), y).backward()
            by_hand[step] = (h.stats(), h.grad_hist1d(), h.grad_hist2d(100, 0.05, 10, 1.0)[0])
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        uses[step] = captured_uses(mon.per_sample_hooks) if mon.per_sample_hooks is not None else None
        mon.step(step, losses)
        opt.step()
    mon.flush()
    mon.close()
    return {r.step: r for r in records}, by_hand, uses, mon


def test_records_equal_hooks_by_hand_and_undue_steps_capture_nothing():
    recs, by_hand, uses, mon = run({"per_sample": trainscope.every(3), "per_sample_hist": trainscope.every(2),
                                    "per_sample_options": {"hist2d": True, "nbins_param": 10}}, 7)
    for step in range(7):
        ps_due, hist_due = step % 3 == 0, step % 2 == 0
        rec = recs.get(step)
        assert (uses[step] > 0) == (ps_due or hist_due), step  # armed for due steps only
        if ps_due:
            stats = by_hand[step][0]
            for name in STATS:
                assert rec.scalars[f"per_sample/{name}"] == float(stats[name]), (step, name)
        elif rec is not None:
            assert not any(k.startswith("per_sample/") for k in rec.scalars)
        if hist_due:
            edges, counts = rec.histograms[PER_SAMPLE_HIST1D_NAME]
            assert torch.equal(counts, by_hand[step][1])
            assert torch.equal(edges, trainscope.hist_bin_edges(100, 0.05))
            (e1, e2), counts2 = rec.histograms[PER_SAMPLE_HIST2D_NAME]
            assert counts2.shape == (100, 10)
            # The 2-D histogram pairs with the parameters at step(): after the update (documented).
        elif rec is not None:
            assert PER_SAMPLE_HIST1D_NAME not in rec.histograms
    # close() removed the hooks.
    assert mon.per_sample_hooks._handles == []


def test_request_arms_the_next_step():
    recs, by_hand, uses, _ = run({"per_sample": trainscope.on_demand()}, 4, request_before=(2,))
    assert uses == {0: 0, 1: 0, 2: uses[2], 3: 0} and uses[2] > 0
    assert set(k for s, r in recs.items() for k in r.scalars if k.startswith("per_sample/")) == \
        {f"per_sample/{n}" for n in STATS}
    assert [s for s, r in recs.items() if "per_sample/norm_test" in r.scalars] == [2]
    assert recs[2].scalars["per_sample/norm_test"] == float(by_hand[2][0]["norm_test"])


def test_armed_at_construction_iff_step_zero_is_due():
    model = make_model()
    assert trainscope.Monitor(model, per_sample=trainscope.every(2)).per_sample_hooks.enabled
    m = trainscope.Monitor(model, per_sample=trainscope.every(2, start=1))
    assert not m.per_sample_hooks.enabled
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()  # step 0: not due, nothing captured
    assert captured_uses(m.per_sample_hooks) == 0
    m.step(0)
    assert m.per_sample_hooks.enabled  # step 1 is due
    m.close()


def test_off_attaches_no_hooks():
    model = make_model()
    mon = trainscope.Monitor(model)
    assert mon.per_sample_hooks is None
    assert not model._forward_pre_hooks and all(not m._forward_hooks for m in model.modules())
    with_ps = trainscope.Monitor(model, per_sample=True)
    assert model._forward_pre_hooks
    with_ps.close()
    assert not model._forward_pre_hooks and all(not m._forward_hooks for m in model.modules())


def test_due_step_without_capture_warns_and_batch_of_one_is_nan():
    model = make_model()
    records = []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, per_sample=trainscope.on_demand(),
                             sinks=[records.append])
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    mon.request("per_sample")  # after the forward: step 0 is due, nothing captured
    with pytest.warns(RuntimeWarning, match="no forward and backward pass was captured"):
        mon.step(0)
    mon.request("per_sample")
    x, y = batch(1, b=1)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="fewer than 2 samples"):
        mon.step(1)
    mon.flush()
    got = {r.step: r.scalars for r in records}
    assert not any(k.startswith("per_sample/") for k in got.get(0, {}))
    assert all(math.isnan(got[1][f"per_sample/{n}"]) for n in STATS)
    mon.close()


def test_measure_now_never_measures_per_sample():
    model = make_model()
    records = []
    mon = trainscope.Monitor(model, per_sample=True, sinks=[records.append])
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    mon.measure_now(0, gradients=True)
    with pytest.raises(ValueError, match="never measured here"):
        mon.measure_now(0, metrics=["per_sample"])
    mon.flush()
    assert records and not any(k.startswith("per_sample/") for k in records[0].scalars)
    mon.close()


def test_parts_come_with_the_weight_gradients_on_steps_whose_statistics_are_due():
    """On steps whose statistics are due the backward pass takes every Linear's and Conv2d's parts
    with its weight gradient (no weight-gradient GEMM of the layer's own); on steps with only the
    histogram due it is left as it is; per_sample_options={"fuse_weight_grad": False} never fuses,
    and records the same statistics; request("per_sample") makes them due."""
    runs = {}
    for fuse in (True, False):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        records, fused = [], {}
        mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, sinks=[records.append],
                                 per_sample=trainscope.every(2), per_sample_hist=trainscope.every(1),
                                 per_sample_options={"fuse_weight_grad": fuse})
        for step in range(5):
            x, y = batch(step)
            opt.zero_grad()
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
            fused[step] = sum(u.parts is not None for c in mon.per_sample_hooks._captures.values() for u in c.uses)
            mon.step(step, losses)
            opt.step()
        mon.flush()
        runs[fuse] = ({r.step: r.scalars for r in records}, fused)
        assert not mon.per_sample_hooks.stats_due  # step 5: the histogram alone
        mon.request("per_sample")
        assert mon.per_sample_hooks.stats_due
        mon.close()
    assert runs[True][1] == {0: 3, 1: 0, 2: 3, 3: 0, 4: 3}
    assert runs[False][1] == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}
    for step in (0, 2, 4):
        for name in STATS:
            want = runs[False][0][step][f"per_sample/{name}"]
            assert runs[True][0][step][f"per_sample/{name}"] == pytest.approx(want, rel=1e-4), (step, name)


@pytest.mark.parametrize("kwargs, match", [
    ({"per_sample": 3}, "per_sample"),
    ({"per_sample_hist": "every:x"}, "per_sample_hist"),
    ({"per_sample": True, "per_sample_options": {"nbin": 10}}, r"per_sample_options has the unknown key 'nbin'"),
    ({"per_sample": True, "per_sample_options": {"method": "fast"}}, r"per_sample_options\['method'\]"),
    ({"per_sample": True, "per_sample_options": {"loss_reduction": "none"}}, r"per_sample_options\['loss_reduction'\]"),
    ({"per_sample": True, "per_sample_options": {"nbins": 0}}, r"per_sample_options\['nbins'\]"),
    ({"per_sample": True, "per_sample_options": {"hist2d": "yes"}}, r"per_sample_options\['hist2d'\]"),
    ({"per_sample": True, "per_sample_options": {"fuse_weight_grad": "yes"}}, r"per_sample_options\['fuse_weight_grad'\]"),
    ({"per_sample": True, "per_sample_options": {"batch_first": "no"}}, r"per_sample_options\['batch_first'\]"),
    ({"per_sample": True, "per_sample_options": []}, "per_sample_options must be a dict"),
])
def test_bad_configuration_fails_at_construction_naming_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        trainscope.Monitor(make_model(), **kwargs)


def test_named_params_with_per_sample_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="per_sample need the model as an nn.Module"):
        trainscope.Monitor(model.named_parameters(), per_sample=True)


def test_unsupported_layer_fails_at_construction():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4))
    with pytest.raises(TypeError, match="PReLU"):
        trainscope.Monitor(model, per_sample=True)
    mon = trainscope.Monitor(model, per_sample=True, per_sample_options={"layers": ["0"]})
    assert mon.per_sample_hooks.layers == ["0"]
    mon.close()


def test_unsupported_layers_skipped_on_request_and_the_coverage_recorded():
    """per_sample_options={"on_unsupported": "skip"}: the supported layers are measured, and the
    record says which share of the parameters the statistics cover; "error" (default) refuses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.PReLU(6), torch.nn.Linear(6, 3))
    with pytest.raises(TypeError, match="PReLU"):
        trainscope.Monitor(model, per_sample=True)
    recs = []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, per_sample=True,
                             per_sample_options={"on_unsupported": "skip"}, sinks=[recs.append])
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    losses = (model(x) - y).pow(2).sum(1)
    losses.mean().backward()
    mon.step(0, losses)
    mon.flush()
    total = sum(p.numel() for p in model.parameters())
    covered = total - model[1].weight.numel()
    assert recs[0].scalars["per_sample/covered_fraction"] == pytest.approx(covered / total)
    assert math.isfinite(recs[0].scalars["per_sample/norm_test"])
    with pytest.raises(ValueError, match="on_unsupported"):
        trainscope.Monitor(model, per_sample=True, per_sample_options={"on_unsupported": "maybe"})


def test_sequence_first_model_takes_batch_first_false():
    """A model in torch's sequence-first layout: refused at construction with the default, and
    with per_sample_options={"batch_first": False} recorded as the hooks give it by hand."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False: [T, B, D]
    model = nn.Sequential(layer, nn.Linear(8, 3))
    x, y = torch.randn(5, 4, 8), torch.randint(0, 3, (5, 4))   # [T, B, ...]
    with pytest.raises(ValueError, match="pass batch_first=False"):
        trainscope.Monitor(model, per_sample=True)
    ref_model = copy.deepcopy(model)
    with trainscope.PerSampleHooks(ref_model, batch_first=False) as h:
        F.cross_entropy(ref_model(x).transpose(1, 2), y, reduction="none").mean(0).mean().backward()
        want = h.stats()
    records = []
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, sinks=[records.append], per_sample=True,
                             per_sample_options={"batch_first": False})
    losses = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(0)   # [B]
    losses.mean().backward()
    mon.step(0, losses)
    mon.flush()
    mon.close()
    for name in STATS:
        assert records[0].scalars[f"per_sample/{name}"] == pytest.approx(float(want[name]), rel=1e-6), name


def test_on_unsupported_vmap_measures_other_modules_in_the_monitor():
    """A PReLU (no layer factors) measured by torch.func, recorded after optimizer.step() as the
    hooks give it before the update."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.PReLU(8), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(TypeError, match="on_unsupported='vmap'"):
        trainscope.Monitor(model, per_sample=True)
    ref_model = copy.deepcopy(model)
    with trainscope.PerSampleHooks(ref_model, on_unsupported="vmap") as h:
        F.cross_entropy(ref_model(x), y).backward()
        want = h.stats()
    records = []
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = trainscope.Monitor(model, param_metrics=False, grad_hist=False, sinks=[records.append], per_sample=True,
                             per_sample_options={"on_unsupported": "vmap"})
    losses = F.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    opt.step()
    mon.step(0, losses)
    mon.flush()
    mon.close()
    for name in STATS:
        assert records[0].scalars[f"per_sample/{name}"] == pytest.approx(float(want[name]), rel=1e-6), name
