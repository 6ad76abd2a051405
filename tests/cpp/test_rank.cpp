// The LibTorch API of include/trainscope/rank.h against a float64 SVD reference written here from
// SPEC.md §3, on matrices Φ = U diag(σ) Vᵀ with controlled spectra (flat, geometric decay to
// 1e-3, rank-deficient, zero), tall and wide, in every dtype, by both methods; batches and lists
// against per-matrix calls; the streamed GramAccumulator against one shot in both of its states
// and for [n, C, H, W] activations; determinism; NaN and ±Inf matrices and Gram matrices (alone,
// in batches and lists, streamed) giving NaN and −1, and a LAPACK failure on the CPU marking its
// matrix; and the errors bad input must raise. Each case
// runs on CPU, and on CUDA when a GPU is present (skipped otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <string>
#include <vector>

#include "src/rank_internal.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/rank.h"

namespace {

using namespace trainscope_test;
using trainscope::GramAccumulator;
using trainscope::RankMeasures;
using trainscope::RankMethod;
using trainscope::RankOptions;

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

// ---------------------------------------------------------------------------------------------
// Reference: float64 SVD on the CPU, then SPEC.md §3 written out directly.

struct Ref {
  double erank;
  int64_t arank;
  int64_t abs_arank;
  double srank;
};

Ref reference(const at::Tensor& m, double prop = 0.99) {
  const at::Tensor a = as_double_cpu(m);
  std::vector<double> s;
  if (a.numel() > 0) {
    const at::Tensor sv = at::linalg_svdvals(a).contiguous();
    s.assign(sv.data_ptr<double>(), sv.data_ptr<double>() + sv.numel());
  }
  std::sort(s.begin(), s.end(), std::greater<double>());
  long double s1 = 0, s2 = 0;
  for (double v : s) {
    s1 += v;
    s2 += static_cast<long double>(v) * v;
  }
  if (s1 == 0) return Ref{0.0, 0, 0, 0.0};
  long double h = 0, c1 = 0, c2 = 0;
  int64_t k1 = 0, k2 = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] > 0) h -= (s[i] / s1) * std::log(s[i] / s1);
    c1 += s[i];
    c2 += static_cast<long double>(s[i]) * s[i];
    if (k1 == 0 && c1 / s1 >= prop) k1 = static_cast<int64_t>(i) + 1;
    if (k2 == 0 && c2 / s2 >= prop) k2 = static_cast<int64_t>(i) + 1;
  }
  return Ref{static_cast<double>(std::exp(h)), k2, k1, static_cast<double>(s2 / (static_cast<long double>(s[0]) * s[0]))};
}

// Φ = U diag(σ) Vᵀ with random orthonormal U [n, k], V [m, k], k = min(n, m), in float64.
at::Tensor with_spectrum(int64_t n, int64_t m, const std::vector<double>& sigma, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t k = std::min(n, m);
  const at::Tensor u = std::get<0>(at::linalg_qr(at::randn({n, k}, gen, kF64)));
  const at::Tensor v = std::get<0>(at::linalg_qr(at::randn({m, k}, gen, kF64)));
  const at::Tensor s = at::tensor(sigma, kF64).narrow(0, 0, k);
  return at::mm(u * s, v.t());
}

enum class Spectrum { kFlat, kGeometric, kDeficient, kZero };

std::vector<double> spectrum(Spectrum kind, int64_t k) {
  std::vector<double> s(static_cast<size_t>(k), 0.0);
  for (int64_t i = 0; i < k; ++i) {
    switch (kind) {
      case Spectrum::kFlat: s[i] = 1.0; break;
      case Spectrum::kGeometric: s[i] = std::pow(1e-3, static_cast<double>(i) / static_cast<double>(k - 1)); break;
      case Spectrum::kDeficient: s[i] = i < k / 3 ? std::pow(0.8, static_cast<double>(i)) : 0.0; break;
      case Spectrum::kZero: s[i] = 0.0; break;
    }
  }
  return s;
}

const char* spectrum_name(Spectrum s) {
  switch (s) {
    case Spectrum::kFlat: return "flat";
    case Spectrum::kGeometric: return "geometric";
    case Spectrum::kDeficient: return "rank-deficient";
    case Spectrum::kZero: return "zero";
  }
  return "?";
}

// SPEC.md §5: effective rank to 1e-3 relative (float64 input: far tighter); approximate ranks
// exact, or within 1 where rounding of the input leaves nearly equal σ at the cut (flat spectra,
// 16-bit inputs); stable rank is a ratio of well-conditioned sums.
void expect_matches(const RankMeasures& r, const Ref& want, at::ScalarType dtype, const std::string& what) {
  const bool exact = dtype == at::kDouble;
  EXPECT_TRUE(is_close(value(r.effective_rank), want.erank, exact ? 1e-9 : 1e-3)) << what << " effective_rank";
  EXPECT_TRUE(is_close(value(r.stable_rank), want.srank, 1e-6)) << what << " stable_rank";
  const int64_t slack = exact ? 0 : 1;
  EXPECT_LE(std::llabs(to_vector(r.approximate_rank)[0] - want.arank), slack) << what << " approximate_rank";
  EXPECT_LE(std::llabs(to_vector(r.abs_approximate_rank)[0] - want.abs_arank), slack) << what << " abs_approximate_rank";
}

void expect_same_results(const RankMeasures& a, const RankMeasures& b, double rel, const std::string& what) {
  const at::Tensor ea = as_double_cpu(a.effective_rank).reshape({-1}), eb = as_double_cpu(b.effective_rank).reshape({-1});
  const at::Tensor sa = as_double_cpu(a.stable_rank).reshape({-1}), sb = as_double_cpu(b.stable_rank).reshape({-1});
  ASSERT_EQ(ea.numel(), eb.numel()) << what;
  for (int64_t i = 0; i < ea.numel(); ++i) {
    EXPECT_TRUE(is_close(ea[i].item<double>(), eb[i].item<double>(), rel)) << what << " effective_rank[" << i << "]";
    EXPECT_TRUE(is_close(sa[i].item<double>(), sb[i].item<double>(), rel)) << what << " stable_rank[" << i << "]";
  }
  EXPECT_EQ(to_vector(a.approximate_rank), to_vector(b.approximate_rank)) << what;
  EXPECT_EQ(to_vector(a.abs_approximate_rank), to_vector(b.abs_approximate_rank)) << what;
}

class RankTest : public DeviceDtypeTest {};

TEST_P(RankTest, ControlledSpectraAgainstSvdReference) {
  for (const auto& shape : std::vector<std::pair<int64_t, int64_t>>{{90, 36}, {36, 90}, {40, 40}}) {
    const int64_t k = std::min(shape.first, shape.second);
    for (const Spectrum sp : {Spectrum::kFlat, Spectrum::kGeometric, Spectrum::kDeficient, Spectrum::kZero}) {
      const at::Tensor phi = with_spectrum(shape.first, shape.second, spectrum(sp, k), 7 + k).to(options());
      const Ref want = reference(phi);  // of the input as given, rounding included
      for (const RankMethod method : {RankMethod::kGram, RankMethod::kSvd}) {
        const std::string what = std::string(spectrum_name(sp)) + " " + std::to_string(shape.first) + "x" +
                                  std::to_string(shape.second) + " " + trainscope::rank_method_name(method);
        const RankMeasures r = trainscope::rank_measures(phi, RankOptions{0.99, method});
        EXPECT_EQ(r.effective_rank.dim(), 0) << what;
        EXPECT_EQ(r.effective_rank.scalar_type(), at::kDouble);
        EXPECT_EQ(r.approximate_rank.scalar_type(), at::kLong);
        EXPECT_EQ(r.abs_approximate_rank.scalar_type(), at::kLong);
        EXPECT_EQ(r.stable_rank.scalar_type(), at::kDouble);
        expect_on_device(r.effective_rank, "effective_rank");
        expect_on_device(r.approximate_rank, "approximate_rank");
        if (sp == Spectrum::kZero) {
          EXPECT_EQ(value(r.effective_rank), 0.0) << what;
          EXPECT_EQ(to_vector(r.approximate_rank)[0], 0) << what;
          EXPECT_EQ(to_vector(r.abs_approximate_rank)[0], 0) << what;
          EXPECT_EQ(value(r.stable_rank), 0.0) << what;
          continue;
        }
        expect_matches(r, want, dtype(), what);
        if (sp == Spectrum::kDeficient && dtype() == at::kDouble) {
          // Exactly rank k/3: the floor removes the rounding-level eigenvalues.
          EXPECT_EQ(to_vector(trainscope::approximate_rank(phi, 1.0, method))[0], k / 3) << what;
        }
      }
    }
  }
}

TEST_P(RankTest, NonContiguousInput) {
  const at::Tensor base = with_spectrum(50, 30, spectrum(Spectrum::kGeometric, 30), 3).to(options());
  const at::Tensor phi = base.t();  // [30, 50], transposed strides
  ASSERT_FALSE(phi.is_contiguous());
  expect_same_results(trainscope::rank_measures(phi), trainscope::rank_measures(phi.contiguous()), 1e-12, "transposed");
  const at::Tensor every_other = base.slice(0, 0, 50, 2);  // [25, 30], row stride 60
  expect_matches(trainscope::rank_measures(every_other), reference(every_other), dtype(), "sliced");
}

TEST_P(RankTest, BatchAndListEqualPerMatrixCalls) {
  std::vector<at::Tensor> same;
  for (int i = 0; i < 3; ++i) {
    same.push_back(with_spectrum(30, 20, spectrum(i == 1 ? Spectrum::kFlat : Spectrum::kGeometric, 20), 11 + i).to(options()));
  }
  same.push_back(at::zeros({30, 20}, options()));
  const at::Tensor batch = at::stack(same);
  const RankMeasures b = trainscope::rank_measures(batch);
  ASSERT_EQ(b.effective_rank.sizes(), at::IntArrayRef({4}));
  for (int i = 0; i < 4; ++i) {
    const RankMeasures one = trainscope::rank_measures(same[i]);
    RankMeasures row{b.effective_rank[i], b.approximate_rank[i], b.abs_approximate_rank[i], b.stable_rank[i]};
    expect_same_results(row, one, 1e-10, "batch[" + std::to_string(i) + "]");
  }
  // A list of different widths and shapes, an empty matrix among them: one padded solve.
  const std::vector<at::Tensor> list = {
      with_spectrum(40, 12, spectrum(Spectrum::kGeometric, 12), 21).to(options()),
      with_spectrum(10, 70, spectrum(Spectrum::kFlat, 10), 22).to(options()),
      at::zeros({0, 9}, options()),
      with_spectrum(33, 33, spectrum(Spectrum::kDeficient, 33), 23).to(options()),
  };
  for (const RankMethod method : {RankMethod::kGram, RankMethod::kSvd}) {
    const RankMeasures l = trainscope::rank_measures(at::TensorList(list), RankOptions{0.9, method});
    ASSERT_EQ(l.effective_rank.sizes(), at::IntArrayRef({4}));
    expect_on_device(l.stable_rank, "list stable_rank");
    for (size_t i = 0; i < list.size(); ++i) {
      const RankMeasures one = trainscope::rank_measures(list[i], RankOptions{0.9, method});
      RankMeasures row{l.effective_rank[i], l.approximate_rank[i], l.abs_approximate_rank[i], l.stable_rank[i]};
      expect_same_results(row, one, 1e-10, std::string("list[") + std::to_string(i) + "] " +
                                               trainscope::rank_method_name(method));
    }
  }
  // An empty list: [0] results.
  EXPECT_EQ(trainscope::rank_measures(at::TensorList{}).effective_rank.numel(), 0);
}

TEST_P(RankTest, GramMethodAgreesWithSvdMethod) {
  const at::Tensor phi = with_spectrum(120, 48, spectrum(Spectrum::kGeometric, 48), 5).to(options());
  const RankMeasures g = trainscope::rank_measures(phi, RankOptions{0.95, RankMethod::kGram});
  const RankMeasures s = trainscope::rank_measures(phi, RankOptions{0.95, RankMethod::kSvd});
  expect_same_results(g, s, 1e-8, "gram vs svd");
  // The single-measure functions are the fields.
  EXPECT_EQ(value(trainscope::effective_rank(phi)), value(g.effective_rank));
  EXPECT_EQ(to_vector(trainscope::approximate_rank(phi, 0.95))[0], to_vector(g.approximate_rank)[0]);
  EXPECT_EQ(to_vector(trainscope::abs_approximate_rank(phi, 0.95))[0], to_vector(g.abs_approximate_rank)[0]);
  EXPECT_EQ(value(trainscope::stable_rank(phi, RankMethod::kSvd)), value(s.stable_rank));
}

TEST_P(RankTest, Deterministic) {
  const at::Tensor phi = with_spectrum(64, 80, spectrum(Spectrum::kGeometric, 64), 9).to(options());
  const std::vector<at::Tensor> list = {phi, phi.narrow(1, 0, 17)};
  for (const RankMethod method : {RankMethod::kGram, RankMethod::kSvd}) {
    const RankMeasures a = trainscope::rank_measures(at::TensorList(list), RankOptions{0.99, method});
    const RankMeasures b = trainscope::rank_measures(at::TensorList(list), RankOptions{0.99, method});
    EXPECT_TRUE(at::equal(a.effective_rank, b.effective_rank));
    EXPECT_TRUE(at::equal(a.stable_rank, b.stable_rank));
    EXPECT_TRUE(at::equal(a.approximate_rank, b.approximate_rank));
  }
}

// SPEC.md §5: a matrix holding NaN or ±Inf gets NaN effective and stable rank and −1 for both
// approximate ranks, never an error; the other matrices of a batch or list keep their values.
void expect_undefined(const RankMeasures& r, int64_t i, const std::string& what) {
  const at::Tensor e = as_double_cpu(r.effective_rank).reshape({-1}), s = as_double_cpu(r.stable_rank).reshape({-1});
  EXPECT_TRUE(std::isnan(e[i].item<double>())) << what << " effective_rank";
  EXPECT_TRUE(std::isnan(s[i].item<double>())) << what << " stable_rank";
  EXPECT_EQ(to_vector(r.approximate_rank)[i], -1) << what << " approximate_rank";
  EXPECT_EQ(to_vector(r.abs_approximate_rank)[i], -1) << what << " abs_approximate_rank";
}

RankMeasures entry(const RankMeasures& r, int64_t i) {
  return RankMeasures{r.effective_rank[i], r.approximate_rank[i], r.abs_approximate_rank[i], r.stable_rank[i]};
}

const double kBadValues[] = {kNaN, kInf, -kInf};

TEST_P(RankTest, NonFiniteInputIsUndefined) {
  const at::Tensor phi = with_spectrum(20, 10, spectrum(Spectrum::kGeometric, 10), 1).to(options());
  const at::Tensor narrow = with_spectrum(6, 30, spectrum(Spectrum::kFlat, 6), 2).to(options());
  for (const RankMethod method : {RankMethod::kGram, RankMethod::kSvd}) {
    const RankOptions o{0.99, method};
    for (const double bad : kBadValues) {
      const std::string what = std::string(trainscope::rank_method_name(method)) + " " + std::to_string(bad);
      at::Tensor p = phi.clone();
      p[3][4] = bad;
      expect_undefined(trainscope::rank_measures(p, o), 0, what + " one matrix");
      EXPECT_TRUE(std::isnan(value(trainscope::effective_rank(p, method)))) << what;
      EXPECT_EQ(to_vector(trainscope::approximate_rank(p, 0.9, method))[0], -1) << what;
      // A batch: only matrix 1 undefined.
      const RankMeasures b = trainscope::rank_measures(at::stack({phi, p, phi * 2}), o);
      expect_undefined(b, 1, what + " batch");
      const RankMeasures one = trainscope::rank_measures(phi, o);
      expect_same_results(entry(b, 0), one, 1e-10, what + " batch matrix 0");
      expect_same_results(entry(b, 2), trainscope::rank_measures(phi * 2, o), 1e-10, what + " batch matrix 2");
      // A list of different shapes, the bad matrix first (the widest) or last.
      for (const bool bad_first : {true, false}) {
        const std::vector<at::Tensor> list =
            bad_first ? std::vector<at::Tensor>{p, narrow} : std::vector<at::Tensor>{narrow, p};
        const RankMeasures l = trainscope::rank_measures(at::TensorList(list), o);
        expect_undefined(l, bad_first ? 0 : 1, what + " list");
        expect_same_results(entry(l, bad_first ? 1 : 0), trainscope::rank_measures(narrow, o), 1e-10, what + " list");
        expect_matches(entry(l, bad_first ? 1 : 0), reference(narrow), dtype(), what + " list against the reference");
      }
    }
  }
  // Every entry NaN.
  expect_undefined(trainscope::rank_measures(at::full({4, 3}, kNaN, options())), 0, "all NaN");
}

TEST_P(RankTest, NonFiniteGramIsUndefined) {
  const at::Tensor x = with_spectrum(40, 9, spectrum(Spectrum::kGeometric, 9), 3);
  const at::Tensor good = at::mm(x.t(), x).to(options().dtype(at::kDouble));
  for (const double bad : kBadValues) {
    for (const auto& [i, j] : std::vector<std::pair<int, int>>{{0, 0}, {5, 2}, {2, 5}}) {  // diagonal, lower, upper
      at::Tensor g = good.clone();
      g[i][j] = bad;
      const RankMeasures r = trainscope::rank_measures_from_grams({good, g, at::zeros({3, 3}, good.options())});
      const std::string what = "gram " + std::to_string(bad) + " at " + std::to_string(i) + "," + std::to_string(j);
      expect_undefined(r, 1, what);
      expect_same_results(entry(r, 0), entry(trainscope::rank_measures_from_grams({good}), 0), 1e-10, what);
      EXPECT_EQ(to_vector(r.approximate_rank)[2], 0) << what;
    }
  }
}

// The streamed accumulator in each of its states: rows kept (fewer rows than units), ΦᵀΦ
// accumulated, and every row kept (kSvd). A NaN in any batch leaves the measures undefined until
// reset(); the accumulator itself never throws for it.
TEST_P(RankTest, GramAccumulatorWithNonFiniteBatch) {
  const at::Tensor phi = with_spectrum(60, 20, spectrum(Spectrum::kGeometric, 20), 44).to(options());
  for (const RankMethod method : {RankMethod::kGram, RankMethod::kSvd}) {
    for (const int64_t rows : {int64_t{8}, int64_t{60}}) {
      for (const double bad : kBadValues) {
        const std::string what = std::string(trainscope::rank_method_name(method)) + " rows " +
                                 std::to_string(rows) + " " + std::to_string(bad);
        GramAccumulator acc(method);
        at::Tensor first = phi.narrow(0, 0, rows / 2).clone();
        first[1][2] = bad;
        acc.add(first);
        acc.add(phi.narrow(0, rows / 2, rows - rows / 2));
        EXPECT_EQ(acc.keeps_rows(), method == RankMethod::kSvd || rows < 20) << what;
        expect_undefined(acc.measures(), 0, what);
        acc.reset();
        acc.add(phi.narrow(0, 0, rows));
        const RankMeasures want = trainscope::rank_measures(phi.narrow(0, 0, rows), RankOptions{0.99, method});
        expect_same_results(acc.measures(), want, 1e-9, what + " after reset");
      }
    }
  }
}

TEST_P(RankTest, FromSingularValues) {
  const std::vector<double> s = {3.0, 2.0, 1.0, 0.5, 0.0};
  const at::Tensor sigma = at::tensor(s, kF64).to(options());
  const RankMeasures one = trainscope::rank_measures_from_singular_values(sigma, 0.9);
  EXPECT_EQ(one.effective_rank.dim(), 0);
  expect_on_device(one.effective_rank, "effective_rank");
  // Reference from a diagonal matrix with these singular values.
  const Ref want = reference(at::diag(as_double_cpu(sigma)), 0.9);
  EXPECT_TRUE(is_close(value(one.effective_rank), want.erank, 1e-12));
  EXPECT_EQ(to_vector(one.approximate_rank)[0], want.arank);
  EXPECT_EQ(to_vector(one.abs_approximate_rank)[0], want.abs_arank);
  EXPECT_TRUE(is_close(value(one.stable_rank), want.srank, 1e-12));
  const RankMeasures rows = trainscope::rank_measures_from_singular_values(at::stack({sigma, at::zeros_like(sigma)}), 0.9);
  ASSERT_EQ(rows.effective_rank.sizes(), at::IntArrayRef({2}));
  EXPECT_EQ(to_vector(rows.approximate_rank), (std::vector<int64_t>{want.arank, 0}));
}

TEST_P(RankTest, FromGramsEqualsFromMatrices) {
  const std::vector<at::Tensor> mats = {
      with_spectrum(50, 20, spectrum(Spectrum::kGeometric, 20), 31).to(options()),
      with_spectrum(50, 7, spectrum(Spectrum::kFlat, 7), 32).to(options()),
      at::zeros({5, 3}, options()),
  };
  std::vector<at::Tensor> grams;
  for (const at::Tensor& m : mats) {
    const at::Tensor x = m.to(at::kDouble);
    grams.push_back(at::mm(x.t(), x));
  }
  const RankMeasures g = trainscope::rank_measures_from_grams(grams, 0.99);
  const RankMeasures m = trainscope::rank_measures(at::TensorList(mats));
  expect_same_results(g, m, 1e-9, "from grams");
  expect_on_device(g.effective_rank, "effective_rank");
}

// ---------------------------------------------------------------------------------------------
// GramAccumulator

TEST_P(RankTest, GramAccumulatorFewerRowsThanUnits) {
  const at::Tensor phi = with_spectrum(21, 40, spectrum(Spectrum::kGeometric, 21), 41).to(options());
  GramAccumulator acc;
  for (int b = 0; b < 3; ++b) acc.add(phi.narrow(0, 7 * b, 7));
  EXPECT_TRUE(acc.keeps_rows());
  EXPECT_EQ(acc.observations(), 21);
  EXPECT_EQ(acc.units(), 40);
  const at::Tensor x = as_double_cpu(phi);
  EXPECT_TRUE(at::allclose(as_double_cpu(acc.rows()), x, 0, 0));
  EXPECT_EQ(acc.gram().sizes(), at::IntArrayRef({21, 21}));  // ΦΦᵀ, the smaller one
  EXPECT_TRUE(at::allclose(as_double_cpu(acc.gram()), at::mm(x, x.t()), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(as_double_cpu(acc.unit_gram()), at::mm(x.t(), x), 1e-12, 1e-12));
  expect_on_device(acc.gram(), "gram");
  expect_same_results(acc.measures(), trainscope::rank_measures(phi), 1e-10, "streamed, rows kept");
}

TEST_P(RankTest, GramAccumulatorMoreRowsThanUnits) {
  const at::Tensor phi = with_spectrum(75, 40, spectrum(Spectrum::kGeometric, 40), 42).to(options());
  GramAccumulator acc;
  acc.add(phi.narrow(0, 0, 25));
  EXPECT_TRUE(acc.keeps_rows());
  acc.add(phi.narrow(0, 25, 25));  // 50 ≥ 40 rows: switches to ΦᵀΦ
  EXPECT_FALSE(acc.keeps_rows());
  acc.add(phi.narrow(0, 50, 25));
  EXPECT_EQ(acc.observations(), 75);
  const at::Tensor x = as_double_cpu(phi);
  const at::Tensor want = at::mm(x.t(), x);
  const at::Tensor g = acc.gram();
  EXPECT_EQ(g.sizes(), at::IntArrayRef({40, 40}));
  EXPECT_TRUE(at::allclose(as_double_cpu(g), want, 1e-12, 1e-12));
  EXPECT_TRUE(at::equal(as_double_cpu(g), as_double_cpu(g).t())) << "gram() must be exactly symmetric";
  EXPECT_TRUE(at::allclose(as_double_cpu(acc.unit_gram()), want, 1e-12, 1e-12));
  expect_same_results(acc.measures(), trainscope::rank_measures(phi), 1e-9, "streamed, ΦᵀΦ");
  EXPECT_THROW(acc.rows(), c10::Error);
  // gram() is a copy: changing it leaves the accumulator alone.
  g.zero_();
  EXPECT_TRUE(at::allclose(as_double_cpu(acc.gram()), want, 1e-12, 1e-12));
  acc.reset();
  EXPECT_EQ(acc.observations(), 0);
  EXPECT_EQ(acc.units(), -1);
  EXPECT_EQ(value(acc.measures().effective_rank), 0.0);
  EXPECT_EQ(acc.gram().numel(), 0);
}

TEST_P(RankTest, GramAccumulatorConvActivations) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(43);
  // [n, C, H, W] with channel-dependent scales: a unit is a channel, each position a row.
  const at::Tensor scale = at::pow(at::full({1, 6, 1, 1}, 0.5, kF64), at::arange(6, kF64).reshape({1, 6, 1, 1}));
  const at::Tensor acts = (at::randn({4, 6, 3, 5}, gen, kF64) * scale).to(options());
  const at::Tensor rows = acts.permute({0, 2, 3, 1}).reshape({-1, 6});
  GramAccumulator acc;
  acc.add(acts.narrow(0, 0, 1));  // 15 rows ≥ 6 units at once
  acc.add(acts.narrow(0, 1, 3));
  EXPECT_EQ(acc.observations(), 60);
  EXPECT_EQ(acc.units(), 6);
  const at::Tensor x = as_double_cpu(rows);
  EXPECT_TRUE(at::allclose(as_double_cpu(acc.unit_gram()), at::mm(x.t(), x), 1e-12, 1e-12));
  expect_same_results(acc.measures(0.9), trainscope::rank_measures(rows, RankOptions{0.9}), 1e-10, "conv");
  // The SVD method keeps every row.
  GramAccumulator svd(RankMethod::kSvd);
  svd.add(acts.narrow(0, 0, 2));
  svd.add(acts.narrow(0, 2, 2));
  EXPECT_TRUE(svd.keeps_rows());
  EXPECT_TRUE(at::allclose(as_double_cpu(svd.rows()), x, 0, 0));
  expect_same_results(svd.measures(0.9), trainscope::rank_measures(rows, RankOptions{0.9, RankMethod::kSvd}), 1e-12,
                      "conv svd");
  EXPECT_TRUE(at::allclose(as_double_cpu(svd.unit_gram()), at::mm(x.t(), x), 1e-12, 1e-12));
}

TEST_P(RankTest, GramAccumulatorBadInput) {
  GramAccumulator acc;
  acc.add(at::ones({3, 5}, options()));
  expect_error_naming([&] { acc.add(at::ones({3, 6}, options())); }, "acts", "other unit count");
  expect_error_naming([&] { acc.add(at::ones({5}, options())); }, "acts", "1-D");
  expect_error_naming([&] { acc.add(at::ones({3, 5}, options().dtype(at::kInt))); }, "acts", "integer");
  expect_error_naming([&] { acc.measures(0.0); }, "prop", "prop 0");
}

INSTANTIATE_TEST_SUITE_P(AllCases, RankTest, all_cases(), case_name);

// ---------------------------------------------------------------------------------------------
// Errors, raised before any work, naming the argument.

TEST(RankErrors, BadInputNamesTheArgument) {
  const at::Tensor ok = at::ones({4, 3});
  expect_error_naming([&] { trainscope::rank_measures(at::ones({4})); }, "matrices", "1-D");
  expect_error_naming([&] { trainscope::rank_measures(at::ones({2, 2, 2, 2})); }, "matrices", "4-D");
  expect_error_naming([&] { trainscope::rank_measures(at::ones({4, 3}, at::kInt)); }, "matrices", "integer");
  expect_error_naming([&] { trainscope::rank_measures(at::Tensor()); }, "matrices", "undefined");
  for (const double prop : {0.0, -0.5, 1.5, kNaN}) {
    expect_error_naming([&] { trainscope::rank_measures(ok, RankOptions{prop}); }, "prop", "prop");
    expect_error_naming([&] { trainscope::rank_measures_from_singular_values(at::ones({3}), prop); }, "prop", "prop");
    expect_error_naming([&] { trainscope::rank_measures_from_grams({at::eye(3, kF64)}, prop); }, "prop", "prop");
  }
  const std::vector<at::Tensor> list = {ok, at::ones({2, 3, 4})};
  expect_error_naming([&] { trainscope::rank_measures(at::TensorList(list)); }, "matrices", "3-D list entry");
  const std::vector<at::Tensor> ints = {ok, at::ones({2, 3}, at::kLong)};
  expect_error_naming([&] { trainscope::rank_measures(at::TensorList(ints)); }, "matrices", "integer list entry");
  const std::vector<at::Tensor> rect = {at::ones({3, 4}, kF64)};
  expect_error_naming([&] { trainscope::rank_measures_from_grams(rect); }, "grams", "non-square");
  expect_error_naming([&] { trainscope::rank_measures_from_singular_values(at::ones({2, 2, 2})); }, "sigma", "3-D");
  expect_error_naming([&] { trainscope::parse_rank_method("eig"); }, "method", "unknown method");
  EXPECT_EQ(trainscope::parse_rank_method("SVD"), RankMethod::kSvd);
  EXPECT_EQ(trainscope::parse_rank_method("gram"), RankMethod::kGram);
  EXPECT_STREQ(trainscope::rank_method_name(RankMethod::kSvd), "svd");
}

// A LAPACK solve that does not converge (c10::LinAlgError) marks its matrix, never throws. No
// finite matrix is known to make LAPACK fail, so a solver that fails on a marked matrix stands in
// for it: the batched call fails, then each matrix is solved alone and only the marked one fails.
TEST(RankCpuSolver, ALapackFailureMarksOnlyItsMatrix) {
  at::Tensor batch = at::zeros({3, 4, 4}, kF64);
  for (int64_t b = 0; b < 3; ++b) {
    const at::Tensor x = at::randn({6, 4}, kF64);
    batch[b].copy_(at::mm(x.t(), x));
  }
  batch[1][0][3] = 7.5;  // the mark (upper triangle: the solver reads the lower one)
  int64_t calls = 0;
  const auto fails_on_mark = [&](const at::Tensor& a) {
    ++calls;
    TORCH_CHECK_LINALG(!(a.select(-1, 3).select(-1, 0) == 7.5).any().item<bool>(), "did not converge");
    return at::linalg_eigvalsh(a);
  };
  std::vector<uint8_t> failed;
  const at::Tensor w = trainscope::detail::eigvalsh_cpu(batch, &failed, fails_on_mark);
  EXPECT_EQ(failed, (std::vector<uint8_t>{0, 1, 0}));
  EXPECT_EQ(calls, 4);  // the batch, then each matrix
  const at::Tensor want = at::linalg_eigvalsh(batch);
  EXPECT_TRUE(at::equal(w[0], want[0]));
  EXPECT_TRUE(at::equal(w[2], want[2]));
  EXPECT_TRUE(at::equal(w[1], at::zeros({4}, kF64)));
  // Without a failure: one batched call, nothing marked, torch.linalg.eigvalsh's values.
  failed.clear();
  calls = 0;
  batch[1][0][3] = 0.0;
  const at::Tensor w2 = trainscope::detail::eigvalsh_cpu(batch, &failed, fails_on_mark);
  EXPECT_EQ(failed, (std::vector<uint8_t>{0, 0, 0}));
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(at::equal(w2, at::linalg_eigvalsh(batch)));
  // The default solver is torch.linalg.eigvalsh; other errors are not swallowed.
  EXPECT_TRUE(at::equal(trainscope::detail::eigvalsh_cpu(batch, &failed), at::linalg_eigvalsh(batch)));
  EXPECT_THROW(trainscope::detail::eigvalsh_cpu(batch, &failed, [](const at::Tensor&) -> at::Tensor {
                 TORCH_CHECK(false, "some other error");
                 return at::Tensor();
               }),
               c10::Error);
  // unless_not_converged: the tensor, or an undefined one for a solve that did not converge.
  EXPECT_TRUE(trainscope::detail::unless_not_converged([] { return at::ones({2}); }).defined());
  EXPECT_FALSE(trainscope::detail::unless_not_converged([]() -> at::Tensor {
                 TORCH_CHECK_LINALG(false, "did not converge");
                 return at::Tensor();
               }).defined());
}

TEST(RankErrors, MixedDevices) {
  SKIP_WITHOUT_CUDA();
  const std::vector<at::Tensor> list = {at::ones({3, 2}), at::ones({3, 2}, at::TensorOptions().device(cuda0()))};
  expect_error_naming([&] { trainscope::rank_measures(at::TensorList(list)); }, "matrices", "mixed devices");
  GramAccumulator acc;
  acc.add(at::ones({3, 2}));
  expect_error_naming([&] { acc.add(at::ones({3, 2}, at::TensorOptions().device(cuda0()))); }, "acts", "device");
}

}  // namespace
