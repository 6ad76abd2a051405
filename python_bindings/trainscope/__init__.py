"""trainscope: fused GPU diagnostics of neural-network training.

Every function takes tensors on the CPU or a CUDA device and returns tensors on that device;
none of them waits for the GPU. See SPEC.md in the docs for the exact meaning of each metric.
"""

from ._ops import library_path
from .param_stats import (
    METRICS,
    ParamStats,
    distance,
    grad_hist1d,
    grad_magnitude,
    grad_norm,
    hist_bin_edges,
    loss,
    nonfinite_count,
    param_stats,
    update_size,
    weight_magnitude,
)

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "ParamStats",
    "distance",
    "grad_hist1d",
    "grad_magnitude",
    "grad_norm",
    "hist_bin_edges",
    "library_path",
    "loss",
    "nonfinite_count",
    "param_stats",
    "update_size",
    "weight_magnitude",
]
