// Representation metrics of a probe set split over ranks (RepresentationAccumulator::result with a
// RankGroup), the ranks run as threads over an in-memory all-reduce (tests/cpp/thread_ranks.h):
// dead units, active fractions, observation counts and the four rank measures equal result() of
// one accumulator on the whole probe set — ranks with fewer rows than units (rows kept) and more
// (ΦᵀΦ accumulated), a convolution's channels, a zero-row batch, the SVD method, a NaN on one
// rank (NaN and −1 on every rank) — in ONE all-reduce; a group of one gives result() itself; a
// rank without a batch raises a c10::Error saying so before the collective. On CPU, and on CUDA
// when a GPU is present (skipped otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tests/cpp/probe_net.h"
#include "tests/cpp/thread_ranks.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/distributed.h"
#include "trainscope/representation.h"

namespace {

using namespace trainscope_test;
using trainscope::RankGroup;
using trainscope::RepresentationAccumulator;
using trainscope::RepresentationMetrics;
using trainscope::RepresentationOptions;

// Three layers: TinyNet's ReLU [n, 16] (its first three units dead) and tanh [n, 12], and ReLU of
// a [n, 4, 2, 3] map (channels are units, 6 observations per example).
struct Net : TinyNet {
  at::Tensor w3;
  explicit Net(const at::TensorOptions& o) : TinyNet(o, 17) { w3 = at::randn({10, 24}, o); }
  std::vector<at::Tensor> operator()(const at::Tensor& x) const {
    std::vector<at::Tensor> h = TinyNet::operator()(x);
    h.push_back(at::relu(at::mm(x, w3).view({-1, 4, 2, 3})));
    return h;
  }
};

RepresentationOptions options(trainscope::RankMethod method = trainscope::RankMethod::kGram) {
  RepresentationOptions o;
  o.kinds = {trainscope::ActivationKind::kReLU, trainscope::ActivationKind::kTanh, trainscope::ActivationKind::kReLU};
  o.rank.method = method;
  return o;
}

const std::vector<std::string> kNames = {"fc1", "fc2", "conv"};

void expect_same_metrics(const RepresentationMetrics& got, const RepresentationMetrics& want, const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(got.names, want.names);
  EXPECT_EQ(got.units, want.units);
  EXPECT_EQ(got.observations, want.observations);
  EXPECT_EQ(to_vector(got.dead_units), to_vector(want.dead_units));
  EXPECT_EQ(got.dead_units.device(), want.dead_units.device());
  EXPECT_EQ(got.rank.effective_rank.device(), want.rank.effective_rank.device());
  EXPECT_TRUE(at::allclose(as_double_cpu(got.dead_fraction), as_double_cpu(want.dead_fraction), 0.0, 0.0));
  ASSERT_EQ(got.active_fraction.size(), want.active_fraction.size());
  for (size_t i = 0; i < got.active_fraction.size(); ++i) {
    EXPECT_TRUE(at::equal(as_double_cpu(got.active_fraction[i]), as_double_cpu(want.active_fraction[i]))) << i;
  }
  for (int64_t i = 0; i < static_cast<int64_t>(got.names.size()); ++i) {
    // The ranks' sum is ΦᵀΦ; one process may solve the smaller ΦΦᵀ: the same σ² to rounding.
    EXPECT_CLOSE(value(got.rank.effective_rank[i]), value(want.rank.effective_rank[i]), 1e-7) << "layer " << i;
    EXPECT_CLOSE(value(got.rank.stable_rank[i]), value(want.rank.stable_rank[i]), 1e-7) << "layer " << i;
  }
  EXPECT_EQ(to_vector(got.rank.approximate_rank), to_vector(want.rank.approximate_rank));
  EXPECT_EQ(to_vector(got.rank.abs_approximate_rank), to_vector(want.rank.abs_approximate_rank));
}

class RepresentationAcrossRanksTest : public testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) SKIP_WITHOUT_CUDA();
  }
  at::TensorOptions opts() const {
    return at::TensorOptions().dtype(at::kFloat).device(GetParam() ? cuda0() : at::Device(at::kCPU));
  }

  // Each rank streams its contiguous part of x in batches of `batch` rows (a rank whose part is
  // empty adds one zero-row batch), then the results are combined.
  std::vector<RepresentationMetrics> across(const Net& net, const at::Tensor& x, int64_t world, int64_t batch,
                                            const RepresentationOptions& o) const {
    const std::vector<at::Tensor> parts = x.tensor_split(world);
    return collect_ranks<RepresentationMetrics>(
        world, [&](int64_t rank, const RankGroup& group) {
          RepresentationAccumulator acc(kNames, o);
          const at::Tensor& part = parts[rank];
          if (part.size(0) == 0) acc.add(net(part));
          for (int64_t s = 0; s < part.size(0); s += batch) acc.add(net(part.narrow(0, s, std::min(batch, part.size(0) - s))));
          acc.add(net(part.narrow(0, 0, 0)));  // a zero-row batch changes nothing
          return acc.result(group);
        });
  }

  RepresentationMetrics whole(const Net& net, const at::Tensor& x, const RepresentationOptions& o) const {
    RepresentationAccumulator acc(kNames, o);
    acc.add(net(x));
    return acc.result();
  }
};

TEST_P(RepresentationAcrossRanksTest, EqualsTheWholeProbeSet) {
  const Net net(opts());
  for (int64_t n : {20, 61}) {  // 20: ranks hold fewer rows than the 16 units; 61: more
    const at::Tensor x = at::randn({n, 10}, opts());
    const RepresentationMetrics want = whole(net, x, options());
    EXPECT_GE(to_vector(want.dead_units)[0], 3);
    for (int64_t world : {2, 3}) {
      for (const RepresentationMetrics& got : across(net, x, world, 7, options())) {
        expect_same_metrics(got, want, "n = " + std::to_string(n) + ", W = " + std::to_string(world));
      }
    }
  }
}

TEST_P(RepresentationAcrossRanksTest, OneAllReduceAndEmptyRanks) {
  const Net net(opts());
  const at::Tensor x = at::randn({2, 10}, opts());  // W = 3: the last rank has no rows at all
  const RepresentationMetrics want = whole(net, x, options());
  const std::vector<at::Tensor> parts = x.tensor_split(3);
  std::atomic<int64_t> calls{0};
  const std::vector<RepresentationMetrics> got =
      collect_ranks<RepresentationMetrics>(3, [&](int64_t rank, const RankGroup& group) {
        const RankGroup counted(rank, 3, [&](at::Tensor& t) {
          ++calls;
          group.all_reduce_sum_(t);
        });
        RepresentationAccumulator acc(kNames, options());
        acc.add(net(parts[rank]));
        return acc.result(counted);
      });
  EXPECT_EQ(calls.load(), 3);  // one all-reduce per rank
  for (const RepresentationMetrics& m : got) expect_same_metrics(m, want, "two rows over three ranks");
}

TEST_P(RepresentationAcrossRanksTest, SvdMethodCombinesThroughTheGram) {
  const Net net(opts());
  const at::Tensor x = at::randn({30, 10}, opts());
  const auto o = options(trainscope::RankMethod::kSvd);
  const RepresentationMetrics want = whole(net, x, o);
  for (const RepresentationMetrics& got : across(net, x, 2, 8, o)) {
    EXPECT_EQ(to_vector(got.dead_units), to_vector(want.dead_units));
    for (int64_t i = 0; i < 3; ++i) {
      EXPECT_CLOSE(value(got.rank.effective_rank[i]), value(want.rank.effective_rank[i]), 1e-6) << i;
    }
  }
}

// A NaN in one rank's part: the summed ΦᵀΦ of its layers is NaN, so every rank reads NaN and −1
// for them (as one process on the whole set does), the other layers exact; no rank throws.
TEST_P(RepresentationAcrossRanksTest, NonFiniteOnOneRankIsUndefinedOnEveryRank) {
  const Net net(opts());
  at::Tensor x = at::randn({40, 10}, opts());
  // The last example (the last rank's): NaN in the tanh layer only (w2 reads relu(x w1) only).
  const auto nan_in_tanh = [&](const at::Tensor& batch) {
    std::vector<at::Tensor> h = net(batch);
    if (batch.size(0) > 0 && at::equal(batch[-1], x[-1])) h[1][-1][4] = std::numeric_limits<double>::quiet_NaN();
    return h;
  };
  RepresentationAccumulator one(kNames, options());
  one.add(nan_in_tanh(x));
  const RepresentationMetrics want = one.result();
  EXPECT_EQ(to_vector(want.rank.approximate_rank)[1], -1);
  for (int64_t world : {2, 3}) {
    const std::vector<at::Tensor> parts = x.tensor_split(world);
    const std::vector<RepresentationMetrics> got =
        collect_ranks<RepresentationMetrics>(world, [&](int64_t rank, const RankGroup& group) {
          RepresentationAccumulator acc(kNames, options());
          acc.add(nan_in_tanh(parts[rank]));
          return acc.result(group);
        });
    for (const RepresentationMetrics& m : got) {
      SCOPED_TRACE("W = " + std::to_string(world));
      EXPECT_EQ(to_vector(m.dead_units), to_vector(want.dead_units));
      EXPECT_TRUE(std::isnan(value(m.rank.effective_rank[1])));
      EXPECT_TRUE(std::isnan(value(m.rank.stable_rank[1])));
      EXPECT_EQ(to_vector(m.rank.approximate_rank)[1], -1);
      EXPECT_EQ(to_vector(m.rank.abs_approximate_rank)[1], -1);
      for (int64_t i : {0, 2}) {
        EXPECT_CLOSE(value(m.rank.effective_rank[i]), value(want.rank.effective_rank[i]), 1e-7) << "layer " << i;
        EXPECT_EQ(to_vector(m.rank.approximate_rank)[i], to_vector(want.rank.approximate_rank)[i]) << "layer " << i;
      }
    }
  }
}

TEST_P(RepresentationAcrossRanksTest, AGroupOfOneIsResult) {
  const Net net(opts());
  RepresentationAccumulator acc(kNames, options());
  acc.add(net(at::randn({9, 10}, opts())));
  EXPECT_EQ(acc.units(), (std::vector<int64_t>{16, 12, 4}));
  const RepresentationMetrics a = acc.result(), b = acc.result(RankGroup());
  EXPECT_TRUE(at::equal(a.rank.effective_rank, b.rank.effective_rank));
  EXPECT_TRUE(at::equal(a.dead_units, b.dead_units));
  EXPECT_EQ(a.observations, b.observations);
}

INSTANTIATE_TEST_SUITE_P(Devices, RepresentationAcrossRanksTest, testing::Values(false, true),
                         [](const testing::TestParamInfo<bool>& info) { return info.param ? "cuda" : "cpu"; });

TEST(RepresentationAcrossRanksErrors, EveryRankNeedsABatch) {
  RepresentationAccumulator acc(kNames, options());
  EXPECT_EQ(acc.units(), (std::vector<int64_t>{-1, -1, -1}));
  expect_error_naming([&] { acc.result(unreachable_group(1, 2)); }, "no batch", "no batch on this rank");
}

}  // namespace
