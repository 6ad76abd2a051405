// Torch-free helpers shared by every kernel family and by the CPU implementations in src/.
//
// Everything here compiles with a plain C++17 host compiler as well as with nvcc, so the
// per-element and combine logic the kernels use is the same code the CPU path and the CPU
// unit tests run.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TS_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: the compiler otherwise leaves small helpers such as hist_bin as calls in hot CPU loops.
#define TS_HD inline __attribute__((always_inline))
#else
#define TS_HD inline
#endif

namespace trainscope {
namespace cuda {

// Element type of one tensor. One list may mix dtypes; the tensors of one pair never do.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

TS_HD int dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}

// Storage types for the two 16-bit formats: raw bits, converted by the functions below so host
// and device share one exact conversion (bf16 is the top half of a float32; fp16 is IEEE binary16).
struct bf16_bits { uint16_t x; };
struct f16_bits { uint16_t x; };

TS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

TS_HD float bf16_to_float(bf16_bits v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }

TS_HD float f16_to_float(f16_bits v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal (or zero): value = man * 2^-24, exact in float32.
  const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
  return (sign != 0) ? -mag : mag;
}

// Widening load used by every kernel: float32 and the 16-bit types go to float, float64 stays.
template <typename T> struct Widen { using type = float; };
template <> struct Widen<double> { using type = double; };

TS_HD float widen(float v) { return v; }
TS_HD double widen(double v) { return v; }
TS_HD float widen(bf16_bits v) { return bf16_to_float(v); }
TS_HD float widen(f16_bits v) { return f16_to_float(v); }

TS_HD bool is_finite(double v) { return v - v == 0.0; }  // false for NaN and +-Inf
TS_HD bool is_finite(float v) { return v - v == 0.0f; }

TS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work cut into consecutive pieces per tensor (chunks, tiles, items): with first[i] the index of
// tensor i's first piece, piece `index` belongs to the last i with first[i] ≤ index. Tensors
// that own no piece may sit in the list; the binary search lands on the one that owns it.
TS_HD int64_t find_owner(const int64_t* first, int64_t n, int64_t index) {
  int64_t lo = 0, hi = n;  // invariant: answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (first[mid] <= index) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace cuda
}  // namespace trainscope
