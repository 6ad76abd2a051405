// Per-sample statistics of a batch split over ranks (include/trainscope/distributed.h), with the
// ranks run as threads over an in-memory all-reduce (tests/cpp/thread_ranks.h):
// per_sample_stats_across_ranks and per_sample_stats_from_local_parts equal the single-process
// per_sample_stats on the concatenated batch (uneven splits, a rank of one sample, mixed dtypes,
// empty tensors, non-finite values), a group of one gives per_sample_stats's very bits, and bad
// input (a rank without samples) raises a c10::Error naming the argument before any collective.
// Each case runs on CPU, and on CUDA when a GPU is present (skipped otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "tests/cpp/thread_ranks.h"
#include "tests/cpp/torch_test_util.h"
#include "trainscope/distributed.h"
#include "trainscope/per_sample_stats.h"

namespace {

using namespace trainscope_test;
using trainscope::PerSampleOptions;
using trainscope::PerSampleParts;
using trainscope::PerSampleStats;
using trainscope::RankGroup;

using Shapes = std::vector<std::vector<int64_t>>;

// Matrices, a vector, an empty tensor, a scalar parameter ([B] per sample) and a 4-D kernel.
const Shapes kShapes = {{7, 5}, {33}, {3, 0}, {}, {4, 3, 3, 3}};

// gᵢ = μ + σ·noise in float64 on the CPU, then cast (dtypes alternate over the tensors).
std::vector<at::Tensor> make_grads(int64_t batch, const std::vector<at::ScalarType>& dtypes, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    std::vector<int64_t> full = {batch};
    full.insert(full.end(), kShapes[i].begin(), kShapes[i].end());
    const at::Tensor mu = 0.02 * at::randn(kShapes[i], gen, f64);
    out.push_back((mu.unsqueeze(0) + 0.03 * at::randn(full, gen, f64)).to(dtypes[i % dtypes.size()]));
  }
  return out;
}

std::vector<at::Tensor> rows_of(const std::vector<at::Tensor>& grads, int64_t start, int64_t count, at::Device d) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& g : grads) out.push_back(g.narrow(0, start, count).to(d));
  return out;
}

void expect_all_close(const at::Tensor& got, const at::Tensor& want, double rel, const char* what) {
  SCOPED_TRACE(what);
  const at::Tensor g = as_double_cpu(got), w = as_double_cpu(want);
  ASSERT_EQ(g.sizes(), w.sizes());
  for (int64_t i = 0; i < g.numel(); ++i) {
    EXPECT_CLOSE(g.reshape({-1})[i].item<double>(), w.reshape({-1})[i].item<double>(), rel) << "[" << i << "]";
  }
}

struct Split {
  std::vector<int64_t> sizes;  // B_r per rank
};

class PerSampleAcrossRanksTest : public testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) SKIP_WITHOUT_CUDA();
  }
  at::Device device() const { return GetParam() ? cuda0() : at::Device(at::kCPU); }

  // Every rank's result for the batch split as `split` says.
  std::vector<PerSampleStats> across(const std::vector<at::Tensor>& grads, const Split& split,
                                     const PerSampleOptions& o) const {
    std::vector<int64_t> starts{0};
    for (int64_t s : split.sizes) starts.push_back(starts.back() + s);
    const at::Device d = device();
    return collect_ranks<PerSampleStats>(
        static_cast<int64_t>(split.sizes.size()), [&](int64_t rank, const RankGroup& group) {
          return trainscope::per_sample_stats_across_ranks(rows_of(grads, starts[rank], split.sizes[rank], d),
                                                           group, o);
        });
  }
};

TEST_P(PerSampleAcrossRanksTest, EqualsTheConcatenatedBatch) {
  PerSampleOptions o;
  o.nbins = 16;
  for (const Split& split : {Split{{3, 8}}, Split{{1, 6, 4}}, Split{{5, 1}}}) {
    for (const auto& dtypes : {std::vector<at::ScalarType>{at::kDouble},
                               std::vector<at::ScalarType>{at::kFloat, at::kBFloat16, at::kDouble}}) {
      int64_t batch = 0;
      for (int64_t s : split.sizes) batch += s;
      const std::vector<at::Tensor> grads = make_grads(batch, dtypes, 11 + batch);
      const PerSampleStats want = trainscope::per_sample_stats(rows_of(grads, 0, batch, device()), o);
      const std::vector<PerSampleStats> got = across(grads, split, o);
      // Both read the same values and accumulate in float64: only the order of the sums differs.
      int64_t start = 0;
      for (size_t r = 0; r < got.size(); ++r) {
        SCOPED_TRACE("W = " + std::to_string(split.sizes.size()) + ", rank " + std::to_string(r) + ", " +
                     std::to_string(dtypes.size()) + " dtypes");
        const PerSampleStats& s = got[r];
        for (const at::Tensor* t : {&s.stats, &s.hist, &s.nonfinite, &s.parts.dots}) {
          EXPECT_EQ(t->device(), device());
        }
        expect_all_close(s.stats, want.stats, 1e-9, "stats");
        EXPECT_EQ(s.stats.scalar_type(), at::kDouble);
        EXPECT_EQ(to_vector(s.hist), to_vector(want.hist));
        EXPECT_EQ(s.hist.scalar_type(), at::kLong);
        EXPECT_EQ(to_vector(s.nonfinite), to_vector(want.nonfinite));
        // This rank's parts, taken against the global ḡ.
        const int64_t b = split.sizes[r];
        expect_all_close(s.parts.sq_norms, want.parts.sq_norms.narrow(0, start, b), 1e-12, "sq_norms");
        expect_all_close(s.parts.dots, want.parts.dots.narrow(0, start, b), 1e-9, "dots");
        expect_all_close(s.parts.mean_sq_norm, want.parts.mean_sq_norm, 1e-12, "mean_sq_norm");
        start += b;
        // Every rank holds the same bits.
        EXPECT_TRUE(bitwise_equal(s.stats, got[0].stats));
      }
    }
  }
}

TEST_P(PerSampleAcrossRanksTest, NonFiniteCountsAndHistogramsAddUp) {
  std::vector<at::Tensor> grads = make_grads(7, {at::kFloat}, 5);
  grads[0][1][2][3] = std::numeric_limits<double>::quiet_NaN();
  grads[1][6][0] = std::numeric_limits<double>::infinity();
  PerSampleOptions o;
  o.nbins = 9;
  o.maxval = 0.02;
  const PerSampleStats want = trainscope::per_sample_stats(rows_of(grads, 0, 7, device()), o);
  ASSERT_EQ(to_vector(want.nonfinite), std::vector<int64_t>{2});
  for (const PerSampleStats& s : across(grads, Split{{2, 2, 3}}, o)) {
    EXPECT_EQ(to_vector(s.nonfinite), std::vector<int64_t>{2});
    EXPECT_EQ(to_vector(s.hist), to_vector(want.hist));
  }
  o.histogram = false;
  for (const PerSampleStats& s : across(grads, Split{{4, 3}}, o)) {
    EXPECT_EQ(s.hist.numel(), 0);
    EXPECT_EQ(to_vector(s.nonfinite), std::vector<int64_t>{2});
  }
}

TEST_P(PerSampleAcrossRanksTest, AGroupOfOneIsPerSampleStats) {
  const std::vector<at::Tensor> grads = rows_of(make_grads(6, {at::kFloat, at::kDouble}, 3), 0, 6, device());
  const PerSampleStats want = trainscope::per_sample_stats(grads);
  for (const RankGroup& g : {RankGroup(), RankGroup(0, 1, [](at::Tensor&) {})}) {
    const PerSampleStats got = trainscope::per_sample_stats_across_ranks(grads, g);
    EXPECT_TRUE(bitwise_equal(got.stats, want.stats));
    EXPECT_TRUE(bitwise_equal(got.hist, want.hist));
    EXPECT_TRUE(bitwise_equal(got.parts.dots, want.parts.dots));
    at::Tensor extra = at::arange(3, at::TensorOptions().dtype(at::kDouble).device(device()));
    const at::Tensor before = extra.clone();
    EXPECT_TRUE(bitwise_equal(trainscope::per_sample_stats_from_local_parts(want.parts, g, &extra),
                              trainscope::per_sample_stats_from_parts(want.parts)));
    EXPECT_TRUE(bitwise_equal(extra, before));
  }
}

TEST_P(PerSampleAcrossRanksTest, LocalPartsCombineWithExtraSums) {
  // Parts against the global ḡ of a whole batch, cut into ranks' shares: the statistics of the whole.
  const std::vector<at::Tensor> grads = rows_of(make_grads(9, {at::kDouble}, 8), 0, 9, device());
  const PerSampleStats whole = trainscope::per_sample_stats(grads, PerSampleOptions{false, 1, 1.0});
  const std::vector<int64_t> starts{0, 2, 3, 9};
  const auto got = collect_ranks<std::vector<at::Tensor>>(3, [&](int64_t rank, const RankGroup& group) {
    const int64_t b = starts[rank + 1] - starts[rank];
    PerSampleParts local{whole.parts.sq_norms.narrow(0, starts[rank], b), whole.parts.dots.narrow(0, starts[rank], b),
                         whole.parts.mean_sq_norm};
    at::Tensor extra = at::full({2, 1}, static_cast<double>(rank + 1), whole.stats.options());
    at::Tensor stats = trainscope::per_sample_stats_from_local_parts(local, group, &extra);
    return std::vector<at::Tensor>{stats, extra};
  });
  for (const auto& r : got) {
    expect_all_close(r[0], whole.stats, 1e-12, "stats");
    EXPECT_EQ(r[1].sizes(), (std::vector<int64_t>{2, 1}));
    EXPECT_EQ(to_vector(r[1]), (std::vector<int64_t>{6, 6}));
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, PerSampleAcrossRanksTest, testing::Values(false, true),
                         [](const testing::TestParamInfo<bool>& info) { return info.param ? "cuda" : "cpu"; });

TEST(PerSampleAcrossRanksErrors, NameTheArgument) {
  const std::vector<at::Tensor> none = {at::zeros({0, 3}), at::zeros({0})};
  expect_error_naming([&] { trainscope::per_sample_stats_across_ranks(none, unreachable_group(1, 2)); },
                      "per_sample_grads", "a rank without samples");
  // One sample is enough on a rank of several; one process needs two.
  expect_error_naming(
      [&] { trainscope::per_sample_stats_across_ranks({at::ones({1, 3})}, RankGroup()); }, "B",
      "one process, one sample");
  expect_error_naming([&] { trainscope::per_sample_stats_across_ranks({}, unreachable_group(0, 2)); },
                      "per_sample_grads", "no tensors");
  expect_error_naming(
      [&] { trainscope::per_sample_stats_across_ranks({at::ones({2, 3}), at::ones({3, 3})}, unreachable_group(0, 2)); },
      "per_sample_grads", "batch sizes differ");
  PerSampleOptions bad;
  bad.nbins = 0;
  expect_error_naming([&] { trainscope::per_sample_stats_across_ranks({at::ones({2, 3})}, unreachable_group(0, 2), bad); },
                      "nbins", "nbins = 0");

  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const PerSampleParts empty{at::zeros({0}, f64), at::zeros({0}, f64), at::zeros({}, f64)};
  expect_error_naming([&] { trainscope::per_sample_stats_from_local_parts(empty, unreachable_group(0, 3)); },
                      "sq_norms", "parts of a rank without samples");
  const PerSampleParts one{at::ones({1}, f64), at::ones({1}, f64), at::ones({}, f64)};
  at::Tensor wrong = at::zeros({2}, at::TensorOptions().dtype(at::kFloat));
  expect_error_naming([&] { trainscope::per_sample_stats_from_local_parts(one, unreachable_group(0, 2), &wrong); },
                      "extra_sums", "float32 extra_sums");
  const PerSampleParts mismatched{at::ones({2}, f64), at::ones({3}, f64), at::ones({}, f64)};
  expect_error_naming(
      [&] { trainscope::per_sample_stats_from_local_parts(mismatched, unreachable_group(0, 2)); }, "dots",
      "dots of another length");
}

}  // namespace
