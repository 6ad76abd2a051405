// The per-element gradient variance family (include/trainscope/grad_variance.h): tensor algebra
// on the device, one stack at the end, no host synchronisation.
#include "trainscope/grad_variance.h"

#include <cmath>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

#include "src/nvtx.h"

namespace trainscope {

const char* grad_variance_stat_name(GradVarianceStat s) {
  switch (s) {
    case GradVarianceStat::kMeanGsnr: return "mean_gsnr";
    case GradVarianceStat::kEarlyStopping: return "early_stopping";
    case GradVarianceStat::kCabs: return "cabs";
  }
  return "?";
}

namespace {

// Σ_j gsnr_j, Σ_j snr_j (early stopping), Σ_j (S_j − B ḡ_j²) of one tensor, float64 0-d each.
struct Terms {
  at::Tensor gsnr, snr, var;
  double numel;
};

Terms terms_of(const at::Tensor& grad_sum, const at::Tensor& sq_sum, int64_t b) {
  const double bd = static_cast<double>(b);
  const at::Tensor mean = grad_sum.to(at::kDouble) / bd;
  const at::Tensor sq = sq_sum.to(at::kDouble);
  const at::Tensor m2 = mean * mean;
  const at::Tensor excess = sq - bd * m2;  // S − B ḡ², (B − 1) times the sample variance
  Terms t;
  t.gsnr = (m2 / (sq / bd - m2 + kGsnrEps)).sum();
  t.var = excess.sum();
  t.snr = b > 1 ? (m2 / (excess / (bd - 1.0) + kEarlyStoppingEps)).sum()
                : at::full({}, std::nan(""), mean.options());
  t.numel = static_cast<double>(mean.numel());
  return t;
}

at::Tensor row_of(const Terms& t, int64_t b, const at::Tensor& loss, double lr, const at::TensorOptions& o64) {
  const at::Tensor nan = at::full({}, std::nan(""), o64);
  if (t.numel == 0) return at::stack({nan, nan, nan});
  const double bd = static_cast<double>(b);
  const at::Tensor cabs = loss.defined() && !std::isnan(lr) ? lr * t.var / (bd * loss) : nan;
  return at::stack({t.gsnr / t.numel, 1.0 - bd * t.snr / t.numel, cabs});
}

}  // namespace

at::Tensor grad_variance_stats(at::TensorList grad_sum, at::TensorList sum_grad_sq, int64_t batch_size,
                               const at::Tensor& loss, double lr) {
  const char* op = "trainscope::grad_variance_stats";
  NvtxRange range{op};
  TORCH_CHECK(batch_size >= 1, op, ": batch_size must be at least 1, got ", batch_size);
  TORCH_CHECK(grad_sum.size() == sum_grad_sq.size(), op, ": grad_sum has ", grad_sum.size(),
              " tensors but sum_grad_sq has ", sum_grad_sq.size());
  TORCH_CHECK(!grad_sum.empty(), op, ": grad_sum is empty");
  const at::Device device = grad_sum[0].device();
  for (size_t i = 0; i < grad_sum.size(); ++i) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_sum", grad_sum[i]},
                                  std::pair<const char*, const at::Tensor&>{"sum_grad_sq", sum_grad_sq[i]}}) {
      TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is an undefined tensor");
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, "[", i, "] must be floating point, got ",
                  t.scalar_type());
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but grad_sum[0] is on ",
                  device);
    }
    TORCH_CHECK(grad_sum[i].sizes() == sum_grad_sq[i].sizes(), op, ": grad_sum[", i, "] has shape ",
                grad_sum[i].sizes(), " but sum_grad_sq[", i, "] has ", sum_grad_sq[i].sizes());
  }
  at::Tensor l;
  if (loss.defined()) {
    TORCH_CHECK(loss.numel() == 1, op, ": loss must have one element, got ", loss.numel());
    l = loss.detach().reshape({}).to(device, at::kDouble);
  }
  const auto o64 = grad_sum[0].options().dtype(at::kDouble);
  std::vector<at::Tensor> rows(grad_sum.size() + 1);
  at::Tensor gsnr = at::zeros({}, o64), snr = at::zeros({}, o64), var = at::zeros({}, o64);
  double numel = 0;
  for (size_t i = 0; i < grad_sum.size(); ++i) {
    const Terms t = terms_of(grad_sum[i], sum_grad_sq[i], batch_size);
    rows[i + 1] = row_of(t, batch_size, l, lr, o64);
    gsnr = gsnr + t.gsnr;
    snr = snr + t.snr;
    var = var + t.var;
    numel += t.numel;
  }
  rows[0] = row_of(Terms{gsnr, snr, var, numel}, batch_size, l, lr, o64);
  return at::stack(rows);
}

}  // namespace trainscope
