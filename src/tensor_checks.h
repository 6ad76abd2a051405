// Argument checks and dtype mapping shared by the families' ATen adapters, so every op rejects
// bad input with the same words (SPEC.md §5) and maps dtypes to the kernels' codes one way.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include <ATen/ATen.h>

#include "cuda/common.h"
#include "cuda/histogram.h"

namespace trainscope {

// Whether this build has the CUDA kernels (CMake's TRAINSCOPE_CUDA decides; see README).
#if defined(TRAINSCOPE_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Why tensors on `device` cannot be used by a build with or without CUDA, or null when they can.
// Separate from check_device so that the tests of either build check the words of both.
inline const char* device_unsupported_reason(const at::Device& device, bool with_cuda) {
  if (device.is_cpu() || (with_cuda && device.is_cuda())) return nullptr;
  if (device.is_cuda()) {
    return "this trainscope was built without CUDA (CPU-only build); move the tensors to the CPU, or rebuild "
           "trainscope with CUDA (-DTRAINSCOPE_CUDA=ON)";
  }
  return with_cuda ? "trainscope runs on CPU or CUDA tensors" : "trainscope runs on CPU tensors (CPU-only build)";
}

// The device check of every entry point, before anything dispatches on the device, so that a
// CPU-only build refuses CUDA tensors with one message: "op: what is on cuda:0; this trainscope
// was built without CUDA ...".
inline void check_device(const char* op, const std::string& what, const at::Device& device) {
  const char* why = device_unsupported_reason(device, kWithCuda);
  TORCH_CHECK(why == nullptr, op, ": ", what, " is on ", device, "; ", why);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// The kernels' code for a supported dtype (check is_supported_float first).
inline cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat16;
  }
}

// "op: name[index] has dtype Int; trainscope needs float32, ..." (index < 0: no index).
inline void check_float_dtype(const char* op, const char* name, int64_t index, const at::Tensor& t) {
  if (is_supported_float(t.scalar_type())) return;
  if (index >= 0) {
    TORCH_CHECK(false, op, ": ", name, "[", index, "] has dtype ", t.scalar_type(),
                "; trainscope needs float32, float64, bfloat16 or float16");
  }
  TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
              "; trainscope needs float32, float64, bfloat16 or float16");
}

// One histogram axis (cuda::hist_axis_ok): nbins in [1, kMaxHistBins], maxval finite, positive
// and large enough that the bin width 2·maxval/nbins is a normal number.
inline void check_hist_axis(const char* op, const char* nbins_name, int64_t nbins,
                            const char* maxval_name, double maxval) {
  TORCH_CHECK(nbins >= 1 && nbins <= cuda::kMaxHistBins, op, ": ", nbins_name, " must be in [1, ",
              cuda::kMaxHistBins, "], got ", nbins);
  TORCH_CHECK(cuda::hist_axis_ok(nbins, maxval), op, ": ", maxval_name,
              " must be a finite positive number with a normal bin width 2*", maxval_name, "/", nbins_name,
              ", got ", maxval);
}

}  // namespace trainscope
