// trainscope — joint histogram of (per-sample gradient element, parameter value) (SPEC.md §2
// `grad_hist2d`, as Cockpit's GradHist2d), exact int64 counts from one pass over the per-sample
// gradients.
//
//   std::vector<at::Tensor> params = ...;            // θ_t, any shapes
//   std::vector<at::Tensor> per_sample_grads = ...;  // G_t, each [B, *params[t].shape]
//   trainscope::Hist2dOptions opt;                   // 100 × 100 bins, ±0.05 (grad) × ±1 (param)
//   trainscope::Hist2d h = trainscope::grad_hist2d(per_sample_grads, params, opt);
//   h.counts;     // [nbins_grad, nbins_param] int64: counts[i][j] pairs with gradient in
//                 //   grad bin i and parameter in param bin j
//   h.nonfinite;  // [] int64: pairs not binned because either value is NaN or ±Inf
//   // bin edges per axis (trainscope/param_stats.h):
//   //   trainscope::hist_bin_edges(opt.nbins_grad, opt.maxval_grad),
//   //   trainscope::hist_bin_edges(opt.nbins_param, opt.maxval_param)
//
// Each axis is binned by SPEC.md §4: nbins equal bins over [−maxval, maxval], values outside
// clamped into the edge bins, x = maxval in the last bin. Every (G_t[b, j], θ_t[j]) pair counts
// once, so counts.sum() + nonfinite = B · Σ numel(θ_t). Results stay on the inputs' device;
// nothing waits for the GPU.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace trainscope {

struct Hist2dOptions {
  int64_t nbins_grad = 100;    // gradient axis: bins over [−maxval_grad, maxval_grad]
  double maxval_grad = 0.05;
  int64_t nbins_param = 100;   // parameter axis: bins over [−maxval_param, maxval_param]
  double maxval_param = 1.0;
};

struct Hist2d {
  at::Tensor counts;     // [nbins_grad, nbins_param] int64
  at::Tensor nonfinite;  // [] int64
};

// per_sample_grads[t] is [B, *params[t].shape] with one B for the whole list (any B: the
// histogram is a sum over samples, so a batch may also be counted in tiles of samples and
// added). The lists are paired by position; each pair shares a dtype (float32, float64, bfloat16
// or float16; pairs may differ) and all tensors one device (CPU or CUDA). Any strides (a
// non-contiguous tensor is read through a contiguous copy); pairs with no elements are skipped.
// Each axis takes 1 ≤ nbins ≤ 2^20 and a positive finite maxval, and nbins_grad · nbins_param
// ≤ 2^24. Bad input throws c10::Error naming the argument, before any work. With both lists
// empty the result is an all-zero histogram on the CPU.
Hist2d grad_hist2d(at::TensorList per_sample_grads, at::TensorList params, const Hist2dOptions& options = {});

}  // namespace trainscope
