"""Smoke test of bench/bench_rank.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted. The run itself checks trainscope's rank measures (Gram, streamed Gram and
SVD paths) against float64 NumPy SVD and exits non-zero when they disagree. SciPy is an optional
peer: without it its rows say "not installed" and the run still passes.
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_rank_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # One intra-op thread: tiny ops on a busy machine otherwise stall on OpenMP barriers.
    proc = run_bench_quick_cpu("bench_rank.py", out, {"OMP_NUM_THREADS": "1"})

    data = json.loads(out.read_text())
    assert data["benchmark"] == "rank"
    assert data["verified"] is True
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["numpy"]
    assert "bench_rank.py" in env["command"]

    rows = data["results"]
    assert [r["width"] for r in rows] == [16, 48]  # --quick
    for row in rows:
        assert "error" not in row, row
        assert row["layers"] == 4 and len(row["reference"]) == 4
        methods = row["methods"]
        for name in ("trainscope", "trainscope_grams", "trainscope_svd", "svdvals"):
            m = methods[name]
            assert m["status"] == "ok", (name, m)
            assert m["time"]["median_ms"] > 0
            assert len(m["effective_rank"]) == 4
        for name in ("trainscope", "trainscope_grams", "trainscope_svd"):
            assert methods[name]["accurate"] is True, methods[name]
            assert methods[name]["erank_max_rel_err"] <= 1e-3
        assert methods["scipy"]["status"] in ("ok", "not installed")
        assert row["speedup_vs_svdvals"] > 0
    assert "speedup" in proc.stdout and "goal:" in proc.stdout
