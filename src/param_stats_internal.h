// Shared between src/param_stats.cpp and src/ops.cpp: the fused entry point with the name of
// the calling op, so error messages and NVTX ranges name what the user called.
#pragma once

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

}  // namespace trainscope
