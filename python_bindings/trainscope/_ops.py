"""Loads the compiled op library. Each family's module registers the fake kernels of its ops."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

_LIB_NAME = "libtrainscope_ops.so"


def _find_library() -> Path:
    override = os.environ.get("TRAINSCOPE_OPS_LIBRARY")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent / _LIB_NAME
    if here.exists():
        return here
    # Editable installs keep the Python sources in the repository and the built library in
    # site-packages; the distribution's file list knows where it went.
    try:
        for f in importlib.metadata.files("trainscope") or []:
            if f.name == _LIB_NAME:
                return Path(f.locate()).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ImportError(
        f"trainscope: cannot find {_LIB_NAME}; build and install the package "
        "(`make test` or `pip install .`) or set TRAINSCOPE_OPS_LIBRARY"
    )


library_path = str(_find_library())
torch.ops.load_library(library_path)


def built_with_cuda() -> bool:
    """Whether the loaded op library has its CUDA kernels. A CPU-only build (CMake option
    ``TRAINSCOPE_CUDA``) refuses CUDA tensors with an error saying it was built without CUDA."""
    return bool(torch.ops.trainscope.built_with_cuda())
