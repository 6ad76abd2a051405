// Shared between src/per_sample_stats.cpp, src/per_sample_stats_ops.cpp and the cross-rank
// statistics of src/distributed_per_sample.cpp.
#pragma once

#include <cstdint>

#include "trainscope/per_sample_stats.h"

namespace trainscope {

// The parts, histogram and non-finite count of materialised per-sample gradients (`stats` left
// undefined), with errors and the NVTX range named after `op`. `min_batch`: the smallest B
// accepted (2 for one process; 1 for one rank's share of a batch split over ranks).
PerSampleStats per_sample_parts_impl(const char* op, at::TensorList per_sample_grads,
                                     const PerSampleOptions& options, int64_t min_batch = 2);

// SPEC.md §5 checks of materialised per-sample gradients, before any work; returns B.
int64_t check_per_sample_grads(const char* op, at::TensorList per_sample_grads, const PerSampleOptions& options,
                               int64_t min_batch = 2);

// Checks of PerSampleParts (defined, shapes, one device, floating point, B >= min_batch); returns B.
int64_t check_per_sample_parts(const char* op, const PerSampleParts& parts, int64_t min_batch);

// B >= min_batch, or a c10::Error naming `arg` (min_batch 1: the per-rank requirement).
void check_batch_size(const char* op, const char* arg, int64_t b, int64_t min_batch);

// The six statistics [kNumPerSampleStats] from sums over the B samples, all float64 0-d tensors
// (`batch` may be a host 0-d tensor or a device value): Σ‖gᵢ‖², Σ(gᵢ·ḡ − ‖ḡ‖²)², Σ(gᵢ·ḡ)² and
// ‖ḡ‖². The formulas of per_sample_stats_from_parts, which the cross-rank statistics share.
at::Tensor per_sample_stats_from_sums(const at::Tensor& batch, const at::Tensor& sum_sq, const at::Tensor& sum_dev_sq,
                                      const at::Tensor& sum_dots_sq, const at::Tensor& mean_sq_norm);

// The parts of one [B, P] float64 matrix of per-sample gradients, straight from the definitions
// (‖gᵢ‖², gᵢ·ḡ, ‖ḡ‖²): for small matrices (a layer's bias) and the two-pass fallback.
PerSampleParts parts_of_rows(const at::Tensor& rows);

}  // namespace trainscope
