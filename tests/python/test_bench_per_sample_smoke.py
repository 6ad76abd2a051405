"""Smoke test of bench/bench_per_sample_stats.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted. The run itself checks trainscope's six statistics (float32 training,
PerSampleHooks) and every method's norm test against float64 vmap per-sample gradients, and
exits non-zero when they disagree. BackPACK and Cockpit are optional peers: without them their
rows say "not installed" and the run still passes.
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_per_sample_stats_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # One intra-op thread: tiny ops on a busy machine otherwise stall on OpenMP barriers.
    proc = run_bench_quick_cpu("bench_per_sample_stats.py", out, {"OMP_NUM_THREADS": "1"})

    data = json.loads(out.read_text())
    assert data["benchmark"] == "per_sample_stats"
    assert data["verified"] is True
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"]
    assert "bench_per_sample_stats.py" in env["command"]
    assert set(env["peers"]) == {"backpack", "cockpit"}

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
