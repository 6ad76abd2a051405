// Dead units (SPEC.md §3 `dead_units`): the exact activity test shared by the CUDA kernel
// (dead_units.cu) and the CPU implementation (src/dead_units.cpp), and the torch-free launcher.
//
// "Active" for one observation a, decided as in float64 whatever the input dtype:
//   ReLU:    a ≠ 0               (NaN is active)
//   tanh:    |a| ≤ 1 − ε         (NaN is inactive)
//   sigmoid: ε ≤ a ≤ 1 − ε       (NaN is inactive)
// All three are one test: x = |a| or a; in = lo ≤ x ≤ hi; active = in, or !in for ReLU with
// lo = hi = 0 (so a NaN, which is in no interval, comes out active for ReLU only).
// float32, bfloat16 and float16 values are compared as floats against float thresholds rounded
// inwards with nextafter, which decides every float exactly as the float64 comparison would.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(TRAINSCOPE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "cuda/common.h"

namespace trainscope {
namespace cuda {

// Same values as trainscope::ActivationKind (include/trainscope/dead_units.h).
enum class ActivityKind : int32_t { kReLU = 0, kTanh = 1, kSigmoid = 2 };

struct ActivityTest {
  double lo, hi;     // float64 interval (the definition)
  float lo_f, hi_f;  // the same interval on floats: lo_f the least float ≥ lo, hi_f the greatest ≤ hi
  int32_t use_abs;   // x = |a| (ReLU, tanh) or a (sigmoid)
  int32_t invert;    // active = !(lo ≤ x ≤ hi) (ReLU)
};

// The least float ≥ v and the greatest float ≤ v, for finite v in [0, 1].
inline float float_at_or_above(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, INFINITY);
  return f;
}
inline float float_at_or_below(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = std::nextafter(f, -INFINITY);
  return f;
}

// eps in [0, 0.5] (checked by the callers); unused by ReLU.
inline ActivityTest make_activity_test(ActivityKind kind, double eps) {
  ActivityTest t;
  switch (kind) {
    case ActivityKind::kReLU:
      t.lo = t.hi = 0.0;
      t.use_abs = 1;
      t.invert = 1;
      break;
    case ActivityKind::kTanh:
      t.lo = 0.0;  // |a| ≥ 0 for every number, so only hi decides
      t.hi = 1.0 - eps;
      t.use_abs = 1;
      t.invert = 0;
      break;
    default:
      t.lo = eps;
      t.hi = 1.0 - eps;
      t.use_abs = 0;
      t.invert = 0;
      break;
  }
  t.lo_f = float_at_or_above(t.lo);
  t.hi_f = float_at_or_below(t.hi);
  return t;
}

// Since lo_f is the least float ≥ lo, a float x satisfies x ≥ lo ⇔ x ≥ lo_f; likewise for hi.
TS_HD bool is_active(float a, const ActivityTest& t) {
  const float x = t.use_abs ? fabsf(a) : a;
  const bool in = x >= t.lo_f && x <= t.hi_f;
  return in != (t.invert != 0);
}

TS_HD bool is_active(double a, const ActivityTest& t) {
  const double x = t.use_abs ? fabs(a) : a;
  const bool in = x >= t.lo && x <= t.hi;
  return in != (t.invert != 0);
}

// Any stored element: the 16-bit types widen exactly to float.
template <typename T>
TS_HD bool is_active_value(T v, const ActivityTest& t) { return is_active(widen(v), t); }

// ---------------------------------------------------------------------------------------------
// The CUDA launcher, in a build with CUDA only: everything above is plain C++ too.
#if defined(TRAINSCOPE_WITH_CUDA)
//
// `acts` is a contiguous [n, channels, inner] array of `dtype` (inner = Π spatial, 1 for 2-D
// activations). Adds, for every channel c, the number of active elements of acts[:, c, :] to
// counts[c] (device int64, not cleared: counts accumulate over launches). Integer atomics only, so
// the result is deterministic. Enqueues on `stream`, never synchronises, needs no workspace, and
// can be captured in a CUDA graph. Invalid arguments return cudaErrorInvalidValue before any CUDA
// call; an empty array (n, channels or inner 0) launches nothing.
cudaError_t launch_add_active_counts(const void* acts, DType dtype, int64_t n, int64_t channels, int64_t inner,
                                     const ActivityTest& test, int64_t* counts, cudaStream_t stream);
#endif  // TRAINSCOPE_WITH_CUDA

}  // namespace cuda
}  // namespace trainscope
