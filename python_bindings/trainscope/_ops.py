"""Loads the compiled op library. Each family's module registers the fake kernels of its ops."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import torch

_LIB_NAME = "libtrainscope_ops.so"
_INFO_NAME = "trainscope_build_info.json"


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


def _read_build_info(library: Path) -> dict:
    """What the build recorded beside the library (trainscope_build_info.json; {} when absent)."""
    try:
        return json.loads((library.parent / _INFO_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _check_torch(info: dict, library: Path) -> None:
    """The op library links LibTorch, whose ABI changes between minor versions: loaded into another
    torch it fails with undefined symbols. Say so plainly instead."""
    built = info.get("torch")
    if built and _minor(built) != _minor(torch.__version__):
        raise ImportError(
            f"trainscope: {library} was built against torch {built}, but torch {torch.__version__} is "
            f"installed; reinstall trainscope from source in this environment (pip install ...) or install "
            f"torch=={_minor(built)}.*")


_library = _find_library()
library_path = str(_library)
build_info_recorded = _read_build_info(_library)
_check_torch(build_info_recorded, _library)
torch.ops.load_library(library_path)


def built_with_cuda() -> bool:
    """Whether the loaded op library has its CUDA kernels. A CPU-only build (CMake option
    ``TRAINSCOPE_CUDA``) refuses CUDA tensors with an error saying it was built without CUDA."""
    return bool(torch.ops.trainscope.built_with_cuda())
