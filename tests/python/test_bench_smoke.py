"""Smoke test of bench/bench_param_stats.py: a tiny CPU run exits 0 and writes its JSON.

No timing is asserted; the run itself checks that trainscope and the PyTorch composition agree
(metrics to 1e-4 relative, histogram exactly), and exits non-zero when they do not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_param_stats.py"


def _env_with_trainscope_on_path() -> dict:
    """The child interpreter must import the same trainscope as this one, however it was found."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("trainscope")
    if spec is not None and spec.origin:
        pkg_parent = str(Path(spec.origin).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run has no business with the GPU
    return env


def test_bench_param_stats_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=_env_with_trainscope_on_path(),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert out.is_file(), f"no JSON written\nstdout:\n{proc.stdout}"

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
