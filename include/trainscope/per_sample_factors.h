// trainscope — per-sample gradient statistics from layer factors (SPEC.md §2), never
// materialising B copies of a layer's weights.
//
// For a linear layer y = x Wᵀ + b with input x [B, T, d_in] and output gradient
// δ = ∂(loss)/∂y [B, T, d_out], sample i's weight gradient is Gᵢ = Σ_t δ_itᵀ x_it and its bias
// gradient Σ_t δ_it. The additive parts of per_sample_stats.h come from x and δ alone, by one of
// two routes (N = B·T rows):
//
// The Ḡ route ("ghost", "tiled"), about 4·N·d_in·d_out flops, as much as a backward pass:
//   ‖Gᵢ‖²   ghost norm Σ_{t,s} (x_it·x_is)(δ_it·δ_is) (two batched GEMMs), or Gᵢ formed in
//           bounded tiles of samples
//   Ḡ       (1/B) Σ_i Gᵢ = δᵀx / B, one GEMM over all B·T rows (summed from the tiles when
//           ‖Gᵢ‖² is tiled)
//   Gᵢ·Ḡ    Σ_t δ_it · (Ḡ x_it): the rowwise sum of δ ∘ (x Ḡᵀ), one GEMM (a convolution's:
//           the convolution of x with Ḡ); when tiled and the whole batch's Gᵢ fit the tile
//           budget, or are no larger than the layer's x and δ (a language model's head), they
//           are kept and Gᵢ·Ḡ is their float64 dot with Ḡ, with no second pass
//   ‖Ḡ‖²
//
// The Gram route ("gram"), about 2·N²·(d_in + d_out) flops, far fewer when N is small next to
// the weight: with the cross-sample Gram matrices K_x = X Xᵀ and K_δ = Δ Δᵀ over all N rows,
// S_ik = Σ_{t∈i, s∈k} (K_x ∘ K_δ)_ts = Gᵢ·G_k, so ‖Gᵢ‖² = S_ii, Gᵢ·Ḡ = Σ_k S_ik / B and
// ‖Ḡ‖² = Σ_ik S_ik / B². Formed in blocks of rows (pairs of tiles of samples k >= i, S being
// symmetric); only S's diagonal and row sums are kept. The rows are centred first (each minus
// the per-position mean of the first tile's samples, with the cross terms added back), so a
// float32 GEMM rounds relative to how much the samples differ rather than to their size.
//
// The bias parts come from the per-sample bias gradients [B, d_out] directly. Conv2d reduces to
// the linear case after unfolding (T = output positions, d_in = C_in/groups · kh · kw, one
// linear problem per group), on either route.
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
// as under autocast), any strides. The parts are float64 whatever the inputs, as those of the
// materialised path: GEMMs run in float64 when both inputs are float64 and in float32 otherwise
// (bfloat16/float16 are upcast first, exactly), and every reduction after them — products of Gram
// matrices, their sums, x Ḡᵀ ∘ δ, ‖Ḡ‖², the bias parts — in float64. The Gram route also runs its
// GEMMs in float64 when N is small (see FactorMethod). float32 GEMMs follow torch's float32
// matmul precision, which trainscope leaves alone: TF32 is off by default; turned on
// (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high")) it rounds the
// float32 GEMMs' inputs to ~5e-4 relative, and the statistics with them. The convolutions
// trainscope runs itself on a GPU (Gᵢ·Ḡ of a conv layer) are IEEE float32 whatever
// torch.backends.cudnn.conv.fp32_precision says: its default is TF32. Results stay on the
// device; nothing synchronises. Bad input throws c10::Error naming the argument before any work.
//
// Precision when gradient noise is low (the statistics subtract nearly equal numbers): float32
// x, δ = randn(1, T, 256) + s·randn(64, T, 256), nn.Linear with bias; the norm test's largest
// relative distance, over 5 seeds, from float64 arithmetic on the same values (CPU):
//
//   s                                       1e-1     1e-2     1e-3
//   gram, T = 1 (float64 GEMMs; auto)       1.3e-14  1.2e-12  2.4e-10
//   gram, T = 4 (float32 GEMMs; auto)       9.7e-9   2.1e-8   9.3e-8
//   ghost, T = 1 (Ḡ route)                  2.9e-7   2.3e-5   7.7e-4
//   ghost, T = 4 (Ḡ route)                  4.7e-7   3.0e-5   3.4e-3
//   tiled, T = 1 (Ḡ route, blocks kept)     9.9e-8   1.3e-5   5.9e-4
//   tiled, T = 4 (Ḡ route, blocks kept)     8.5e-8   5.1e-6   6.3e-4
//
// (gram with float32 GEMMs at B = 512, T = 1, d = 1024: 9.5e-9, 1.4e-8, 9.1e-8.) So float32
// inputs meet SPEC.md §5's 1e-5 on the Gram route at any noise level; on the Ḡ route, whose
// float32 Ḡ and x Ḡᵀ carry ~1e-7 relative rounding that the statistics divide by their ~2s²,
// the error stays below 1e-8/s², within 1e-5 for s >= ~3e-2 only. float64 inputs meet it on every
// route.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>

#include <ATen/ATen.h>

#include "trainscope/hist2d.h"
#include "trainscope/per_sample_stats.h"

namespace trainscope {

// The route (see above). kGhost and kTiled: the Ḡ route with ‖Gᵢ‖² by the ghost norm or tiled;
// kGram: the Gram route. On the Gram route the GEMMs of float32 inputs run in float64 when N is
// small: under 2^24 flops, or when at float64's speed (half float32's on the CPU and on GPUs of
// compute capability 6.0 to 10.0, 1/64 on others) they cost under a quarter of the Ḡ route's;
// in float32 otherwise. kAuto takes the route of fewer flops so weighted: the Gram route when
// 2·N²·(d_in + d_out) (less with several tiles, for symmetry) is below the Ḡ route's
// 4·N·d_in·d_out plus its ‖Gᵢ‖², i.e. roughly when N is below the harmonic mean of d_in and
// d_out — so not for long sequences or large conv outputs — and the Ḡ route otherwise, tiled
// when its per-sample GEMMs and a pass over them (a pass counted as 100 flops an element) cost
// less than the ghost norm's two T×T Grams, a pass over them and Ḡ's own GEMM:
// 50·d_in·d_out < T²·(d_in + d_out + 100).
enum class FactorMethod : int64_t { kAuto = 0, kGhost = 1, kTiled = 2, kGram = 3 };

// "auto", "ghost", "tiled", "gram".
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

// The parts above and, where the route forms it on the way, the layer's weight gradient over the
// batch, Σᵢ Gᵢ = Σ_i,t δ_itᵀ x_it, shaped as the layer's weight ([d_out, d_in]; a convolution's
// [C_out, C_in/groups, kh, kw]) in the accumulation dtype (float32 for float32, bfloat16 and
// float16 inputs). The Ḡ routes form it from their per-sample tiles or their own GEMM, so a
// backward pass that takes its weight gradient from here runs no weight-gradient GEMM of its own
// (PerSampleHooks does, see per_sample_factors.py). The Gram route does not form it: there it is
// the backward pass's own GEMM or convolution weight gradient, run here. The same sums as the
// backward pass's, in another order: they agree to the accumulation dtype's rounding. One use of
// the layer. kAuto weighs the routes with the weight gradient counted: the Gram route pays its
// GEMM more, the Ḡ routes nothing (their GEMM is the one the backward pass no longer runs).
// bias_grad: with has_bias, the bias gradient Σ_i,t δ_it [d_out] (a convolution's [C_out]) in
// float64, summed from the per-sample bias gradients the parts need; undefined otherwise.
struct PerSamplePartsAndWeightGrad {
  PerSampleParts parts;
  at::Tensor weight_grad;
  at::Tensor bias_grad;
};
PerSamplePartsAndWeightGrad linear_per_sample_parts_and_weight_grad(
    const at::Tensor& input, const at::Tensor& grad_output, bool has_bias,
    FactorMethod method = FactorMethod::kAuto);
PerSamplePartsAndWeightGrad conv2d_per_sample_parts_and_weight_grad(
    const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool has_bias, FactorMethod method = FactorMethod::kAuto);

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

// Per-element moments of the per-sample gradients over the batch (SPEC.md §6): Σᵢ Gᵢ and
// Σᵢ Gᵢ² (elementwise), float64, the input of grad_variance_stats (trainscope/grad_variance.h).
// weight_sum and weight_sq_sum are [d_out, d_in] (a convolution's [C_out, C_in/groups·kh·kw]:
// reshape to the weight's shape), bias_sum and bias_sq_sum [d_out] (undefined without has_bias).
// A layer with one position per sample (an nn.Linear on [B, d_in]) takes two GEMMs of the
// factors, Σᵢ Gᵢ² = (δ²)ᵀ x²; otherwise the per-sample gradients are formed in tiles. The
// elements are Gᵢ = δᵢᵀxᵢ as given: for a mean-reduced loss pass B·δ. B >= 1.
struct PerSampleMoments {
  at::Tensor weight_sum, weight_sq_sum, bias_sum, bias_sq_sum;
};

// A layer used several times in one step — a module called on two batches whose losses are
// added, a block applied twice, a recurrent cell unrolled over time, siamese branches — has one
// per-sample gradient, the sum over its uses: Gᵢ = Σ_u Σ_t δ_u,itᵀ x_u,it, and the bias
// gradient Σ_u Σ_t δ_u,it. The overloads below take the input and output gradient of every use
// (input[u], grad_output[u], each shaped as for one use; a use's leading dims, or a
// convolution's spatial size, may differ from another's) and treat the uses' positions as more
// positions of the same samples, concatenated along T tile by tile: every route and histogram
// sees the summed gradient, cross terms between uses included. Row i of every use must be sample
// i: a use of another batch size is an error naming it. With one use they are the functions
// above, which call them.
//
//   auto parts = trainscope::linear_per_sample_parts(std::vector<at::Tensor>{x1, x2},
//                                                    std::vector<at::Tensor>{dy1, dy2}, true);
PerSampleParts linear_per_sample_parts(at::TensorList input, at::TensorList grad_output, bool has_bias,
                                       FactorMethod method = FactorMethod::kAuto);
PerSampleParts conv2d_per_sample_parts(at::TensorList input, at::TensorList grad_output,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool has_bias,
                                       FactorMethod method = FactorMethod::kAuto);
at::Tensor linear_per_sample_grad_hist1d(at::TensorList input, at::TensorList grad_output, bool has_bias,
                                         int64_t nbins = 100, double maxval = 0.05);
at::Tensor conv2d_per_sample_grad_hist1d(at::TensorList input, at::TensorList grad_output,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, bool has_bias, int64_t nbins = 100,
                                         double maxval = 0.05);
// Gᵢ · D [B] float64: each sample's gradient projected on a direction given as the layer's
// parameters would be — weight_dir [d_out, d_in] (a convolution's [C_out, C_in/groups, kh, kw])
// and bias_dir [d_out] (undefined: the bias is not projected) — from the factors, without forming
// Gᵢ: Σ_t δ_itᵀ D x_it. alpha's projections on the update (trainscope/alpha.h).
at::Tensor linear_per_sample_projections(at::TensorList input, at::TensorList grad_output,
                                         const at::Tensor& weight_dir, const at::Tensor& bias_dir);
at::Tensor conv2d_per_sample_projections(at::TensorList input, at::TensorList grad_output,
                                         const at::Tensor& weight_dir, const at::Tensor& bias_dir,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups);
PerSampleMoments linear_per_sample_grad_moments(at::TensorList input, at::TensorList grad_output,
                                                bool has_bias);
PerSampleMoments conv2d_per_sample_grad_moments(at::TensorList input, at::TensorList grad_output,
                                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                int64_t groups, bool has_bias);
std::tuple<at::Tensor, at::Tensor> linear_per_sample_grad_hist2d(
    at::TensorList input, at::TensorList grad_output, const at::Tensor& weight, const at::Tensor& bias,
    const Hist2dOptions& options = {});
std::tuple<at::Tensor, at::Tensor> conv2d_per_sample_grad_hist2d(
    at::TensorList input, at::TensorList grad_output, const at::Tensor& weight, const at::Tensor& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const Hist2dOptions& options = {});

// Captures the gradient of a layer's output during backward through a tensor hook:
//
//   trainscope::OutputGradCapture cap;
//   at::Tensor y = cap.watch(at::linear(x, w, b));   // y itself, with the hook registered
//   loss_of(y).backward();
//   auto parts = trainscope::linear_per_sample_parts(x, cap.grad(), true);
//
// The gradient captured is that of the value watched, also when the output is changed in place
// later (an in-place ReLU); when the output is a view (at::linear of a 3-D input with a bias
// returns one), the hook goes on its base, whose gradient alone sees that change. When backward
// reaches the watched value more than once (backward calls through a retained graph), the
// gradients add up, as a parameter's .grad does. Copies of a capture share its state. A layer
// used several times takes one capture per use (see the overloads above). Any uniform scaling of δ leaves the scale-free statistics unchanged;
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
