"""Smoke test of bench/bench_dead_units.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted; the run itself checks that trainscope's counts equal the float64 rule
exactly (and the PyTorch composition's, where that one is exact), and exits non-zero when not.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BENCH_DIR, env_with_trainscope_on_path


def run_quick_cpu(json_out):
    """As conftest.run_bench_quick_cpu, but the child also skips site-packages when this
    interpreter does (-S): then only PYTHONPATH decides which trainscope it imports, as here."""
    flags = ["-S"] if sys.flags.no_site else []
    proc = subprocess.run(
        [sys.executable, *flags, str(BENCH_DIR / "bench_dead_units.py"), "--quick", "--device", "cpu",
         "--json", str(json_out)],
        capture_output=True, text=True, timeout=600, env=env_with_trainscope_on_path(),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert json_out.is_file(), f"no JSON written\nstdout:\n{proc.stdout}"
    return proc


def test_bench_dead_units_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_quick_cpu(out)

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
