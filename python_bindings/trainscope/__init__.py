"""trainscope: fused GPU diagnostics of neural-network training.

Every function takes tensors on the CPU or a CUDA device and returns tensors on that device;
none of them waits for the GPU. A CPU-only build (``built_with_cuda()`` is False) refuses CUDA
tensors with an error saying so. See SPEC.md in the docs for the exact meaning of each metric.
"""

from . import curvature  # noqa: F401  (trainscope.curvature: Hessian quantities, SPEC.md §6)
from . import distributed  # noqa: F401  (trainscope.distributed: metrics across ranks)
from ._build_info import build_info
from ._ops import built_with_cuda, library_path
from .dead_units import (
    DeadUnitCounter,
    DeadUnits,
    active_counts,
    dead_units,
    dead_units_from_counts,
    observations_per_unit,
)
from .alpha import AlphaPoint, AlphaTracker, AlphaValue, alpha_from_points
from .cockpit_compat import COCKPIT_CONFIGURATIONS, cockpit_configuration
from .curvature import CURVATURE_STATS, CurvatureStats, curvature_stats
from .grad_variance import (
    GRAD_VARIANCE_STATS,
    GradMoments,
    GradVarianceStats,
    grad_moments_of,
    grad_variance_stats,
)
from .hist2d import Hist2d, grad_hist2d, hist2d_bin_edges
from .monitor import (
    CsvSink,
    JsonlSink,
    Monitor,
    Quantity,
    QuantityContext,
    Schedule,
    StepRecord,
    at_steps,
    every,
    log_spaced,
    on_demand,
)
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
from .tensorboard_sink import TensorBoardSink, histogram_summary
from .rank import (
    RankMeasures,
    abs_approximate_rank,
    approximate_rank,
    effective_rank,
    rank_measures,
    rank_measures_from_grams,
    rank_measures_from_singular_values,
    stable_rank,
)
from .representation import (
    ACTIVATION_KINDS,
    REPRESENTATION_METRICS,
    RepresentationAccumulator,
    RepresentationProbe,
    RepresentationResult,
    weight_rank_measures,
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
    update_ratio,
    update_size,
    weight_norm,
    weight_magnitude,
)

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "TensorBoardSink",
    "histogram_summary",
    "ACTIVATION_KINDS",
    "DeadUnitCounter",
    "DeadUnits",
    "REPRESENTATION_METRICS",
    "RankMeasures",
    "RepresentationAccumulator",
    "RepresentationProbe",
    "RepresentationResult",
    "abs_approximate_rank",
    "active_counts",
    "approximate_rank",
    "dead_units",
    "dead_units_from_counts",
    "effective_rank",
    "observations_per_unit",
    "rank_measures",
    "rank_measures_from_grams",
    "rank_measures_from_singular_values",
    "stable_rank",
    "weight_rank_measures",
    "METRICS",
    "CsvSink",
    "JsonlSink",
    "Monitor",
    "Quantity",
    "QuantityContext",
    "Schedule",
    "StepRecord",
    "at_steps",
    "every",
    "log_spaced",
    "on_demand",
    "AlphaPoint",
    "AlphaTracker",
    "AlphaValue",
    "alpha_from_points",
    "COCKPIT_CONFIGURATIONS",
    "cockpit_configuration",
    "CURVATURE_STATS",
    "CurvatureStats",
    "curvature_stats",
    "GRAD_VARIANCE_STATS",
    "GradMoments",
    "GradVarianceStats",
    "grad_moments_of",
    "grad_variance_stats",
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
    "built_with_cuda",
    "library_path",
    "loss",
    "nonfinite_count",
    "param_stats",
    "update_ratio",
    "update_size",
    "weight_norm",
    "weight_magnitude",
]
