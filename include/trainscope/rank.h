// trainscope — rank measures of a matrix (SPEC.md §3): effective rank, approximate rank, absolute
// approximate rank and stable rank, for one matrix, a batch, a list of matrices of different
// shapes, or a layer's representation streamed over a probe set.
//
//   trainscope::RankMeasures r = trainscope::rank_measures(phi);   // phi [N, units]: results []
//   r.effective_rank;        // float64  exp(entropy of σ / Σσ)          (Roy & Vetterli 2007)
//   r.approximate_rank;      // int64    smallest k with Σ_{i≤k} σᵢ² / Σσ² ≥ prop
//   r.abs_approximate_rank;  // int64    the same on σ / Σσ
//   r.stable_rank;           // float64  Σσ² / σ_max²
//
//   // a representation streamed batch by batch
//   trainscope::GramAccumulator acc;
//   for (const at::Tensor& acts : batches) acc.add(acts);          // [n, units] or [n, C, *spatial]
//   trainscope::RankMeasures r = trainscope::rank_measures_from_grams({acc.gram()});
//
// Two methods:
//  - kGram (default): σ² are the eigenvalues of the Gram matrix, accumulated in float64 (cuBLAS
//    syrk on CUDA) and solved by one batched symmetric eigensolve across matrices (cuSOLVER on
//    CUDA, LAPACK on the CPU); matrices of different sizes share the call by zero padding, since
//    zero eigenvalues add nothing to any measure. The Gram matrix is the smaller of ΦᵀΦ and ΦΦᵀ.
//    Eigenvalues below dim · 2⁻⁵² · λ_max (the solver's rounding level) count as zero, so
//    singular values below about sqrt(dim · 2⁻⁵²) · σ_max (≈ 1e-6 σ_max for dim = 4096) are not
//    resolved; the effect on every measure is far below SPEC.md §5's tolerance.
//  - kSvd: singular values by SVD in float64 (cuSOLVER gesvdj on CUDA), for checking and for
//    users who ask for it. Streamed, it keeps every row of Φ.
//
// A zero matrix (and a matrix with no rows or columns) has every measure 0. Results are float64 /
// int64 whatever the input dtype, on the input's device; nothing waits for the GPU.
//
// Numerical trouble is a value, never an exception: a matrix with a NaN or infinite entry (a Gram
// matrix too, wherever the entry is; with kGram also a finite Φ whose Gram matrix overflows
// float64), or whose solve did not converge, gets NaN effective and stable rank and −1 for both
// approximate ranks; the other matrices of the same call are measured as if alone. Such a matrix
// is replaced by zeros before the solver sees it, and on CUDA the check and the solver's status
// stay on the device (no synchronisation, capturable in a CUDA graph).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace trainscope {

enum class RankMethod : int32_t { kGram = 0, kSvd = 1 };

// "gram", "svd" (any case) → the method; anything else throws c10::Error naming `arg`.
RankMethod parse_rank_method(const std::string& name, const char* arg = "method");
const char* rank_method_name(RankMethod method);

struct RankOptions {
  double prop = 0.99;  // in (0, 1]: the share of Σσ² (approximate_rank) or Σσ (abs_approximate_rank)
  RankMethod method = RankMethod::kGram;
};

struct RankMeasures {
  at::Tensor effective_rank;        // float64
  at::Tensor approximate_rank;      // int64
  at::Tensor abs_approximate_rank;  // int64
  at::Tensor stable_rank;           // float64
};

// One matrix [n, m] gives 0-d results; a batch [L, n, m] gives [L] results. Float32, float64,
// bfloat16 or float16, any strides, CPU or CUDA. Bad input (fewer than 2 dimensions or more than
// 3, an integer tensor, prop outside (0, 1]) throws c10::Error naming the argument.
RankMeasures rank_measures(const at::Tensor& matrices, const RankOptions& options = {});

// A list of matrices of any shapes (weight matrices of every layer, say) on one device: [L]
// results, one batched solve.
RankMeasures rank_measures(at::TensorList matrices, const RankOptions& options = {});

// Single measures, as rank_measures(...).<field>.
at::Tensor effective_rank(const at::Tensor& matrices, RankMethod method = RankMethod::kGram);
at::Tensor approximate_rank(const at::Tensor& matrices, double prop = 0.99, RankMethod method = RankMethod::kGram);
at::Tensor abs_approximate_rank(const at::Tensor& matrices, double prop = 0.99,
                                RankMethod method = RankMethod::kGram);
at::Tensor stable_rank(const at::Tensor& matrices, RankMethod method = RankMethod::kGram);

// The measures from singular values [L, k] (or [k]), each row sorted in descending order, zeros
// allowed; float64 computation.
RankMeasures rank_measures_from_singular_values(const at::Tensor& sigma, double prop = 0.99);

// The measures of L symmetric positive semi-definite matrices (Gram matrices, any sizes, float64,
// one device) through one batched eigensolve: [L] results.
RankMeasures rank_measures_from_grams(at::TensorList grams, double prop = 0.99);

// One layer's representation Φ streamed batch by batch. Activations [n, units], or
// [n, C, *spatial] where a unit is a channel and each spatial position one more row of Φ
// (Φ = [n · Π spatial, C]). While fewer rows than units have arrived the rows are kept (float64)
// and gram() is ΦΦᵀ; from then on ΦᵀΦ [units, units] is accumulated (float64, cuBLAS syrk on
// CUDA), so memory stays at most units² doubles and the eigensolve is min(rows, units) wide.
// With RankMethod::kSvd every row is kept and rows() is Φ.
class GramAccumulator {
 public:
  explicit GramAccumulator(RankMethod method = RankMethod::kGram);
  // The first batch fixes units and device; later batches must match (c10::Error otherwise).
  void add(const at::Tensor& acts);
  // The symmetric float64 matrix whose eigenvalues are σ² of Φ: ΦΦᵀ or ΦᵀΦ, whichever is
  // smaller ([0, 0] before any row arrives). A new tensor: later add() calls leave it alone.
  at::Tensor gram() const;
  // ΦᵀΦ [units, units] in every state (what adds up across data-parallel ranks); a new tensor.
  at::Tensor unit_gram() const;
  // Φ [rows, units] float64: only while the rows are kept (kSvd, or fewer rows than units).
  at::Tensor rows() const;
  bool keeps_rows() const { return !unit_gram_.defined(); }
  // The measures of what has been added (kGram: eigenvalues of gram(); kSvd: SVD of rows()).
  RankMeasures measures(double prop = 0.99) const;
  void reset();
  int64_t observations() const { return observations_; }
  int64_t units() const { return units_; }
  RankMethod method() const { return method_; }

 private:
  RankMethod method_;
  int64_t observations_ = 0;
  int64_t units_ = -1;   // -1 before the first add
  at::Device device_ = at::Device(at::kCPU);  // fixed by the first add
  std::vector<at::Tensor> row_batches_;  // the batches' rows, float64, while rows are kept
  at::Tensor unit_gram_; // [units, units] float64 once accumulating ΦᵀΦ
};

}  // namespace trainscope
