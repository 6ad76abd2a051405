"""Shared fixtures for the trainscope Python tests.

Nothing here touches the GPU at import time: ``torch.cuda.is_available()`` only asks the driver
whether a device exists, and every CUDA parametrization is skipped through a mark. The CUDA
variants also skip with a CPU-only build of the op library, which refuses CUDA tensors
(test_bad_inputs.py checks that it does).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import trainscope


def cuda_available() -> bool:
    return torch.cuda.is_available() and trainscope.built_with_cuda()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a build with CUDA")

#: Devices every numeric test runs on; the CUDA variants skip cleanly without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

#: The four floating-point dtypes the contract promises (SPEC.md §5).
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test id: fixed for one test, different across parametrizations."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A seeded CPU generator (tensors are drawn on the CPU in float64, then rounded and moved)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


#: The repository's bench/ folder (the benchmark scripts the smoke tests run).
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def env_with_trainscope_on_path(extra: dict | None = None) -> dict:
    """Environment of a child interpreter that imports the same trainscope as this one, however it
    was found, and stays off the GPU; ``extra`` entries are added last."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("trainscope")
    if spec is not None and spec.origin:
        pkg_parent = str(Path(spec.origin).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run has no business with the GPU
    env.update(extra or {})
    return env


def run_bench_quick_cpu(script: str, json_out: Path, extra_env: dict | None = None,
                        extra_args: tuple = ()) -> subprocess.CompletedProcess:
    """Runs ``bench/<script> --quick --device cpu --json <json_out> [extra_args]`` in a child interpreter and
    asserts that it exits 0 and writes the JSON; returns the finished process (stdout, stderr).
    The child skips site-packages when this interpreter does (-S): then only PYTHONPATH decides
    which trainscope it imports, as here."""
    flags = ["-S"] if sys.flags.no_site else []
    proc = subprocess.run(
        [sys.executable, *flags, str(BENCH_DIR / script), "--quick", "--device", "cpu", "--json", str(json_out),
         *extra_args],
        capture_output=True, text=True, timeout=600, env=env_with_trainscope_on_path(extra_env),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert json_out.is_file(), f"no JSON written\nstdout:\n{proc.stdout}"
    return proc
