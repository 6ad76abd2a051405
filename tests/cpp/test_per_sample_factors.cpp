// The LibTorch API of include/trainscope/per_sample_factors.h against a reference built from
// explicit per-sample gradients: one autograd backward per sample through at::linear / at::conv2d
// in double (SPEC.md §2, §4, §5). The Ḡ route (ghost, tiled) and the Gram route, a small tile
// budget that forces every tiling path, float64 parts from every dtype, non-contiguous inputs,
// conv groups/stride/dilation, histograms, a layer used several times in one step (the list
// overloads: the per-sample gradient summed over the uses), OutputGradCapture, and the errors bad
// input must raise. CUDA variants skip without a GPU.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>



#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "src/per_sample_factors_internal.h"
#include "tests/cpp/reference_bin.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/param_stats.h"
#include "trainscope/per_sample_factors.h"

namespace {

using trainscope::FactorMethod;
using trainscope::PerSampleParts;
using trainscope::PerSamplePartsAndWeightGrad;

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

at::Tensor cpu64(const at::Tensor& t) { return t.detach().to(at::kCPU).to(at::kDouble); }

// Per-sample gradients [B, P] (weight, then bias) of the loss Σᵢ Σ(layer(xᵢ) ∘ δᵢ), whose output
// gradient is δ, one backward per sample, in double.
using Layer = std::function<at::Tensor(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b)>;

at::Tensor reference_grads(const Layer& layer, const at::Tensor& x, const at::Tensor& d,
                           at::IntArrayRef weight_shape, bool has_bias) {
  const at::Tensor x64 = cpu64(x), d64 = cpu64(d);
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < x64.size(0); ++i) {
    at::Tensor w = at::randn(weight_shape, kF64).requires_grad_();
    at::Tensor b = has_bias ? at::randn({weight_shape[0]}, kF64).requires_grad_() : at::Tensor();
    const at::Tensor y = layer(x64.narrow(0, i, 1), w, b);
    (y * d64.narrow(0, i, 1)).sum().backward();
    std::vector<at::Tensor> g{w.grad().flatten()};
    if (has_bias) g.push_back(b.grad());
    rows.push_back(at::cat(g));
  }
  return at::stack(rows);
}

struct Parts64 {
  at::Tensor sq, dots, msq;
};

Parts64 reference_parts(const at::Tensor& g) {
  const at::Tensor mean = g.mean(0);
  return {(g * g).sum(1), at::mv(g, mean), mean.dot(mean)};
}

void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol, const std::string& what) {
  const at::Tensor g = cpu64(got), w = cpu64(want);
  ASSERT_EQ(g.sizes(), w.sizes()) << what;
  const double scale = w.abs().max().item<double>();
  const double err = (g - w).abs().max().item<double>();
  EXPECT_LE(err, rtol * scale + 1e-300) << what << ": got " << g << " want " << w;
}

void expect_parts(const PerSampleParts& got, const Parts64& want, double rtol, const std::string& what,
                  at::ScalarType dtype) {
  for (const at::Tensor* t : {&got.sq_norms, &got.dots, &got.mean_sq_norm}) {
    EXPECT_EQ(t->scalar_type(), dtype) << what;
    EXPECT_FALSE(t->requires_grad()) << what;
  }
  expect_close(got.sq_norms, want.sq, rtol, what + " sq_norms");
  // gᵢ·ḡ may be near zero for some i: compare against the scale of ‖ḡ‖·max‖gᵢ‖.
  const double scale = std::sqrt(cpu64(want.msq).item<double>() * cpu64(want.sq).max().item<double>());
  const double err = (cpu64(got.dots) - want.dots).abs().max().item<double>();
  EXPECT_LE(err, rtol * scale) << what << " dots: got " << got.dots << " want " << want.dots;
  expect_close(got.mean_sq_norm, want.msq, rtol, what + " mean_sq_norm");
}

double tolerance(at::ScalarType t) { return t == at::kDouble ? 1e-11 : 2e-5; }

const FactorMethod kAllMethods[] = {FactorMethod::kAuto, FactorMethod::kGhost, FactorMethod::kTiled,
                                    FactorMethod::kGram};
const FactorMethod kForcedMethods[] = {FactorMethod::kGhost, FactorMethod::kTiled, FactorMethod::kGram};

at::Tensor randn(at::IntArrayRef shape, at::Generator& gen, at::ScalarType dtype, at::Device device) {
  return at::randn(shape, gen, kF64).to(at::TensorOptions().dtype(dtype).device(device));
}

Layer linear_layer() {
  return [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) { return at::linear(x, w, b); };
}

Layer conv_layer(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  std::vector<int64_t> s(stride.begin(), stride.end()), p(padding.begin(), padding.end()),
      d(dilation.begin(), dilation.end());
  return [=](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    return at::conv2d(x, w, b, s, p, d, groups);
  };
}

// Restores the default tile budget when a test ends.
struct TileBudget {
  explicit TileBudget(int64_t elems) { trainscope::set_factor_tile_elems(elems); }
  ~TileBudget() { trainscope::set_factor_tile_elems(0); }
};

// ---------------------------------------------------------------------------------------------
// Parameterised over device and dtype.

struct Config {
  bool cuda;
  at::ScalarType dtype;
};

std::string config_name(const testing::TestParamInfo<Config>& info) {
  return std::string(info.param.cuda ? "cuda_" : "cpu_") + c10::toString(info.param.dtype);
}

class PerSampleFactorsApiTest : public testing::TestWithParam<Config> {
 protected:
  void SetUp() override {
    if (GetParam().cuda && !(trainscope::built_with_cuda() && torch::cuda::is_available())) {
      GTEST_SKIP() << "no CUDA device, or trainscope built without CUDA";
    }
  }
  at::Device device() const { return GetParam().cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU); }
  at::ScalarType dtype() const { return GetParam().dtype; }
};

TEST_P(PerSampleFactorsApiTest, LinearAllShapesAndMethods) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  struct Case {
    std::vector<int64_t> lead;  // [B, ...]
    int64_t din, dout;
    bool bias;
  };
  const std::vector<Case> cases = {{{6}, 5, 4, true}, {{3, 7}, 4, 3, true}, {{4, 2, 3}, 6, 2, false},
                                   {{2, 1}, 3, 3, true}, {{5, 9}, 2, 2, true}};
  for (const Case& c : cases) {
    std::vector<int64_t> xs = c.lead, ds = c.lead;
    xs.push_back(c.din);
    ds.push_back(c.dout);
    const at::Tensor x = randn(xs, gen, dtype(), device()), d = randn(ds, gen, dtype(), device());
    const Parts64 want = reference_parts(reference_grads(linear_layer(), x, d, {c.dout, c.din}, c.bias));
    for (FactorMethod m : kAllMethods) {
      const std::string what = std::string("linear ") + c10::str(at::IntArrayRef(xs)) + " " +
                               trainscope::factor_method_name(m);
      const PerSampleParts got = trainscope::linear_per_sample_parts(x, d, c.bias, m);
      EXPECT_EQ(got.sq_norms.device(), device());
      expect_parts(got, want, tolerance(dtype()), what, at::kDouble);
    }
  }
}

TEST_P(PerSampleFactorsApiTest, Conv2dGeometries) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(12);
  struct Case {
    int64_t cin, cout, h, w, k0, k1;
    std::vector<int64_t> stride, padding, dilation;
    int64_t groups;
    bool bias;
  };
  const std::vector<Case> cases = {
      {3, 4, 6, 5, 3, 3, {1}, {1}, {1}, 1, true},
      {4, 6, 7, 7, 3, 2, {2, 1}, {1, 0}, {1, 1}, 2, true},
      {2, 3, 8, 6, 2, 2, {1}, {0}, {2}, 1, false},
      {4, 4, 5, 5, 3, 3, {2}, {2}, {1}, 4, true},  // depthwise
      {3, 2, 4, 4, 1, 1, {1}, {0}, {1}, 1, true},  // 1×1: T = 16 > d_in·d_out / 2, auto tiles
  };
  const int64_t B = 3;
  for (const Case& c : cases) {
    const at::Tensor x = randn({B, c.cin, c.h, c.w}, gen, dtype(), device());
    const Layer layer = conv_layer(c.stride, c.padding, c.dilation, c.groups);
    const std::vector<int64_t> wshape{c.cout, c.cin / c.groups, c.k0, c.k1};
    const at::Tensor out_shape_probe =
        layer(at::zeros({1, c.cin, c.h, c.w}, kF64), at::zeros(wshape, kF64), at::Tensor());
    const at::Tensor d = randn({B, c.cout, out_shape_probe.size(2), out_shape_probe.size(3)}, gen, dtype(), device());
    const Parts64 want = reference_parts(reference_grads(layer, x, d, wshape, c.bias));
    for (FactorMethod m : kAllMethods) {
      const std::string what = "conv cin=" + std::to_string(c.cin) + " groups=" + std::to_string(c.groups) +
                               " " + trainscope::factor_method_name(m);
      const PerSampleParts got = trainscope::conv2d_per_sample_parts(
          x, d, {c.k0, c.k1}, c.stride, c.padding, c.dilation, c.groups, c.bias, m);
      expect_parts(got, want, tolerance(dtype()), what, at::kDouble);
    }
  }
}

// The parts with the layer's weight gradient (what a fused backward pass takes): the parts of
// every route, and Σᵢ Gᵢ shaped as the weight, against the per-sample reference summed; with the
// default tile budget (the whole batch's blocks kept) and one of a few rows (blocks of rows),
// under which the blocks are kept where they are no larger than x and δ (T = 3, 7×6 images) and
// not kept where they are larger (T = 1, 3×3 images: a second pass for Gᵢ·Ḡ).
TEST_P(PerSampleFactorsApiTest, PartsWithTheWeightGradient) {
  for (const auto& [T, H, W] : {std::tuple<int64_t, int64_t, int64_t>{3, 7, 6}, {1, 3, 3}}) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(15);
    const at::Tensor x = randn({4, T, 5}, gen, dtype(), device()), d = randn({4, T, 6}, gen, dtype(), device());
    const at::Tensor g_lin = reference_grads(linear_layer(), x, d, {6, 5}, true);
    const at::Tensor xc = randn({3, 4, H, W}, gen, dtype(), device());
    const Layer conv = conv_layer({2, 1}, {1, 0}, {1, 1}, 2);
    const at::Tensor dc = randn({3, 6, (H - 1) / 2 + 1, W - 2}, gen, dtype(), device());
    const at::Tensor g_conv = reference_grads(conv, xc, dc, {6, 2, 3, 3}, false);
    for (const int64_t budget : {int64_t{0}, int64_t{40}}) {
      const TileBudget tiles(budget);
      for (FactorMethod m : kAllMethods) {
        const std::string what = std::string(trainscope::factor_method_name(m)) + " budget " + std::to_string(budget);
        const PerSamplePartsAndWeightGrad lin = trainscope::linear_per_sample_parts_and_weight_grad(x, d, true, m);
        expect_parts(lin.parts, reference_parts(g_lin), tolerance(dtype()), "linear " + what, at::kDouble);
        ASSERT_EQ(lin.weight_grad.sizes(), (std::vector<int64_t>{6, 5}));
        EXPECT_EQ(lin.weight_grad.device(), device());
        expect_close(lin.weight_grad.flatten(), g_lin.narrow(1, 0, 30).sum(0), tolerance(dtype()),
                     "linear Ḡ " + what);
        ASSERT_TRUE(lin.bias_grad.defined());
        EXPECT_EQ(lin.bias_grad.scalar_type(), at::kDouble);
        expect_close(lin.bias_grad, g_lin.narrow(1, 30, 6).sum(0), tolerance(dtype()), "linear bias " + what);
        const PerSamplePartsAndWeightGrad cv = trainscope::conv2d_per_sample_parts_and_weight_grad(
            xc, dc, {3, 3}, {2, 1}, {1, 0}, {1, 1}, 2, false, m);
        expect_parts(cv.parts, reference_parts(g_conv), tolerance(dtype()), "conv " + what, at::kDouble);
        ASSERT_EQ(cv.weight_grad.sizes(), (std::vector<int64_t>{6, 2, 3, 3}));
        expect_close(cv.weight_grad.flatten(), g_conv.sum(0), tolerance(dtype()), "conv Ḡ " + what);
        EXPECT_FALSE(cv.bias_grad.defined());  // no bias
      }
    }
  }
}

TEST_P(PerSampleFactorsApiTest, SmallTileBudgetTakesEveryTilingPath) {
  // 64 elements: tiles of one sample, Gram matrices and weight gradients in blocks of rows.
  const TileBudget budget(64);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(13);
  const at::Tensor x = randn({5, 9, 7}, gen, dtype(), device()), d = randn({5, 9, 6}, gen, dtype(), device());
  const Parts64 want = reference_parts(reference_grads(linear_layer(), x, d, {6, 7}, true));
  for (FactorMethod m : kForcedMethods) {
    expect_parts(trainscope::linear_per_sample_parts(x, d, true, m), want, tolerance(dtype()),
                 std::string("linear tiny budget ") + trainscope::factor_method_name(m), at::kDouble);
  }
  // Two positions: the blocks (5 × 42) are larger than x and δ (5 × 2 × 13), so not kept either.
  const at::Tensor x2 = randn({5, 2, 7}, gen, dtype(), device()), d2 = randn({5, 2, 6}, gen, dtype(), device());
  const Parts64 want2 = reference_parts(reference_grads(linear_layer(), x2, d2, {6, 7}, true));
  for (FactorMethod m : kForcedMethods) {
    expect_parts(trainscope::linear_per_sample_parts(x2, d2, true, m), want2, tolerance(dtype()),
                 std::string("linear tiny budget, T = 2 ") + trainscope::factor_method_name(m), at::kDouble);
  }
  const at::Tensor xc = randn({4, 4, 6, 6}, gen, dtype(), device()), dc = randn({4, 6, 3, 3}, gen, dtype(), device());
  const Parts64 wc =
      reference_parts(reference_grads(conv_layer({2}, {1}, {1}, 2), xc, dc, {6, 2, 3, 3}, true));
  for (FactorMethod m : kForcedMethods) {
    expect_parts(trainscope::conv2d_per_sample_parts(xc, dc, {3}, {2}, {1}, {1}, 2, true, m), wc,
                 tolerance(dtype()), std::string("conv tiny budget ") + trainscope::factor_method_name(m),
                 at::kDouble);
  }
}

TEST_P(PerSampleFactorsApiTest, NonContiguousInputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(14);
  const at::Tensor x = randn({5, 6, 4}, gen, dtype(), device()).transpose(0, 1);  // [6, 5, 4]
  const at::Tensor d = randn({3, 5, 6}, gen, dtype(), device()).permute({2, 1, 0});  // [6, 5, 3]
  ASSERT_FALSE(x.is_contiguous());
  const Parts64 want = reference_parts(reference_grads(linear_layer(), x, d, {3, 4}, true));
  expect_parts(trainscope::linear_per_sample_parts(x, d, true), want, tolerance(dtype()), "linear strided",
               at::kDouble);
  const at::Tensor xc = randn({3, 5, 5, 2}, gen, dtype(), device()).permute({0, 3, 1, 2});  // channels last
  const at::Tensor dc = randn({3, 5, 5, 4}, gen, dtype(), device()).permute({0, 3, 1, 2});
  const Parts64 wc = reference_parts(reference_grads(conv_layer({1}, {1}, {1}, 1), xc, dc, {4, 2, 3, 3}, true));
  expect_parts(trainscope::conv2d_per_sample_parts(xc, dc, {3}, {1}, {1}, {1}, 1, true), wc,
               tolerance(dtype()), "conv channels_last", at::kDouble);
}

// Histograms of double inputs match the reference exactly (a value computed in float32 may fall
// on the other side of a bin edge than its float64 reference, so float32 is checked by totals).
TEST_P(PerSampleFactorsApiTest, Hist1d) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(15);
  const TileBudget budget(100);  // several tiles and row blocks
  const int64_t nbins = 37;
  const double maxval = 1.5;
  const at::Tensor x = randn({4, 3, 5}, gen, dtype(), device()), d = 0.3 * randn({4, 3, 6}, gen, dtype(), device());
  const at::Tensor g = reference_grads(linear_layer(), x, d, {6, 5}, true);
  const at::Tensor xc = randn({3, 2, 5, 5}, gen, dtype(), device()), dc = 0.3 * randn({3, 4, 3, 3}, gen, dtype(), device());
  const at::Tensor gc = reference_grads(conv_layer({2}, {1}, {1}, 2), xc, dc, {4, 1, 3, 3}, true);
  const at::Tensor h = trainscope::linear_per_sample_grad_hist1d(x, d, true, nbins, maxval);
  const at::Tensor hc = trainscope::conv2d_per_sample_grad_hist1d(xc, dc, {3}, {2}, {1}, {1}, 2, true, nbins, maxval);
  for (const auto& [got, ref] : {std::pair<at::Tensor, at::Tensor>{h, g}, {hc, gc}}) {
    ASSERT_EQ(got.scalar_type(), at::kLong);
    ASSERT_EQ(got.device(), device());
    const at::Tensor flat = ref.flatten();
    std::vector<int64_t> want(nbins, 0);
    for (int64_t i = 0; i < flat.numel(); ++i) ++want[reference_bin(flat[i].item<double>(), nbins, maxval)];
    const at::Tensor got_cpu = got.cpu();
    EXPECT_EQ(got_cpu.sum().item<int64_t>(), flat.numel());
    int64_t l1 = 0;
    for (int64_t b = 0; b < nbins; ++b) l1 += std::abs(got_cpu[b].item<int64_t>() - want[b]);
    EXPECT_LE(l1, dtype() == at::kDouble ? 0 : 4) << got_cpu;
  }
}

// Σᵢ Gᵢ and Σᵢ Gᵢ² against per-sample gradients formed by hand: a Linear on [B, d_in] (the
// GEMM route), a Linear over positions and used twice, a grouped convolution under a tile budget
// that forms the gradients in blocks, and a layer without bias.
TEST_P(PerSampleFactorsApiTest, MomentsEqualSumsOfPerSampleGradients) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(16);
  auto check = [&](const trainscope::PerSampleMoments& m, const at::Tensor& g, int64_t rows, bool bias,
                   const std::string& what) {
    const double rtol = tolerance(dtype());
    const int64_t nw = g.size(1) - (bias ? rows : 0);
    for (const at::Tensor* t : {&m.weight_sum, &m.weight_sq_sum}) {
      EXPECT_EQ(t->scalar_type(), at::kDouble) << what;
      EXPECT_EQ(t->device(), device()) << what;
      EXPECT_EQ(t->size(0), rows) << what;
    }
    expect_close(m.weight_sum.flatten(), g.narrow(1, 0, nw).sum(0), rtol, what + " weight_sum");
    expect_close(m.weight_sq_sum.flatten(), g.narrow(1, 0, nw).square().sum(0), rtol, what + " weight_sq_sum");
    ASSERT_EQ(m.bias_sum.defined(), bias) << what;
    if (bias) {
      expect_close(m.bias_sum, g.narrow(1, nw, rows).sum(0), rtol, what + " bias_sum");
      expect_close(m.bias_sq_sum, g.narrow(1, nw, rows).square().sum(0), rtol, what + " bias_sq_sum");
    }
  };
  const at::Tensor x = randn({7, 5}, gen, dtype(), device()), d = randn({7, 4}, gen, dtype(), device());
  check(trainscope::linear_per_sample_grad_moments({x}, {d}, true),
        reference_grads(linear_layer(), x, d, {4, 5}, true), 4, true, "linear [B, d]");
  check(trainscope::linear_per_sample_grad_moments({x}, {d}, false),
        reference_grads(linear_layer(), x, d, {4, 5}, false), 4, false, "linear [B, d], no bias");
  const std::vector<at::Tensor> xs{randn({3, 2, 5}, gen, dtype(), device()), randn({3, 5}, gen, dtype(), device())};
  const std::vector<at::Tensor> ds{randn({3, 2, 4}, gen, dtype(), device()), randn({3, 4}, gen, dtype(), device())};
  check(trainscope::linear_per_sample_grad_moments(xs, ds, true),
        reference_grads(linear_layer(), xs[0], ds[0], {4, 5}, true) +
            reference_grads(linear_layer(), xs[1], ds[1], {4, 5}, true),
        4, true, "linear, positions, two uses");
  const at::Tensor xc = randn({4, 4, 6, 6}, gen, dtype(), device()), dc = randn({4, 6, 3, 3}, gen, dtype(), device());
  const at::Tensor gc = reference_grads(conv_layer({2}, {1}, {1}, 2), xc, dc, {6, 2, 3, 3}, true);
  for (int64_t budget : {int64_t{64}, int64_t{0}}) {
    const TileBudget b(budget);
    const trainscope::PerSampleMoments m =
        trainscope::conv2d_per_sample_grad_moments({xc}, {dc}, {3}, {2}, {1}, {1}, 2, true);
    EXPECT_EQ(m.weight_sum.sizes(), (std::vector<int64_t>{6, 2 * 3 * 3}));
    check(m, gc, 6, true, "conv, groups 2, budget " + std::to_string(budget));
  }
}

// The per-sample bias gradients Σ_t δ_it, summed in float64 a block of samples at a time on a CPU
// when one sample's output gradients are large (here each sample is a block of its own).
TEST_P(PerSampleFactorsApiTest, BiasMomentsOfLargeOutputs) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(19);
  const at::Tensor x = randn({3, 70000, 1}, gen, dtype(), device()), d = randn({3, 70000, 2}, gen, dtype(), device());
  const at::Tensor b = d.to(kF64).sum(1);  // [B, 2]
  const trainscope::PerSampleMoments m = trainscope::linear_per_sample_grad_moments({x}, {d}, true);
  expect_close(m.bias_sum, b.sum(0), 1e-12, "linear bias_sum");
  expect_close(m.bias_sq_sum, b.square().sum(0), 1e-12, "linear bias_sq_sum");
  const at::Tensor xc = randn({3, 1, 2, 40000}, gen, dtype(), device()), dc = randn({3, 2, 2, 40000}, gen, dtype(), device());
  const at::Tensor bc = dc.to(kF64).sum({2, 3});
  const trainscope::PerSampleMoments mc =
      trainscope::conv2d_per_sample_grad_moments({xc}, {dc}, {1}, {1}, {0}, {1}, 1, true);
  expect_close(mc.bias_sum, bc.sum(0), 1e-12, "conv bias_sum");
  expect_close(mc.bias_sq_sum, bc.square().sum(0), 1e-12, "conv bias_sq_sum");
}

// Gᵢ·D from the factors against per-sample gradients formed by hand, with and without the bias.
TEST_P(PerSampleFactorsApiTest, ProjectionsOnADirection) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const std::vector<at::Tensor> xs{randn({5, 3, 4}, gen, dtype(), device()), randn({5, 4}, gen, dtype(), device())};
  const std::vector<at::Tensor> ds{randn({5, 3, 2}, gen, dtype(), device()), randn({5, 2}, gen, dtype(), device())};
  const at::Tensor g = reference_grads(linear_layer(), xs[0], ds[0], {2, 4}, true) +
                       reference_grads(linear_layer(), xs[1], ds[1], {2, 4}, true);  // [B, 8 + 2]
  const at::Tensor w = at::randn({2, 4}, gen, kF64), b = at::randn({2}, gen, kF64);
  expect_close(trainscope::linear_per_sample_projections(xs, ds, w.to(device()), b.to(device())),
               at::mv(g, at::cat({w.flatten(), b})), tolerance(dtype()), "linear, two uses");
  expect_close(trainscope::linear_per_sample_projections(xs, ds, w.to(device()), at::Tensor()),
               at::mv(g.narrow(1, 0, 8), w.flatten()), tolerance(dtype()), "linear, weight only");
  const at::Tensor xc = randn({3, 4, 6, 6}, gen, dtype(), device()), dc = randn({3, 6, 3, 3}, gen, dtype(), device());
  const at::Tensor gc = reference_grads(conv_layer({2}, {1}, {1}, 2), xc, dc, {6, 2, 3, 3}, true);
  const at::Tensor wc = at::randn({6, 2, 3, 3}, gen, kF64), bc = at::randn({6}, gen, kF64);
  expect_close(trainscope::conv2d_per_sample_projections({xc}, {dc}, wc.to(device()), bc.to(device()), {2}, {1}, {1}, 2),
               at::mv(gc, at::cat({wc.flatten(), bc})), tolerance(dtype()), "conv, groups 2");
  EXPECT_THROW(trainscope::linear_per_sample_projections(xs, ds, at::ones({3, 4}, kF64).to(device()), at::Tensor()),
               c10::Error);
}

// A layer used several times in one step: sample i's gradient is the sum over the uses, whose
// leading dims (linear) or spatial sizes (conv) differ; every route and the histogram see it.
TEST_P(PerSampleFactorsApiTest, UsesOfOneLayerAddUp) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(20);
  const int64_t B = 4;
  const std::vector<at::Tensor> x{randn({B, 5}, gen, dtype(), device()), randn({B, 3, 5}, gen, dtype(), device()),
                                  randn({B, 2, 2, 5}, gen, dtype(), device())};
  const std::vector<at::Tensor> d{randn({B, 4}, gen, dtype(), device()), randn({B, 3, 4}, gen, dtype(), device()),
                                  randn({B, 2, 2, 4}, gen, dtype(), device())};
  at::Tensor g = at::zeros({B, 4 * 5 + 4}, kF64);
  for (size_t u = 0; u < x.size(); ++u) g += reference_grads(linear_layer(), x[u], d[u], {4, 5}, true);
  const Parts64 want = reference_parts(g);
  for (FactorMethod m : kAllMethods) {
    expect_parts(trainscope::linear_per_sample_parts(x, d, true, m), want, tolerance(dtype()),
                 std::string("linear, three uses, ") + trainscope::factor_method_name(m), at::kDouble);
  }
  // Conv: uses of different spatial sizes, two groups, under a budget that tiles.
  const Layer conv = conv_layer({2}, {1}, {1}, 2);
  const std::vector<at::Tensor> xc{randn({B, 4, 6, 6}, gen, dtype(), device()),
                                   randn({B, 4, 5, 7}, gen, dtype(), device())};
  const std::vector<at::Tensor> dc{randn({B, 6, 3, 3}, gen, dtype(), device()),
                                   randn({B, 6, 3, 4}, gen, dtype(), device())};
  const at::Tensor gc = reference_grads(conv, xc[0], dc[0], {6, 2, 3, 3}, true) +
                        reference_grads(conv, xc[1], dc[1], {6, 2, 3, 3}, true);
  const Parts64 wc = reference_parts(gc);
  for (int64_t budget : {int64_t{64}, int64_t{0}}) {
    const TileBudget b(budget);
    for (FactorMethod m : kAllMethods) {
      expect_parts(trainscope::conv2d_per_sample_parts(xc, dc, {3}, {2}, {1}, {1}, 2, true, m), wc,
                   tolerance(dtype()),
                   "conv, two uses, budget " + std::to_string(budget) + " " + trainscope::factor_method_name(m),
                   at::kDouble);
    }
  }
  // The histogram bins the summed gradients (float32 and narrower by totals, see Hist1d).
  const int64_t nbins = 29;
  const double maxval = 2.0;
  for (const auto& [got, ref] :
       {std::pair<at::Tensor, at::Tensor>{trainscope::linear_per_sample_grad_hist1d(x, d, true, nbins, maxval), g},
        {trainscope::conv2d_per_sample_grad_hist1d(xc, dc, {3}, {2}, {1}, {1}, 2, true, nbins, maxval), gc}}) {
    const at::Tensor flat = ref.flatten(), got_cpu = got.cpu();
    std::vector<int64_t> want_h(nbins, 0);
    for (int64_t i = 0; i < flat.numel(); ++i) ++want_h[reference_bin(flat[i].item<double>(), nbins, maxval)];
    EXPECT_EQ(got_cpu.sum().item<int64_t>(), flat.numel());
    int64_t l1 = 0;
    for (int64_t k = 0; k < nbins; ++k) l1 += std::abs(got_cpu[k].item<int64_t>() - want_h[k]);
    EXPECT_LE(l1, dtype() == at::kDouble ? 0 : 4) << got_cpu;
  }
}

// Convolutions with many positions and few channels per group, whose per-sample gradients a
// CPU takes in float32 from the layer's own weight gradient grouped by sample (the other
// configurations by the unfolded product; both against the reference): every statistic, tiles
// of samples and blocks of rows, two uses that both take that route and two that do not.
TEST_P(PerSampleFactorsApiTest, ConvGradientsGroupedBySample) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const int64_t B = 3, nbins = 31;
  const double maxval = 3.0;
  const Layer conv = conv_layer({2}, {2}, {2}, 2);  // 20×20 → 10×10: T = 100
  auto input = [&](int64_t h, int64_t w) { return randn({B, 4, h, w}, gen, dtype(), device()); };
  auto grad = [&](int64_t h, int64_t w) { return randn({B, 6, h, w}, gen, dtype(), device()); };
  const std::vector<at::Tensor> x1{input(20, 20)}, d1{grad(10, 10)};
  const std::vector<at::Tensor> x2{input(20, 20), input(18, 22)}, d2{grad(10, 10), grad(9, 11)};
  const std::vector<at::Tensor> xm{input(20, 20), input(6, 6)}, dm{grad(10, 10), grad(3, 3)};  // T = 100 and 9
  const std::vector<at::Tensor> xl{randn({B, 20, 20, 4}, gen, dtype(), device()).permute({0, 3, 1, 2})};
  const std::vector<at::Tensor> dl{randn({B, 10, 10, 6}, gen, dtype(), device()).permute({0, 3, 1, 2})};
  for (const auto& [xs, ds, name] : {std::tuple{x1, d1, "one use"}, std::tuple{x2, d2, "two uses"},
                                     std::tuple{xm, dm, "two uses, one of few positions"},
                                     std::tuple{xl, dl, "channels last"}}) {
    at::Tensor g = at::zeros({B, 6 * 2 * 9 + 6}, kF64);
    for (size_t u = 0; u < xs.size(); ++u) {  // the reference on contiguous copies: its float64 path is slow on others
      g += reference_grads(conv, xs[u].contiguous(), ds[u].contiguous(), {6, 2, 3, 3}, true);
    }
    for (int64_t budget : {int64_t{0}, int64_t{300}}) {  // 300: one sample and one row at a time
      const TileBudget tiles(budget);
      const std::string what = std::string(name) + ", budget " + std::to_string(budget);
      for (FactorMethod m : kAllMethods) {
        expect_parts(trainscope::conv2d_per_sample_parts(xs, ds, {3, 3}, {2}, {2}, {2}, 2, true, m),
                     reference_parts(g), tolerance(dtype()), what + " " + trainscope::factor_method_name(m),
                     at::kDouble);
      }
      const trainscope::PerSampleMoments mo =
          trainscope::conv2d_per_sample_grad_moments(xs, ds, {3, 3}, {2}, {2}, {2}, 2, true);
      expect_close(at::cat({mo.weight_sum.flatten(), mo.bias_sum}), g.sum(0), tolerance(dtype()), what + " sum");
      expect_close(at::cat({mo.weight_sq_sum.flatten(), mo.bias_sq_sum}), g.square().sum(0), tolerance(dtype()),
                   what + " sq_sum");
      const at::Tensor h =
          trainscope::conv2d_per_sample_grad_hist1d(xs, ds, {3, 3}, {2}, {2}, {2}, 2, true, nbins, maxval).cpu();
      std::vector<int64_t> want(nbins, 0);
      const at::Tensor flat = g.flatten();
      for (int64_t i = 0; i < flat.numel(); ++i) ++want[reference_bin(flat[i].item<double>(), nbins, maxval)];
      int64_t l1 = 0;
      for (int64_t k = 0; k < nbins; ++k) l1 += std::abs(h[k].item<int64_t>() - want[k]);
      EXPECT_EQ(h.sum().item<int64_t>(), flat.numel()) << what;
      EXPECT_LE(l1, dtype() == at::kDouble ? 0 : 4) << what << " hist1d " << h;
    }
  }
}

const Config kConfigs[] = {{false, at::kFloat}, {false, at::kDouble}, {false, at::kBFloat16},
                           {false, at::kHalf},  {true, at::kFloat},   {true, at::kDouble},
                           {true, at::kBFloat16}};
INSTANTIATE_TEST_SUITE_P(AllDevicesAndDtypes, PerSampleFactorsApiTest, testing::ValuesIn(kConfigs), config_name);

// ---------------------------------------------------------------------------------------------

TEST(PerSampleFactorsApi, AutocastDtypesMayDiffer) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(16);
  const at::Tensor x = randn({4, 5}, gen, at::kFloat, at::kCPU), d = randn({4, 3}, gen, at::kBFloat16, at::kCPU);
  const Parts64 want = reference_parts(reference_grads(linear_layer(), x, d, {3, 5}, true));
  expect_parts(trainscope::linear_per_sample_parts(x, d, true), want, 2e-5, "float32 x, bfloat16 δ", at::kDouble);
}

TEST(PerSampleFactorsApi, ResultsCarryNoGraph) {
  const at::Tensor x = at::randn({4, 5}).requires_grad_(), d = at::randn({4, 3});
  const PerSampleParts p = trainscope::linear_per_sample_parts(x, d, true);
  EXPECT_FALSE(p.sq_norms.requires_grad());
  EXPECT_FALSE(p.dots.requires_grad());
  EXPECT_FALSE(p.mean_sq_norm.requires_grad());
}

TEST(PerSampleFactorsApi, AdditiveWithOtherLayers) {
  // Parts of two layers add up to the parts of their concatenated per-sample gradients.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const at::Tensor x1 = randn({5, 4}, gen, at::kDouble, at::kCPU), d1 = randn({5, 3}, gen, at::kDouble, at::kCPU);
  const at::Tensor x2 = randn({5, 2, 3}, gen, at::kDouble, at::kCPU), d2 = randn({5, 2, 2}, gen, at::kDouble, at::kCPU);
  const at::Tensor g = at::cat({reference_grads(linear_layer(), x1, d1, {3, 4}, true),
                                reference_grads(linear_layer(), x2, d2, {2, 3}, false)}, 1);
  const Parts64 want = reference_parts(g);
  PerSampleParts p1 = trainscope::linear_per_sample_parts(x1, d1, true);
  const PerSampleParts p2 = trainscope::linear_per_sample_parts(x2, d2, false);
  const PerSampleParts sum{p1.sq_norms + p2.sq_norms, p1.dots + p2.dots, p1.mean_sq_norm + p2.mean_sq_norm};
  expect_parts(sum, want, 1e-11, "two layers", at::kDouble);
}

// The Gram route in tiles of samples (pairs k >= i of tiles, the T rows of a sample in chunks)
// under budgets from one row to the whole batch, against the Ḡ route, both in double.
TEST(PerSampleFactorsApi, GramRouteInTilesEqualsGbarRoute) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(18);
  const at::Tensor x = randn({9, 5, 7}, gen, at::kDouble, at::kCPU), d = randn({9, 5, 6}, gen, at::kDouble, at::kCPU);
  const at::Tensor xc = randn({5, 4, 6, 6}, gen, at::kDouble, at::kCPU);
  const at::Tensor dc = randn({5, 6, 3, 3}, gen, at::kDouble, at::kCPU);
  const PerSampleParts lin = trainscope::linear_per_sample_parts(x, d, true, FactorMethod::kGhost);
  const PerSampleParts conv =
      trainscope::conv2d_per_sample_parts(xc, dc, {3}, {2}, {1}, {1}, 2, true, FactorMethod::kTiled);
  const Parts64 want_lin{lin.sq_norms, lin.dots, lin.mean_sq_norm};
  const Parts64 want_conv{conv.sq_norms, conv.dots, conv.mean_sq_norm};
  for (int64_t budget : {int64_t{1}, int64_t{64}, int64_t{700}, int64_t{5000}, int64_t{0}}) {
    const TileBudget b(budget);
    const std::string what = "gram budget " + std::to_string(budget);
    expect_parts(trainscope::linear_per_sample_parts(x, d, true, FactorMethod::kGram), want_lin, 1e-12,
                 what + " linear", at::kDouble);
    expect_parts(trainscope::conv2d_per_sample_parts(xc, dc, {3}, {2}, {1}, {1}, 2, true, FactorMethod::kGram),
                 want_conv, 1e-12, what + " conv", at::kDouble);
  }
}

// 160 rows of 256: the Gram route's GEMMs of float32 factors stay in float32 here (float64
// would cost more than the Ḡ route); reductions in float64 still meet 2e-5.
TEST(PerSampleFactorsApi, GramRouteWithFloat32Gemms) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(19);
  const at::Tensor x = randn({20, 8, 256}, gen, at::kFloat, at::kCPU), d = randn({20, 8, 256}, gen, at::kFloat, at::kCPU);
  const Parts64 want = reference_parts(reference_grads(linear_layer(), x, d, {256, 256}, true));
  for (FactorMethod m : {FactorMethod::kGram, FactorMethod::kAuto}) {
    expect_parts(trainscope::linear_per_sample_parts(x, d, true, m), want, 2e-5,
                 std::string("float32 gram ") + trainscope::factor_method_name(m), at::kDouble);
  }
}

TEST(PerSampleFactorsApi, MethodNames) {
  for (FactorMethod m : kAllMethods) {
    EXPECT_EQ(trainscope::parse_factor_method(trainscope::factor_method_name(m)), m);
  }
  EXPECT_EQ(trainscope::parse_factor_method("gram"), FactorMethod::kGram);
}

TEST(PerSampleFactorsApi, OutputGradCapture) {
  const at::Tensor x = at::randn({4, 3, 5}, kF64);
  const at::Tensor w = at::randn({2, 5}, kF64).requires_grad_(), b = at::randn({2}, kF64).requires_grad_();
  trainscope::OutputGradCapture cap;
  EXPECT_FALSE(cap.has_grad());
  EXPECT_THROW(cap.grad(), c10::Error);
  const at::Tensor y = cap.watch(at::linear(x, w, b));
  const at::Tensor target = at::randn({4, 3, 2}, kF64);
  // In-place change after the watch: the capture is the gradient of the linear output itself.
  const at::Tensor z = y.clone();
  y.relu_();
  ((y * target).sum() + (z * z).sum()).backward();
  ASSERT_TRUE(cap.has_grad());
  const at::Tensor want = target * (cpu64(z) > 0).to(at::kDouble) + 2 * z.detach();
  expect_close(cap.grad(), want, 1e-14, "captured δ");
  // The per-sample parts from the capture equal those of explicit per-sample gradients.
  const PerSampleParts p = trainscope::linear_per_sample_parts(x, cap.grad(), true);
  const Parts64 ref = reference_parts(reference_grads(linear_layer(), x, cap.grad(), {2, 5}, true));
  expect_parts(p, ref, 1e-11, "from capture", at::kDouble);
  cap.reset();
  EXPECT_FALSE(cap.has_grad());
  EXPECT_THROW(cap.watch(at::randn({2})), c10::Error);  // does not require grad
}

// Pairs of (per-sample gradient element, parameter value) binned by the §4 rule on both axes.
at::Tensor reference_hist2d(const at::Tensor& grads, const at::Tensor& params, const trainscope::Hist2dOptions& o) {
  at::Tensor counts = at::zeros({o.nbins_grad, o.nbins_param}, at::kLong);
  const at::Tensor g = cpu64(grads), p = cpu64(params).flatten();
  auto acc = counts.accessor<int64_t, 2>();
  for (int64_t i = 0; i < g.size(0); ++i) {
    for (int64_t j = 0; j < g.size(1); ++j) {
      ++acc[reference_bin(g[i][j].item<double>(), o.nbins_grad, o.maxval_grad)]
           [reference_bin(p[j].item<double>(), o.nbins_param, o.maxval_param)];
    }
  }
  return counts;
}

// 12 × 6 bins over ±1 (gradients) and ±2 (parameters): few enough to compare whole histograms.
trainscope::Hist2dOptions small_hist2d() {
  trainscope::Hist2dOptions o;
  o.nbins_grad = 12;
  o.maxval_grad = 1.0;
  o.nbins_param = 6;
  o.maxval_param = 2.0;
  return o;
}

TEST(PerSampleFactorsApi, Hist2dOfTiles) {
  const at::Tensor x = at::randn({4, 3, 5}, kF64), d = 0.3 * at::randn({4, 3, 2}, kF64);
  const at::Tensor w = at::randn({2, 5}, kF64), b = at::randn({2}, kF64);
  const trainscope::Hist2dOptions o = small_hist2d();
  const TileBudget budget(8);  // one sample and one row per tile
  const auto [counts, nonfinite] = trainscope::linear_per_sample_grad_hist2d(x, d, w, b, o);
  const at::Tensor g = reference_grads(linear_layer(), x, d, {2, 5}, true);
  EXPECT_TRUE(at::equal(counts, reference_hist2d(g, at::cat({w.flatten(), b}), o)));
  EXPECT_EQ(nonfinite.item<int64_t>(), 0);

  const at::Tensor xc = at::randn({3, 4, 5, 5}, kF64), dc = 0.3 * at::randn({3, 6, 3, 3}, kF64);
  const at::Tensor wc = at::randn({6, 2, 3, 3}, kF64);
  const auto [cc, nc] = trainscope::conv2d_per_sample_grad_hist2d(xc, dc, wc, at::Tensor(), {2}, {1}, {1}, 2, o);
  const at::Tensor gc = reference_grads(conv_layer({2}, {1}, {1}, 2), xc, dc, {6, 2, 3, 3}, false);
  EXPECT_TRUE(at::equal(cc, reference_hist2d(gc, wc, o)));
  EXPECT_EQ(nc.item<int64_t>(), 0);
}

// cuDNN's default for float32 convolutions is TF32 (inputs rounded to ~5e-4): the convolution
// behind Gᵢ·Ḡ runs in IEEE float32 whatever that setting, and leaves it as it was.
TEST(PerSampleFactorsApi, CudaConvolutionsIgnoreTf32) {
  SKIP_WITHOUT_CUDA();
  const trainscope_test::Tf32Convolutions tf32;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(22);
  const at::Tensor x = at::randn({4, 64, 12, 12}, gen, kF64), d = at::randn({4, 64, 12, 12}, gen, kF64);
  const Parts64 want = reference_parts(reference_grads(conv_layer({1}, {1}, {1}, 1), x, d, {64, 64, 3, 3}, true));
  const at::Device cuda(at::kCUDA);
  for (FactorMethod m : kForcedMethods) {
    expect_parts(trainscope::conv2d_per_sample_parts(x.to(cuda, at::kFloat), d.to(cuda, at::kFloat), {3}, {1}, {1},
                                                     {1}, 1, true, m),
                 want, 2e-5, std::string("conv under TF32 ") + trainscope::factor_method_name(m), at::kDouble);
  }
  EXPECT_EQ(trainscope_test::Tf32Convolutions::precision(), at::Float32Precision::TF32);
}

// One use through the list overloads is the single-tensor call, bit for bit.
TEST(PerSampleFactorsApi, OneUseIsTheSingleTensorCall) {
  const at::Tensor x = at::randn({5, 3, 4}), d = at::randn({5, 3, 2});
  for (FactorMethod m : kAllMethods) {
    const PerSampleParts a = trainscope::linear_per_sample_parts(x, d, true, m);
    const PerSampleParts b = trainscope::linear_per_sample_parts(at::TensorList(x), at::TensorList(d), true, m);
    EXPECT_TRUE(at::equal(a.sq_norms, b.sq_norms) && at::equal(a.dots, b.dots) &&
                at::equal(a.mean_sq_norm, b.mean_sq_norm));
  }
}

// Float32 and float64 uses mixed: the GEMMs run in float32, the parts stay within 2e-5.
TEST(PerSampleFactorsApi, UsesOfMixedDtypes) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const std::vector<at::Tensor> x{randn({4, 5}, gen, at::kDouble, at::kCPU), randn({4, 2, 5}, gen, at::kFloat, at::kCPU)};
  const std::vector<at::Tensor> d{randn({4, 3}, gen, at::kDouble, at::kCPU), randn({4, 2, 3}, gen, at::kBFloat16, at::kCPU)};
  const Parts64 want = reference_parts(reference_grads(linear_layer(), x[0], d[0], {3, 5}, true) +
                                       reference_grads(linear_layer(), x[1], d[1], {3, 5}, true));
  for (FactorMethod m : kAllMethods) {
    expect_parts(trainscope::linear_per_sample_parts(x, d, true, m), want, 2e-5,
                 std::string("mixed uses ") + trainscope::factor_method_name(m), at::kDouble);
  }
}

TEST(PerSampleFactorsApi, Hist2dOfUses) {
  const std::vector<at::Tensor> x{at::randn({3, 5}, kF64), at::randn({3, 2, 5}, kF64)};
  const std::vector<at::Tensor> d{0.3 * at::randn({3, 2}, kF64), 0.3 * at::randn({3, 2, 2}, kF64)};
  const at::Tensor w = at::randn({2, 5}, kF64), b = at::randn({2}, kF64);
  const trainscope::Hist2dOptions o = small_hist2d();
  const TileBudget budget(8);
  const auto [counts, nonfinite] = trainscope::linear_per_sample_grad_hist2d(x, d, w, b, o);
  const at::Tensor g = reference_grads(linear_layer(), x[0], d[0], {2, 5}, true) +
                       reference_grads(linear_layer(), x[1], d[1], {2, 5}, true);
  EXPECT_TRUE(at::equal(counts, reference_hist2d(g, at::cat({w.flatten(), b}), o)));
  EXPECT_EQ(nonfinite.item<int64_t>(), 0);

  const std::vector<at::Tensor> xc{at::randn({3, 4, 5, 5}, kF64), at::randn({3, 4, 4, 6}, kF64)};
  const std::vector<at::Tensor> dc{0.3 * at::randn({3, 6, 3, 3}, kF64), 0.3 * at::randn({3, 6, 2, 3}, kF64)};
  const at::Tensor wc = at::randn({6, 2, 3, 3}, kF64), bc = at::randn({6}, kF64);
  const auto [cc, nc] = trainscope::conv2d_per_sample_grad_hist2d(xc, dc, wc, bc, {2}, {1}, {1}, 2, o);
  const Layer conv = conv_layer({2}, {1}, {1}, 2);
  const at::Tensor gc = reference_grads(conv, xc[0], dc[0], {6, 2, 3, 3}, true) +
                        reference_grads(conv, xc[1], dc[1], {6, 2, 3, 3}, true);
  EXPECT_TRUE(at::equal(cc, reference_hist2d(gc, at::cat({wc.flatten(), bc}), o)));
  EXPECT_EQ(nc.item<int64_t>(), 0);
}

// Two backward calls through a retained graph reach the watched output twice: the captured
// gradient is their sum, as a parameter's .grad is.
TEST(PerSampleFactorsApi, OutputGradCaptureAddsRepeatedBackward) {
  const at::Tensor x = at::randn({4, 5}, kF64);
  const at::Tensor w = at::randn({3, 5}, kF64).requires_grad_();
  trainscope::OutputGradCapture cap;
  const at::Tensor y = cap.watch(at::linear(x, w, {}));
  const at::Tensor t1 = at::randn({4, 3}, kF64), t2 = at::randn({4, 3}, kF64);
  (y * t1).sum().backward({}, /*retain_graph=*/true);
  (y * t2).sum().backward();
  expect_close(cap.grad(), t1 + t2, 1e-15, "δ of two backward calls");
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning \"" << needle << "\"";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(needle), std::string::npos)
        << "message \"" << e.what_without_backtrace() << "\" does not mention \"" << needle << "\"";
  }
}

TEST(PerSampleFactorsApi, BadInputNamesTheArgument) {
  const at::Tensor x = at::randn({4, 5}), d = at::randn({4, 3});
  using trainscope::conv2d_per_sample_parts;
  using trainscope::linear_per_sample_parts;
  expect_error([&] { linear_per_sample_parts(x.narrow(0, 0, 1), d.narrow(0, 0, 1), true); }, "B >= 2");
  expect_error([&] { linear_per_sample_parts(x.to(at::kInt), d, true); }, "input has dtype");
  expect_error([&] { linear_per_sample_parts(x, d.to(at::kLong), true); }, "grad_output has dtype");
  expect_error([&] { linear_per_sample_parts(at::randn({5}), d, true); }, "input must be");
  expect_error([&] { linear_per_sample_parts(x, at::randn({3, 3}), true); }, "grad_output has shape");
  expect_error([&] { linear_per_sample_parts(x, d.to(at::kMeta), true); }, "grad_output is on meta");
  expect_error([&] { linear_per_sample_parts(at::Tensor(), d, true); }, "input is an undefined tensor");
  expect_error([] { trainscope::parse_factor_method("fast"); }, "method must be");
  const at::Tensor xc = at::randn({2, 4, 6, 6}), dc = at::randn({2, 6, 6, 6});
  expect_error([&] { conv2d_per_sample_parts(xc, dc, {3}, {1}, {1}, {1}, 3, true); }, "groups = 3");
  expect_error([&] { conv2d_per_sample_parts(xc, dc, {3}, {1}, {0}, {1}, 1, true); }, "grad_output has spatial size");
  expect_error([&] { conv2d_per_sample_parts(xc, dc, {3, 3, 3}, {1}, {1}, {1}, 1, true); }, "kernel_size must have");
  expect_error([&] { conv2d_per_sample_parts(xc, dc, {3}, {0}, {1}, {1}, 1, true); }, "stride must be positive");
  expect_error([&] { conv2d_per_sample_parts(xc[0], dc, {3}, {1}, {1}, {1}, 1, true); }, "input must be [B, C_in, H, W]");
  expect_error([&] { trainscope::linear_per_sample_grad_hist1d(x, d, true, 0, 0.1); }, "nbins must be");
  expect_error([&] { trainscope::linear_per_sample_grad_hist1d(x, d, true, 10, -1.0); }, "maxval must be");
  expect_error([&] { trainscope::linear_per_sample_grad_hist2d(x, d, at::randn({3, 4}), at::Tensor()); },
               "weight has shape");
}

TEST(PerSampleFactorsApi, BadUsesNameTheUse) {
  using trainscope::linear_per_sample_parts;
  const at::Tensor x = at::randn({4, 5}), d = at::randn({4, 3});
  using Uses = std::vector<at::Tensor>;
  expect_error([&] { linear_per_sample_parts(Uses{x, at::randn({6, 5})}, Uses{d, at::randn({6, 3})}, true); },
               "input[1] has batch size 6 but input[0] has 4");
  expect_error([&] { linear_per_sample_parts(Uses{x, x}, Uses{d}, true); }, "grad_output has 1 tensors but input has 2");
  expect_error([&] { linear_per_sample_parts(Uses{}, Uses{}, true); }, "input is an empty list");
  expect_error([&] { linear_per_sample_parts(Uses{x, at::randn({4, 6})}, Uses{d, d}, true); },
               "every use is of one layer");
  expect_error([&] { linear_per_sample_parts(Uses{x, x}, Uses{d, at::randn({4, 2, 3})}, true); },
               "grad_output[1] has shape");
  expect_error([&] { linear_per_sample_parts(Uses{x, x.to(at::kInt)}, Uses{d, d}, true); }, "input[1] has dtype");
  expect_error([&] { linear_per_sample_parts(Uses{x, x.to(at::kMeta)}, Uses{d, d.to(at::kMeta)}, true); },
               "input[1] is on meta");
  const at::Tensor xc = at::randn({2, 4, 6, 6}), dc = at::randn({2, 6, 6, 6});
  expect_error([&] { trainscope::conv2d_per_sample_parts(Uses{xc, xc}, Uses{dc, at::randn({2, 6, 5, 5})}, {3}, {1},
                                                         {1}, {1}, 1, true); },
               "grad_output[1] has spatial size");
  expect_error([&] { trainscope::conv2d_per_sample_grad_hist1d(Uses{xc, xc.narrow(0, 0, 1)},
                                                               Uses{dc, dc.narrow(0, 0, 1)}, {3}, {1}, {1}, {1}, 1,
                                                               true); },
               "input[1] has batch size 1");
}

}  // namespace
