// Cross-rank parameter metrics and the Monitor over ranks (trainscope/distributed.h), with the
// ranks run as threads (thread_ranks.h): every rank's result equals the single-process result on
// the whole tensors. The torch.distributed path itself (c10d process groups over Gloo) is tested
// from Python with 2 and 3 processes (tests/python/test_distributed_*.py). Last, the cache that
// puts a layout's constants on the device (src/device_constants.h).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/cuda.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "src/device_constants.h"
#include "tests/cpp/thread_ranks.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/distributed.h"
#include "trainscope/monitor.h"
#include "trainscope/param_stats.h"

namespace {

using trainscope::Placement;
using trainscope::TensorLayout;
using trainscope_test::as_double_cpu;
using trainscope_test::expect_error_naming;
using trainscope_test::ThreadRanks;

struct Lists {
  std::vector<at::Tensor> grads, params, init, prev;
};

Lists make_lists(at::ScalarType dtype) {
  at::manual_seed(17);
  const std::vector<std::vector<int64_t>> shapes = {{7, 5}, {3}, {2}, {4, 3, 2}};
  Lists l;
  for (const auto& s : shapes) {
    const at::Tensor p = at::randn(s, at::kDouble);
    l.params.push_back(p.to(dtype));
    l.init.push_back((p + 0.1 * at::randn(s, at::kDouble)).to(dtype));
    l.prev.push_back((p + 0.01 * at::randn(s, at::kDouble)).to(dtype));
    l.grads.push_back((0.03 * at::randn(s, at::kDouble)).to(dtype));
  }
  l.grads[0].view({-1})[2] = std::numeric_limits<double>::infinity();
  return l;
}

std::vector<at::Tensor> shards(const std::vector<at::Tensor>& ts, int64_t rank, int64_t size) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.flatten().tensor_split(size)[rank].clone());
  return out;
}

void expect_same_stats(const trainscope::ParamStats& got, const trainscope::ParamStats& want, double rel,
                       const std::string& what) {
  ASSERT_EQ(got.metrics.scalar_type(), want.metrics.scalar_type()) << what;
  const at::Tensor gm = as_double_cpu(got.metrics), wm = as_double_cpu(want.metrics);
  for (int64_t i = 0; i < wm.numel(); ++i) {
    EXPECT_CLOSE(gm[i].item<double>(), wm[i].item<double>(), rel) << what << " metric " << i;
  }
  const at::Tensor gp = as_double_cpu(got.per_tensor).reshape({-1}), wp = as_double_cpu(want.per_tensor).reshape({-1});
  for (int64_t i = 0; i < wp.numel(); ++i) {
    EXPECT_CLOSE(gp[i].item<double>(), wp[i].item<double>(), rel) << what << " per-tensor value " << i;
  }
  EXPECT_TRUE(at::equal(got.nonfinite, want.nonfinite)) << what;
  EXPECT_TRUE(at::equal(got.nonfinite_per_tensor, want.nonfinite_per_tensor)) << what;
  EXPECT_TRUE(at::equal(got.hist, want.hist)) << what;
  EXPECT_TRUE(at::equal(got.hist_per_tensor, want.hist_per_tensor)) << what;
}

class ParamStatsAcrossRanks : public ::testing::TestWithParam<std::tuple<int64_t, at::ScalarType>> {};

TEST_P(ParamStatsAcrossRanks, ShardedAndReplicatedEqualOneProcess) {
  const auto [size, dtype] = GetParam();
  const Lists l = make_lists(dtype);
  const double rel = dtype == at::kDouble ? 1e-12 : 1e-5;
  trainscope::ParamStatsOptions o;
  o.nbins = 16;
  o.weights_matrices_only = true;
  const trainscope::ParamStats want = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o);
  trainscope::ParamStatsOptions o_all = o;
  o_all.weights_matrices_only = false;
  const trainscope::ParamStats want_all = trainscope::param_stats(l.grads, l.params, l.init, l.prev, o_all);

  std::vector<TensorLayout> sharded;
  for (const at::Tensor& p : l.params) sharded.push_back({Placement::kSharded, p.dim()});
  std::mutex mu;
  std::vector<at::Tensor> extras(size);
  ThreadRanks ranks(size);
  ranks.run([&](int64_t rank, const trainscope::RankGroup& group) {
    at::Tensor extra = at::full({2}, static_cast<double>(rank + 1), at::kDouble);
    const trainscope::ParamStats s = trainscope::param_stats_across_ranks(
        shards(l.grads, rank, size), shards(l.params, rank, size), shards(l.init, rank, size),
        shards(l.prev, rank, size), sharded, group, o, &extra);
    // DDP-style: whole tensors everywhere; a rank other than 0 holding different values must not count.
    std::vector<at::Tensor> grads = l.grads;
    if (rank == 1) grads[1] = grads[1] + 5.0;
    const trainscope::ParamStats r =
        trainscope::param_stats_across_ranks(grads, l.params, l.init, l.prev, {}, group, o_all);
    std::lock_guard<std::mutex> lock(mu);
    expect_same_stats(s, want, rel, "sharded, rank " + std::to_string(rank));
    expect_same_stats(r, want_all, rel, "replicated, rank " + std::to_string(rank));
    extras[rank] = extra;
  });
  const double sum = static_cast<double>(size * (size + 1) / 2);
  for (const at::Tensor& e : extras) EXPECT_TRUE(at::equal(e, at::full({2}, sum, at::kDouble)));
}

INSTANTIATE_TEST_SUITE_P(Ranks, ParamStatsAcrossRanks,
                         ::testing::Combine(::testing::Values<int64_t>(2, 3),
                                            ::testing::Values(at::kFloat, at::kDouble)));

TEST(ParamStatsAcrossRanks, OneProcessIsParamStats) {
  const Lists l = make_lists(at::kFloat);
  const trainscope::ParamStats got =
      trainscope::param_stats_across_ranks(l.grads, l.params, l.init, l.prev, {}, trainscope::RankGroup());
  const trainscope::ParamStats want = trainscope::param_stats(l.grads, l.params, l.init, l.prev);
  expect_same_stats(got, want, 0.0, "one process");
}

TEST(LossAcrossRanks, IsTheMeanOfTheConcatenatedLosses) {
  const at::Tensor losses = at::rand({10}, at::kFloat);
  ThreadRanks ranks(3);
  std::mutex mu;
  ranks.run([&](int64_t rank, const trainscope::RankGroup& group) {
    const at::Tensor got = trainscope::loss_across_ranks(losses.tensor_split(3)[rank], group);
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(got.scalar_type(), at::kFloat);
    EXPECT_CLOSE(got.item<double>(), losses.to(at::kDouble).mean().item<double>(), 1e-6);
  });
}

TEST(RankGroup, BadArgumentsAreNamed) {
  expect_error_naming([] { trainscope::RankGroup(2, 2, [](at::Tensor&) {}); }, "rank", "rank out of range");
  expect_error_naming([] { trainscope::RankGroup(0, 0, [](at::Tensor&) {}); }, "size", "empty group");
  expect_error_naming([] { trainscope::RankGroup(0, 2, nullptr); }, "all_reduce_sum", "no reducer");
  expect_error_naming([] { trainscope::RankGroup::from_process_group("no-such-group"); }, "process_group",
                      "unknown group");
  expect_error_naming([] { trainscope::parse_placement("split"); }, "placement", "bad placement");
  const Lists l = make_lists(at::kFloat);
  expect_error_naming(
      [&] {
        trainscope::param_stats_across_ranks(l.grads, l.params, {}, {}, {TensorLayout{}}, trainscope::RankGroup());
      },
      "layouts", "layouts of the wrong length");
  const trainscope::RankGroup one;
  EXPECT_EQ(one.rank(), 0);
  EXPECT_EQ(one.size(), 1);
  EXPECT_FALSE(one.is_distributed());
  EXPECT_EQ(trainscope::RankGroup::from_process_group("").size(), 1);
}

// The Monitor over ranks: rank 0's records equal a one-process Monitor's on the whole tensors;
// other ranks hand nothing to their sinks.
using Records = std::vector<trainscope::StepRecord>;

Records monitor_records(const std::vector<std::pair<std::string, at::Tensor>>& named,
                        const std::function<std::vector<at::Tensor>()>& grads_of_step, trainscope::MonitorConfig cfg,
                        const std::function<void(int64_t)>& update, at::Tensor losses) {
  Records records;
  trainscope::Monitor monitor(named, cfg);
  monitor.add_sink([&](const trainscope::StepRecord& r) { records.push_back(r); });
  for (int64_t step = 0; step < 3; ++step) {
    update(step);
    monitor.step(step, losses, {}, {}, {}, grads_of_step());
  }
  monitor.flush();
  return records;
}

TEST(MonitorAcrossRanks, RankZeroRecordsTheWholeTensors) {
  const int64_t size = 3;
  at::manual_seed(5);
  const at::Tensor w = at::randn({6, 4}, at::kDouble), b = at::randn({5}, at::kDouble);
  const at::Tensor gw = 0.01 * at::randn({6, 4}, at::kDouble), gb = 0.01 * at::randn({5}, at::kDouble);
  const at::Tensor losses = at::rand({9}, at::kDouble);
  trainscope::MonitorConfig cfg;
  cfg.nbins = 8;
  cfg.weights_matrices_only = true;

  // One process: the whole tensors, updated by w -= 0.1 g at each step.
  at::Tensor w1 = w.clone(), b1 = b.clone();
  const Records want = monitor_records(
      {{"w", w1}, {"b", b1}}, [&] { return std::vector<at::Tensor>{gw, gb}; }, cfg,
      [&](int64_t) {
        w1.sub_(0.1 * gw);
        b1.sub_(0.1 * gb);
      },
      losses);

  std::vector<Records> got(size);
  ThreadRanks ranks(size);
  ranks.run([&](int64_t rank, const trainscope::RankGroup& group) {
    // w sharded (flat shards, as FSDP1's), b replicated.
    at::Tensor ws = w.flatten().tensor_split(size)[rank].clone(), bs = b.clone();
    const at::Tensor gws = gw.flatten().tensor_split(size)[rank].clone();
    trainscope::MonitorConfig c = cfg;
    c.group = group;
    c.layouts = {{Placement::kSharded, 2}, {Placement::kReplicated, -1}};
    got[rank] = monitor_records(
        {{"w", ws}, {"b", bs}}, [&] { return std::vector<at::Tensor>{gws, gb}; }, c,
        [&](int64_t) {
          ws.sub_(0.1 * gws);
          bs.sub_(0.1 * gb);
        },
        losses.tensor_split(size)[rank]);
  });
  ASSERT_EQ(got[0].size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(got[0][i].scalars.size(), want[i].scalars.size());
    for (size_t k = 0; k < want[i].scalars.size(); ++k) {
      EXPECT_EQ(got[0][i].scalars[k].first, want[i].scalars[k].first);
      EXPECT_CLOSE(got[0][i].scalars[k].second, want[i].scalars[k].second, 1e-12) << want[i].scalars[k].first;
    }
    ASSERT_EQ(got[0][i].histograms.size(), 1u);
    EXPECT_EQ(got[0][i].histograms[0].counts, want[i].histograms[0].counts);
  }
  for (int64_t r = 1; r < size; ++r) EXPECT_TRUE(got[r].empty()) << "rank " << r;
}

TEST(MonitorAcrossRanks, BadLayoutsAndGradsAreNamed) {
  const at::Tensor w = at::randn({3, 2});
  trainscope::MonitorConfig cfg;
  cfg.layouts = {TensorLayout{}, TensorLayout{}};
  expect_error_naming([&] { trainscope::Monitor m({{"w", w}}, cfg); }, "layouts", "layouts of the wrong length");
  trainscope::Monitor m({{"w", w}});
  expect_error_naming([&] { m.step(0, {}, {}, {}, {}, {w, w}); }, "grads", "grads of the wrong length");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Layout constants on the device (src/device_constants.h): copied once, never freed once a CUDA
// graph may read them, refused on a first use inside a capture.

namespace constants_test {

using trainscope::DeviceConstantCache;

std::vector<double> values_of(int k) { return {static_cast<double>(k), 1.0, 0.5}; }

TEST(DeviceConstantCache, CopiesOncePerDeviceAndValues) {
  DeviceConstantCache cache(8);
  const at::Device cpu(at::kCPU);
  const at::Tensor a = cache.get(values_of(1), cpu, false, "op");
  EXPECT_TRUE(at::equal(a, at::tensor(values_of(1), at::kDouble)));
  EXPECT_EQ(cache.get(values_of(1), cpu, false, "op").data_ptr(), a.data_ptr());
  EXPECT_NE(cache.get(values_of(2), cpu, false, "op").data_ptr(), a.data_ptr());
  EXPECT_EQ(cache.size(), 2u);
}

TEST(DeviceConstantCache, WhatACaptureReadIsNeverDropped) {
  DeviceConstantCache cache(4);
  const at::Device cpu(at::kCPU);
  const at::Tensor kept = cache.get(values_of(0), cpu, false, "op");
  EXPECT_EQ(cache.get(values_of(0), cpu, /*capturing=*/true, "op").data_ptr(), kept.data_ptr());
  EXPECT_EQ(cache.pinned(), 1u);
  for (int k = 1; k <= 50; ++k) cache.get(values_of(k), cpu, false, "op");
  EXPECT_LE(cache.size(), 5u);  // at most 4 unpinned, plus the pinned one
  EXPECT_EQ(cache.pinned(), 1u);
  // Still the same tensor: a graph replaying it reads live memory.
  EXPECT_EQ(cache.get(values_of(0), cpu, true, "op").data_ptr(), kept.data_ptr());
}

TEST(DeviceConstantCache, AFirstUseInsideACaptureIsRefused) {
  DeviceConstantCache cache(4);
  try {
    cache.get(values_of(7), at::Device(at::kCPU), /*capturing=*/true, "trainscope::param_stats_across_ranks");
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("trainscope::param_stats_across_ranks"), std::string::npos) << msg;
    EXPECT_NE(msg.find("CUDA graph capture"), std::string::npos) << msg;
    EXPECT_NE(msg.find("eagerly before capturing"), std::string::npos) << msg;
  }
  EXPECT_EQ(cache.size(), 0u);
}

// On a GPU: param_stats_across_ranks with layouts (its constants go through the cache) captured
// after one eager call, replayed after more than the cache's 64 other layouts have passed through.
#if defined(TRAINSCOPE_WITH_CUDA)
TEST(DeviceConstantCache, CapturedCrossRankStatsReplayAfterManyOtherLayouts) {
  SKIP_WITHOUT_CUDA();
  const at::Device dev = trainscope_test::cuda0();
  std::vector<at::Tensor> grads, params;
  for (const std::vector<int64_t>& s : {std::vector<int64_t>{33, 7}, std::vector<int64_t>{19}}) {
    grads.push_back(at::randn(s, at::TensorOptions().device(dev)));
    params.push_back(at::randn(s, at::TensorOptions().device(dev)));
  }
  const std::vector<TensorLayout> layouts = {{Placement::kSharded, 2}, {Placement::kSharded, 1}};
  trainscope::ParamStatsOptions o;
  o.nbins = 8;
  at::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::cuda::CUDAGraph graph;
  trainscope::ParamStats captured;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    // Never seen: refused inside a capture, with the capture then abandoned cleanly.
    at::cuda::CUDAGraph refused;
    refused.capture_begin();
    EXPECT_THROW(trainscope::param_stats_across_ranks(grads, params, {}, {}, layouts, trainscope::RankGroup(), o),
                 c10::Error);
    try {
      refused.capture_end();
    } catch (const c10::Error&) {
    }
  }
  torch::cuda::synchronize();
  {
    c10::cuda::CUDAStreamGuard guard(side);
    trainscope::param_stats_across_ranks(grads, params, {}, {}, layouts, trainscope::RankGroup(), o);  // eager
    graph.capture_begin();
    captured = trainscope::param_stats_across_ranks(grads, params, {}, {}, layouts, trainscope::RankGroup(), o);
    graph.capture_end();
  }
  torch::cuda::synchronize();
  for (int64_t k = 0; k < 100; ++k) {  // other layouts (other numels): unpinned entries are dropped on the way
    const std::vector<at::Tensor> g = {at::randn({k + 1}, at::TensorOptions().device(dev))};
    trainscope::param_stats_across_ranks(g, g, {}, {}, {{Placement::kSharded, 1}}, trainscope::RankGroup(), o);
  }
  for (int round = 0; round < 3; ++round) {
    for (at::Tensor& g : grads) g.normal_();
    graph.replay();
    const trainscope::ParamStats eager =
        trainscope::param_stats_across_ranks(grads, params, {}, {}, layouts, trainscope::RankGroup(), o);
    torch::cuda::synchronize();
    EXPECT_TRUE(at::equal(captured.metrics, eager.metrics)) << "round " << round;
    EXPECT_TRUE(at::equal(captured.per_tensor, eager.per_tensor)) << "round " << round;
    EXPECT_TRUE(at::equal(captured.hist, eager.hist)) << "round " << round;
  }
}
#endif

}  // namespace constants_test
