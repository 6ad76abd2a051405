// trainscope — parameter-space metrics (SPEC.md §1, §4), computed in one fused pass.
//
// Usage, once per batch after optimizer.step():
//
//   #include <trainscope/param_stats.h>
//
//   std::vector<at::Tensor> params, grads;              // model.parameters() and their .grad()
//   std::vector<at::Tensor> init = clone_all(params);   // θ₀, taken when tracking begins
//   std::vector<at::Tensor> prev = clone_all(params);   // θ before the latest step
//   trainscope::ParamStatsOptions opt;
//   opt.refresh_prev = true;                            // prev ← params after reading it
//   auto s = trainscope::param_stats(grads, params, init, prev, opt);
//   at::Tensor gn = s.metric(trainscope::Metric::kGradNorm);            // 0-d, on the device
//   at::Tensor per_layer = s.metric_per_tensor(trainscope::Metric::kGradNorm);  // [T]
//
// Every result is a tensor on the inputs' device; nothing waits for the GPU.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace trainscope {

// Column order of ParamStats::metrics and ParamStats::per_tensor.
enum class Metric : int64_t {
  kGradNorm = 0,         // sqrt(Σ g²)
  kGradMagnitude = 1,    // Σ|g| / numel
  kWeightMagnitude = 2,  // Σ|θ| / numel (over the selected tensors, see weights_matrices_only)
  kDistance = 3,         // sqrt(Σ (θ − θ₀)²)
  kUpdateSize = 4,       // sqrt(Σ (θ − θ_prev)²)
  kWeightNorm = 5,       // sqrt(Σ θ²) (over every tensor, whatever weights_matrices_only)
  kUpdateRatio = 6,      // update_size / weight_norm: the update-to-weight ratio
};
constexpr int64_t kNumMetrics = 7;

// Name of a metric as SPEC.md and the logs spell it ("grad_norm", ...).
const char* metric_name(Metric m);

struct ParamStatsOptions {
  bool histogram = true;        // gradient histogram (needs grads)
  int64_t nbins = 100;          // SPEC.md §4 defaults
  double maxval = 0.05;
  bool weights_matrices_only = false;  // global weight magnitude over tensors with dim ≥ 2 only
  bool refresh_prev = false;    // copy params into prev_params after reading them
  bool float64_results = false; // float64 results whatever the inputs' dtype
};

// All results of one call. Float tensors are float64 when every input tensor is float64 (or
// options.float64_results), float32 otherwise. A metric whose inputs were not given is NaN.
struct ParamStats {
  at::Tensor metrics;               // [7], in Metric order
  at::Tensor per_tensor;            // [T, 7]
  at::Tensor nonfinite;             // [] int64: NaN/Inf gradient elements
  at::Tensor nonfinite_per_tensor;  // [T] int64
  at::Tensor hist;                  // [nbins] int64 ([0] without histogram)
  at::Tensor hist_per_tensor;       // [T, nbins] int64

  at::Tensor metric(Metric m) const { return metrics.select(0, static_cast<int64_t>(m)); }
  at::Tensor metric_per_tensor(Metric m) const {
    return per_tensor.select(1, static_cast<int64_t>(m));
  }
};

// The fused pass. Lists are paired by position; any of them may be empty (not given), and the
// given ones must agree in length, and pairwise in shape, dtype and device. T is that length.
// Tensors may be float32, float64, bfloat16 or float16, on CPU or CUDA, of any strides (a
// non-contiguous tensor is read through a contiguous copy). Bad input throws c10::Error naming
// the argument, before any work is enqueued.
ParamStats param_stats(at::TensorList grads, at::TensorList params, at::TensorList init_params,
                       at::TensorList prev_params, const ParamStatsOptions& options = {});

// Single metrics: a 0-d tensor, or a [T] tensor with per_tensor = true.
at::Tensor grad_norm(at::TensorList grads, bool per_tensor = false);
at::Tensor grad_magnitude(at::TensorList grads, bool per_tensor = false);
at::Tensor weight_magnitude(at::TensorList params, bool per_tensor = false,
                            bool matrices_only = false);
at::Tensor distance(at::TensorList params, at::TensorList init_params, bool per_tensor = false);
at::Tensor update_size(at::TensorList params, at::TensorList prev_params, bool per_tensor = false);
at::Tensor weight_norm(at::TensorList params, bool per_tensor = false);
at::Tensor update_ratio(at::TensorList params, at::TensorList prev_params, bool per_tensor = false);

// Exact int64 histogram of the elements of `tensors` (SPEC.md §4): [nbins], or [T, nbins].
at::Tensor grad_hist1d(at::TensorList tensors, int64_t nbins = 100, double maxval = 0.05,
                       bool per_tensor = false);

// Count of NaN and ±Inf elements: a 0-d int64 tensor, or [T].
at::Tensor nonfinite_count(at::TensorList tensors, bool per_tensor = false);

// SPEC.md `loss`: mean of the per-sample loss vector, accumulated in at least float32.
at::Tensor loss(const at::Tensor& per_sample_losses);

// The nbins + 1 bin edges of grad_hist1d, float64 on `device`.
at::Tensor hist_bin_edges(int64_t nbins = 100, double maxval = 0.05,
                          at::Device device = at::kCPU);

// Whether this library was built with its CUDA kernels. A CPU-only build (CMake option
// TRAINSCOPE_CUDA) refuses CUDA tensors everywhere, with an error that says so.
bool built_with_cuda();

}  // namespace trainscope
