// Torch-free, CPU-only tests of the activity test in cuda/dead_units.h (SPEC.md §3 `dead_units`):
// for every kind and several eps, including 0 and 0.5, the float, bfloat16, float16 and double
// variants decide every value exactly as a float64 comparison written here from the definition —
// exhaustively over all 16-bit patterns, and for floats and doubles on the thresholds and their
// nextafter neighbours both ways, the specials and random values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/dead_units.h"
#include "tests/cpp/reference_activity.h"

namespace {

namespace tc = trainscope::cuda;
using tc::ActivityKind;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

const ActivityKind kKinds[] = {ActivityKind::kReLU, ActivityKind::kTanh, ActivityKind::kSigmoid};
const double kEps[] = {0.0, 0.01, 0.1, 0.25, 1.0 / 3.0, 0.49999999999999994, 0.5, 1e-30, 1e-8, 0.001};

// IEEE binary16 bits → double, written independently of the library's decoder.
double f16_value(uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  double v;
  if (exp == 0x1f) {
    v = man != 0 ? kNaN : kInf;
  } else if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), -24);
  } else {
    v = std::ldexp(static_cast<double>(man + 1024), exp - 25);
  }
  return sign ? -v : v;
}

double bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The thresholds of every kind (signed, as tanh compares |a|) and the other interesting values.
std::vector<double> anchors(double eps) {
  return {eps, -eps, 1.0 - eps, -(1.0 - eps), 0.0, -0.0, 1.0, -1.0, 0.5, -0.5,
          std::numeric_limits<double>::denorm_min(), -std::numeric_limits<double>::denorm_min(),
          static_cast<double>(std::numeric_limits<float>::denorm_min()), std::numeric_limits<double>::max(),
          -std::numeric_limits<double>::max(), kInf, -kInf, kNaN, -kNaN};
}

// Doubles: each anchor and three nextafter steps either way.
std::vector<double> double_values(double eps) {
  std::vector<double> out;
  for (double a : anchors(eps)) {
    double up = a, down = a;
    out.push_back(a);
    for (int i = 0; i < 3; ++i) {
      up = std::nextafter(up, kInf);
      down = std::nextafter(down, -kInf);
      out.push_back(up);
      out.push_back(down);
    }
  }
  return out;
}

// Floats: each anchor rounded to float, and three float steps either way.
std::vector<float> float_values(double eps) {
  std::vector<float> out;
  for (double a : anchors(eps)) {
    const float f = static_cast<float>(a);
    float up = f, down = f;
    out.push_back(f);
    for (int i = 0; i < 3; ++i) {
      up = std::nextafter(up, std::numeric_limits<float>::infinity());
      down = std::nextafter(down, -std::numeric_limits<float>::infinity());
      out.push_back(up);
      out.push_back(down);
    }
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  for (int i = 0; i < 20000; ++i) out.push_back(u(rng));
  return out;
}

TEST(DeadUnitsActivityTest, FloatThresholdsAreTheNearestFloatsInside) {
  for (ActivityKind k : kKinds) {
    for (double eps : kEps) {
      const tc::ActivityTest t = tc::make_activity_test(k, eps);
      const std::string what = std::string(reference_kind_name(k)) + " eps=" + std::to_string(eps);
      EXPECT_GE(static_cast<double>(t.lo_f), t.lo) << what;
      EXPECT_LT(static_cast<double>(std::nextafter(t.lo_f, -std::numeric_limits<float>::infinity())), t.lo) << what;
      EXPECT_LE(static_cast<double>(t.hi_f), t.hi) << what;
      EXPECT_GT(static_cast<double>(std::nextafter(t.hi_f, std::numeric_limits<float>::infinity())), t.hi) << what;
    }
  }
  // 0.99 is not a float: the greatest float below it is the tanh threshold.
  const tc::ActivityTest t = tc::make_activity_test(ActivityKind::kTanh, 0.01);
  EXPECT_EQ(t.hi, 0.99);
  EXPECT_LT(static_cast<double>(t.hi_f), 0.99);
  EXPECT_GT(static_cast<double>(static_cast<float>(0.99)), 0.99);  // round-to-nearest would be outside
}

TEST(DeadUnitsActivityTest, DoublesNextToTheThresholds) {
  for (ActivityKind k : kKinds) {
    for (double eps : kEps) {
      const tc::ActivityTest t = tc::make_activity_test(k, eps);
      for (double a : double_values(eps)) {
        ASSERT_EQ(tc::is_active(a, t), reference_active(a, k, eps))
            << reference_kind_name(k) << " eps=" << eps << " a=" << a;
      }
    }
  }
}

TEST(DeadUnitsActivityTest, FloatsNextToTheThresholds) {
  for (ActivityKind k : kKinds) {
    for (double eps : kEps) {
      const tc::ActivityTest t = tc::make_activity_test(k, eps);
      for (float a : float_values(eps)) {
        ASSERT_EQ(tc::is_active(a, t), reference_active(static_cast<double>(a), k, eps))
            << reference_kind_name(k) << " eps=" << eps << " a=" << a;
        ASSERT_EQ(tc::is_active_value(a, t), tc::is_active(a, t));
      }
    }
  }
}

TEST(DeadUnitsActivityTest, EveryBFloat16AndFloat16) {
  for (ActivityKind k : kKinds) {
    for (double eps : kEps) {
      const tc::ActivityTest t = tc::make_activity_test(k, eps);
      for (uint32_t bits = 0; bits < 65536; ++bits) {
        const uint16_t b = static_cast<uint16_t>(bits);
        ASSERT_EQ(tc::is_active_value(tc::bf16_bits{b}, t), reference_active(bf16_value(b), k, eps))
            << reference_kind_name(k) << " eps=" << eps << " bf16 bits " << bits << " = " << bf16_value(b);
        ASSERT_EQ(tc::is_active_value(tc::f16_bits{b}, t), reference_active(f16_value(b), k, eps))
            << reference_kind_name(k) << " eps=" << eps << " f16 bits " << bits << " = " << f16_value(b);
      }
    }
  }
}

TEST(DeadUnitsActivityTest, SpecialValues) {
  const float nan_f = std::numeric_limits<float>::quiet_NaN(), inf_f = std::numeric_limits<float>::infinity();
  const tc::ActivityTest relu = tc::make_activity_test(ActivityKind::kReLU, 0.01);
  const tc::ActivityTest tanh = tc::make_activity_test(ActivityKind::kTanh, 0.01);
  const tc::ActivityTest sigm = tc::make_activity_test(ActivityKind::kSigmoid, 0.01);
  // NaN: active for ReLU (NaN ≠ 0), inactive for tanh and sigmoid; ±0 inactive for ReLU only.
  EXPECT_TRUE(tc::is_active(nan_f, relu));
  EXPECT_TRUE(tc::is_active(kNaN, relu));
  EXPECT_FALSE(tc::is_active(nan_f, tanh));
  EXPECT_FALSE(tc::is_active(kNaN, tanh));
  EXPECT_FALSE(tc::is_active(nan_f, sigm));
  EXPECT_FALSE(tc::is_active(kNaN, sigm));
  EXPECT_FALSE(tc::is_active(0.0f, relu));
  EXPECT_FALSE(tc::is_active(-0.0f, relu));
  EXPECT_FALSE(tc::is_active(-0.0, relu));
  EXPECT_TRUE(tc::is_active(-0.0f, tanh));
  EXPECT_FALSE(tc::is_active(-0.0f, sigm));
  EXPECT_TRUE(tc::is_active(inf_f, relu));
  EXPECT_TRUE(tc::is_active(-inf_f, relu));
  EXPECT_FALSE(tc::is_active(inf_f, tanh));
  EXPECT_FALSE(tc::is_active(-inf_f, sigm));
  EXPECT_TRUE(tc::is_active(std::numeric_limits<float>::denorm_min(), relu));
  // eps = 0: tanh active on [−1, 1], sigmoid on [0, 1]; eps = 0.5: tanh on [−0.5, 0.5], sigmoid at 0.5 only.
  const tc::ActivityTest tanh0 = tc::make_activity_test(ActivityKind::kTanh, 0.0);
  const tc::ActivityTest sigm0 = tc::make_activity_test(ActivityKind::kSigmoid, 0.0);
  const tc::ActivityTest sigm_half = tc::make_activity_test(ActivityKind::kSigmoid, 0.5);
  EXPECT_TRUE(tc::is_active(-1.0f, tanh0));
  EXPECT_FALSE(tc::is_active(std::nextafter(1.0f, 2.0f), tanh0));
  EXPECT_TRUE(tc::is_active(0.0f, sigm0));
  EXPECT_TRUE(tc::is_active(1.0f, sigm0));
  EXPECT_FALSE(tc::is_active(-std::numeric_limits<float>::denorm_min(), sigm0));
  EXPECT_TRUE(tc::is_active(0.5f, sigm_half));
  EXPECT_TRUE(tc::is_active(0.5, sigm_half));
  EXPECT_FALSE(tc::is_active(std::nextafter(0.5f, 1.0f), sigm_half));
  EXPECT_FALSE(tc::is_active(std::nextafter(0.5f, 0.0f), sigm_half));
}

}  // namespace
