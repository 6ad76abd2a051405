"""Smoke test of bench/bench_param_stats.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted; the run itself checks that trainscope and the PyTorch composition agree
(metrics to 1e-4 relative, histogram exactly), and exits non-zero when they do not.
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_param_stats_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench_quick_cpu("bench_param_stats.py", out)

    data = json.loads(out.read_text())
    assert data["benchmark"] == "param_stats"
    assert data["verified"] is True
    assert data["environment"]["device"] == "cpu"
    assert data["environment"]["torch"]
    assert "bench_param_stats.py" in data["environment"]["command"]
    assert data["copy_bandwidth"]["GBps"] > 0
    rows = data["results"]
    assert len(rows) >= 1
    for row in rows:
        assert "skipped" not in row, row.get("skipped")
        assert row["verify"]["ok"] and row["verify"]["hist_exact_match"]
        assert row["bytes_moved"] == 20 * row["params"]
        for side in ("trainscope", "torch"):
            assert row[side]["median_ms"] > 0
        assert row["speedup"] > 0 and row["trainscope_GBps"] > 0 and row["fraction_of_copy"] > 0
    assert "speedup" in proc.stdout  # the table header
