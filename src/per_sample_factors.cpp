// Per-sample gradient statistics and histograms from layer factors (input x, output gradient δ),
// with ATen ops only: the GEMMs go to cuBLAS / the CPU BLAS through at::bmm and friends.
//
// Every layer is first reduced to G independent linear problems (G = conv groups, 1 for
// nn.Linear): x [B, G, T, d_in], δ [B, G, T, d_out], read through accessors that return a tile
// of samples in the accumulation dtype. Conv2d unfolds (im2col) tile by tile, so no temporary
// grows with B beyond a fixed budget, except the [B] results and the parameter-sized Ḡ.
//
// Two routes to the parts (formulas in per_sample_factors.h): the Ḡ route (Ḡ and x Ḡᵀ, two GEMMs
// as large as the backward pass's weight-gradient GEMM, plus ghost or tiled ‖Gᵢ‖²) and the Gram
// route (K_x ∘ K_δ over all N = B·T rows, block-summed per pair of samples), cheaper when N is
// small next to the weight. Every reduction after the GEMMs runs in float64: the statistics
// subtract nearly equal parts, and float32 sums lose their difference when gradient noise is low.
#include "trainscope/per_sample_factors.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#endif

#include "cuda/hist2d.h"
#include "cuda/histogram.h"
#include "src/hist2d_internal.h"
#include "src/ieee_convolutions.h"
#include "src/nvtx.h"
#include "src/param_stats_internal.h"
#include "src/per_sample_factors_internal.h"
#include "src/per_sample_stats_internal.h"
#include "src/tensor_checks.h"
#include "trainscope/param_stats.h"

namespace trainscope {

const char* factor_method_name(FactorMethod m) {
  switch (m) {
    case FactorMethod::kAuto: return "auto";
    case FactorMethod::kGhost: return "ghost";
    case FactorMethod::kTiled: return "tiled";
    case FactorMethod::kGram: return "gram";
  }
  return "unknown";
}

FactorMethod parse_factor_method(const std::string& method) {
  if (method == "auto") return FactorMethod::kAuto;
  if (method == "ghost") return FactorMethod::kGhost;
  if (method == "tiled") return FactorMethod::kTiled;
  if (method == "gram") return FactorMethod::kGram;
  TORCH_CHECK(false, "trainscope: method must be \"auto\", \"ghost\", \"tiled\" or \"gram\", got \"", method,
              "\"");
  return FactorMethod::kAuto;
}

namespace {
constexpr int64_t kDefaultTileElems = int64_t{1} << 26;
std::atomic<int64_t> g_tile_elems{kDefaultTileElems};
}  // namespace

int64_t factor_tile_elems() { return g_tile_elems.load(std::memory_order_relaxed); }

int64_t set_factor_tile_elems(int64_t elems) {
  return g_tile_elems.exchange(elems >= 1 ? elems : kDefaultTileElems);
}

namespace {

using Accessor = std::function<at::Tensor(int64_t begin, int64_t count)>;

// One layer as G linear problems. x(begin, count) is [count, G, T, d_in] and d(begin, count)
// [count, G, T, d_out], both in `acc`; x_elems_per_sample bounds what one sample of x costs in
// temporaries (0 when x is a view).
struct Problem {
  const char* op;
  int64_t B, G, T, din, dout;
  at::ScalarType acc;
  at::TensorOptions opts;
  Accessor x, d;
  int64_t x_elems_per_sample;
  // Elements of the layer's inputs and output gradients as the caller holds them (every use): a
  // bound on what keeping the per-sample gradients may add, see keeps_blocks.
  int64_t held_elems = 0;
  // [B, G·d_out] per-sample bias gradients summed in `dtype`; empty when the layer's bias is not
  // tracked. A function, so that building a Problem does no work before every argument is checked.
  std::function<at::Tensor(at::ScalarType dtype)> bias_grads;
  // Gᵢ·W = Σ_t δ_itᵀ W x_it [B] float64 for W [G, d_out, d_in] in `acc`, by the layer's own operation
  // where it beats the unfolded product (a convolution: no unfolded copy); empty otherwise.
  std::function<at::Tensor(const at::Tensor& w)> weight_dots;
  // The per-sample weight gradients [count, G, o, d_in] in `acc` of samples begin .. begin+count,
  // rows o0 .. o0+o of each group's d_out, by the layer's own weight-gradient operation with the
  // samples as groups, where that beats the unfolded product; empty otherwise.
  std::function<at::Tensor(int64_t begin, int64_t count, int64_t o0, int64_t o)> grad_block;
  // Σᵢ Gᵢ [G, d_out, d_in] in `acc` by the layer's own weight-gradient operation (a convolution:
  // no unfolded copy of the input, nor a re-laid-out one for a GEMM); empty otherwise.
  std::function<at::Tensor()> grad_sum;
};

// Elements upcast to float64 at once by the helpers below: on a CPU a block that stays in cache
// (whole float64 copies would cost more memory traffic than the GEMMs that made the data), on a
// GPU a bounded transient (a float64 copy of a large layer's output gradients is gigabytes).
int64_t f64_block_elems(const at::Device& device) {
  return device.is_cpu() ? int64_t{1} << 17 : int64_t{1} << 24;
}

// at::sum(t, dims, dtype) for t [B, ...] reduced over dims that exclude 0, a block of samples at
// a time: at::sum upcasts a whole copy of t first when dtype is wider than t's. A sample larger
// than a block is summed in chunks along the first of dims. The same sums, in another order.
at::Tensor sum_per_sample(const at::Tensor& t, at::IntArrayRef dims, at::ScalarType dtype) {
  if (t.scalar_type() == dtype || t.size(0) == 0) return at::sum(t, dims, false, dtype);
  const int64_t block = f64_block_elems(t.device());
  const int64_t n = t.size(0), per_sample = std::max<int64_t>(1, t.numel() / n);
  const int64_t rb = std::max<int64_t>(1, block / per_sample);
  if (rb >= n) return at::sum(t, dims, false, dtype);
  const int64_t dim = dims[0], len = t.size(dim);
  const int64_t chunk = std::max<int64_t>(1, block / std::max<int64_t>(1, per_sample / std::max<int64_t>(1, len)));
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < n; i += rb) {
    const at::Tensor rows = t.narrow(0, i, std::min(rb, n - i));
    if (chunk >= len) {
      parts.push_back(at::sum(rows, dims, false, dtype));
      continue;
    }
    at::Tensor acc;
    for (int64_t c = 0; c < len; c += chunk) {
      const at::Tensor s = at::sum(rows.narrow(dim, c, std::min(chunk, len - c)), dims, false, dtype);
      acc = acc.defined() ? acc.add_(s) : s;
    }
    parts.push_back(acc);
  }
  return at::cat(parts);
}

// Samples per tile when one sample needs `work` elements of temporaries besides its x and δ in
// the accumulation dtype (copies when upcast, unfolded or reshaped).
int64_t tile_samples(const Problem& p, int64_t work) {
  const int64_t per_sample = work + p.x_elems_per_sample + 2 * p.G * p.T * (p.din + p.dout);
  return std::max<int64_t>(1, std::min<int64_t>(p.B, factor_tile_elems() / std::max<int64_t>(1, per_sample)));
}


void check_tensor(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  check_float_dtype(op, name.c_str(), -1, t);
  check_device(op, name, t.device());
}

void check_same_device(const char* op, const std::string& name, const at::Tensor& t, const at::Tensor& ref,
                       const std::string& ref_name = "input") {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must share one device");
}

// The names of use k's tensors in messages: "input", "grad_output" for a single use, "input[k]",
// "grad_output[k]" among several.
struct UseNames {
  std::string input = "input", grad_output = "grad_output";
};

UseNames use_names(size_t k, size_t uses) {
  if (uses == 1) return {};
  const std::string i = "[" + std::to_string(k) + "]";
  return {"input" + i, "grad_output" + i};
}

void check_batch_for_stats(const char* op, int64_t b) {
  TORCH_CHECK(b >= 2, op, ": the per-sample statistics need a batch of B >= 2 samples, got B = ", b);
}

at::ScalarType acc_dtype(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kDouble && b.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Problem builders: nn.Linear and nn.Conv2d.

Problem linear_problem(const char* op, const at::Tensor& input, const at::Tensor& grad_output,
                       bool has_bias, const UseNames& n) {
  check_tensor(op, n.input, input);
  check_tensor(op, n.grad_output, grad_output);
  check_same_device(op, n.grad_output, grad_output, input, n.input);
  TORCH_CHECK(input.dim() >= 2, op, ": ", n.input, " must be [B, d_in] or [B, ..., d_in], got shape ",
              input.sizes());
  TORCH_CHECK(grad_output.dim() == input.dim() &&
                  grad_output.sizes().slice(0, input.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
              op, ": ", n.grad_output, " has shape ", grad_output.sizes(), " but ", n.input, " has shape ",
              input.sizes(), "; they must agree in every dim but the last");
  Problem p;
  p.op = op;
  p.B = input.size(0);
  p.G = 1;
  p.din = input.size(-1);
  p.dout = grad_output.size(-1);
  p.T = 1;
  for (int64_t k = 1; k < input.dim() - 1; ++k) p.T *= input.size(k);
  p.acc = acc_dtype(input, grad_output);
  p.opts = at::TensorOptions().dtype(p.acc).device(input.device());
  const at::ScalarType acc = p.acc;
  const int64_t T = p.T, din = p.din, dout = p.dout, B = p.B;
  // Reshaped tile by tile: a non-contiguous input is copied one tile at a time.
  p.x = [input, acc, T, din](int64_t begin, int64_t count) {
    return input.narrow(0, begin, count).reshape({count, 1, T, din}).to(acc);
  };
  p.d = [grad_output, acc, T, dout](int64_t begin, int64_t count) {
    return grad_output.narrow(0, begin, count).reshape({count, 1, T, dout}).to(acc);
  };
  p.x_elems_per_sample = 0;
  p.held_elems = input.numel() + grad_output.numel();
  if (has_bias) {
    p.bias_grads = [grad_output, B, T, dout](at::ScalarType dtype) {
      return sum_per_sample(grad_output.reshape({B, T, dout}), {1}, dtype);
    };
  }
  return p;
}

std::array<int64_t, 2> expand2(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, op, ": ", name, " must have 1 or 2 values, got ", v.size());
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

struct ConvGeometry {
  std::array<int64_t, 2> kernel, stride, padding, dilation;
  int64_t groups;
};

ConvGeometry conv_geometry(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  ConvGeometry g{expand2(op, "kernel_size", kernel_size), expand2(op, "stride", stride),
                 expand2(op, "padding", padding), expand2(op, "dilation", dilation), groups};
  for (int k = 0; k < 2; ++k) {
    TORCH_CHECK(g.kernel[k] >= 1, op, ": kernel_size must be positive, got ", kernel_size);
    TORCH_CHECK(g.stride[k] >= 1, op, ": stride must be positive, got ", stride);
    TORCH_CHECK(g.padding[k] >= 0, op, ": padding must be non-negative, got ", padding);
    TORCH_CHECK(g.dilation[k] >= 1, op, ": dilation must be positive, got ", dilation);
  }
  TORCH_CHECK(groups >= 1, op, ": groups must be positive, got ", groups);
  return g;
}

// On a CPU, for a and b of one floating dtype with contiguous rows: one pass, each element widened
// as it is read, rows spread over the threads and eight partial sums per row.
at::Tensor cpu_rowwise_dot_f64(const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(0), m = a.size(1);
  at::Tensor out = at::empty({n}, a.options().dtype(at::kDouble));
  double* po = out.data_ptr<double>();
  const at::Tensor& bb = b.defined() ? b : a;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "trainscope::cpu_rowwise_dot_f64", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = bb.data_ptr<scalar_t>();
    const int64_t sa = a.stride(0), sb = bb.stride(0);
    at::parallel_for(0, n, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, m)), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* x = pa + i * sa;
        const scalar_t* y = pb + i * sb;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= m; j += 8) {
          for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(x[j + k]) * static_cast<double>(y[j + k]);
        }
        for (; j < m; ++j) acc[0] += static_cast<double>(x[j]) * static_cast<double>(y[j]);
        po[i] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      }
    });
  });
  return out;
}

// Σ_j a_ij·b_ij [n] float64 of two [n, m] matrices (Σ_j a_ij² when b is undefined), each element
// upcast before the product: in one pass on a CPU where the dtypes allow, else in blocks of
// f64_block_elems.
at::Tensor rowwise_dot_f64(const at::Tensor& a, const at::Tensor& b = {}) {
  const bool rows_contiguous = a.dim() == 2 && (a.size(1) <= 1 || a.stride(1) == 1) &&
                               (!b.defined() || b.size(1) <= 1 || b.stride(1) == 1);
  if (a.is_cpu() && rows_contiguous && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) &&
      (!b.defined() || b.scalar_type() == a.scalar_type())) {
    return cpu_rowwise_dot_f64(a, b);
  }
  auto dot = [](const at::Tensor& x, const at::Tensor& y) {
    const at::Tensor x64 = x.to(at::kDouble);
    return (y.defined() ? x64 * y.to(at::kDouble) : x64 * x64).sum(1);
  };
  const int64_t block = f64_block_elems(a.device());
  if (a.numel() <= block) return dot(a, b);
  const int64_t n = a.size(0), m = a.size(1);
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(n, block / std::max<int64_t>(1, m)));
  const int64_t cb = std::max<int64_t>(1, std::min<int64_t>(m, block / rb));
  at::Tensor out = at::zeros({n}, a.options().dtype(at::kDouble));
  for (int64_t r0 = 0; r0 < n; r0 += rb) {
    const int64_t r = std::min(rb, n - r0);
    at::Tensor o = out.narrow(0, r0, r);
    for (int64_t c0 = 0; c0 < m; c0 += cb) {
      const int64_t c = std::min(cb, m - c0);
      o.add_(dot(a.narrow(0, r0, r).narrow(1, c0, c), b.defined() ? b.narrow(0, r0, r).narrow(1, c0, c) : b));
    }
  }
  return out;
}

// The unfolded input [b, C_in·kh·kw, T] of x [b, C_in, H, W] (im2col: columns ordered channel,
// kh, kw). On a CPU by one strided copy of the padded input, as at::im2col is several times
// slower there; the values are the same, as both only copy.
at::Tensor unfold_input(const at::Tensor& x, const ConvGeometry& g) {
  if (!x.is_cpu()) return at::im2col(x, g.kernel, g.dilation, g.padding, g.stride);
  const at::Tensor xp = g.padding[0] == 0 && g.padding[1] == 0
                            ? x
                            : at::constant_pad_nd(x, {g.padding[1], g.padding[1], g.padding[0], g.padding[0]}, 0);
  const int64_t b = xp.size(0), c = xp.size(1);
  const int64_t oh = (xp.size(2) - g.dilation[0] * (g.kernel[0] - 1) - 1) / g.stride[0] + 1;
  const int64_t ow = (xp.size(3) - g.dilation[1] * (g.kernel[1] - 1) - 1) / g.stride[1] + 1;
  const at::IntArrayRef st = xp.strides();
  const at::Tensor windows = xp.as_strided(
      {b, c, g.kernel[0], g.kernel[1], oh, ow},
      {st[0], st[1], g.dilation[0] * st[2], g.dilation[1] * st[3], g.stride[0] * st[2], g.stride[1] * st[3]},
      xp.storage_offset());
  return windows.reshape({b, c * g.kernel[0] * g.kernel[1], oh * ow});
}

// A convolution's weight gradient [C_out, C_in/G, kh, kw] in `acc` by its library operation (the
// backward pass's own; the weight's values are never read).
at::Tensor conv2d_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, const ConvGeometry& g,
                              at::ScalarType acc) {
  const at::Tensor x = input.to(acc);
  const at::Tensor shape_only = at::empty({grad_output.size(1), input.size(1) / g.groups, g.kernel[0], g.kernel[1]},
                                          x.options());
  return std::get<1>(at::convolution_backward(grad_output.to(acc), x, shape_only, std::nullopt, g.stride, g.padding,
                                              g.dilation, /*transposed=*/false, {0, 0}, g.groups,
                                              {false, true, false}));
}

// Where a convolution's per-sample weight gradients come from its own weight gradient grouped by
// sample (Problem::grad_block): at most this many input and output channels per group ...
constexpr int64_t kGroupedGradMaxChannels = 128;
// ... and at least this many output positions per sample.
constexpr int64_t kGroupedGradMinPositions = 64;

Problem conv2d_problem(const char* op, const at::Tensor& input, const at::Tensor& grad_output,
                       const ConvGeometry& g, bool has_bias, const UseNames& n) {
  check_tensor(op, n.input, input);
  check_tensor(op, n.grad_output, grad_output);
  check_same_device(op, n.grad_output, grad_output, input, n.input);
  TORCH_CHECK(input.dim() == 4, op, ": ", n.input, " must be [B, C_in, H, W], got shape ", input.sizes());
  TORCH_CHECK(grad_output.dim() == 4, op, ": ", n.grad_output, " must be [B, C_out, H', W'], got shape ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.size(0) == input.size(0), op, ": ", n.grad_output, " has batch size ",
              grad_output.size(0), " but ", n.input, " has ", input.size(0));
  const int64_t cin = input.size(1), cout = grad_output.size(1);
  TORCH_CHECK(cin % g.groups == 0, op, ": ", n.input, " has ", cin, " channels, not divisible by groups = ",
              g.groups);
  TORCH_CHECK(cout % g.groups == 0, op, ": ", n.grad_output, " has ", cout,
              " channels, not divisible by groups = ", g.groups);
  std::array<int64_t, 2> out{};
  for (int k = 0; k < 2; ++k) {
    const int64_t span = input.size(2 + k) + 2 * g.padding[k] - g.dilation[k] * (g.kernel[k] - 1) - 1;
    TORCH_CHECK(span >= 0, op, ": ", n.input, " of spatial size ", input.sizes().slice(2),
                " is smaller than the dilated kernel (kernel_size ", at::IntArrayRef(g.kernel),
                ", dilation ", at::IntArrayRef(g.dilation), ", padding ", at::IntArrayRef(g.padding), ")");
    out[k] = span / g.stride[k] + 1;
  }
  TORCH_CHECK(grad_output.size(2) == out[0] && grad_output.size(3) == out[1], op, ": ", n.grad_output,
              " has spatial size ", grad_output.sizes().slice(2), " but the convolution of ", n.input, " ",
              input.sizes(), " gives [", out[0], ", ", out[1], "]");

  Problem p;
  p.op = op;
  p.B = input.size(0);
  p.G = g.groups;
  p.T = out[0] * out[1];
  p.din = cin / g.groups * g.kernel[0] * g.kernel[1];
  p.dout = cout / g.groups;
  p.acc = acc_dtype(input, grad_output);
  p.opts = at::TensorOptions().dtype(p.acc).device(input.device());
  const at::ScalarType acc = p.acc;
  const int64_t G = p.G, T = p.T, din = p.din, dout = p.dout;
  // im2col orders an unfolded column as (channel, kh, kw): channel groups are consecutive blocks
  // of d_in, and a block matches the flattening of the group's weight [C_out/G, C_in/G, kh, kw].
  p.x = [input, g, acc, G, T, din](int64_t begin, int64_t count) {
    const at::Tensor cols = unfold_input(input.narrow(0, begin, count).to(acc), g);  // [count, C_in·kh·kw, T]
    return cols.view({count, G, din, T}).transpose(2, 3);
  };
  p.d = [grad_output, acc, G, T, dout](int64_t begin, int64_t count) {
    return grad_output.narrow(0, begin, count).to(acc).reshape({count, G, dout, T}).transpose(2, 3);
  };
  // The input tile upcast, before unfolding.
  p.x_elems_per_sample = cin * input.size(2) * input.size(3);
  p.held_elems = input.numel() + grad_output.numel();
  if (has_bias) {
    p.bias_grads = [grad_output](at::ScalarType dtype) { return sum_per_sample(grad_output, {2, 3}, dtype); };
  }
  // The convolution of the input with W as its weight, dotted with δ per sample (products and sums
  // in float64).
  p.weight_dots = [input, grad_output, g, acc, cin](const at::Tensor& w) {
    const at::Tensor weight = w.reshape({-1, cin / g.groups, g.kernel[0], g.kernel[1]}).to(acc);
    const IeeeFloat32Convolutions ieee(input.device());
    const at::Tensor y = at::convolution(input.to(acc), weight, {}, g.stride, g.padding, g.dilation,
                                         /*transposed=*/false, {0, 0}, g.groups);
    const int64_t b = y.size(0);
    return rowwise_dot_f64(y.reshape({b, -1}), grad_output.reshape({b, -1}));
  };
  p.grad_sum = [input, grad_output, g, acc, G, dout, din]() {
    const IeeeFloat32Convolutions ieee(input.device());  // float32 as the other routes' GEMMs
    return conv2d_weight_grad(input, grad_output, g, acc).contiguous().view({G, dout, din});
  };
  // oneDNN's weight gradient of a convolution grouped by sample reads the input where it lies;
  // the unfolded product first writes it out kh·kw times. Measured on a CPU it is the faster one
  // (2–4× at 32×32 with 64 channels) while groups have at most 128 channels and a sample many
  // positions, and the slower one beyond. A GPU keeps the unfolded product.
  if (input.is_cpu() && acc == at::kFloat && at::hasMKLDNN() && cin / g.groups <= kGroupedGradMaxChannels &&
      dout <= kGroupedGradMaxChannels && T >= kGroupedGradMinPositions) {
    p.grad_block = [input, grad_output, g, acc, cin, G, dout, din](int64_t begin, int64_t count, int64_t o0,
                                                                   int64_t o) {
      const at::Tensor x = input.narrow(0, begin, count).to(acc).reshape({1, count * cin, input.size(2), input.size(3)});
      at::Tensor dy = grad_output.narrow(0, begin, count).to(acc);
      const int64_t h = dy.size(2), w = dy.size(3);
      dy = dy.view({count, G, dout, h, w}).narrow(2, o0, o).reshape({1, count * G * o, h, w});
      ConvGeometry by_sample = g;  // the samples' groups as more groups of one batch-of-one convolution
      by_sample.groups = count * G;
      return conv2d_weight_grad(x, dy, by_sample, acc).contiguous().view({count, G, o, din});
    };
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// A layer used several times in one step: sample i's gradient is the sum over the uses, so the
// uses' positions are more positions of the same sample, concatenated along T tile by tile. One
// use is that use's problem, unchanged.

void check_use_lists(const char* op, at::TensorList input, at::TensorList grad_output) {
  TORCH_CHECK(!input.empty(), op, ": input is an empty list; pass the input of every use of the layer");
  TORCH_CHECK(grad_output.size() == input.size(), op, ": grad_output has ", grad_output.size(),
              " tensors but input has ", input.size(), "; one output gradient per use");
}

// The sum over a layer's uses of one of their Problem's functions (sample i's gradient is the sum
// over the uses); empty unless every use has it.
template <typename... Args>
std::function<at::Tensor(Args...)> summed_over_uses(const std::vector<Problem>& uses,
                                                    std::function<at::Tensor(Args...)> Problem::*member) {
  std::vector<std::function<at::Tensor(Args...)>> parts;
  for (const Problem& u : uses) {
    if (!(u.*member)) return nullptr;
    parts.push_back(u.*member);
  }
  return [parts](Args... args) {
    at::Tensor sum = parts.front()(args...);  // a fresh tensor: added to in place
    for (size_t k = 1; k < parts.size(); ++k) sum.add_(parts[k](args...));
    return sum;
  };
}

Problem combined_problem(const char* op, std::vector<Problem> uses) {
  if (uses.size() == 1) return std::move(uses.front());
  const Problem& first = uses.front();
  at::ScalarType acc = at::kDouble;
  for (size_t k = 0; k < uses.size(); ++k) {
    const Problem& u = uses[k];
    TORCH_CHECK(u.B == first.B, op, ": input[", k, "] has batch size ", u.B, " but input[0] has ", first.B,
                "; row i of every use of a layer must be sample i");
    TORCH_CHECK(u.G == first.G && u.din == first.din && u.dout == first.dout, op, ": input[", k,
                "] and grad_output[", k, "] are of a layer of ", u.G, " group(s) of ", u.din, " inputs and ",
                u.dout, " outputs, but input[0] and grad_output[0] of ", first.G, " group(s) of ", first.din,
                " inputs and ", first.dout, " outputs; every use is of one layer");
    TORCH_CHECK(u.opts.device() == first.opts.device(), op, ": input[", k, "] is on ", u.opts.device(),
                " but input[0] is on ", first.opts.device(), "; all tensors must share one device");
    if (u.acc != at::kDouble) acc = u.acc;
  }
  Problem p = first;
  p.acc = acc;
  p.opts = first.opts.dtype(acc);
  p.T = 0;
  p.x_elems_per_sample = 0;
  p.held_elems = 0;
  std::vector<Accessor> xs, ds;
  for (const Problem& u : uses) {
    p.T += u.T;
    p.held_elems += u.held_elems;
    // The use's tiles before they are concatenated.
    p.x_elems_per_sample += u.x_elems_per_sample + u.G * u.T * (u.din + u.dout);
    xs.push_back(u.x);
    ds.push_back(u.d);
  }
  auto concat = [acc](const std::vector<Accessor>& parts) {
    return [parts, acc](int64_t begin, int64_t count) {
      std::vector<at::Tensor> tiles;
      tiles.reserve(parts.size());
      for (const Accessor& a : parts) tiles.push_back(a(begin, count).to(acc));
      return at::cat(tiles, 2);  // [count, G, Σ T_u, d]
    };
  };
  p.x = concat(xs);
  p.d = concat(ds);
  p.weight_dots = summed_over_uses(uses, &Problem::weight_dots);
  p.grad_block = summed_over_uses(uses, &Problem::grad_block);
  p.grad_sum = summed_over_uses(uses, &Problem::grad_sum);
  p.bias_grads = summed_over_uses(uses, &Problem::bias_grads);
  return p;
}

Problem linear_uses(const char* op, at::TensorList input, at::TensorList grad_output, bool has_bias) {
  check_use_lists(op, input, grad_output);
  std::vector<Problem> uses;
  for (size_t k = 0; k < input.size(); ++k) {
    uses.push_back(linear_problem(op, input[k], grad_output[k], has_bias, use_names(k, input.size())));
  }
  return combined_problem(op, std::move(uses));
}

Problem conv2d_uses(const char* op, at::TensorList input, at::TensorList grad_output, const ConvGeometry& g,
                    bool has_bias) {
  check_use_lists(op, input, grad_output);
  std::vector<Problem> uses;
  for (size_t k = 0; k < input.size(); ++k) {
    uses.push_back(conv2d_problem(op, input[k], grad_output[k], g, has_bias, use_names(k, input.size())));
  }
  return combined_problem(op, std::move(uses));
}

// ---------------------------------------------------------------------------------------------
// The parts.

// [b·G, T, d] of a [b, G, T, d] tile (sizes spelled out: -1 is ambiguous when T = 0).
at::Tensor flat_batch(const at::Tensor& t) { return t.reshape({t.size(0) * t.size(1), t.size(2), t.size(3)}); }
// [G, b·T, d] of a [b, G, T, d] tile.
at::Tensor flat_groups(const at::Tensor& t) {
  return t.transpose(0, 1).reshape({t.size(1), t.size(0) * t.size(2), t.size(3)});
}

at::TensorOptions f64_options(const Problem& p) { return p.opts.dtype(at::kDouble); }

// ‖Gᵢ‖² of the samples of one tile, [b] float64, by the ghost norm: Σ_{t,s} (x_t·x_s)(δ_t·δ_s)
// with the two T×T Gram matrices formed in blocks of rows.
at::Tensor ghost_sq_norms(const Problem& p, const at::Tensor& x, const at::Tensor& d) {
  const int64_t b = x.size(0);
  if (p.T == 1) {  // ‖x‖²‖δ‖² per group: no Gram matrices needed
    return (rowwise_dot_f64(x.reshape({b * p.G, p.din})) * rowwise_dot_f64(d.reshape({b * p.G, p.dout})))
        .view({b, p.G})
        .sum(1);
  }
  const at::Tensor X = flat_batch(x), D = flat_batch(d);
  // Three blocks alive at once: one Gram block in float64, the other before and after upcasting.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(p.T, factor_tile_elems() / std::max<int64_t>(1, 3 * X.size(0) * p.T)));
  at::Tensor acc;
  for (int64_t r0 = 0; r0 < p.T; r0 += rows) {
    const int64_t r = std::min(rows, p.T - r0);
    at::Tensor gx = at::bmm(X.narrow(1, r0, r), X.transpose(1, 2)).to(at::kDouble);
    const at::Tensor gd = at::bmm(D.narrow(1, r0, r), D.transpose(1, 2)).to(at::kDouble);
    const at::Tensor s = gx.mul_(gd).sum(at::IntArrayRef{1, 2});
    acc = acc.defined() ? acc.add_(s) : s;
  }
  if (!acc.defined()) return at::zeros({b}, f64_options(p));  // T = 0
  return acc.view({b, p.G}).sum(1);
}

// Calls fn(o0, Gt) for the per-sample weight gradients of the tile of samples i0 .. i0+b, Gt
// [b, G, o, d_in] holding rows o0 .. o0+o of d_out, in blocks of rows small enough for the tile
// budget when `copies` blocks of that size are alive at once. x, d: the tile's p.x and p.d where
// the caller holds them, else undefined (made here if the route needs them).
// The GEMM route forms every block in one buffer: a fresh large tensor per block costs more in
// page faults on a CPU than the GEMM that fills it. fn must be done with a block when it returns.
// With `into` given ([b·G·d_out·d_in] contiguous), the GEMM route writes the tile's whole blocks
// there, in one block of all rows.
void for_each_grad_block(const Problem& p, int64_t i0, int64_t b, at::Tensor x, at::Tensor d,
                         const std::function<void(int64_t, at::Tensor)>& fn, int64_t copies = 1,
                         int64_t block_elems = 0, const at::Tensor& into = {}) {
  const int64_t budget = (block_elems > 0 ? block_elems : factor_tile_elems()) / copies;
  int64_t rows = std::max<int64_t>(1, std::min<int64_t>(p.dout, budget / std::max<int64_t>(1, b * p.G * p.din)));
  if (into.defined() && !p.grad_block) rows = p.dout;
  if (p.grad_block) {
    for (int64_t o0 = 0; o0 < p.dout; o0 += rows) fn(o0, p.grad_block(i0, b, o0, std::min(rows, p.dout - o0)));
    return;
  }
  if (!x.defined()) x = p.x(i0, b);
  if (!d.defined()) d = p.d(i0, b);
  const at::Tensor X = flat_batch(x), D = flat_batch(d).transpose(1, 2);  // [bG, d_out, T]
  const at::Tensor buf = into.defined() && rows == p.dout ? into : at::empty({b * p.G * rows * p.din}, X.options());
  for (int64_t o0 = 0; o0 < p.dout; o0 += rows) {
    const int64_t o = std::min(rows, p.dout - o0);
    at::Tensor g = buf.narrow(0, 0, b * p.G * o * p.din).view({b * p.G, o, p.din});
    at::bmm_out(g, D.narrow(1, o0, o), X);
    fn(o0, g.view({b, p.G, o, p.din}));
  }
}


// Samples per tile of the weight-gradient blocks (a tile of rows when one sample is too large).
int64_t grad_tile_samples(const Problem& p) { return tile_samples(p, p.G * p.dout * p.din); }

// Elements per block of per-sample gradients binned on a CPU: a block binned while it is still
// in the core's cache (on a GPU, blocks are as large as the tile budget allows).
constexpr int64_t kCpuHistBlockElems = int64_t{1} << 20;

int64_t hist_block_elems(const Problem& p) {
  return p.opts.device().is_cpu() ? std::min(factor_tile_elems(), kCpuHistBlockElems) : 0;
}

// Samples per tile of the histograms: on a CPU as many whole per-sample gradients as fit a block
// (one GEMM per sample shaped like the layer's own), at least one.
int64_t hist_tile_samples(const Problem& p) {
  const int64_t block = hist_block_elems(p), bt = grad_tile_samples(p);
  return block > 0 ? std::max<int64_t>(1, std::min(bt, block / std::max<int64_t>(1, p.G * p.dout * p.din))) : bt;
}

// ‖Gᵢ‖² [b] float64 of the samples i0 .. i0+b from their weight gradients, squared after
// upcasting (exactly); with gsum [G, d_out, d_in] given, Σᵢ Gᵢ added to it from the same blocks
// (so Ḡ needs no GEMM of its own, nor a copy of an unfolded input laid out for one); with kept
// [B, G·d_out·d_in] given, the blocks copied into it.
at::Tensor tiled_sq_norms(const Problem& p, int64_t i0, int64_t b, const at::Tensor& x, const at::Tensor& d,
                          at::Tensor* gsum = nullptr, at::Tensor* kept = nullptr) {
  at::Tensor acc;
  // Kept blocks are formed in place where the GEMM route forms them (no copy of the whole batch's).
  const at::Tensor into = kept != nullptr && !p.grad_block ? kept->narrow(0, i0, b).view(-1) : at::Tensor();
  for_each_grad_block(
      p, i0, b, x, d,
      [&](int64_t o0, at::Tensor g) {
        const at::Tensor s = rowwise_dot_f64(g.view({g.size(0), -1}));
        acc = acc.defined() ? acc.add_(s) : s;
        if (gsum != nullptr) gsum->narrow(1, o0, g.size(2)).add_(g.size(0) == 1 ? g.select(0, 0) : g.sum(0));
        if (kept != nullptr && !into.defined()) {
          kept->narrow(0, i0, b).view({b, p.G, p.dout, p.din}).narrow(2, o0, g.size(2)).copy_(g);
        }
      },
      /*copies=*/p.opts.device().is_cpu() ? 1 : 2,  // a GPU upcasts a whole block
      /*block_elems=*/0, into);
  return acc.defined() ? acc : at::zeros({b}, f64_options(p));
}

// ‖t‖² in float64, upcasting a chunk at a time: Ḡ is parameter-sized. (The mean of the Gᵢ·Ḡ
// equals ‖Ḡ‖² too, but carries the rounding of the float32 GEMM x Ḡᵀ: ten times less accurate.)
at::Tensor sq_norm_f64(const at::Tensor& t) {
  const at::Tensor flat = t.reshape(-1);
  const int64_t n = flat.numel(), chunk = int64_t{1} << 20;
  at::Tensor acc = at::zeros({}, t.options().dtype(at::kDouble));
  for (int64_t i = 0; i < n; i += chunk) {
    acc.add_(flat.narrow(0, i, std::min(chunk, n - i)).to(at::kDouble, false, /*copy=*/true).square_().sum());
  }
  return acc;
}

// Samples per tile of weight_dots_by_rows: x Wᵀ, and on a GPU its float64 copy and δ's.
int64_t dots_tile_samples(const Problem& p) { return tile_samples(p, 3 * p.G * p.T * p.dout); }

// Gᵢ·W [B] float64 for W [G, d_out, d_in] in the accumulation dtype: Σ_t δ_it · (W x_it), the
// rowwise sum of δ ∘ (x Wᵀ), the GEMM in the accumulation dtype and the products after it in
// float64, in tiles of samples (xf, df: the whole batch's [G, B·T, d] when the caller holds them).
at::Tensor weight_dots_by_rows(const Problem& p, const at::Tensor& w, const at::Tensor& xf_all = {},
                               const at::Tensor& df_all = {}) {
  if (p.B == 0) return at::zeros({0}, f64_options(p));
  const int64_t bt = dots_tile_samples(p);
  std::vector<at::Tensor> dots;
  for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
    const int64_t b = std::min(bt, p.B - i0);
    const at::Tensor xf = xf_all.defined() ? xf_all : flat_groups(p.x(i0, b));
    const at::Tensor df = df_all.defined() ? df_all : flat_groups(p.d(i0, b));
    const at::Tensor y = at::bmm(xf, w.transpose(1, 2));  // [G, b·T, d_out]
    const int64_t rows = p.G * b * p.T;
    const at::Tensor row_dots = rowwise_dot_f64(y.view({rows, p.dout}), df.reshape({rows, p.dout}));
    dots.push_back(row_dots.view({p.G, b, p.T}).sum(at::IntArrayRef{0, 2}));
  }
  return at::cat(dots);
}

// Whether the tiled Ḡ route keeps the whole batch's per-sample gradients: Gᵢ·Ḡ then comes from
// them (float64 products) instead of a second pass over x and δ (a GEMM as large as the layer's
// weight gradient, or a convolution). They are kept when they fit the tile budget, or when they
// are no larger than the layer's inputs and output gradients, which the caller holds anyway: the
// transient then at most doubles what the layer holds. A language model's head is such a layer:
// B blocks of V × d against factors of B·T × (d + V) elements.
bool keeps_blocks(const Problem& p) {
  const int64_t blocks = p.B * p.G * p.dout * p.din;
  return p.B > 0 && (blocks <= factor_tile_elems() || blocks <= p.held_elems);
}

// The Ḡ route: ‖Gᵢ‖² by the ghost norm or tiled, Ḡ = δᵀx / B, and Gᵢ·Ḡ from x Ḡᵀ. The GEMMs
// run in the accumulation dtype, everything after them in float64. With weight_grad given, Σᵢ Gᵢ
// [G, d_out, d_in] (formed on the way) goes there.
PerSampleParts gbar_parts(const Problem& p, bool tiled, at::Tensor* weight_grad = nullptr) {
  // Pass 1: ‖Gᵢ‖² and Σᵢ Gᵢ over tiles of samples, sharing each tile's x and δ.
  const int64_t b1 = tile_samples(p, tiled ? p.G * p.dout * p.din : 2 * p.G * p.T * p.T);
  const int64_t b2 = dots_tile_samples(p);
  const int64_t weight_elems = p.G * p.dout * p.din;
  at::Tensor kept;
  if (tiled && keeps_blocks(p)) kept = at::empty({p.B, weight_elems}, p.opts);
  std::vector<at::Tensor> sq;
  // Σᵢ Gᵢ [G, d_out, d_in]: from the kept blocks at the end, by the layer's own weight gradient
  // where the ghost norm has one, else summed tile by tile.
  const bool own_sum = !tiled && p.grad_sum && p.B > 0;
  at::Tensor gsum = kept.defined() || own_sum ? at::Tensor() : at::zeros({p.G, p.dout, p.din}, p.opts);
  at::Tensor xg, dg;  // [G, B·T, d] of the whole batch, kept when both passes take it in one tile
  for (int64_t i0 = 0; i0 < p.B; i0 += b1) {
    const int64_t b = std::min(b1, p.B - i0);
    // The tile's factors, unless the per-sample gradients come from the layer's own operation.
    const bool factors = !tiled || !p.grad_block;
    const at::Tensor x = factors ? p.x(i0, b) : at::Tensor(), d = factors ? p.d(i0, b) : at::Tensor();
    if (tiled) {
      sq.push_back(tiled_sq_norms(p, i0, b, x, d, kept.defined() ? nullptr : &gsum, kept.defined() ? &kept : nullptr));
    } else {
      sq.push_back(ghost_sq_norms(p, x, d));
      if (!own_sum) gsum.baddbmm_(flat_groups(d).transpose(1, 2), flat_groups(x));
    }
    if (factors && !kept.defined() && b == p.B && b2 == p.B && !p.weight_dots) {
      xg = flat_groups(x);
      dg = flat_groups(d);
    }
  }
  if (kept.defined()) gsum = kept.view({p.B, p.G, p.dout, p.din}).sum(0);
  if (own_sum) gsum = p.grad_sum();
  if (weight_grad != nullptr) *weight_grad = gsum;
  // Ḡ = Σᵢ Gᵢ / B itself is not formed (a parameter-sized copy where the caller keeps the sum):
  // the products with Ḡ are the float64 products with the sum, scaled.
  const double inv_b = 1.0 / static_cast<double>(p.B);
  const at::Tensor msq = sq_norm_f64(gsum) * (inv_b * inv_b);
  if (kept.defined()) {
    return {at::cat(sq), rowwise_dot_f64(kept, gsum.reshape({1, weight_elems}).expand({p.B, weight_elems})) * inv_b,
            msq};
  }

  // Pass 2: Gᵢ·Ḡ, by the layer's own operation where it has one.
  if (p.weight_dots) return {at::cat(sq), p.weight_dots(gsum) * inv_b, msq};
  return {at::cat(sq), weight_dots_by_rows(p, gsum, xg, dg) * inv_b, msq};
}

int64_t isqrt(int64_t v) { return static_cast<int64_t>(std::sqrt(static_cast<double>(std::max<int64_t>(0, v)))); }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Temporaries per sample when the Gram route loads x and δ: a second tile, upcast and centred
// copies, and both tiles' T×T cross terms with the centres (held whole, even for one sample).
int64_t gram_load_work(const Problem& p) { return 3 * p.G * p.T * (p.din + p.dout) + 4 * p.G * p.T * p.T; }

// One factor (x or δ) of the Gram route, centred: rows r_it = x_it − c_t with c [G, T, d] a
// per-position centre, so that x_it·x_ks = r_it·r_ks + r_it·c_s + c_t·r_ks + c_t·c_s. A float32
// GEMM rounds r_it·r_ks to ε·|r_it||r_ks| rather than ε·|x_it||x_ks|: when the samples are alike
// (low gradient noise s) that is s² smaller, which is what the statistics, differences of order
// s², need. The cross terms' rounding amounts to moving a row by ε·|r| along c, which the
// statistics see as ε relative; c_t·c_s is formed in float64.
struct Centre {
  at::Tensor c;   // [G, T, d] in the GEMM dtype
  at::Tensor ct;  // [G, d, T]
  at::Tensor cc;  // [G, T, T] float64: c_t·c_s
};

Centre centre_of(const at::Tensor& first_tile, at::ScalarType gemm) {
  const at::Tensor c = first_tile.to(at::kDouble).mean(0).to(gemm);  // per-position mean
  const at::Tensor c64 = c.to(at::kDouble);
  return {c, c.transpose(1, 2), at::bmm(c64, c64.transpose(1, 2))};
}

// A tile of one factor, centred.
struct GramTile {
  at::Tensor r;   // [b, G, T, d] in the GEMM dtype
  at::Tensor rt;  // [G, d, b·T]
  at::Tensor u;   // [G, b, T, T] float64: r_it·c_s
};

GramTile gram_tile(const at::Tensor& r, const Centre& c) {
  const int64_t b = r.size(0), G = r.size(1), T = r.size(2);
  const at::Tensor rows = flat_groups(r);
  return {r, rows.transpose(1, 2), at::bmm(rows, c.ct).to(at::kDouble).view({G, b, T, T})};
}

// K_x (or K_δ) [G, bi, r, bk, T] float64 between the rows t0 .. t0+r of the samples of tile i
// and all rows of tile k.
at::Tensor centred_gram(const Centre& c, const GramTile& i, const GramTile& k, int64_t t0, int64_t r) {
  const int64_t G = i.r.size(1), bi = i.r.size(0), T = i.r.size(2), bk = k.r.size(0);
  at::Tensor g = at::bmm(flat_groups(i.r.narrow(2, t0, r)), k.rt).to(at::kDouble).view({G, bi, r, bk, T});
  g.add_(i.u.narrow(2, t0, r).unsqueeze(3));                             // r_it·c_s
  g.add_(k.u.permute({0, 3, 1, 2}).narrow(1, t0, r).unsqueeze(1));      // c_t·r_ks
  g.add_(c.cc.narrow(1, t0, r).unsqueeze(1).unsqueeze(3));               // c_t·c_s
  return g;
}

// S_ik = Gᵢ·G_k [bi, bk] float64 for the samples i of tiles (xi, di) and k of tiles (xk, dk):
// the block sums of K_x ∘ K_δ over the rows of the two tiles, in chunks of the T rows of each
// sample of the first tile when the blocks are large.
at::Tensor gram_block(const Problem& p, const Centre& cx, const Centre& cd, const GramTile& xi,
                      const GramTile& di, const GramTile& xk, const GramTile& dk) {
  const int64_t bi = xi.r.size(0), cols = xk.r.size(0) * p.T;
  // Four blocks alive at once: K_x and K_δ before and after upcasting.
  const int64_t tr = std::max<int64_t>(
      1, std::min<int64_t>(p.T, factor_tile_elems() / std::max<int64_t>(1, 4 * p.G * bi * cols)));
  at::Tensor s;
  for (int64_t t0 = 0; t0 < p.T; t0 += tr) {
    const int64_t r = std::min(tr, p.T - t0);
    at::Tensor m = centred_gram(cx, xi, xk, t0, r);
    m.mul_(centred_gram(cd, di, dk, t0, r));
    // With T = 1 and one group, S is M itself.
    const at::Tensor blk = p.G == 1 && p.T == 1 ? m.view({m.size(1), m.size(3)}) : m.sum(at::IntArrayRef{0, 2, 4});
    s = s.defined() ? s.add_(blk) : blk;
  }
  return s;
}

// Samples per tile of the Gram route. Two tiles make blocks of (b·T)² Gram entries: whole blocks
// within the budget where samples allow. S is symmetric, so nt tiles cost nt(nt+1)/2 blocks of
// nt²: up to 8 tiles while a tile keeps 256 rows or more (GEMMs that large run at full speed).
int64_t gram_tile_samples(const Problem& p) {
  if (p.T == 0) return p.B;
  const int64_t side = isqrt(factor_tile_elems() / (4 * p.G));
  const int64_t bt = std::min(tile_samples(p, gram_load_work(p)), side / p.T);
  return std::max<int64_t>(1, std::min(bt, std::max(ceil_div(p.B, 8), ceil_div(256, p.T))));
}

// The Gram route: ‖Gᵢ‖² = S_ii, Gᵢ·Ḡ = Σ_k S_ik / B, ‖Ḡ‖² = Σ_ik S_ik / B². Only pairs of tiles
// k >= i are formed, and only S's diagonal and row sums are kept. `f64`: the GEMMs run in float64
// (x and δ are upcast exactly); in the accumulation dtype otherwise.
PerSampleParts gram_parts(const Problem& p, bool f64) {
  const at::TensorOptions o64 = f64_options(p);
  if (p.T == 0) return {at::zeros({p.B}, o64), at::zeros({p.B}, o64), at::zeros({}, o64)};
  const at::ScalarType gemm = f64 ? at::kDouble : p.acc;
  const int64_t bt = gram_tile_samples(p);
  // The centres: per-position means over the first tile (any centre is exact; one near every
  // sample keeps the float32 rounding small).
  at::Tensor x0 = p.x(0, bt).to(gemm), d0 = p.d(0, bt).to(gemm);
  const Centre cx = centre_of(x0, gemm), cd = centre_of(d0, gemm);
  // The tiles of both factors, centred: all made once when the whole batch fits the budget, each
  // made again for every pair otherwise. Out of place, as a tile may be a view of the caller's.
  using Tiles = std::pair<GramTile, GramTile>;
  auto make = [&](const at::Tensor& x, const at::Tensor& d) -> Tiles {
    return {gram_tile(x.to(gemm) - cx.c, cx), gram_tile(d.to(gemm) - cd.c, cd)};
  };
  std::vector<Tiles> all;
  if (tile_samples(p, gram_load_work(p)) >= p.B) {
    const at::Tensor x = bt == p.B ? x0 : p.x(0, p.B), d = bt == p.B ? d0 : p.d(0, p.B);
    for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
      const int64_t b = std::min(bt, p.B - i0);
      all.push_back(make(x.narrow(0, i0, b), d.narrow(0, i0, b)));
    }
  }
  x0 = d0 = at::Tensor();
  auto load = [&](int64_t i0, int64_t b) { return all.empty() ? make(p.x(i0, b), p.d(i0, b)) : all[i0 / bt]; };
  at::Tensor sq = at::empty({p.B}, o64), rows = at::zeros({p.B}, o64);
  for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
    const int64_t bi = std::min(bt, p.B - i0);
    const Tiles ti = load(i0, bi);
    const at::Tensor s = gram_block(p, cx, cd, ti.first, ti.second, ti.first, ti.second);
    sq.narrow(0, i0, bi).copy_(s.diagonal());
    rows.narrow(0, i0, bi).add_(s.sum(1));
    for (int64_t k0 = i0 + bi; k0 < p.B; k0 += bt) {
      const int64_t bk = std::min(bt, p.B - k0);
      const Tiles tk = load(k0, bk);
      const at::Tensor sk = gram_block(p, cx, cd, ti.first, ti.second, tk.first, tk.second);
      rows.narrow(0, i0, bi).add_(sk.sum(1));
      rows.narrow(0, k0, bk).add_(sk.sum(0));
    }
  }
  const double b = static_cast<double>(p.B);
  return {sq, rows.div(b), rows.sum().div_(b * b)};
}

// How much slower a float64 GEMM is than a float32 one on `device` (roughly): GPUs of compute
// capability 6.0, 7.0, 8.0, 9.0 and 10.0 (P100 to B200) run float64 at half rate or better, the
// others at 1/32 or 1/64.
double f64_gemm_penalty(const at::Device& device) {
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
    return prop->minor == 0 && prop->major >= 6 && prop->major <= 10 ? 2.0 : 64.0;
  }
#endif
  return 2.0;
}

// The Gram route's GEMMs of float32 inputs run in float64 when N is small: under this many
// flops, or at float64's speed still this many times cheaper than the Ḡ route.
constexpr double kSmallGramFlops = double(int64_t{1} << 24);
constexpr double kGram64Saving = 4.0;

struct Route {
  bool gram;      // the Gram route; the Ḡ route otherwise
  bool gram_f64;  // the Gram route's GEMMs in float64
  bool tiled;     // the Ḡ route's ‖Gᵢ‖² tiled rather than by the ghost norm
};

// A pass in float64 over the output of a GEMM (upcast, square or multiply, sum) takes about as long
// as this many flops of the GEMM, on a CPU as on a GPU: memory traffic against arithmetic.
constexpr double kPassFlops = 100.0;

// kAuto takes the route of least work: GEMM flops (float64 ones weighted by the device's float64
// penalty) and passes over their outputs (kPassFlops each element).
// - Ḡ route, ‖Gᵢ‖² tiled: the per-sample blocks (Σᵢ Gᵢ comes from them) and a pass over them,
//   then Gᵢ·Ḡ by one more GEMM of the layer's size, or two passes over the blocks where the whole
//   batch's fit the tile budget (gbar_parts keeps them);
// - Ḡ route, ghost norm: two T×T Grams per sample and a pass over them, Ḡ by its own GEMM and
//   Gᵢ·Ḡ by one more;
// - Gram route: the GEMMs of the pairs of tiles formed, alone: its float32 rounding is relative to
//   the samples' spread (see Centre), so it is taken where it is about as cheap, for precision
//   when the gradient noise is low.
// (The ghost norm needs 2T² per sample where a tile needs d_in·d_out: memory, not speed, which
// the tile budget bounds either way.)
// With weight_grad, the caller also wants Σᵢ Gᵢ (the layer's weight gradient, in place of the
// backward pass's own GEMM): the Ḡ routes form it on the way, the Gram route needs that GEMM more.
Route route_of(const Problem& p, FactorMethod m, bool weight_grad = false) {
  const double G = p.G, B = p.B, T = p.T, N = B * T, din = p.din, dout = p.dout, pass = kPassFlops;
  Route r{};
  const double layer_flops = 2 * G * N * din * dout;  // one GEMM of the layer's size
  const double blocks = G * B * din * dout;  // elements of the whole batch's per-sample gradients
  const double tiled_flops = layer_flops + pass * blocks + (keeps_blocks(p) ? 2 * pass * blocks : layer_flops);
  const double ghost_flops = 2 * G * B * T * T * (din + dout) + 2 * pass * G * B * T * T + 2 * layer_flops;
  r.tiled = m == FactorMethod::kAuto ? tiled_flops < ghost_flops : m == FactorMethod::kTiled;
  const double gbar_flops = r.tiled ? tiled_flops : ghost_flops;
  const double tiles = static_cast<double>(ceil_div(p.B, gram_tile_samples(p)));
  const double pairs = (tiles + 1) / (2 * tiles);
  const double gram_flops = 2 * G * N * N * (din + dout) * pairs;
  const double penalty = p.acc == at::kDouble ? 1.0 : f64_gemm_penalty(p.opts.device());
  r.gram_f64 = p.acc == at::kDouble || gram_flops <= kSmallGramFlops ||
               kGram64Saving * penalty * gram_flops <= gbar_flops;
  const double gram_cost = (r.gram_f64 ? penalty : 1.0) * gram_flops + (weight_grad ? layer_flops : 0.0);
  r.gram = m == FactorMethod::kGram || (m == FactorMethod::kAuto && gram_cost < gbar_flops);
  return r;
}

// With weight_grad given, Σᵢ Gᵢ [G, d_out, d_in] goes there where the route forms it (the Ḡ routes).
PerSampleParts weight_parts(const Problem& p, FactorMethod method, at::Tensor* weight_grad = nullptr) {
  const Route r = route_of(p, method, weight_grad != nullptr);
  return r.gram ? gram_parts(p, r.gram_f64) : gbar_parts(p, r.tiled, weight_grad);
}

// With weight_grad given, the layer's bias gradient Σᵢ bᵢ [G·d_out] float64 goes to *bias_grad
// too (from the per-sample bias gradients the parts need: no pass of its own over δ).
PerSampleParts parts_of(const Problem& p, FactorMethod method, at::Tensor* weight_grad = nullptr,
                        at::Tensor* bias_grad = nullptr) {
  check_batch_for_stats(p.op, p.B);
  PerSampleParts w = weight_parts(p, method, weight_grad);
  if (!p.bias_grads) return w;
  const at::Tensor rows = p.bias_grads(at::kDouble);  // [B, d_out] float64
  if (bias_grad != nullptr) *bias_grad = rows.sum(0);
  const PerSampleParts b = parts_of_rows(rows);
  return {w.sq_norms.add_(b.sq_norms), w.dots.add_(b.dots), w.mean_sq_norm.add_(b.mean_sq_norm)};
}

// ---------------------------------------------------------------------------------------------
// Histograms.

at::Tensor hist1d_of(const Problem& p, int64_t nbins, double maxval) {
  check_hist_axis(p.op, "nbins", nbins, "maxval", maxval);
  at::Tensor hist = at::zeros({nbins}, at::TensorOptions().dtype(at::kLong).device(p.opts.device()));
  if (p.T == 1 && p.opts.device().is_cpu() && p.B > 0) {
    // One position per sample: each per-sample gradient is an outer product, binned as it is formed.
    cpu_outer_product_hist1d(p.d(0, p.B).reshape({p.B * p.G, p.dout}), p.x(0, p.B).reshape({p.B * p.G, p.din}),
                             nbins, maxval, hist);
  } else {
    const int64_t bt = hist_tile_samples(p);
    for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
      const int64_t b = std::min(bt, p.B - i0);
      for_each_grad_block(
          p, i0, b, {}, {}, [&](int64_t, at::Tensor g) { hist.add_(grad_hist1d({g}, nbins, maxval)); },
          /*copies=*/1, hist_block_elems(p));
    }
  }
  if (p.bias_grads && p.B > 0) hist.add_(grad_hist1d({p.bias_grads(p.acc)}, nbins, maxval));
  return hist;
}

std::tuple<at::Tensor, at::Tensor> hist2d_of(const Problem& p, const at::Tensor& weight,
                                             const at::Tensor& bias, const Hist2dOptions& o) {
  check_hist_axis(p.op, "nbins_grad", o.nbins_grad, "maxval_grad", o.maxval_grad);
  check_hist_axis(p.op, "nbins_param", o.nbins_param, "maxval_param", o.maxval_param);
  TORCH_CHECK(o.nbins_grad * o.nbins_param <= cuda::kMaxHist2dBins, p.op,
              ": nbins_grad * nbins_param must be at most ", cuda::kMaxHist2dBins, ", got ",
              o.nbins_grad * o.nbins_param);
  const auto iopt = at::TensorOptions().dtype(at::kLong).device(p.opts.device());
  at::Tensor counts = at::zeros({o.nbins_grad, o.nbins_param}, iopt);
  at::Tensor nonfinite = at::zeros({}, iopt);
  auto add = [&](const at::Tensor& grads, const at::Tensor& params) {
    const Hist2d h = grad_hist2d(at::TensorList(grads), at::TensorList(params), o);
    counts.add_(h.counts);
    nonfinite.add_(h.nonfinite);
  };
  // Parameters upcast exactly to the dtype the gradients are formed in.
  const at::Tensor w = weight.to(p.acc).reshape({p.G, p.dout, p.din});
  if (p.T == 1 && p.opts.device().is_cpu() && p.B > 0) {
    // One position per sample: each per-sample gradient is an outer product, binned as it is formed.
    cpu_outer_product_hist2d(p.d(0, p.B).reshape({p.B * p.G, p.dout}), p.x(0, p.B).reshape({p.B * p.G, p.din}), w,
                             o, Hist2d{counts, nonfinite});
  } else {
    const int64_t bt = hist_tile_samples(p);
    for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
      const int64_t b = std::min(bt, p.B - i0);
      for_each_grad_block(
          p, i0, b, {}, {}, [&](int64_t o0, at::Tensor g) { add(g, w.narrow(1, o0, g.size(2))); },
          /*copies=*/1, hist_block_elems(p));
    }
  }
  if (p.bias_grads && p.B > 0) add(p.bias_grads(p.acc), bias.to(p.acc));
  return {counts, nonfinite};
}

// ---------------------------------------------------------------------------------------------
// Per-element moments (SPEC.md §6).

// sum [G, o, d_in] += Σ_b g, sq += Σ_b g², in float64, for a contiguous CPU block g [b, G, o, d_in]
// (each element widened once; no float64 copy of the block): a pass over the block while it is
// in cache, the accumulators a slice of columns per thread.
void cpu_add_moments(const at::Tensor& g, const at::Tensor& sum, const at::Tensor& sq) {
  TORCH_INTERNAL_ASSERT(g.is_contiguous() && sum.scalar_type() == at::kDouble && sq.scalar_type() == at::kDouble);
  const int64_t b = g.size(0), groups = g.size(1), w = g.size(2) * g.size(3);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "trainscope::cpu_add_moments", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    for (int64_t gi = 0; gi < groups; ++gi) {
      const at::Tensor s_g = sum.select(0, gi), q_g = sq.select(0, gi);  // [o, d_in], rows d_in apart
      TORCH_INTERNAL_ASSERT(s_g.is_contiguous() && q_g.is_contiguous());
      double* ds_g = s_g.data_ptr<double>();
      double* dq_g = q_g.data_ptr<double>();
      at::parallel_for(0, w, 4096, [&](int64_t lo, int64_t hi) {
        // Distinct arrays (restrict): the loop vectorises.
        double* __restrict__ ds = ds_g;
        double* __restrict__ dq = dq_g;
        for (int64_t i = 0; i < b; ++i) {
          const scalar_t* __restrict__ row = src + (i * groups + gi) * w;
          for (int64_t j = lo; j < hi; ++j) {
            const double v = static_cast<double>(row[j]);
            ds[j] += v;
            dq[j] += v * v;
          }
        }
      });
    }
  });
}

// On a CPU, Σᵢ Gᵢ and Σᵢ Gᵢ² are added a slice of rows at a time over every sample of a tile (rows
// outermost): the accumulators' slice and each block stay in the core's cache. Sample-major order
// streams both float64 accumulators, four times the layer's float32 size, through memory once per
// sample, which costs more than the GEMMs where a sample has few positions.
constexpr int64_t kCpuMomentSliceElems = int64_t{1} << 15;  // accumulator elements per slice
constexpr int64_t kCpuMomentBlockElems = int64_t{1} << 18;  // per-sample gradient elements per block

void cpu_moments_by_rows(const Problem& p, const at::Tensor& sum, const at::Tensor& sq) {
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(p.dout, kCpuMomentSliceElems / std::max<int64_t>(1, p.G * p.din)));
  const int64_t bs = std::max<int64_t>(1, kCpuMomentBlockElems / std::max<int64_t>(1, p.G * rows * p.din));
  const int64_t bt = tile_samples(p, 0);  // the factors of a tile of samples, loaded once
  at::Tensor buf;
  for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
    const int64_t b = std::min(bt, p.B - i0), bi = std::min(bs, b);
    const at::Tensor X = flat_batch(p.x(i0, b)), D = flat_batch(p.d(i0, b)).transpose(1, 2);  // [bG, T, d_in], [bG, d_out, T]
    if (!buf.defined()) buf = at::empty({bi * p.G * rows * p.din}, X.options());
    for (int64_t o0 = 0; o0 < p.dout; o0 += rows) {
      const int64_t o = std::min(rows, p.dout - o0);
      for (int64_t s0 = 0; s0 < b; s0 += bi) {
        const int64_t c = std::min(bi, b - s0);
        at::Tensor g = buf.narrow(0, 0, c * p.G * o * p.din).view({c * p.G, o, p.din});
        at::bmm_out(g, D.narrow(0, s0 * p.G, c * p.G).narrow(1, o0, o), X.narrow(0, s0 * p.G, c * p.G));
        cpu_add_moments(g.view({c, p.G, o, p.din}), sum.narrow(1, o0, o), sq.narrow(1, o0, o));
      }
    }
  }
}

PerSampleMoments moments_of(const Problem& p) {
  const auto o64 = p.opts.dtype(at::kDouble);
  at::Tensor sum = at::zeros({p.G, p.dout, p.din}, o64), sq = at::zeros({p.G, p.dout, p.din}, o64);
  if (p.T == 1 && p.B > 0) {  // one position per sample: two GEMMs of the factors, per group
    const at::Tensor x = p.x(0, p.B).to(at::kDouble).reshape({p.B, p.G, p.din}).transpose(0, 1);   // [G, B, d_in]
    const at::Tensor d = p.d(0, p.B).to(at::kDouble).reshape({p.B, p.G, p.dout}).permute({1, 2, 0});  // [G, d_out, B]
    sum = at::bmm(d, x);
    sq = at::bmm(d.square(), x.square());
  } else if (p.opts.device().is_cpu() && !p.grad_block) {
    cpu_moments_by_rows(p, sum, sq);
  } else {
    const int64_t bt = hist_tile_samples(p);
    for (int64_t i0 = 0; i0 < p.B; i0 += bt) {
      const int64_t b = std::min(bt, p.B - i0);
      for_each_grad_block(
          p, i0, b, {}, {},
          [&](int64_t o0, at::Tensor g) {  // [b, G, o, d_in]
            if (g.is_cpu()) {
              cpu_add_moments(g, sum.narrow(1, o0, g.size(2)), sq.narrow(1, o0, g.size(2)));
              return;
            }
            const at::Tensor g64 = g.to(at::kDouble);
            sum.narrow(1, o0, g.size(2)).add_(g64.sum(0));
            sq.narrow(1, o0, g.size(2)).add_(g64.square().sum(0));
          },
          /*copies=*/3, hist_block_elems(p));
    }
  }
  PerSampleMoments m{sum.reshape({p.G * p.dout, p.din}), sq.reshape({p.G * p.dout, p.din}), {}, {}};
  if (p.bias_grads) {
    const at::Tensor bg = p.B > 0 ? p.bias_grads(at::kDouble) : at::zeros({0, p.G * p.dout}, o64);
    m.bias_sum = bg.sum(0);
    m.bias_sq_sum = bg.square().sum(0);
  }
  return m;
}

// out [B] += the per-sample bias gradients · bias_dir (when given and the layer has a tracked bias).
void add_bias_projections(const Problem& p, const at::Tensor& bias_dir, at::Tensor& out) {
  if (bias_dir.defined() && p.bias_grads && p.B > 0) {
    out.add_(at::mv(p.bias_grads(at::kDouble), bias_dir.detach().to(p.opts.device(), at::kDouble).reshape({-1})));
  }
}

// Gᵢ·D [B] float64 for D given as weight_dir [G·d_out, d_in] (any shape of that many elements)
// and bias_dir [G·d_out] or undefined: Σ_t δ_itᵀ D x_it per group, by the layer's own operation
// where the problem has one (weight_dots), else in tiles of samples.
at::Tensor projections_of(const Problem& p, const at::Tensor& weight_dir, const at::Tensor& bias_dir) {
  const at::Tensor w = weight_dir.detach().to(p.opts.device(), p.acc).reshape({p.G, p.dout, p.din});
  at::Tensor out = p.weight_dots && p.B > 0 ? p.weight_dots(w) : weight_dots_by_rows(p, w);
  add_bias_projections(p, bias_dir, out);
  return out;
}

void check_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                 at::IntArrayRef expected) {
  check_tensor(op, name, t);
  check_same_device(op, name, t, input);
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), " but the layer's ",
              name, " is ", expected);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points: every use of a layer (one use: the single-tensor overloads).

PerSampleParts linear_per_sample_parts(at::TensorList input, at::TensorList grad_output, bool has_bias,
                                       FactorMethod method) {
  const char* op = "trainscope::linear_per_sample_parts";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  return parts_of(linear_uses(op, input, grad_output, has_bias), method);
}

PerSampleParts linear_per_sample_parts(const at::Tensor& input, const at::Tensor& grad_output,
                                       bool has_bias, FactorMethod method) {
  return linear_per_sample_parts(at::TensorList(input), at::TensorList(grad_output), has_bias, method);
}

PerSampleParts conv2d_per_sample_parts(at::TensorList input, at::TensorList grad_output,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool has_bias, FactorMethod method) {
  const char* op = "trainscope::conv2d_per_sample_parts";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  const ConvGeometry g = conv_geometry(op, kernel_size, stride, padding, dilation, groups);
  return parts_of(conv2d_uses(op, input, grad_output, g, has_bias), method);
}

PerSampleParts conv2d_per_sample_parts(const at::Tensor& input, const at::Tensor& grad_output,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool has_bias, FactorMethod method) {
  return conv2d_per_sample_parts(at::TensorList(input), at::TensorList(grad_output), kernel_size, stride,
                                 padding, dilation, groups, has_bias, method);
}

PerSamplePartsAndWeightGrad linear_per_sample_parts_and_weight_grad(const at::Tensor& input,
                                                                    const at::Tensor& grad_output, bool has_bias,
                                                                    FactorMethod method) {
  const char* op = "trainscope::linear_per_sample_parts_and_weight_grad";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  PerSamplePartsAndWeightGrad out;
  out.parts = parts_of(linear_uses(op, at::TensorList(input), at::TensorList(grad_output), has_bias), method,
                       &out.weight_grad, &out.bias_grad);
  const int64_t din = input.size(-1), dout = grad_output.size(-1);
  if (out.weight_grad.defined()) {
    out.weight_grad = out.weight_grad.view({dout, din});
  } else {  // the Gram route: the backward pass's own GEMM
    const at::ScalarType acc = acc_dtype(input, grad_output);
    out.weight_grad = at::mm(grad_output.reshape({-1, dout}).to(acc).t(), input.reshape({-1, din}).to(acc));
  }
  return out;
}

PerSamplePartsAndWeightGrad conv2d_per_sample_parts_and_weight_grad(
    const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool has_bias, FactorMethod method) {
  const char* op = "trainscope::conv2d_per_sample_parts_and_weight_grad";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  const ConvGeometry g = conv_geometry(op, kernel_size, stride, padding, dilation, groups);
  PerSamplePartsAndWeightGrad out;
  out.parts = parts_of(conv2d_uses(op, at::TensorList(input), at::TensorList(grad_output), g, has_bias), method,
                       &out.weight_grad, &out.bias_grad);
  const std::vector<int64_t> shape{grad_output.size(1), input.size(1) / g.groups, g.kernel[0], g.kernel[1]};
  if (out.weight_grad.defined()) {  // [G, C_out/G, C_in/G·kh·kw]: the weight's layout (see conv2d_problem)
    out.weight_grad = out.weight_grad.view(shape);
  } else {  // the Gram route: the backward pass's own weight gradient
    out.weight_grad = conv2d_weight_grad(input, grad_output, g, acc_dtype(input, grad_output));
  }
  return out;
}

at::Tensor linear_per_sample_grad_hist1d(at::TensorList input, at::TensorList grad_output, bool has_bias,
                                         int64_t nbins, double maxval) {
  const char* op = "trainscope::linear_per_sample_grad_hist1d";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  check_hist_axis(op, "nbins", nbins, "maxval", maxval);
  return hist1d_of(linear_uses(op, input, grad_output, has_bias), nbins, maxval);
}

at::Tensor linear_per_sample_grad_hist1d(const at::Tensor& input, const at::Tensor& grad_output,
                                         bool has_bias, int64_t nbins, double maxval) {
  return linear_per_sample_grad_hist1d(at::TensorList(input), at::TensorList(grad_output), has_bias, nbins,
                                       maxval);
}

at::Tensor conv2d_per_sample_grad_hist1d(at::TensorList input, at::TensorList grad_output,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, bool has_bias, int64_t nbins, double maxval) {
  const char* op = "trainscope::conv2d_per_sample_grad_hist1d";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  check_hist_axis(op, "nbins", nbins, "maxval", maxval);
  const ConvGeometry g = conv_geometry(op, kernel_size, stride, padding, dilation, groups);
  return hist1d_of(conv2d_uses(op, input, grad_output, g, has_bias), nbins, maxval);
}

at::Tensor linear_per_sample_projections(at::TensorList input, at::TensorList grad_output,
                                         const at::Tensor& weight_dir, const at::Tensor& bias_dir) {
  const char* op = "trainscope::linear_per_sample_projections";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  const Problem p = linear_uses(op, input, grad_output, bias_dir.defined());
  TORCH_CHECK(weight_dir.defined() && weight_dir.numel() == p.dout * p.din, op, ": weight_dir must have ",
              p.dout, "·", p.din, " elements (the weight's shape), got ",
              weight_dir.defined() ? c10::str(weight_dir.sizes()) : std::string("undefined"));
  TORCH_CHECK(!bias_dir.defined() || bias_dir.numel() == p.dout, op, ": bias_dir must have ", p.dout,
              " elements, got ", bias_dir.sizes());
  return projections_of(p, weight_dir, bias_dir);
}

at::Tensor conv2d_per_sample_projections(at::TensorList input, at::TensorList grad_output,
                                         const at::Tensor& weight_dir, const at::Tensor& bias_dir,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups) {
  const char* op = "trainscope::conv2d_per_sample_projections";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  TORCH_CHECK(weight_dir.defined() && weight_dir.dim() == 4, op,
              ": weight_dir must be [C_out, C_in/groups, kh, kw], got ",
              weight_dir.defined() ? c10::str(weight_dir.sizes()) : std::string("undefined"));
  const ConvGeometry g = conv_geometry(op, {weight_dir.size(2), weight_dir.size(3)}, stride, padding, dilation, groups);
  const Problem p = conv2d_uses(op, input, grad_output, g, bias_dir.defined());
  TORCH_CHECK(weight_dir.numel() == p.G * p.dout * p.din, op, ": weight_dir has shape ", weight_dir.sizes(),
              " but the layer's weight has ", p.G * p.dout * p.din, " elements");
  TORCH_CHECK(!bias_dir.defined() || bias_dir.numel() == p.G * p.dout, op, ": bias_dir must have ", p.G * p.dout,
              " elements, got ", bias_dir.sizes());
  return projections_of(p, weight_dir, bias_dir);
}

PerSampleMoments linear_per_sample_grad_moments(at::TensorList input, at::TensorList grad_output, bool has_bias) {
  const char* op = "trainscope::linear_per_sample_grad_moments";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  return moments_of(linear_uses(op, input, grad_output, has_bias));
}

PerSampleMoments conv2d_per_sample_grad_moments(at::TensorList input, at::TensorList grad_output,
                                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                int64_t groups, bool has_bias) {
  const char* op = "trainscope::conv2d_per_sample_grad_moments";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  const ConvGeometry g = conv_geometry(op, kernel_size, stride, padding, dilation, groups);
  return moments_of(conv2d_uses(op, input, grad_output, g, has_bias));
}

at::Tensor conv2d_per_sample_grad_hist1d(const at::Tensor& input, const at::Tensor& grad_output,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, bool has_bias, int64_t nbins, double maxval) {
  return conv2d_per_sample_grad_hist1d(at::TensorList(input), at::TensorList(grad_output), kernel_size, stride,
                                       padding, dilation, groups, has_bias, nbins, maxval);
}

std::tuple<at::Tensor, at::Tensor> linear_per_sample_grad_hist2d(at::TensorList input,
                                                                 at::TensorList grad_output,
                                                                 const at::Tensor& weight,
                                                                 const at::Tensor& bias,
                                                                 const Hist2dOptions& options) {
  const char* op = "trainscope::linear_per_sample_grad_hist2d";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  const Problem p = linear_uses(op, input, grad_output, bias.defined());
  check_param(op, "weight", weight, input[0], {p.dout, p.din});
  if (bias.defined()) check_param(op, "bias", bias, input[0], {p.dout});
  return hist2d_of(p, weight, bias, options);
}

std::tuple<at::Tensor, at::Tensor> linear_per_sample_grad_hist2d(const at::Tensor& input,
                                                                 const at::Tensor& grad_output,
                                                                 const at::Tensor& weight,
                                                                 const at::Tensor& bias,
                                                                 const Hist2dOptions& options) {
  return linear_per_sample_grad_hist2d(at::TensorList(input), at::TensorList(grad_output), weight, bias, options);
}

std::tuple<at::Tensor, at::Tensor> conv2d_per_sample_grad_hist2d(
    at::TensorList input, at::TensorList grad_output, const at::Tensor& weight, const at::Tensor& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const Hist2dOptions& options) {
  const char* op = "trainscope::conv2d_per_sample_grad_hist2d";
  NvtxRange range{op};
  c10::NoGradGuard no_grad;
  check_tensor(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be [C_out, C_in/groups, kh, kw], got shape ",
              weight.sizes());
  const ConvGeometry g =
      conv_geometry(op, weight.sizes().slice(2), stride, padding, dilation, groups);
  const Problem p = conv2d_uses(op, input, grad_output, g, bias.defined());
  check_param(op, "weight", weight, input[0],
              {p.G * p.dout, input[0].size(1) / p.G, g.kernel[0], g.kernel[1]});
  if (bias.defined()) check_param(op, "bias", bias, input[0], {p.G * p.dout});
  return hist2d_of(p, weight, bias, options);
}

std::tuple<at::Tensor, at::Tensor> conv2d_per_sample_grad_hist2d(
    const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& weight,
    const at::Tensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const Hist2dOptions& options) {
  return conv2d_per_sample_grad_hist2d(at::TensorList(input), at::TensorList(grad_output), weight, bias, stride,
                                       padding, dilation, groups, options);
}

// ---------------------------------------------------------------------------------------------
// OutputGradCapture

struct OutputGradCapture::State {
  std::mutex mutex;  // backward may run on another thread (CUDA autograd worker)
  at::Tensor grad;
  uint64_t generation = 0;
};

OutputGradCapture::OutputGradCapture() : state_(std::make_shared<State>()) {}

at::Tensor OutputGradCapture::watch(const at::Tensor& output) {
  TORCH_CHECK(output.defined(), "trainscope::OutputGradCapture::watch: output is an undefined tensor");
  check_device("trainscope::OutputGradCapture::watch", "output", output.device());
  TORCH_CHECK(output.requires_grad(), "trainscope::OutputGradCapture::watch: output does not require "
              "grad, so backward will never reach it (is grad mode off?)");
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->grad = at::Tensor();
    generation = ++state_->generation;
  }
  // A hook of an earlier watch() must not overwrite a later capture; a weak reference lets the
  // capture die before the graph does.
  std::weak_ptr<State> weak = state_;
  // A hook on a view (at::linear of a 3-D input returns one) misses the gradient that reaches it
  // through a later in-place change of the view, which autograd routes to the view's base: hook
  // the base then, and read the view's elements out of the base's gradient.
  at::Tensor target = output;
  bool from_base = false;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0;
  if (output.is_view()) {
    const at::Tensor base(output._base());
    if (base.is_contiguous() && base.requires_grad()) {
      target = base;
      from_base = true;
      sizes = output.sizes().vec();
      strides = output.strides().vec();
      offset = output.storage_offset() - base.storage_offset();
    }
  }
  target.register_hook([weak, generation, from_base, sizes, strides, offset](const at::Tensor& grad) {
    auto s = weak.lock();
    if (!s || !grad.defined()) return;
    at::Tensor g = from_base ? grad.contiguous().as_strided(sizes, strides, offset) : grad;
    std::lock_guard<std::mutex> lock(s->mutex);
    // Backward may reach the watched value more than once (backward calls through a retained
    // graph): its gradient adds up, as a parameter's .grad does.
    if (s->generation == generation) s->grad = s->grad.defined() ? s->grad + g.detach() : g.detach();
  });
  return output;
}

bool OutputGradCapture::has_grad() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->grad.defined();
}

at::Tensor OutputGradCapture::grad() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  TORCH_CHECK(state_->grad.defined(), "trainscope::OutputGradCapture::grad: no gradient captured yet; "
              "call watch(output) in the forward pass and run backward first");
  return state_->grad;
}

void OutputGradCapture::reset() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->grad = at::Tensor();
  ++state_->generation;
}

}  // namespace trainscope
