// trainscope — the per-element gradient variance family (SPEC.md §6): mean_gsnr, early_stopping
// and cabs as Cockpit v1.0.2 defines them, from two per-element sums over the B samples of a
// batch, Σᵢ gᵢ and S = Σᵢ gᵢ² (gᵢ = ∇ℓᵢ; per layer from its factors:
// linear_per_sample_grad_moments / conv2d_per_sample_grad_moments in per_sample_factors.h).
//
//   at::Tensor v = trainscope::grad_variance_stats(grad_sums, sum_grad_sqs, B, loss, lr);
//   v[0][0]  // mean_gsnr of the whole list;  v[1 + t] the same three of tensor t
//
// With ḡ = Σᵢ gᵢ / B, over the elements j of the list (or of one tensor):
//   mean_gsnr      = mean_j ḡ_j² / (S_j / B − ḡ_j² + 1e-5)
//   early_stopping = 1 − B · mean_j ḡ_j² / (σ_j² + 1e-5),  σ_j² = (S_j − B ḡ_j²) / (B − 1)
//                    (Mahsereci et al. 2017, eq. 7: above 0 means stop; NaN for B = 1)
//   cabs           = η · Σ_j (S_j − B ḡ_j²) / (B · L)   (Balles et al. 2017, eq. 22)
// with η the SGD learning rate and L the batch's mean loss (cabs is NaN without either). Float64,
// on the inputs' device, nothing waits for the GPU; non-finite inputs give NaN, never an error.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/ATen.h>

namespace trainscope {

// Columns of grad_variance_stats's result.
enum class GradVarianceStat : int64_t { kMeanGsnr = 0, kEarlyStopping = 1, kCabs = 2 };
constexpr int64_t kNumGradVarianceStats = 3;
const char* grad_variance_stat_name(GradVarianceStat s);  // "mean_gsnr", "early_stopping", "cabs"

// Cockpit's ε of mean_gsnr and early_stopping.
constexpr double kGsnrEps = 1e-5;
constexpr double kEarlyStoppingEps = 1e-5;

// [1 + T, 3] float64: row 0 the whole list, row 1 + t tensor t; columns in GradVarianceStat
// order. grad_sum[t] and sum_grad_sq[t] share a shape; every tensor floating point on one device.
// `loss`: the batch's mean loss (a one-element tensor; undefined: no cabs); `lr`: η (NaN: no
// cabs). batch_size >= 1. Errors name the argument.
at::Tensor grad_variance_stats(at::TensorList grad_sum, at::TensorList sum_grad_sq, int64_t batch_size,
                               const at::Tensor& loss = {},
                               double lr = std::numeric_limits<double>::quiet_NaN());

}  // namespace trainscope
