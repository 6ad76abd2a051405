// trainscope — the curvature family (SPEC.md §6; Cockpit v1.0.2's HessMaxEV, HessTrace, TICDiag,
// TICTrace) for LibTorch users, from a closure that recomputes the loss with a graph:
//
//   trainscope::CurvatureStats c = trainscope::curvature_stats(
//       [&] { return per_sample_loss(model->forward(x), y); },   // [B] per-sample losses, or the mean
//       params, {});
//   c.hess_max_ev, c.hess_trace, c.hess_trace_stderr, c.tic_diag, c.tic_trace   // 0-d float64
//
// L is the mean of the closure's per-sample losses (or the 0-d loss it returns). With H = ∇²L,
// h = diag(H) and S_j = Σᵢ (∂ℓᵢ/∂θ_j)² (exact: one backward pass per sample):
//   hess_max_ev  the largest eigenvalue of H from Hessian-vector products from a uniform [0, 1)
//                start, stopped when consecutive estimates agree to atol + rtol·|λ| (at most
//                max_iter products; the last estimate otherwise, a lower bound): the largest Ritz
//                value of the Lanczos iteration (MaxEvSolver::kLanczos), or Cockpit's power
//                iteration (kPower; a negative dominant eigenvalue is followed by a shifted one)
//   hess_trace   Σ_j h_j;  tic_diag = Σ_j (S_j/B) / (h_j + 1e-7);  tic_trace = (Σ S_j/B) / (Σ h_j + 1e-7)
// h is exact (CurvatureMethod::kExact: one Hessian-vector product per parameter element, up to
// max_params elements) or estimated by Hutchinson (kHutchinson: `samples` Rademacher probes,
// unbiased; hess_trace_stderr is the probes' sample standard deviation / √samples). The TIC pair
// needs per-sample losses (NaN from a 0-d loss). Numerical trouble gives NaN, never an error;
// nothing is written to the parameters' .grad. The same definitions as the Python module
// trainscope.curvature.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace trainscope {

enum class CurvatureMethod { kHutchinson, kExact };
CurvatureMethod parse_curvature_method(const std::string& name);  // "hutchinson", "exact"

// How hess_max_ev is estimated: the Lanczos iteration (after as many products never below the
// power iteration's estimate, and about half the products to Cockpit's stop on its 3c3d net), or
// Cockpit's power iteration.
enum class MaxEvSolver { kLanczos, kPower };
MaxEvSolver parse_max_ev_solver(const std::string& name);  // "lanczos", "power"

struct CurvatureOptions {
  CurvatureMethod method = CurvatureMethod::kHutchinson;
  int64_t samples = 100;       // Hutchinson probes
  MaxEvSolver solver = MaxEvSolver::kLanczos;
  int64_t max_iter = 100;      // hess_max_ev's Hessian-vector products
  double rtol = 1e-3, atol = 1e-6;
  int64_t max_params = 10000;  // the exact method's limit on parameter elements
  uint64_t seed = 0;           // the start vector and the probes
  bool max_ev = true;          // compute hess_max_ev
  bool diag = true;            // compute hess_trace (and, with per-sample losses, the TIC pair)
};

struct CurvatureStats {
  at::Tensor hess_max_ev, hess_trace, hess_trace_stderr, tic_diag, tic_trace;  // 0-d float64, NaN when not computed
};

// Bad options (samples, max_iter or max_params < 1; the exact method over max_params elements; a
// parameter without requires_grad) raise c10::Error naming them; the loss's numerical trouble
// gives NaN.
CurvatureStats curvature_stats(const std::function<at::Tensor()>& loss, const std::vector<at::Tensor>& params,
                               const CurvatureOptions& options = {});

}  // namespace trainscope
