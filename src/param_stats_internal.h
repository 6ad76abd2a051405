// Shared between src/param_stats.cpp and src/ops.cpp: the fused entry point with the name of
// the calling op, so error messages and NVTX ranges name what the user called.
#pragma once

#include "trainscope/param_stats.h"

namespace trainscope {

ParamStats param_stats_impl(const char* op, at::TensorList grads, at::TensorList params,
                            at::TensorList init_params, at::TensorList prev_params,
                            const ParamStatsOptions& options, const char* grads_name = "grads");

}  // namespace trainscope
