// Torch-free, CPU-only tests of the host/device helpers in cuda/common.h and cuda/param_stats.h:
// histogram binning (SPEC.md §4), the 16-bit conversions, the per-element accumulation and the
// finalisation of the metrics (SPEC.md §1), and the 64-bit chunk planning.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cuda/common.h"
#include "cuda/param_stats.h"
#include "tests/cpp/reference_bin.h"

namespace {

using trainscope::cuda::bf16_bits;
using trainscope::cuda::f16_bits;
using trainscope::cuda::HistSpec;
using trainscope::cuda::ParamSums;
namespace tc = trainscope::cuda;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();


uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---------------------------------------------------------------------------------------------
// make_hist_spec / hist_bin

TEST(HistSpecTest, FieldsFollowFromNbinsAndMaxval) {
  const HistSpec h = tc::make_hist_spec(100, 0.05);
  EXPECT_EQ(h.nbins, 100);
  EXPECT_EQ(h.maxval, 0.05);
  EXPECT_EQ(h.width, 2.0 * 0.05 / 100.0);
  EXPECT_EQ(h.inv_width, 1.0 / h.width);
}

TEST(HistBinTest, ValuesAtPlusMinusMaxvalGoToTheEdgeBins) {
  for (int64_t nbins : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{100}, int64_t{1000},
                        tc::kMaxHistBins}) {
    for (double m : {0.05, 1.0, 1e-3, 3.7, 1e6}) {
      SCOPED_TRACE(testing::Message() << "nbins=" << nbins << " maxval=" << m);
      const HistSpec h = tc::make_hist_spec(nbins, m);
      EXPECT_EQ(tc::hist_bin(-m, h), 0);
      EXPECT_EQ(tc::hist_bin(m, h), nbins - 1);
      EXPECT_EQ(tc::hist_bin(std::nextafter(m, 0.0), h), reference_bin(std::nextafter(m, 0.0), nbins, m));
      EXPECT_EQ(tc::hist_bin(std::nextafter(-m, 0.0), h), 0);
    }
  }
}

TEST(HistBinTest, OutliersPileIntoTheEdgeBins) {
  const HistSpec h = tc::make_hist_spec(100, 0.05);
  for (double x : {0.05000001, 0.06, 1.0, 1e10, 1e300, std::numeric_limits<double>::max()}) {
    EXPECT_EQ(tc::hist_bin(x, h), 99) << x;
    EXPECT_EQ(tc::hist_bin(-x, h), 0) << -x;
  }
  EXPECT_EQ(tc::hist_bin(std::nextafter(0.05, 1.0), h), 99);
  EXPECT_EQ(tc::hist_bin(std::nextafter(-0.05, -1.0), h), 0);
}

TEST(HistBinTest, ExactEdgesBelongToTheBinTheyOpen) {
  // Dyadic maxval and nbins: every edge −m + k·w is exact in float64, so the bin of each edge is
  // known without rounding questions: edge k opens bin k, and edge − w/1024 (also exact) lies in
  // bin k−1. One ulp either side of an edge, x + m may round onto the edge, so those values are
  // held to the plain formula instead.
  struct Case { int64_t nbins; double maxval; };
  for (const Case& c : {Case{8, 1.0}, Case{2, 0.5}, Case{1024, 0.0625}, Case{64, 4.0},
                        Case{tc::kMaxHistBins, 1.0}}) {
    SCOPED_TRACE(testing::Message() << "nbins=" << c.nbins << " maxval=" << c.maxval);
    const HistSpec h = tc::make_hist_spec(c.nbins, c.maxval);
    const double w = 2.0 * c.maxval / static_cast<double>(c.nbins);
    const int64_t step = std::max<int64_t>(1, c.nbins / 4096);
    for (int64_t k = 1; k < c.nbins; k += step) {
      const double edge = -c.maxval + static_cast<double>(k) * w;
      ASSERT_EQ(tc::hist_bin(edge, h), k) << "edge " << k;
      ASSERT_EQ(tc::hist_bin(edge - w / 1024.0, h), k - 1) << "just below edge " << k;
      ASSERT_EQ(tc::hist_bin(edge + w / 1024.0, h), k) << "just above edge " << k;
      const double below = std::nextafter(edge, -kInf), above = std::nextafter(edge, kInf);
      ASSERT_EQ(tc::hist_bin(below, h), reference_bin(below, c.nbins, c.maxval)) << "ulp below edge " << k;
      ASSERT_EQ(tc::hist_bin(above, h), reference_bin(above, c.nbins, c.maxval)) << "ulp above edge " << k;
    }
  }
}

TEST(HistBinTest, ZeroAndNegativeZero) {
  // 0 opens the upper half when nbins is even, and sits in the middle bin when it is odd.
  EXPECT_EQ(tc::hist_bin(0.0, tc::make_hist_spec(2, 0.05)), 1);
  EXPECT_EQ(tc::hist_bin(-0.0, tc::make_hist_spec(2, 0.05)), 1);
  EXPECT_EQ(tc::hist_bin(0.0, tc::make_hist_spec(3, 0.05)), 1);
  EXPECT_EQ(tc::hist_bin(0.0, tc::make_hist_spec(8, 1.0)), 4);
  EXPECT_EQ(tc::hist_bin(0.0, tc::make_hist_spec(100, 0.05)), reference_bin(0.0, 100, 0.05));
  EXPECT_EQ(tc::hist_bin(-0.0, tc::make_hist_spec(100, 0.05)), reference_bin(0.0, 100, 0.05));
}

TEST(HistBinTest, SingleBinTakesEverything) {
  const HistSpec h = tc::make_hist_spec(1, 0.05);
  for (double x : {-1e30, -0.05, -0.01, 0.0, 0.02, 0.05, 7.0}) EXPECT_EQ(tc::hist_bin(x, h), 0) << x;
}

TEST(HistBinTest, DefaultSpecEdgesAndTheirNeighbours) {
  // maxval = 0.05 is not dyadic: edges computed as −m + k·w are rounded, which is where the
  // multiply-by-1/w shortcut must fall back to the division to agree with the plain formula.
  for (int64_t nbins : {int64_t{100}, int64_t{7}, int64_t{1000}, int64_t{65536}}) {
    const double m = 0.05;
    const HistSpec h = tc::make_hist_spec(nbins, m);
    const double w = 2.0 * m / static_cast<double>(nbins);
    const int64_t step = std::max<int64_t>(1, nbins / 2000);
    for (int64_t k = 0; k <= nbins; k += step) {
      const double edge = -m + static_cast<double>(k) * w;
      double x = edge;
      for (int i = 0; i < 3; ++i) x = std::nextafter(x, -kInf);
      for (int i = 0; i < 7; ++i, x = std::nextafter(x, kInf)) {
        ASSERT_EQ(tc::hist_bin(x, h), reference_bin(x, nbins, m))
            << "nbins=" << nbins << " k=" << k << " x=" << x;
      }
      const float xf = static_cast<float>(edge);  // what a float32 gradient at the edge holds
      ASSERT_EQ(tc::hist_bin(static_cast<double>(xf), h), reference_bin(xf, nbins, m))
          << "nbins=" << nbins << " k=" << k << " float x=" << xf;
    }
  }
}

TEST(HistBinTest, AgreesWithPlainFormulaOnRandomValues) {
  std::mt19937_64 rng(20240611);
  const int64_t nbins_list[] = {1, 2, 3, 7, 10, 100, 101, 1000, 12345, 65536, 999983, tc::kMaxHistBins};
  const double maxval_list[] = {0.05, 1.0, 1e-3, 3.7, 0.1, 1e-6, 250.0};
  for (int64_t nbins : nbins_list) {
    for (double m : maxval_list) {
      const HistSpec h = tc::make_hist_spec(nbins, m);
      const double w = 2.0 * m / static_cast<double>(nbins);
      std::uniform_real_distribution<double> inside(-1.2 * m, 1.2 * m);
      std::uniform_int_distribution<int64_t> bin(0, nbins);
      std::uniform_int_distribution<int> nudge(-4, 4);
      for (int i = 0; i < 20000; ++i) {
        double x;
        switch (i % 4) {
          case 0: x = inside(rng); break;
          case 1: x = static_cast<double>(static_cast<float>(inside(rng))); break;
          default: {  // a few ulp around a rounded edge
            x = -m + static_cast<double>(bin(rng)) * w;
            const int n = nudge(rng);
            for (int j = 0; j < std::abs(n); ++j) x = std::nextafter(x, n < 0 ? -kInf : kInf);
            if (i % 4 == 3) x = static_cast<double>(static_cast<float>(x));
          }
        }
        ASSERT_EQ(tc::hist_bin(x, h), reference_bin(x, nbins, m))
            << "nbins=" << nbins << " maxval=" << m << " x=" << x;
      }
    }
  }
}

TEST(HistBinTest, AlwaysInRange) {
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<uint64_t> bits;
  for (int64_t nbins : {int64_t{1}, int64_t{100}, tc::kMaxHistBins}) {
    const HistSpec h = tc::make_hist_spec(nbins, 0.05);
    for (int i = 0; i < 100000; ++i) {
      const uint64_t u = bits(rng);
      double x;
      std::memcpy(&x, &u, sizeof x);
      if (!std::isfinite(x)) continue;
      const int64_t b = tc::hist_bin(x, h);
      ASSERT_GE(b, 0) << x;
      ASSERT_LT(b, nbins) << x;
      ASSERT_EQ(b, reference_bin(x, nbins, 0.05)) << x;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 16-bit conversions, dtype sizes, is_finite, ceil_div

// IEEE binary16 decoded independently, in float64.
double decode_f16(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exp = (h >> 10) & 0x1f;
  const int man = h & 0x3ff;
  double mag;
  if (exp == 0x1f) {
    mag = man == 0 ? kInf : kNaN;
  } else if (exp == 0) {
    mag = std::ldexp(static_cast<double>(man), -24);
  } else {
    mag = std::ldexp(1.0 + static_cast<double>(man) / 1024.0, exp - 15);
  }
  return sign ? -mag : mag;
}

TEST(Float16Test, KnownBitPatterns) {
  struct Case { uint16_t bits; double value; };
  const Case cases[] = {
      {0x3c00, 1.0},           {0xbc00, -1.0},         {0x4000, 2.0},
      {0x3800, 0.5},           {0x3555, 0.333251953125}, {0x4248, 3.140625},
      {0x7bff, 65504.0},       {0xfbff, -65504.0},
      {0x0400, 6.103515625e-05},                  // smallest normal, 2^-14
      {0x0001, 5.9604644775390625e-08},           // smallest subnormal, 2^-24
      {0x03ff, 6.0975551605224609375e-05},        // largest subnormal, 1023·2^-24
      {0x8001, -5.9604644775390625e-08},          {0x0200, 3.0517578125e-05},
      {0x7c00, kInf},          {0xfc00, -kInf},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(static_cast<double>(tc::f16_to_float(f16_bits{c.bits})), c.value)
        << std::hex << "0x" << c.bits;
  }
}

TEST(Float16Test, SignedZeros) {
  const float pz = tc::f16_to_float(f16_bits{0x0000});
  const float nz = tc::f16_to_float(f16_bits{0x8000});
  EXPECT_EQ(pz, 0.0f);
  EXPECT_FALSE(std::signbit(pz));
  EXPECT_EQ(nz, 0.0f);
  EXPECT_TRUE(std::signbit(nz));
}

TEST(Float16Test, NaNs) {
  for (uint16_t b : {uint16_t{0x7e00}, uint16_t{0x7c01}, uint16_t{0xfe00}, uint16_t{0x7fff},
                     uint16_t{0xfc01}}) {
    EXPECT_TRUE(std::isnan(tc::f16_to_float(f16_bits{b}))) << std::hex << "0x" << b;
  }
}

TEST(Float16Test, EveryBitPatternMatchesIndependentDecode) {
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const uint16_t h = static_cast<uint16_t>(b);
    const float got = tc::f16_to_float(f16_bits{h});
    const double want = decode_f16(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << "0x" << b;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << "0x" << b;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << std::hex << "0x" << b;
    }
  }
}

TEST(BFloat16Test, KnownBitPatterns) {
  struct Case { uint16_t bits; double value; };
  const Case cases[] = {
      {0x3f80, 1.0},
      {0xbf80, -1.0},
      {0x4049, 3.140625},
      {0x3e80, 0.25},
      {0x7f7f, 3.3895313892515355e38},   // largest finite
      {0x0080, 1.1754943508222875e-38},  // smallest normal, 2^-126
      {0x0001, 9.183549615799121e-41},   // smallest subnormal, 2^-133
      {0x807f, -1.1663108012064884e-38}, // largest negative subnormal, -127·2^-133
      {0x7f80, kInf},
      {0xff80, -kInf},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(static_cast<double>(tc::bf16_to_float(bf16_bits{c.bits})), c.value)
        << std::hex << "0x" << c.bits;
  }
}

TEST(BFloat16Test, SignedZerosAndNaNs) {
  const float pz = tc::bf16_to_float(bf16_bits{0x0000});
  const float nz = tc::bf16_to_float(bf16_bits{0x8000});
  EXPECT_EQ(pz, 0.0f);
  EXPECT_FALSE(std::signbit(pz));
  EXPECT_EQ(nz, 0.0f);
  EXPECT_TRUE(std::signbit(nz));
  for (uint16_t b : {uint16_t{0x7fc0}, uint16_t{0x7f81}, uint16_t{0xffc0}, uint16_t{0x7fff}}) {
    EXPECT_TRUE(std::isnan(tc::bf16_to_float(bf16_bits{b}))) << std::hex << "0x" << b;
  }
}

TEST(BFloat16Test, EveryBitPatternIsTheTopHalfOfAFloat32) {
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const float got = tc::bf16_to_float(bf16_bits{static_cast<uint16_t>(b)});
    ASSERT_EQ(float_bits(got), b << 16) << std::hex << "0x" << b;
  }
}

TEST(WidenTest, KeepsValuesAndPrecision) {
  EXPECT_EQ(tc::widen(1.5f), 1.5f);
  EXPECT_EQ(tc::widen(0.1), 0.1);
  EXPECT_EQ(tc::widen(bf16_bits{0x3f80}), 1.0f);
  EXPECT_EQ(tc::widen(f16_bits{0x3c00}), 1.0f);
  static_assert(std::is_same<tc::Widen<double>::type, double>::value, "float64 stays float64");
  static_assert(std::is_same<tc::Widen<float>::type, float>::value, "float32 stays float32");
  static_assert(std::is_same<tc::Widen<bf16_bits>::type, float>::value, "bf16 widens to float");
  static_assert(std::is_same<tc::Widen<f16_bits>::type, float>::value, "fp16 widens to float");
}

TEST(DTypeTest, Sizes) {
  EXPECT_EQ(tc::dtype_size(tc::DType::kFloat32), 4);
  EXPECT_EQ(tc::dtype_size(tc::DType::kFloat64), 8);
  EXPECT_EQ(tc::dtype_size(tc::DType::kBFloat16), 2);
  EXPECT_EQ(tc::dtype_size(tc::DType::kFloat16), 2);
}

TEST(IsFiniteTest, DoubleAndFloat) {
  for (double v : {0.0, -0.0, 1.0, -3.5, std::numeric_limits<double>::max(),
                   -std::numeric_limits<double>::max(), std::numeric_limits<double>::denorm_min(),
                   std::numeric_limits<double>::min()}) {
    EXPECT_TRUE(tc::is_finite(v)) << v;
  }
  for (double v : {kInf, -kInf, kNaN, -kNaN}) EXPECT_FALSE(tc::is_finite(v)) << v;

  constexpr float fInf = std::numeric_limits<float>::infinity();
  constexpr float fNaN = std::numeric_limits<float>::quiet_NaN();
  for (float v : {0.0f, -0.0f, 1.0f, -3.5f, std::numeric_limits<float>::max(),
                  -std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min()}) {
    EXPECT_TRUE(tc::is_finite(v)) << v;
  }
  for (float v : {fInf, -fInf, fNaN, -fNaN}) EXPECT_FALSE(tc::is_finite(v)) << v;
}

TEST(CeilDivTest, SmallAndLargeValues) {
  EXPECT_EQ(tc::ceil_div(0, 1), 0);
  EXPECT_EQ(tc::ceil_div(0, 1024), 0);
  EXPECT_EQ(tc::ceil_div(1, 1), 1);
  EXPECT_EQ(tc::ceil_div(1, 1024), 1);
  EXPECT_EQ(tc::ceil_div(4, 2), 2);
  EXPECT_EQ(tc::ceil_div(5, 2), 3);
  EXPECT_EQ(tc::ceil_div(1024, 1024), 1);
  EXPECT_EQ(tc::ceil_div(1025, 1024), 2);
  const int64_t big = (int64_t{1} << 31) + 1;
  EXPECT_EQ(tc::ceil_div(big, 16384), (int64_t{1} << 17) + 1);
  EXPECT_EQ(tc::ceil_div(int64_t{1} << 40, 1024), int64_t{1} << 30);
  EXPECT_EQ(tc::ceil_div((int64_t{1} << 40) + 1, 1024), (int64_t{1} << 30) + 1);
  EXPECT_EQ(tc::ceil_div(int64_t{1} << 62, 3), ((int64_t{1} << 62) + 2) / 3);
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int64_t> a_dist(0, int64_t{1} << 50);
  std::uniform_int_distribution<int64_t> b_dist(1, int64_t{1} << 20);
  for (int i = 0; i < 10000; ++i) {
    const int64_t a = a_dist(rng), b = b_dist(rng);
    const int64_t q = tc::ceil_div(a, b);
    ASSERT_GE(q * b, a) << a << " / " << b;
    ASSERT_LT((q - 1) * b, a > 0 ? a : 1) << a << " / " << b;
  }
}

// ---------------------------------------------------------------------------------------------
// Flags -> arrays read

TEST(FlagsTest, ArraysReadFollowFromFlags) {
  EXPECT_TRUE(tc::reads_grad(tc::kGradSq));
  EXPECT_TRUE(tc::reads_grad(tc::kGradAbs));
  EXPECT_TRUE(tc::reads_grad(tc::kHistogram));
  EXPECT_FALSE(tc::reads_grad(tc::kParamAbs | tc::kDistSq | tc::kUpdateSq | tc::kRefreshPrev));

  EXPECT_TRUE(tc::reads_param(tc::kParamAbs));
  EXPECT_TRUE(tc::reads_param(tc::kDistSq));
  EXPECT_TRUE(tc::reads_param(tc::kUpdateSq));
  EXPECT_TRUE(tc::reads_param(tc::kRefreshPrev));  // θ is read to be copied into θ_prev
  EXPECT_FALSE(tc::reads_param(tc::kGradSq | tc::kGradAbs | tc::kHistogram));

  EXPECT_TRUE(tc::reads_init(tc::kDistSq));
  EXPECT_FALSE(tc::reads_init(0x7fu & ~static_cast<uint32_t>(tc::kDistSq)));
  EXPECT_TRUE(tc::reads_prev(tc::kUpdateSq));
  EXPECT_FALSE(tc::reads_prev(0x7fu & ~static_cast<uint32_t>(tc::kUpdateSq)));
  EXPECT_FALSE(tc::reads_grad(0) || tc::reads_param(0) || tc::reads_init(0) || tc::reads_prev(0));
}

// ---------------------------------------------------------------------------------------------
// accumulate_grad / accumulate_param / add / finalize_metrics

constexpr uint32_t kAllSums =
    tc::kGradSq | tc::kGradAbs | tc::kParamAbs | tc::kDistSq | tc::kUpdateSq | tc::kParamSq;

TEST(ParamSumsTest, ClearZeroesEverything) {
  ParamSums<double> a;
  for (int i = 0; i < tc::kNumSums; ++i) a.s[i] = 42.0 + i;
  a.nonfinite = 9;
  a.clear();
  for (int i = 0; i < tc::kNumSums; ++i) EXPECT_EQ(a.s[i], 0.0) << i;
  EXPECT_EQ(a.nonfinite, 0);
}

TEST(ParamSumsTest, AccumulateGradTouchesOnlyRequestedSlots) {
  ParamSums<double> a;
  a.clear();
  tc::accumulate_grad(a, tc::kGradSq, -3.0);
  EXPECT_EQ(a.s[tc::kSlotGradNorm], 9.0);
  EXPECT_EQ(a.s[tc::kSlotGradMagnitude], 0.0);

  a.clear();
  tc::accumulate_grad(a, tc::kGradAbs, -3.0);
  EXPECT_EQ(a.s[tc::kSlotGradNorm], 0.0);
  EXPECT_EQ(a.s[tc::kSlotGradMagnitude], 3.0);

  a.clear();
  tc::accumulate_grad(a, tc::kGradSq | tc::kGradAbs, -3.0);
  tc::accumulate_grad(a, tc::kGradSq | tc::kGradAbs, 4.0);
  EXPECT_EQ(a.s[tc::kSlotGradNorm], 25.0);
  EXPECT_EQ(a.s[tc::kSlotGradMagnitude], 7.0);
  for (int i : {tc::kSlotWeightMagnitude, tc::kSlotDistance, tc::kSlotUpdateSize, tc::kSlotWeightNorm}) {
    EXPECT_EQ(a.s[i], 0.0);
  }
  EXPECT_EQ(a.nonfinite, 0);
}

TEST(ParamSumsTest, NonfiniteGradientsAreCountedWheneverGradientsAreRead) {
  for (uint32_t flags : {uint32_t{tc::kGradSq}, uint32_t{tc::kGradAbs}, uint32_t{tc::kHistogram},
                         uint32_t{tc::kGradSq | tc::kGradAbs | tc::kHistogram}}) {
    ParamSums<double> a;
    a.clear();
    for (double g : {1.0, kNaN, kInf, -kInf, -2.0, 0.0}) tc::accumulate_grad(a, flags, g);
    EXPECT_EQ(a.nonfinite, 3) << "flags=" << flags;
  }
  ParamSums<float> f;
  f.clear();
  for (float g : {1.0f, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::infinity()}) {
    tc::accumulate_grad(f, tc::kGradSq, g);
  }
  EXPECT_EQ(f.nonfinite, 2);
  EXPECT_TRUE(std::isnan(f.s[tc::kSlotGradNorm]));

  // Flags that read no gradient count nothing.
  ParamSums<double> a;
  a.clear();
  tc::accumulate_grad(a, tc::kParamAbs | tc::kDistSq | tc::kUpdateSq | tc::kParamSq, kNaN);
  EXPECT_EQ(a.nonfinite, 0);
  for (int i = 0; i < tc::kNumSums; ++i) EXPECT_EQ(a.s[i], 0.0) << i;
}

TEST(ParamSumsTest, AccumulateParamTouchesOnlyRequestedSlots) {
  const double p = -1.5, p0 = 0.5, pp = -1.0;
  struct Case { uint32_t flags; int slot; double value; };
  for (const Case& c : {Case{tc::kParamAbs, tc::kSlotWeightMagnitude, 1.5},
                        Case{tc::kDistSq, tc::kSlotDistance, 4.0},
                        Case{tc::kUpdateSq, tc::kSlotUpdateSize, 0.25},
                        Case{tc::kParamSq, tc::kSlotWeightNorm, 2.25}}) {
    ParamSums<double> a;
    a.clear();
    tc::accumulate_param(a, c.flags, p, p0, pp);
    for (int i = 0; i < tc::kNumSums; ++i) EXPECT_EQ(a.s[i], i == c.slot ? c.value : 0.0) << i;
    EXPECT_EQ(a.nonfinite, 0);
  }
  ParamSums<double> a;
  a.clear();
  tc::accumulate_param(a, kAllSums, p, p0, pp);
  tc::accumulate_param(a, kAllSums, 2.0, 2.0, 0.0);
  EXPECT_EQ(a.s[tc::kSlotWeightMagnitude], 3.5);
  EXPECT_EQ(a.s[tc::kSlotWeightNorm], 6.25);
  EXPECT_EQ(a.s[tc::kSlotDistance], 4.0);
  EXPECT_EQ(a.s[tc::kSlotUpdateSize], 4.25);
  EXPECT_EQ(a.s[tc::kSlotGradNorm], 0.0);
  EXPECT_EQ(a.s[tc::kSlotGradMagnitude], 0.0);
}

TEST(ParamSumsTest, AddCombinesFloatPartialsIntoDouble) {
  ParamSums<float> f;
  f.clear();
  for (int i = 0; i < tc::kNumSums; ++i) f.s[i] = 0.5f * static_cast<float>(i + 1);
  f.nonfinite = 3;
  ParamSums<double> d;
  d.clear();
  d.add(f);
  d.add(f);
  for (int i = 0; i < tc::kNumSums; ++i) EXPECT_EQ(d.s[i], static_cast<double>(i + 1)) << i;
  EXPECT_EQ(d.nonfinite, 6);
}

template <typename Out>
void expect_metrics(const Out* got, const double* want) {
  for (int i = 0; i < tc::kNumSlots; ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << "slot " << i << " got " << got[i];
    } else {
      EXPECT_EQ(static_cast<double>(got[i]), static_cast<double>(static_cast<Out>(want[i])))
          << "slot " << i;
    }
  }
}

TEST(FinalizeMetricsTest, EveryFlagSubset) {
  const double sums[tc::kNumSums] = {16.0, 6.0, 9.0, 25.0, 36.0, 4.0};
  const double numel = 3.0, weight_numel = 2.0;
  // The update ratio is update_size / weight_norm = 6 / 2, when both sums were asked for.
  const double all[tc::kNumSlots] = {4.0, 2.0, 4.5, 5.0, 6.0, 2.0, 3.0};
  const uint32_t slot_flag[tc::kNumSums] = {tc::kGradSq, tc::kGradAbs, tc::kParamAbs, tc::kDistSq,
                                            tc::kUpdateSq, tc::kParamSq};
  for (uint32_t subset = 0; subset < (1u << tc::kNumSums); ++subset) {
    uint32_t flags = 0;
    double want[tc::kNumSlots];
    for (int i = 0; i < tc::kNumSums; ++i) {
      const bool on = (subset >> i) & 1u;
      if (on) flags |= slot_flag[i];
      want[i] = on ? all[i] : kNaN;
    }
    const bool ratio = (flags & tc::kUpdateSq) && (flags & tc::kParamSq);
    want[tc::kSlotUpdateRatio] = ratio ? all[tc::kSlotUpdateRatio] : kNaN;
    SCOPED_TRACE(testing::Message() << "flags=" << flags);
    double out_d[tc::kNumSlots];
    float out_f[tc::kNumSlots];
    tc::finalize_metrics(sums, numel, weight_numel, flags | tc::kHistogram, out_d);
    tc::finalize_metrics(sums, numel, weight_numel, flags, out_f);
    expect_metrics(out_d, want);
    expect_metrics(out_f, want);
  }
}

TEST(FinalizeMetricsTest, MagnitudesDivideByTheirOwnCounts) {
  const double sums[tc::kNumSums] = {0.0, 10.0, 10.0, 0.0, 0.0, 0.0};
  double out[tc::kNumSlots];
  tc::finalize_metrics(sums, 4.0, 5.0, kAllSums, out);
  EXPECT_EQ(out[tc::kSlotGradMagnitude], 2.5);   // Σ|g| / numel
  EXPECT_EQ(out[tc::kSlotWeightMagnitude], 2.0); // Σ|θ| / weight_numel
  EXPECT_EQ(out[tc::kSlotGradNorm], 0.0);
  EXPECT_EQ(out[tc::kSlotDistance], 0.0);
  EXPECT_EQ(out[tc::kSlotUpdateSize], 0.0);
}

TEST(FinalizeMetricsTest, EmptySelectionGivesNaNMagnitudesAndZeroNorms) {
  const double zero[tc::kNumSums] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  double out[tc::kNumSlots];
  tc::finalize_metrics(zero, 0.0, 0.0, kAllSums, out);
  EXPECT_EQ(out[tc::kSlotWeightNorm], 0.0);
  EXPECT_TRUE(std::isnan(out[tc::kSlotUpdateRatio]));  // 0 / 0: zero weights that did not move
  EXPECT_EQ(out[tc::kSlotGradNorm], 0.0);
  EXPECT_TRUE(std::isnan(out[tc::kSlotGradMagnitude]));
  EXPECT_TRUE(std::isnan(out[tc::kSlotWeightMagnitude]));
  EXPECT_EQ(out[tc::kSlotDistance], 0.0);
  EXPECT_EQ(out[tc::kSlotUpdateSize], 0.0);

  // No weight matrix selected but gradients present: only the weight magnitude is NaN.
  const double sums[tc::kNumSums] = {4.0, 2.0, 0.0, 1.0, 1.0, 0.0};
  tc::finalize_metrics(sums, 2.0, 0.0, kAllSums, out);
  EXPECT_EQ(out[tc::kSlotGradMagnitude], 1.0);
  EXPECT_TRUE(std::isnan(out[tc::kSlotWeightMagnitude]));
}

TEST(FinalizeMetricsTest, EndToEndOnRandomTensor) {
  std::mt19937_64 rng(11);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int n = 10007, weight_n = 7000;
  ParamSums<double> a;
  a.clear();
  double gsq = 0, gabs = 0, pabs_sel = 0, dsq = 0, usq = 0, psq = 0;
  for (int i = 0; i < n; ++i) {
    const double g = 0.01 * nd(rng), p = nd(rng), p0 = p + 0.1 * nd(rng), pp = p + 0.01 * nd(rng);
    tc::accumulate_grad(a, kAllSums, g);
    gsq += g * g;
    gabs += std::fabs(g);
    if (i < weight_n) {
      tc::accumulate_param(a, kAllSums, p, p0, pp);
      pabs_sel += std::fabs(p);
    } else {
      tc::accumulate_param(a, kAllSums & ~static_cast<uint32_t>(tc::kParamAbs), p, p0, pp);
    }
    dsq += (p - p0) * (p - p0);
    usq += (p - pp) * (p - pp);
    psq += p * p;
  }
  double out[tc::kNumSlots];
  tc::finalize_metrics(a.s, n, weight_n, kAllSums, out);
  EXPECT_DOUBLE_EQ(out[tc::kSlotGradNorm], std::sqrt(gsq));
  EXPECT_DOUBLE_EQ(out[tc::kSlotGradMagnitude], gabs / n);
  EXPECT_DOUBLE_EQ(out[tc::kSlotWeightMagnitude], pabs_sel / weight_n);
  EXPECT_DOUBLE_EQ(out[tc::kSlotDistance], std::sqrt(dsq));
  EXPECT_DOUBLE_EQ(out[tc::kSlotUpdateSize], std::sqrt(usq));
  EXPECT_DOUBLE_EQ(out[tc::kSlotWeightNorm], std::sqrt(psq));
  EXPECT_DOUBLE_EQ(out[tc::kSlotUpdateRatio], std::sqrt(usq) / std::sqrt(psq));
}

// ---------------------------------------------------------------------------------------------
// Chunk planning (64-bit)

// Owner of `chunk` found by walking the tensors one by one.
int64_t owner_by_linear_scan(const std::vector<int64_t>& numel, int64_t chunk_elems, int64_t chunk) {
  int64_t first = 0;
  for (size_t i = 0; i < numel.size(); ++i) {
    const int64_t n = tc::num_chunks(numel[i], chunk_elems);
    if (chunk < first + n) return static_cast<int64_t>(i);
    first += n;
  }
  return -1;
}

TEST(ChunkPlanTest, NumChunks) {
  EXPECT_EQ(tc::num_chunks(0, 1024), 0);
  EXPECT_EQ(tc::num_chunks(-5, 1024), 0);
  EXPECT_EQ(tc::num_chunks(1, 1024), 1);
  EXPECT_EQ(tc::num_chunks(1024, 1024), 1);
  EXPECT_EQ(tc::num_chunks(1025, 1024), 2);
  EXPECT_EQ(tc::num_chunks(tc::kDefaultChunkElems, tc::kDefaultChunkElems), 1);
  EXPECT_EQ(tc::num_chunks((int64_t{1} << 31) - 1, tc::kDefaultChunkElems), int64_t{1} << 17);
  EXPECT_EQ(tc::num_chunks(int64_t{1} << 31, tc::kDefaultChunkElems), int64_t{1} << 17);
  EXPECT_EQ(tc::num_chunks((int64_t{1} << 31) + 1, tc::kDefaultChunkElems), (int64_t{1} << 17) + 1);
  EXPECT_EQ(tc::num_chunks(int64_t{5} << 32, 1024), int64_t{5} << 22);
  EXPECT_EQ(tc::num_chunks((int64_t{1} << 40) + 3, 1024), (int64_t{1} << 30) + 1);
}

TEST(ChunkPlanTest, HugeTensorsAndEmptyOnesBetween) {
  const int64_t c = tc::kDefaultChunkElems;
  const int64_t two31 = int64_t{1} << 31;
  const std::vector<int64_t> numel = {0, 5, 0, 0, two31 + 7, c, 0, 1, int64_t{3} << 31, 0};
  std::vector<int64_t> first(numel.size());
  const int64_t total = tc::assign_first_chunks(numel.data(), static_cast<int64_t>(numel.size()), c,
                                                first.data());
  const int64_t big1 = (two31 >> 14) + 1;      // 2^31 + 7 elements
  const int64_t big2 = (int64_t{3} << 31) >> 14; // 3·2^31 elements, a whole number of chunks
  const std::vector<int64_t> want_first = {0, 0, 1, 1, 1, 1 + big1, 2 + big1, 2 + big1, 3 + big1,
                                           3 + big1 + big2};
  EXPECT_EQ(first, want_first);
  EXPECT_EQ(total, 3 + big1 + big2);
  EXPECT_GT(total, int64_t{1} << 18);

  const int64_t n = static_cast<int64_t>(numel.size());
  // Chunks around every boundary; empty tensors own none of them.
  for (int64_t chunk : {int64_t{0}, int64_t{1}, int64_t{2}, big1, big1 + 1, big1 + 2, big1 + 3,
                        big1 + 4, total - 1, total / 2}) {
    const int64_t t = tc::find_owner(first.data(), n, chunk);
    EXPECT_EQ(t, owner_by_linear_scan(numel, c, chunk)) << "chunk " << chunk;
    EXPECT_GT(numel[t], 0) << "chunk " << chunk;
  }
  // The last chunk of each huge tensor starts inside it and ends at its end.
  for (int64_t i : {int64_t{4}, int64_t{8}}) {
    const int64_t last = first[i] + tc::num_chunks(numel[i], c) - 1;
    ASSERT_EQ(tc::find_owner(first.data(), n, last), i);
    const int64_t begin = (last - first[i]) * c;
    EXPECT_LT(begin, numel[i]);
    EXPECT_EQ(std::min(begin + c, numel[i]), numel[i]);
    EXPECT_GT(begin, two31 - c);  // a 32-bit offset would have wrapped
  }
}

TEST(ChunkPlanTest, AllEmptyAndLeadingTrailingEmpty) {
  std::vector<int64_t> numel = {0, 0, 0};
  std::vector<int64_t> first(numel.size());
  EXPECT_EQ(tc::assign_first_chunks(numel.data(), 3, 1024, first.data()), 0);
  EXPECT_EQ(first, (std::vector<int64_t>{0, 0, 0}));

  numel = {0, 0, 3000, 0, 0};
  first.assign(numel.size(), -1);
  EXPECT_EQ(tc::assign_first_chunks(numel.data(), 5, 1024, first.data()), 3);
  EXPECT_EQ(first, (std::vector<int64_t>{0, 0, 0, 3, 3}));
  for (int64_t chunk = 0; chunk < 3; ++chunk) EXPECT_EQ(tc::find_owner(first.data(), 5, chunk), 2);

  EXPECT_EQ(tc::assign_first_chunks(numel.data(), 0, 1024, first.data()), 0);
}

TEST(ChunkPlanTest, FindTensorOfEveryChunkOfRandomPlans) {
  std::mt19937_64 rng(99);
  const int64_t chunk_sizes[] = {1024, 2048, tc::kDefaultChunkElems, 65536};
  for (int plan = 0; plan < 40; ++plan) {
    const int64_t chunk_elems = chunk_sizes[plan % 4];
    const int64_t n = std::uniform_int_distribution<int64_t>(1, 250)(rng);
    std::vector<int64_t> numel(static_cast<size_t>(n));
    for (auto& v : numel) {
      const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
      if (kind < 3) {
        v = 0;
      } else if (kind < 5) {
        v = std::uniform_int_distribution<int64_t>(1, 3)(rng) * chunk_elems +
            std::uniform_int_distribution<int64_t>(-1, 1)(rng);
      } else {
        v = std::uniform_int_distribution<int64_t>(1, 5 * chunk_elems)(rng);
      }
    }
    std::vector<int64_t> first(numel.size());
    const int64_t total = tc::assign_first_chunks(numel.data(), n, chunk_elems, first.data());
    int64_t want_total = 0;
    for (int64_t v : numel) want_total += tc::num_chunks(v, chunk_elems);
    ASSERT_EQ(total, want_total);

    std::vector<int64_t> covered(numel.size(), 0);
    for (int64_t chunk = 0; chunk < total; ++chunk) {
      const int64_t t = tc::find_owner(first.data(), n, chunk);
      ASSERT_EQ(t, owner_by_linear_scan(numel, chunk_elems, chunk)) << "plan " << plan << " chunk " << chunk;
      const int64_t begin = (chunk - first[t]) * chunk_elems;
      const int64_t end = std::min(begin + chunk_elems, numel[t]);
      ASSERT_GE(begin, 0);
      ASSERT_LT(begin, end);
      covered[t] += end - begin;
    }
    EXPECT_EQ(covered, numel) << "plan " << plan;  // every element in exactly one chunk
  }
}

TEST(ChunkPlanTest, RandomHugePlansAtTheBoundaries) {
  std::mt19937_64 rng(5);
  for (int plan = 0; plan < 20; ++plan) {
    const int64_t chunk_elems = plan % 2 ? 1024 : tc::kDefaultChunkElems;
    const int64_t n = std::uniform_int_distribution<int64_t>(2, 60)(rng);
    std::vector<int64_t> numel(static_cast<size_t>(n));
    for (auto& v : numel) {
      const int kind = std::uniform_int_distribution<int>(0, 3)(rng);
      v = kind == 0 ? 0
                    : (kind == 1 ? std::uniform_int_distribution<int64_t>(1, 100000)(rng)
                                 : std::uniform_int_distribution<int64_t>(int64_t{1} << 31,
                                                                          int64_t{1} << 34)(rng));
    }
    std::vector<int64_t> first(numel.size());
    const int64_t total = tc::assign_first_chunks(numel.data(), n, chunk_elems, first.data());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t nc = tc::num_chunks(numel[i], chunk_elems);
      if (nc == 0) continue;
      for (int64_t chunk : {first[i], first[i] + nc / 2, first[i] + nc - 1}) {
        ASSERT_EQ(tc::find_owner(first.data(), n, chunk), i) << "plan " << plan;
      }
      const int64_t last_begin = (nc - 1) * chunk_elems;
      ASSERT_LT(last_begin, numel[i]);
      ASSERT_GE(last_begin + chunk_elems, numel[i]);
    }
    EXPECT_EQ(total, first[n - 1] + tc::num_chunks(numel[n - 1], chunk_elems));
  }
}

}  // namespace
