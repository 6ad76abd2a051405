"""Smoke test of bench/bench_dead_units.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted; the run itself checks that trainscope's counts equal the float64 rule
exactly (and the PyTorch composition's, where that one is exact), and exits non-zero when not.
"""

from __future__ import annotations

import json

from conftest import run_bench_quick_cpu


def test_bench_dead_units_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench_quick_cpu("bench_dead_units.py", out)

    data = json.loads(out.read_text())
    assert data["benchmark"] == "dead_units"
    assert data["verified"] is True
    assert data["environment"]["device"] == "cpu"
    assert "bench_dead_units.py" in data["environment"]["command"]
    assert data["copy_bandwidth"]["GBps"] > 0
    rows = data["results"]
    assert {(r["dtype"], r["kind"]) for r in rows} == {(d, k) for d in ("float32", "bfloat16")
                                                       for k in ("relu", "tanh", "sigmoid")}
    assert any(len(r["shape"]) == 4 for r in rows) and any(len(r["shape"]) == 2 for r in rows)
    for row in rows:
        assert "skipped" not in row and "error" not in row, row
        v = row["verify"]
        assert v["ok"] and v["trainscope_vs_float64_exact"]
        assert v["dead_units"] >= (row["units"] + 9) // 10  # every tenth unit is dead
        elem = 4 if row["dtype"] == "float32" else 2
        assert row["bytes_moved"] == elem * row["numel"]
        for side in ("trainscope", "torch"):
            assert row[side]["median_ms"] > 0
        assert row["speedup"] > 0 and row["trainscope_GBps"] > 0 and row["fraction_of_copy"] > 0
    assert "speedup" in proc.stdout  # the table header
