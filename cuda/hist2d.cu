// Joint (per-sample gradient, parameter) histogram: one pass over every per-sample gradient
// element of a whole list of pairs, each read once.
//
// Blocks are persistent: each takes items (hist2d_plan) in a grid-stride loop, so its shared
// histogram — 10,000 bins by default, more than a block's share of the elements on small inputs —
// is cleared and flushed once per block instead of once per item. Within an item a thread owns
// kSlots window elements; for each it bins the parameter value once and then walks down that
// column through every pass of the item. So a thread's consecutive pairs share the parameter bin,
// and since per-sample gradients crowd into the few bins around zero, the HistCounter's two cached
// (bin, count) pairs absorb most elements and the shared (or, for large histograms, global)
// atomics stay rare. Every load instruction of a warp still reads 32 consecutive elements (a
// column-wise walk rules out 16-byte vectors: a thread's next element is a row further on).
// Integer atomics only: the counts are deterministic. The pair table travels as a
// __grid_constant__ kernel parameter (no copy, graph-capturable); lists longer than
// kMaxGroupPairs take several launches.
#include "cuda/hist2d.h"
#include "cuda/histogram.cuh"

#include <algorithm>
#include <cstdint>

namespace trainscope {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSlots = static_cast<int>(kHist2dWindow) / kThreads;  // per thread: 8
static_assert(kSlots * kThreads == kHist2dWindow, "a pass window is one element per thread slot");
constexpr int kMinBlocksPerSM = 3;
constexpr int kLoadsInFlight = 8;  // gradient loads a thread issues before counting them
constexpr int kMaxGroupPairs = 128;  // keeps LaunchGroup near 6 KB of kernel parameters
constexpr size_t kSharedMemPerBlockDefault = 48 * 1024;  // without opting in to more
// A block counts at most this many elements, so its 32-bit shared counters cannot overflow.
constexpr int64_t kMaxBlockElems = int64_t{1} << 31;

struct GroupPair {
  const void* grad;
  const void* param;
  int64_t numel;
  int64_t col_tiles;      // of hist2d_plan(batch, numel), computed once on the host
  int32_t rows_per_pass;  // idem
  int32_t dtype;
};

struct LaunchGroup {
  int64_t n;      // pairs in this group, all non-empty
  int64_t items;  // items of the group
  int64_t first_item[kMaxGroupPairs];
  GroupPair p[kMaxGroupPairs];
};

struct Config {
  HistSpec grad;
  HistSpec param;
  int64_t batch;
  int32_t shared_copies;  // shared histograms per block (a power of two ≤ kWarps); 0: global
};

// One (gradient, parameter-bin) pair into the thread's counter, or into the non-finite count.
template <typename G>
__device__ __forceinline__ void count_pair(HistCounter& c, G g, int32_t param_bin, const Config& cfg,
                                           unsigned long long& nonfinite) {
  const int32_t flat = hist2d_flat_bin(static_cast<double>(g), param_bin, cfg.grad, cfg.param.nbins);
  if (flat >= 0) c.add(flat); else ++nonfinite;
}

// One item. Thread slot k < kSlots is window element s = k·kThreads + threadIdx.x (hist2d_slot),
// so each load instruction of a warp reads 32 consecutive elements. A thread finishes one slot —
// one parameter, all passes — before the next: its consecutive pairs share the parameter bin,
// which keeps the counter's cached slots hitting.
template <typename T>
__device__ __forceinline__ void run_item(const GroupPair& d, int64_t local_item, const Config& cfg,
                                         HistCounter& counter, unsigned long long& nonfinite) {
  Hist2dPlan plan;
  plan.rows_per_pass = d.rows_per_pass;
  plan.col_tiles = d.col_tiles;
  const Hist2dItem it = hist2d_item(plan, cfg.batch, d.numel, local_item);
  const int64_t stride = d.rows_per_pass * d.numel;  // elements from one pass to the next
  const T* theta = static_cast<const T*>(d.param) + it.col_begin;
  const T* g = static_cast<const T*>(d.grad) + it.row_begin * d.numel + it.col_begin;

#pragma unroll 1
  for (int k = 0; k < kSlots; ++k) {
    const int32_t s = k * kThreads + static_cast<int32_t>(threadIdx.x);
    const Hist2dSlot slot = hist2d_slot(it, d.rows_per_pass, s);
    const int n = slot.passes;
    if (n == 0) continue;
    const int32_t pbin = hist2d_param_bin(static_cast<double>(widen(theta[slot.col])), cfg.param);
    const T* x = g + s;
#pragma unroll 1
    for (int p = 0; p < n; p += kLoadsInFlight) {
      // All loads first, then the counting: kLoadsInFlight rows in flight per thread. Past the
      // last pass the load repeats the last valid address (a cache hit) rather than being
      // predicated off, which keeps the values in registers across hist_bin's slow-path calls.
      T v[kLoadsInFlight];
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) v[j] = x[static_cast<int64_t>(min(p + j, n - 1)) * stride];
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) {
        if (p + j < n) count_pair(counter, widen(v[j]), pbin, cfg, nonfinite);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    hist2d_kernel(const __grid_constant__ LaunchGroup grp, const __grid_constant__ Config cfg,
                  unsigned long long* counts, unsigned long long* nonfinite_out) {
  extern __shared__ unsigned int shared_hist[];  // [shared_copies][nbins] when shared_copies > 0

  const int64_t nbins = cfg.grad.nbins * cfg.param.nbins;
  unsigned int* my_hist = nullptr;
  if (cfg.shared_copies > 0) {
    for (int64_t i = threadIdx.x; i < cfg.shared_copies * nbins; i += kThreads) shared_hist[i] = 0;
    __syncthreads();
    my_hist = shared_hist + (static_cast<int>(threadIdx.x / 32) % cfg.shared_copies) * nbins;
  }

  HistCounter counter;
  counter.init(my_hist, counts);
  unsigned long long nonfinite = 0;

  for (int64_t item = blockIdx.x; item < grp.items; item += gridDim.x) {  // block-uniform
    const int64_t t = find_owner(grp.first_item, grp.n, item);
    const GroupPair& d = grp.p[t];
    const int64_t local = item - grp.first_item[t];
    switch (static_cast<DType>(d.dtype)) {
      case DType::kFloat32: run_item<float>(d, local, cfg, counter, nonfinite); break;
      case DType::kFloat64: run_item<double>(d, local, cfg, counter, nonfinite); break;
      case DType::kBFloat16: run_item<bf16_bits>(d, local, cfg, counter, nonfinite); break;
      default: run_item<f16_bits>(d, local, cfg, counter, nonfinite); break;
    }
  }
  counter.flush();

#pragma unroll
  for (int off = 16; off > 0; off /= 2) nonfinite += __shfl_down_sync(0xffffffffu, nonfinite, off);
  if (threadIdx.x % 32 == 0 && nonfinite != 0) atomicAdd(nonfinite_out, nonfinite);

  if (cfg.shared_copies > 0) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < nbins; b += kThreads) {
      unsigned long long c = 0;
      for (int w = 0; w < cfg.shared_copies; ++w) c += shared_hist[w * nbins + b];
      if (c != 0) atomicAdd(counts + b, c);
    }
  }
}

}  // namespace

cudaError_t hist2d_launch(const Hist2dArgs& args, cudaStream_t stream) {
  if (args.num_pairs < 0 || (args.num_pairs > 0 && args.pairs == nullptr) || args.batch < 0 ||
      args.counts == nullptr || args.nonfinite == nullptr || !hist2d_axis_ok(args.grad_spec) ||
      !hist2d_axis_ok(args.param_spec) || args.grad_spec.nbins * args.param_spec.nbins > kMaxHist2dBins) {
    return cudaErrorInvalidValue;
  }
  for (int64_t i = 0; i < args.num_pairs; ++i) {
    const Hist2dPair& p = args.pairs[i];
    const int dt = static_cast<int>(p.dtype);
    if (p.numel < 0 || dt < 0 || dt > 3) return cudaErrorInvalidValue;
    if (p.numel > 0 && args.batch > 0 && (p.grad == nullptr || p.param == nullptr)) return cudaErrorInvalidValue;
  }
  const int64_t nbins = args.grad_spec.nbins * args.param_spec.nbins;
  auto* counts = reinterpret_cast<unsigned long long*>(args.counts);
  auto* nonfinite = reinterpret_cast<unsigned long long*>(args.nonfinite);

  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int64_t) * static_cast<size_t>(nbins), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(nonfinite, 0, sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (args.batch == 0) return cudaSuccess;

  Config cfg;
  cfg.grad = args.grad_spec;
  cfg.param = args.param_spec;
  cfg.batch = args.batch;
  // As many shared copies of the histogram (one per warp at most) as fit beside the kernel's own
  // static shared memory within the default per-block limit; none fit: count in global memory.
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, hist2d_kernel);
  if (err != cudaSuccess) return err;
  const size_t copy_bytes = sizeof(unsigned int) * static_cast<size_t>(nbins);
  cfg.shared_copies = 0;
  for (int c = kWarps; c >= 1; c /= 2) {
    if (c * copy_bytes + attr.sharedSizeBytes <= kSharedMemPerBlockDefault) {
      cfg.shared_copies = c;
      break;
    }
  }
  const size_t dyn_shared = cfg.shared_copies * copy_bytes;

  // Enough persistent blocks to fill the device once.
  int device = 0, sms = 0, per_sm = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hist2d_kernel, kThreads, dyn_shared);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  const int64_t max_items_per_block = kMaxBlockElems / (kHist2dWindow * kHist2dPassesPerItem);

  LaunchGroup grp;
  int64_t next = 0;
  while (next < args.num_pairs) {
    grp.n = 0;
    grp.items = 0;
    for (; next < args.num_pairs && grp.n < kMaxGroupPairs; ++next) {
      const Hist2dPair& p = args.pairs[next];
      if (p.numel == 0) continue;  // empty pairs own no item
      const Hist2dPlan plan = hist2d_plan(args.batch, p.numel);
      GroupPair& g = grp.p[grp.n];
      g.grad = p.grad;
      g.param = p.param;
      g.numel = p.numel;
      g.col_tiles = plan.col_tiles;
      g.rows_per_pass = static_cast<int32_t>(plan.rows_per_pass);
      g.dtype = static_cast<int32_t>(p.dtype);
      grp.first_item[grp.n] = grp.items;
      grp.items += plan.items;
      ++grp.n;
    }
    if (grp.n == 0) break;
    const int64_t blocks = std::max(std::min(grp.items, resident),
                                    (grp.items + max_items_per_block - 1) / max_items_per_block);
    hist2d_kernel<<<static_cast<unsigned int>(blocks), kThreads, dyn_shared, stream>>>(grp, cfg, counts, nonfinite);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace trainscope
