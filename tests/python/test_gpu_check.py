"""bench/gpu_check.sh --dry-run: the GPU check's plumbing, end to end, on a machine without a GPU.

Both phases run against the build tree `make test` made (build/), with its own CUDA architectures,
so nothing is rebuilt; every step must pass or be skipped for a stated reason, and each phase must
leave its summary and its packed logs, reports and benchmark JSON in the output folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BUILD = ROOT / "build"

TEST_STEPS = ["environment", "configure", "build", "test_param_stats_cuda", "test_per_sample_stats_cuda",
              "test_hist2d_cuda", "test_dead_units_cuda", "test_rank_cuda", "cuda_graphs", "pytest", "ctest"]
BENCH_STEPS = ["environment", "configure", "build", "bench_param_stats_cpp", "bench_param_stats",
               "bench_per_sample_stats", "bench_dead_units", "bench_rank", "bench_monitor",
               "bench_per_sample_hist", "bench_per_sample_models"]
PY_BENCHES = ["param_stats", "per_sample_stats", "dead_units", "rank", "monitor", "per_sample_hist",
              "per_sample_models"]


def _cached(var: str) -> str | None:
    cache = BUILD / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for line in cache.read_text().splitlines():
        m = re.match(rf"{re.escape(var)}:[A-Z]+=(.*)", line)
        if m:
            return m.group(1)
    return None


needs_build = pytest.mark.skipif(
    not (BUILD / "libtrainscope_ops.so").is_file() or _cached("CMAKE_CUDA_ARCHITECTURES") is None,
    reason="needs the build tree of `make test` (build/)")


def _run(phase: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({"BUILD_DIR": str(BUILD), "CUDA_ARCH": _cached("CMAKE_CUDA_ARCHITECTURES"), "BUDGET_S": "1800",
                "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", phase, str(out)], capture_output=True, text=True,
                          timeout=1800, env=env, cwd=ROOT)


def _rows(summary: str) -> dict:
    """{step: (result, detail)} from the summary's table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("step", "---"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def _check_phase(phase: str, steps: list, out: Path) -> tuple[dict, list]:
    proc = _run(phase, out)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = (out / f"{phase}-summary.md").read_text()
    assert summary in proc.stdout  # printed last as well
    assert "dry run" in summary
    rows = _rows(summary)
    for s in steps:
        assert s in rows, f"step {s} missing from the summary:\n{summary}"
        assert rows[s][0] == "ok", f"step {s}: {rows[s]}\n{summary}"
    for s, (result, detail) in rows.items():
        assert result in ("ok", "skipped", "refused"), f"{s}: {result} {detail}"
        if result != "ok":
            assert detail, f"{s} was {result} without a reason"
    with tarfile.open(out / f"{phase}-logs.tar.gz") as tar:
        names = tar.getnames()
    for s in steps:
        assert f"gpu_check_{phase}/logs/{s}.log" in names, names
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{phase}-summary.md", f"{phase}-logs.tar.gz"])
    return rows, names


@needs_build
def test_test_phase_dry_run(tmp_path):
    rows, names = _check_phase("test", TEST_STEPS, tmp_path)
    # The CUDA suites ran (and skipped their tests); pytest and ctest wrote their reports.
    assert re.match(r"\d+ tests: \d+ passed, \d+ skipped", rows["test_rank_cuda"][1]), rows["test_rank_cuda"]
    for report in ("test_rank_cuda", "cuda_graphs", "pytest", "ctest"):
        assert f"gpu_check_test/xml/{report}.xml" in names, names
    # The sanitizers are either not installed here or refused without a GPU: said, not failed.
    sanitizer = rows.get("sanitizers") or rows.get("sanitizer_probe")
    assert sanitizer is not None and sanitizer[0] in ("skipped", "refused"), rows


@needs_build
def test_bench_phase_dry_run(tmp_path):
    rows, names = _check_phase("bench", BENCH_STEPS, tmp_path)
    for b in PY_BENCHES:
        assert f"gpu_check_bench/json/bench_{b}.json" in names, names
    summary = (tmp_path / "bench-summary.md").read_text()
    assert "## Goals" in summary and "bench_rank: goal:" in summary
    # The whole-model rows: a goal line (or "unsupported") per model, from their own step.
    assert "bench_per_sample_models: goal: gpt2 " in summary and "bench_per_sample_models: goal: resnet18 " in summary


def test_usage_errors():
    for args in ([], ["--dry-run"], ["deploy"], ["--fast", "test"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "PHASE" in proc.stderr or "unknown option" in proc.stderr, (args, proc.stderr)
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout
