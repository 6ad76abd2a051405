// Shared between src/hist2d.cpp and src/per_sample_factors.cpp: the joint histogram of a layer
// with one position per sample, whose per-sample gradients are outer products.
#pragma once

#include <ATen/ATen.h>

#include "trainscope/hist2d.h"

namespace trainscope {

// Adds to out.counts [nbins_grad, nbins_param] and out.nonfinite the joint histogram of the
// rank-one per-sample gradients d_r x_rᵀ (rows r of CPU tensors d [n, d_out] and x [n, d_in], one
// floating dtype) against the parameter w[r % G] ([G, d_out, d_in], same dtype): each gradient
// element formed in that dtype as a GEMM of depth one forms it, binned as it is formed, never
// written to memory; each parameter element binned once.
void cpu_outer_product_hist2d(const at::Tensor& d, const at::Tensor& x, const at::Tensor& w,
                              const Hist2dOptions& options, const Hist2d& out);

}  // namespace trainscope
