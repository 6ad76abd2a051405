// Per-sample parts ‖gᵢ‖², gᵢ·ḡ, ‖ḡ‖² from materialised per-sample gradients, one read per element.
//
// Persistent blocks walk column tiles: all B rows × W columns of one tensor (W a power of two,
// as wide as shared memory allows for this B). A tile is staged once in shared memory — while
// counting its histogram and non-finite elements — then its column means ḡ_c are formed, then
// every row's Σ v² and Σ v·ḡ_c over the tile. Row sums accumulate in float64 in shared memory
// across the block's tiles (row r is only ever touched by one warp, or one thread, so there are
// no races); each block writes one partial per row, and a single block adds the partials in a
// fixed order: bitwise deterministic, no floating-point atomics, no host synchronisation.
#include "cuda/per_sample_stats.h"

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "cuda/histogram.cuh"
#include "cuda/once_per_device.h"

namespace trainscope {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroupTensors = 96;
constexpr int kBlocksPerSM = 2;
constexpr int64_t kMaxWidth = kThreads;

struct PsTensor {
  const void* grads;
  int64_t cols;
  int32_t dtype;
};

struct PsGroup {
  int64_t n;            // tensors in this launch
  int64_t slot_offset;  // first partial slot of this launch
  int64_t num_tiles;
  int64_t first_tile[kMaxGroupTensors];
  PsTensor t[kMaxGroupTensors];
};

struct PsConfig {
  int64_t batch;
  int64_t width;      // W
  int32_t log_width;  // log2(W)
  int32_t histogram;
  int32_t shared_hist;
  HistSpec hist;
  int64_t tile_bytes;  // bytes reserved for the staged tile (rounded to 16)
};

// Where everything lives in dynamic shared memory.
struct PsShared {
  unsigned char* tile;
  double* col_mean;  // [W]
  double* red;       // [kThreads]
  double* acc_sq;    // [B]
  double* acc_dot;   // [B]
  unsigned int* hist;  // [kWarps][nbins] when shared_hist
};

size_t shared_bytes_for(int64_t batch, int64_t width, size_t elem, int64_t hist_counters) {
  const size_t tile = (static_cast<size_t>(batch * width) * elem + 15) / 16 * 16;
  return tile + sizeof(double) * static_cast<size_t>(width + kThreads + 2 * batch) +
         sizeof(unsigned int) * static_cast<size_t>(hist_counters);
}

__device__ PsShared carve(unsigned char* smem, const PsConfig& cfg) {
  PsShared s;
  s.tile = smem;
  s.col_mean = reinterpret_cast<double*>(smem + cfg.tile_bytes);
  s.red = s.col_mean + cfg.width;
  s.acc_sq = s.red + kThreads;
  s.acc_dot = s.acc_sq + cfg.batch;
  s.hist = reinterpret_cast<unsigned int*>(s.acc_dot + cfg.batch);
  return s;
}

template <typename T>
__device__ void process_tile(const PsTensor& d, int64_t c0, int64_t wt, const PsConfig& cfg,
                             const PsShared& sh, HistCounter& counter, long long& nonfinite,
                             double& mean_sq) {
  using Acc = typename Widen<T>::type;
  Acc* tile = reinterpret_cast<Acc*>(sh.tile);
  const T* g = static_cast<const T*>(d.grads);
  const int64_t B = cfg.batch, W = cfg.width;
  const int tid = threadIdx.x;

  // 1. Stage the tile (consecutive threads read consecutive columns of a row; unrolled so each
  // thread has several independent loads in flight).
#pragma unroll 4
  for (int64_t idx = tid; idx < B * W; idx += kThreads) {
    const int64_t r = idx >> cfg.log_width, c = idx & (W - 1);
    if (c >= wt) continue;
    const Acc v = widen(g[r * d.cols + c0 + c]);
    tile[r * W + c] = v;
    if (!is_finite(v)) {
      ++nonfinite;
    } else if (cfg.histogram) {
      counter.add(static_cast<int32_t>(hist_bin(static_cast<double>(v), cfg.hist)));
    }
  }
  __syncthreads();

  // 2. Column means: kThreads / W row groups per column, then the groups in a fixed order.
  {
    const int64_t c = tid & (W - 1), groups = kThreads / W, group = tid >> cfg.log_width;
    double s = 0.0;
    if (c < wt) {
      for (int64_t r = group; r < B; r += groups) s += static_cast<double>(tile[r * W + c]);
    }
    sh.red[tid] = s;
    __syncthreads();
    if (tid < W) {
      double total = 0.0;
      for (int64_t k = 0; k < groups; ++k) total += sh.red[k * W + tid];
      const double mean = tid < wt ? total / static_cast<double>(B) : 0.0;
      sh.col_mean[tid] = mean;
      mean_sq += mean * mean;
    }
    __syncthreads();
  }

  // 3. Row sums over the tile: a warp per row when the tile is at least a warp wide.
  if (W >= 32) {
    const int lane = tid % 32, warp = tid / 32;
    for (int64_t r = warp; r < B; r += kWarps) {
      double s = 0.0, dd = 0.0;
      for (int64_t c = lane; c < wt; c += 32) {
        const double v = static_cast<double>(tile[r * W + c]);
        s += v * v;
        dd += v * sh.col_mean[c];
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        s += __shfl_down_sync(0xffffffffu, s, off);
        dd += __shfl_down_sync(0xffffffffu, dd, off);
      }
      if (lane == 0) {
        sh.acc_sq[r] += s;
        sh.acc_dot[r] += dd;
      }
    }
  } else {
    for (int64_t r = tid; r < B; r += kThreads) {
      double s = 0.0, dd = 0.0;
      for (int64_t c = 0; c < wt; ++c) {
        const double v = static_cast<double>(tile[r * W + c]);
        s += v * v;
        dd += v * sh.col_mean[c];
      }
      sh.acc_sq[r] += s;
      sh.acc_dot[r] += dd;
    }
  }
  __syncthreads();  // the next tile overwrites tile and col_mean
}

struct SlotTotal {
  double mean_sq;
  long long nonfinite;
};

struct SlotTotalSum {
  __device__ SlotTotal operator()(const SlotTotal& a, const SlotTotal& b) const {
    return SlotTotal{a.mean_sq + b.mean_sq, a.nonfinite + b.nonfinite};
  }
};

__global__ void __launch_bounds__(kThreads)
    tiles_kernel(const __grid_constant__ PsGroup grp, const __grid_constant__ PsConfig cfg,
                 double* part_sq, double* part_dot, SlotTotal* part_total,
                 unsigned long long* hist_global) {
  extern __shared__ __align__(16) unsigned char smem[];
  const PsShared sh = carve(smem, cfg);
  const int64_t B = cfg.batch;
  const int64_t nbins = cfg.hist.nbins;
  for (int64_t r = threadIdx.x; r < B; r += kThreads) sh.acc_sq[r] = sh.acc_dot[r] = 0.0;
  if (cfg.histogram && cfg.shared_hist) {
    for (int64_t i = threadIdx.x; i < kWarps * nbins; i += kThreads) sh.hist[i] = 0;
  }
  __syncthreads();

  HistCounter counter;
  counter.init(cfg.histogram && cfg.shared_hist ? sh.hist + (threadIdx.x / 32) * nbins : nullptr, hist_global);
  long long nonfinite = 0;
  double mean_sq = 0.0;
  for (int64_t tile = blockIdx.x; tile < grp.num_tiles; tile += gridDim.x) {
    const int64_t t = find_owner(grp.first_tile, grp.n, tile);
    const PsTensor& d = grp.t[t];
    const int64_t c0 = (tile - grp.first_tile[t]) * cfg.width;
    const int64_t wt = min(cfg.width, d.cols - c0);
    switch (static_cast<DType>(d.dtype)) {
      case DType::kFloat32: process_tile<float>(d, c0, wt, cfg, sh, counter, nonfinite, mean_sq); break;
      case DType::kFloat64: process_tile<double>(d, c0, wt, cfg, sh, counter, nonfinite, mean_sq); break;
      case DType::kBFloat16: process_tile<bf16_bits>(d, c0, wt, cfg, sh, counter, nonfinite, mean_sq); break;
      default: process_tile<f16_bits>(d, c0, wt, cfg, sh, counter, nonfinite, mean_sq); break;
    }
  }
  if (cfg.histogram) counter.flush();

  const int64_t slot = grp.slot_offset + blockIdx.x;
  for (int64_t r = threadIdx.x; r < B; r += kThreads) {
    part_sq[slot * B + r] = sh.acc_sq[r];
    part_dot[slot * B + r] = sh.acc_dot[r];
  }
  using BlockReduce = cub::BlockReduce<SlotTotal, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const SlotTotal total = BlockReduce(storage).Reduce(SlotTotal{mean_sq, nonfinite}, SlotTotalSum());
  if (threadIdx.x == 0) part_total[slot] = total;

  if (cfg.histogram && cfg.shared_hist) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < nbins; b += kThreads) {
      unsigned long long c = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) c += sh.hist[w * nbins + b];
      if (c != 0) atomicAdd(hist_global + b, c);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* part_sq, const double* part_dot, const SlotTotal* part_total,
                    int64_t slots, int64_t batch, double* sq_norms, double* dots,
                    double* mean_sq_norm, long long* nonfinite) {
  for (int64_t r = threadIdx.x; r < batch; r += kThreads) {
    double s = 0.0, d = 0.0;
    for (int64_t k = 0; k < slots; ++k) {
      s += part_sq[k * batch + r];
      d += part_dot[k * batch + r];
    }
    sq_norms[r] = s;
    dots[r] = d;
  }
  SlotTotal acc{0.0, 0};
  for (int64_t k = threadIdx.x; k < slots; k += kThreads) acc = SlotTotalSum()(acc, part_total[k]);
  using BlockReduce = cub::BlockReduce<SlotTotal, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const SlotTotal total = BlockReduce(storage).Reduce(acc, SlotTotalSum());
  if (threadIdx.x == 0) {
    *mean_sq_norm = total.mean_sq;
    *nonfinite = total.nonfinite;
  }
}

// Launch plan: tile width, shared memory and the grid of each launch group.
struct Plan {
  bool ok = false;
  int64_t width = 0;
  int32_t log_width = 0;
  bool shared_hist = false;
  size_t tile_bytes = 0;
  size_t shared_bytes = 0;
  size_t budget = 0;              // shared_budget() of the device: shared_bytes never exceeds it
  int64_t blocks_per_launch = 0;  // persistent blocks, at most
  int64_t slots = 0;              // partial slots over all launches
};

bool has_float64(const PerSampleArgs& a) {
  for (int64_t i = 0; i < a.num_tensors; ++i) {
    if (a.tensors[i].dtype == DType::kFloat64 && a.tensors[i].cols > 0) return true;
  }
  return false;
}

// The most dynamic shared memory any plan on a device uses: room for kBlocksPerSM blocks per SM,
// less what each block's static shared memory and the runtime reserve take (2 KB is ample for
// both). The kernel's limit is raised to this once per device (see per_sample_launch).
size_t shared_budget(int optin, int per_sm) {
  return std::min<size_t>(static_cast<size_t>(optin), static_cast<size_t>(per_sm) / kBlocksPerSM) - 2048;
}

cudaError_t make_plan(const PerSampleArgs& a, int device, Plan* plan) {
  int sms = 0, optin = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err != cudaSuccess) return err;
  const size_t budget = shared_budget(optin, per_sm);
  const size_t elem = has_float64(a) ? sizeof(double) : sizeof(float);
  const int64_t hist_counters = a.histogram ? kWarps * a.hist_spec.nbins : 0;
  Plan p;
  p.budget = budget;
  for (int64_t w = kMaxWidth, lw = 8; w >= 1; w /= 2, --lw) {
    for (int shared_hist = a.histogram ? 1 : 0; shared_hist >= 0; --shared_hist) {
      const size_t bytes = shared_bytes_for(a.batch, w, elem, shared_hist ? hist_counters : 0);
      if (bytes <= budget) {
        p.ok = true;
        p.width = w;
        p.log_width = static_cast<int32_t>(lw);
        p.shared_hist = shared_hist != 0;
        p.tile_bytes = (static_cast<size_t>(a.batch * w) * elem + 15) / 16 * 16;
        p.shared_bytes = bytes;
        break;
      }
    }
    if (p.ok) break;
  }
  if (!p.ok) {
    *plan = p;
    return cudaSuccess;
  }
  p.blocks_per_launch = static_cast<int64_t>(sms) * kBlocksPerSM;
  for (int64_t start = 0; start < a.num_tensors; start += kMaxGroupTensors) {
    const int64_t n = std::min<int64_t>(kMaxGroupTensors, a.num_tensors - start);
    int64_t tiles = 0;
    for (int64_t i = 0; i < n; ++i) tiles += num_col_tiles(a.tensors[start + i].cols, p.width);
    p.slots += std::max<int64_t>(1, std::min(tiles, p.blocks_per_launch));
  }
  if (p.slots == 0) p.slots = 1;
  *plan = p;
  return cudaSuccess;
}

struct WorkspaceLayout {
  size_t sq, dot, total, bytes;
};

WorkspaceLayout layout_for(const Plan& p, int64_t batch) {
  auto up = [](size_t v) { return (v + 255) / 256 * 256; };
  WorkspaceLayout l;
  l.sq = 0;
  l.dot = up(sizeof(double) * static_cast<size_t>(p.slots * batch));
  l.total = l.dot + up(sizeof(double) * static_cast<size_t>(p.slots * batch));
  l.bytes = l.total + up(sizeof(SlotTotal) * static_cast<size_t>(p.slots));
  return l;
}

}  // namespace

bool per_sample_launch_supported(int64_t batch, bool has_f64, int device) {
  PerSampleTensorDesc probe{nullptr, 1, has_f64 ? DType::kFloat64 : DType::kFloat32};
  PerSampleArgs a{};
  a.tensors = &probe;
  a.num_tensors = 1;
  a.batch = batch;
  a.histogram = true;
  a.hist_spec = make_hist_spec(1, 1.0);
  Plan p;
  return make_plan(a, device, &p) == cudaSuccess && p.ok;
}

size_t per_sample_workspace_bytes(const PerSampleArgs& args, int device) {
  Plan p;
  if (make_plan(args, device, &p) != cudaSuccess || !p.ok) return 0;
  return layout_for(p, args.batch).bytes;
}

cudaError_t per_sample_launch(const PerSampleArgs& a, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream, int device) {
  if (a.batch < 1 || a.num_tensors < 0 || (a.num_tensors > 0 && a.tensors == nullptr)) return cudaErrorInvalidValue;
  if (a.histogram && (a.hist_spec.nbins < 1 || a.hist_spec.nbins > kMaxHistBins || !(a.hist_spec.maxval > 0.0))) {
    return cudaErrorInvalidValue;
  }
  Plan p;
  cudaError_t err = make_plan(a, device, &p);
  if (err != cudaSuccess) return err;
  if (!p.ok) return cudaErrorInvalidConfiguration;
  const WorkspaceLayout l = layout_for(p, a.batch);
  if (workspace == nullptr || workspace_bytes < l.bytes) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  double* part_sq = reinterpret_cast<double*>(ws + l.sq);
  double* part_dot = reinterpret_cast<double*>(ws + l.dot);
  SlotTotal* part_total = reinterpret_cast<SlotTotal*>(ws + l.total);
  auto* hist = reinterpret_cast<unsigned long long*>(a.hist);

  if (a.histogram) {
    err = cudaMemsetAsync(hist, 0, sizeof(int64_t) * static_cast<size_t>(a.hist_spec.nbins), stream);
    if (err != cudaSuccess) return err;
  }
  // The kernel's shared-memory limit is device state that every thread and every captured graph
  // shares: set it once per device to the most any plan uses, never to one call's size, which a
  // later smaller call would lower under another thread's launch or a graph's replay.
  static OncePerDevice shared_limit;
  err = shared_limit.run(device, [&] {
    return cudaFuncSetAttribute(tiles_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.budget));
  });
  if (err != cudaSuccess) return err;

  PsConfig cfg;
  cfg.batch = a.batch;
  cfg.width = p.width;
  cfg.log_width = p.log_width;
  cfg.histogram = a.histogram ? 1 : 0;
  cfg.shared_hist = p.shared_hist ? 1 : 0;
  cfg.hist = a.histogram ? a.hist_spec : make_hist_spec(1, 1.0);
  cfg.tile_bytes = static_cast<int64_t>(p.tile_bytes);

  PsGroup grp;
  int64_t slot_offset = 0;
  // An empty list still takes one launch, so every slot the finalize reads is written.
  const int64_t num_tensors = std::max<int64_t>(a.num_tensors, 0);
  for (int64_t start = 0; start < num_tensors || (start == 0 && num_tensors == 0); start += kMaxGroupTensors) {
    grp.n = std::min<int64_t>(kMaxGroupTensors, num_tensors - start);
    grp.slot_offset = slot_offset;
    int64_t tiles = 0;
    for (int64_t i = 0; i < grp.n; ++i) {
      const PerSampleTensorDesc& d = a.tensors[start + i];
      grp.t[i] = PsTensor{d.grads, d.cols, static_cast<int32_t>(d.dtype)};
      grp.first_tile[i] = tiles;
      tiles += num_col_tiles(d.cols, p.width);
    }
    grp.num_tiles = tiles;
    const int64_t blocks = std::max<int64_t>(1, std::min(tiles, p.blocks_per_launch));
    tiles_kernel<<<static_cast<unsigned int>(blocks), kThreads, p.shared_bytes, stream>>>(
        grp, cfg, part_sq, part_dot, part_total, hist);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    slot_offset += blocks;
    if (num_tensors == 0) break;
  }
  finalize_kernel<<<1, kThreads, 0, stream>>>(part_sq, part_dot, part_total, slot_offset, a.batch,
                                              a.sq_norms, a.dots, a.mean_sq_norm,
                                              reinterpret_cast<long long*>(a.nonfinite));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace trainscope
