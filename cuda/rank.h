// Rank measures (SPEC.md §3): the torch-free pieces shared by the CUDA launchers (rank.cu) and the
// CPU implementation (src/rank.cpp).
//
//  - rank_values(): effective rank, approximate rank, absolute approximate rank and stable rank of
//    k singular values in descending order, in float64 and a fixed summation order, so the same
//    singular values give the same bits on every call. An accessor serves σ from an SVD
//    (DescendingSigma) and σ = sqrt(λ) from the ascending eigenvalues of a Gram matrix
//    (EigenSigma).
//  - The eigenvalue floor: the eigensolver and the Gram product resolve λ only down to about
//    dim · 2⁻⁵² · λ_max, so an eigenvalue at or below that level counts as zero. Without it a
//    rank-deficient matrix would get thousands of spurious σ ≈ 1e-8 σ_max from rounding, and those
//    move the effective rank of a rank-1 matrix of width 4096 by more than 1e-3.
//  - Non-finite matrices: flagged and zeroed before the solve (zero_nonfinite_launch), so that
//    the solver never sees a NaN and the flag turns the matrix's measures undefined.
//  - Launchers: the Gram update (cuBLAS syrk, float64), the batched symmetric eigensolve
//    (cuSOLVER, eigenvalues only), the SVD (cuSOLVER gesvdj) and a kernel turning eigenvalues or
//    singular values into RankValues per matrix. They take raw device pointers, int64 sizes, the
//    caller's library handles and stream; they never synchronise and return a RankStatus.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(TRAINSCOPE_WITH_CUDA)
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>
#endif

#include "cuda/common.h"

namespace trainscope {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// The four measures of one matrix.

struct RankValues {
  double effective_rank;         // exp(−Σ p ln p), p = σ / Σσ
  int64_t approximate_rank;      // smallest k with Σ_{i≤k} σᵢ² / Σσ² ≥ prop
  int64_t abs_approximate_rank;  // smallest k with Σ_{i≤k} σᵢ / Σσ ≥ prop
  double stable_rank;            // Σσ² / σ_max²
};

constexpr double kEps52 = 2.220446049250313080847e-16;  // 2⁻⁵², float64 rounding level

// Eigenvalues of a dim × dim Gram matrix at or below this count as zero (see the top comment).
// λ_max ≤ 0 (a zero matrix, or rounding below zero) gives 0: only positive eigenvalues count.
TS_HD double eigen_floor(int64_t dim, double lambda_max) {
  return static_cast<double>(dim) * kEps52 * (lambda_max > 0.0 ? lambda_max : 0.0);
}

// σ of an eigenvalue against the floor; NaN stays NaN so a broken input shows in the result.
TS_HD double sigma_of_eigenvalue(double lambda, double floor) {
  if (lambda != lambda) return lambda;
  return lambda > floor ? sqrt(lambda) : 0.0;
}

// σ_i = p[i · stride], i = 0..k−1, already descending (an SVD's output).
struct DescendingSigma {
  const double* p;
  int64_t stride;
  TS_HD double operator()(int64_t i) const { return p[i * stride]; }
};

// σ_i = sqrt of the i-th largest of `dim` ascending eigenvalues w[0..dim) (stride apart), the
// floor taken at the largest one.
struct EigenSigma {
  const double* w;
  int64_t dim;
  int64_t stride;
  double floor;
  TS_HD double operator()(int64_t i) const { return sigma_of_eigenvalue(w[(dim - 1 - i) * stride], floor); }
};

// The top `dim` of n ascending eigenvalues w[0..n) (a padded solve puts the padding's zeros
// first): σ of a dim × dim Gram matrix.
TS_HD EigenSigma eigen_sigma(const double* w, int64_t n, int64_t dim) {
  EigenSigma s;
  s.w = w + (n - dim);
  s.dim = dim;
  s.stride = 1;
  s.floor = dim > 0 ? eigen_floor(dim, w[n - 1]) : 0.0;
  return s;
}

// What a matrix without a meaning gets (NaN or infinite input, a failed solve): NaN effective
// and stable rank, −1 for both approximate ranks.
TS_HD RankValues undefined_rank_values() {
  RankValues r;
  r.effective_rank = NAN;
  r.stable_rank = NAN;
  r.approximate_rank = -1;
  r.abs_approximate_rank = -1;
  return r;
}

// a · b rounded once: a fused multiply-add in one sum and not in the other would break the
// exact equality of the running sum and the total that approximate ranks rely on.
TS_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// The measures of σ(0) ≥ σ(1) ≥ … ≥ σ(k−1) ≥ 0, prop in (0, 1]. Zero (or k = 0) gives all 0.
// A NaN, infinite or negative σ (or Σσ² overflowing) gives undefined_rank_values(). The running
// sums of the second pass add the same terms in the same order as the totals of the first, so
// they end exactly at the totals and every prop ≤ 1 is reached; the fallback to the count of
// nonzero σ is a guard only.
template <typename Sigma>
TS_HD RankValues rank_values(const Sigma& sigma, int64_t k, double prop) {
  double s1 = 0.0, s2 = 0.0, smax = 0.0;
  int64_t nonzero = 0;
  bool bad = false;
  for (int64_t i = 0; i < k; ++i) {
    const double s = sigma(i);
    if (!(s >= 0.0) || !is_finite(s)) {
      bad = true;
      continue;
    }
    s1 += s;
    s2 += mul_rn(s, s);
    smax = s > smax ? s : smax;
    nonzero += s > 0.0 ? 1 : 0;
  }
  if (bad || !is_finite(s2) || !is_finite(s1)) return undefined_rank_values();
  RankValues r;
  r.effective_rank = 0.0;
  r.stable_rank = 0.0;
  r.approximate_rank = 0;
  r.abs_approximate_rank = 0;
  if (s1 == 0.0) return r;

  double entropy = 0.0, c1 = 0.0, c2 = 0.0;
  int64_t k1 = 0, k2 = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double s = sigma(i);
    if (s > 0.0) {
      const double p = s / s1;
      entropy -= mul_rn(p, log(p));
    }
    c1 += s;
    c2 += mul_rn(s, s);
    if (k1 == 0 && c1 / s1 >= prop) k1 = i + 1;
    if (k2 == 0 && c2 / s2 >= prop) k2 = i + 1;
  }
  r.effective_rank = exp(entropy);
  r.approximate_rank = k2 > 0 ? k2 : nonzero;
  r.abs_approximate_rank = k1 > 0 ? k1 : nonzero;
  r.stable_rank = s2 / mul_rn(smax, smax);
  return r;
}

// σ[0..k), descending.
TS_HD RankValues rank_values_from_singular_values(const double* sigma, int64_t k, double prop) {
  return rank_values(DescendingSigma{sigma, 1}, k, prop);
}

// A dim × dim Gram matrix's eigenvalues, the top `dim` of n ascending values w[0..n).
TS_HD RankValues rank_values_from_eigenvalues(const double* w, int64_t n, int64_t dim, double prop) {
  return rank_values(eigen_sigma(w, n, dim), dim, prop);
}

// ---------------------------------------------------------------------------------------------
// Matrices holding NaN or ±Inf. Their measures have no meaning, and a solver fed one may fail,
// run to its sweep limit or return values with a success status, so such a matrix is replaced by
// zeros before the solve and flagged, and the flag makes the rank kernels (and the CPU path)
// write undefined_rank_values() for it. On the device the flags stay on the device.

// Whether every one of a[0..count) is finite.
TS_HD bool all_finite(const double* a, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!is_finite(a[i])) return false;
  }
  return true;
}

// The host side of zero_nonfinite_launch for one matrix: whether a[0..count) holds a NaN or ±Inf,
// and if so a[0..count) zeroed.
inline bool zero_if_nonfinite(double* a, int64_t count) {
  if (all_finite(a, count)) return false;
  for (int64_t i = 0; i < count; ++i) a[i] = 0.0;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Plain values the launchers below take: the side a Gram matrix is formed on (also the CPU
// path's), and the routes of the batched eigensolve (eigvals_launch).
enum class GramSide : int32_t { kUnits = 0 /* ΦᵀΦ [cols, cols] */, kRows = 1 /* ΦΦᵀ [rows, rows] */ };

// Routes of the batched eigensolve:
//  - kBatched: one cusolverDnXsyevBatched call on the padded [batch, n, n] batch;
//  - kPerMatrix: cusolverDnXsyevd on each matrix's own dims[i] block (no work on padding; w's
//    leading n − dims[i] entries are set to 0);
//  - kAuto: kBatched for n ≤ kSyevBatchedMaxN, else kPerMatrix. The batched routine targets many
//    small matrices; at a few hundred and more the divide-and-conquer syevd per matrix is the
//    faster one, and it skips the padding. Tune the constant on a GPU with bench/bench_rank.py.
// cusolverDnXsyevBatched requires n · lda · batch ≤ INT32_MAX elements per call: a longer batch
// is solved in several calls of at most that many (syev_batched_chunk), and a matrix too large
// for one call on its own (n² > INT32_MAX) takes the per-matrix route whatever was asked.
enum class EigRoute : int32_t { kAuto = 0, kBatched = 1, kPerMatrix = 2 };
constexpr int64_t kSyevBatchedMaxN = 32;
constexpr int64_t kSyevBatchedMaxElements = 2147483647;  // INT32_MAX

// Matrices per cusolverDnXsyevBatched call for n × n matrices (lda = n) under a limit of
// max_elements per call (≤ 0: kSyevBatchedMaxElements): at most `batch`, at least 1 when one
// matrix fits, 0 when it does not.
TS_HD int64_t syev_batched_chunk(int64_t n, int64_t batch, int64_t max_elements) {
  const int64_t limit = max_elements > 0 ? max_elements : kSyevBatchedMaxElements;
  if (n <= 0 || batch <= 0) return batch > 0 ? batch : 0;
  if (n > limit / n) return 0;
  const int64_t per_call = limit / (n * n);
  return per_call < batch ? per_call : batch;
}

inline EigRoute resolve_eig_route(EigRoute route, int64_t n, int64_t max_elements = 0) {
  if (syev_batched_chunk(n, 1, max_elements) == 0) return EigRoute::kPerMatrix;
  if (route != EigRoute::kAuto) return route;
  return n <= kSyevBatchedMaxN ? EigRoute::kBatched : EigRoute::kPerMatrix;
}

// ---------------------------------------------------------------------------------------------
// The CUDA launchers, in a build with CUDA only: everything above is plain C++ too.
#if defined(TRAINSCOPE_WITH_CUDA)

// Status of a launcher: which library failed, with its own status code.
struct RankStatus {
  enum Kind : int32_t { kOk = 0, kInvalidValue = 1, kCuda = 2, kCublas = 3, kCusolver = 4 };
  Kind kind = kOk;
  int32_t code = 0;        // cudaError_t, cublasStatus_t or cusolverStatus_t
  const char* what = "";   // the call or check that failed
  bool ok() const { return kind == kOk; }
};

// Pieces of an error message (static strings).
const char* rank_status_library(const RankStatus& s);  // "CUDA", "cuBLAS", "cuSOLVER", "argument"
const char* rank_status_name(const RankStatus& s);     // the status's name (or the CUDA error's)

// ---------------------------------------------------------------------------------------------
// Gram update.

// Puts a cuBLAS handle on `stream` only when it is on another one: cublasSetStream also resets
// the handle's workspace to cuBLAS's default pool, which would discard the workspace PyTorch
// configured on the handle it lends (at::cuda::getCurrentCUDABlasHandle, already on the current
// stream). *changed (optional) tells whether the stream was set.
RankStatus cublas_use_stream(cublasHandle_t handle, cudaStream_t stream, bool* changed = nullptr);

// phi is a row-major [rows, cols] float64 matrix (contiguous, device); c is the n × n output
// (n = cols for ΦᵀΦ, rows for ΦΦᵀ: GramSide) with rows ldc ≥ n apart (ldc > n: the leading
// block of a zero-padded batch matrix), row- or column-major alike since it is symmetric.
// c ← ΦᵀΦ (or ΦΦᵀ) + beta · c, beta = 0 (c's old content ignored, NaN included) or 1
// (accumulate). Only the lower triangle is formed by syrk; a small kernel mirrors it, so c is the
// full symmetric matrix afterwards. Puts `handle` on `stream` (see cublas_use_stream) and keeps
// its pointer mode.
RankStatus gram_update_launch(cublasHandle_t handle, const double* phi, int64_t rows, int64_t cols,
                              GramSide side, double beta, double* c, int64_t ldc, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Batched symmetric eigensolve, eigenvalues only. a is [batch, n, n] float64 (device,
// contiguous, symmetric; overwritten; only the row-major lower triangle is read, as
// torch.linalg.eigvalsh's default); matrix i is a dims[i] × dims[i] Gram matrix in its
// leading block, zero elsewhere (zero padding). On return w[i, :] holds n values ascending whose
// top dims[i] are matrix i's eigenvalues (the others are the padding's zeros), and info[i] is the
// solver's status of matrix i (0: converged), left on the device. Routes: EigRoute above.
struct EigvalsArgs {
  cusolverDnHandle_t handle;
  double* a;              // device [batch, n, n]
  int64_t n;
  int64_t batch;
  const int64_t* dims;    // host [batch], each in [0, n]; null: every matrix is n × n
  double* w;              // device [batch, n]
  int* info;              // device [batch]
  EigRoute route;
  int64_t max_elements_per_call = 0;  // kBatched: elements of `a` per solver call (≤ 0: INT32_MAX)
};

// Workspace the launch needs (bytes on the device and on the host) for these arguments.
RankStatus eigvals_workspace(const EigvalsArgs& args, size_t* device_bytes, size_t* host_bytes);

// Enqueues the solve on `stream` (set on the handle). The host workspace must stay valid until
// the call returns. Waits for nothing on the batched route (cuSOLVER's syevBatched); the
// per-matrix route's syevd may wait inside cuSOLVER (README, "What waits for the device").
RankStatus eigvals_launch(const EigvalsArgs& args, void* device_ws, size_t device_bytes, void* host_ws,
                          size_t host_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Matrix b of a batch, a[b · stride .. b · stride + count) (device, float64), for b < batch: when
// it holds a NaN or ±Inf it is zeroed and nonfinite[b] = 1, else nonfinite[b] = 0 (device, int).
// One block per matrix; run before the solver, on the solver's input.
RankStatus zero_nonfinite_launch(double* a, int64_t count, int64_t stride, int64_t batch, int* nonfinite,
                                 cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Singular values of one m × n column-major float64 matrix (device, lda = m, overwritten) by
// cuSOLVER's Jacobi SVD (gesvdj), into s[0..min(m, n)) descending; info (device, one int) is
// gesvdj's status (0: converged). m and n must fit in int32 (gesvdj's interface).
struct SvdvalsArgs {
  cusolverDnHandle_t handle;
  double* a;
  int64_t m;
  int64_t n;
  double* s;
  int* info;
};

RankStatus svdvals_workspace(const SvdvalsArgs& args, size_t* device_bytes);
RankStatus svdvals_launch(const SvdvalsArgs& args, void* device_ws, size_t device_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// RankValues of each matrix of a batch, one thread per matrix, into four device arrays of
// `batch` entries.
struct RankOut {
  double* effective_rank;
  int64_t* approximate_rank;
  int64_t* abs_approximate_rank;
  double* stable_rank;
};

// `info` (device [batch], or null) is the solver's status per matrix and `nonfinite` (device
// [batch], or null) the flags of zero_nonfinite_launch: a matrix whose info or flag is not 0 gets
// undefined_rank_values(), so a failed solve or a NaN input shows in the results without a host
// check.
//
// From eigensolve output w [batch, n] (as eigvals_launch leaves it) and the host sizes dims
// (null: all n). The sizes travel as kernel parameters, kRankGroup per launch.
constexpr int64_t kRankGroup = 256;
RankStatus rank_from_eigenvalues_launch(const double* w, int64_t n, int64_t batch, const int64_t* dims,
                                        const int* info, const int* nonfinite, double prop, const RankOut& out,
                                        cudaStream_t stream);

// From singular values sigma [batch, k] (each row descending, zeros allowed).
RankStatus rank_from_singular_values_launch(const double* sigma, int64_t k, int64_t batch, const int* info,
                                            const int* nonfinite, double prop, const RankOut& out,
                                            cudaStream_t stream);
#endif  // TRAINSCOPE_WITH_CUDA

}  // namespace cuda
}  // namespace trainscope
