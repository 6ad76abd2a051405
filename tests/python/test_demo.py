"""`make demo`'s main job on its tiny preset: the files it writes, and the direction of the three
loss-of-plasticity trends (effective rank falls, dead units rise, weight magnitude grows)."""

from __future__ import annotations

import csv

import pytest

from trainscope import demo

# The dashboard needs matplotlib (requirements.txt); an environment without it skips the demo.
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = demo.parse_args(["--tiny", "--out", str(out), "--no-progress", "--device", "cpu"])
    runs = demo.run(cfg)
    return cfg, out, runs


def _columns(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    return header, [dict(zip(header, r)) for r in body]


def test_writes_events_csv_and_dashboard(tiny_run):
    cfg, out, _ = tiny_run
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    assert (out / "dashboard.png").stat().st_size > 10_000
    header, rows = _columns(out / "metrics.csv")
    assert header[0] == "step"
    assert len(rows) == cfg.tasks * cfg.steps_per_task  # parameter metrics log every step
    for name in ("loss", "grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size",
                 "nonfinite_count", "grad_norm/0.weight", "train/error", "per_sample/norm_test",
                 "per_sample/gradient_noise_scale", "representation/effective_rank",
                 "representation/dead_fraction", "representation/effective_rank/1",
                 "representation/stable_rank/5"):
        assert name in header, name
    starts = [r for r in rows if r["representation/effective_rank"] != ""]
    assert [int(r["step"]) for r in starts] == [t * cfg.steps_per_task for t in range(cfg.tasks)]


def test_per_sample_histograms_on_their_schedule(tiny_run):
    cfg, _, runs = tiny_run
    taken = [r for r in runs[0].records if "per_sample/grad_hist2d" in r.histograms]
    assert [r.step for r in taken] == list(range(0, cfg.tasks * cfg.steps_per_task, cfg.per_sample_every))
    n_params = sum(p.numel() for p in demo.build_model(cfg).parameters())
    for r in taken:
        edges, counts = r.histograms["per_sample/grad_hist1d"]
        assert counts.shape == (100,) and edges.shape == (101,)
        assert int(counts.sum()) == cfg.batch_size * n_params  # every per-sample gradient element once
        (g_edges, p_edges), counts2 = r.histograms["per_sample/grad_hist2d"]
        assert counts2.shape == (100, 100) and int(counts2.sum()) == cfg.batch_size * n_params


def test_three_trends(tiny_run):
    cfg, _, runs = tiny_run
    rows = demo.task_summary(cfg, runs[0].records)
    first, last = rows[0], rows[-1]
    assert last["effective_rank"] < 0.85 * first["effective_rank"]
    assert last["dead_fraction"] > first["dead_fraction"]
    assert last["weight_magnitude"] > 1.1 * first["weight_magnitude"]


def test_compare_preset_writes_both_runs(tmp_path):
    cfg = demo.parse_args(["--tasks", "2", "--steps-per-task", "20", "--compare", "shrink_perturb",
                           "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    runs = demo.run(cfg)
    assert [r.label for r in runs] == ["plain backprop", "shrink-perturb"]
    for sub in ("plain", "shrink_perturb"):
        assert (tmp_path / sub / "metrics.csv").is_file()
    assert (tmp_path / "dashboard.png").is_file()
