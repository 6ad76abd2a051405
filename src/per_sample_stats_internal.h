// Shared between src/per_sample_stats.cpp and src/per_sample_stats_ops.cpp.
#pragma once

#include "trainscope/per_sample_stats.h"

namespace trainscope {

// The parts, histogram and non-finite count of materialised per-sample gradients (`stats` left
// undefined), with errors and the NVTX range named after `op`.
PerSampleStats per_sample_parts_impl(const char* op, at::TensorList per_sample_grads,
                                     const PerSampleOptions& options);

// The parts of one [B, P] float64 matrix of per-sample gradients, straight from the definitions
// (‖gᵢ‖², gᵢ·ḡ, ‖ḡ‖²): for small matrices (a layer's bias) and the two-pass fallback.
PerSampleParts parts_of_rows(const at::Tensor& rows);

}  // namespace trainscope
