// Parameter-space metrics (SPEC.md §1, §4): the torch-free launcher interface and the per-element,
// combine and finalise logic shared by the CUDA kernel (param_stats.cu) and the CPU implementation
// (src/param_stats.cpp).
//
// One call reads each of g, θ, θ₀, θ_prev once per element and produces, for every tensor and for
// the whole list: Σg², Σ|g|, Σ|θ|, Σθ², Σ(θ−θ₀)², Σ(θ−θ_prev)², the count of non-finite gradient
// elements and an exact int64 histogram of the gradient elements; optionally it refreshes θ_prev.
// The update ratio is formed from two of those sums when the metrics are finished.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(TRAINSCOPE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "cuda/common.h"
#include "cuda/histogram.h"

namespace trainscope {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// What to compute. Which input arrays a call reads follows from these flags.
enum ParamStatsFlag : uint32_t {
  kGradSq = 1u << 0,        // Σ g²             -> grad_norm
  kGradAbs = 1u << 1,       // Σ |g|            -> grad_magnitude
  kParamAbs = 1u << 2,      // Σ |θ|            -> weight_magnitude
  kDistSq = 1u << 3,        // Σ (θ − θ₀)²      -> distance
  kUpdateSq = 1u << 4,      // Σ (θ − θ_prev)²  -> update_size
  kHistogram = 1u << 5,     // histogram of g (§4)
  kRefreshPrev = 1u << 6,   // θ_prev ← θ after reading it
  kParamSq = 1u << 7,       // Σ θ²             -> weight_norm (with kUpdateSq: update_ratio)
};

// Slots of the finished metrics, in this order everywhere (outputs included). The first kNumSums
// are also the slots of the per-element sums; the update ratio has no sum of its own (it is
// update_size / weight_norm, formed when finishing).
enum ParamStatsSlot : int {
  kSlotGradNorm = 0,
  kSlotGradMagnitude = 1,
  kSlotWeightMagnitude = 2,
  kSlotDistance = 3,
  kSlotUpdateSize = 4,
  kSlotWeightNorm = 5,
  kNumSums = 6,
  kSlotUpdateRatio = 6,
  kNumSlots = 7,
};

TS_HD bool reads_grad(uint32_t f) { return (f & (kGradSq | kGradAbs | kHistogram)) != 0; }
TS_HD bool reads_param(uint32_t f) {
  return (f & (kParamAbs | kParamSq | kDistSq | kUpdateSq | kRefreshPrev)) != 0;
}
TS_HD bool reads_init(uint32_t f) { return (f & kDistSq) != 0; }
TS_HD bool reads_prev(uint32_t f) { return (f & kUpdateSq) != 0; }

// One tensor of the list (all four arrays contiguous, same dtype and element count). Pointers
// of arrays the flags do not read may be null. `weight_selected` marks the tensors that count
// toward the global weight magnitude (all of them, or only weight matrices).
struct TensorDesc {
  const void* grad;
  const void* param;
  const void* init;
  void* prev;
  int64_t numel;
  DType dtype;
  int32_t weight_selected;
};

// ---------------------------------------------------------------------------------------------
// Per-element accumulation. Acc is float for 16/32-bit inputs on the GPU (each thread sums a
// few dozen elements before a float64 block reduction) and double on the CPU and for float64.
template <typename Acc>
struct ParamSums {
  Acc s[kNumSums];
  int64_t nonfinite;

  TS_HD void clear() {
    for (int i = 0; i < kNumSums; ++i) s[i] = Acc(0);
    nonfinite = 0;
  }
  template <typename Other>
  TS_HD void add(const ParamSums<Other>& o) {
    for (int i = 0; i < kNumSums; ++i) s[i] += static_cast<Acc>(o.s[i]);
    nonfinite += o.nonfinite;
  }
};

TS_HD float abs_value(float v) { return fabsf(v); }
TS_HD double abs_value(double v) { return fabs(v); }

template <typename Acc>
TS_HD void accumulate_grad(ParamSums<Acc>& a, uint32_t flags, Acc g) {
  if (flags & kGradSq) a.s[kSlotGradNorm] += g * g;
  if (flags & kGradAbs) a.s[kSlotGradMagnitude] += abs_value(g);
  if (flags & (kGradSq | kGradAbs | kHistogram)) a.nonfinite += is_finite(g) ? 0 : 1;
}

// p0 and pprev are only read when the flags ask for them.
template <typename Acc>
TS_HD void accumulate_param(ParamSums<Acc>& a, uint32_t flags, Acc p, Acc p0, Acc pprev) {
  if (flags & kParamAbs) a.s[kSlotWeightMagnitude] += abs_value(p);
  if (flags & kParamSq) a.s[kSlotWeightNorm] += p * p;
  if (flags & kDistSq) {
    const Acc d = p - p0;
    a.s[kSlotDistance] += d * d;
  }
  if (flags & kUpdateSq) {
    const Acc u = p - pprev;
    a.s[kSlotUpdateSize] += u * u;
  }
}

// ---------------------------------------------------------------------------------------------
// Finalise: kNumSums sums -> kNumSlots metrics. A metric the flags did not ask for is NaN.
// Magnitudes of an empty selection are 0/0 = NaN, as the mean of an empty tensor is; so is the
// update ratio of all-zero weights that did not move (IEEE: a moved zero weight gives inf).
template <typename Out>
TS_HD void finalize_metrics(const double* sums, double numel, double weight_numel, uint32_t flags,
                            Out* out) {
  const double nan = static_cast<double>(NAN);
  out[kSlotGradNorm] = static_cast<Out>((flags & kGradSq) ? sqrt(sums[kSlotGradNorm]) : nan);
  out[kSlotGradMagnitude] =
      static_cast<Out>((flags & kGradAbs) ? sums[kSlotGradMagnitude] / numel : nan);
  out[kSlotWeightMagnitude] =
      static_cast<Out>((flags & kParamAbs) ? sums[kSlotWeightMagnitude] / weight_numel : nan);
  out[kSlotDistance] = static_cast<Out>((flags & kDistSq) ? sqrt(sums[kSlotDistance]) : nan);
  out[kSlotUpdateSize] = static_cast<Out>((flags & kUpdateSq) ? sqrt(sums[kSlotUpdateSize]) : nan);
  out[kSlotWeightNorm] = static_cast<Out>((flags & kParamSq) ? sqrt(sums[kSlotWeightNorm]) : nan);
  out[kSlotUpdateRatio] = static_cast<Out>(((flags & kParamSq) && (flags & kUpdateSq))
                                               ? sqrt(sums[kSlotUpdateSize]) / sqrt(sums[kSlotWeightNorm])
                                               : nan);
}

// ---------------------------------------------------------------------------------------------
// Chunking: every tensor is cut into chunks of `chunk_elems` elements (the last one shorter);
// chunk c of the whole list belongs to the last tensor whose first chunk is ≤ c (find_owner in
// common.h). Empty tensors own no chunk. 64-bit throughout: one flattened tensor may pass 2^31 elements.
constexpr int64_t kDefaultChunkElems = int64_t{1} << 14;

TS_HD int64_t num_chunks(int64_t numel, int64_t chunk_elems) {
  return numel > 0 ? ceil_div(numel, chunk_elems) : 0;
}

// first_chunk[i] for i < n from the element counts; returns the total chunk count.
inline int64_t assign_first_chunks(const int64_t* numel, int64_t n, int64_t chunk_elems,
                                   int64_t* first_chunk) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    first_chunk[i] = total;
    total += num_chunks(numel[i], chunk_elems);
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// The CUDA launcher, in a build with CUDA only: everything above is plain C++ too.
#if defined(TRAINSCOPE_WITH_CUDA)
struct ParamStatsArgs {
  const TensorDesc* tensors;  // host array of num_tensors descriptors
  int64_t num_tensors;
  uint32_t flags;
  HistSpec hist_spec;          // used when flags has kHistogram
  int64_t chunk_elems;         // a multiple of 1024; kDefaultChunkElems unless tuning

  // Device outputs. Float outputs have out_dtype (kFloat32 or kFloat64).
  DType out_dtype;
  void* global;                // [kNumSlots]
  void* per_tensor;            // [num_tensors, kNumSlots]
  int64_t* nonfinite;          // [1]
  int64_t* nonfinite_per_tensor;  // [num_tensors]
  int64_t* hist;               // [nbins]                (kHistogram only)
  int64_t* hist_per_tensor;    // [num_tensors, nbins]   (kHistogram only)
};

// Device scratch the launch needs (partials per chunk, tensor table), in bytes.
size_t param_stats_workspace_bytes(const ParamStatsArgs& args);

// Enqueues the whole computation on `stream`; never synchronises. Returns the first CUDA error.
cudaError_t param_stats_launch(const ParamStatsArgs& args, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);
#endif  // TRAINSCOPE_WITH_CUDA

}  // namespace cuda
}  // namespace trainscope
