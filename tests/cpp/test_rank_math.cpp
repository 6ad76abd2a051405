// The torch-free rank-value function of cuda/rank.h on spectra whose measures are worked out by
// hand here (SPEC.md §3): flat, one nonzero, two values, zeros, prop at its edges, bad values;
// non-finite matrices flagged and zeroed; the ascending-eigenvalue accessor against descending σ,
// zero padding, and the eigenvalue floor.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/rank.h"

namespace {

using trainscope::cuda::DescendingSigma;
using trainscope::cuda::EigRoute;
using trainscope::cuda::RankValues;
using trainscope::cuda::eigen_floor;
using trainscope::cuda::eigen_sigma;
using trainscope::cuda::rank_values_from_eigenvalues;
using trainscope::cuda::rank_values_from_singular_values;

constexpr double kEps = 2.220446049250313080847e-16;

RankValues of(const std::vector<double>& sigma, double prop = 0.99) {
  return rank_values_from_singular_values(sigma.data(), static_cast<int64_t>(sigma.size()), prop);
}

void expect_same(const RankValues& a, const RankValues& b) {
  EXPECT_EQ(a.effective_rank, b.effective_rank);
  EXPECT_EQ(a.approximate_rank, b.approximate_rank);
  EXPECT_EQ(a.abs_approximate_rank, b.abs_approximate_rank);
  EXPECT_EQ(a.stable_rank, b.stable_rank);
}

TEST(RankMath, FlatSpectrum) {
  const RankValues r = of(std::vector<double>(10, 2.5));
  EXPECT_NEAR(r.effective_rank, 10.0, 1e-12);
  EXPECT_EQ(r.approximate_rank, 10);  // 9/10 < 0.99
  EXPECT_EQ(r.abs_approximate_rank, 10);
  EXPECT_DOUBLE_EQ(r.stable_rank, 10.0);
  // 100 equal values: the cut is at 99 (99/100 ≥ 0.99) for both ranks.
  const RankValues h = of(std::vector<double>(100, 1.0));
  EXPECT_NEAR(h.effective_rank, 100.0, 1e-10);
  EXPECT_EQ(h.approximate_rank, 99);
  EXPECT_EQ(h.abs_approximate_rank, 99);
  EXPECT_EQ(of(std::vector<double>(100, 1.0), 0.5).approximate_rank, 50);
}

TEST(RankMath, OneNonzero) {
  const RankValues r = of({7.0, 0.0, 0.0, 0.0});
  EXPECT_DOUBLE_EQ(r.effective_rank, 1.0);
  EXPECT_EQ(r.approximate_rank, 1);
  EXPECT_EQ(r.abs_approximate_rank, 1);
  EXPECT_DOUBLE_EQ(r.stable_rank, 1.0);
}

TEST(RankMath, TwoValues) {
  // σ = (2, 1): p = (2/3, 1/3); σ² shares (0.8, 0.2).
  const double h = -(2.0 / 3.0) * std::log(2.0 / 3.0) - (1.0 / 3.0) * std::log(1.0 / 3.0);
  const RankValues r = of({2.0, 1.0});
  EXPECT_NEAR(r.effective_rank, std::exp(h), 1e-14);
  EXPECT_EQ(r.approximate_rank, 2);
  EXPECT_EQ(r.abs_approximate_rank, 2);
  EXPECT_DOUBLE_EQ(r.stable_rank, 5.0 / 4.0);
  const RankValues c = of({2.0, 1.0}, 0.8);  // 4/5 reaches 0.8; 2/3 does not
  EXPECT_EQ(c.approximate_rank, 1);
  EXPECT_EQ(c.abs_approximate_rank, 2);
  const RankValues d = of({2.0, 1.0}, 0.6);
  EXPECT_EQ(d.approximate_rank, 1);
  EXPECT_EQ(d.abs_approximate_rank, 1);
}

TEST(RankMath, GeometricSpectrum) {
  // σ_i = 2^-i, i < 20: closed forms, computed here term by term in long double.
  std::vector<double> s;
  long double s1 = 0, s2 = 0;
  for (int i = 0; i < 20; ++i) {
    s.push_back(std::ldexp(1.0, -i));
    s1 += s.back();
    s2 += static_cast<long double>(s.back()) * s.back();
  }
  long double h = 0;
  for (double v : s) h -= (v / s1) * std::log(v / s1);
  const RankValues r = of(s);
  EXPECT_NEAR(r.effective_rank, static_cast<double>(std::exp(h)), 1e-13);
  // σ² shares 1 − 4^-k (over 1 − 4^-20): 0.99 needs 4^-k ≤ 0.01, k = 4 (1/256).
  EXPECT_EQ(r.approximate_rank, 4);
  // σ shares 1 − 2^-k: 0.99 needs 2^-k ≤ 0.01, k = 7 (1/128).
  EXPECT_EQ(r.abs_approximate_rank, 7);
  EXPECT_NEAR(r.stable_rank, static_cast<double>(s2), 1e-15);
}

TEST(RankMath, ZerosAndEmpty) {
  const RankValues z = of({0.0, 0.0, 0.0});
  EXPECT_EQ(z.effective_rank, 0.0);
  EXPECT_EQ(z.approximate_rank, 0);
  EXPECT_EQ(z.abs_approximate_rank, 0);
  EXPECT_EQ(z.stable_rank, 0.0);
  const RankValues e = rank_values_from_singular_values(nullptr, 0, 0.99);
  EXPECT_EQ(e.effective_rank, 0.0);
  EXPECT_EQ(e.approximate_rank, 0);
  EXPECT_EQ(e.stable_rank, 0.0);
}

TEST(RankMath, PropEdges) {
  // prop = 1 reaches exactly at the last nonzero value (the running sum ends at the total).
  const RankValues one = of({3.0, 2.0, 1.0, 0.0, 0.0}, 1.0);
  EXPECT_EQ(one.approximate_rank, 3);
  EXPECT_EQ(one.abs_approximate_rank, 3);
  // A value far below the others' rounding does not change the running sum: still reached.
  const RankValues tiny = of({1.0, 1.0, 1e-300}, 1.0);
  EXPECT_GE(tiny.approximate_rank, 2);
  EXPECT_LE(tiny.approximate_rank, 3);
  // The smallest prop: the first value.
  const RankValues small = of({3.0, 2.0, 1.0}, 1e-12);
  EXPECT_EQ(small.approximate_rank, 1);
  EXPECT_EQ(small.abs_approximate_rank, 1);
  // Irregular values at prop = 1 for many lengths: always the count of nonzero values.
  for (int k = 1; k < 200; k += 7) {
    std::vector<double> s;
    for (int i = 0; i < k; ++i) s.push_back(1.0 / (1.0 + 0.37 * i));
    s.push_back(0.0);
    const RankValues r = of(s, 1.0);
    EXPECT_EQ(r.approximate_rank, k) << k;
    EXPECT_EQ(r.abs_approximate_rank, k) << k;
  }
}

TEST(RankMath, BadValuesAreUndefined) {
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), -1.0}) {
    const RankValues r = of({2.0, bad, 1.0});
    EXPECT_TRUE(std::isnan(r.effective_rank)) << bad;
    EXPECT_TRUE(std::isnan(r.stable_rank)) << bad;
    EXPECT_EQ(r.approximate_rank, -1) << bad;
    EXPECT_EQ(r.abs_approximate_rank, -1) << bad;
  }
  const RankValues big = of({1e200, 1e200});  // Σσ² overflows
  EXPECT_TRUE(std::isnan(big.effective_rank));
}

// A matrix holding NaN or ±Inf is flagged and zeroed before the solve (the host side of
// zero_nonfinite_launch); a finite one is left alone, the largest finite values and signed zeros
// included.
TEST(RankMath, NonfiniteMatricesAreFlaggedAndZeroed) {
  using trainscope::cuda::all_finite;
  using trainscope::cuda::zero_if_nonfinite;
  constexpr double kMax = std::numeric_limits<double>::max();
  constexpr double kTiny = std::numeric_limits<double>::denorm_min();
  std::vector<double> finite = {1.0, -kMax, kMax, kTiny, -0.0, 0.0};
  const std::vector<double> copy = finite;
  EXPECT_TRUE(all_finite(finite.data(), 6));
  EXPECT_FALSE(zero_if_nonfinite(finite.data(), 6));
  EXPECT_EQ(finite, copy);
  EXPECT_TRUE(all_finite(nullptr, 0));
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                           -std::numeric_limits<double>::infinity()}) {
    for (size_t at : {size_t{0}, size_t{3}, size_t{5}}) {  // first, middle, last
      std::vector<double> m = copy;
      m[at] = bad;
      EXPECT_FALSE(all_finite(m.data(), 6)) << bad << " at " << at;
      EXPECT_TRUE(zero_if_nonfinite(m.data(), 6)) << bad << " at " << at;
      EXPECT_EQ(m, std::vector<double>(6, 0.0)) << bad << " at " << at;
    }
  }
  // Only the first `count` entries are read.
  std::vector<double> tail = {1.0, 2.0, std::numeric_limits<double>::quiet_NaN()};
  EXPECT_FALSE(zero_if_nonfinite(tail.data(), 2));
  EXPECT_EQ(tail[0], 1.0);
}

TEST(RankMath, StridedAccessor) {
  const std::vector<double> interleaved = {4.0, -9.0, 2.0, -9.0, 1.0, -9.0};
  const RankValues a = trainscope::cuda::rank_values(DescendingSigma{interleaved.data(), 2}, 3, 0.9);
  expect_same(a, of({4.0, 2.0, 1.0}, 0.9));
}

TEST(RankMath, AscendingEigenvaluesEqualDescendingSigma) {
  // Exact squares, so sqrt(λ) is σ to the bit.
  const std::vector<double> sigma = {6.0, 5.0, 3.0, 2.0, 1.0, 0.5};
  std::vector<double> w;
  for (auto it = sigma.rbegin(); it != sigma.rend(); ++it) w.push_back(*it * *it);
  for (const double prop : {0.5, 0.9, 0.99, 1.0}) {
    expect_same(rank_values_from_eigenvalues(w.data(), 6, 6, prop), of(sigma, prop));
  }
  // Zero padding first (a padded solve): the top `dim` values are the matrix's.
  std::vector<double> padded = {0.0, 0.0, 0.0};
  padded.insert(padded.end(), w.begin(), w.end());
  expect_same(rank_values_from_eigenvalues(padded.data(), 9, 6, 0.99), of(sigma, 0.99));
  // dim = 0: nothing read, all zero.
  const RankValues none = rank_values_from_eigenvalues(padded.data(), 9, 0, 0.99);
  EXPECT_EQ(none.effective_rank, 0.0);
  EXPECT_EQ(none.approximate_rank, 0);
}

TEST(RankMath, EigenvalueFloor) {
  EXPECT_EQ(eigen_floor(100, 2.0), 100 * kEps * 2.0);
  EXPECT_EQ(eigen_floor(100, 0.0), 0.0);
  EXPECT_EQ(eigen_floor(100, -1.0), 0.0);  // only positive eigenvalues count
  // dim = 4, λ_max = 1: the floor is 4 · 2⁻⁵². At it: zero; just above: counts.
  const double floor = 4 * kEps;
  {
    const std::vector<double> w = {-1e-17, floor, 0.25, 1.0};
    const RankValues r = rank_values_from_eigenvalues(w.data(), 4, 4, 1.0);
    expect_same(r, of({1.0, 0.5, 0.0, 0.0}, 1.0));
    EXPECT_EQ(r.approximate_rank, 2);
  }
  {
    const std::vector<double> w = {-1e-17, floor * 1.5, 0.25, 1.0};
    const RankValues r = rank_values_from_eigenvalues(w.data(), 4, 4, 1.0);
    EXPECT_EQ(r.approximate_rank, 3);
    EXPECT_EQ(r.abs_approximate_rank, 3);
    EXPECT_GT(r.effective_rank, of({1.0, 0.5}).effective_rank);
  }
  // The floor scales with dim: the same λ counts in a 4 × 4 matrix and not in a 400 × 400 one.
  std::vector<double> big(400, 0.0);
  big[398] = floor * 1.5;
  big[399] = 1.0;
  EXPECT_EQ(rank_values_from_eigenvalues(big.data(), 400, 400, 1.0).approximate_rank, 1);
  // Rounding below zero, a zero matrix: every measure 0.
  const std::vector<double> neg = {-1e-30, -1e-31, 0.0};
  const RankValues z = rank_values_from_eigenvalues(neg.data(), 3, 3, 0.99);
  EXPECT_EQ(z.effective_rank, 0.0);
  EXPECT_EQ(z.approximate_rank, 0);
  EXPECT_EQ(z.stable_rank, 0.0);
  // A NaN eigenvalue shows.
  const std::vector<double> nan = {0.0, std::numeric_limits<double>::quiet_NaN(), 1.0};
  EXPECT_TRUE(std::isnan(rank_values_from_eigenvalues(nan.data(), 3, 3, 0.99).effective_rank));
  // The accessor itself.
  const std::vector<double> w = {0.0, 1e-20, 4.0, 9.0};
  const auto s = eigen_sigma(w.data(), 4, 3);
  EXPECT_EQ(s(0), 3.0);
  EXPECT_EQ(s(1), 2.0);
  EXPECT_EQ(s(2), 0.0);  // 1e-20 ≤ 3 · 2⁻⁵² · 9
}

TEST(RankMath, EigRoute) {
  using trainscope::cuda::kSyevBatchedMaxN;
  using trainscope::cuda::resolve_eig_route;
  EXPECT_EQ(resolve_eig_route(EigRoute::kAuto, kSyevBatchedMaxN), EigRoute::kBatched);
  EXPECT_EQ(resolve_eig_route(EigRoute::kAuto, kSyevBatchedMaxN + 1), EigRoute::kPerMatrix);
  EXPECT_EQ(resolve_eig_route(EigRoute::kBatched, 4096), EigRoute::kBatched);
  EXPECT_EQ(resolve_eig_route(EigRoute::kPerMatrix, 2), EigRoute::kPerMatrix);
  // One matrix past syevBatched's INT32_MAX elements per call takes the per-matrix route even
  // when the batched one is asked for.
  EXPECT_EQ(resolve_eig_route(EigRoute::kBatched, 46340), EigRoute::kBatched);     // 46340² < 2³¹
  EXPECT_EQ(resolve_eig_route(EigRoute::kBatched, 46341), EigRoute::kPerMatrix);   // 46341² > 2³¹ − 1
  EXPECT_EQ(resolve_eig_route(EigRoute::kAuto, 4, /*max_elements=*/15), EigRoute::kPerMatrix);
}

TEST(RankMath, SyevBatchedChunkKeepsEachCallUnderInt32Elements) {
  using trainscope::cuda::kSyevBatchedMaxElements;
  using trainscope::cuda::syev_batched_chunk;
  EXPECT_EQ(syev_batched_chunk(32, 10, 0), 10);
  // n = 32: 2097151 matrices of 1024 elements fit in INT32_MAX, 2097152 do not.
  EXPECT_EQ(syev_batched_chunk(32, int64_t{1} << 22, 0), 2097151);
  EXPECT_LE(syev_batched_chunk(32, int64_t{1} << 22, 0) * 32 * 32, kSyevBatchedMaxElements);
  EXPECT_EQ(syev_batched_chunk(1024, 5000, 0), 2047);
  EXPECT_EQ(syev_batched_chunk(46341, 1, 0), 0);
  EXPECT_EQ(syev_batched_chunk(46340, 3, 0), 1);
  EXPECT_EQ(syev_batched_chunk(4, 10, 48), 3);  // a smaller limit, as the CUDA test uses
  EXPECT_EQ(syev_batched_chunk(4, 10, 15), 0);
  EXPECT_EQ(syev_batched_chunk(4, 0, 0), 0);
  // Every n and batch: the chunk fits, and one more matrix would not (unless the batch is done).
  for (int64_t n = 1; n <= 300; n += 37) {
    for (int64_t batch : {int64_t{1}, int64_t{1000}, int64_t{1} << 30}) {
      const int64_t c = syev_batched_chunk(n, batch, 0);
      ASSERT_GE(c, 1);
      EXPECT_LE(c * n * n, kSyevBatchedMaxElements) << n << " " << batch;
      if (c < batch) EXPECT_GT((c + 1) * n * n, kSyevBatchedMaxElements) << n << " " << batch;
    }
  }
}

}  // namespace
