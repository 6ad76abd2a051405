"""trainscope.cockpit_configuration: Cockpit's three configurations as Monitor settings, each run
for two steps of a small CNN; the records hold one trainscope name per Cockpit quantity."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainscope

ECONOMY = {"loss", "grad_norm", "distance", "update_size", "per_sample/norm_test", "per_sample/inner_test",
           "per_sample/ortho_test", "alpha"}
BUSINESS = ECONOMY | {"curvature/tic_diag", "curvature/hess_trace"}
FULL = BUSINESS | {"curvature/hess_max_ev"}


@pytest.mark.parametrize("label, names, hists", [
    ("economy", ECONOMY, {"per_sample_grad_hist1d"}),
    ("business", BUSINESS, {"per_sample_grad_hist1d"}),
    ("full", FULL, {"per_sample_grad_hist1d", "per_sample_grad_hist2d"}),
])
def test_each_configuration_records_every_cockpit_quantity(label, names, hists):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    cfg = trainscope.cockpit_configuration(label)
    mon = trainscope.Monitor(model, per_tensor=False, sinks=[records.append], **cfg)
    for step in range(2):
        x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 4, (8,))
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step()
        mon.step(step, losses.detach(), closure=lambda x=x, y=y: F.cross_entropy(model(x), y, reduction="none"))
    mon.flush()
    mon.close()
    last = records[-1]
    assert names <= set(last.scalars), sorted(names - set(last.scalars))
    assert {"alpha"} & set(records[0].scalars) == set()  # alpha of step 0 arrives with step 1
    got = {n for n in last.scalars if not n.endswith("stderr") and n != "per_sample/covered_fraction"}
    assert got - names <= {"per_sample/grad_variance_trace", "per_sample/grad_sq_norm_unbiased",
                           "per_sample/gradient_noise_scale"}, sorted(got - names)
    assert set(last.histograms) == hists
    # A ReLU CNN: the curvature family's Hessian diagonal is exact (from layer factors), as
    # BackPACK's is for Cockpit, so no standard error is recorded.
    assert "curvature/hess_trace_stderr" not in last.scalars


def test_bad_label_and_schedule_are_named():
    with pytest.raises(ValueError, match="label"):
        trainscope.cockpit_configuration("first")
    with pytest.raises(ValueError, match="schedule"):
        trainscope.cockpit_configuration("economy", None)
    a, b = trainscope.cockpit_configuration("full"), trainscope.cockpit_configuration("full")
    a["curvature_options"]["which"].append("tic_trace")
    assert "tic_trace" not in b["curvature_options"]["which"]  # a new dict each time
    assert trainscope.cockpit_configuration("economy", trainscope.every(5))["alpha"] == trainscope.every(5)
