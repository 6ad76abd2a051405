// The LibTorch API of include/trainscope/param_stats.h against a float64 reference computed
// here with ATen ops in double (SPEC.md §1, §4, §5): every dtype, non-contiguous inputs, empty
// tensors, the θ_prev refresh, weight matrices only, histograms, non-finite counts, loss, bin
// edges, and the errors bad input must raise. Each case runs on CPU, and on CUDA when a GPU is
// present (skipped otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "tests/cpp/torch_test_util.h"
#include "trainscope/param_stats.h"

namespace {

using namespace trainscope_test;
using trainscope::Metric;
using trainscope::ParamStats;
using trainscope::ParamStatsOptions;

const Metric kMetrics[] = {Metric::kGradNorm,  Metric::kGradMagnitude, Metric::kWeightMagnitude,
                           Metric::kDistance,  Metric::kUpdateSize,    Metric::kWeightNorm,
                           Metric::kUpdateRatio};

// Matrices, vectors, a scalar, and empty tensors between non-empty ones.
const std::vector<std::vector<int64_t>> kShapes = {{7, 13}, {0}, {129}, {3, 0, 5}, {33, 65}, {},
                                                   {1}, {4, 5, 6}, {1000}, {2, 0}};

struct Lists {
  std::vector<at::Tensor> grads, params, init, prev;
};

// g ~ N(0, 0.03²) (inliers and outliers of the default histogram range), θ ~ N(0, 1),
// θ₀ = θ + N(0, 0.1²), θ_prev = θ + N(0, 0.01²); made in float64 on the CPU, then cast.
Lists make_lists(const std::vector<std::vector<int64_t>>& shapes,
                 const std::vector<at::ScalarType>& dtypes, at::Device device, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Lists l;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const at::IntArrayRef shape(shapes[i]);
    const at::Tensor p = at::randn(shape, gen, f64);
    const at::Tensor g = 0.03 * at::randn(shape, gen, f64);
    const at::Tensor p0 = p + 0.1 * at::randn(shape, gen, f64);
    const at::Tensor pp = p + 0.01 * at::randn(shape, gen, f64);
    const auto opt = at::TensorOptions().dtype(dtypes[i % dtypes.size()]).device(device);
    l.grads.push_back(g.to(opt));
    l.params.push_back(p.to(opt));
    l.init.push_back(p0.to(opt));
    l.prev.push_back(pp.to(opt));
  }
  return l;
}

// Per-tensor sums in float64: Σg², Σ|g|, Σ|θ|, Σ(θ−θ₀)², Σ(θ−θ_prev)², Σθ², in Metric order (the
// update ratio has no sum of its own).
struct Reference {
  std::vector<std::array<double, 6>> sums;
  std::vector<double> numel;
  std::vector<bool> matrix;  // dim ≥ 2
};

Reference reference(const Lists& l) {
  Reference r;
  const size_t n = std::max({l.grads.size(), l.params.size()});
  for (size_t i = 0; i < n; ++i) {
    std::array<double, 6> s{kNaN, kNaN, kNaN, kNaN, kNaN, kNaN};
    const at::Tensor& any = !l.grads.empty() ? l.grads[i] : l.params[i];
    if (!l.grads.empty()) {
      const at::Tensor g = as_double_cpu(l.grads[i]);
      s[0] = g.square().sum().item<double>();
      s[1] = g.abs().sum().item<double>();
    }
    if (!l.params.empty()) {
      const at::Tensor p = as_double_cpu(l.params[i]);
      s[2] = p.abs().sum().item<double>();
      s[5] = p.square().sum().item<double>();
      if (!l.init.empty()) s[3] = (p - as_double_cpu(l.init[i])).square().sum().item<double>();
      if (!l.prev.empty()) s[4] = (p - as_double_cpu(l.prev[i])).square().sum().item<double>();
    }
    r.sums.push_back(s);
    r.numel.push_back(static_cast<double>(any.numel()));
    r.matrix.push_back(any.dim() >= 2);
  }
  return r;
}

double from_sum(Metric m, double sum, double count) {
  if (m == Metric::kGradMagnitude || m == Metric::kWeightMagnitude) return sum / count;
  return std::sqrt(sum);
}

double expected_tensor(const Reference& r, size_t t, Metric m) {
  if (m == Metric::kUpdateRatio) return expected_tensor(r, t, Metric::kUpdateSize) / expected_tensor(r, t, Metric::kWeightNorm);
  const int k = static_cast<int>(m);
  return from_sum(m, r.sums[t][k], r.numel[t]);
}

double expected_global(const Reference& r, Metric m, bool matrices_only = false) {
  if (m == Metric::kUpdateRatio) return expected_global(r, Metric::kUpdateSize) / expected_global(r, Metric::kWeightNorm);
  const int k = static_cast<int>(m);
  double sum = 0.0, count = 0.0;
  for (size_t t = 0; t < r.sums.size(); ++t) {
    if (m == Metric::kWeightMagnitude && matrices_only && !r.matrix[t]) continue;
    sum += r.sums[t][k];
    count += r.numel[t];
  }
  return from_sum(m, sum, count);
}

// ---------------------------------------------------------------------------------------------
// Parameterised over device and dtype

class ParamStatsApiTest : public DeviceDtypeTest {
 protected:
  Lists lists(uint64_t seed, const std::vector<std::vector<int64_t>>& shapes = kShapes) const {
    return make_lists(shapes, {dtype()}, device(), seed);
  }
  // SPEC.md §5: float32 results within 1e-5 of float64; float64 data keeps float64 accuracy.
  double tolerance() const { return dtype() == at::kDouble ? 1e-10 : 1e-5; }
  at::ScalarType result_dtype() const { return dtype() == at::kDouble ? at::kDouble : at::kFloat; }

  // Every output of a fused call against the reference.
  void check_stats(const ParamStats& s, const Lists& l, const ParamStatsOptions& o, const char* context) const {
    SCOPED_TRACE(context);
    const Reference r = reference(l);
    const int64_t T = static_cast<int64_t>(r.sums.size());
    ASSERT_EQ(s.metrics.sizes(), (std::vector<int64_t>{trainscope::kNumMetrics}));
    ASSERT_EQ(s.per_tensor.sizes(), (std::vector<int64_t>{T, trainscope::kNumMetrics}));
    ASSERT_EQ(s.nonfinite.dim(), 0);
    ASSERT_EQ(s.nonfinite_per_tensor.sizes(), (std::vector<int64_t>{T}));
    EXPECT_EQ(s.metrics.scalar_type(), result_dtype());
    EXPECT_EQ(s.per_tensor.scalar_type(), result_dtype());
    EXPECT_EQ(s.nonfinite.scalar_type(), at::kLong);
    EXPECT_EQ(s.nonfinite_per_tensor.scalar_type(), at::kLong);
    for (const at::Tensor* t : {&s.metrics, &s.per_tensor, &s.nonfinite, &s.nonfinite_per_tensor, &s.hist,
                                &s.hist_per_tensor}) {
      expect_on_device(*t, "result");
    }
    const at::Tensor per = as_double_cpu(s.per_tensor);
    for (Metric m : kMetrics) {
      SCOPED_TRACE(trainscope::metric_name(m));
      EXPECT_CLOSE(value(s.metric(m)), expected_global(r, m, o.weights_matrices_only), tolerance());
      for (int64_t t = 0; t < T; ++t) {
        EXPECT_CLOSE(per[t][static_cast<int64_t>(m)].item<double>(), expected_tensor(r, static_cast<size_t>(t), m),
                     tolerance())
            << "tensor " << t;
      }
    }
    if (!l.grads.empty() && o.histogram) {
      ASSERT_EQ(s.hist.sizes(), (std::vector<int64_t>{o.nbins}));
      ASSERT_EQ(s.hist_per_tensor.sizes(), (std::vector<int64_t>{T, o.nbins}));
      EXPECT_EQ(s.hist.scalar_type(), at::kLong);
      const std::vector<int64_t> hist_pt = to_vector(s.hist_per_tensor);
      std::vector<int64_t> want_global(static_cast<size_t>(o.nbins), 0);
      for (int64_t t = 0; t < T; ++t) {
        const std::vector<int64_t> want = reference_hist(l.grads[t], o.nbins, o.maxval);
        const std::vector<int64_t> got(hist_pt.begin() + t * o.nbins, hist_pt.begin() + (t + 1) * o.nbins);
        EXPECT_EQ(got, want) << "histogram of tensor " << t;
        for (size_t b = 0; b < want.size(); ++b) want_global[b] += want[b];
      }
      EXPECT_EQ(to_vector(s.hist), want_global);
    }
  }
};

TEST_P(ParamStatsApiTest, FusedCallMatchesReference) {
  const Lists l = lists(1);
  const ParamStatsOptions o;
  const ParamStats s = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  check_stats(s, l, o, "default options");
  EXPECT_EQ(value(s.nonfinite), 0.0);
  EXPECT_EQ(to_vector(s.nonfinite_per_tensor), std::vector<int64_t>(kShapes.size(), 0));
}

TEST_P(ParamStatsApiTest, OptionsAndPartialLists) {
  const Lists l = lists(2);
  for (int64_t nbins : {int64_t{1}, int64_t{7}, int64_t{1537}}) {
    for (double maxval : {0.01, 1.0}) {
      ParamStatsOptions o;
      o.nbins = nbins;
      o.maxval = maxval;
      check_stats(trainscope::param_stats(l.grads, l.params, l.init, l.prev, o), l, o, "nbins/maxval");
    }
  }
  // Lists not given: their metrics are NaN, the others unchanged.
  ParamStatsOptions no_hist;
  no_hist.histogram = false;
  const ParamStats only_params = trainscope::param_stats({}, l.params, {}, {}, no_hist);
  EXPECT_TRUE(std::isnan(value(only_params.metric(Metric::kGradNorm))));
  EXPECT_TRUE(std::isnan(value(only_params.metric(Metric::kGradMagnitude))));
  EXPECT_TRUE(std::isnan(value(only_params.metric(Metric::kDistance))));
  EXPECT_TRUE(std::isnan(value(only_params.metric(Metric::kUpdateSize))));
  EXPECT_CLOSE(value(only_params.metric(Metric::kWeightMagnitude)),
               expected_global(reference(l), Metric::kWeightMagnitude), tolerance());
  EXPECT_EQ(only_params.per_tensor.size(0), static_cast<int64_t>(kShapes.size()));
  EXPECT_EQ(only_params.hist.numel(), 0) << "no histogram asked for";

  const ParamStats only_grads = trainscope::param_stats(l.grads, {}, {}, {}, ParamStatsOptions{});
  EXPECT_CLOSE(value(only_grads.metric(Metric::kGradNorm)), expected_global(reference(l), Metric::kGradNorm),
               tolerance());
  EXPECT_TRUE(std::isnan(value(only_grads.metric(Metric::kWeightMagnitude))));
}

TEST_P(ParamStatsApiTest, SingleMetricFunctionsMatchReference) {
  const Lists l = lists(3);
  const Reference r = reference(l);
  const int64_t T = static_cast<int64_t>(kShapes.size());
  struct Single {
    Metric m;
    std::function<at::Tensor(bool)> call;
  };
  const std::vector<Single> singles = {
      {Metric::kGradNorm, [&](bool pt) { return trainscope::grad_norm(l.grads, pt); }},
      {Metric::kGradMagnitude, [&](bool pt) { return trainscope::grad_magnitude(l.grads, pt); }},
      {Metric::kWeightMagnitude, [&](bool pt) { return trainscope::weight_magnitude(l.params, pt); }},
      {Metric::kDistance, [&](bool pt) { return trainscope::distance(l.params, l.init, pt); }},
      {Metric::kUpdateSize, [&](bool pt) { return trainscope::update_size(l.params, l.prev, pt); }},
      {Metric::kWeightNorm, [&](bool pt) { return trainscope::weight_norm(l.params, pt); }},
      {Metric::kUpdateRatio, [&](bool pt) { return trainscope::update_ratio(l.params, l.prev, pt); }},
  };
  for (const Single& s : singles) {
    SCOPED_TRACE(trainscope::metric_name(s.m));
    const at::Tensor global = s.call(false);
    ASSERT_EQ(global.dim(), 0);
    EXPECT_EQ(global.scalar_type(), result_dtype());
    expect_on_device(global, "global");
    EXPECT_CLOSE(value(global), expected_global(r, s.m), tolerance());
    const at::Tensor per = s.call(true);
    ASSERT_EQ(per.sizes(), (std::vector<int64_t>{T}));
    expect_on_device(per, "per tensor");
    const at::Tensor per_d = as_double_cpu(per);
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_CLOSE(per_d[t].item<double>(), expected_tensor(r, static_cast<size_t>(t), s.m), tolerance())
          << "tensor " << t;
    }
  }
}

TEST_P(ParamStatsApiTest, NonContiguousInputs) {
  // Transposed matrices, every other element of a vector, a channel slice of a 3-D tensor.
  const Lists base = lists(4, {{13, 7}, {258}, {4, 6, 5}, {0, 3}, {40, 33}});
  auto strided = [](const std::vector<at::Tensor>& v) {
    return std::vector<at::Tensor>{v[0].t(), v[1].slice(0, 0, 258, 2), v[2].select(2, 1), v[3].t(),
                                   v[4].slice(1, 3, 30).t()};
  };
  const Lists l = {strided(base.grads), strided(base.params), strided(base.init), strided(base.prev)};
  for (const at::Tensor& t : l.grads) {
    if (t.numel() > 1) {
      EXPECT_FALSE(t.is_contiguous());
    }
  }
  const ParamStatsOptions o;
  check_stats(trainscope::param_stats(l.grads, l.params, l.init, l.prev, o), l, o, "non-contiguous");
  const Reference r = reference(l);
  EXPECT_CLOSE(value(trainscope::grad_norm(l.grads)), expected_global(r, Metric::kGradNorm), tolerance());
  EXPECT_EQ(to_vector(trainscope::grad_hist1d(l.grads, 100, 0.05, true)),
            to_vector(trainscope::param_stats(l.grads, {}, {}, {}, o).hist_per_tensor));
}

TEST_P(ParamStatsApiTest, EmptyTensorsAreSkipped) {
  const Lists l = lists(5, {{0}, {50}, {0, 4}, {0}, {3, 9}, {0}});
  const Lists dense = {{l.grads[1], l.grads[4]}, {l.params[1], l.params[4]}, {l.init[1], l.init[4]},
                       {l.prev[1], l.prev[4]}};
  const ParamStatsOptions o;
  const ParamStats s = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  const ParamStats sd = trainscope::param_stats(dense.grads, dense.params, dense.init, dense.prev, o);
  check_stats(s, l, o, "with empty tensors");
  for (Metric m : kMetrics) {
    EXPECT_CLOSE(value(s.metric(m)), value(sd.metric(m)), 1e-12) << trainscope::metric_name(m);
  }
  EXPECT_EQ(to_vector(s.hist), to_vector(sd.hist));
  const at::Tensor per = as_double_cpu(s.per_tensor);
  for (int64_t t : {0, 2, 3, 5}) {
    EXPECT_EQ(per[t][static_cast<int64_t>(Metric::kGradNorm)].item<double>(), 0.0) << t;
    EXPECT_EQ(per[t][static_cast<int64_t>(Metric::kDistance)].item<double>(), 0.0) << t;
    EXPECT_EQ(per[t][static_cast<int64_t>(Metric::kUpdateSize)].item<double>(), 0.0) << t;
    EXPECT_TRUE(std::isnan(per[t][static_cast<int64_t>(Metric::kGradMagnitude)].item<double>())) << t;
    EXPECT_TRUE(std::isnan(per[t][static_cast<int64_t>(Metric::kWeightMagnitude)].item<double>())) << t;
    EXPECT_EQ(as_double_cpu(s.hist_per_tensor[t]).sum().item<double>(), 0.0) << t;
  }

  // Only empty tensors: norms 0, means of nothing NaN, an all-zero histogram.
  const Lists empty = lists(6, {{0}, {0, 3}});
  const ParamStats se = trainscope::param_stats(empty.grads, empty.params, empty.init, empty.prev, o);
  EXPECT_EQ(value(se.metric(Metric::kGradNorm)), 0.0);
  EXPECT_TRUE(std::isnan(value(se.metric(Metric::kGradMagnitude))));
  EXPECT_TRUE(std::isnan(value(se.metric(Metric::kWeightMagnitude))));
  EXPECT_EQ(value(se.nonfinite), 0.0);
  EXPECT_EQ(to_vector(se.hist), std::vector<int64_t>(100, 0));
}

TEST_P(ParamStatsApiTest, RefreshPrevCopiesParamsAfterReadingThem) {
  Lists l = lists(7);
  // One θ_prev non-contiguous: the refresh must land in the caller's tensor, not in a copy.
  const at::Tensor prev_t_storage = l.prev[0].t().contiguous();
  l.prev[0] = prev_t_storage.t();
  ASSERT_FALSE(l.prev[0].is_contiguous());
  const Lists before = {l.grads, l.params, l.init, [&] {
                          std::vector<at::Tensor> c;
                          for (const auto& t : l.prev) c.push_back(t.clone());
                          return c;
                        }()};
  ParamStatsOptions o;
  o.refresh_prev = true;
  const ParamStats s = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  check_stats(s, before, o, "update size from θ_prev before the refresh");
  for (size_t i = 0; i < l.prev.size(); ++i) {
    EXPECT_TRUE(at::equal(l.prev[i], l.params[i])) << "θ_prev[" << i << "] was not refreshed";
  }
  const ParamStats again = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  EXPECT_EQ(value(again.metric(Metric::kUpdateSize)), 0.0);
  EXPECT_EQ(as_double_cpu(again.metric_per_tensor(Metric::kUpdateSize)).abs().max().item<double>(), 0.0);

  // Without the option θ_prev stays as it was.
  Lists k = lists(8);
  std::vector<at::Tensor> prev_copy;
  for (const auto& t : k.prev) prev_copy.push_back(t.clone());
  (void)trainscope::param_stats(k.grads, k.params, k.init, k.prev, ParamStatsOptions{});
  for (size_t i = 0; i < k.prev.size(); ++i) EXPECT_TRUE(at::equal(k.prev[i], prev_copy[i])) << i;
}

TEST_P(ParamStatsApiTest, WeightMagnitudeOverMatricesOnly) {
  const Lists l = lists(9);
  const Reference r = reference(l);
  ParamStatsOptions o;
  o.weights_matrices_only = true;
  const ParamStats s = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  check_stats(s, l, o, "matrices only");  // per-tensor magnitudes still cover every tensor
  const double all = expected_global(r, Metric::kWeightMagnitude, false);
  const double matrices = expected_global(r, Metric::kWeightMagnitude, true);
  ASSERT_NE(all, matrices);
  EXPECT_CLOSE(value(trainscope::weight_magnitude(l.params, false, true)), matrices, tolerance());
  EXPECT_CLOSE(value(trainscope::weight_magnitude(l.params, false, false)), all, tolerance());
  EXPECT_CLOSE(value(trainscope::weight_magnitude(l.params)), all, tolerance()) << "default: every tensor";

  // No matrix at all: the mean over nothing is NaN.
  const Lists vectors = lists(10, {{5}, {}, {17}});
  EXPECT_TRUE(std::isnan(value(trainscope::weight_magnitude(vectors.params, false, true))));
}

TEST_P(ParamStatsApiTest, HistogramsAreExact) {
  Lists l = lists(11, {{64, 33}, {0}, {5000}, {1}, {9, 9, 9}});
  for (int64_t nbins : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{100}, int64_t{1536}, int64_t{1537},
                        int64_t{65536}}) {
    for (double maxval : {0.05, 1.0}) {
      SCOPED_TRACE(testing::Message() << "nbins=" << nbins << " maxval=" << maxval);
      // ±maxval, far outliers, NaN and ±Inf, and values at the rounded bin edges −m + k·w.
      const double w = 2.0 * maxval / static_cast<double>(nbins);
      at::Tensor g = as_double_cpu(l.grads[2]);
      const at::Tensor k = (at::arange(4000, at::kLong) * 7919).remainder(nbins + 1).to(at::kDouble);
      g.narrow(0, 0, 4000).copy_(k * w - maxval);
      g[4000] = maxval;
      g[4001] = -maxval;
      g[4002] = 1e4;
      g[4003] = -1e4;
      g[4004] = kNaN;
      g[4005] = kInf;
      g[4006] = -kInf;
      std::vector<at::Tensor> grads = l.grads;
      grads[2] = g.to(l.grads[2].options());

      const at::Tensor global = trainscope::grad_hist1d(grads, nbins, maxval);
      const at::Tensor per = trainscope::grad_hist1d(grads, nbins, maxval, true);
      ASSERT_EQ(global.sizes(), (std::vector<int64_t>{nbins}));
      ASSERT_EQ(per.sizes(), (std::vector<int64_t>{static_cast<int64_t>(grads.size()), nbins}));
      EXPECT_EQ(global.scalar_type(), at::kLong);
      EXPECT_EQ(per.scalar_type(), at::kLong);
      expect_on_device(global, "histogram");
      std::vector<int64_t> want_global(static_cast<size_t>(nbins), 0);
      int64_t finite = 0;
      for (size_t t = 0; t < grads.size(); ++t) {
        const std::vector<int64_t> want = reference_hist(grads[t], nbins, maxval);
        EXPECT_EQ(to_vector(per[static_cast<int64_t>(t)]), want) << "tensor " << t;
        for (size_t b = 0; b < want.size(); ++b) want_global[b] += want[b];
        finite += as_double_cpu(grads[t]).isfinite().sum().item<int64_t>();
      }
      const std::vector<int64_t> got = to_vector(global);
      EXPECT_EQ(got, want_global);
      EXPECT_EQ(std::accumulate(got.begin(), got.end(), int64_t{0}), finite) << "counts sum to the finite elements";
    }
  }
}

TEST_P(ParamStatsApiTest, NonfiniteCounts) {
  Lists l = lists(12);
  std::vector<int64_t> want(l.grads.size(), 0);
  // Tensor 0: NaNs; tensor 2: ±Inf only; tensor 4: both; the others finite.
  auto poison = [&](size_t t, const std::vector<double>& values) {
    at::Tensor g = as_double_cpu(l.grads[t]).reshape({-1});
    for (size_t k = 0; k < values.size(); ++k) g[static_cast<int64_t>(k * 5)] = values[k];
    l.grads[t] = g.reshape(l.grads[t].sizes()).to(l.grads[t].options());
    want[t] = static_cast<int64_t>(values.size());
  };
  poison(0, {kNaN, kNaN, kNaN});
  poison(2, {kInf, -kInf});
  poison(4, {kNaN, kInf, -kInf, kNaN});
  const int64_t total = std::accumulate(want.begin(), want.end(), int64_t{0});

  const at::Tensor count = trainscope::nonfinite_count(l.grads);
  ASSERT_EQ(count.dim(), 0);
  EXPECT_EQ(count.scalar_type(), at::kLong);
  expect_on_device(count, "nonfinite_count");
  EXPECT_EQ(to_vector(count), std::vector<int64_t>{total});
  EXPECT_EQ(to_vector(trainscope::nonfinite_count(l.grads, true)), want);

  const ParamStatsOptions o;
  const ParamStats s = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  check_stats(s, l, o, "with non-finite gradients");  // NaN/Inf norms per tensor, bins skip them
  EXPECT_EQ(to_vector(s.nonfinite), std::vector<int64_t>{total});
  EXPECT_EQ(to_vector(s.nonfinite_per_tensor), want);
  const at::Tensor gn = as_double_cpu(trainscope::grad_norm(l.grads, true));
  EXPECT_TRUE(std::isnan(gn[0].item<double>()));
  EXPECT_EQ(gn[2].item<double>(), kInf);
  EXPECT_TRUE(std::isnan(gn[4].item<double>()));
  EXPECT_TRUE(std::isfinite(gn[6].item<double>()));
  EXPECT_TRUE(std::isfinite(value(s.metric(Metric::kWeightMagnitude))));
}

TEST_P(ParamStatsApiTest, LossIsTheMeanOfPerSampleLosses) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(13);
  const at::Tensor base = at::rand({257}, gen, at::TensorOptions().dtype(at::kDouble)) * 3.0;
  const at::Tensor losses = base.to(at::TensorOptions().dtype(dtype()).device(device()));
  for (const at::Tensor& x : {losses, losses.slice(0, 0, 257, 3)}) {
    const at::Tensor got = trainscope::loss(x);
    ASSERT_EQ(got.dim(), 0);
    EXPECT_EQ(got.scalar_type(), result_dtype()) << "accumulated and returned in at least float32";
    expect_on_device(got, "loss");
    EXPECT_CLOSE(value(got), as_double_cpu(x).mean().item<double>(), tolerance());
  }
}

TEST_P(ParamStatsApiTest, RepeatedCallsAreBitwiseEqual) {
  const Lists l = lists(14, {{300, 301}, {0}, {70000}, {5}});
  const ParamStatsOptions o;
  const ParamStats a = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  for (int rep = 0; rep < 3; ++rep) {
    const ParamStats b = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
    // at::equal treats NaN as unequal: compare the bytes of the float results instead.
    EXPECT_TRUE(at::equal(a.metrics.view(at::kByte), b.metrics.view(at::kByte))) << rep;
    EXPECT_TRUE(at::equal(a.per_tensor.view(at::kByte), b.per_tensor.view(at::kByte))) << rep;
    EXPECT_TRUE(at::equal(a.hist, b.hist)) << rep;
    EXPECT_TRUE(at::equal(a.hist_per_tensor, b.hist_per_tensor)) << rep;
    EXPECT_TRUE(at::equal(a.nonfinite_per_tensor, b.nonfinite_per_tensor)) << rep;
  }
}

TEST_P(ParamStatsApiTest, BadInputRaisesErrorsNamingTheArgument) {
  const Lists l = lists(15, {{4, 3}, {6}, {2, 2}});
  const auto opt = at::TensorOptions().dtype(dtype()).device(device());
  auto drop_last = [](std::vector<at::Tensor> v) {
    v.pop_back();
    return v;
  };
  auto replace = [](std::vector<at::Tensor> v, size_t i, at::Tensor t) {
    v[i] = std::move(t);
    return v;
  };
  const ParamStatsOptions o;

  // Mismatched list lengths.
  expect_error_naming([&] { trainscope::param_stats(l.grads, drop_last(l.params), l.init, l.prev, o); },
                      "params", "params shorter than grads");
  expect_error_naming([&] { trainscope::param_stats(l.grads, l.params, drop_last(l.init), l.prev, o); },
                      "init_params", "init_params shorter");
  expect_error_naming([&] { trainscope::distance(l.params, drop_last(l.init)); }, "init_params",
                      "distance: init_params shorter");
  expect_error_naming([&] { trainscope::update_size(l.params, drop_last(l.prev)); }, "prev_params",
                      "update_size: prev_params shorter");

  // Mismatched shapes and dtypes within a pair.
  expect_error_naming(
      [&] { trainscope::param_stats(l.grads, replace(l.params, 1, at::zeros({7}, opt)), {}, {}, o); }, "params",
      "params[1] shape");
  expect_error_naming(
      [&] { trainscope::param_stats(l.grads, l.params, replace(l.init, 0, at::zeros({3, 4}, opt)), {}, o); },
      "init_params", "init_params[0] shape (transposed)");
  expect_error_naming([&] { trainscope::update_size(l.params, replace(l.prev, 2, at::zeros({4}, opt))); },
                      "prev_params", "prev_params[2] shape");
  const at::ScalarType other = dtype() == at::kDouble ? at::kFloat : at::kDouble;
  expect_error_naming(
      [&] { trainscope::param_stats(l.grads, replace(l.params, 0, l.params[0].to(other)), {}, {}, o); }, "params",
      "params[0] dtype");

  // Integer tensors.
  const at::Tensor ints = at::ones({6}, at::TensorOptions().dtype(at::kLong).device(device()));
  expect_error_naming([&] { trainscope::param_stats(replace(l.grads, 1, ints), {}, {}, {}, o); }, "grads",
                      "integer grads");
  expect_error_naming([&] { trainscope::grad_norm(replace(l.grads, 1, ints)); }, "grads", "grad_norm integer");
  expect_error_naming([&] { trainscope::grad_magnitude(replace(l.grads, 1, ints)); }, "grads",
                      "grad_magnitude integer");
  expect_error_naming([&] { trainscope::weight_magnitude({ints}); }, "params", "weight_magnitude integer");
  expect_error_naming([&] { trainscope::grad_hist1d({ints}); }, "tensors", "grad_hist1d integer");
  expect_error_naming([&] { trainscope::nonfinite_count({ints}); }, "tensors", "nonfinite_count integer");
  expect_error_naming([&] { trainscope::loss(ints.to(at::kInt)); }, "losses", "loss integer");

  // Histogram parameters.
  expect_error_naming([&] { trainscope::grad_hist1d(l.grads, 0); }, "nbins", "grad_hist1d nbins=0");
  expect_error_naming([&] { trainscope::grad_hist1d(l.grads, -3); }, "nbins", "grad_hist1d nbins<0");
  expect_error_naming([&] { trainscope::grad_hist1d(l.grads, 100, 0.0); }, "maxval", "grad_hist1d maxval=0");
  expect_error_naming([&] { trainscope::hist_bin_edges(0); }, "nbins", "hist_bin_edges nbins=0");
  expect_error_naming([&] { trainscope::hist_bin_edges(10, -1.0); }, "maxval", "hist_bin_edges maxval<0");
  ParamStatsOptions zero_bins;
  zero_bins.nbins = 0;
  expect_error_naming([&] { trainscope::param_stats(l.grads, l.params, l.init, l.prev, zero_bins); }, "nbins",
                      "param_stats nbins=0");

  // Refreshing θ_prev without θ_prev.
  ParamStatsOptions refresh;
  refresh.refresh_prev = true;
  expect_error_naming([&] { trainscope::param_stats(l.grads, l.params, l.init, {}, refresh); }, "prev_params",
                      "refresh_prev without prev_params");

  // Errors come before any work: a bad last pair leaves θ_prev untouched.
  std::vector<at::Tensor> prev;
  for (const auto& t : l.prev) prev.push_back(t.clone());
  const at::Tensor prev0 = prev[0].clone();
  std::vector<at::Tensor> bad_init = replace(l.init, 2, at::zeros({5}, opt));
  expect_error_naming([&] { trainscope::param_stats(l.grads, l.params, bad_init, prev, refresh); }, "init_params",
                      "bad init_params[2] with refresh");
  EXPECT_TRUE(at::equal(prev[0], prev0)) << "θ_prev changed although the call was rejected";
}

TEST_P(ParamStatsApiTest, HistBinEdges) {
  for (int64_t nbins : {int64_t{1}, int64_t{100}, int64_t{1000}}) {
    for (double maxval : {0.05, 2.0}) {
      const at::Tensor e = trainscope::hist_bin_edges(nbins, maxval, device());
      ASSERT_EQ(e.sizes(), (std::vector<int64_t>{nbins + 1}));
      EXPECT_EQ(e.scalar_type(), at::kDouble);
      expect_on_device(e, "edges");
      const at::Tensor c = as_double_cpu(e);
      EXPECT_EQ(c[0].item<double>(), -maxval);
      EXPECT_EQ(c[nbins].item<double>(), maxval);
      const double w = 2.0 * maxval / static_cast<double>(nbins);
      for (int64_t k = 0; k <= nbins; ++k) {
        EXPECT_NEAR(c[k].item<double>(), -maxval + static_cast<double>(k) * w, 1e-12 * maxval) << k;
      }
    }
  }
  // The default: 100 bins over [−0.05, 0.05] on the CPU.
  const at::Tensor d = trainscope::hist_bin_edges();
  EXPECT_EQ(d.numel(), 101);
  EXPECT_TRUE(d.device().is_cpu());
}

// One bfloat16 tensor of 2^31 + 5 elements (4 GiB): 64-bit offsets, and a bin count past 2^31.
void check_tensor_over_2_to_31(at::Device device) {
  const int64_t n = (int64_t{1} << 31) + 5;
  at::Tensor g;
  try {
    g = at::full({n}, 0.5, at::TensorOptions().dtype(at::kBFloat16).device(device));
  } catch (const c10::Error&) {
    GTEST_SKIP() << "cannot allocate " << n << " bfloat16 elements";
  }
  // Distinct values past index 2^31, where 32-bit offsets would wrap, and in the last element.
  const int64_t at_small = (int64_t{1} << 31) + 1;
  g.narrow(0, at_small, 1).fill_(-0.01);
  g.narrow(0, n - 1, 1).fill_(0.0);
  const double small = value(g[at_small]);
  const double wide = static_cast<double>(n - 2);  // elements holding 0.5

  const ParamStats s = trainscope::param_stats({g}, {}, {}, {}, ParamStatsOptions{});
  const double w = 2.0 * 0.05 / 100.0;
  std::vector<int64_t> hist(100, 0);
  hist[99] = n - 2;  // 0.5 is an outlier: last bin; the count itself passes 2^31
  hist[static_cast<size_t>(std::floor((small + 0.05) / w))] += 1;
  hist[static_cast<size_t>(std::floor(0.05 / w))] += 1;
  EXPECT_EQ(to_vector(s.hist), hist);
  EXPECT_EQ(to_vector(s.hist_per_tensor), hist);
  EXPECT_EQ(to_vector(s.nonfinite), std::vector<int64_t>{0});
  EXPECT_CLOSE(value(s.metric(Metric::kGradNorm)), std::sqrt(wide * 0.25 + small * small), 1e-5);
  EXPECT_CLOSE(value(s.metric(Metric::kGradMagnitude)), (wide * 0.5 + std::fabs(small)) / static_cast<double>(n),
               1e-5);
}

INSTANTIATE_TEST_SUITE_P(AllDevicesAndDtypes, ParamStatsApiTest, all_cases(), case_name);

// ---------------------------------------------------------------------------------------------
// Not parameterised by dtype

TEST(ParamStatsApi, MetricNames) {
  EXPECT_STREQ(trainscope::metric_name(Metric::kGradNorm), "grad_norm");
  EXPECT_STREQ(trainscope::metric_name(Metric::kGradMagnitude), "grad_magnitude");
  EXPECT_STREQ(trainscope::metric_name(Metric::kWeightMagnitude), "weight_magnitude");
  EXPECT_STREQ(trainscope::metric_name(Metric::kDistance), "distance");
  EXPECT_STREQ(trainscope::metric_name(Metric::kUpdateSize), "update_size");
  EXPECT_STREQ(trainscope::metric_name(Metric::kWeightNorm), "weight_norm");
  EXPECT_STREQ(trainscope::metric_name(Metric::kUpdateRatio), "update_ratio");
  EXPECT_EQ(trainscope::kNumMetrics, 7);
}

void check_mixed_dtype_list(at::Device device) {
  // One list may mix dtypes across positions; each pair keeps one dtype. Results are float32.
  const Lists l = make_lists(kShapes, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}, device, 16);
  const ParamStats s = trainscope::param_stats(l.grads, l.params, l.init, l.prev, ParamStatsOptions{});
  EXPECT_EQ(s.metrics.scalar_type(), at::kFloat);
  const Reference r = reference(l);
  for (Metric m : kMetrics) {
    EXPECT_CLOSE(value(s.metric(m)), expected_global(r, m), 1e-5) << trainscope::metric_name(m);
  }
  std::vector<int64_t> want(100, 0);
  for (const at::Tensor& g : l.grads) {
    const std::vector<int64_t> h = reference_hist(g, 100, 0.05);
    for (size_t b = 0; b < h.size(); ++b) want[b] += h[b];
  }
  EXPECT_EQ(to_vector(s.hist), want);
}

TEST(ParamStatsApi, MixedDtypeListOnCpu) { check_mixed_dtype_list(at::kCPU); }

TEST(ParamStatsApi, MixedDtypeListOnCuda) {
  SKIP_WITHOUT_CUDA();
  check_mixed_dtype_list(cuda0());
}

TEST(ParamStatsApi, TensorOfMoreThan2To31ElementsOnCpu) { check_tensor_over_2_to_31(at::kCPU); }

TEST(ParamStatsApi, TensorOfMoreThan2To31ElementsOnCuda) {
  SKIP_WITHOUT_CUDA();
  check_tensor_over_2_to_31(cuda0());
}

TEST(ParamStatsApi, TensorsOnDifferentDevicesAreRejected) {
  SKIP_WITHOUT_CUDA();
  const Lists l = make_lists({{4, 3}, {6}}, {at::kFloat}, cuda0(), 17);
  std::vector<at::Tensor> params_cpu = l.params;
  params_cpu[1] = params_cpu[1].cpu();
  expect_error_naming([&] { trainscope::param_stats(l.grads, params_cpu, {}, {}, ParamStatsOptions{}); },
                      "params", "params[1] on the CPU");
  std::vector<at::Tensor> grads_mixed = l.grads;
  grads_mixed[0] = grads_mixed[0].cpu();
  expect_error_naming([&] { trainscope::grad_norm(grads_mixed); }, "grads", "grads on two devices");
}

}  // namespace
