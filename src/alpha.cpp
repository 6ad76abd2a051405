// The normalised step length α (include/trainscope/alpha.h): tensor algebra in float64.
#include "trainscope/alpha.h"

#include <limits>

#include <c10/util/Exception.h>

#include "src/nvtx.h"

namespace trainscope {

namespace {

at::Tensor f64(const at::Tensor& t, const at::Device& device) { return t.detach().to(device, at::kDouble); }

void check_pair(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.dim() >= 1 && t.size(-1) == 2, op, ": ", name,
              " must be a pair (values at 0 and at t, last dimension 2), got shape ",
              t.defined() ? c10::str(t.sizes()) : std::string("undefined"));
}

}  // namespace

at::Tensor alpha_point_moments(const at::Tensor& losses, const at::Tensor& projections, const at::Tensor& t) {
  const char* op = "trainscope::alpha_point_moments";
  NvtxRange range{op};
  TORCH_CHECK(losses.defined() && losses.dim() == 1, op, ": losses must be 1-D [B]");
  TORCH_CHECK(projections.defined() && projections.dim() == 1, op, ": projections must be 1-D [B]");
  TORCH_CHECK(losses.size(0) == projections.size(0), op, ": losses has ", losses.size(0),
              " samples but projections has ", projections.size(0));
  TORCH_CHECK(t.defined() && t.numel() == 1, op, ": t must be one number");
  const at::Device device = t.device();
  const at::Tensor x = f64(losses, device), q = f64(projections, device) / f64(t, device).reshape({});
  const double n1 = static_cast<double>(x.size(0)) - 1.0;  // 0/0 = NaN variance for one sample
  const at::Tensor f = x.mean(), df = q.mean();
  return at::stack({f, (x - f).square().sum() / n1, df, (q - df).square().sum() / n1});
}

at::Tensor fit_quadratic(const at::Tensor& t_in, const at::Tensor& fs_in, const at::Tensor& dfs_in,
                         const at::Tensor& fs_var_in, const at::Tensor& dfs_var_in) {
  const char* op = "trainscope::fit_quadratic";
  check_pair(op, "fs", fs_in);
  check_pair(op, "dfs", dfs_in);
  check_pair(op, "fs_var", fs_var_in);
  check_pair(op, "dfs_var", dfs_var_in);
  const at::Device device = fs_in.device();
  const at::Tensor t = f64(t_in, device), fs = f64(fs_in, device), dfs = f64(dfs_in, device);
  at::Tensor fs_var = f64(fs_var_in, device), dfs_var = f64(dfs_var_in, device);
  const at::Tensor finite = t.isfinite() & fs.isfinite().all(-1) & dfs.isfinite().all(-1) &
                            fs_var.isfinite().all(-1) & dfs_var.isfinite().all(-1);
  fs_var = at::where(fs_var == 0, at::full({}, kAlphaVarianceFloor, fs_var.options()), fs_var);
  dfs_var = at::where(dfs_var == 0, at::full({}, kAlphaVarianceFloor, dfs_var.options()), dfs_var);
  const at::Tensor f0 = fs.select(-1, 0), f1 = fs.select(-1, 1), d0 = dfs.select(-1, 0), d1 = dfs.select(-1, 1);
  const at::Tensor vf0 = fs_var.select(-1, 0), vf1 = fs_var.select(-1, 1);
  const at::Tensor vd0 = dfs_var.select(-1, 0), vd1 = dfs_var.select(-1, 1);
  // The discrepancy of the observations from any quadratic, over its variance nᵀΣn.
  const at::Tensor delta = 2.0 * (f1 - f0) - t * (d0 + d1);
  const at::Tensor k = delta / (4.0 * (vf0 + vf1) + t * t * (vd0 + vd1));
  const at::Tensor c = f0 + 2.0 * vf0 * k;                 // fitted f(0)
  const at::Tensor b = d0 + t * vd0 * k;                   // fitted f'(0)
  const at::Tensor a = (d1 + t * vd1 * k - b) / (2.0 * t);  // (fitted f'(t) − fitted f'(0)) / 2t
  const std::vector<at::Tensor> parts = at::broadcast_tensors({c, b, a});
  const at::Tensor mu = at::stack(parts, -1);
  const at::Tensor ok = finite & (t != 0) & mu.isfinite().all(-1);
  return at::where(ok.unsqueeze(-1), mu, at::full({}, std::numeric_limits<double>::quiet_NaN(), mu.options()));
}

at::Tensor alpha_from_fit(const at::Tensor& mu_in, const at::Tensor& t_in) {
  const char* op = "trainscope::alpha_from_fit";
  TORCH_CHECK(mu_in.defined() && mu_in.dim() >= 1 && mu_in.size(-1) == 3, op,
              ": mu must hold the three coefficients (last dimension 3), got shape ",
              mu_in.defined() ? c10::str(mu_in.sizes()) : std::string("undefined"));
  const at::Tensor mu = f64(mu_in, mu_in.device()), t = f64(t_in, mu_in.device());
  const at::Tensor alpha_bar = -mu.select(-1, 1) / mu.select(-1, 2);
  const at::Tensor alpha = 2.0 * t / alpha_bar - 1.0;
  return at::where(mu.select(-1, 2) < 0, at::full({}, -1.0, alpha.options()), alpha);
}

at::Tensor alpha_from_moments(const at::Tensor& t, const at::Tensor& start, const at::Tensor& end) {
  NvtxRange range{"trainscope::alpha_from_moments"};
  TORCH_CHECK(start.numel() == 4 && end.numel() == 4,
              "trainscope::alpha_from_moments: start and end must be the [4] moments of alpha_point_moments");
  const at::Tensor pair = at::stack({start.reshape({4}), end.reshape({4}).to(start.device())}, -1);  // [4, 2]
  return alpha_from_fit(fit_quadratic(t, pair[0], pair[2], pair[1], pair[3]), t);
}

}  // namespace trainscope
