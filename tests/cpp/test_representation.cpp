// The representation probe of the LibTorch API: probe_representations and
// RepresentationAccumulator equal the single-layer functions (dead_units.h, rank.h) on the same
// activations, streaming equals one batch, NaN activations give NaN and −1 rank measures and
// IEEE dead units without an error, and bad input names the argument.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "tests/cpp/probe_net.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/representation.h"

namespace {

using namespace trainscope_test;

trainscope::RepresentationOptions relu_tanh() {
  trainscope::RepresentationOptions o;
  o.kinds = {trainscope::ActivationKind::kReLU, trainscope::ActivationKind::kTanh};
  return o;
}

class RepresentationTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) SKIP_WITHOUT_CUDA();
  }
  at::TensorOptions opts() const {
    return at::TensorOptions().dtype(at::kFloat).device(GetParam() ? cuda0() : at::Device(at::kCPU));
  }
};

TEST_P(RepresentationTest, ProbeEqualsSingleLayerFunctions) {
  const TinyNet net(opts());
  const at::Tensor x = at::randn({333, 10}, opts());
  const trainscope::RepresentationMetrics m =
      trainscope::probe_representations(net, x, /*batch_size=*/50, {"fc1", "fc2"}, relu_tanh());
  ASSERT_EQ(m.names, (std::vector<std::string>{"fc1", "fc2"}));
  EXPECT_EQ(m.units, (std::vector<int64_t>{16, 12}));
  EXPECT_EQ(m.observations, (std::vector<int64_t>{333, 333}));

  const std::vector<at::Tensor> acts = net(x);
  const trainscope::ActivationKind kinds[] = {trainscope::ActivationKind::kReLU, trainscope::ActivationKind::kTanh};
  for (int64_t i = 0; i < 2; ++i) {
    const trainscope::DeadUnits d = trainscope::dead_units(acts[i], {kinds[i]});
    EXPECT_EQ(to_vector(m.dead_units)[i], to_vector(d.count)[0]) << "layer " << i;
    EXPECT_TRUE(at::equal(as_double_cpu(m.active_fraction[i]), as_double_cpu(d.active_fraction)));
    const trainscope::RankMeasures r = trainscope::rank_measures(acts[i]);
    EXPECT_CLOSE(value(m.rank.effective_rank[i]), value(r.effective_rank), 1e-9) << "layer " << i;
    EXPECT_EQ(to_vector(m.rank.approximate_rank)[i], to_vector(r.approximate_rank)[0]);
    EXPECT_EQ(to_vector(m.rank.abs_approximate_rank)[i], to_vector(r.abs_approximate_rank)[0]);
    EXPECT_CLOSE(value(m.rank.stable_rank[i]), value(r.stable_rank), 1e-9);
  }
  EXPECT_GE(to_vector(m.dead_units)[0], 3);
  EXPECT_EQ(m.dead_units.device(), x.device());
  EXPECT_EQ(m.rank.effective_rank.device(), x.device());
}

TEST_P(RepresentationTest, StreamingEqualsOneBatch) {
  const TinyNet net(opts());
  const at::Tensor x = at::randn({101, 10}, opts());
  const auto a = trainscope::probe_representations(net, x, 7, {"a", "b"}, relu_tanh());
  const auto b = trainscope::probe_representations(net, x, 101, {"a", "b"}, relu_tanh());
  for (const auto& [name, t] : a.per_layer()) {
    EXPECT_TRUE(at::allclose(as_double_cpu(t), as_double_cpu(b.per_layer().at(name)), 1e-9, 0.0)) << name;
  }
}

TEST_P(RepresentationTest, SummaryAveragesOverLayers) {
  const TinyNet net(opts());
  const auto m = trainscope::probe_representations(net, at::randn({64, 10}, opts()), 64, {}, relu_tanh());
  EXPECT_EQ(m.names, (std::vector<std::string>{"layer0", "layer1"}));
  const auto s = m.summary();
  const std::vector<int64_t> dead = to_vector(m.dead_units);
  EXPECT_EQ(to_vector(s.at("dead_units"))[0], dead[0] + dead[1]);
  EXPECT_CLOSE(value(s.at("dead_fraction")), static_cast<double>(dead[0] + dead[1]) / 28.0, 1e-12);
  EXPECT_CLOSE(value(s.at("effective_rank")), value(m.rank.effective_rank.mean()), 1e-12);
  const std::vector<int64_t> ar = to_vector(m.rank.approximate_rank);
  EXPECT_CLOSE(value(s.at("approximate_rank")), (ar[0] + ar[1]) / 2.0, 1e-12);
  for (const std::string& name : trainscope::kRepresentationMetricNames) {
    EXPECT_EQ(s.count(name), 1u) << name;
    EXPECT_EQ(m.per_layer().count(name), 1u) << name;
  }
}

TEST_P(RepresentationTest, ConvolutionChannelsAreUnits) {
  at::manual_seed(3);
  const at::Tensor w = at::randn({6, 2, 3, 3}, opts());
  const auto forward = [&](const at::Tensor& x) { return std::vector<at::Tensor>{at::relu(at::conv2d(x, w))}; };
  const at::Tensor x = at::randn({12, 2, 7, 7}, opts());
  const auto m = trainscope::probe_representations(forward, x, 5, {"conv"});
  EXPECT_EQ(m.units, (std::vector<int64_t>{6}));
  EXPECT_EQ(m.observations, (std::vector<int64_t>{12 * 25}));
  const at::Tensor phi = forward(x)[0].permute({0, 2, 3, 1}).reshape({-1, 6});
  EXPECT_CLOSE(value(m.rank.effective_rank[0]), value(trainscope::rank_measures(phi).effective_rank), 1e-9);
}

TEST_P(RepresentationTest, SvdMethodAgreesWithGram) {
  const TinyNet net(opts());
  const at::Tensor x = at::randn({40, 10}, opts());
  auto o = relu_tanh();
  const auto gram = trainscope::probe_representations(net, x, 9, {"a", "b"}, o);
  o.rank.method = trainscope::RankMethod::kSvd;
  const auto svd = trainscope::probe_representations(net, x, 9, {"a", "b"}, o);
  EXPECT_TRUE(at::allclose(as_double_cpu(gram.rank.effective_rank), as_double_cpu(svd.rank.effective_rank), 1e-6, 0.0));
}

// A diverged network (a NaN weight after the first layer): the probe returns its metrics, never
// an error. The first layer is measured as before; the second (tanh, NaN throughout) has NaN and
// −1 rank measures and every unit dead (NaN is not within 1 − ε); a ReLU of NaN is active (NaN ≠
// 0). The averages over layers are NaN for every rank measure, never a mean over −1.
TEST_P(RepresentationTest, NonFiniteActivationsGiveUndefinedRanksAndIeeeDeadUnits) {
  TinyNet net(opts());
  net.w2[0].fill_(std::numeric_limits<double>::quiet_NaN());  // every tanh unit reads a NaN
  const auto relu_of_nan = [&](const at::Tensor& x) {
    std::vector<at::Tensor> h = net(x);
    h.push_back(at::relu(h[1]));  // NaN throughout, as a ReLU layer after the NaN
    return h;
  };
  trainscope::RepresentationOptions o = relu_tanh();
  o.kinds.push_back(trainscope::ActivationKind::kReLU);
  const at::Tensor x = at::randn({90, 10}, opts());
  for (const trainscope::RankMethod method : {trainscope::RankMethod::kGram, trainscope::RankMethod::kSvd}) {
    o.rank.method = method;
    const std::string what = trainscope::rank_method_name(method);
    const trainscope::RepresentationMetrics m =
        trainscope::probe_representations(relu_of_nan, x, 20, {"a", "b", "c"}, o);
    const std::vector<at::Tensor> acts = relu_of_nan(x);
    ASSERT_TRUE(at::isnan(acts[1]).all().item<bool>());
    const trainscope::RankMeasures r = trainscope::rank_measures(acts[0], trainscope::RankOptions{0.99, method});
    EXPECT_CLOSE(value(m.rank.effective_rank[0]), value(r.effective_rank), 1e-9) << what;
    EXPECT_EQ(to_vector(m.rank.approximate_rank)[0], to_vector(r.approximate_rank)[0]) << what;
    for (int64_t i : {1, 2}) {
      EXPECT_TRUE(std::isnan(value(m.rank.effective_rank[i]))) << what << " layer " << i;
      EXPECT_TRUE(std::isnan(value(m.rank.stable_rank[i]))) << what << " layer " << i;
      EXPECT_EQ(to_vector(m.rank.approximate_rank)[i], -1) << what << " layer " << i;
      EXPECT_EQ(to_vector(m.rank.abs_approximate_rank)[i], -1) << what << " layer " << i;
    }
    const int64_t dead_a = to_vector(trainscope::dead_units(acts[0]).count)[0];
    EXPECT_EQ(to_vector(m.dead_units), (std::vector<int64_t>{dead_a, 12, 0})) << what;
    EXPECT_TRUE(at::equal(as_double_cpu(m.active_fraction[2]), at::ones({12}, at::kDouble))) << what;
    const auto s = m.summary();
    for (const char* name : {"effective_rank", "approximate_rank", "abs_approximate_rank", "stable_rank"}) {
      EXPECT_TRUE(std::isnan(value(s.at(name)))) << what << " summary " << name;
    }
    EXPECT_EQ(to_vector(s.at("dead_units"))[0], to_vector(m.dead_units.sum())[0]) << what;
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, RepresentationTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "CUDA" : "CPU"; });

TEST(RepresentationErrors, NameTheArgument) {
  const TinyNet net(at::TensorOptions().dtype(at::kFloat));
  const at::Tensor x = at::randn({8, 10});
  expect_error_naming([&] { trainscope::probe_representations(net, x, 0); }, "batch_size", "batch_size");
  expect_error_naming([&] { trainscope::probe_representations(nullptr, x, 4); }, "forward", "forward");
  expect_error_naming([&] { trainscope::probe_representations(net, at::randn({0, 10}), 4); }, "probe_inputs", "probe_inputs");
  expect_error_naming([&] { trainscope::probe_representations(net, x, 4, {"only_one"}); }, "names", "names");

  trainscope::RepresentationOptions bad_kinds;
  bad_kinds.kinds = {trainscope::ActivationKind::kReLU};
  expect_error_naming([&] { trainscope::RepresentationAccumulator({"a", "b"}, bad_kinds); }, "kinds", "kinds");
  trainscope::RepresentationOptions bad_prop;
  bad_prop.rank.prop = 0.0;
  expect_error_naming([&] { trainscope::RepresentationAccumulator({"a"}, bad_prop); }, "prop", "prop");
  expect_error_naming([&] { trainscope::RepresentationAccumulator({}); }, "names", "names");

  trainscope::RepresentationAccumulator acc({"a", "b"});
  expect_error_naming([&] { acc.result(); }, "no batch", "no batch");
  expect_error_naming([&] { acc.add({at::randn({4, 3})}); }, "acts", "acts");
  acc.add({at::randn({4, 3}), at::randn({4, 5})});
  // The layer's name comes with the error of the layer's accumulator.
  expect_error_naming([&] { acc.add({at::randn({4, 3}), at::randn({4, 6})}); }, "layer b", "layer b");
  expect_error_naming([&] { acc.add({at::randn({4, 3}), at::randint(0, 3, {4, 5})}); }, "acts[1]", "acts[1]");
}

}  // namespace
