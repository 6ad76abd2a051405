// The LibTorch API of include/trainscope/hist2d.h against a float64 reference written here from
// SPEC.md §2 (grad_hist2d) and §4: every dtype, mixed dtypes across pairs, non-contiguous inputs,
// empty pairs and lists, any batch size, bin edges, non-finite values on either side, histograms
// large enough for the CPU's shared-counter path, determinism, and the errors bad input must
// raise. Each case runs on CPU, and on CUDA when a GPU is present (skipped otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "tests/cpp/reference_bin.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/hist2d.h"

namespace {

using namespace trainscope_test;
using trainscope::Hist2d;
using trainscope::Hist2dOptions;

// Parameter shapes: matrices, vectors, a scalar, empty ones between non-empty ones, and one wider
// than the kernel's 2048-element window.
const std::vector<std::vector<int64_t>> kShapes = {{7, 13}, {0}, {129}, {3, 0, 5}, {33, 65}, {},
                                                   {1}, {4, 5, 6}, {2500}, {2, 0}};

struct Lists {
  std::vector<at::Tensor> grads, params;
};

std::vector<int64_t> with_batch(int64_t batch, const std::vector<int64_t>& shape) {
  std::vector<int64_t> s{batch};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

// Per-sample gradients ~ N(0, 0.03²) (inliers and outliers of ±0.05), θ ~ N(0, 0.6²) (of ±1);
// made in float64 on the CPU, then cast. dtypes[i % size] is the dtype of pair i.
Lists make_lists(int64_t batch, const std::vector<std::vector<int64_t>>& shapes,
                 const std::vector<at::ScalarType>& dtypes, at::Device device, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Lists l;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto opt = at::TensorOptions().dtype(dtypes[i % dtypes.size()]).device(device);
    l.params.push_back((0.6 * at::randn(shapes[i], gen, f64)).to(opt));
    l.grads.push_back((0.03 * at::randn(with_batch(batch, shapes[i]), gen, f64)).to(opt));
  }
  return l;
}

struct Reference {
  std::vector<int64_t> counts;
  int64_t nonfinite = 0;
};

// SPEC.md §4 per axis on the values the tensors hold, in float64.
Reference reference(const Lists& l, const Hist2dOptions& o) {
  Reference r;
  r.counts.assign(static_cast<size_t>(o.nbins_grad * o.nbins_param), 0);
  for (size_t t = 0; t < l.grads.size(); ++t) {
    const at::Tensor p = as_double_cpu(l.params[t]).contiguous().reshape({-1});
    const int64_t P = p.numel();
    if (P == 0) continue;
    const at::Tensor g = as_double_cpu(l.grads[t]).contiguous().reshape({-1, P});
    const double* pp = p.data_ptr<double>();
    const double* gp = g.data_ptr<double>();
    for (int64_t b = 0; b < g.size(0); ++b) {
      for (int64_t j = 0; j < P; ++j) {
        const double x = gp[b * P + j], y = pp[j];
        if (!std::isfinite(x) || !std::isfinite(y)) {
          ++r.nonfinite;
          continue;
        }
        ++r.counts[static_cast<size_t>(reference_bin(x, o.nbins_grad, o.maxval_grad) * o.nbins_param +
                                       reference_bin(y, o.nbins_param, o.maxval_param))];
      }
    }
  }
  return r;
}

int64_t total_pairs(const Lists& l) {
  int64_t n = 0;
  for (const at::Tensor& g : l.grads) n += g.numel();
  return n;
}

// ---------------------------------------------------------------------------------------------
// Parameterised over device and dtype

class Hist2dApiTest : public DeviceDtypeTest {
 protected:
  Lists lists(int64_t batch, uint64_t seed, const std::vector<std::vector<int64_t>>& shapes = kShapes) const {
    return make_lists(batch, shapes, {dtype()}, device(), seed);
  }

  void check(const Hist2d& h, const Lists& l, const Hist2dOptions& o, const std::string& context) const {
    SCOPED_TRACE(context);
    ASSERT_EQ(h.counts.sizes(), (std::vector<int64_t>{o.nbins_grad, o.nbins_param}));
    ASSERT_EQ(h.nonfinite.dim(), 0);
    EXPECT_EQ(h.counts.scalar_type(), at::kLong);
    EXPECT_EQ(h.nonfinite.scalar_type(), at::kLong);
    EXPECT_EQ(h.counts.device(), device());
    EXPECT_EQ(h.nonfinite.device(), device());
    EXPECT_FALSE(h.counts.requires_grad());
    const Reference r = reference(l, o);
    const std::vector<int64_t> got = to_vector(h.counts);
    int64_t differ = 0;
    for (size_t i = 0; i < got.size(); ++i) differ += got[i] != r.counts[i];
    EXPECT_EQ(differ, 0) << "bins differ from the reference";
    const int64_t nonfinite = to_vector(h.nonfinite)[0];
    EXPECT_EQ(nonfinite, r.nonfinite);
    EXPECT_EQ(std::accumulate(got.begin(), got.end(), int64_t{0}) + nonfinite, total_pairs(l));
  }
};

TEST_P(Hist2dApiTest, DefaultOptionsMatchReference) {
  for (int64_t batch : {int64_t{2}, int64_t{5}}) {
    const Lists l = lists(batch, static_cast<uint64_t>(batch));
    check(trainscope::grad_hist2d(l.grads, l.params), l, Hist2dOptions{}, "B = " + std::to_string(batch));
  }
}

TEST_P(Hist2dApiTest, BinCountsAndRanges) {
  const Lists l = lists(3, 11);
  struct Opt { int64_t nbg; double mg; int64_t nbp; double mp; };
  for (const Opt& c : {Opt{1, 0.05, 1, 1.0}, Opt{7, 0.01, 13, 0.3}, Opt{100, 0.05, 100, 1.0}, Opt{200, 0.1, 100, 2.0},
                       Opt{3, 1e6, 2, 1e-3}}) {
    Hist2dOptions o;
    o.nbins_grad = c.nbg;
    o.maxval_grad = c.mg;
    o.nbins_param = c.nbp;
    o.maxval_param = c.mp;
    check(trainscope::grad_hist2d(l.grads, l.params, o), l, o,
          std::to_string(c.nbg) + "x" + std::to_string(c.nbp) + " bins");
  }
}

TEST_P(Hist2dApiTest, AnyBatchSizeAndEmptyPairs) {
  // B = 1 (a tile of one sample) and B = 0 (every pair empty) are fine: the histogram is a sum.
  for (int64_t batch : {int64_t{0}, int64_t{1}}) {
    const Lists l = lists(batch, 20 + static_cast<uint64_t>(batch));
    check(trainscope::grad_hist2d(l.grads, l.params), l, Hist2dOptions{}, "B = " + std::to_string(batch));
  }
  const Lists empty = lists(4, 22, {{0}, {3, 0}, {0, 0, 2}});
  const Hist2d h = trainscope::grad_hist2d(empty.grads, empty.params);
  EXPECT_EQ(h.counts.sum().item<int64_t>(), 0);
  EXPECT_EQ(h.nonfinite.item<int64_t>(), 0);
}

TEST_P(Hist2dApiTest, TilesOfSamplesAddUp) {
  const Lists l = lists(7, 23);
  const Hist2d whole = trainscope::grad_hist2d(l.grads, l.params);
  at::Tensor sum = at::zeros_like(whole.counts);
  for (int64_t b0 = 0; b0 < 7; b0 += 3) {
    std::vector<at::Tensor> tile;
    for (const at::Tensor& g : l.grads) tile.push_back(g.narrow(0, b0, std::min<int64_t>(3, 7 - b0)));
    sum += trainscope::grad_hist2d(tile, l.params).counts;
  }
  EXPECT_TRUE(at::equal(sum, whole.counts));
}

TEST_P(Hist2dApiTest, NonContiguousInputs) {
  const Lists base = lists(4, 30, {{6, 9}, {5, 7, 3}, {40}});
  Lists l;
  // Parameters transposed, gradients permuted with the batch dimension in the middle, and a
  // strided slice: the pairs keep their shapes, only the strides differ.
  l.params = {base.params[0].t().contiguous().t(), base.params[1].permute({2, 0, 1}).contiguous().permute({1, 2, 0}),
              at::stack({base.params[2], base.params[2]}, 1).reshape({80}).slice(0, 0, 80, 2)};
  l.grads = {base.grads[0].permute({1, 0, 2}).contiguous().permute({1, 0, 2}),
             base.grads[1].transpose(1, 3).contiguous().transpose(1, 3),
             at::stack({base.grads[2], base.grads[2]}, 2).reshape({4, 80}).slice(1, 0, 80, 2)};
  for (size_t i = 0; i < l.grads.size(); ++i) {
    ASSERT_TRUE(at::equal(l.grads[i], base.grads[i]));
    ASSERT_TRUE(at::equal(l.params[i], base.params[i]));
    ASSERT_FALSE(l.grads[i].is_contiguous() && l.params[i].is_contiguous()) << i;
  }
  const Hist2d strided = trainscope::grad_hist2d(l.grads, l.params);
  check(strided, l, Hist2dOptions{}, "non-contiguous");
  EXPECT_TRUE(at::equal(strided.counts, trainscope::grad_hist2d(base.grads, base.params).counts));
}

TEST_P(Hist2dApiTest, EdgeValuesOnBothAxes) {
  // Dyadic ranges (edges exact in every dtype): values on the edges, ±maxval, and outliers.
  Hist2dOptions o;
  o.nbins_grad = 16;
  o.maxval_grad = 0.0625;
  o.nbins_param = 8;
  o.maxval_param = 1.0;
  const auto opt = at::TensorOptions().dtype(dtype()).device(device());
  const at::Tensor gvals = at::tensor({-0.0625, 0.0625, 0.0, -0.0078125, 0.0078125, 0.05, 10.0, -10.0}, at::kDouble);
  const at::Tensor pvals = at::tensor({-1.0, 1.0, 0.0, 0.25, -0.25, 0.5, 100.0, -100.0}, at::kDouble);
  Lists l;
  l.params.push_back(pvals.to(opt));
  l.grads.push_back(at::stack({gvals, gvals.flip(0), gvals.roll(3)}).to(opt));
  check(trainscope::grad_hist2d(l.grads, l.params, o), l, o, "edges");
  // x = maxval on both axes: the last bin, flat index (16 - 1, 8 - 1).
  const Hist2d corner = trainscope::grad_hist2d({at::full({2, 1}, 0.0625, opt)}, {at::full({1}, 1.0, opt)}, o);
  EXPECT_EQ(corner.counts[15][7].item<int64_t>(), 2);
  EXPECT_EQ(corner.counts.sum().item<int64_t>(), 2);
}

TEST_P(Hist2dApiTest, NonFiniteOnEitherSide) {
  Lists l = lists(4, 40, {{10, 3}, {17}});
  const auto put = [&](at::Tensor& t, std::vector<int64_t> idx, double v) {
    at::Tensor flat = t.view({-1});
    for (int64_t i : idx) flat[i] = v;
  };
  put(l.grads[0], {0, 5, 77}, kNaN);
  put(l.grads[0], {9}, kInf);
  put(l.grads[1], {3, 20}, -kInf);
  put(l.params[0], {4}, kNaN);   // column 4 of pair 0: B pairs left out
  put(l.params[1], {16}, kInf);
  put(l.grads[1], {16}, kNaN);   // both sides non-finite: counted once
  const Hist2d h = trainscope::grad_hist2d(l.grads, l.params);
  check(h, l, Hist2dOptions{}, "non-finite");
  EXPECT_GE(h.nonfinite.item<int64_t>(), 4 + 2 + 4 + 4);
}

TEST_P(Hist2dApiTest, MixedDtypesAcrossPairs) {
  const Lists l = make_lists(3, kShapes, {at::kFloat, at::kBFloat16, dtype(), at::kDouble, at::kHalf}, device(), 50);
  check(trainscope::grad_hist2d(l.grads, l.params), l, Hist2dOptions{}, "mixed dtypes");
}

TEST_P(Hist2dApiTest, Deterministic) {
  const Lists l = lists(6, 60, {{300, 20}, {2500}, {9}});
  const Hist2d a = trainscope::grad_hist2d(l.grads, l.params);
  for (int rep = 0; rep < 3; ++rep) {
    const Hist2d b = trainscope::grad_hist2d(l.grads, l.params);
    EXPECT_TRUE(at::equal(a.counts, b.counts)) << rep;
    EXPECT_TRUE(at::equal(a.nonfinite, b.nonfinite)) << rep;
  }
}

TEST_P(Hist2dApiTest, ParametersThatRequireGrad) {
  Lists l = lists(2, 70, {{4, 4}, {4}});
  for (at::Tensor& p : l.params) p = p.detach().requires_grad_(true);
  const Hist2d h = trainscope::grad_hist2d(l.grads, l.params);
  EXPECT_FALSE(h.counts.requires_grad());
  EXPECT_EQ(h.counts.sum().item<int64_t>() + h.nonfinite.item<int64_t>(), total_pairs(l));
}

INSTANTIATE_TEST_SUITE_P(AllDevicesAndDtypes, Hist2dApiTest, all_cases(), case_name);

// ---------------------------------------------------------------------------------------------
// Not parameterised by dtype

TEST(Hist2dApi, EmptyListsGiveZerosOnTheCpu) {
  Hist2dOptions o;
  o.nbins_grad = 5;
  o.nbins_param = 3;
  const Hist2d h = trainscope::grad_hist2d({}, {}, o);
  EXPECT_EQ(h.counts.sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_TRUE(h.counts.device().is_cpu());
  EXPECT_EQ(h.counts.sum().item<int64_t>(), 0);
  EXPECT_EQ(h.nonfinite.item<int64_t>(), 0);
}

TEST(Hist2dApi, LargeHistogramOnTheCpu) {
  // 2^21 bins: past the CPU's private per-task counters, so tasks add into the output directly;
  // 64 samples × 5000 parameters give the parallel loop several tasks.
  const Lists l = make_lists(64, {{5000}, {37, 3}}, {at::kFloat}, at::kCPU, 80);
  Hist2dOptions o;
  o.nbins_grad = 2048;
  o.nbins_param = 1024;
  const Hist2d h = trainscope::grad_hist2d(l.grads, l.params, o);
  const Reference r = reference(l, o);
  EXPECT_EQ(to_vector(h.counts), r.counts);
  EXPECT_EQ(h.nonfinite.item<int64_t>(), 0);
  o.nbins_grad = 100;
  o.nbins_param = 100;
  EXPECT_EQ(to_vector(trainscope::grad_hist2d(l.grads, l.params, o).counts), reference(l, o).counts);
}

TEST(Hist2dApi, BadListsNameTheArgument) {
  const Lists l = make_lists(3, {{4, 3}, {3}, {2, 2, 2}}, {at::kFloat}, at::kCPU, 90);
  const auto f = at::TensorOptions().dtype(at::kFloat);
  auto swap = [](std::vector<at::Tensor> v, size_t i, at::Tensor t) {
    v[i] = std::move(t);
    return v;
  };
  const std::vector<at::Tensor> g2(l.grads.begin(), l.grads.begin() + 2);
  const std::vector<at::Tensor> p2(l.params.begin(), l.params.begin() + 2);
  expect_error_naming([&] { trainscope::grad_hist2d(l.grads, p2); }, "params", "params shorter");
  expect_error_naming([&] { trainscope::grad_hist2d(g2, l.params); }, "per_sample_grads", "grads shorter");
  expect_error_naming([&] { trainscope::grad_hist2d(l.grads, swap(l.params, 1, at::zeros({4}, f))); },
                      "params[1]", "param shape");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 2, at::zeros({3, 2, 2, 3}, f)), l.params); },
                      "per_sample_grads[2]", "gradient shape");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 1, at::zeros({3}, f)), l.params); },
                      "per_sample_grads[1]", "gradient without the batch dimension");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 0, at::zeros({}, f)), swap(l.params, 0, at::zeros({}, f))); },
                      "per_sample_grads[0]", "0-d gradient");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 1, at::zeros({4, 3}, f)), l.params); },
                      "per_sample_grads[1]", "batch size differs");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 1, l.grads[1].to(at::kDouble)), l.params); },
                      "per_sample_grads[1]", "pair dtypes differ");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 2, at::ones({3, 2, 2, 2}, at::kInt)), l.params); },
                      "per_sample_grads[2]", "integer gradient");
  expect_error_naming([&] { trainscope::grad_hist2d(l.grads, swap(l.params, 0, at::ones({4, 3}, at::kLong))); },
                      "params[0]", "integer parameter");
  expect_error_naming([&] { trainscope::grad_hist2d(l.grads, swap(l.params, 1, at::ones({3}, at::kBool))); },
                      "params[1]", "bool parameter");
  expect_error_naming([&] { trainscope::grad_hist2d(swap(l.grads, 1, at::Tensor()), l.params); },
                      "per_sample_grads[1]", "undefined gradient");
  expect_error_naming([&] { trainscope::grad_hist2d(l.grads, swap(l.params, 2, at::Tensor())); }, "params[2]",
                      "undefined parameter");
}

TEST(Hist2dApi, BadOptionsNameTheArgument) {
  const Lists l = make_lists(2, {{4, 3}}, {at::kFloat}, at::kCPU, 91);
  struct Bad {
    const char* name;
    std::function<void(Hist2dOptions&)> set;
  };
  const std::vector<Bad> cases = {
      {"nbins_grad", [](Hist2dOptions& o) { o.nbins_grad = 0; }},
      {"nbins_grad", [](Hist2dOptions& o) { o.nbins_grad = -5; }},
      {"nbins_grad", [](Hist2dOptions& o) { o.nbins_grad = (int64_t{1} << 20) + 1; }},
      {"nbins_param", [](Hist2dOptions& o) { o.nbins_param = 0; }},
      {"nbins_param", [](Hist2dOptions& o) { o.nbins_param = (int64_t{1} << 20) + 1; }},
      {"maxval_grad", [](Hist2dOptions& o) { o.maxval_grad = 0.0; }},
      {"maxval_grad", [](Hist2dOptions& o) { o.maxval_grad = -0.05; }},
      {"maxval_grad", [](Hist2dOptions& o) { o.maxval_grad = kNaN; }},
      {"maxval_grad", [](Hist2dOptions& o) { o.maxval_grad = kInf; }},
      {"maxval_param", [](Hist2dOptions& o) { o.maxval_param = 0.0; }},
      {"maxval_param", [](Hist2dOptions& o) { o.maxval_param = kNaN; }},
      {"maxval_param", [](Hist2dOptions& o) { o.maxval_param = -kInf; }},
  };
  for (const Bad& b : cases) {
    Hist2dOptions o;
    b.set(o);
    expect_error_naming([&] { trainscope::grad_hist2d(l.grads, l.params, o); }, b.name, b.name);
    expect_error_naming([&] { trainscope::grad_hist2d({}, {}, o); }, b.name, std::string(b.name) + ", empty lists");
  }
  // Each axis allowed, the product past 2^24: the message names both and the limit.
  Hist2dOptions big;
  big.nbins_grad = 8192;
  big.nbins_param = 4096;
  try {
    trainscope::grad_hist2d(l.grads, l.params, big);
    ADD_FAILURE() << "8192 x 4096 bins were accepted";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_TRUE(names_argument(msg, "nbins_grad") && names_argument(msg, "nbins_param")) << msg;
    EXPECT_NE(msg.find("2^24"), std::string::npos) << msg;
  }
  big.nbins_grad = 4096;  // exactly 2^24 is fine
  EXPECT_EQ(trainscope::grad_hist2d(l.grads, l.params, big).counts.numel(), int64_t{1} << 24);
}

TEST(Hist2dApi, MixedDevicesNameTheArgument) {
  SKIP_WITHOUT_CUDA();
  const Lists l = make_lists(2, {{4, 3}, {5}}, {at::kFloat}, cuda0(), 92);
  std::vector<at::Tensor> g = l.grads, p = l.params;
  g[1] = g[1].cpu();
  expect_error_naming([&] { trainscope::grad_hist2d(g, l.params); }, "per_sample_grads[1]", "gradient on the CPU");
  p[0] = p[0].cpu();
  expect_error_naming([&] { trainscope::grad_hist2d(l.grads, p); }, "params[0]", "parameter on the CPU");
}

}  // namespace
