"""Smoke test of bench/bench_rank.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted. The run itself checks trainscope's rank measures (Gram, streamed Gram and
SVD paths) against float64 NumPy SVD and exits non-zero when they disagree. SciPy is an optional
peer: without it its rows say "not installed" and the run still passes.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BENCH_DIR, env_with_trainscope_on_path


def test_bench_rank_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # The child interpreter runs with this one's -S, so it imports the same trainscope even where
    # an installed copy's import hook would win over PYTHONPATH. One intra-op thread: tiny ops on
    # a busy machine otherwise stall on OpenMP barriers.
    flags = ["-S"] if sys.flags.no_site else []
    proc = subprocess.run(
        [sys.executable, *flags, str(BENCH_DIR / "bench_rank.py"), "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env_with_trainscope_on_path({"OMP_NUM_THREADS": "1"}),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert out.is_file(), f"no JSON written\nstdout:\n{proc.stdout}"

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
