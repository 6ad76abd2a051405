// The device check every entry point runs (check_device, src/tensor_checks.h): its words for a
// build with and without CUDA, whatever this build is; and, in a CPU-only build, that every public
// function and class refuses a CUDA tensor with them before any work. A CPU-only build has no
// GPU to make CUDA tensors on, so those tests use tensors that only say they are on cuda:0 (host
// memory behind them, never read): the check looks at the device and nothing else.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "src/tensor_checks.h"
#include "trainscope/dead_units.h"
#include "trainscope/distributed.h"
#include "trainscope/hist2d.h"
#include "trainscope/monitor.h"
#include "trainscope/param_stats.h"
#include "trainscope/per_sample_factors.h"
#include "trainscope/per_sample_stats.h"
#include "trainscope/rank.h"
#include "trainscope/representation.h"

namespace {

using trainscope::device_unsupported_reason;

const at::Device kCpu(at::kCPU);
const at::Device kCuda0(at::kCUDA, 0);

TEST(DeviceCheck, BuildAnswersWhetherItHasCuda) {
#if defined(TRAINSCOPE_WITH_CUDA)
  EXPECT_TRUE(trainscope::built_with_cuda());
#else
  EXPECT_FALSE(trainscope::built_with_cuda());
#endif
}

TEST(DeviceCheck, CudaBuildTakesCpuAndCuda) {
  EXPECT_EQ(device_unsupported_reason(kCpu, true), nullptr);
  EXPECT_EQ(device_unsupported_reason(kCuda0, true), nullptr);
  EXPECT_STREQ(device_unsupported_reason(at::Device(at::kMeta), true), "trainscope runs on CPU or CUDA tensors");
}

TEST(DeviceCheck, CpuOnlyBuildSaysItWasBuiltWithoutCuda) {
  EXPECT_EQ(device_unsupported_reason(kCpu, false), nullptr);
  const std::string why = device_unsupported_reason(kCuda0, false);
  EXPECT_NE(why.find("built without CUDA"), std::string::npos) << why;
  EXPECT_NE(why.find("-DTRAINSCOPE_CUDA=ON"), std::string::npos) << why;
  EXPECT_STREQ(device_unsupported_reason(at::Device(at::kMeta), false),
               "trainscope runs on CPU tensors (CPU-only build)");
}

TEST(DeviceCheck, MessageNamesOpArgumentAndDevice) {
  try {
    trainscope::check_device("trainscope::some_op", "grads[0]", at::Device(at::kMeta));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_STREQ(e.what_without_backtrace(),
                 trainscope::kWithCuda
                     ? "trainscope::some_op: grads[0] is on meta; trainscope runs on CPU or CUDA tensors"
                     : "trainscope::some_op: grads[0] is on meta; trainscope runs on CPU tensors (CPU-only build)");
  }
}

// ---------------------------------------------------------------------------------------------
// A CPU-only build and CUDA tensors

// A tensor on cuda:0 as far as its device says, made without CUDA: host memory behind it (large
// enough for every shape below), so a path that forgot the check would fail in the dispatcher or
// read host bytes, never crash on a device pointer.
at::Tensor on_cuda(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  static std::vector<double> host(4096);
  return at::for_blob(host.data(), sizes)
      .options(at::TensorOptions().dtype(dtype).device(kCuda0))
      .target_device(kCuda0)
      .make_tensor();
}

class CpuOnlyBuild : public testing::Test {
 protected:
  void SetUp() override {
    if (trainscope::built_with_cuda()) GTEST_SKIP() << "a CUDA build runs CUDA tensors";
  }

  // `call` throws c10::Error naming `op` and saying the build has no CUDA.
  static void expect_refused(const std::string& op, const std::function<void()>& call) {
    try {
      call();
      ADD_FAILURE() << op << ": no error";
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      EXPECT_NE(msg.find(op), std::string::npos) << msg;
      EXPECT_NE(msg.find("is on cuda:0; this trainscope was built without CUDA"), std::string::npos) << msg;
    }
  }
};

TEST_F(CpuOnlyBuild, FakeTensorSaysCuda) {
  const at::Tensor t = on_cuda({4, 3});
  EXPECT_TRUE(t.is_cuda());
  EXPECT_EQ(t.device(), kCuda0);
}

TEST_F(CpuOnlyBuild, ParameterMetricsRefuseCudaTensors) {
  const std::vector<at::Tensor> l = {on_cuda({4, 3}), on_cuda({3})};
  expect_refused("trainscope::param_stats", [&] { trainscope::param_stats(l, l, l, l); });
  expect_refused("trainscope::grad_norm", [&] { trainscope::grad_norm(l); });
  expect_refused("trainscope::grad_magnitude", [&] { trainscope::grad_magnitude(l); });
  expect_refused("trainscope::weight_magnitude", [&] { trainscope::weight_magnitude(l); });
  expect_refused("trainscope::distance", [&] { trainscope::distance(l, l); });
  expect_refused("trainscope::update_size", [&] { trainscope::update_size(l, l); });
  expect_refused("trainscope::grad_hist1d", [&] { trainscope::grad_hist1d(l); });
  expect_refused("trainscope::nonfinite_count", [&] { trainscope::nonfinite_count(l); });
  expect_refused("trainscope::loss", [&] { trainscope::loss(on_cuda({8})); });
}

TEST_F(CpuOnlyBuild, PerSampleStatisticsRefuseCudaTensors) {
  const std::vector<at::Tensor> g = {on_cuda({4, 3}), on_cuda({4, 2, 2})};
  expect_refused("trainscope::per_sample_stats", [&] { trainscope::per_sample_stats(g); });
  expect_refused("trainscope::per_sample_parts", [&] { trainscope::per_sample_parts(g); });
  expect_refused("trainscope::norm_test", [&] { trainscope::norm_test(g); });
  expect_refused("trainscope::inner_test", [&] { trainscope::inner_test(g); });
  expect_refused("trainscope::ortho_test", [&] { trainscope::ortho_test(g); });
  expect_refused("trainscope::gradient_noise_scale", [&] { trainscope::gradient_noise_scale(g); });
  expect_refused("trainscope::per_sample_grad_hist1d", [&] { trainscope::per_sample_grad_hist1d(g); });
  const trainscope::PerSampleParts parts{on_cuda({4}, at::kDouble), on_cuda({4}, at::kDouble),
                                         on_cuda({}, at::kDouble)};
  expect_refused("trainscope::per_sample_stats_from_parts", [&] { trainscope::per_sample_stats_from_parts(parts); });
  expect_refused("trainscope::grad_hist2d", [&] { trainscope::grad_hist2d({on_cuda({4, 3})}, {on_cuda({3})}); });
}

TEST_F(CpuOnlyBuild, LayerFactorsRefuseCudaTensors) {
  const at::Tensor x = on_cuda({4, 3}), d = on_cuda({4, 2}), w = on_cuda({2, 3}), b = on_cuda({2});
  const at::Tensor xc = on_cuda({2, 1, 4, 4}), dc = on_cuda({2, 2, 3, 3}), wc = on_cuda({2, 1, 2, 2});
  expect_refused("trainscope::linear_per_sample_parts", [&] { trainscope::linear_per_sample_parts(x, d, true); });
  expect_refused("trainscope::linear_per_sample_parts",
                 [&] { trainscope::linear_per_sample_parts(std::vector<at::Tensor>{x, x}, {d, d}, true); });
  expect_refused("trainscope::conv2d_per_sample_parts",
                 [&] { trainscope::conv2d_per_sample_parts(xc, dc, {2, 2}, {1}, {0}, {1}, 1, false); });
  expect_refused("trainscope::linear_per_sample_grad_hist1d",
                 [&] { trainscope::linear_per_sample_grad_hist1d(x, d, true); });
  expect_refused("trainscope::conv2d_per_sample_grad_hist1d",
                 [&] { trainscope::conv2d_per_sample_grad_hist1d(xc, dc, {2, 2}, {1}, {0}, {1}, 1, false); });
  expect_refused("trainscope::linear_per_sample_grad_hist2d",
                 [&] { trainscope::linear_per_sample_grad_hist2d(x, d, w, b); });
  expect_refused("trainscope::conv2d_per_sample_grad_hist2d",
                 [&] { trainscope::conv2d_per_sample_grad_hist2d(xc, dc, wc, at::Tensor(), {1}, {0}, {1}, 1); });
  trainscope::OutputGradCapture capture;
  expect_refused("trainscope::OutputGradCapture::watch",
                 [&] { capture.watch(on_cuda({4, 2}).requires_grad_(true)); });
}

TEST_F(CpuOnlyBuild, RepresentationMetricsRefuseCudaTensors) {
  const at::Tensor acts = on_cuda({4, 3});
  using trainscope::ActivationKind;
  expect_refused("trainscope::active_counts", [&] { trainscope::active_counts(acts, ActivationKind::kReLU); });
  at::Tensor counts = on_cuda({3}, at::kLong);
  expect_refused("trainscope::add_active_counts",
                 [&] { trainscope::add_active_counts(counts, acts, ActivationKind::kReLU); });
  expect_refused("trainscope::dead_units", [&] { trainscope::dead_units(acts); });
  expect_refused("trainscope::dead_units_from_counts", [&] { trainscope::dead_units_from_counts(counts, 4); });
  trainscope::DeadUnitCounter counter;
  expect_refused("trainscope::DeadUnitCounter::add", [&] { counter.add(acts); });

  expect_refused("trainscope::rank_measures", [&] { trainscope::rank_measures(acts); });
  expect_refused("trainscope::rank_measures", [&] { trainscope::rank_measures(at::TensorList({acts, acts})); });
  expect_refused("trainscope::rank_measures", [&] { trainscope::effective_rank(acts, trainscope::RankMethod::kSvd); });
  expect_refused("trainscope::rank_measures", [&] { trainscope::approximate_rank(acts); });
  expect_refused("trainscope::rank_measures", [&] { trainscope::abs_approximate_rank(acts); });
  expect_refused("trainscope::rank_measures", [&] { trainscope::stable_rank(acts); });
  expect_refused("trainscope::rank_measures_from_singular_values",
                 [&] { trainscope::rank_measures_from_singular_values(on_cuda({3})); });
  expect_refused("trainscope::rank_measures_from_grams",
                 [&] { trainscope::rank_measures_from_grams({on_cuda({3, 3}, at::kDouble)}); });
  trainscope::GramAccumulator gram;
  expect_refused("trainscope::GramAccumulator::add", [&] { gram.add(acts); });

  trainscope::RepresentationAccumulator acc({"fc1"});
  expect_refused("trainscope::RepresentationAccumulator", [&] { acc.add({acts}); });
  const trainscope::ProbeForward forward = [](const at::Tensor& x) { return std::vector<at::Tensor>{x}; };
  expect_refused("trainscope::probe_representations",
                 [&] { trainscope::probe_representations(forward, acts, 2, {"fc1"}); });
}

TEST_F(CpuOnlyBuild, CrossRankFunctionsRefuseCudaTensors) {
  // Two ranks whose sum is the identity: the cross-rank paths, not the one-process shortcuts.
  const trainscope::RankGroup two(0, 2, [](at::Tensor&) {});
  const std::vector<at::Tensor> l = {on_cuda({4, 3}), on_cuda({3})};
  expect_refused("trainscope::param_stats_across_ranks",
                 [&] { trainscope::param_stats_across_ranks(l, l, {}, {}, {}, two); });
  expect_refused("trainscope::loss_across_ranks", [&] { trainscope::loss_across_ranks(on_cuda({8}), two); });
  const std::vector<at::Tensor> g = {on_cuda({4, 3})};
  expect_refused("trainscope::per_sample_stats_across_ranks",
                 [&] { trainscope::per_sample_stats_across_ranks(g, two); });
  const trainscope::PerSampleParts parts{on_cuda({4}, at::kDouble), on_cuda({4}, at::kDouble),
                                         on_cuda({}, at::kDouble)};
  expect_refused("trainscope::per_sample_stats_from_local_parts",
                 [&] { trainscope::per_sample_stats_from_local_parts(parts, two); });
}

TEST_F(CpuOnlyBuild, MonitorRefusesCudaParameters) {
  const at::Tensor w = on_cuda({4, 3}), b = on_cuda({4});
  expect_refused("trainscope::Monitor", [&] { trainscope::Monitor({{"fc.weight", w}, {"fc.bias", b}}); });
}

}  // namespace
