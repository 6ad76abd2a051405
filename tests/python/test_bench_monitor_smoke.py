"""Smoke test of bench/bench_monitor.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted. The run itself checks the monitored records (one per step, every default
name, grad_norm against torch, the histogram holding every gradient element; for each of Cockpit's
configurations, every name trainscope.cockpit_configuration promises, and the same first-step
per-sample statistics in every configuration) and exits non-zero when they are wrong. Cockpit is
an optional peer: without it its rows say "not installed".
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_monitor_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # One intra-op thread: tiny ops on a busy machine otherwise stall on OpenMP barriers.
    proc = run_bench_quick_cpu("bench_monitor.py", out, {"OMP_NUM_THREADS": "1"})

    data = json.loads(out.read_text())
    assert data["benchmark"] == "monitor"
    assert data["verified"] is True
    env = data["environment"]
    assert env["device"] == "cpu" and "bench_monitor.py" in env["command"]
    assert set(env["cockpit"]) >= {"available"}

    rows = {r["model"]: r for r in data["results"]}
    assert set(rows) == {"3c3d", "gpt2"}
    s = data["settings"]
    for name, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        assert row["verify"]["ok"], row["verify"]
        assert row["records_delivered"] == s["rounds"] * (s["warmup"] + s["repeats"])
        assert row["plain"]["median_ms"] > 0 and row["trainscope"]["median_ms"] > 0
        assert row["ratio"] > 0
        assert "goal_ok" not in row  # the goal is judged on a GPU only
        if env["cockpit"]["available"]:
            assert row["cockpit"]["status"] == "ok" or row["cockpit"]["status"].startswith(("unsupported", "out of"))
        else:
            assert row["cockpit"]["status"].startswith("not installed")
    assert rows["gpt2"]["n_layer"] == 2 and rows["3c3d"]["tensors"] == 12
    assert "trainscope ms" in proc.stdout  # the table header

    # Cockpit's configurations: a trainscope row and a Cockpit row each, on both models.
    assert s["configs"] == ["economy", "business", "full"] and s["curvature_samples"] == 8
    for name, row in rows.items():
        assert list(row["configs"]) == s["configs"]
        for label, entry in row["configs"].items():
            ts, ck = entry["trainscope"], entry["cockpit"]
            assert ts["status"] == "ok" and ts["verify"]["ok"], (name, label, ts)
            steps = s["curvature_repeats"] + s["curvature_warmup"] if label != "economy" else s["repeats"] + s["warmup"]
            assert ts["records_delivered"] == s["rounds"] * steps
            assert ts["median_ms"] > 0 and ts["overhead_ms"] == ts["median_ms"] - row["plain"]["median_ms"]
            assert ("curvature" in ts) == (label != "economy")
            if env["cockpit"]["available"]:
                assert ck["status"] == "ok" or ck["status"].startswith(("unsupported", "out of")), ck
                if ck["status"] == "ok":
                    assert ck["overhead_ms"] == ck["median_ms"] - row["plain"]["median_ms"]
            else:
                assert ck["status"].startswith("not installed")
            assert entry["goal"] == "not judged" and "goal_ok" not in entry
        if env["cockpit"]["available"]:
            assert row["configs"]["economy"]["cockpit"] == row["cockpit"]
    if env["cockpit"]["available"]:  # BackPACK handles the CNN, not the transformer
        assert all(rows["3c3d"]["configs"][c]["cockpit"]["status"] == "ok" for c in s["configs"])
        assert all(rows["gpt2"]["configs"][c]["cockpit"]["status"].startswith("unsupported") for c in s["configs"])
    goals = [line for line in proc.stdout.splitlines() if line.startswith("goal: ")]
    assert len(goals) == 2 + 2 * 3, goals  # the step-time goal per model, the overhead goal per model and configuration
    assert sum("smaller than Cockpit's (business) on 3c3d: not judged (CPU run)" in g for g in goals) == (
        1 if env["cockpit"]["available"] else 0)
