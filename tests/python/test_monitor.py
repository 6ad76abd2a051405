"""The Python Monitor: records equal trainscope.param_stats on the same steps, schedules fire on
exactly their steps, Python quantities round-trip, file sinks parse back, the context manager
flushes (also when it exits by an exception), a state_dict resumes the curves, arguments that make
no sense are handled or named; on CUDA, a monitored step runs under sync-debug "error" and inside
a CUDA graph."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings

import pytest
import torch
from torch import nn

import trainscope
from trainscope import (CsvSink, JsonlSink, Monitor, Quantity, QuantityContext, Schedule, StepRecord, at_steps,
                        every, log_spaced, on_demand)

from conftest import DEVICES, requires_cuda


def due_steps(schedule, lo, hi):
    return [s for s in range(lo, hi) if schedule.due(s)]


def make_model(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(device)


def batch(step, device):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device)


class Collect:
    def __init__(self):
        self.records: list[StepRecord] = []

    def __call__(self, r: StepRecord):
        self.records.append(r)

    @property
    def steps(self):
        return [r.step for r in self.records]


def train(model, mon, steps, device, pass_losses=True, reference=None, **extras):
    """SGD steps with mon.step after each; `reference(step, losses)` runs right after it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    for s in range(steps):
        x, y = batch(s, device)
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step()
        mon.step(s, losses if pass_losses else None, **extras)
        if reference is not None:
            reference(s, losses.detach())


# ---------------------------------------------------------------------------------------------
# Schedules


def test_schedules_fire_on_exactly_their_steps():
    assert due_steps(every(3, 2), -5, 15) == [2, 5, 8, 11, 14]
    assert due_steps(every(1), -2, 4) == [0, 1, 2, 3]
    assert due_steps(at_steps([7, 3, 3, 10, 0]), -3, 30) == [0, 3, 7, 10]
    assert due_steps(at_steps([]), -3, 30) == []
    assert due_steps(log_spaced(), -3, 101) == [1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100]
    assert due_steps(log_spaced(1), 0, 20001) == [1, 10, 100, 1000, 10000]
    assert due_steps(log_spaced(2, 5), 0, 600) == [5, 15, 50, 158, 500]
    assert due_steps(on_demand(), -10, 1000) == []
    assert every(10).describe() == "every 10 from 0"
    assert log_spaced().describe() == "log-spaced, 10 per decade from 1"
    assert Schedule("every:4:1") == every(4, 1)


@pytest.mark.parametrize("spec", ["every:0", "every:x", "at:1,x", "log:0", "log:2:0", "sometimes", ""])
def test_bad_schedule_raises_naming_it(spec):
    with pytest.raises(RuntimeError, match="spec"):
        Schedule(spec)


def test_bad_schedule_argument_of_the_monitor_is_named():
    model = make_model("cpu")
    with pytest.raises(RuntimeError, match="grad_hist"):
        Monitor(model, grad_hist="every:0")
    with pytest.raises(RuntimeError, match="grad_hist"):
        Monitor(model, grad_hist="every")
    with pytest.raises(TypeError, match="param_metrics"):
        Monitor(model, param_metrics=3)
    with pytest.raises(TypeError, match="param_metrics"):
        Monitor(model, param_metrics=every)  # the factory, not a schedule


@pytest.mark.parametrize("make, name", [
    (lambda: every(-1), "k"), (lambda: every(0), "k"), (lambda: every(2.5), "k"), (lambda: every("3"), "k"),
    (lambda: every(True), "k"), (lambda: every(2, start=1.5), "start"), (lambda: at_steps("1,2"), "steps"),
    (lambda: at_steps(5), "steps"), (lambda: at_steps([1, 2.5]), "steps"), (lambda: log_spaced(0), "per_decade"),
    (lambda: log_spaced(10, 0), "start"), (lambda: log_spaced(2.5), "per_decade")])
def test_schedule_factories_name_their_bad_arguments(make, name):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        make()


# ---------------------------------------------------------------------------------------------
# The training loop against trainscope.param_stats


@pytest.mark.parametrize("device", DEVICES)
def test_records_equal_param_stats_on_the_same_steps(device):
    model = make_model(device)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    init = [p.detach().clone() for p in params]
    prev = [p.detach().clone() for p in params]
    got = Collect()
    mon = Monitor(model, param_metrics=every(1), grad_hist=at_steps([1, 3]), nbins=16, maxval=0.1, sinks=[got])
    assert mon.names == names
    want = {}

    def reference(step, losses):
        s = trainscope.param_stats([p.grad for p in params], params, init, prev, nbins=16, maxval=0.1,
                                   refresh_prev=True, losses=losses)
        d = {k: float(v) for k, v in s.as_dict(names).items()}
        d["nonfinite_count"] = d.pop("nonfinite_grads")
        for i, n in enumerate(names):
            d[f"nonfinite_count/{n}"] = float(s.nonfinite_per_tensor[i])
        want[step] = (d, s.hist.cpu())

    train(model, mon, 5, device, reference=reference)
    mon.flush()
    assert got.steps == [0, 1, 2, 3, 4]
    for r in got.records:
        d, hist = want[r.step]
        assert set(r.scalars) == set(d), r.step
        for k, v in d.items():
            assert r.scalars[k] == pytest.approx(v, rel=1e-6, abs=1e-12), (k, r.step)
        assert r.scalars["update_size"] > 0 and r.scalars["distance"] > 0
        if r.step in (1, 3):
            edges, counts = r.histograms["grad_hist1d"]
            assert torch.equal(counts, hist)
            assert counts.dtype == torch.int64 and edges.dtype == torch.float64
            assert torch.allclose(edges, torch.linspace(-0.1, 0.1, 17, dtype=torch.float64))
        else:
            assert r.histograms == {}


def test_schedules_give_exactly_their_records_and_switches_work():
    model = make_model("cpu")
    got = Collect()
    mon = Monitor(model, param_metrics=every(3), grad_hist=at_steps([2, 5]), per_tensor=False, sinks=[got])
    train(model, mon, 8, "cpu")
    mon.flush()
    assert got.steps == [0, 2, 3, 5, 6]
    for r in got.records:
        assert bool(r.scalars) == (r.step % 3 == 0)
        assert ("grad_hist1d" in r.histograms) == (r.step in (2, 5))
        assert all("/" not in k for k in r.scalars)

    got = Collect()
    mon = Monitor(model, param_metrics=False, grad_hist=None, sinks=[got])
    train(model, mon, 3, "cpu")
    mon.flush()
    assert got.records == []

    got = Collect()
    mon = Monitor(model, track_init=False, track_prev=False, grad_hist=False, sinks=[got])
    train(model, mon, 2, "cpu", pass_losses=False)
    mon.flush()
    assert got.steps == [0, 1]
    assert not any(k.startswith(("distance", "update_size", "loss")) for k in got.records[0].scalars)
    assert "grad_norm/0.weight" in got.records[0].scalars


def test_request_makes_a_key_due_at_the_next_step_only():
    model = make_model("cpu")
    got = Collect()
    mon = Monitor(model, param_metrics=on_demand(), grad_hist=False, sinks=[got])
    assert not mon.due("param_metrics", 1)
    mon.request("param_metrics")
    assert mon.due("param_metrics", 1)
    train(model, mon, 3, "cpu")
    mon.flush()
    assert got.steps == [0]
    with pytest.raises(RuntimeError, match="nope"):
        mon.request("nope")


# ---------------------------------------------------------------------------------------------
# Python quantities


class GradStats(Quantity):
    key = "gstats"

    def __init__(self):
        self.calls = []

    def compute(self, ctx: QuantityContext):
        self.calls.append(ctx.step)
        assert ctx.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        sq = sum((g.double() ** 2).sum() for g in ctx.grads)
        return {"": sq, "loss_max": ctx.losses.max(), "scale": ctx.extras["scale"] * torch.ones((), device=sq.device),
                "count": torch.full((), float(len(ctx.params)), device=sq.device)}


class Const(Quantity):
    def __init__(self, key, value):
        self.key, self.value = key, value

    def compute(self, ctx):
        return self.value


@pytest.mark.parametrize("device", DEVICES)
def test_python_quantity_round_trips(device):
    model = make_model(device)
    got = Collect()
    mon = Monitor(model, grad_hist=False, per_tensor=False, sinks=[got])
    q = GradStats()
    mon.add_quantity(q, at_steps([1, 3]))
    assert mon.due("gstats", 3) and not mon.due("gstats", 2)
    want = {}
    params = list(model.parameters())

    def reference(step, losses):
        want[step] = {"gstats": float(sum((p.grad.double() ** 2).sum() for p in params)),
                      "gstats/loss_max": float(losses.max()), "gstats/scale": 2.5, "gstats/count": 4.0}
        if step == 3:
            mon.request("gstats")

    train(model, mon, 5, device, reference=reference, scale=2.5)
    mon.flush()
    assert q.calls == [1, 3, 4]
    for r in got.records:
        if r.step not in (1, 3, 4):
            assert not any(k.startswith("gstats") for k in r.scalars)
            continue
        for k, v in want[r.step].items():
            assert r.scalars[k] == pytest.approx(v, rel=1e-6), (k, r.step)
        assert r.scalars["gstats"] == pytest.approx(r.scalars["grad_norm"] ** 2, rel=1e-5)

    with pytest.raises(RuntimeError, match="gstats"):
        mon.add_quantity(GradStats())
    with pytest.raises(RuntimeError, match="param_metrics"):
        mon.add_quantity(Const("param_metrics", torch.zeros(())))
    mon.add_quantity(Const("vec", torch.zeros(2, device=device)))
    with pytest.raises(ValueError, match="vec"):
        mon.step(9)


# ---------------------------------------------------------------------------------------------
# Sinks and the context manager


def test_jsonl_and_csv_sinks_parse_back(tmp_path):
    model = make_model("cpu")
    got = Collect()
    jpath, cpath = tmp_path / "m.jsonl", tmp_path / "m.csv"
    mon = Monitor(model, nbins=8, sinks=[got, JsonlSink(jpath), CsvSink(cpath)])
    mon.add_quantity(Const("odd", torch.tensor(float("nan"))))
    mon.add_quantity(Const("big", torch.tensor(float("-inf"))))
    train(model, mon, 3, "cpu")
    mon.flush()
    lines = jpath.read_text().splitlines()
    assert len(lines) == 3
    for line, r in zip(lines, got.records):
        obj = json.loads(line)
        assert obj["step"] == r.step
        assert obj["scalars"]["odd"] is None and obj["scalars"]["big"] is None
        for k, v in r.scalars.items():
            if math.isfinite(v):
                assert obj["scalars"][k] == v
        h = obj["histograms"]["grad_hist1d"]
        assert h["counts"] == r.histograms["grad_hist1d"][1].tolist()
        assert h["edges"] == r.histograms["grad_hist1d"][0].tolist()
    CsvSink(cpath)(got.records[0])  # a second sink appends without a second header
    rows = list(csv.reader(cpath.open()))
    assert rows[0] == ["step", "name", "value"]
    want = [[str(r.step), k, v] for r in got.records + got.records[:1] for k, v in r.scalars.items()]
    assert len(rows) - 1 == len(want)
    for row, (step, name, v) in zip(rows[1:], want):
        assert row[:2] == [step, name]
        assert (math.isnan(float(row[2])) and math.isnan(v)) or float(row[2]) == v
    assert any(row[1:] == ["big", "-inf"] for row in rows)


def test_extra_histograms_reach_sinks_and_files(tmp_path):
    model = make_model("cpu")
    got = Collect()
    jpath = tmp_path / "h.jsonl"
    mon = Monitor(model, grad_hist=False, sinks=[got, JsonlSink(jpath)])
    one = torch.tensor([2, 0, 7])
    two = torch.arange(6).reshape(2, 3)
    train(model, mon, 1, "cpu", histograms={"one": (one, torch.tensor([-1.0, 0.0, 1.0, 2.0])),
                                            "two": (two, ([0.0, 0.5, 1.0], [0.0, 1.0, 2.0, 3.0]))})
    mon.flush()
    edges, counts = got.records[0].histograms["one"]
    assert counts.tolist() == [2, 0, 7] and edges.tolist() == [-1.0, 0.0, 1.0, 2.0]
    (e0, e1), counts2 = got.records[0].histograms["two"]
    assert counts2.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert e0.tolist() == [0.0, 0.5, 1.0] and e1.tolist() == [0.0, 1.0, 2.0, 3.0]
    obj = json.loads(jpath.read_text().splitlines()[0])
    assert obj["histograms"]["two"] == {"edges": [0.0, 0.5, 1.0], "counts": [0, 1, 2, 3, 4, 5],
                                        "edges2": [0.0, 1.0, 2.0, 3.0]}
    assert "edges2" not in obj["histograms"]["one"]
    with pytest.raises(RuntimeError, match="edges"):
        mon.step(5, histograms={"bad": (one, [0.0, 1.0])})


def test_context_manager_flushes_and_records_arrive_later():
    model = make_model("cpu")
    got = Collect()
    with Monitor(model, sinks=[got]) as mon:
        train(model, mon, 3, "cpu")
        assert got.steps == [0, 1]  # the last step reaches the sinks at the next step/poll/flush
    assert got.steps == [0, 1, 2]
    assert mon.poll() == 0


def test_context_manager_exiting_by_an_exception_delivers_every_step(tmp_path):
    model = make_model("cpu")
    got = Collect()
    path = tmp_path / "m.jsonl"
    with pytest.raises(ZeroDivisionError):
        with Monitor(model, sinks=[got, JsonlSink(path)]) as mon:
            train(model, mon, 3, "cpu")
            assert got.steps == [0, 1]  # step 2 is in flight
            1 / 0
    assert got.steps == [0, 1, 2]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_an_error_while_flushing_after_an_exception_is_a_warning_not_a_second_exception():
    model = make_model("cpu")
    got = Collect()

    def fails_at_step_2(record):
        if record.step == 2:
            raise OSError("disk full")

    with pytest.warns(RuntimeWarning, match="disk full"):
        with pytest.raises(ZeroDivisionError):  # the first error, not the sink's
            with Monitor(model, sinks=[fails_at_step_2, got]) as mon:
                train(model, mon, 3, "cpu")
                1 / 0
    assert got.steps == [0, 1, 2]  # the other sink got every record
    # Without an exception in flight, the sink's error is raised (after every sink had the record).
    got = Collect()
    mon = Monitor(model, sinks=[fails_at_step_2, got])
    train(model, mon, 3, "cpu")
    with pytest.raises(OSError, match="disk full"):
        mon.flush()
    assert got.steps == [0, 1, 2]
    with pytest.raises(ValueError, match="errors"):
        mon.flush(errors="ignore")


def test_tensorboard_sink_file_is_complete_when_the_run_dies(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    model = make_model("cpu")
    sink = trainscope.TensorBoardSink(str(tmp_path))
    with pytest.raises(ZeroDivisionError):
        with Monitor(model, sinks=[sink]) as mon:
            train(model, mon, 3, "cpu")
            1 / 0
    acc = ea.EventAccumulator(str(tmp_path))  # read before close(): Monitor.flush flushed the writer
    acc.Reload()
    assert [e.step for e in acc.Scalars("trainscope/grad_norm")] == [0, 1, 2]
    sink.close()


def test_a_compiled_model_has_the_names_of_the_eager_one():
    model = make_model("cpu")
    compiled = torch.compile(model, backend="eager")
    assert any("_orig_mod" in n for n, _ in compiled.named_parameters())
    assert Monitor(compiled).names == Monitor(model).names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_named_params_iterable_and_frozen_parameters_left_out():
    model = make_model("cpu")
    model[0].bias.requires_grad_(False)
    assert Monitor(model).names == ["0.weight", "2.weight", "2.bias"]
    assert Monitor(model.named_parameters()).names == ["0.weight", "0.bias", "2.weight", "2.bias"]


# ---------------------------------------------------------------------------------------------
# Arguments that make no sense: handled as a user would expect, or an error naming the argument


def test_model_argument_is_checked():
    model = make_model("cpu")
    with pytest.raises(TypeError, match="model_or_named_params"):
        Monitor(None)
    with pytest.raises(TypeError, match=r"named_parameters\(\)"):
        Monitor(model.parameters())  # tensors, not (name, tensor) pairs
    with pytest.raises(TypeError, match=r"\.items\(\)"):
        Monitor(dict(model.named_parameters()))
    with pytest.raises(ValueError, match="no trainable parameters"):
        Monitor(make_model("cpu").requires_grad_(False))
    assert Monitor(model, sinks=None).names == ["0.weight", "0.bias", "2.weight", "2.bias"]  # None: no sinks


@pytest.mark.parametrize("kwargs, name", [
    (dict(per_tensor="yes"), "per_tensor"), (dict(track_init=None), "track_init"),
    (dict(weights_matrices_only=0.5), "weights_matrices_only"), (dict(ring_slots=0), "ring_slots"),
    (dict(ring_slots=2.5), "ring_slots"), (dict(nbins=0), "nbins"), (dict(maxval=-1.0), "maxval"),
    (dict(sinks=print), "sinks"), (dict(sinks=[3]), "sink"), (dict(sinks_on_all_ranks="no"), "sinks_on_all_ranks")])
def test_arguments_are_checked_at_construction(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        Monitor(make_model("cpu"), **kwargs)


def test_losses_as_a_list_are_concatenated_and_the_step_is_an_integer():
    model = make_model("cpu")
    got = Collect()
    mon = Monitor(model, grad_hist=False, per_tensor=False, sinks=[got])
    x, y = batch(0, "cpu")
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    losses = losses.detach()
    mon.step(0, [losses[:5], losses[5:]])            # e.g. one tensor per micro-batch
    mon.step(1, losses)
    mon.step(2, [0.5, 1.5, torch.tensor([4.0, 2.0])])  # numbers and tensors
    mon.step(3, [])                                    # no samples: the loss of nothing is NaN
    mon.step(4, (losses,))
    mon.flush()
    loss = {r.step: r.scalars["loss"] for r in got.records}
    assert loss[0] == pytest.approx(float(losses.mean()), rel=1e-6) and loss[0] == loss[1] == loss[4]
    assert loss[2] == 2.0 and math.isnan(loss[3])
    with pytest.raises(TypeError, match="losses"):
        mon.step(5, "0.5")
    with pytest.raises(TypeError, match=r"losses\[1\]"):
        mon.step(5, [losses, None])
    with pytest.raises(TypeError, match="step"):
        mon.step(1.5)
    with pytest.raises(TypeError, match="histograms"):
        mon.step(5, histograms=[torch.zeros(2, dtype=torch.long)])
    with pytest.raises(TypeError, match="'h'"):
        mon.step(5, histograms={"h": torch.zeros(2, dtype=torch.long)})


@pytest.mark.parametrize("key", ["loss", "grad_norm", "grad_magnitude", "weight_magnitude", "distance",
                                 "update_size", "nonfinite_count", "grad_hist1d", "param_metrics", "grad_hist",
                                 "grad_norm/0.weight", "mine/sub", ""])
def test_a_quantity_key_never_takes_a_built_in_name(key):
    model = make_model("cpu")
    got = Collect()
    mon = Monitor(model, sinks=[got])
    with pytest.raises((RuntimeError, ValueError), match=re.escape(key) if key else "key"):
        mon.add_quantity(Const(key, torch.full((), 123.0)))
    train(model, mon, 1, "cpu")  # the Monitor is unharmed
    mon.flush()
    assert got.records[0].scalars["grad_norm"] != 123.0


def test_a_quantity_may_return_python_numbers():
    model = make_model("cpu")
    got = Collect()
    mon = Monitor(model, grad_hist=False, per_tensor=False, sinks=[got])
    mon.add_quantity(Const("lr", 0.01))
    mon.add_quantity(Const("many", {"a": 2, "b": torch.tensor([3.0]), "c": True, "d": float("nan")}))
    train(model, mon, 2, "cpu")
    mon.flush()
    for r in got.records:
        assert r.scalars["lr"] == 0.01
        assert (r.scalars["many/a"], r.scalars["many/b"], r.scalars["many/c"]) == (2.0, 3.0, 1.0)
        assert math.isnan(r.scalars["many/d"])
    for bad in (None, "0.5", [1.0, 2.0]):
        mon = Monitor(model)
        mon.add_quantity(Const("odd", bad))
        with pytest.raises(ValueError, match="odd"):
            mon.step(0)


def test_histogram_summary_refuses_edges_and_counts_that_do_not_pair_up():
    edges = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="edges"):
        trainscope.histogram_summary(edges, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="counts"):
        trainscope.histogram_summary(edges, torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="counts"):
        trainscope.histogram_summary(edges, torch.tensor([1.0, 2.0]))
    # Sequences are fine too.
    assert trainscope.histogram_summary([-1.0, 0.0, 1.0], [0, 2])["bucket_counts"] == [2]


# ---------------------------------------------------------------------------------------------
# Checkpoints: state_dict / load_state_dict


def sgd_steps(model, mon, first, last, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # no optimizer state to restore
    for s in range(first, last):
        x, y = batch(s, device)
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step()
        mon.step(s, losses)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_resumes_distance_and_update_size(tmp_path, device):
    config = dict(grad_hist=on_demand(), per_tensor=False)
    model = make_model(device)
    uninterrupted = Collect()
    mon = Monitor(model, sinks=[uninterrupted], **config)
    sgd_steps(model, mon, 0, 3, device)
    mon.request("grad_hist")  # pending at the checkpoint
    torch.save({"model": model.state_dict(), "monitor": mon.state_dict()}, tmp_path / "ckpt.pt")
    sgd_steps(model, mon, 3, 6, device)
    mon.flush()

    resumed_model = make_model(device, seed=7)  # another initialisation, then the checkpoint's weights
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state = ckpt["monitor"]
    assert state["names"] == mon.names and state["step"] == 2 and state["requested"] == ["grad_hist"]
    assert len(state["init"]) == len(state["prev"]) == 4 and (state["rank"], state["world_size"]) == (0, 1)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = Collect()
    mon2 = Monitor(resumed_model, sinks=[resumed], **config)
    mon2.load_state_dict(state)
    assert mon2.due("grad_hist", 3)
    sgd_steps(resumed_model, mon2, 3, 6, device)
    mon2.flush()
    assert resumed.steps == [3, 4, 5]
    for want, got in zip(uninterrupted.records[3:], resumed.records):
        for name in ("distance", "update_size", "grad_norm", "loss"):
            assert got.scalars[name] == pytest.approx(want.scalars[name], rel=1e-6), (name, got.step)
    assert [bool(r.histograms) for r in resumed.records] == [True, False, False]

    # Without parameter copies the state holds no tensors, and the loading Monitor keeps its θ₀.
    light = mon2.state_dict(param_copies=False)
    assert light["init"] == [] and light["prev"] == [] and light["step"] == 5
    fresh = Collect()
    mon3 = Monitor(resumed_model, sinks=[fresh], **config)
    mon3.load_state_dict(light)
    sgd_steps(resumed_model, mon3, 6, 7, device)
    mon3.flush()
    assert fresh.records[0].scalars["distance"] == pytest.approx(fresh.records[0].scalars["update_size"], rel=1e-6)


def test_load_state_dict_of_other_parameters_names_what_differs():
    model = make_model("cpu")
    state = Monitor(model).state_dict()
    wider = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(RuntimeError, match=r"'0\.weight'.*shape"):
        Monitor(wider).load_state_dict(state)
    other = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match=r"lacks '3\.weight'"):
        Monitor(other).load_state_dict(state)
    mon = Monitor(model)
    with pytest.raises(TypeError, match="state"):
        mon.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="init"):
        mon.load_state_dict({"names": mon.names})
    with pytest.raises(RuntimeError, match="nope"):
        mon.load_state_dict(dict(state, requested=["nope"]))
    before = [t.clone() for t in mon.state_dict()["init"]]
    bad = dict(state, init=[torch.ones(7, 5), torch.ones(7), torch.ones(3, 7), torch.ones(2)])
    with pytest.raises(RuntimeError, match=r"'2\.bias'"):
        mon.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, mon.state_dict()["init"]))  # nothing changed


# ---------------------------------------------------------------------------------------------
# CUDA: no host sync in a step, and a graph-captured step


@requires_cuda
def test_monitored_step_has_no_host_sync():
    device = "cuda"
    model = make_model(device)
    got = Collect()
    mon = Monitor(model, sinks=[got])
    mon.add_quantity(GradStats())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(0, device)

    def one(step, check):
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step()
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            mon.step(step, losses, scale=2.0)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    one(0, False)  # warm-up: allocations, pinned slots
    torch.cuda.synchronize()
    for s in range(1, 4):
        one(s, True)
    mon.flush()
    assert got.steps == [0, 1, 2, 3]
    assert all(math.isfinite(r.scalars["gstats"]) for r in got.records if "gstats" in r.scalars)


@requires_cuda
def test_graph_captured_step_equals_eager():
    device = "cuda"
    w = torch.randn(33, 17, device=device, requires_grad=True)
    b = torch.randn(17, device=device, requires_grad=True)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    losses = torch.zeros(8, device=device)
    got_g, got_e = Collect(), Collect()
    graphed = Monitor([("w", w), ("b", b)], nbins=16, sinks=[got_g])
    eager = Monitor([("w", w), ("b", b)], nbins=16, sinks=[got_e])
    q = Const("const", torch.full((), 3.0, device=device))
    graphed.add_quantity(q)
    eager.add_quantity(q)

    def set_state(k):
        g = torch.Generator(device=device).manual_seed(k)
        with torch.no_grad():
            w.add_(0.01 * torch.randn(w.shape, device=device, generator=g))
            b.add_(0.01 * torch.randn(b.shape, device=device, generator=g))
            w.grad.copy_(0.02 * torch.randn(w.shape, device=device, generator=g))
            b.grad.copy_(0.02 * torch.randn(b.shape, device=device, generator=g))
            losses.copy_(torch.rand(losses.shape, device=device, generator=g))

    set_state(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.step(0, losses)  # warm-up, eager
        eager.step(0, losses)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(1, losses)  # schedules evaluated here, for step 1
    for k in range(1, 6):
        set_state(k)
        graph.replay()
        graphed.collect_captured(k)
        eager.step(k, losses)
    graphed.flush()
    eager.flush()
    assert got_g.steps == got_e.steps == [0, 1, 2, 3, 4, 5]
    for rg, re in zip(got_g.records[1:], got_e.records[1:]):
        assert rg.scalars.keys() == re.scalars.keys()
        for k, v in re.scalars.items():
            assert rg.scalars[k] == pytest.approx(v, rel=1e-12, nan_ok=True), (k, rg.step)
        assert rg.scalars["update_size"] > 0 and rg.scalars["const"] == 3.0
        assert torch.equal(rg.histograms["grad_hist1d"][1], re.histograms["grad_hist1d"][1])


# ------------------------------------------------------------------------------------------------
# Per-metric switches and schedules (metrics=), and measure_now.


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def _train_step(model, opt, gen):
    x = torch.randn(8, 5, generator=gen)
    losses = model(x).pow(2).sum(1)
    opt.zero_grad()
    losses.mean().backward()
    opt.step()
    return losses.detach()


def _flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def test_each_metric_follows_its_own_schedule_and_off_costs_its_copies():
    model = _mlp()
    params = list(model.parameters())
    init = [p.detach().clone() for p in params]
    recs = []
    mon = trainscope.Monitor(model, param_metrics=trainscope.every(2), grad_hist=False, per_tensor=True,
                             metrics={"weight_magnitude": trainscope.every(3), "distance": False,
                                      "update_ratio": True, "loss": trainscope.at_steps([1])},
                             sinks=[recs.append])
    # distance off: no θ₀ kept; θ_prev kept for update_size / update_ratio.
    state = mon.state_dict()
    assert state["init"] == [] and len(state["prev"]) == len(params)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    prevs = []
    for step in range(4):
        prevs.append([p.detach().clone() for p in params])
        losses = _train_step(model, opt, gen)
        mon.step(step, losses)
    mon.flush()
    by_step = {r.step: r.scalars for r in recs}
    names = lambda s: [n for n in by_step[s] if "/" not in n]
    # param_metrics (every 2) at 0 and 2, weight_magnitude at 0 and 3, update_ratio every step,
    # loss at 1 only; distance never.
    assert names(0) == ["grad_norm", "grad_magnitude", "weight_magnitude", "update_size", "weight_norm",
                        "update_ratio", "nonfinite_count"]
    assert names(1) == ["loss", "update_ratio"]
    assert names(2) == ["grad_norm", "grad_magnitude", "update_size", "weight_norm", "update_ratio",
                        "nonfinite_count"]
    assert names(3) == ["weight_magnitude", "update_ratio"]
    assert not any(n.startswith("distance") for r in recs for n in r.scalars)
    # Values: update_ratio of step 3 is ‖θ₃ − θ₂‖ / ‖θ₃‖, per tensor and globally.
    upd = (_flat(params) - _flat(prevs[3])).norm() / _flat(params).norm()
    assert by_step[3]["update_ratio"] == pytest.approx(upd.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), prevs[3]):
        want = (p.detach().double() - q.double()).norm() / p.detach().double().norm()
        assert by_step[3][f"update_ratio/{name}"] == pytest.approx(want.item(), rel=1e-5)
    assert by_step[3]["weight_magnitude"] == pytest.approx(_flat(params).abs().mean().item(), rel=1e-5)
    del init


def test_metrics_argument_is_checked_at_construction():
    model = _mlp()
    with pytest.raises(ValueError, match="'grad_nrom'"):
        trainscope.Monitor(model, metrics={"grad_nrom": True})
    with pytest.raises(TypeError, match="metrics"):
        trainscope.Monitor(model, metrics=["grad_norm"])
    with pytest.raises(Exception, match=r"metrics\['grad_norm'\]"):
        trainscope.Monitor(model, metrics={"grad_norm": "every:zero"})


def test_measure_now_measures_parameters_now_and_leaves_the_step_schedule_alone():
    model = _mlp()
    params = list(model.parameters())
    init = _flat(params)
    recs = []
    mon = trainscope.Monitor(model, param_metrics=trainscope.every(10), grad_hist=trainscope.every(10),
                             per_tensor=False, sinks=[recs.append])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    # Before any step (an epoch start): parameter metrics only, no gradients, no update.
    mon.measure_now(0)
    _train_step(model, opt, gen)
    mon.step(0)
    _train_step(model, opt, gen)
    g = _flat([p.grad for p in params])
    mon.step(1)  # not due (every 10): only θ_prev follows
    # After a step, with its gradients: the gradient metrics and the histogram too.
    mon.measure_now(1, gradients=True)
    mon.measure_now(1, metrics=["weight_norm", "grad_hist"])  # no gradients: no histogram
    mon.request("update_size")
    after = [p.detach().clone() for p in params]
    _train_step(model, opt, gen)
    mon.step(2)  # the request: update_size of step 2 alone, θ_prev untouched by measure_now
    mon.flush()
    first, _, with_grads, only_norm, requested = recs
    assert first.step == 0 and list(first.scalars) == ["weight_magnitude", "distance", "weight_norm"]
    assert first.scalars["distance"] == 0.0 and not first.histograms
    assert first.scalars["weight_norm"] == pytest.approx(init.norm().item(), rel=1e-6)
    assert list(with_grads.scalars) == ["grad_norm", "grad_magnitude", "weight_magnitude", "distance",
                                        "weight_norm", "nonfinite_count"]
    assert with_grads.scalars["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5)
    assert with_grads.scalars["distance"] == pytest.approx((_flat(after) - init).norm().item(), rel=1e-5)
    assert int(with_grads.histograms["grad_hist1d"][1].sum()) == g.numel()
    assert list(only_norm.scalars) == ["weight_norm"] and not only_norm.histograms
    assert requested.step == 2 and list(requested.scalars) == ["update_size"]
    assert requested.scalars["update_size"] == pytest.approx((_flat(params) - _flat(after)).norm().item(), rel=1e-5)


def test_measure_now_names_custom_quantities_and_refuses_what_it_cannot_measure():
    class Count(trainscope.Quantity):
        key = "count"

        def __init__(self):
            self.calls = 0

        def compute(self, ctx):
            self.calls += 1
            return torch.tensor(float(ctx.step))

    model = _mlp()
    recs = []
    q = Count()
    mon = trainscope.Monitor(model, grad_hist=False, metrics={"distance": False}, sinks=[recs.append],
                             per_tensor=False)
    mon.add_quantity(q, trainscope.on_demand())
    mon.measure_now(5, metrics=["count"])
    mon.measure_now(6, metrics=["update_size", "weight_magnitude"])  # update_size: never measured here
    with pytest.raises(ValueError, match="'distance' is off"):
        mon.measure_now(7, metrics=["distance"])
    with pytest.raises(ValueError, match="grad_hist"):
        mon.measure_now(7, metrics=["grad_hist"])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        mon.measure_now(7, metrics=["nope"])
    with pytest.raises(TypeError, match="metrics"):
        mon.measure_now(7, metrics="weight_norm")
    mon.flush()
    assert [(r.step, list(r.scalars)) for r in recs] == [(5, ["count"]), (6, ["weight_magnitude"])]
    assert recs[0].scalars["count"] == 5.0 and q.calls == 1
