// The README's C++ example: parameter metrics of a small model after one SGD step.
#include <cmath>
#include <iostream>

#include <torch/torch.h>
#include <trainscope/param_stats.h>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear model(8, 4);
  torch::optim::SGD opt(model->parameters(), /*lr=*/0.1);

  std::vector<at::Tensor> params = model->parameters(), init, prev;
  for (auto& p : params) {
    init.push_back(p.detach().clone());
    prev.push_back(p.detach().clone());
  }

  auto x = torch::randn({16, 8});
  auto per_sample = model(x).pow(2).sum(1);
  opt.zero_grad();
  per_sample.mean().backward();
  opt.step();

  std::vector<at::Tensor> grads;
  for (auto& p : params) grads.push_back(p.grad());
  trainscope::ParamStatsOptions options;
  options.refresh_prev = true;
  auto s = trainscope::param_stats(grads, params, init, prev, options);

  for (int64_t m = 0; m < trainscope::kNumMetrics; ++m) {
    const auto metric = static_cast<trainscope::Metric>(m);
    std::cout << trainscope::metric_name(metric) << " = " << s.metric(metric).item<float>() << "\n";
  }
  std::cout << "histogram total = " << s.hist.sum().item<int64_t>() << "\n";
  // After one step from θ₀, distance equals update size.
  const float d = s.metric(trainscope::Metric::kDistance).item<float>();
  const float u = s.metric(trainscope::Metric::kUpdateSize).item<float>();
  return (std::isfinite(d) && d > 0 && std::fabs(d - u) <= 1e-6f * d) ? 0 : 1;
}
