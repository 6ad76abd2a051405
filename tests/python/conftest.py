"""Shared fixtures for the trainscope Python tests.

Nothing here touches the GPU at import time: ``torch.cuda.is_available()`` only asks the driver
whether a device exists, and every CUDA parametrization is skipped through a mark.
"""

from __future__ import annotations

import zlib

import pytest
import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")

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
