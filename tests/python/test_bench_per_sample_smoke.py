"""Smoke test of bench/bench_per_sample_stats.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted. The run itself checks trainscope's six statistics (float32 training,
PerSampleHooks) and every method's norm test against float64 vmap per-sample gradients, and
exits non-zero when they disagree. BackPACK, Cockpit and Opacus are optional peers: without them
their rows say "not installed" and the run still passes.

The whole-model rows (a tiny GPT-2-style decoder and ResNet-18-style CNN) must run: plain and vmap
steps, and trainscope's either measured or "unsupported" (PerSampleHooks refusing a layer kind it
does not handle yet), with a goal line for each; any other outcome fails. With --profile, each
measured model lists the operators trainscope's step adds time in.
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_per_sample_stats_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # One intra-op thread: tiny ops on a busy machine otherwise stall on OpenMP barriers.
    proc = run_bench_quick_cpu("bench_per_sample_stats.py", out, {"OMP_NUM_THREADS": "1"}, ("--profile",))

    data = json.loads(out.read_text())
    assert data["benchmark"] == "per_sample_stats"
    assert data["verified"] is True
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"]
    assert "bench_per_sample_stats.py" in env["command"]
    assert set(env["peers"]) == {"backpack", "cockpit", "opacus"}

    # Correctness before timing: trainscope and vmap agree with the float64 reference.
    assert data["verify"], "no correctness check ran"
    for rep in data["verify"]:
        assert rep["ok"], rep
        assert rep["trainscope_materialised_float64"]["ok"]
        for name in ("trainscope", "vmap", "einsum"):
            assert rep["methods"][name]["status"] == "ok" and rep["methods"][name]["ok"], rep["methods"][name]

    rows = data["results"]
    assert len(rows) == 8  # --quick: B 4,8 × d 16,32 × T 1,4
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        methods = row["methods"]
        for name in ("plain", "trainscope", "vmap", "einsum"):
            assert methods[name]["status"] == "ok", (name, methods[name])
            assert "median_ms" in methods[name]["step"]
        for name in ("backpack", "cockpit"):
            assert methods[name]["status"] in ("ok", "not installed"), (name, methods[name])
        assert set(methods["trainscope"]["stats"]) == {
            "norm_test", "inner_test", "ortho_test", "grad_variance_trace", "grad_sq_norm_unbiased",
            "gradient_noise_scale"}
        derived = row["derived"]
        for key in ("plain_forward_ms", "plain_backward_ms", "trainscope_overhead_fraction",
                    "speedup_vs_vmap"):
            assert key in derived, key
        assert row["agree"] is True
    assert "speedup" in proc.stdout and "goal:" in proc.stdout

    # Whole models: every row ran, and each printed its goal line.
    models = data["model_results"]
    assert [r["model"] for r in models] == ["gpt2", "resnet18"]
    for r in models:
        assert "error" not in r and "skipped" not in r, r
        methods = r["methods"]
        assert list(methods) == ["plain", "trainscope", "opacus", "vmap"], list(methods)
        for name in ("plain", "vmap"):
            assert methods[name]["status"] == "ok", (r["model"], name, methods[name])
            assert {"forward", "backward", "optimizer"} <= set(methods["plain"]["phases_median_ms"])
        ts = methods["trainscope"]
        assert ts["status"] in ("ok", "unsupported"), (r["model"], ts)
        if ts["status"] == "ok":
            assert set(ts["stats"]) == set(methods["vmap"]["stats"])
            assert "overhead_fraction_of_plain_backward" in ts and "overhead_ok" in ts["goals"]
            assert r["agree"] is True, r
        else:
            assert ts["note"].startswith("PerSampleHooks"), ts
        assert methods["opacus"]["status"] in ("ok", "unsupported", "not installed"), methods["opacus"]
        assert r["plain_backward_ms"] > 0
        if ts["status"] == "ok":  # --profile: the operators the statistics add time in, printed
            added = r["profile_added_ms"]
            assert added and all(e["trainscope_ms"] > e["plain_ms"] for e in added), added
            assert any(e["op"].startswith("trainscope::") for e in added), added
            assert f"{added[0]['op'][:64]}" in proc.stdout
    goal_lines = [line for line in proc.stdout.splitlines() if line.startswith("goal: ")]
    for desc in ("goal: gpt2 ", "goal: resnet18 "):
        line = next((g for g in goal_lines if g.startswith(desc) and " trainscope: " in g), None)
        assert line is not None, (desc, goal_lines)
        assert "unsupported: " in line or ("overhead" in line and ("met" in line or "MISSED" in line)), line
    assert "whole models" in proc.stdout
