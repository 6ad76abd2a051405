// Argument checks and dtype mapping shared by the families' ATen adapters, so every op rejects
// bad input with the same words (SPEC.md §5) and maps dtypes to the kernels' codes one way.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>

#include "cuda/common.h"
#include "cuda/histogram.h"

namespace trainscope {

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
