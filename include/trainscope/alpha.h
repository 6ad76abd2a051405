// trainscope — the normalised step length α (SPEC.md §6; Cockpit v1.0.2's Alpha), the
// noise-aware quadratic fit it rests on, and the reduction of one point's per-sample data.
//
// For the update d = θ_{t+1} − θ_t of one optimizer step, t = ‖d‖, and two points — the start
// (θ_t, batch t) and the end (θ_{t+1}, batch t+1) — each reduced by alpha_point_moments to
// [f, σ_f², f', σ_f'²]: the mean and ddof-1 variance of the per-sample losses ℓᵢ and of
// qᵢ = gᵢ·d / t (gᵢ = ∇ℓᵢ at that point):
//
//   at::Tensor s = trainscope::alpha_point_moments(losses0, proj0, t);   // at the start
//   at::Tensor e = trainscope::alpha_point_moments(losses1, proj1, t);   // at the end
//   at::Tensor a = trainscope::alpha_from_moments(t, s, e);             // 0-d float64
//
// The fit: f(x) = μ₀ + μ₁x + μ₂x² by weighted least squares (weights 1/variance; an exactly zero
// variance becomes 1e-10) to f(0), f(t), f'(0), f'(t), solved in closed form: the four
// observations have one consistency condition, δ = 2(f(t) − f(0)) − t(f'(0) + f'(t)) = 0 for a
// quadratic, and the fit moves each observation against δ in proportion to its variance.
// α = 2t/ᾱ − 1 with ᾱ = −μ₁/μ₂; −1 for a concave fit (μ₂ < 0). α < 0: the step undershot the
// minimum of the fit, ≈ 0: it reached it, > 0: it overshot. NaN (never an error) for t = 0 or a
// non-finite input or coefficient. Float64 tensors on the inputs' device; nothing waits for the
// GPU.
#pragma once

#include <ATen/ATen.h>

namespace trainscope {

// A variance exactly 0 becomes this before the fit (Cockpit's ε).
constexpr double kAlphaVarianceFloor = 1e-10;

// [4] float64: f, σ_f², f', σ_f'² of one point (NaN variances for one sample). losses and
// projections [B] (projections not divided by t), t a 0-d tensor.
at::Tensor alpha_point_moments(const at::Tensor& losses, const at::Tensor& projections, const at::Tensor& t);

// μ [..., 3] of the fit: fs = (f(0), f(t)), dfs = (f'(0), f'(t)) and their variances, each
// [..., 2]; t broadcasts with the leading dims.
at::Tensor fit_quadratic(const at::Tensor& t, const at::Tensor& fs, const at::Tensor& dfs, const at::Tensor& fs_var,
                         const at::Tensor& dfs_var);

// α [...] of a fit μ [..., 3] and the step length t.
at::Tensor alpha_from_fit(const at::Tensor& mu, const at::Tensor& t);

// α of one step from the moments [4] of its start and end points.
at::Tensor alpha_from_moments(const at::Tensor& t, const at::Tensor& start, const at::Tensor& end);

}  // namespace trainscope
