"""trainscope: fused GPU diagnostics of neural-network training.

Every function takes tensors on the CPU or a CUDA device and returns tensors on that device;
none of them waits for the GPU. See SPEC.md in the docs for the exact meaning of each metric.
"""

from ._ops import library_path
from .hist2d import Hist2d, grad_hist2d, hist2d_bin_edges
from .per_sample_factors import (
    SUPPORTED_LAYERS,
    PerSampleHooks,
    conv2d_per_sample_parts,
    layer_per_sample_parts,
    linear_per_sample_parts,
)
from .per_sample_stats import (
    PER_SAMPLE_STATS,
    PerSampleParts,
    PerSampleStats,
    gradient_noise_scale,
    inner_test,
    norm_test,
    ortho_test,
    per_sample_grad_hist1d,
    per_sample_parts,
    per_sample_stats,
)
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
    "Hist2d",
    "PerSampleHooks",
    "SUPPORTED_LAYERS",
    "conv2d_per_sample_parts",
    "layer_per_sample_parts",
    "linear_per_sample_parts",
    "grad_hist2d",
    "hist2d_bin_edges",
    "PER_SAMPLE_STATS",
    "PerSampleParts",
    "PerSampleStats",
    "gradient_noise_scale",
    "inner_test",
    "norm_test",
    "ortho_test",
    "per_sample_grad_hist1d",
    "per_sample_parts",
    "per_sample_stats",
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
