// Shared between src/param_stats.cpp and the files that call into it: the fused entry point with
// the name of the calling op (error messages and NVTX ranges name what the user called), and the
// CPU histogram pieces the per-sample histograms reuse (src/hist2d.cpp, src/per_sample_factors.cpp).
#pragma once

#include <vector>

#include "cuda/common.h"
#include "trainscope/param_stats.h"

namespace trainscope {

// The options of the ops' flat arguments (src/param_stats_ops.cpp, src/distributed_ops.cpp).
inline ParamStatsOptions param_stats_options(bool histogram, int64_t nbins, double maxval, bool weights_matrices_only,
                                             bool refresh_prev) {
  ParamStatsOptions o;
  o.histogram = histogram;
  o.nbins = nbins;
  o.maxval = maxval;
  o.weights_matrices_only = weights_matrices_only;
  o.refresh_prev = refresh_prev;
  return o;
}

ParamStats param_stats_impl(const char* op, at::TensorList grads, at::TensorList params,
                            at::TensorList init_params, at::TensorList prev_params,
                            const ParamStatsOptions& options, const char* grads_name = "grads",
                            bool grad_sums = true);

// The bins of n values g (CPU) by grad_hist1d's rule on nbins bins of width `width` over
// [-maxval, maxval] into bins[n], slot nbins for a non-finite value; without branches, vectorised
// with the widest unit the CPU has.
void hist_bins(const float* g, int64_t n, double maxval, double width, int32_t nbins, int32_t* bins);
void hist_bins(const double* g, int64_t n, double maxval, double width, int32_t nbins, int32_t* bins);
void hist_bins(const cuda::bf16_bits* g, int64_t n, double maxval, double width, int32_t nbins, int32_t* bins);
void hist_bins(const cuda::f16_bits* g, int64_t n, double maxval, double width, int32_t nbins, int32_t* bins);

// How many of the `cols` values of each row of the row-major x [rows, cols] are finite (float or
// double): a zero times those is a zero, times the others NaN.
template <typename T>
std::vector<int64_t> finite_per_row(const T* x, int64_t rows, int64_t cols);

// Adds to counts [nbins] int64 the histogram (grad_hist1d's bins; non-finite values left out) of
// the rank-one per-sample gradients d_r x_rᵀ, rows r of CPU tensors d [n, d_out] and x [n, d_in]
// of one floating dtype, each element formed in that dtype as a GEMM of depth one forms it: the
// blocks of a layer with one position per sample, never written to memory.
void cpu_outer_product_hist1d(const at::Tensor& d, const at::Tensor& x, int64_t nbins, double maxval,
                              const at::Tensor& counts);

}  // namespace trainscope
