// trainscope — per-sample gradient statistics (SPEC.md §2): norm test, inner-product test,
// orthogonality test, gradient variance trace, unbiased squared gradient norm and gradient noise
// scale, from materialised per-sample gradients in one fused pass.
//
// Every statistic is a function of three additive parts: the per-sample squared norms ‖gᵢ‖²,
// the per-sample inner products gᵢ·ḡ with the mean gradient, and ‖ḡ‖². Parts of different
// parameter tensors or layers add up, so layers measured separately (materialised, or from
// layer factors — see per_sample_factors.h) combine with `+=` before the statistics are taken.
//
//   auto s = trainscope::per_sample_stats(per_sample_grads);   // each [B, *param_shape]
//   at::Tensor nt = s.stat(trainscope::PerSampleStat::kNormTest);  // 0-d, on the device
//
// Scaling every gᵢ by one constant c (per-sample gradients of a mean-reduced loss carry c = 1/B)
// leaves the norm, inner-product and orthogonality tests and the gradient noise scale unchanged;
// grad_variance_trace and grad_sq_norm_unbiased are quadratic in g and scale by c².
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace trainscope {

// Order of the entries of PerSampleStats::stats.
enum class PerSampleStat : int64_t {
  kNormTest = 0,             // (Σ‖gᵢ‖²/‖ḡ‖² − B) / (B(B−1))
  kInnerTest = 1,            // Σ (gᵢ·ḡ − ‖ḡ‖²)² / (B(B−1)‖ḡ‖⁴)
  kOrthoTest = 2,            // Σ ‖gᵢ − (gᵢ·ḡ/‖ḡ‖²) ḡ‖² / (B(B−1)‖ḡ‖²)
  kGradVarianceTrace = 3,    // tr Σ̂ = (Σ‖gᵢ‖² − B‖ḡ‖²) / (B−1)
  kGradSqNormUnbiased = 4,   // ‖G‖² ≈ ‖ḡ‖² − tr Σ̂ / B
  kGradientNoiseScale = 5,   // B_simple = tr Σ̂ / ‖G‖²
};
constexpr int64_t kNumPerSampleStats = 6;

// "norm_test", "inner_test", ... as SPEC.md and the logs spell them.
const char* per_sample_stat_name(PerSampleStat s);

// The additive parts, on one device. Materialised inputs give float64 parts whatever their dtype:
// the statistics subtract nearly equal quantities, and the parts are only B + 1 numbers.
struct PerSampleParts {
  at::Tensor sq_norms;      // [B]  ‖gᵢ‖²
  at::Tensor dots;          // [B]  gᵢ·ḡ
  at::Tensor mean_sq_norm;  // []   ‖ḡ‖²

  int64_t batch_size() const { return sq_norms.size(0); }
  // Adds another layer's parts (same B, device). Throws c10::Error naming the mismatch.
  PerSampleParts& operator+=(const PerSampleParts& other);
};

// The six statistics [kNumPerSampleStats] from the parts. B < 2 throws; ‖ḡ‖ = 0 gives IEEE
// inf/NaN. Runs on the parts' device without synchronising.
at::Tensor per_sample_stats_from_parts(const PerSampleParts& parts);

struct PerSampleOptions {
  bool histogram = true;  // histogram of all B·P per-sample gradient elements (SPEC.md §4)
  int64_t nbins = 100;
  double maxval = 0.05;
};

struct PerSampleStats {
  PerSampleParts parts;
  at::Tensor stats;      // [kNumPerSampleStats] float64
  at::Tensor hist;       // [nbins] int64 ([0] without histogram)
  at::Tensor nonfinite;  // [] int64: NaN/Inf per-sample gradient elements

  at::Tensor stat(PerSampleStat s) const { return stats.select(0, static_cast<int64_t>(s)); }
};

// Materialised per-sample gradients: a list of tensors, each [B, *param_shape] with the same B
// (e.g. from torch.func.vmap(grad)). One pass reads every element once. Inputs as SPEC.md §5:
// CPU or CUDA, the four float dtypes (mixed across tensors), any strides, empty tensors skipped.
PerSampleStats per_sample_stats(at::TensorList per_sample_grads, const PerSampleOptions& options = {});

// The parts alone (no histogram), for combining with other layers.
PerSampleParts per_sample_parts(at::TensorList per_sample_grads);

// Single statistics of materialised per-sample gradients (0-d tensors).
at::Tensor norm_test(at::TensorList per_sample_grads);
at::Tensor inner_test(at::TensorList per_sample_grads);
at::Tensor ortho_test(at::TensorList per_sample_grads);
at::Tensor gradient_noise_scale(at::TensorList per_sample_grads);

// Exact int64 histogram [nbins] of all B·P per-sample gradient elements (SPEC.md §4).
at::Tensor per_sample_grad_hist1d(at::TensorList per_sample_grads, int64_t nbins = 100,
                                  double maxval = 0.05);

}  // namespace trainscope
