// The curvature family (include/trainscope/curvature.h): Hessian-vector products by double
// backward through torch::autograd::grad, in float64 where it sums.
#include "trainscope/curvature.h"

#include <cmath>
#include <limits>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>

#include "src/ieee_convolutions.h"
#include "src/nvtx.h"

namespace trainscope {

CurvatureMethod parse_curvature_method(const std::string& name) {
  if (name == "hutchinson") return CurvatureMethod::kHutchinson;
  if (name == "exact") return CurvatureMethod::kExact;
  TORCH_CHECK(false, "trainscope: curvature method must be 'hutchinson' or 'exact', got '", name, "'");
}

MaxEvSolver parse_max_ev_solver(const std::string& name) {
  if (name == "lanczos") return MaxEvSolver::kLanczos;
  if (name == "power") return MaxEvSolver::kPower;
  TORCH_CHECK(false, "trainscope: solver must be 'lanczos' or 'power', got '", name, "'");
}

namespace {

constexpr double kTicEps = 1e-7;
using Tensors = std::vector<at::Tensor>;

at::Tensor nan64(const at::Device& d) {
  return at::full({}, std::numeric_limits<double>::quiet_NaN(), at::TensorOptions().dtype(at::kDouble).device(d));
}

at::Tensor dot64(const Tensors& a, const Tensors& b) {
  at::Tensor s = at::zeros({}, a[0].options().dtype(at::kDouble));
  for (size_t i = 0; i < a.size(); ++i) s = s + (a[i].to(at::kDouble) * b[i].to(at::kDouble)).sum();
  return s;
}

// H v for every parameter, from the gradients with their graph.
Tensors hvp(const Tensors& grads, const Tensors& params, const Tensors& v) {
  Tensors out = torch::autograd::grad(grads, params, v, /*retain_graph=*/true, /*create_graph=*/false,
                                      /*allow_unused=*/true);
  for (size_t i = 0; i < out.size(); ++i) {
    if (!out[i].defined()) out[i] = at::zeros_like(params[i]);
  }
  return out;
}

// Cockpit's start vector of both eigenvalue iterations: uniform [0, 1), normalised.
Tensors uniform_start(const Tensors& params, at::Generator& gen) {
  Tensors v;
  for (const at::Tensor& p : params) v.push_back(at::rand(p.sizes(), gen, p.options().device(at::kCPU)).to(p.device()));
  const at::Tensor n0 = dot64(v, v).sqrt();
  for (at::Tensor& x : v) x = x / n0.to(x.dtype());
  return v;
}

at::Tensor power_iteration(const std::function<Tensors(const Tensors&)>& matvec, const Tensors& params,
                           at::Generator& gen, const CurvatureOptions& o) {
  Tensors v = uniform_start(params, gen);
  double lam_old = std::numeric_limits<double>::infinity();
  at::Tensor lam = nan64(params[0].device());
  for (int64_t k = 0; k < o.max_iter; ++k) {
    const Tensors hv = matvec(v);
    lam = dot64(v, hv);
    const at::Tensor hv_norm = dot64(hv, hv).sqrt();
    const double lam_f = lam.item<double>(), norm_f = hv_norm.item<double>();
    if (!std::isfinite(lam_f) || !std::isfinite(norm_f)) return nan64(params[0].device());
    if (norm_f == 0.0) return lam;
    for (size_t i = 0; i < v.size(); ++i) v[i] = hv[i] / hv_norm.to(hv[i].dtype());
    if (std::abs(lam_f - lam_old) <= o.atol + o.rtol * std::abs(lam_f)) return lam;
    lam_old = lam_f;
  }
  return lam;
}

// The largest Ritz value of the Lanczos iteration from the power iteration's start (the same
// definitions as trainscope.curvature._lanczos): three vectors kept, each new one orthogonalised
// twice against the current one; stops on Cockpit's rule or an invariant Krylov space.
at::Tensor lanczos(const std::function<Tensors(const Tensors&)>& matvec, const Tensors& params, at::Generator& gen,
                   const CurvatureOptions& o) {
  const at::Device dev = params[0].device();
  Tensors v = uniform_start(params, gen), v_prev;
  at::Tensor beta_prev;
  std::vector<double> alphas, betas;
  double theta_old = std::numeric_limits<double>::infinity();
  double theta = std::numeric_limits<double>::quiet_NaN();
  const double eps = params[0].scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                            : std::numeric_limits<float>::epsilon();
  for (int64_t k = 0; k < o.max_iter; ++k) {
    Tensors w = matvec(v);
    const at::Tensor hv_norm = dot64(w, w).sqrt();
    at::Tensor alpha = dot64(v, w);
    for (size_t i = 0; i < w.size(); ++i) {
      w[i] = w[i] - alpha.to(w[i].dtype()) * v[i];
      if (!v_prev.empty()) w[i] = w[i] - beta_prev.to(w[i].dtype()) * v_prev[i];
    }
    const at::Tensor again = dot64(v, w);  // what rounding left of v in w
    for (size_t i = 0; i < w.size(); ++i) w[i] = w[i] - again.to(w[i].dtype()) * v[i];
    alpha = alpha + again;
    const at::Tensor beta = dot64(w, w).sqrt();
    const at::Tensor host = at::stack({alpha, beta, hv_norm}).cpu();
    const double alpha_f = host[0].item<double>(), beta_f = host[1].item<double>(), hv_norm_f = host[2].item<double>();
    if (!std::isfinite(alpha_f) || !std::isfinite(beta_f) || !std::isfinite(hv_norm_f)) return nan64(dev);
    alphas.push_back(alpha_f);
    at::Tensor t = at::diag(at::tensor(alphas, at::kDouble));  // T_k, tridiagonal
    if (!betas.empty()) {
      const at::Tensor off = at::tensor(betas, at::kDouble);
      t = t + at::diag(off, 1) + at::diag(off, -1);
    }
    theta = at::linalg_eigvalsh(t)[-1].item<double>();
    if (beta_f <= 8 * eps * hv_norm_f) break;  // H maps the Krylov space into itself: θ is exact
    if (std::abs(theta - theta_old) <= o.atol + o.rtol * std::abs(theta)) break;
    theta_old = theta;
    betas.push_back(beta_f);
    v_prev = v;
    beta_prev = beta;
    for (size_t i = 0; i < w.size(); ++i) v[i] = w[i] / beta.to(w[i].dtype());
  }
  return at::full({}, theta, at::TensorOptions().dtype(at::kDouble).device(dev));
}

// The diagonal of H (per parameter, float64) and the trace's standard error.
std::pair<Tensors, at::Tensor> hess_diag(const Tensors& grads, const Tensors& params, at::Generator& gen,
                                         const CurvatureOptions& o) {
  const at::Device dev = params[0].device();
  Tensors diag;
  for (const at::Tensor& p : params) diag.push_back(at::zeros(p.sizes(), p.options().dtype(at::kDouble)));
  if (o.method == CurvatureMethod::kExact) {
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor flat = diag[i].view({-1});
      for (int64_t j = 0; j < params[i].numel(); ++j) {
        Tensors e;
        for (const at::Tensor& p : params) e.push_back(at::zeros_like(p));
        e[i].view({-1})[j] = 1;
        flat[j] = hvp(grads, params, e)[i].view({-1})[j].to(at::kDouble);
      }
    }
    return {diag, at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(dev))};
  }
  std::vector<at::Tensor> quads;
  for (int64_t k = 0; k < o.samples; ++k) {
    Tensors v;
    for (const at::Tensor& p : params) {
      v.push_back((at::randint(0, 2, p.sizes(), gen, p.options().device(at::kCPU)) * 2 - 1).to(p.device()));
    }
    const Tensors hv = hvp(grads, params, v);
    at::Tensor q = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(dev));
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor prod = v[i].to(at::kDouble) * hv[i].to(at::kDouble);
      diag[i].add_(prod);
      q = q + prod.sum();
    }
    quads.push_back(q);
  }
  for (at::Tensor& d : diag) d.div_(static_cast<double>(o.samples));
  const at::Tensor qs = at::stack(quads);
  const at::Tensor se = o.samples > 1 ? qs.std(/*unbiased=*/true) / std::sqrt(static_cast<double>(o.samples))
                                      : nan64(dev);
  return {diag, se};
}

}  // namespace

CurvatureStats curvature_stats(const std::function<at::Tensor()>& loss_fn, const std::vector<at::Tensor>& params,
                               const CurvatureOptions& o) {
  const char* op = "trainscope::curvature_stats";
  NvtxRange range{op};
  TORCH_CHECK(loss_fn, op, ": loss is empty; give a closure that recomputes the loss");
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  TORCH_CHECK(o.samples >= 1, op, ": options.samples must be at least 1, got ", o.samples);
  TORCH_CHECK(o.max_iter >= 1, op, ": options.max_iter must be at least 1, got ", o.max_iter);
  TORCH_CHECK(o.max_params >= 1, op, ": options.max_params must be at least 1, got ", o.max_params);
  int64_t numel = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].defined() && params[i].requires_grad(), op, ": params[", i, "] does not require grad");
    numel += params[i].numel();
  }
  TORCH_CHECK(o.method != CurvatureMethod::kExact || numel <= o.max_params, op,
              ": the exact method takes one Hessian-vector product per parameter element: ", numel,
              " elements exceed options.max_params = ", o.max_params, "; use the Hutchinson method");
  const at::Device dev = params[0].device();
  CurvatureStats out{nan64(dev), nan64(dev), nan64(dev), nan64(dev), nan64(dev)};
  const IeeeFloat32Convolutions ieee(dev);  // the closure and every backward pass below
  at::AutoGradMode grad_on(true);
  const at::Tensor losses = loss_fn();
  TORCH_CHECK(losses.defined() && losses.requires_grad() && losses.dim() <= 1, op,
              ": the closure must return the per-sample losses [B] or the mean loss, with a graph");
  const at::Tensor L = losses.dim() == 1 ? losses.mean() : losses;
  Tensors grads = torch::autograd::grad({L}, params, {}, /*retain_graph=*/true, /*create_graph=*/true,
                                        /*allow_unused=*/true);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = at::zeros_like(params[i]).requires_grad_();
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  if (o.max_ev && o.solver == MaxEvSolver::kLanczos) {
    out.hess_max_ev = lanczos([&](const Tensors& v) { return hvp(grads, params, v); }, params, gen, o);
  } else if (o.max_ev) {
    at::Tensor lam = power_iteration([&](const Tensors& v) { return hvp(grads, params, v); }, params, gen, o);
    const double shift = lam.item<double>();
    if (shift < 0) {  // the dominant eigenvalue is negative: iterate on H − λI
      lam = power_iteration(
                [&](const Tensors& v) {
                  Tensors hv = hvp(grads, params, v);
                  for (size_t i = 0; i < hv.size(); ++i) hv[i] = hv[i] - shift * v[i];
                  return hv;
                },
                params, gen, o) +
            shift;
    }
    out.hess_max_ev = lam;
  }
  if (o.diag) {
    auto [h, se] = hess_diag(grads, params, gen, o);
    at::Tensor trace = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(dev));
    for (const at::Tensor& d : h) trace = trace + d.sum();
    out.hess_trace = trace;
    out.hess_trace_stderr = se;
    if (losses.dim() == 1 && losses.size(0) > 0) {  // S from one backward pass per sample
      const int64_t B = losses.size(0);
      Tensors S;
      for (const at::Tensor& p : params) S.push_back(at::zeros(p.sizes(), p.options().dtype(at::kDouble)));
      for (int64_t i = 0; i < B; ++i) {
        const Tensors g = torch::autograd::grad({losses[i]}, params, {}, /*retain_graph=*/true,
                                                /*create_graph=*/false, /*allow_unused=*/true);
        for (size_t k = 0; k < g.size(); ++k) {
          if (g[k].defined()) S[k].add_(g[k].to(at::kDouble).square());
        }
      }
      at::Tensor tic_diag = at::zeros({}, trace.options()), s_sum = at::zeros({}, trace.options());
      for (size_t k = 0; k < S.size(); ++k) {
        tic_diag = tic_diag + (S[k] / static_cast<double>(B) / (h[k] + kTicEps)).sum();
        s_sum = s_sum + S[k].sum() / static_cast<double>(B);
      }
      out.tic_diag = tic_diag;
      out.tic_trace = s_sum / (trace + kTicEps);
    }
  }
  return out;
}

}  // namespace trainscope
