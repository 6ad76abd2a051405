// Fused parameter-space metrics: one pass over g, θ, θ₀, θ_prev for a whole list of tensors.
//
// Pass 1 (chunk_kernel): one block per chunk of kDefaultChunkElems elements of one tensor. The
// tensor table travels as a __grid_constant__ kernel parameter (no host-to-device copy, so the
// launch is asynchronous and graph-capturable); lists longer than kMaxGroupTensors take several
// launches. Each block writes one float64 partial per chunk (no floating-point atomics) and adds
// its per-warp shared-memory histogram into the tensor's int64 histogram with integer atomics,
// which commute, so the result is deterministic.
// Pass 2 (finalize_kernel): one block sums the partials of each tensor in a fixed order, then
// the tensors, and writes every metric per tensor and for the list.
#include "cuda/param_stats.h"
#include "cuda/histogram.cuh"

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdint>

namespace trainscope {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinChunkBlocksPerSM = 3;  // register cap: 3 × 256 threads resident per SM
constexpr int kFinalizeThreads = 1024;
constexpr int kMaxGroupTensors = 96;              // keeps LaunchGroup near 6 KB of parameters
constexpr size_t kSharedMemPerBlockDefault = 48 * 1024;  // without opting in to more

struct GroupTensor {
  const void* grad;
  const void* param;
  const void* init;
  void* prev;
  int64_t numel;
  int32_t dtype;
  int32_t selected;
  int32_t vec_ok;  // every array this call reads or writes is 16-byte aligned
};

struct LaunchGroup {
  int64_t n;              // tensors in this group
  int64_t tensor_offset;  // index of the group's first tensor in the whole list
  int64_t chunk_offset;   // index of the group's first chunk in the whole list
  int64_t num_chunks;
  int64_t first_chunk[kMaxGroupTensors];  // relative to chunk_offset
  GroupTensor t[kMaxGroupTensors];
};

struct Config {
  uint32_t flags;
  int32_t shared_hist;  // 1: per-warp histograms in shared memory; 0: atomics straight to global
  HistSpec hist;
  int64_t chunk_elems;
};

// Partial sums of one chunk (and, in finalize, of one tensor). Summed in float64.
struct Partial {
  double s[kNumSums];
  long long nonfinite;
};

struct PartialSum {
  __device__ Partial operator()(const Partial& a, const Partial& b) const {
    Partial r;
#pragma unroll
    for (int i = 0; i < kNumSums; ++i) r.s[i] = a.s[i] + b.s[i];
    r.nonfinite = a.nonfinite + b.nonfinite;
    return r;
  }
};

struct TensorMeta {
  long long first_chunk;
  long long nchunks;
  long long numel;
  long long selected;
};

// Global sums of the list: the five slots plus the counts the magnitudes divide by.
struct ListTotal {
  Partial sums;
  double numel;
  double weight_numel;
};

struct ListTotalSum {
  __device__ ListTotal operator()(const ListTotal& a, const ListTotal& b) const {
    ListTotal r;
    r.sums = PartialSum()(a.sums, b.sums);
    r.numel = a.numel + b.numel;
    r.weight_numel = a.weight_numel + b.weight_numel;
    return r;
  }
};

template <typename T>
struct alignas(16) Vec {
  T v[16 / sizeof(T)];
};

// The work of one block on its chunk, for element type T.
template <typename T>
struct ChunkWork {
  using Acc = typename Widen<T>::type;

  uint32_t flags;
  const HistSpec* hist;
  HistCounter counter;
  ParamSums<Acc> acc;

  __device__ void element(T g, T p, T p0, T pp) {
    if (flags & (kGradSq | kGradAbs | kHistogram)) {
      const Acc gx = widen(g);
      accumulate_grad(acc, flags, gx);
      if ((flags & kHistogram) && is_finite(gx)) counter.add(static_cast<int32_t>(hist_bin(gx, *hist)));
    }
    if (flags & (kParamAbs | kDistSq | kUpdateSq)) {
      accumulate_param(acc, flags, static_cast<Acc>(widen(p)), static_cast<Acc>(widen(p0)),
                       static_cast<Acc>(widen(pp)));
    }
  }

  __device__ void run(const GroupTensor& d, int64_t begin, int64_t end) {
    const bool rg = reads_grad(flags), rp = reads_param(flags);
    const bool ri = reads_init(flags), rv = reads_prev(flags);
    const bool refresh = (flags & kRefreshPrev) != 0;
    const T* g = static_cast<const T*>(d.grad) + begin;
    const T* p = static_cast<const T*>(d.param) + begin;
    const T* p0 = static_cast<const T*>(d.init) + begin;
    T* pp = static_cast<T*>(d.prev) + begin;
    const int64_t n = end - begin;

    constexpr int V = 16 / sizeof(T);
    const int64_t vec_end = d.vec_ok ? (n / V) * V : 0;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < vec_end;
         i += static_cast<int64_t>(kThreads) * V) {
      Vec<T> gv{}, pv{}, p0v{}, ppv{};
      if (rg) gv = *reinterpret_cast<const Vec<T>*>(g + i);
      if (rp) pv = *reinterpret_cast<const Vec<T>*>(p + i);
      if (ri) p0v = *reinterpret_cast<const Vec<T>*>(p0 + i);
      if (rv) ppv = *reinterpret_cast<const Vec<T>*>(pp + i);
#pragma unroll
      for (int k = 0; k < V; ++k) element(gv.v[k], pv.v[k], p0v.v[k], ppv.v[k]);
      if (refresh) *reinterpret_cast<Vec<T>*>(pp + i) = pv;
    }
    for (int64_t i = vec_end + threadIdx.x; i < n; i += kThreads) {
      const T zero{};
      const T gx = rg ? g[i] : zero, px = rp ? p[i] : zero;
      element(gx, px, ri ? p0[i] : zero, rv ? pp[i] : zero);
      if (refresh) pp[i] = px;
    }
    if (flags & kHistogram) counter.flush();
  }
};

template <typename T>
__device__ Partial run_chunk(const GroupTensor& d, int64_t begin, int64_t end, const Config& cfg,
                             unsigned int* warp_hist, unsigned long long* tensor_hist) {
  ChunkWork<T> w;
  w.flags = cfg.flags;
  w.hist = &cfg.hist;
  w.counter.init(warp_hist, tensor_hist);
  w.acc.clear();
  w.run(d, begin, end);
  Partial out;
#pragma unroll
  for (int i = 0; i < kNumSums; ++i) out.s[i] = static_cast<double>(w.acc.s[i]);
  out.nonfinite = w.acc.nonfinite;
  return out;
}

__global__ void __launch_bounds__(kThreads, kMinChunkBlocksPerSM)
    chunk_kernel(const __grid_constant__ LaunchGroup grp, const __grid_constant__ Config cfg, Partial* partials,
                 TensorMeta* meta, unsigned long long* hist_per_tensor) {
  extern __shared__ unsigned int shared_hist[];  // [kWarps][nbins] when cfg.shared_hist

  if (blockIdx.x == 0) {
    for (int64_t i = threadIdx.x; i < grp.n; i += kThreads) {
      TensorMeta m;
      m.first_chunk = grp.chunk_offset + grp.first_chunk[i];
      m.nchunks = num_chunks(grp.t[i].numel, cfg.chunk_elems);
      m.numel = grp.t[i].numel;
      m.selected = grp.t[i].selected;
      meta[grp.tensor_offset + i] = m;
    }
  }
  if (static_cast<int64_t>(blockIdx.x) >= grp.num_chunks) return;  // block-uniform

  const int64_t local = find_owner(grp.first_chunk, grp.n, blockIdx.x);
  const GroupTensor& d = grp.t[local];
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - grp.first_chunk[local]) * cfg.chunk_elems;
  const int64_t end = min(begin + cfg.chunk_elems, d.numel);

  const bool hist = (cfg.flags & kHistogram) != 0;
  const int64_t nbins = cfg.hist.nbins;
  unsigned int* warp_hist = nullptr;
  unsigned long long* tensor_hist =
      hist ? hist_per_tensor + (grp.tensor_offset + local) * nbins : nullptr;
  if (hist && cfg.shared_hist) {
    for (int64_t i = threadIdx.x; i < kWarps * nbins; i += kThreads) shared_hist[i] = 0;
    __syncthreads();
    warp_hist = shared_hist + (threadIdx.x / 32) * nbins;
  }

  Partial part;
  switch (static_cast<DType>(d.dtype)) {
    case DType::kFloat32: part = run_chunk<float>(d, begin, end, cfg, warp_hist, tensor_hist); break;
    case DType::kFloat64: part = run_chunk<double>(d, begin, end, cfg, warp_hist, tensor_hist); break;
    case DType::kBFloat16: part = run_chunk<bf16_bits>(d, begin, end, cfg, warp_hist, tensor_hist); break;
    default: part = run_chunk<f16_bits>(d, begin, end, cfg, warp_hist, tensor_hist); break;
  }

  using BlockReduce = cub::BlockReduce<Partial, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  const Partial total = BlockReduce(reduce_storage).Reduce(part, PartialSum());
  if (threadIdx.x == 0) partials[grp.chunk_offset + blockIdx.x] = total;

  if (hist && cfg.shared_hist) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < nbins; b += kThreads) {
      unsigned long long c = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) c += shared_hist[w * nbins + b];
      if (c != 0) atomicAdd(tensor_hist + b, c);
    }
  }
}

__device__ void warp_reduce(Partial& p) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
#pragma unroll
    for (int i = 0; i < kNumSums; ++i) p.s[i] += __shfl_down_sync(0xffffffffu, p.s[i], off);
    p.nonfinite += __shfl_down_sync(0xffffffffu, p.nonfinite, off);
  }
}

template <typename Out>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const Partial* partials, const TensorMeta* meta, int64_t num_tensors,
                    uint32_t flags, int64_t nbins, Partial* tensor_sums, Out* per_tensor,
                    Out* global, long long* nonfinite_per_tensor, long long* nonfinite,
                    const unsigned long long* hist_per_tensor, unsigned long long* hist) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  constexpr int kFinalizeWarps = kFinalizeThreads / 32;

  // Per tensor: one warp sums its chunks in a fixed order.
  for (int64_t t = warp; t < num_tensors; t += kFinalizeWarps) {
    const TensorMeta m = meta[t];
    Partial s;
#pragma unroll
    for (int i = 0; i < kNumSums; ++i) s.s[i] = 0.0;
    s.nonfinite = 0;
    for (long long c = lane; c < m.nchunks; c += 32) {
      const Partial& q = partials[m.first_chunk + c];
#pragma unroll
      for (int i = 0; i < kNumSums; ++i) s.s[i] += q.s[i];
      s.nonfinite += q.nonfinite;
    }
    warp_reduce(s);
    if (lane == 0) {
      tensor_sums[t] = s;
      const double numel = static_cast<double>(m.numel);
      finalize_metrics(s.s, numel, numel, flags, per_tensor + t * kNumSlots);
      nonfinite_per_tensor[t] = s.nonfinite;
    }
  }

  // Per bin of the list histogram: one warp sums the tensors' counts.
  if (flags & kHistogram) {
    for (int64_t b = warp; b < nbins; b += kFinalizeWarps) {
      unsigned long long c = 0;
      for (int64_t t = lane; t < num_tensors; t += 32) c += hist_per_tensor[t * nbins + b];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) c += __shfl_down_sync(0xffffffffu, c, off);
      if (lane == 0) hist[b] = c;
    }
  }
  __syncthreads();  // tensor_sums written above are visible to the whole block after this

  ListTotal acc;
#pragma unroll
  for (int i = 0; i < kNumSums; ++i) acc.sums.s[i] = 0.0;
  acc.sums.nonfinite = 0;
  acc.numel = acc.weight_numel = 0.0;
  for (int64_t t = threadIdx.x; t < num_tensors; t += kFinalizeThreads) {
    const Partial& s = tensor_sums[t];
    const bool selected = meta[t].selected != 0;
#pragma unroll
    for (int i = 0; i < kNumSums; ++i) {
      if (i != kSlotWeightMagnitude || selected) acc.sums.s[i] += s.s[i];
    }
    acc.sums.nonfinite += s.nonfinite;
    acc.numel += static_cast<double>(meta[t].numel);
    if (selected) acc.weight_numel += static_cast<double>(meta[t].numel);
  }
  using BlockReduce = cub::BlockReduce<ListTotal, kFinalizeThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const ListTotal total = BlockReduce(storage).Reduce(acc, ListTotalSum());
  if (threadIdx.x == 0) {
    finalize_metrics(total.sums.s, total.numel, total.weight_numel, flags, global);
    *nonfinite = total.sums.nonfinite;
  }
}

struct WorkspaceLayout {
  size_t partials, meta, tensor_sums, total;
};

size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

WorkspaceLayout layout_for(int64_t total_chunks, int64_t num_tensors) {
  WorkspaceLayout l;
  l.partials = 0;
  l.meta = align_up(sizeof(Partial) * static_cast<size_t>(std::max<int64_t>(total_chunks, 1)));
  l.tensor_sums = l.meta + align_up(sizeof(TensorMeta) * static_cast<size_t>(std::max<int64_t>(num_tensors, 1)));
  l.total = l.tensor_sums + align_up(sizeof(Partial) * static_cast<size_t>(std::max<int64_t>(num_tensors, 1)));
  return l;
}

int64_t total_chunks_of(const ParamStatsArgs& a) {
  int64_t total = 0;
  for (int64_t i = 0; i < a.num_tensors; ++i) total += num_chunks(a.tensors[i].numel, a.chunk_elems);
  return total;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

size_t param_stats_workspace_bytes(const ParamStatsArgs& args) {
  return layout_for(total_chunks_of(args), args.num_tensors).total;
}

cudaError_t param_stats_launch(const ParamStatsArgs& args, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  if (args.num_tensors < 0 || args.chunk_elems <= 0 || args.chunk_elems % 1024 != 0 ||
      (args.num_tensors > 0 && args.tensors == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool hist = (args.flags & kHistogram) != 0;
  if (hist && (args.hist_spec.nbins < 1 || args.hist_spec.nbins > kMaxHistBins || !(args.hist_spec.maxval > 0.0))) {
    return cudaErrorInvalidValue;
  }
  const int64_t total_chunks = total_chunks_of(args);
  const WorkspaceLayout l = layout_for(total_chunks, args.num_tensors);
  if (workspace == nullptr || workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  Partial* partials = reinterpret_cast<Partial*>(ws + l.partials);
  TensorMeta* meta = reinterpret_cast<TensorMeta*>(ws + l.meta);
  Partial* tensor_sums = reinterpret_cast<Partial*>(ws + l.tensor_sums);
  auto* hist_pt = reinterpret_cast<unsigned long long*>(args.hist_per_tensor);

  cudaError_t err = cudaSuccess;
  if (hist && args.num_tensors > 0) {
    err = cudaMemsetAsync(hist_pt, 0,
                          sizeof(int64_t) * static_cast<size_t>(args.num_tensors * args.hist_spec.nbins), stream);
    if (err != cudaSuccess) return err;
  }

  Config cfg;
  cfg.flags = args.flags;
  cfg.hist = args.hist_spec;
  cfg.chunk_elems = args.chunk_elems;
  // Per-warp histograms in shared memory when they fit beside the kernel's own static shared
  // memory within the default per-block limit; otherwise count straight into global memory.
  const size_t shared_bytes = hist ? sizeof(unsigned int) * kWarps * static_cast<size_t>(args.hist_spec.nbins) : 0;
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, chunk_kernel);
  if (err != cudaSuccess) return err;
  cfg.shared_hist = hist && shared_bytes + attr.sharedSizeBytes <= kSharedMemPerBlockDefault;
  const size_t dyn_shared = cfg.shared_hist ? shared_bytes : 0;

  const uint32_t f = args.flags;
  LaunchGroup grp;
  int64_t chunk_offset = 0;
  for (int64_t start = 0; start < args.num_tensors; start += kMaxGroupTensors) {
    grp.n = std::min<int64_t>(kMaxGroupTensors, args.num_tensors - start);
    grp.tensor_offset = start;
    grp.chunk_offset = chunk_offset;
    int64_t local_chunks = 0;
    for (int64_t i = 0; i < grp.n; ++i) {
      const TensorDesc& d = args.tensors[start + i];
      GroupTensor& g = grp.t[i];
      g.grad = d.grad;
      g.param = d.param;
      g.init = d.init;
      g.prev = d.prev;
      g.numel = d.numel;
      g.dtype = static_cast<int32_t>(d.dtype);
      g.selected = d.weight_selected;
      g.vec_ok = (!reads_grad(f) || aligned16(d.grad)) && (!reads_param(f) || aligned16(d.param)) &&
                 (!reads_init(f) || aligned16(d.init)) &&
                 (!(reads_prev(f) || (f & kRefreshPrev)) || aligned16(d.prev));
      grp.first_chunk[i] = local_chunks;
      local_chunks += num_chunks(d.numel, args.chunk_elems);
    }
    grp.num_chunks = local_chunks;
    const unsigned int blocks = static_cast<unsigned int>(std::max<int64_t>(local_chunks, 1));
    chunk_kernel<<<blocks, kThreads, dyn_shared, stream>>>(grp, cfg, partials, meta, hist_pt);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    chunk_offset += local_chunks;
  }

  auto* nonfinite_pt = reinterpret_cast<long long*>(args.nonfinite_per_tensor);
  auto* nonfinite = reinterpret_cast<long long*>(args.nonfinite);
  auto* hist_out = reinterpret_cast<unsigned long long*>(args.hist);
  if (args.out_dtype == DType::kFloat64) {
    finalize_kernel<double><<<1, kFinalizeThreads, 0, stream>>>(
        partials, meta, args.num_tensors, f, args.hist_spec.nbins, tensor_sums,
        static_cast<double*>(args.per_tensor), static_cast<double*>(args.global), nonfinite_pt,
        nonfinite, hist_pt, hist_out);
  } else {
    finalize_kernel<float><<<1, kFinalizeThreads, 0, stream>>>(
        partials, meta, args.num_tensors, f, args.hist_spec.nbins, tensor_sums,
        static_cast<float*>(args.per_tensor), static_cast<float*>(args.global), nonfinite_pt,
        nonfinite, hist_pt, hist_out);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace trainscope
