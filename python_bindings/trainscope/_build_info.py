"""What this trainscope was built with and runs on (``trainscope.build_info()``; ``python -m trainscope.info``
prints it)."""

from __future__ import annotations

import json
import platform

import torch

from ._ops import build_info_recorded, library_path


def build_info() -> dict:
    """trainscope's version, the torch it was built against and the torch running, whether it was
    built with CUDA (and which CUDA version and GPU architectures), where its op library is, and
    whether a CUDA device is visible now."""
    recorded = build_info_recorded
    return {
        "trainscope": recorded.get("version", "unknown"),
        "torch_built_against": recorded.get("torch", "unknown"),
        "torch_running": torch.__version__,
        "cuda": bool(recorded.get("cuda", False)),
        "cuda_version": recorded.get("cuda_version"),
        "cuda_architectures": list(recorded.get("cuda_architectures", [])),
        "torch_cuda": torch.version.cuda,
        "cuda_device_visible": torch.cuda.is_available(),
        "library": library_path,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
