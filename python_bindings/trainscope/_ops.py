"""Loads the compiled op library and registers the fake (meta) kernels torch.compile traces."""

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


def _out_dtype(*lists):
    tensors = [t for lst in lists for t in lst]
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _list_device(*lists):
    for lst in lists:
        for t in lst:
            return t.device
    return torch.device("cpu")


def _fake_param_stats(grads, params, init_params, prev_params, histogram, nbins, maxval,
                      weights_matrices_only):
    lists = (grads, params, init_params, prev_params)
    n = max(len(lst) for lst in lists)
    dev = _list_device(*lists)
    fdt = _out_dtype(*lists)
    nb = nbins if histogram else 0
    return (
        torch.empty(5, dtype=fdt, device=dev),
        torch.empty(n, 5, dtype=fdt, device=dev),
        torch.empty((), dtype=torch.int64, device=dev),
        torch.empty(n, dtype=torch.int64, device=dev),
        torch.empty(nb, dtype=torch.int64, device=dev),
        torch.empty(n, nb, dtype=torch.int64, device=dev),
    )


@torch.library.register_fake("trainscope::param_stats")
def _(grads, params, init_params, prev_params, histogram=True, nbins=100, maxval=0.05,
      weights_matrices_only=False):
    return _fake_param_stats(grads, params, init_params, prev_params, histogram, nbins, maxval,
                             weights_matrices_only)


@torch.library.register_fake("trainscope::param_stats_refresh_")
def _(grads, params, init_params, prev_params, histogram=True, nbins=100, maxval=0.05,
      weights_matrices_only=False):
    return _fake_param_stats(grads, params, init_params, prev_params, histogram, nbins, maxval,
                             weights_matrices_only)


@torch.library.register_fake("trainscope::loss")
def _(losses):
    dt = torch.float64 if losses.dtype == torch.float64 else torch.float32
    return torch.empty((), dtype=dt, device=losses.device)
