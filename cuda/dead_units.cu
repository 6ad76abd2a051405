// Per-channel active counts: one bandwidth-bound pass over a contiguous [n, channels, inner]
// array, seen as n rows of M = channels · inner columns.
//
// A thread owns V consecutive columns (one 16-byte load where M and the pointer allow, narrower
// loads otherwise) and walks down a range of rows, counting in registers. Blocks are 2-D: TX
// threads across column groups × TY = 256 / TX across rows, with TX the smallest power of two
// covering the row (at most 32), so a warp reads whole contiguous rows even when M is tiny. The
// grid's y dimension splits the rows so that short-and-wide and tall-and-narrow shapes alike fill
// the device. At the end a block sums its rows in shared memory, then each warp merges the
// neighbouring columns of one channel with a segmented shuffle reduction and adds each channel's
// sum to the output with one 64-bit integer atomic: the result is deterministic, and a 4-D
// layer's block issues a few atomics, not one per column.
#include "cuda/dead_units.h"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace trainscope {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;             // row loads in flight per thread
constexpr int64_t kMinRowsPerThread = 8;  // rows a thread walks before its block's reduction pays off
constexpr int64_t kMaxGridY = 65535;
constexpr int kBlocksPerSM = 2048 / kThreads;  // resident blocks per SM on sm_80 and sm_90

// Raw load of B bytes through the read-only path.
template <int B> struct Raw;
template <> struct Raw<16> { using type = uint4; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<2> { using type = unsigned short; };

template <typename T, int B>
union Pack {
  static constexpr int V = B / static_cast<int>(sizeof(T));
  typename Raw<B>::type raw;
  T v[V];
};

struct Shape {
  int64_t n;               // rows
  int64_t m;               // columns: channels · inner
  int64_t inner;           // columns per channel
  int64_t groups;          // column groups of V: m / V
  int64_t rows_per_block;  // < 2^31, so a column's count within one block fits in 32 bits
};

template <typename T, int B>
__global__ void __launch_bounds__(kThreads)
    add_active_counts_kernel(const T* __restrict__ acts, const Shape s, const ActivityTest test,
                             unsigned long long* __restrict__ counts) {
  using P = Pack<T, B>;
  constexpr int V = P::V;
  __shared__ unsigned int partial[kThreads * V];  // [ty][tx · V + j]

  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int nx = static_cast<int>(blockDim.x), ny = static_cast<int>(blockDim.y);
  const int64_t group = static_cast<int64_t>(blockIdx.x) * nx + tx;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * s.rows_per_block;
  const int64_t row_end = min(row_begin + s.rows_per_block, s.n);

  unsigned int c[V];
#pragma unroll
  for (int j = 0; j < V; ++j) c[j] = 0;

  if (group < s.groups) {
    const auto* base = reinterpret_cast<const typename Raw<B>::type*>(acts) + group;
    const int64_t step = static_cast<int64_t>(ny) * s.groups;  // raw elements from one row of this thread to its next
    int64_t r = row_begin + ty;
    const auto* p = base + r * s.groups;
    for (; r + static_cast<int64_t>(kUnroll - 1) * ny < row_end; r += static_cast<int64_t>(kUnroll) * ny) {
      P x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) x[u].raw = __ldg(p + u * step);
      p += kUnroll * step;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) c[j] += is_active_value(x[u].v[j], test) ? 1u : 0u;
      }
    }
    for (; r < row_end; r += ny) {
      P x;
      x.raw = __ldg(p);
      p += step;
#pragma unroll
      for (int j = 0; j < V; ++j) c[j] += is_active_value(x.v[j], test) ? 1u : 0u;
    }
  }

  // Column sums of the block: thread t = ty · nx + tx takes column t of the tile (width ≤ 256).
  const int width = nx * V;
#pragma unroll
  for (int j = 0; j < V; ++j) partial[ty * width + tx * V + j] = c[j];
  __syncthreads();

  const int t = ty * nx + tx;
  if ((t & ~31) >= width) return;  // warp-uniform: whole warps past the tile leave together
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * width;  // first column of the tile
  const int64_t col = col0 + t;
  const bool valid = t < width && col < s.m;
  unsigned long long sum = 0;
  if (valid) {
    for (int y = 0; y < ny; ++y) sum += partial[y * width + t];
  }
  // Channel of the column relative to the tile's first channel; past the tile: INT_MAX, which
  // only ever merges with other invalid lanes.
  const int64_t ch0 = col0 / s.inner;
  const int ch = valid ? static_cast<int>(col / s.inner - ch0) : INT_MAX;

  // Segmented sum over the warp's lanes with equal ch (channels grow with the column, so equal
  // channels are contiguous lanes): after the step of offset k, lane l holds the sum of its
  // channel's lanes in [l, l + 2k).
  const int lane = t & 31;
#pragma unroll
  for (int k = 1; k < 32; k *= 2) {
    const unsigned long long other = __shfl_down_sync(0xffffffffu, sum, k);
    const int other_ch = __shfl_down_sync(0xffffffffu, ch, k);
    if (lane + k < 32 && other_ch == ch) sum += other;
  }
  const int prev_ch = __shfl_up_sync(0xffffffffu, ch, 1);
  const bool head = lane == 0 || prev_ch != ch;
  if (valid && head && sum != 0) atomicAdd(counts + ch0 + ch, sum);
}

template <typename T, int B>
cudaError_t launch(const void* acts, const Shape& shape_in, const ActivityTest& test, int64_t* counts,
                   cudaStream_t stream) {
  constexpr int V = Pack<T, B>::V;
  Shape s = shape_in;
  s.groups = s.m / V;
  int tx = 1;
  while (tx < 32 && tx < s.groups) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t grid_x = ceil_div(s.groups, tx);
  if (grid_x > INT_MAX) return cudaErrorInvalidValue;

  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;

  // About two waves of blocks, but no block with fewer than kMinRowsPerThread rows per thread
  // (unless the whole array is that short), and no more than the grid's y limit allows.
  const int64_t target_blocks = 2 * static_cast<int64_t>(std::max(sms, 1)) * kBlocksPerSM;
  int64_t grid_y = std::min(ceil_div(target_blocks, grid_x), ceil_div(s.n, ty * kMinRowsPerThread));
  grid_y = std::max<int64_t>(1, std::min(grid_y, kMaxGridY));
  s.rows_per_block = ceil_div(s.n, grid_y);
  if (s.rows_per_block > INT_MAX) return cudaErrorInvalidValue;
  grid_y = ceil_div(s.n, s.rows_per_block);

  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(grid_y));
  const dim3 block(static_cast<unsigned int>(tx), static_cast<unsigned int>(ty));
  add_active_counts_kernel<T, B><<<grid, block, 0, stream>>>(static_cast<const T*>(acts), s, test,
                                                             reinterpret_cast<unsigned long long*>(counts));
  return cudaGetLastError();
}

// The widest load of at most 16 bytes that divides a row (so every row starts aligned) and to
// which the pointer is aligned.
template <typename T>
cudaError_t dispatch_width(const void* acts, const Shape& s, const ActivityTest& test, int64_t* counts,
                           cudaStream_t stream) {
  const auto addr = reinterpret_cast<uintptr_t>(acts);
  const auto fits = [&](int bytes) {
    const int64_t v = bytes / static_cast<int64_t>(sizeof(T));
    return bytes >= static_cast<int>(sizeof(T)) && s.m % v == 0 && addr % static_cast<uintptr_t>(bytes) == 0;
  };
  if (fits(16)) return launch<T, 16>(acts, s, test, counts, stream);
  if (fits(8)) return launch<T, 8>(acts, s, test, counts, stream);
  if constexpr (sizeof(T) <= 4) {
    if (fits(4)) return launch<T, 4>(acts, s, test, counts, stream);
  }
  if constexpr (sizeof(T) <= 2) {
    if (fits(2)) return launch<T, 2>(acts, s, test, counts, stream);
  }
  return cudaErrorInvalidValue;  // a pointer not aligned to its own element type
}

}  // namespace

cudaError_t launch_add_active_counts(const void* acts, DType dtype, int64_t n, int64_t channels, int64_t inner,
                                     const ActivityTest& test, int64_t* counts, cudaStream_t stream) {
  const int dt = static_cast<int>(dtype);
  if (n < 0 || channels < 0 || inner < 0 || dt < 0 || dt > 3) return cudaErrorInvalidValue;
  if (channels > 0 && counts == nullptr) return cudaErrorInvalidValue;
  if (n == 0 || channels == 0 || inner == 0) return cudaSuccess;
  if (acts == nullptr || channels > INT64_MAX / inner || n > INT64_MAX / (channels * inner)) {
    return cudaErrorInvalidValue;
  }
  Shape s{};
  s.n = n;
  s.m = channels * inner;
  s.inner = inner;
  switch (dtype) {
    case DType::kFloat32: return dispatch_width<float>(acts, s, test, counts, stream);
    case DType::kFloat64: return dispatch_width<double>(acts, s, test, counts, stream);
    case DType::kBFloat16: return dispatch_width<bf16_bits>(acts, s, test, counts, stream);
    case DType::kFloat16: return dispatch_width<f16_bits>(acts, s, test, counts, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace trainscope
