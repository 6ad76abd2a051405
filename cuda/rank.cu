// Rank measures on CUDA: the Gram update (cuBLAS syrk), the check that zeroes and flags matrices
// holding NaN or ±Inf, the eigensolve (cuSOLVER syevBatched or syevd per matrix), the SVD
// (cuSOLVER gesvdj) and the kernel that turns their output into RankValues. Every library status
// and kernel launch is checked and returned, and solver `info` and the non-finite flags stay in
// device memory for the caller. None of this code waits for the device; whether cuSOLVER does
// inside syevd and gesvdj is its own affair (the README's "What waits for the device" says what
// was measured).
#include "cuda/rank.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

namespace trainscope {
namespace cuda {
namespace {

RankStatus ok_status() { return RankStatus{}; }

RankStatus invalid(const char* what) {
  RankStatus s;
  s.kind = RankStatus::kInvalidValue;
  s.what = what;
  return s;
}

RankStatus failure_if(bool failed, RankStatus::Kind kind, int32_t code, const char* what) {
  RankStatus s;
  if (failed) {
    s.kind = kind;
    s.code = code;
    s.what = what;
  }
  return s;
}

RankStatus from_cuda(cudaError_t e, const char* what) {
  return failure_if(e != cudaSuccess, RankStatus::kCuda, static_cast<int32_t>(e), what);
}

RankStatus from_cublas(cublasStatus_t e, const char* what) {
  return failure_if(e != CUBLAS_STATUS_SUCCESS, RankStatus::kCublas, static_cast<int32_t>(e), what);
}

RankStatus from_cusolver(cusolverStatus_t e, const char* what) {
  return failure_if(e != CUSOLVER_STATUS_SUCCESS, RankStatus::kCusolver, static_cast<int32_t>(e), what);
}

#define TS_RANK_TRY(expr)             \
  do {                                \
    const RankStatus ts_s_ = (expr);  \
    if (!ts_s_.ok()) return ts_s_;    \
  } while (0)

// cuSOLVER's 64-bit API keeps its options in a params object (host memory only).
class SolverParams {
 public:
  SolverParams() { status_ = cusolverDnCreateParams(&p_); }
  ~SolverParams() {
    if (status_ == CUSOLVER_STATUS_SUCCESS) cusolverDnDestroyParams(p_);
  }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
  cusolverStatus_t status() const { return status_; }
  cusolverDnParams_t get() const { return p_; }

 private:
  cusolverDnParams_t p_ = nullptr;
  cusolverStatus_t status_;
};

class GesvdjParams {
 public:
  GesvdjParams() { status_ = cusolverDnCreateGesvdjInfo(&p_); }
  ~GesvdjParams() {
    if (status_ == CUSOLVER_STATUS_SUCCESS) cusolverDnDestroyGesvdjInfo(p_);
  }
  GesvdjParams(const GesvdjParams&) = delete;
  GesvdjParams& operator=(const GesvdjParams&) = delete;
  cusolverStatus_t status() const { return status_; }
  gesvdjInfo_t get() const { return p_; }

 private:
  gesvdjInfo_t p_ = nullptr;
  cusolverStatus_t status_;
};

// syrk fills one triangle; copy it to the other. c is column-major n × n with the lower triangle
// (row ≥ column) formed. Tiles of 32 × 32, each thread four rows of its tile.
constexpr int kMirrorTile = 32;
constexpr int kMirrorRows = 8;

__global__ void mirror_lower_kernel(double* c, int64_t n, int64_t ldc) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kMirrorTile + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kMirrorTile + threadIdx.y;
  if (col >= n) return;
  for (int64_t row = row0; row < row0 + kMirrorTile && row < n; row += kMirrorRows) {
    if (row > col) c[row * ldc + col] = c[col * ldc + row];  // (col, row) ← (row, col)
  }
}

struct EigGroup {
  int64_t first;  // index of the group's first matrix in the batch
  int64_t count;
  int64_t dims[kRankGroup];
};

constexpr int kRankThreads = 64;

__device__ void store(const RankOut& out, int64_t i, const RankValues& r) {
  out.effective_rank[i] = r.effective_rank;
  out.approximate_rank[i] = r.approximate_rank;
  out.abs_approximate_rank[i] = r.abs_approximate_rank;
  out.stable_rank[i] = r.stable_rank;
}

// A failed solve (info ≠ 0) or a flagged non-finite input leaves matrix i without measures.
__device__ bool undefined_at(const int* info, const int* nonfinite, int64_t i) {
  return (info != nullptr && info[i] != 0) || (nonfinite != nullptr && nonfinite[i] != 0);
}

__global__ void __launch_bounds__(kRankThreads)
    rank_from_eigenvalues_kernel(const double* w, int64_t n, const __grid_constant__ EigGroup grp, const int* info,
                                 const int* nonfinite, double prop, const __grid_constant__ RankOut out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= grp.count) return;
  const int64_t i = grp.first + t;
  store(out, i, undefined_at(info, nonfinite, i) ? undefined_rank_values()
                                                 : rank_values_from_eigenvalues(w + i * n, n, grp.dims[t], prop));
}

__global__ void __launch_bounds__(kRankThreads)
    rank_from_singular_values_kernel(const double* sigma, int64_t k, int64_t batch, const int* info,
                                     const int* nonfinite, double prop, const __grid_constant__ RankOut out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  store(out, i, undefined_at(info, nonfinite, i) ? undefined_rank_values()
                                                 : rank_values_from_singular_values(sigma + i * k, k, prop));
}

// One block per matrix: every thread scans its share (stopping at its first non-finite value),
// the block agrees with __syncthreads_or, then a flagged matrix is zeroed by the same threads.
constexpr int kNonfiniteThreads = 256;

__global__ void __launch_bounds__(kNonfiniteThreads)
    zero_nonfinite_kernel(double* a, int64_t count, int64_t stride, int* nonfinite) {
  double* m = a + static_cast<int64_t>(blockIdx.x) * stride;
  bool bad = false;
  for (int64_t i = threadIdx.x; i < count && !bad; i += blockDim.x) bad = !is_finite(m[i]);
  const bool any = __syncthreads_or(bad ? 1 : 0) != 0;
  if (threadIdx.x == 0) nonfinite[blockIdx.x] = any ? 1 : 0;
  if (!any) return;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) m[i] = 0.0;
}

bool out_ok(const RankOut& o) {
  return o.effective_rank != nullptr && o.approximate_rank != nullptr && o.abs_approximate_rank != nullptr &&
         o.stable_rank != nullptr;
}

int64_t dim_of(const EigvalsArgs& a, int64_t i) { return a.dims != nullptr ? a.dims[i] : a.n; }

RankStatus check_eigvals_args(const EigvalsArgs& a) {
  if (a.n < 0 || a.batch < 0) return invalid("eigvals: n and batch must be >= 0");
  if (a.handle == nullptr) return invalid("eigvals: null cuSOLVER handle");
  if (a.batch > 0 && a.n > 0 && (a.a == nullptr || a.w == nullptr)) return invalid("eigvals: null a or w");
  if (a.batch > 0 && a.info == nullptr) return invalid("eigvals: null info");
  if (a.route != EigRoute::kAuto && a.route != EigRoute::kBatched && a.route != EigRoute::kPerMatrix) {
    return invalid("eigvals: unknown route");
  }
  for (int64_t i = 0; a.dims != nullptr && i < a.batch; ++i) {
    if (a.dims[i] < 0 || a.dims[i] > a.n) return invalid("eigvals: dims[i] must be in [0, n]");
  }
  return ok_status();
}

}  // namespace

const char* rank_status_library(const RankStatus& s) {
  switch (s.kind) {
    case RankStatus::kOk: return "none";
    case RankStatus::kInvalidValue: return "argument";
    case RankStatus::kCuda: return "CUDA";
    case RankStatus::kCublas: return "cuBLAS";
    case RankStatus::kCusolver: return "cuSOLVER";
  }
  return "?";
}

const char* rank_status_name(const RankStatus& s) {
  switch (s.kind) {
    case RankStatus::kOk: return "success";
    case RankStatus::kInvalidValue: return "invalid argument";
    case RankStatus::kCuda: return cudaGetErrorString(static_cast<cudaError_t>(s.code));
    case RankStatus::kCublas: return cublasGetStatusString(static_cast<cublasStatus_t>(s.code));
    case RankStatus::kCusolver:
      switch (static_cast<cusolverStatus_t>(s.code)) {
        case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
        case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
        case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
        case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
        case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
        case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
        case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
        default: return "cuSOLVER error";
      }
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------

RankStatus cublas_use_stream(cublasHandle_t handle, cudaStream_t stream, bool* changed) {
  if (changed != nullptr) *changed = false;
  if (handle == nullptr) return invalid("cublas_use_stream: null handle");
  cudaStream_t current = nullptr;
  TS_RANK_TRY(from_cublas(cublasGetStream(handle, &current), "cublasGetStream"));
  if (current == stream) return ok_status();
  TS_RANK_TRY(from_cublas(cublasSetStream(handle, stream), "cublasSetStream"));
  if (changed != nullptr) *changed = true;
  return ok_status();
}

RankStatus gram_update_launch(cublasHandle_t handle, const double* phi, int64_t rows, int64_t cols,
                              GramSide side, double beta, double* c, int64_t ldc, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return invalid("gram_update: rows and cols must be >= 0");
  if (side != GramSide::kUnits && side != GramSide::kRows) return invalid("gram_update: unknown side");
  const int64_t n = side == GramSide::kUnits ? cols : rows;
  const int64_t k = side == GramSide::kUnits ? rows : cols;
  if (n == 0) return ok_status();
  if (ldc < n) return invalid("gram_update: ldc must be >= n");
  if (handle == nullptr || c == nullptr) return invalid("gram_update: null handle or c");
  if (k > 0 && phi == nullptr) return invalid("gram_update: null phi");
  if (n > static_cast<int64_t>(kMirrorTile) * 65535) return invalid("gram_update: n too large for the grid");

  TS_RANK_TRY(cublas_use_stream(handle, stream));
  cublasPointerMode_t mode;
  TS_RANK_TRY(from_cublas(cublasGetPointerMode(handle, &mode), "cublasGetPointerMode"));
  if (mode != CUBLAS_POINTER_MODE_HOST) {
    TS_RANK_TRY(from_cublas(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode"));
  }
  // Column-major, the row-major Φ buffer is Φᵀ (cols × rows, ld = cols): ΦᵀΦ = A·Aᵀ (no
  // transpose, k = rows), ΦΦᵀ = Aᵀ·A (transpose, k = cols).
  const double alpha = 1.0;
  const cublasOperation_t op = side == GramSide::kUnits ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasStatus_t st = cublasDsyrk_64(handle, CUBLAS_FILL_MODE_LOWER, op, n, k, &alpha, phi,
                                           std::max<int64_t>(cols, 1), &beta, c, ldc);
  if (mode != CUBLAS_POINTER_MODE_HOST) {
    TS_RANK_TRY(from_cublas(cublasSetPointerMode(handle, mode), "cublasSetPointerMode"));
  }
  TS_RANK_TRY(from_cublas(st, "cublasDsyrk_64"));

  const unsigned tiles = static_cast<unsigned>((n + kMirrorTile - 1) / kMirrorTile);
  mirror_lower_kernel<<<dim3(tiles, tiles), dim3(kMirrorTile, kMirrorRows), 0, stream>>>(c, n, ldc);
  return from_cuda(cudaGetLastError(), "mirror_lower_kernel");
}

// ---------------------------------------------------------------------------------------------

RankStatus eigvals_workspace(const EigvalsArgs& args, size_t* device_bytes, size_t* host_bytes) {
  if (device_bytes == nullptr || host_bytes == nullptr) return invalid("eigvals_workspace: null output");
  *device_bytes = 0;
  *host_bytes = 0;
  TS_RANK_TRY(check_eigvals_args(args));
  if (args.n == 0 || args.batch == 0) return ok_status();
  SolverParams params;
  TS_RANK_TRY(from_cusolver(params.status(), "cusolverDnCreateParams"));
  const EigRoute route = resolve_eig_route(args.route, args.n, args.max_elements_per_call);
  if (route == EigRoute::kBatched) {
    // Every call solves at most one chunk; the workspace of the largest serves them all.
    return from_cusolver(
        cusolverDnXsyevBatched_bufferSize(args.handle, params.get(), CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER,
                                          args.n, CUDA_R_64F, args.a, args.n, CUDA_R_64F, args.w, CUDA_R_64F,
                                          device_bytes, host_bytes,
                                          syev_batched_chunk(args.n, args.batch, args.max_elements_per_call)),
        "cusolverDnXsyevBatched_bufferSize");
  }
  // One workspace serves every matrix: the largest need over the distinct sizes.
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < args.batch; ++i) {
    if (dim_of(args, i) > 0) sizes.push_back(dim_of(args, i));
  }
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  for (const int64_t d : sizes) {
    size_t dev = 0, host = 0;
    TS_RANK_TRY(from_cusolver(cusolverDnXsyevd_bufferSize(args.handle, params.get(), CUSOLVER_EIG_MODE_NOVECTOR,
                                                          CUBLAS_FILL_MODE_UPPER, d, CUDA_R_64F, args.a, args.n,
                                                          CUDA_R_64F, args.w, CUDA_R_64F, &dev, &host),
                              "cusolverDnXsyevd_bufferSize"));
    *device_bytes = std::max(*device_bytes, dev);
    *host_bytes = std::max(*host_bytes, host);
  }
  return ok_status();
}

RankStatus eigvals_launch(const EigvalsArgs& args, void* device_ws, size_t device_bytes, void* host_ws,
                          size_t host_bytes, cudaStream_t stream) {
  TS_RANK_TRY(check_eigvals_args(args));
  if (args.batch == 0) return ok_status();
  TS_RANK_TRY(from_cusolver(cusolverDnSetStream(args.handle, stream), "cusolverDnSetStream"));
  const EigRoute route = resolve_eig_route(args.route, args.n, args.max_elements_per_call);
  if (args.n == 0 || route == EigRoute::kPerMatrix) {
    // Matrices of size 0 are not solved: their info must still read 0.
    TS_RANK_TRY(from_cuda(cudaMemsetAsync(args.info, 0, sizeof(int) * static_cast<size_t>(args.batch), stream),
                          "cudaMemsetAsync(info)"));
  }
  if (args.n == 0) return ok_status();

  SolverParams params;
  TS_RANK_TRY(from_cusolver(params.status(), "cusolverDnCreateParams"));
  if (route == EigRoute::kBatched) {
    const int64_t chunk = syev_batched_chunk(args.n, args.batch, args.max_elements_per_call);
    for (int64_t first = 0; first < args.batch; first += chunk) {
      const int64_t count = std::min(chunk, args.batch - first);
      TS_RANK_TRY(from_cusolver(
          cusolverDnXsyevBatched(args.handle, params.get(), CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, args.n,
                                 CUDA_R_64F, args.a + first * args.n * args.n, args.n, CUDA_R_64F,
                                 args.w + first * args.n, CUDA_R_64F, device_ws, device_bytes, host_ws, host_bytes,
                                 args.info + first, count),
          "cusolverDnXsyevBatched"));
    }
    return ok_status();
  }
  // Per matrix: the leading n − d eigenvalue slots stand for the padding's zeros.
  TS_RANK_TRY(from_cuda(cudaMemsetAsync(args.w, 0, sizeof(double) * static_cast<size_t>(args.batch * args.n), stream),
                        "cudaMemsetAsync(w)"));
  for (int64_t i = 0; i < args.batch; ++i) {
    const int64_t d = dim_of(args, i);
    if (d == 0) continue;
    TS_RANK_TRY(from_cusolver(
        cusolverDnXsyevd(args.handle, params.get(), CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, d,
                         CUDA_R_64F, args.a + i * args.n * args.n, args.n, CUDA_R_64F,
                         args.w + i * args.n + (args.n - d), CUDA_R_64F, device_ws, device_bytes, host_ws, host_bytes,
                         args.info + i),
        "cusolverDnXsyevd"));
  }
  return ok_status();
}

// ---------------------------------------------------------------------------------------------

RankStatus svdvals_workspace(const SvdvalsArgs& args, size_t* device_bytes) {
  if (device_bytes == nullptr) return invalid("svdvals_workspace: null output");
  *device_bytes = 0;
  if (args.m < 0 || args.n < 0) return invalid("svdvals: m and n must be >= 0");
  if (args.m > INT_MAX || args.n > INT_MAX) return invalid("svdvals: m and n must fit in int32 for gesvdj");
  if (args.handle == nullptr) return invalid("svdvals: null cuSOLVER handle");
  if (args.m == 0 || args.n == 0) return ok_status();
  GesvdjParams params;
  TS_RANK_TRY(from_cusolver(params.status(), "cusolverDnCreateGesvdjInfo"));
  const int m = static_cast<int>(args.m), n = static_cast<int>(args.n);
  int lwork = 0;
  TS_RANK_TRY(from_cusolver(cusolverDnDgesvdj_bufferSize(args.handle, CUSOLVER_EIG_MODE_NOVECTOR, 1, m, n, args.a, m,
                                                         args.s, nullptr, m, nullptr, n, &lwork, params.get()),
                            "cusolverDnDgesvdj_bufferSize"));
  *device_bytes = sizeof(double) * static_cast<size_t>(lwork);
  return ok_status();
}

RankStatus svdvals_launch(const SvdvalsArgs& args, void* device_ws, size_t device_bytes, cudaStream_t stream) {
  if (args.m < 0 || args.n < 0) return invalid("svdvals: m and n must be >= 0");
  if (args.m > INT_MAX || args.n > INT_MAX) return invalid("svdvals: m and n must fit in int32 for gesvdj");
  if (args.handle == nullptr || args.info == nullptr) return invalid("svdvals: null handle or info");
  if (args.m > 0 && args.n > 0 && (args.a == nullptr || args.s == nullptr)) return invalid("svdvals: null a or s");
  if (device_bytes / sizeof(double) > static_cast<size_t>(INT_MAX)) return invalid("svdvals: workspace too large");
  TS_RANK_TRY(from_cusolver(cusolverDnSetStream(args.handle, stream), "cusolverDnSetStream"));
  if (args.m == 0 || args.n == 0) {
    return from_cuda(cudaMemsetAsync(args.info, 0, sizeof(int), stream), "cudaMemsetAsync(info)");
  }
  GesvdjParams params;
  TS_RANK_TRY(from_cusolver(params.status(), "cusolverDnCreateGesvdjInfo"));
  const int m = static_cast<int>(args.m), n = static_cast<int>(args.n);
  return from_cusolver(cusolverDnDgesvdj(args.handle, CUSOLVER_EIG_MODE_NOVECTOR, 1, m, n, args.a, m, args.s, nullptr,
                                         m, nullptr, n, static_cast<double*>(device_ws),
                                         static_cast<int>(device_bytes / sizeof(double)), args.info, params.get()),
                       "cusolverDnDgesvdj");
}

// ---------------------------------------------------------------------------------------------

RankStatus zero_nonfinite_launch(double* a, int64_t count, int64_t stride, int64_t batch, int* nonfinite,
                                 cudaStream_t stream) {
  if (count < 0 || batch < 0) return invalid("zero_nonfinite: count and batch must be >= 0");
  if (batch == 0) return ok_status();
  if (nonfinite == nullptr || (count > 0 && a == nullptr)) return invalid("zero_nonfinite: null pointer");
  if (batch > 1 && stride < count) return invalid("zero_nonfinite: stride must be >= count");
  if (batch > static_cast<int64_t>(INT_MAX)) return invalid("zero_nonfinite: batch too large for the grid");
  zero_nonfinite_kernel<<<static_cast<unsigned>(batch), kNonfiniteThreads, 0, stream>>>(a, count, stride, nonfinite);
  return from_cuda(cudaGetLastError(), "zero_nonfinite_kernel");
}

RankStatus rank_from_eigenvalues_launch(const double* w, int64_t n, int64_t batch, const int64_t* dims,
                                        const int* info, const int* nonfinite, double prop, const RankOut& out,
                                        cudaStream_t stream) {
  if (n < 0 || batch < 0) return invalid("rank_from_eigenvalues: n and batch must be >= 0");
  if (batch == 0) return ok_status();
  if (!out_ok(out) || (n > 0 && w == nullptr)) return invalid("rank_from_eigenvalues: null pointer");
  for (int64_t i = 0; dims != nullptr && i < batch; ++i) {
    if (dims[i] < 0 || dims[i] > n) return invalid("rank_from_eigenvalues: dims[i] must be in [0, n]");
  }
  for (int64_t first = 0; first < batch; first += kRankGroup) {
    EigGroup grp;
    grp.first = first;
    grp.count = std::min(kRankGroup, batch - first);
    for (int64_t t = 0; t < grp.count; ++t) grp.dims[t] = dims != nullptr ? dims[first + t] : n;
    const unsigned blocks = static_cast<unsigned>((grp.count + kRankThreads - 1) / kRankThreads);
    rank_from_eigenvalues_kernel<<<blocks, kRankThreads, 0, stream>>>(w, n, grp, info, nonfinite, prop, out);
    TS_RANK_TRY(from_cuda(cudaGetLastError(), "rank_from_eigenvalues_kernel"));
  }
  return ok_status();
}

RankStatus rank_from_singular_values_launch(const double* sigma, int64_t k, int64_t batch, const int* info,
                                            const int* nonfinite, double prop, const RankOut& out,
                                            cudaStream_t stream) {
  if (k < 0 || batch < 0) return invalid("rank_from_singular_values: k and batch must be >= 0");
  if (batch == 0) return ok_status();
  if (!out_ok(out) || (k > 0 && sigma == nullptr)) return invalid("rank_from_singular_values: null pointer");
  if (batch > static_cast<int64_t>(INT_MAX) * kRankThreads) return invalid("rank_from_singular_values: batch too large");
  const unsigned blocks = static_cast<unsigned>((batch + kRankThreads - 1) / kRankThreads);
  rank_from_singular_values_kernel<<<blocks, kRankThreads, 0, stream>>>(sigma, k, batch, info, nonfinite, prop,
                                                                        out);
  return from_cuda(cudaGetLastError(), "rank_from_singular_values_kernel");
}

}  // namespace cuda
}  // namespace trainscope
