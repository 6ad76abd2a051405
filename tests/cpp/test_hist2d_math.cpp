// Torch-free, CPU-only tests of the host/device helpers in cuda/hist2d.h: the pair binning
// (SPEC.md §2 grad_hist2d with the §4 rule per axis), the axis checks, and the work plan — items
// tile every [B, P] matrix exactly once, and the kernel's slot walk (hist2d_slot) visits every
// element of an item exactly once.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cuda/hist2d.h"
#include "tests/cpp/reference_bin.h"

namespace {

namespace tc = trainscope::cuda;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Binning

TEST(Hist2dBinTest, FlatIndexIsGradBinTimesNbinsParamPlusParamBin) {
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> g(-0.07, 0.07), p(-1.3, 1.3);
  for (int64_t nbg : {int64_t{1}, int64_t{3}, int64_t{100}, int64_t{4096}}) {
    for (int64_t nbp : {int64_t{1}, int64_t{2}, int64_t{100}, int64_t{4096}}) {
      const tc::HistSpec gs = tc::make_hist_spec(nbg, 0.05), ps = tc::make_hist_spec(nbp, 1.0);
      for (int i = 0; i < 2000; ++i) {
        const double x = g(rng), y = p(rng);
        const int64_t want = reference_bin(x, nbg, 0.05) * nbp + reference_bin(y, nbp, 1.0);
        ASSERT_EQ(tc::hist2d_bin(x, y, gs, ps), want) << "g=" << x << " p=" << y << " nbins " << nbg << "x" << nbp;
        ASSERT_EQ(tc::hist2d_flat_bin(x, tc::hist2d_param_bin(y, ps), gs, nbp), want);
      }
    }
  }
}

TEST(Hist2dBinTest, EdgesAndOutliersOnEachAxis) {
  const tc::HistSpec gs = tc::make_hist_spec(10, 0.05), ps = tc::make_hist_spec(4, 1.0);
  EXPECT_EQ(tc::hist2d_bin(-0.05, -1.0, gs, ps), 0);
  EXPECT_EQ(tc::hist2d_bin(0.05, 1.0, gs, ps), 9 * 4 + 3);   // x = maxval: last bin on both axes
  EXPECT_EQ(tc::hist2d_bin(1e30, -1e30, gs, ps), 9 * 4 + 0);  // outliers pile into the edge bins
  EXPECT_EQ(tc::hist2d_bin(-1e30, 7.0, gs, ps), 0 * 4 + 3);
  EXPECT_EQ(tc::hist2d_bin(0.0, 0.0, gs, ps), 5 * 4 + 2);     // 0 opens the upper half
  EXPECT_EQ(tc::hist2d_bin(-0.0, -0.0, gs, ps), 5 * 4 + 2);
  EXPECT_EQ(tc::hist2d_bin(std::nextafter(0.05, 0.0), 0.5, gs, ps), 9 * 4 + 3);
}

TEST(Hist2dBinTest, ExactEdgesOnDyadicAxes) {
  // Dyadic ranges: every edge is exact, and opens the bin with its index.
  const int64_t nbg = 64, nbp = 8;
  const tc::HistSpec gs = tc::make_hist_spec(nbg, 0.0625), ps = tc::make_hist_spec(nbp, 1.0);
  const double wg = 2 * 0.0625 / nbg, wp = 2.0 / nbp;
  for (int64_t i = 0; i < nbg; ++i) {
    for (int64_t j = 0; j < nbp; ++j) {
      ASSERT_EQ(tc::hist2d_bin(-0.0625 + i * wg, -1.0 + j * wp, gs, ps), i * nbp + j);
      if (i > 0 && j > 0) {
        ASSERT_EQ(tc::hist2d_bin(-0.0625 + i * wg - wg / 1024, -1.0 + j * wp - wp / 1024, gs, ps),
                  (i - 1) * nbp + (j - 1));
      }
    }
  }
}

TEST(Hist2dBinTest, NonFiniteOnEitherSideIsNotBinned) {
  const tc::HistSpec gs = tc::make_hist_spec(100, 0.05), ps = tc::make_hist_spec(100, 1.0);
  for (double bad : {kNaN, kInf, -kInf}) {
    EXPECT_EQ(tc::hist2d_bin(bad, 0.3, gs, ps), -1) << bad;
    EXPECT_EQ(tc::hist2d_bin(0.01, bad, gs, ps), -1) << bad;
    EXPECT_EQ(tc::hist2d_bin(bad, bad, gs, ps), -1) << bad;
    EXPECT_EQ(tc::hist2d_param_bin(bad, ps), -1) << bad;
    EXPECT_EQ(tc::hist2d_flat_bin(bad, 7, gs, 100), -1) << bad;
  }
  EXPECT_EQ(tc::hist2d_flat_bin(0.01, -1, gs, 100), -1);  // a non-finite parameter's bin
  EXPECT_GE(tc::hist2d_bin(std::numeric_limits<double>::max(), -std::numeric_limits<double>::max(), gs, ps), 0);
}

TEST(Hist2dBinTest, LargestHistogramFitsTheFlatIndex) {
  // nbins_grad · nbins_param = 2^24: the last flat index is 2^24 − 1, an int32.
  const int64_t nbg = int64_t{1} << 12, nbp = int64_t{1} << 12;
  ASSERT_EQ(nbg * nbp, tc::kMaxHist2dBins);
  const tc::HistSpec gs = tc::make_hist_spec(nbg, 0.05), ps = tc::make_hist_spec(nbp, 1.0);
  EXPECT_EQ(tc::hist2d_bin(1.0, 2.0, gs, ps), tc::kMaxHist2dBins - 1);
  // One axis at the 1-D limit of 2^20 bins, the other 16.
  const tc::HistSpec wide = tc::make_hist_spec(tc::kMaxHistBins, 0.05), narrow = tc::make_hist_spec(16, 1.0);
  EXPECT_EQ(tc::hist2d_bin(0.05, 1.0, wide, narrow), tc::kMaxHistBins * 16 - 1);
  EXPECT_EQ(tc::hist2d_bin(1.0, 0.05, narrow, wide), 16 * tc::kMaxHistBins - 1);
}

TEST(Hist2dAxisTest, AcceptsOnlyUsableAxes) {
  EXPECT_TRUE(tc::hist2d_axis_ok(tc::make_hist_spec(100, 0.05)));
  EXPECT_TRUE(tc::hist2d_axis_ok(tc::make_hist_spec(1, 1e-300)));
  EXPECT_TRUE(tc::hist2d_axis_ok(tc::make_hist_spec(tc::kMaxHistBins, 1e300)));
  EXPECT_FALSE(tc::hist2d_axis_ok(tc::make_hist_spec(tc::kMaxHistBins + 1, 1.0)));
  EXPECT_FALSE(tc::hist2d_axis_ok(tc::make_hist_spec(0, 1.0)));
  EXPECT_FALSE(tc::hist2d_axis_ok(tc::make_hist_spec(-3, 1.0)));
  for (double m : {0.0, -1.0, kNaN, kInf, -kInf, 1e-320}) {
    EXPECT_FALSE(tc::hist2d_axis_ok(tc::make_hist_spec(100, m))) << m;
  }
}

// ---------------------------------------------------------------------------------------------
// Work plan

// (B, P) shapes around the window width, the narrow/wide switch and the rows of an item.
std::vector<std::pair<int64_t, int64_t>> plan_shapes() {
  std::vector<std::pair<int64_t, int64_t>> shapes;
  const int64_t W = tc::kHist2dWindow, R = tc::kHist2dPassesPerItem;
  for (int64_t b : {int64_t{1}, int64_t{2}, int64_t{3}, R - 1, R, R + 1, 2 * R + 5, int64_t{100}}) {
    for (int64_t p : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{7}, int64_t{100}, int64_t{1000}, W / 2 - 1,
                      W / 2, W / 2 + 1, W - 1, W, W + 1, 2 * W, 3 * W - 5, int64_t{10000}}) {
      shapes.emplace_back(b, p);
    }
  }
  shapes.emplace_back(4096, 1);
  shapes.emplace_back(5000, 3);
  shapes.emplace_back(37, 683);
  return shapes;
}

TEST(Hist2dPlanTest, EmptyPairsHaveNoItems) {
  for (auto [b, p] : {std::pair<int64_t, int64_t>{0, 10}, {10, 0}, {0, 0}}) {
    EXPECT_EQ(tc::hist2d_plan(b, p).items, 0) << b << "x" << p;
  }
}

TEST(Hist2dPlanTest, WideAndNarrowPairs) {
  const int64_t W = tc::kHist2dWindow, R = tc::kHist2dPassesPerItem;
  tc::Hist2dPlan wide = tc::hist2d_plan(64, 3 * W + 1);
  EXPECT_EQ(wide.rows_per_pass, 1);
  EXPECT_EQ(wide.col_tiles, 4);
  EXPECT_EQ(wide.row_groups, tc::ceil_div(64, R));
  EXPECT_EQ(wide.items, wide.col_tiles * wide.row_groups);
  tc::Hist2dPlan narrow = tc::hist2d_plan(1000, 100);
  EXPECT_EQ(narrow.rows_per_pass, W / 100);
  EXPECT_EQ(narrow.col_tiles, 1);
  EXPECT_EQ(narrow.row_groups, tc::ceil_div(1000, (W / 100) * R));
  tc::Hist2dPlan one = tc::hist2d_plan(3, 1);
  EXPECT_EQ(one.rows_per_pass, W);
  EXPECT_EQ(one.items, 1);
}

TEST(Hist2dPlanTest, ItemsTileTheMatrixExactlyOnce) {
  for (auto [b, p] : plan_shapes()) {
    SCOPED_TRACE(testing::Message() << "B=" << b << " P=" << p);
    const tc::Hist2dPlan plan = tc::hist2d_plan(b, p);
    ASSERT_GT(plan.items, 0);
    std::vector<uint8_t> seen(static_cast<size_t>(b * p), 0);
    for (int64_t i = 0; i < plan.items; ++i) {
      const tc::Hist2dItem it = tc::hist2d_item(plan, b, p, i);
      ASSERT_LT(it.row_begin, it.row_end) << "item " << i;
      ASSERT_LT(it.col_begin, it.col_end) << "item " << i;
      ASSERT_LE(it.row_end, b);
      ASSERT_LE(it.col_end, p);
      ASSERT_LE(it.col_end - it.col_begin, tc::kHist2dWindow);
      ASSERT_LE(it.row_end - it.row_begin, plan.rows_per_pass * tc::kHist2dPassesPerItem);
      ASSERT_LE((it.row_end - it.row_begin) * (it.col_end - it.col_begin),
                tc::kHist2dWindow * tc::kHist2dPassesPerItem);
      for (int64_t r = it.row_begin; r < it.row_end; ++r) {
        for (int64_t c = it.col_begin; c < it.col_end; ++c) ++seen[static_cast<size_t>(r * p + c)];
      }
    }
    ASSERT_EQ(std::count(seen.begin(), seen.end(), uint8_t{1}), b * p);
  }
}

TEST(Hist2dPlanTest, SlotWalkVisitsEveryElementOfAnItemOnce) {
  // The kernel's walk: slot s reads element (item start) + pass·rows_per_pass·P + s of its passes
  // and bins it against parameter col_begin + slot.col.
  for (auto [b, p] : plan_shapes()) {
    SCOPED_TRACE(testing::Message() << "B=" << b << " P=" << p);
    const tc::Hist2dPlan plan = tc::hist2d_plan(b, p);
    std::vector<uint8_t> seen(static_cast<size_t>(b * p), 0);
    for (int64_t i = 0; i < plan.items; ++i) {
      const tc::Hist2dItem it = tc::hist2d_item(plan, b, p, i);
      const int64_t base = it.row_begin * p + it.col_begin;
      for (int32_t s = 0; s < static_cast<int32_t>(tc::kHist2dWindow); ++s) {
        const tc::Hist2dSlot slot = tc::hist2d_slot(it, plan.rows_per_pass, s);
        ASSERT_GE(slot.passes, 0);
        ASSERT_LE(slot.passes, tc::kHist2dPassesPerItem);
        for (int32_t pass = 0; pass < slot.passes; ++pass) {
          const int64_t e = base + pass * plan.rows_per_pass * p + s;
          ASSERT_LT(e, b * p) << "item " << i << " slot " << s << " pass " << pass;
          const int64_t row = e / p, col = e % p;
          ASSERT_GE(row, it.row_begin);
          ASSERT_LT(row, it.row_end);
          ASSERT_EQ(col, it.col_begin + slot.col) << "item " << i << " slot " << s;
          ++seen[static_cast<size_t>(e)];
        }
      }
    }
    ASSERT_EQ(std::count(seen.begin(), seen.end(), uint8_t{1}), b * p);
  }
}

TEST(Hist2dPlanTest, FindPairSkipsPairsWithoutItems) {
  // Items per pair 3, 0, 2, 0, 0, 4: first_item 0, 3, 3, 5, 5, 5.
  const std::vector<int64_t> first = {0, 3, 3, 5, 5, 5};
  const int64_t want[] = {0, 0, 0, 2, 2, 5, 5, 5, 5};
  for (int64_t item = 0; item < 9; ++item) {
    EXPECT_EQ(tc::find_owner(first.data(), static_cast<int64_t>(first.size()), item), want[item]) << item;
  }
  const int64_t single = 0;
  EXPECT_EQ(tc::find_owner(&single, 1, 0), 0);
  EXPECT_EQ(tc::find_owner(&single, 1, 1000), 0);
}

TEST(Hist2dPlanTest, SixtyFourBitSizes) {
  // 2^33 elements in one pair: item arithmetic stays exact in int64.
  const int64_t b = 4, p = int64_t{1} << 31;
  const tc::Hist2dPlan plan = tc::hist2d_plan(b, p);
  EXPECT_EQ(plan.rows_per_pass, 1);
  EXPECT_EQ(plan.col_tiles, p / tc::kHist2dWindow);
  EXPECT_EQ(plan.items, plan.col_tiles);
  const tc::Hist2dItem last = tc::hist2d_item(plan, b, p, plan.items - 1);
  EXPECT_EQ(last.col_end, p);
  EXPECT_EQ(last.col_begin, p - tc::kHist2dWindow);
  EXPECT_EQ(last.row_end, b);
  const tc::Hist2dPlan tall = tc::hist2d_plan(int64_t{1} << 32, 3);
  EXPECT_EQ(tall.rows_per_pass, tc::kHist2dWindow / 3);
  const tc::Hist2dItem end = tc::hist2d_item(tall, int64_t{1} << 32, 3, tall.items - 1);
  EXPECT_EQ(end.row_end, int64_t{1} << 32);
}

}  // namespace
