// trainscope — per-sample gradient statistics from layer factors (SPEC.md §2), never
// materialising B copies of a layer's weights.
//
// For a linear layer y = x Wᵀ + b with input x [B, T, d_in] and output gradient
// δ = ∂(loss)/∂y [B, T, d_out], sample i's weight gradient is Gᵢ = Σ_t δ_itᵀ x_it and its bias
// gradient Σ_t δ_it. The additive parts of per_sample_stats.h come from x and δ alone:
//
//   ‖Gᵢ‖²   ghost norm Σ_{t,s} (x_it·x_is)(δ_it·δ_is) (two batched GEMMs), or — when
//           2T² > d_in·d_out, or asked for — Gᵢ formed in bounded tiles of samples
//   Ḡ       (1/B) Σ_i Gᵢ = δᵀx / B, one GEMM over all B·T rows
//   Gᵢ·Ḡ    Σ_t δ_it · (Ḡ x_it): the rowwise sum of δ ∘ (x Ḡᵀ), one GEMM
//   ‖Ḡ‖²
//
// Conv2d reduces to the linear case after unfolding (T = output positions,
// d_in = C_in/groups · kh · kw, one linear problem per group).
//
//   // after loss.backward(), with x the layer's input and dy the gradient of its output:
//   auto parts = trainscope::linear_per_sample_parts(x, dy, /*has_bias=*/true);
//   parts += trainscope::conv2d_per_sample_parts(xc, dyc, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, true);
//   at::Tensor stats = trainscope::per_sample_stats_from_parts(parts);  // [kNumPerSampleStats]
//
// δ of a mean-reduced loss is that of the summed loss over B: every gᵢ, and ḡ with them, scale
// by 1/B, which leaves the norm, inner-product and orthogonality tests and the noise scale
// unchanged and scales tr Σ̂ and ‖G‖² (and the parts) by 1/B². The factors are exact only when
// sample i's output depends on sample i's input alone (no batch norm between layer and loss).
//
// Inputs: CPU or CUDA, float32, float64, bfloat16 or float16 (input and grad_output may differ,
// as under autocast), any strides. Work is done in float64 when both are float64 and in float32
// otherwise (bfloat16/float16 are upcast first); float32 GEMMs follow torch's float32 matmul
// precision setting (TF32 is off by default). Results stay on the device; nothing synchronises.
// Bad input throws c10::Error naming the argument before any work.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>

#include <ATen/ATen.h>

#include "trainscope/hist2d.h"
#include "trainscope/per_sample_stats.h"

namespace trainscope {

// How ‖Gᵢ‖² is formed. kAuto takes kTiled when 2T² > d_in·d_out (per group), kGhost otherwise.
enum class FactorMethod : int64_t { kAuto = 0, kGhost = 1, kTiled = 2 };

// "auto", "ghost", "tiled".
const char* factor_method_name(FactorMethod m);
// The inverse of factor_method_name; throws c10::Error naming `method` otherwise.
FactorMethod parse_factor_method(const std::string& method);

// nn.Linear. input [B, ..., d_in], grad_output [B, ..., d_out] with the same leading dims
// (dims between the first and the last are flattened into T). B >= 2.
PerSampleParts linear_per_sample_parts(const at::Tensor& input, const at::Tensor& grad_output,
                                       bool has_bias, FactorMethod method = FactorMethod::kAuto);

// nn.Conv2d with zero padding. input [B, C_in, H, W], grad_output [B, C_out, H', W'] with H', W'
// those of the convolution. kernel_size, stride, padding and dilation take one value (both
// spatial dims) or two; C_in and C_out must be divisible by groups. B >= 2.
PerSampleParts conv2d_per_sample_parts(const at::Tensor& input, const at::Tensor& grad_output,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool has_bias,
                                       FactorMethod method = FactorMethod::kAuto);

// Exact int64 histogram [nbins] (SPEC.md §4) of all B·P per-sample gradient elements of the
// layer (weight, then bias when has_bias), formed in tiles of samples of bounded size and
// counted with grad_hist1d. The elements binned are Gᵢ = δᵢᵀxᵢ as given: to bin the gradients
// of the per-sample losses of a mean-reduced loss, pass B·δ. B >= 1.
at::Tensor linear_per_sample_grad_hist1d(const at::Tensor& input, const at::Tensor& grad_output,
                                         bool has_bias, int64_t nbins = 100, double maxval = 0.05);
at::Tensor conv2d_per_sample_grad_hist1d(const at::Tensor& input, const at::Tensor& grad_output,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, bool has_bias, int64_t nbins = 100,
                                         double maxval = 0.05);

// Joint histogram of (per-sample gradient element, parameter value) over all B·P elements of
// the layer: (counts [nbins_grad, nbins_param] int64, nonfinite [] int64), as the op
// trainscope::grad_hist2d (trainscope/hist2d.h) counts it, tile by tile. `weight` is the layer's
// weight ([d_out, d_in], or [C_out, C_in/groups, kh, kw]); `bias` its bias, or an undefined
// tensor for none.
std::tuple<at::Tensor, at::Tensor> linear_per_sample_grad_hist2d(
    const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& weight,
    const at::Tensor& bias, const Hist2dOptions& options = {});
std::tuple<at::Tensor, at::Tensor> conv2d_per_sample_grad_hist2d(
    const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& weight,
    const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const Hist2dOptions& options = {});

// Captures the gradient of a layer's output during backward through a tensor hook:
//
//   trainscope::OutputGradCapture cap;
//   at::Tensor y = cap.watch(at::linear(x, w, b));   // y itself, with the hook registered
//   loss_of(y).backward();
//   auto parts = trainscope::linear_per_sample_parts(x, cap.grad(), true);
//
// The gradient captured is that of the value watched, also when the output is changed in place
// later (an in-place ReLU); when the output is a view (at::linear of a 3-D input with a bias
// returns one), the hook goes on its base, whose gradient alone sees that change. Copies of a
// capture share its state. Any uniform scaling of δ leaves the scale-free statistics unchanged;
// for a mean-reduced loss δ is ∂ℓᵢ/∂y / B.
class OutputGradCapture {
 public:
  OutputGradCapture();
  // Registers the hook on `output` (which must require grad) and returns `output`. Watching
  // another tensor forgets the gradient captured before.
  at::Tensor watch(const at::Tensor& output);
  bool has_grad() const;
  // The captured gradient; throws if backward has not reached the watched tensor yet.
  at::Tensor grad() const;
  void reset();

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace trainscope
