"""Smoke test of bench/bench_fused_backward.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted. The run itself checks the fused weight gradient against the layer's own
and the fused statistics against the unfused ones, and exits non-zero when they disagree.
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_fused_backward_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    run_bench_quick_cpu("bench_fused_backward.py", out, {"OMP_NUM_THREADS": "1"})
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fused_backward" and data["verified"] is True
    assert data["environment"]["device"] == "cpu"
    rows = data["results"]
    assert [r["layer"].split("(")[0] for r in rows] == ["Linear", "Conv2d"]  # --quick
    for row in rows:
        assert set(row["modes"]) == {"plain", "not fused", "fused"}
        assert row["modes"]["plain"]["time"]["median_ms"] > 0
        assert row["weight_grad_max_rel_err"] <= 1e-4 and row["stats_max_rel_err"] <= 1e-4
