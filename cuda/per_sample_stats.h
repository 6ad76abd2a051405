// Per-sample gradient statistics (SPEC.md §2) from materialised per-sample gradients: the
// torch-free launcher and the host/device pieces shared with the CPU path (src/per_sample_stats.cpp).
//
// Input: a list of tensors, each [B, cols] (a parameter's per-sample gradients, flattened), one B
// for the list. Output: the additive parts ‖gᵢ‖² [B], gᵢ·ḡ [B] and ‖ḡ‖², summed over the list, in
// float64 (the statistics subtract nearly equal quantities), plus the exact histogram of all
// B·cols elements and their non-finite count. Every element is read once: a tile of all B rows ×
// W columns is staged on chip, its column means ḡ_c formed, then each row's sums taken from it.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(TRAINSCOPE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "cuda/common.h"
#include "cuda/histogram.h"

namespace trainscope {
namespace cuda {

struct PerSampleTensorDesc {
  const void* grads;  // [B, cols], contiguous
  int64_t cols;
  DType dtype;
};

// Column tiles of width W (a power of two) cut each tensor; tile k of the list belongs to the last
// tensor whose first tile is ≤ k (find_owner in common.h).
TS_HD int64_t num_col_tiles(int64_t cols, int64_t width) { return cols > 0 ? ceil_div(cols, width) : 0; }

// ---------------------------------------------------------------------------------------------
// The CUDA launcher, in a build with CUDA only: everything above is plain C++ too.
#if defined(TRAINSCOPE_WITH_CUDA)
struct PerSampleArgs {
  const PerSampleTensorDesc* tensors;  // host array
  int64_t num_tensors;
  int64_t batch;       // B ≥ 2
  bool histogram;
  HistSpec hist_spec;  // when histogram

  // Device outputs.
  double* sq_norms;      // [B]
  double* dots;          // [B]
  double* mean_sq_norm;  // [1]
  int64_t* nonfinite;    // [1]
  int64_t* hist;         // [nbins] when histogram
};

// Whether the fused kernel can stage a tile of B rows on this device (B up to several thousand);
// callers fall back to a two-pass composition otherwise.
bool per_sample_launch_supported(int64_t batch, bool has_float64, int device);

size_t per_sample_workspace_bytes(const PerSampleArgs& args, int device);

// Enqueues the whole computation on `stream`; never synchronises.
cudaError_t per_sample_launch(const PerSampleArgs& args, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream, int device);
#endif  // TRAINSCOPE_WITH_CUDA

}  // namespace cuda
}  // namespace trainscope
