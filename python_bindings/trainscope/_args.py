"""The one way every function checks its scalar arguments, and the fake kernels' device check.

A bad argument is an error naming it, raised before any work (SPEC.md §5): ``nbins=2.7`` or
``maxval=None`` never turn into something else silently.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import sys

import torch

#: Largest bin count of a histogram axis (cuda/histogram.h, kMaxHistBins).
MAX_HIST_BINS = 1 << 20


def _prefix(caller: str) -> str:
    return f"{caller}: " if caller else ""


def check_int(value, name: str, caller: str = "", *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int: an integer (Python, NumPy or a 0-d integer tensor), not a bool or a
    float, within [low, high] when given."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_prefix(caller)}{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None and low is not None else \
            (f">= {low}" if high is None else f"<= {high}")
        raise ValueError(f"{_prefix(caller)}{name} must be {span}, got {value}")
    return value


def check_float(value, name: str, caller: str = "") -> float:
    """``value`` as a float: a real number (not a bool, not None)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(caller)}{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_nbins(value, name: str = "nbins", caller: str = "") -> int:
    """A histogram axis's bin count: an integer in [1, 2²⁰]."""
    return check_int(value, name, caller, low=1, high=MAX_HIST_BINS)


def check_maxval(value, name: str = "maxval", caller: str = "") -> float:
    """A histogram axis's half-width: a finite, positive, normal float."""
    v = check_float(value, name, caller)
    if not (math.isfinite(v) and v >= sys.float_info.min):
        raise ValueError(f"{_prefix(caller)}{name} must be a finite positive normal number, got {value!r}")
    return v


def check_hist_axis(nbins, maxval, nbins_name: str = "nbins", maxval_name: str = "maxval",
                    caller: str = "") -> tuple:
    """One histogram axis (SPEC.md §4) as (int, float): nbins an integer in [1, 2²⁰], maxval a
    finite positive number whose bin width 2·maxval/nbins is a normal float64 (as the kernels
    check: a tinier width would put every value in bin 0 instead of the edge bins)."""
    n = check_nbins(nbins, nbins_name, caller)
    m = check_maxval(maxval, maxval_name, caller)
    width = 2.0 * m / n
    if not (math.isfinite(width) and width >= sys.float_info.min and math.isfinite(1.0 / width)):
        raise ValueError(f"{_prefix(caller)}{maxval_name} must give a normal bin width 2*{maxval_name}/{nbins_name}, "
                         f"got {maxval_name}={maxval!r} with {nbins_name}={n}")
    return n, m


def check_tensor(value, name: str, caller: str = "") -> torch.Tensor:
    """``value`` itself, which must be a tensor (not None, a list or an array)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{_prefix(caller)}{name} must be a tensor, got {type(value).__name__}")
    return value


def check_module(value, name: str, caller: str = ""):
    """``value`` itself, which must be an nn.Module."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{_prefix(caller)}{name} must be an nn.Module, got {type(value).__name__}")
    return value


def check_path(value, name: str, caller: str = "") -> str:
    """A file or folder path (str or os.PathLike), as a str."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{_prefix(caller)}{name} must be a path (a non-empty str or os.PathLike), got {value!r}")
    return os.fspath(value)


def check_bool(value, name: str, caller: str = "") -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or isinstance(value, float):
        raise TypeError(f"{_prefix(caller)}{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def _tensors_in(name: str, value):
    """(label, tensor) of every tensor in an argument: itself, or the items of a list/tuple."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, t in enumerate(value):
            if isinstance(t, torch.Tensor):
                yield f"{name}[{i}]", t


def check_one_device(caller: str, arguments: dict) -> None:
    """Every tensor among ``arguments`` ({name: value}) on one device, else an error naming the
    first one that is not (meta tensors mixed with real ones included)."""
    ref = None
    for name, value in arguments.items():
        for label, t in _tensors_in(name, value):
            if ref is None:
                ref = (label, t.device)
            elif t.device != ref[1]:
                raise RuntimeError(f"{caller}: {label} is on {t.device} but {ref[0]} is on {ref[1]}; "
                                   "all tensors must share one device")


def register_fake(op: str):
    """``torch.library.register_fake(op)`` with the device check the real kernels make. A call
    whose tensors are on different devices, one of them meta, dispatches to the fake kernel; without
    this check it would return uninitialised values instead of the error the real kernel raises."""
    caller = "trainscope::" + op.split("::", 1)[-1]

    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            check_one_device(caller, sig.bind(*args, **kwargs).arguments)
            return fn(*args, **kwargs)

        return torch.library.register_fake(op)(checked)

    return decorate
