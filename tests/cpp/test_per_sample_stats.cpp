// The LibTorch API of include/trainscope/per_sample_stats.h against a float64 reference computed
// here with ATen ops in double (SPEC.md §2, §4, §5): per_sample_stats, per_sample_parts,
// PerSampleParts +=, per_sample_stats_from_parts, the single statistics, per_sample_grad_hist1d and
// per_sample_stat_name; every dtype, non-contiguous inputs, empty tensors, non-finite values,
// ‖ḡ‖ = 0, large batches, determinism, and the errors bad input must raise (c10::Error naming the
// argument). Each case runs on CPU, and on CUDA when a GPU is present (skipped otherwise).
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
#include "trainscope/per_sample_stats.h"

namespace {

using namespace trainscope_test;
using trainscope::PerSampleOptions;
using trainscope::PerSampleParts;
using trainscope::PerSampleStat;
using trainscope::PerSampleStats;

constexpr int kNumStats = 6;
const PerSampleStat kStats[kNumStats] = {PerSampleStat::kNormTest,           PerSampleStat::kInnerTest,
                                         PerSampleStat::kOrthoTest,          PerSampleStat::kGradVarianceTrace,
                                         PerSampleStat::kGradSqNormUnbiased, PerSampleStat::kGradientNoiseScale};

using Shapes = std::vector<std::vector<int64_t>>;  // parameter shapes, without the batch dimension

// Parameter shapes: matrices, vectors, a scalar parameter ([B] per-sample), a 4-D kernel, a
// tensor wider than one CPU work unit (16384 columns), and empty tensors between them.
const Shapes kShapes = {{7, 13}, {0}, {129}, {3, 0, 5}, {}, {1}, {4, 3, 3, 3}, {17000}, {2, 0}};

// gᵢ = μ + σ·noise, μ ~ N(0, 0.02²), σ = 0.03: a mean gradient well away from 0 and values inside
// and outside the default histogram range. Made in float64 on the CPU, then cast.
std::vector<at::Tensor> make_grads(int64_t batch, const Shapes& shapes, const std::vector<at::ScalarType>& dtypes,
                                   at::Device device, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    std::vector<int64_t> full = {batch};
    full.insert(full.end(), shapes[i].begin(), shapes[i].end());
    const at::Tensor mu = 0.02 * at::randn(shapes[i], gen, f64);
    const at::Tensor g = mu.unsqueeze(0) + 0.03 * at::randn(full, gen, f64);
    out.push_back(g.to(at::TensorOptions().dtype(dtypes[i % dtypes.size()]).device(device)));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Float64 reference

// The parts and the six statistics, each from its definition (the orthogonality test's
// projections formed explicitly, tr Σ̂ as Σ‖gᵢ − ḡ‖²/(B−1)). scale[k] is the first-order size of
// the terms statistic k subtracts, so that data correct to relative ε give a result within ε·scale
// of the truth: ≈ |value| where nothing cancels, larger only where a statistic itself cancels
// (‖ḡ‖² − tr Σ̂/B when noise dominates; Σ‖gᵢ‖²/‖ḡ‖² − B when samples agree).
struct Reference {
  int64_t batch = 0;
  at::Tensor sq_norms, dots, dots_scale;  // [B] float64
  double mean_sq_norm = 0.0;
  std::array<double, kNumStats> stats{}, scale{};
};

at::Tensor flatten64(const std::vector<at::Tensor>& grads) {
  const int64_t b = grads.at(0).size(0);
  std::vector<at::Tensor> cols;
  for (const at::Tensor& g : grads) cols.push_back(as_double_cpu(g).reshape({b, -1}));
  return at::cat(cols, 1);
}

Reference reference(const std::vector<at::Tensor>& grads) {
  const at::Tensor G = flatten64(grads);
  Reference r;
  r.batch = G.size(0);
  const double B = static_cast<double>(r.batch), pairs = B * (B - 1.0);
  const at::Tensor gbar = G.mean(0);
  r.sq_norms = (G * G).sum(1);
  r.dots = at::mv(G, gbar);
  r.dots_scale = at::mv(G.abs(), gbar.abs());
  const double m = at::dot(gbar, gbar).item<double>();
  r.mean_sq_norm = m;
  const double sum_sq = r.sq_norms.sum().item<double>();
  const at::Tensor proj = G - (r.dots / m).unsqueeze(1) * gbar.unsqueeze(0);
  const double trace = (G - gbar).square().sum().item<double>() / (B - 1.0);
  const double unbiased = m - trace / B;
  const at::Tensor dm = r.dots - m;
  r.stats = {(sum_sq / m - B) / pairs,
             dm.square().sum().item<double>() / (pairs * m * m),
             proj.square().sum().item<double>() / (pairs * m),
             trace,
             unbiased,
             trace / unbiased};
  const double trace_scale = (sum_sq + B * m) / (B - 1.0);
  const double unbiased_scale = m + trace_scale / B;
  r.scale = {(sum_sq / m + B) / pairs,
             (2.0 * dm.abs() * (r.dots.abs() + m)).sum().item<double>() / (pairs * m * m) + std::fabs(r.stats[1]),
             sum_sq / (pairs * m),
             trace_scale,
             unbiased_scale,
             std::fabs(trace / unbiased) * (trace_scale / std::fabs(trace) + unbiased_scale / std::fabs(unbiased))};
  return r;
}

int64_t finite_count(const std::vector<at::Tensor>& grads) {
  int64_t n = 0;
  for (const at::Tensor& g : grads) n += as_double_cpu(g).isfinite().sum().item<int64_t>();
  return n;
}

void expect_parts_close(const PerSampleParts& p, const Reference& r, double rel, const char* what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(p.sq_norms.sizes(), (std::vector<int64_t>{r.batch}));
  ASSERT_EQ(p.dots.sizes(), (std::vector<int64_t>{r.batch}));
  ASSERT_EQ(p.mean_sq_norm.dim(), 0);
  EXPECT_EQ(p.batch_size(), r.batch);
  for (const at::Tensor* t : {&p.sq_norms, &p.dots, &p.mean_sq_norm}) EXPECT_EQ(t->scalar_type(), at::kDouble);
  // Element-wise on whole vectors (B may be 30000); the first few failures reported.
  auto check = [&](const at::Tensor& got_t, const at::Tensor& want, const at::Tensor& scale, const char* name) {
    const at::Tensor got = as_double_cpu(got_t);
    const at::Tensor ok = (got - want).abs() <= rel * scale;
    if (ok.all().item<bool>()) return;
    const at::Tensor bad = at::nonzero(ok.logical_not()).reshape({-1});
    for (int64_t j = 0; j < std::min<int64_t>(bad.numel(), 5); ++j) {
      const int64_t i = bad[j].item<int64_t>();
      ADD_FAILURE() << name << "[" << i << "]: got " << got[i].item<double>() << ", want " << want[i].item<double>()
                    << " (tolerance " << rel << " × " << scale[i].item<double>() << "); " << bad.numel()
                    << " mismatches";
    }
  };
  check(p.sq_norms, r.sq_norms, r.sq_norms.abs(), "sq_norms");
  check(p.dots, r.dots, r.dots_scale, "dots");
  EXPECT_CLOSE(value(p.mean_sq_norm), r.mean_sq_norm, rel) << "‖ḡ‖²";
}

void expect_stats_close(const at::Tensor& stats, const Reference& r, double rel, const char* what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(stats.sizes(), (std::vector<int64_t>{kNumStats}));
  EXPECT_EQ(stats.scalar_type(), at::kDouble);
  const at::Tensor s = as_double_cpu(stats);
  for (int k = 0; k < kNumStats; ++k) {
    EXPECT_TRUE(is_within(s[k].item<double>(), r.stats[k], r.scale[k], rel))
        << trainscope::per_sample_stat_name(kStats[k]);
  }
}

// ---------------------------------------------------------------------------------------------
// Parameterised over device and dtype

class PerSampleStatsApiTest : public DeviceDtypeTest {
 protected:
  std::vector<at::Tensor> grads(int64_t batch, uint64_t seed, const Shapes& shapes = kShapes) const {
    return make_grads(batch, shapes, {dtype()}, device(), seed);
  }
  // The reference reads the very values the library reads, so only accumulation differs:
  // float64 data keep float64 accuracy; the others are held to SPEC.md's 1e-5.
  double tolerance() const { return dtype() == at::kDouble ? 1e-9 : 1e-5; }

  void check_all(const PerSampleStats& s, const std::vector<at::Tensor>& g, const PerSampleOptions& o,
                 const char* what) const {
    SCOPED_TRACE(what);
    const Reference r = reference(g);
    for (const at::Tensor* t : {&s.stats, &s.hist, &s.nonfinite, &s.parts.sq_norms, &s.parts.dots,
                                &s.parts.mean_sq_norm}) {
      expect_on_device(*t, "result");
    }
    expect_parts_close(s.parts, r, tolerance(), "parts");
    expect_stats_close(s.stats, r, tolerance(), "stats");
    for (int k = 0; k < kNumStats; ++k) {
      EXPECT_TRUE(bitwise_equal(s.stat(kStats[k]), s.stats[k])) << k;
      EXPECT_EQ(s.stat(kStats[k]).dim(), 0);
    }
    EXPECT_EQ(s.nonfinite.scalar_type(), at::kLong);
    EXPECT_EQ(s.nonfinite.dim(), 0);
    EXPECT_EQ(s.hist.scalar_type(), at::kLong);
    if (o.histogram) {
      ASSERT_EQ(s.hist.sizes(), (std::vector<int64_t>{o.nbins}));
      EXPECT_EQ(to_vector(s.hist), reference_hist(g, o.nbins, o.maxval));
    } else {
      EXPECT_EQ(s.hist.numel(), 0);
    }
  }
};

TEST_P(PerSampleStatsApiTest, FusedCallMatchesReference) {
  for (int64_t batch : {int64_t{2}, int64_t{3}, int64_t{17}}) {
    const std::vector<at::Tensor> g = grads(batch, 1 + batch);
    const PerSampleOptions o;
    const PerSampleStats s = trainscope::per_sample_stats(g, o);
    check_all(s, g, o, ("B=" + std::to_string(batch)).c_str());
    EXPECT_EQ(value(s.nonfinite), 0.0);
    const std::vector<int64_t> h = to_vector(s.hist);
    EXPECT_EQ(std::accumulate(h.begin(), h.end(), int64_t{0}), finite_count(g));
    EXPECT_GT(h.front(), 0);
    EXPECT_GT(h.back(), 0);
  }
}

TEST_P(PerSampleStatsApiTest, OptionsWithoutHistogramAndOtherBins) {
  const std::vector<at::Tensor> g = grads(5, 2);
  PerSampleOptions none;
  none.histogram = false;
  check_all(trainscope::per_sample_stats(g, none), g, none, "no histogram");
  for (int64_t nbins : {int64_t{1}, int64_t{7}, int64_t{5000}}) {
    for (double maxval : {0.01, 1.0}) {
      PerSampleOptions o;
      o.nbins = nbins;
      o.maxval = maxval;
      check_all(trainscope::per_sample_stats(g, o), g, o, "nbins/maxval");
    }
  }
}

TEST_P(PerSampleStatsApiTest, PartsAndSingleStatistics) {
  const std::vector<at::Tensor> g = grads(6, 3);
  const Reference r = reference(g);
  const PerSampleStats s = trainscope::per_sample_stats(g);
  const PerSampleParts p = trainscope::per_sample_parts(g);
  expect_parts_close(p, r, tolerance(), "per_sample_parts");
  for (const at::Tensor* t : {&p.sq_norms, &p.dots, &p.mean_sq_norm}) expect_on_device(*t, "parts");
  const at::Tensor from_parts = trainscope::per_sample_stats_from_parts(p);
  expect_on_device(from_parts, "per_sample_stats_from_parts");
  expect_stats_close(from_parts, r, tolerance(), "per_sample_stats_from_parts");
  EXPECT_TRUE(at::allclose(as_double_cpu(from_parts), as_double_cpu(s.stats), 1e-12, 0.0));

  struct Single {
    PerSampleStat stat;
    std::function<at::Tensor()> call;
  };
  const std::vector<Single> singles = {
      {PerSampleStat::kNormTest, [&] { return trainscope::norm_test(g); }},
      {PerSampleStat::kInnerTest, [&] { return trainscope::inner_test(g); }},
      {PerSampleStat::kOrthoTest, [&] { return trainscope::ortho_test(g); }},
      {PerSampleStat::kGradientNoiseScale, [&] { return trainscope::gradient_noise_scale(g); }},
  };
  for (const Single& single : singles) {
    SCOPED_TRACE(trainscope::per_sample_stat_name(single.stat));
    const at::Tensor v = single.call();
    ASSERT_EQ(v.dim(), 0);
    EXPECT_EQ(v.scalar_type(), at::kDouble);
    expect_on_device(v, "single statistic");
    const int k = static_cast<int>(single.stat);
    EXPECT_TRUE(is_within(value(v), r.stats[k], r.scale[k], tolerance()));
    EXPECT_CLOSE(value(v), value(s.stat(single.stat)), 1e-12);
  }

  const at::Tensor h = trainscope::per_sample_grad_hist1d(g);
  ASSERT_EQ(h.sizes(), (std::vector<int64_t>{100}));
  EXPECT_EQ(h.scalar_type(), at::kLong);
  expect_on_device(h, "per_sample_grad_hist1d");
  EXPECT_EQ(to_vector(h), to_vector(s.hist));
}

TEST_P(PerSampleStatsApiTest, PartsOfLayersAddUpToTheWholeList) {
  const std::vector<at::Tensor> g = grads(7, 4);
  const PerSampleParts whole = trainscope::per_sample_parts(g);
  PerSampleParts sum = trainscope::per_sample_parts({g[0]});
  for (size_t i = 1; i < g.size(); ++i) {
    PerSampleParts& same = (sum += trainscope::per_sample_parts({g[i]}));
    EXPECT_EQ(&same, &sum) << "+= returns *this";
  }
  EXPECT_TRUE(at::allclose(as_double_cpu(sum.sq_norms), as_double_cpu(whole.sq_norms), 1e-12, 0.0));
  EXPECT_TRUE(at::allclose(as_double_cpu(sum.dots), as_double_cpu(whole.dots), 1e-12, 1e-18));
  EXPECT_CLOSE(value(sum.mean_sq_norm), value(whole.mean_sq_norm), 1e-12);
  const at::Tensor a = as_double_cpu(trainscope::per_sample_stats_from_parts(sum));
  const at::Tensor b = as_double_cpu(trainscope::per_sample_stats_from_parts(whole));
  for (int k = 0; k < kNumStats; ++k) EXPECT_CLOSE(a[k].item<double>(), b[k].item<double>(), 1e-9) << k;
  expect_stats_close(a, reference(g), tolerance(), "summed parts");

  // Two halves, as two layers measured apart.
  const std::vector<at::Tensor> first(g.begin(), g.begin() + 4), second(g.begin() + 4, g.end());
  PerSampleParts halves = trainscope::per_sample_parts(first);
  halves += trainscope::per_sample_parts(second);
  expect_stats_close(trainscope::per_sample_stats_from_parts(halves), reference(g), tolerance(), "halves");

  // Parts of another batch size do not add.
  PerSampleParts other = trainscope::per_sample_parts(grads(8, 5, {{3}}));
  expect_error_naming([&] { other += whole; }, "batch sizes", "+= with B 8 and 7");
}

TEST_P(PerSampleStatsApiTest, NonContiguousInputs) {
  const std::vector<at::Tensor> base = grads(5, 6, {{11}, {4, 6, 7}, {9, 3}, {2, 3, 4}, {0, 3}});
  const at::Tensor wide = grads(10, 7, {{20}})[0];
  const std::vector<at::Tensor> views = {
      base[0].t().contiguous().t(),                                    // [B, 11], batch stride 1
      base[1].slice(2, 0, 6, 2).slice(3, 1, 5),                        // strided
      base[2].permute({0, 2, 1}),                                      // [B, 3, 9]
      base[3].permute({3, 1, 2, 0}).contiguous().permute({3, 1, 2, 0}),  // batch last in memory
      base[4].transpose(1, 2),                                         // empty
      wide.slice(0, 0, 10, 2).slice(1, 3, 17),                         // every other sample
  };
  for (size_t i = 0; i < 4; ++i) EXPECT_FALSE(views[i].is_contiguous()) << i;
  const PerSampleOptions o;
  const PerSampleStats s = trainscope::per_sample_stats(views, o);
  check_all(s, views, o, "non-contiguous");
  std::vector<at::Tensor> dense;
  for (const at::Tensor& v : views) dense.push_back(v.contiguous());
  const PerSampleStats sd = trainscope::per_sample_stats(dense, o);
  EXPECT_TRUE(bitwise_equal(s.stats, sd.stats));
  EXPECT_TRUE(at::equal(s.hist, sd.hist));
}

TEST_P(PerSampleStatsApiTest, EmptyTensorsAreSkipped) {
  const std::vector<at::Tensor> g = grads(4, 8, {{0}, {50}, {0, 4}, {0}, {3, 9}, {2, 0}});
  const std::vector<at::Tensor> dense = {g[1], g[4]};
  const PerSampleOptions o;
  const PerSampleStats s = trainscope::per_sample_stats(g, o);
  const PerSampleStats sd = trainscope::per_sample_stats(dense, o);
  check_all(s, g, o, "with empty tensors");
  const at::Tensor a = as_double_cpu(s.stats), b = as_double_cpu(sd.stats);
  for (int k = 0; k < kNumStats; ++k) EXPECT_CLOSE(a[k].item<double>(), b[k].item<double>(), 1e-12) << k;
  EXPECT_EQ(to_vector(s.hist), to_vector(sd.hist));

  // Only empty tensors: every part is 0, so ‖ḡ‖ = 0: NaN where it divides by it, no error.
  const std::vector<at::Tensor> empty = grads(3, 9, {{0}, {0, 3}});
  const PerSampleStats se = trainscope::per_sample_stats(empty, o);
  EXPECT_EQ(as_double_cpu(se.parts.sq_norms).abs().sum().item<double>(), 0.0);
  EXPECT_EQ(value(se.parts.mean_sq_norm), 0.0);
  EXPECT_TRUE(std::isnan(value(se.stat(PerSampleStat::kNormTest))));
  EXPECT_TRUE(std::isnan(value(se.stat(PerSampleStat::kInnerTest))));
  EXPECT_TRUE(std::isnan(value(se.stat(PerSampleStat::kOrthoTest))));
  EXPECT_EQ(value(se.stat(PerSampleStat::kGradVarianceTrace)), 0.0);
  EXPECT_EQ(value(se.nonfinite), 0.0);
  EXPECT_EQ(to_vector(se.hist), std::vector<int64_t>(100, 0));
}

TEST_P(PerSampleStatsApiTest, HistogramsAreExact) {
  std::vector<at::Tensor> g = grads(6, 10, {{40, 3}, {77}, {0}, {2, 5, 5}});
  for (int64_t nbins : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{100}, int64_t{1537}, int64_t{65536}}) {
    for (double maxval : {0.05, 1.0}) {
      SCOPED_TRACE(testing::Message() << "nbins=" << nbins << " maxval=" << maxval);
      // ±maxval, far outliers and values at the rounded bin edges −m + k·w, set in float64.
      const double w = 2.0 * maxval / static_cast<double>(nbins);
      at::Tensor x = as_double_cpu(g[1]);
      const at::Tensor k = (at::arange(6 * 60, at::kLong) * 7919).remainder(nbins + 1).to(at::kDouble).reshape({6, 60});
      x.narrow(1, 0, 60).copy_(k * w - maxval);
      x[0][60] = maxval;
      x[1][60] = -maxval;
      x[2][60] = 1e4;
      x[3][60] = -1e4;
      std::vector<at::Tensor> gg = g;
      gg[1] = x.to(g[1].options());
      const at::Tensor h = trainscope::per_sample_grad_hist1d(gg, nbins, maxval);
      ASSERT_EQ(h.sizes(), (std::vector<int64_t>{nbins}));
      EXPECT_EQ(h.scalar_type(), at::kLong);
      expect_on_device(h, "histogram");
      const std::vector<int64_t> got = to_vector(h);
      EXPECT_EQ(got, reference_hist(gg, nbins, maxval));
      EXPECT_EQ(std::accumulate(got.begin(), got.end(), int64_t{0}), finite_count(gg));
      PerSampleOptions o;
      o.nbins = nbins;
      o.maxval = maxval;
      EXPECT_EQ(to_vector(trainscope::per_sample_stats(gg, o).hist), got);
    }
  }
  // By hand: nbins = 4 over [−0.5, 0.5]; each edge opens the bin above it, 0.5 closes the last.
  const at::Tensor v = at::tensor({-9.0, -0.5, -0.25, 0.0, 0.25, 0.5, 9.0, -0.3, 0.1, 0.49}).reshape({2, 5});
  EXPECT_EQ(to_vector(trainscope::per_sample_grad_hist1d({v.to(options())}, 4, 0.5)),
            (std::vector<int64_t>{3, 1, 2, 4}));
}

TEST_P(PerSampleStatsApiTest, NonfiniteValuesAreCountedAndNotBinned) {
  std::vector<at::Tensor> g = grads(5, 11, {{6, 4}, {9}, {3, 3}});
  auto poison = [&](size_t t, int64_t row, int64_t flat, double v) {
    at::Tensor x = as_double_cpu(g[t]);
    x[row].view({-1})[flat] = v;
    g[t] = x.to(g[t].options());
  };
  poison(0, 1, 5, kNaN);
  poison(0, 4, 0, kInf);
  poison(2, 1, 4, -kInf);
  poison(2, 3, 8, kNaN);
  poison(1, 2, 8, kNaN);
  const PerSampleStats s = trainscope::per_sample_stats(g, PerSampleOptions{});
  EXPECT_EQ(to_vector(s.nonfinite), std::vector<int64_t>{5});
  const std::vector<int64_t> h = to_vector(s.hist);
  EXPECT_EQ(h, reference_hist(g, 100, 0.05));
  EXPECT_EQ(std::accumulate(h.begin(), h.end(), int64_t{0}), finite_count(g));
  EXPECT_EQ(finite_count(g), 5 * (24 + 9 + 9) - 5);
  const at::Tensor sq = as_double_cpu(s.parts.sq_norms);
  EXPECT_TRUE(std::isfinite(sq[0].item<double>())) << "sample 0 holds only finite values";
  for (int64_t i = 1; i < 5; ++i) EXPECT_FALSE(std::isfinite(sq[i].item<double>())) << i;
}

TEST_P(PerSampleStatsApiTest, ZeroMeanGradientGivesInfNaN) {
  // gᵢ and −gᵢ in pairs, dyadic values: ḡ = 0 exactly. IEEE on the definitions: norm test
  // x/0 − B = +inf; inner test 0/0 and the orthogonality test's projection 0/0 are NaN; tr Σ̂
  // stays finite and the noise scale is tr Σ̂ / (0 − tr Σ̂/B) = −B.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(12);
  std::vector<at::Tensor> g;
  for (const std::vector<int64_t>& shape : Shapes{{3, 4, 3}, {3, 5}}) {
    const at::Tensor half = at::randint(-8, 9, shape, gen, at::TensorOptions().dtype(at::kDouble)) / 16.0;
    g.push_back(at::cat({half, -half}).to(options()));
  }
  const PerSampleStats s = trainscope::per_sample_stats(g);
  EXPECT_EQ(value(s.parts.mean_sq_norm), 0.0);
  EXPECT_EQ(value(s.stat(PerSampleStat::kNormTest)), kInf);
  EXPECT_TRUE(std::isnan(value(s.stat(PerSampleStat::kInnerTest))));
  EXPECT_TRUE(std::isnan(value(s.stat(PerSampleStat::kOrthoTest))));
  const Reference r = reference(g);
  EXPECT_CLOSE(value(s.stat(PerSampleStat::kGradVarianceTrace)), r.stats[3], 1e-12);
  EXPECT_CLOSE(value(s.stat(PerSampleStat::kGradSqNormUnbiased)), r.stats[4], 1e-12);
  EXPECT_CLOSE(value(s.stat(PerSampleStat::kGradientNoiseScale)), -6.0, 1e-12);
  EXPECT_TRUE(std::isinf(value(trainscope::norm_test(g))));
  // All zero: 0/0 wherever it divides by ‖ḡ‖².
  const PerSampleStats z = trainscope::per_sample_stats({at::zeros({4, 3}, options())});
  EXPECT_TRUE(std::isnan(value(z.stat(PerSampleStat::kNormTest))));
  EXPECT_TRUE(std::isnan(value(z.stat(PerSampleStat::kInnerTest))));
  EXPECT_EQ(value(z.stat(PerSampleStat::kGradVarianceTrace)), 0.0);
}

TEST_P(PerSampleStatsApiTest, LargeBatchWithFewColumns) {
  // B = 30000 × 7 columns: on CUDA no tile of B rows fits in shared memory, so this takes the
  // composite fallback; on the CPU it is just a large batch.
  std::vector<at::Tensor> g = grads(30000, 13, {{3}, {2, 2}});
  const PerSampleOptions o;
  check_all(trainscope::per_sample_stats(g, o), g, o, "B = 30000");
  at::Tensor x = as_double_cpu(g[1]);
  x[29999][1][0] = kNaN;
  g[1] = x.to(g[1].options());
  PerSampleOptions o2;
  o2.nbins = 11;
  o2.maxval = 0.1;
  const PerSampleStats s = trainscope::per_sample_stats(g, o2);
  EXPECT_EQ(to_vector(s.nonfinite), std::vector<int64_t>{1});
  EXPECT_EQ(to_vector(s.hist), reference_hist(g, 11, 0.1));
}

TEST_P(PerSampleStatsApiTest, RepeatedCallsAreBitwiseEqual) {
  const std::vector<at::Tensor> g = grads(8, 14, {{40000}, {33, 17}, {5}});
  const PerSampleStats a = trainscope::per_sample_stats(g);
  for (int rep = 0; rep < 3; ++rep) {
    const PerSampleStats b = trainscope::per_sample_stats(g);
    EXPECT_TRUE(bitwise_equal(a.stats, b.stats)) << rep;
    EXPECT_TRUE(bitwise_equal(a.parts.sq_norms, b.parts.sq_norms)) << rep;
    EXPECT_TRUE(bitwise_equal(a.parts.dots, b.parts.dots)) << rep;
    EXPECT_TRUE(bitwise_equal(a.parts.mean_sq_norm, b.parts.mean_sq_norm)) << rep;
    EXPECT_TRUE(at::equal(a.hist, b.hist)) << rep;
    EXPECT_TRUE(at::equal(a.nonfinite, b.nonfinite)) << rep;
  }
}

TEST_P(PerSampleStatsApiTest, BadInputRaisesErrorsNamingTheArgument) {
  const std::vector<at::Tensor> g = grads(4, 15, {{3, 2}, {2}, {4}});
  auto with = [&](size_t i, at::Tensor t) {
    std::vector<at::Tensor> v = g;
    if (i < v.size()) {
      v[i] = std::move(t);
    } else {
      v.push_back(std::move(t));
    }
    return v;
  };
  const auto opt = options();

  // B < 2, in every entry point.
  const std::vector<at::Tensor> one = {at::zeros({1, 3}, opt)};
  expect_error_naming([&] { trainscope::per_sample_stats(one); }, "B", "per_sample_stats B = 1");
  expect_error_naming([&] { trainscope::per_sample_parts(one); }, "B", "per_sample_parts B = 1");
  expect_error_naming([&] { trainscope::norm_test(one); }, "B", "norm_test B = 1");
  expect_error_naming([&] { trainscope::inner_test(one); }, "B", "inner_test B = 1");
  expect_error_naming([&] { trainscope::ortho_test(one); }, "B", "ortho_test B = 1");
  expect_error_naming([&] { trainscope::gradient_noise_scale(one); }, "B", "gradient_noise_scale B = 1");
  expect_error_naming([&] { trainscope::per_sample_grad_hist1d(one); }, "B", "per_sample_grad_hist1d B = 1");
  expect_error_naming([&] { trainscope::per_sample_stats({at::zeros({0, 3}, opt)}); }, "B", "B = 0");
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device());
  expect_error_naming(
      [&] { trainscope::per_sample_stats_from_parts(PerSampleParts{at::ones({1}, f64), at::ones({1}, f64), at::ones({}, f64)}); },
      "B", "from parts B = 1");

  // Batch sizes that differ.
  expect_error_naming([&] { trainscope::per_sample_stats(with(3, at::zeros({5, 3}, opt))); }, "per_sample_grads[3]",
                      "batch 5 among batch 4");
  expect_error_naming([&] { trainscope::per_sample_parts(with(1, at::zeros({3, 4}, opt))); }, "per_sample_grads[1]",
                      "batch 3 among batch 4");

  // Integer, bool and 0-d tensors; an empty list; an undefined tensor.
  expect_error_naming([&] { trainscope::per_sample_stats(with(1, at::ones({4, 2}, at::TensorOptions().dtype(at::kInt).device(device())))); },
                      "per_sample_grads[1]", "int32");
  expect_error_naming([&] { trainscope::norm_test({at::ones({4, 2}, at::TensorOptions().dtype(at::kLong).device(device()))}); },
                      "per_sample_grads[0]", "int64");
  expect_error_naming([&] { trainscope::per_sample_grad_hist1d(with(3, at::ones({4}, at::TensorOptions().dtype(at::kBool).device(device())))); },
                      "per_sample_grads[3]", "bool");
  expect_error_naming([&] { trainscope::per_sample_stats(with(2, at::ones({}, opt))); }, "per_sample_grads[2]", "0-d");
  expect_error_naming([&] { trainscope::per_sample_stats(std::vector<at::Tensor>{}); }, "per_sample_grads", "empty list");
  expect_error_naming([&] { trainscope::per_sample_parts(with(1, at::Tensor())); }, "per_sample_grads[1]", "undefined");

  // Histogram parameters.
  for (int64_t nbins : {int64_t{0}, int64_t{-3}, (int64_t{1} << 20) + 1}) {
    expect_error_naming([&] { trainscope::per_sample_grad_hist1d(g, nbins); }, "nbins", "nbins " + std::to_string(nbins));
    PerSampleOptions o;
    o.nbins = nbins;
    expect_error_naming([&] { trainscope::per_sample_stats(g, o); }, "nbins", "options nbins");
  }
  for (double maxval : {0.0, -0.05, kNaN, kInf}) {
    expect_error_naming([&] { trainscope::per_sample_grad_hist1d(g, 100, maxval); }, "maxval", "maxval");
    PerSampleOptions o;
    o.maxval = maxval;
    expect_error_naming([&] { trainscope::per_sample_stats(g, o); }, "maxval", "options maxval");
  }
  // Without a histogram its parameters are not read.
  PerSampleOptions off;
  off.histogram = false;
  off.nbins = 0;
  EXPECT_NO_THROW(trainscope::per_sample_stats(g, off));

  // Parts of the wrong shapes.
  const at::Tensor v3 = at::ones({3}, f64), s0 = at::ones({}, f64);
  expect_error_naming([&] { trainscope::per_sample_stats_from_parts(PerSampleParts{at::ones({3, 2}, f64), v3, s0}); },
                      "sq_norms", "2-D sq_norms");
  expect_error_naming([&] { trainscope::per_sample_stats_from_parts(PerSampleParts{v3, at::ones({4}, f64), s0}); },
                      "dots", "dots of another length");
  expect_error_naming([&] { trainscope::per_sample_stats_from_parts(PerSampleParts{v3, v3, at::ones({2}, f64)}); },
                      "mean_sq_norm", "two values");
  expect_error_naming([&] { trainscope::per_sample_stats_from_parts(PerSampleParts{v3, v3, at::Tensor()}); },
                      "mean_sq_norm", "undefined");
}

INSTANTIATE_TEST_SUITE_P(AllDevicesAndDtypes, PerSampleStatsApiTest, all_cases(), case_name);

// ---------------------------------------------------------------------------------------------
// Not parameterised by dtype

TEST(PerSampleStatsApi, StatNames) {
  const char* want[kNumStats] = {"norm_test", "inner_test", "ortho_test", "grad_variance_trace",
                                 "grad_sq_norm_unbiased", "gradient_noise_scale"};
  for (int k = 0; k < kNumStats; ++k) {
    EXPECT_EQ(static_cast<int>(kStats[k]), k);
    EXPECT_STREQ(trainscope::per_sample_stat_name(kStats[k]), want[k]);
  }
  EXPECT_EQ(trainscope::kNumPerSampleStats, kNumStats);
}

void check_mixed_dtype_list(at::Device device) {
  const std::vector<at::Tensor> g =
      make_grads(5, kShapes, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}, device, 16);
  const PerSampleStats s = trainscope::per_sample_stats(g);
  EXPECT_EQ(s.stats.scalar_type(), at::kDouble);
  const Reference r = reference(g);
  expect_parts_close(s.parts, r, 1e-5, "mixed dtypes");
  expect_stats_close(s.stats, r, 1e-5, "mixed dtypes");
  EXPECT_EQ(to_vector(s.hist), reference_hist(g, 100, 0.05));
}

TEST(PerSampleStatsApi, MixedDtypeListOnCpu) { check_mixed_dtype_list(at::kCPU); }

TEST(PerSampleStatsApi, MixedDtypeListOnCuda) {
  SKIP_WITHOUT_CUDA();
  check_mixed_dtype_list(cuda0());
}

TEST(PerSampleStatsApi, CudaMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const std::vector<at::Tensor> g = make_grads(9, kShapes, {at::kFloat}, at::kCPU, 18);
  std::vector<at::Tensor> gc;
  for (const at::Tensor& t : g) gc.push_back(t.cuda());
  const PerSampleStats a = trainscope::per_sample_stats(g), b = trainscope::per_sample_stats(gc);
  EXPECT_TRUE(at::allclose(as_double_cpu(b.stats), a.stats, 1e-12, 0.0));
  EXPECT_EQ(to_vector(a.hist), to_vector(b.hist));
}

TEST(PerSampleStatsApi, TensorsOnDifferentDevicesAreRejected) {
  SKIP_WITHOUT_CUDA();
  std::vector<at::Tensor> g = make_grads(4, {{4, 3}, {6}, {2}}, {at::kFloat}, cuda0(), 17);
  std::vector<at::Tensor> mixed = g;
  mixed[1] = mixed[1].cpu();
  expect_error_naming([&] { trainscope::per_sample_stats(mixed); }, "per_sample_grads[1]", "entry 1 on the CPU");
  mixed = g;
  mixed[0] = mixed[0].cpu();
  expect_error_naming([&] { trainscope::per_sample_parts(mixed); }, "per_sample_grads[1]", "entry 0 on the CPU");
  PerSampleParts on_gpu = trainscope::per_sample_parts(g);
  std::vector<at::Tensor> g_cpu;
  for (const at::Tensor& t : g) g_cpu.push_back(t.cpu());
  const PerSampleParts on_cpu = trainscope::per_sample_parts(g_cpu);
  EXPECT_THROW(on_gpu += on_cpu, c10::Error);
  expect_error_naming(
      [&] { trainscope::per_sample_stats_from_parts(PerSampleParts{on_gpu.sq_norms, on_cpu.dots, on_gpu.mean_sq_norm}); },
      "device", "parts on two devices");
}

}  // namespace
