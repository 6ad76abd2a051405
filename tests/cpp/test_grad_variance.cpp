// trainscope::grad_variance_stats (include/trainscope/grad_variance.h) against its definitions
// evaluated from per-sample gradients in double, per tensor and over the list; numerical trouble
// gives NaN; bad arguments are errors naming them.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

#include "trainscope/grad_variance.h"

namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

// mean_gsnr, early_stopping, cabs of per-sample gradients g [B, P] (SPEC.md §6), in double.
std::vector<double> reference(const at::Tensor& g, double loss, double lr) {
  const int64_t b = g.size(0);
  const at::Tensor mean = g.mean(0), s = g.square().sum(0), m2 = mean.square();
  const double gsnr = (m2 / (s / b - m2 + 1e-5)).mean().item<double>();
  const double es = 1.0 - b * (m2 / ((s - b * m2) / (b - 1) + 1e-5)).mean().item<double>();
  const double cabs = lr * (s - b * m2).sum().item<double>() / (b * loss);
  return {gsnr, es, cabs};
}

void expect_row(const at::Tensor& row, const std::vector<double>& want, const std::string& what) {
  for (int64_t k = 0; k < trainscope::kNumGradVarianceStats; ++k) {
    const double got = row[k].item<double>();
    EXPECT_NEAR(got, want[k], 1e-9 * std::max(1.0, std::abs(want[k])))
        << what << " " << trainscope::grad_variance_stat_name(static_cast<trainscope::GradVarianceStat>(k));
  }
}

TEST(GradVarianceStats, MatchTheDefinitionsPerTensorAndOverTheList) {
  at::manual_seed(3);
  const int64_t B = 9;
  const at::Tensor g1 = at::randn({B, 4, 3}, kF64) + 0.3, g2 = 0.1 * at::randn({B, 5}, kF64);
  const double loss = 1.7, lr = 0.05;
  const at::Tensor r = trainscope::grad_variance_stats({g1.sum(0), g2.sum(0)}, {g1.square().sum(0), g2.square().sum(0)},
                                                       B, at::full({1}, loss, kF64), lr);
  ASSERT_EQ(r.sizes(), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(r.scalar_type(), at::kDouble);
  expect_row(r[0], reference(at::cat({g1.reshape({B, -1}), g2}, 1), loss, lr), "list");
  expect_row(r[1], reference(g1.reshape({B, -1}), loss, lr), "tensor 0");
  expect_row(r[2], reference(g2, loss, lr), "tensor 1");
  // float32 sums: to float32's precision, the results float64 all the same.
  const at::Tensor r32 = trainscope::grad_variance_stats({g2.sum(0).to(at::kFloat)},
                                                         {g2.square().sum(0).to(at::kFloat)}, B,
                                                         at::full({1}, loss, kF64), lr);
  EXPECT_EQ(r32.scalar_type(), at::kDouble);
  const std::vector<double> want2 = reference(g2, loss, lr);
  for (int64_t k = 0; k < 3; ++k) EXPECT_NEAR(r32[0][k].item<double>(), want2[k], 1e-4 * std::abs(want2[k])) << k;
}

TEST(GradVarianceStats, TroubleIsNanNeverAnError) {
  const at::Tensor ones = at::ones({3}, kF64);
  // A batch of one: no sample variance for early stopping.
  const at::Tensor one = trainscope::grad_variance_stats({ones}, {ones}, 1, at::ones({}, kF64), 0.1);
  EXPECT_TRUE(std::isnan(one[0][1].item<double>()));
  EXPECT_TRUE(std::isfinite(one[0][0].item<double>()));
  // No loss, or no learning rate: no cabs.
  EXPECT_TRUE(std::isnan(trainscope::grad_variance_stats({ones}, {ones}, 4)[0][2].item<double>()));
  EXPECT_TRUE(std::isnan(trainscope::grad_variance_stats({ones}, {ones}, 4, at::ones({}, kF64))[0][2].item<double>()));
  // Non-finite gradients.
  const at::Tensor nan = at::full({2}, std::nan(""), kF64);
  const at::Tensor r = trainscope::grad_variance_stats({nan}, {ones.narrow(0, 0, 2)}, 4, at::ones({}, kF64), 0.1);
  for (int64_t k = 0; k < 3; ++k) EXPECT_TRUE(std::isnan(r[0][k].item<double>())) << k;
}

void expect_error_naming(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one naming " << needle;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(GradVarianceStats, BadArgumentsAreNamed) {
  const at::Tensor a = at::ones({3}, kF64), b = at::ones({2}, kF64);
  expect_error_naming([&] { trainscope::grad_variance_stats({a}, {a}, 0); }, "batch_size");
  expect_error_naming([&] { trainscope::grad_variance_stats({a}, {}, 2); }, "sum_grad_sq");
  expect_error_naming([&] { trainscope::grad_variance_stats({}, {}, 2); }, "grad_sum is empty");
  expect_error_naming([&] { trainscope::grad_variance_stats({a}, {b}, 2); }, "sum_grad_sq[0]");
  expect_error_naming([&] { trainscope::grad_variance_stats({at::ones({3}, at::kLong)}, {a}, 2); }, "grad_sum[0]");
  expect_error_naming([&] { trainscope::grad_variance_stats({a}, {a}, 2, at::ones({2}, kF64), 0.1); }, "loss");
}

}  // namespace
