// The torch-free CUDA launcher per_sample_launch (cuda/per_sample_stats.cu) against a CPU float64
// reference written here from SPEC.md §2 and §4: random lists of per-sample gradients [B, cols]
// mixing dtypes, widths that are no multiple of any tile, misaligned tensors, empty tensors,
// lists longer than one launch group (96 tensors), B in {2, 3, 33, 128, 1000}, histograms on and
// off, bin counts too large for the shared-memory histogram, non-finite values, bitwise
// determinism, CUDA-graph capture, the kernel's shared-memory limit under graph replay and
// concurrent threads, batches too large to stage, and a workspace too small.
//
// Every test skips cleanly when no GPU is present: the launcher asks the device for its shared
// memory before it does anything else.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/per_sample_stats.h"
#include "tests/cpp/cuda_test_util.h"
#include "tests/cpp/reference_bin.h"

namespace {

using namespace trainscope_test;
namespace tc = trainscope::cuda;

constexpr int64_t kGroupTensors = 96;  // kMaxGroupTensors of the launcher: longer lists take several launches

// ---------------------------------------------------------------------------------------------
// Host lists: per-sample gradients [B, cols] per tensor, row-major, in one byte buffer

struct TensorSpec {
  DType dtype = DType::kFloat32;
  int64_t cols = 0;
  bool misaligned = false;  // starts one element past a 256-byte boundary
};

struct HostList {
  int64_t batch = 0;
  std::vector<TensorSpec> specs;
  std::vector<unsigned char> bytes;
  std::vector<size_t> offset;               // byte offset of each tensor
  std::vector<std::vector<double>> values;  // the values stored, decoded, [B·cols] row-major

  size_t size() const { return specs.size(); }
  void set(size_t t, int64_t r, int64_t c, double v) {
    const DType dt = specs[t].dtype;
    const size_t i = static_cast<size_t>(r * specs[t].cols + c);
    values[t][i] = store_value(bytes.data() + offset[t] + i * elem_size(dt), dt, v);
  }
  double get(size_t t, int64_t r, int64_t c) const {
    return values[t][static_cast<size_t>(r * specs[t].cols + c)];
  }
};

// gᵢc = μ_c + σ·noise with μ_c ~ N(0, signal²): a mean gradient well away from 0, and values both
// inside and outside the default histogram range ±0.05.
HostList build_list(int64_t batch, const std::vector<TensorSpec>& specs, uint64_t seed, double sigma = 0.03,
                    double signal = 0.02) {
  HostList h;
  h.batch = batch;
  h.specs = specs;
  size_t cursor = 0;
  h.offset.resize(specs.size());
  h.values.resize(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    h.offset[t] = place_tensor(&cursor, static_cast<size_t>(batch * specs[t].cols), elem_size(specs[t].dtype),
                               specs[t].misaligned);
    h.values[t].resize(static_cast<size_t>(batch * specs[t].cols));
  }
  h.bytes.assign(padded_bytes(cursor), kPadByte);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (size_t t = 0; t < specs.size(); ++t) {
    for (int64_t c = 0; c < specs[t].cols; ++c) {
      const double mu = signal * normal(rng);
      for (int64_t r = 0; r < batch; ++r) h.set(t, r, c, mu + sigma * normal(rng));
    }
  }
  return h;
}

// Widths around the tile widths the kernel picks (powers of two up to 256), small and empty
// tensors, and a few wide ones; every dtype, some misaligned.
std::vector<TensorSpec> random_specs(std::mt19937_64& rng, int count, int64_t max_cols = 1200,
                                     bool mixed_dtypes = true) {
  std::uniform_int_distribution<int> pick(0, 99);
  std::uniform_int_distribution<int64_t> small(1, 40);
  std::uniform_int_distribution<int64_t> within(1, max_cols);
  std::uniform_int_distribution<int64_t> delta(-2, 2);
  std::vector<TensorSpec> specs(static_cast<size_t>(count));
  for (auto& s : specs) {
    s.dtype = mixed_dtypes ? static_cast<DType>(pick(rng) % 4) : DType::kFloat32;
    const int kind = pick(rng);
    if (kind < 10) {
      s.cols = 0;
    } else if (kind < 35) {
      s.cols = small(rng);
    } else if (kind < 60) {
      s.cols = std::max<int64_t>(1, (int64_t{1} << (3 + pick(rng) % 6)) + delta(rng));  // 8 .. 256 ± 2
    } else {
      s.cols = within(rng);
    }
    s.misaligned = pick(rng) < 30;
  }
  return specs;
}

// ---------------------------------------------------------------------------------------------
// Float64 reference (long double accumulation)

struct Reference {
  std::vector<double> sq_norms, dots;
  double mean_sq_norm = 0.0;
  // Tolerance scales: Σ_c |gᵢc|·ā_c per row and Σ_c ā_c² for ‖ḡ‖², ā_c = mean_i |gᵢc| — the column
  // means cancel, so their error follows the magnitudes, not the mean.
  std::vector<double> dots_scale;
  double mean_sq_scale = 0.0;
  int64_t nonfinite = 0, finite = 0;
  std::vector<int64_t> hist;  // empty without histogram
};

Reference compute_reference(const HostList& h, int64_t nbins, double maxval) {
  const int64_t B = h.batch;
  Reference ref;
  std::vector<long double> sq(B, 0), dots(B, 0), dscale(B, 0);
  long double msq = 0, mscale = 0;
  if (nbins > 0) ref.hist.assign(static_cast<size_t>(nbins), 0);
  for (size_t t = 0; t < h.size(); ++t) {
    for (int64_t c = 0; c < h.specs[t].cols; ++c) {
      long double sum = 0, abs_sum = 0;
      for (int64_t r = 0; r < B; ++r) {
        const double v = h.get(t, r, c);
        sum += v;
        abs_sum += std::fabs(v);
        if (!std::isfinite(v)) {
          ++ref.nonfinite;
        } else {
          ++ref.finite;
          if (nbins > 0) ++ref.hist[static_cast<size_t>(reference_bin(v, nbins, maxval))];
        }
      }
      const long double mean = sum / B, abs_mean = abs_sum / B;
      msq += mean * mean;
      mscale += abs_mean * abs_mean;
      for (int64_t r = 0; r < B; ++r) {
        const long double v = h.get(t, r, c);
        sq[r] += v * v;
        dots[r] += v * mean;
        dscale[r] += std::fabs(v) * abs_mean;
      }
    }
  }
  for (int64_t r = 0; r < B; ++r) {
    ref.sq_norms.push_back(static_cast<double>(sq[r]));
    ref.dots.push_back(static_cast<double>(dots[r]));
    ref.dots_scale.push_back(static_cast<double>(dscale[r]));
  }
  ref.mean_sq_norm = static_cast<double>(msq);
  ref.mean_sq_scale = static_cast<double>(mscale);
  return ref;
}

// Float64 accumulation of values read exactly: 1e-10 of the magnitudes involved leaves room for
// summation order over ~10⁶ terms and nothing more.
constexpr double kRel = 1e-10;

bool within(double got, double want, double scale) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= kRel * scale;
}

struct Results {
  std::vector<double> sq_norms, dots;
  double mean_sq_norm = 0.0;
  int64_t nonfinite = 0;
  std::vector<int64_t> hist;
};

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

void expect_bitwise_equal(const Results& a, const Results& b, const std::string& context) {
  EXPECT_EQ(a.sq_norms.size(), b.sq_norms.size()) << context;
  EXPECT_TRUE(std::memcmp(a.sq_norms.data(), b.sq_norms.data(), a.sq_norms.size() * sizeof(double)) == 0)
      << context << ": ‖gᵢ‖² differ";
  EXPECT_TRUE(std::memcmp(a.dots.data(), b.dots.data(), a.dots.size() * sizeof(double)) == 0)
      << context << ": gᵢ·ḡ differ";
  EXPECT_TRUE(same_bits(a.mean_sq_norm, b.mean_sq_norm)) << context << ": ‖ḡ‖² differ";
  EXPECT_EQ(a.nonfinite, b.nonfinite) << context;
  EXPECT_TRUE(a.hist == b.hist) << context << ": histograms differ";
}

// Parts within tolerance of the reference (rows with non-finite values only as to finiteness);
// counts exactly.
void check_results(const HostList& h, const Reference& ref, bool histogram, const Results& res,
                   const std::string& context) {
  Mismatches m;
  const int64_t B = h.batch;
  for (int64_t r = 0; r < B; ++r) {
    const double want_sq = ref.sq_norms[r], want_dot = ref.dots[r];
    if (!within(res.sq_norms[r], want_sq, std::fabs(want_sq))) {
      m.add("‖g", r, "‖²: got ", res.sq_norms[r], ", want ", want_sq);
    }
    const bool row_finite = std::isfinite(want_sq);
    if (row_finite && !within(res.dots[r], want_dot, ref.dots_scale[r] + std::fabs(want_dot))) {
      m.add("g", r, "·ḡ: got ", res.dots[r], ", want ", want_dot, " (scale ", ref.dots_scale[r], ")");
    }
  }
  if (ref.nonfinite == 0 &&
      !within(res.mean_sq_norm, ref.mean_sq_norm, ref.mean_sq_scale + ref.mean_sq_norm)) {
    m.add("‖ḡ‖²: got ", res.mean_sq_norm, ", want ", ref.mean_sq_norm, " (scale ", ref.mean_sq_scale, ")");
  }
  if (res.nonfinite != ref.nonfinite) m.add("nonfinite: got ", res.nonfinite, ", want ", ref.nonfinite);
  if (histogram) {
    for (size_t b = 0; b < ref.hist.size(); ++b) {
      if (res.hist[b] != ref.hist[b]) m.add("bin ", b, ": got ", res.hist[b], ", want ", ref.hist[b]);
    }
    const int64_t total = std::accumulate(res.hist.begin(), res.hist.end(), int64_t{0});
    if (total != ref.finite) m.add("histogram holds ", total, " elements, want the ", ref.finite, " finite ones");
  }
  std::ostringstream os;
  os << context << " [B=" << B << ", " << h.size() << " tensors, histogram " << (histogram ? "on" : "off") << "]";
  m.expect_none(os.str());
}

// ---------------------------------------------------------------------------------------------
// Fixture: a stream of its own (CudaStreamTest); every memory operation goes through it.

// Everything one launch needs; args.tensors points into descs, so a Launch stays where it is made.
struct Launch {
  Launch() = default;
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;

  int64_t nbins = 0;  // 0: no histogram
  std::vector<tc::PerSampleTensorDesc> descs;
  tc::PerSampleArgs args{};
  DeviceMemory data, sq, dots, msq, nonfinite, hist, workspace;
  size_t workspace_bytes = 0;
};

class PerSampleStatsCudaTest : public CudaStreamTest {
 protected:
  void SetUp() override {
    CudaStreamTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_CUDA_OK(cudaGetDevice(&device_));
  }

  // Uploads the list and fills in descriptors, outputs and workspace (nbins = 0: no histogram,
  // the histogram output null — the launcher must not touch it).
  void prepare(const HostList& h, int64_t nbins, double maxval, Launch* L) {
    L->nbins = nbins;
    ASSERT_CUDA_OK(L->data.allocate(h.bytes.size()));
    ASSERT_CUDA_OK(cudaMemcpyAsync(L->data.get(), h.bytes.data(), h.bytes.size(), cudaMemcpyHostToDevice, stream_));
    L->descs.resize(h.size());
    for (size_t t = 0; t < h.size(); ++t) {
      L->descs[t].grads = L->data.bytes_at(h.offset[t]);
      L->descs[t].cols = h.specs[t].cols;
      L->descs[t].dtype = h.specs[t].dtype;
    }
    const size_t B = static_cast<size_t>(h.batch);
    ASSERT_CUDA_OK(L->sq.allocate(B * sizeof(double)));
    ASSERT_CUDA_OK(L->dots.allocate(B * sizeof(double)));
    ASSERT_CUDA_OK(L->msq.allocate(sizeof(double)));
    ASSERT_CUDA_OK(L->nonfinite.allocate(sizeof(int64_t)));
    if (nbins > 0) ASSERT_CUDA_OK(L->hist.allocate(static_cast<size_t>(nbins) * sizeof(int64_t)));
    tc::PerSampleArgs& a = L->args;
    a = tc::PerSampleArgs{};
    a.tensors = h.size() > 0 ? L->descs.data() : nullptr;
    a.num_tensors = static_cast<int64_t>(h.size());
    a.batch = h.batch;
    a.histogram = nbins > 0;
    a.hist_spec = tc::make_hist_spec(nbins > 0 ? nbins : 1, nbins > 0 ? maxval : 1.0);
    a.sq_norms = L->sq.get<double>();
    a.dots = L->dots.get<double>();
    a.mean_sq_norm = L->msq.get<double>();
    a.nonfinite = L->nonfinite.get<int64_t>();
    a.hist = nbins > 0 ? L->hist.get<int64_t>() : nullptr;
    ASSERT_TRUE(tc::per_sample_launch_supported(h.batch, has_float64(h), device_)) << "B=" << h.batch;
    L->workspace_bytes = tc::per_sample_workspace_bytes(a, device_);
    ASSERT_GT(L->workspace_bytes, 0u);
    ASSERT_CUDA_OK(L->workspace.allocate(L->workspace_bytes));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  static bool has_float64(const HostList& h) {
    for (const auto& s : h.specs) {
      if (s.dtype == DType::kFloat64 && s.cols > 0) return true;
    }
    return false;
  }

  // Fills every output with 0x7F bytes (finite doubles, large counts), so that an output the
  // launch fails to write shows up.
  void poison(const Launch& L) {
    for (const DeviceMemory* m : {&L.sq, &L.dots, &L.msq, &L.nonfinite, &L.hist}) {
      if (m->get() != nullptr) ASSERT_CUDA_OK(cudaMemsetAsync(m->get(), 0x7F, m->bytes(), stream_));
    }
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void fetch(const Launch& L, Results* r) {
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
    const size_t B = static_cast<size_t>(L.args.batch);
    r->sq_norms.assign(B, 0.0);
    r->dots.assign(B, 0.0);
    r->hist.assign(static_cast<size_t>(L.nbins), 0);
    ASSERT_CUDA_OK(cudaMemcpyAsync(r->sq_norms.data(), L.sq.get(), B * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(r->dots.data(), L.dots.get(), B * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(&r->mean_sq_norm, L.msq.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(&r->nonfinite, L.nonfinite.get(), sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    if (L.nbins > 0) {
      ASSERT_CUDA_OK(cudaMemcpyAsync(r->hist.data(), L.hist.get(), r->hist.size() * sizeof(int64_t),
                                     cudaMemcpyDeviceToHost, stream_));
    }
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void launch(const Launch& L) {
    ASSERT_CUDA_OK(tc::per_sample_launch(L.args, L.workspace.get(), L.workspace_bytes, stream_, device_));
  }

  // Poisons the outputs, launches and fetches what the launch wrote.
  void poison_launch_fetch(const Launch& L, Results* r) {
    ASSERT_NO_FATAL_FAILURE(poison(L));
    ASSERT_NO_FATAL_FAILURE(launch(L));
    ASSERT_NO_FATAL_FAILURE(fetch(L, r));
  }

  void run(const HostList& h, int64_t nbins, double maxval, Results* r) {
    Launch L;
    ASSERT_NO_FATAL_FAILURE(prepare(h, nbins, maxval, &L));
    ASSERT_NO_FATAL_FAILURE(poison_launch_fetch(L, r));
  }

  void run_and_check(const HostList& h, int64_t nbins, double maxval, const std::string& context,
                     Results* out = nullptr) {
    Results res;
    ASSERT_NO_FATAL_FAILURE(run(h, nbins, maxval, &res));
    check_results(h, compute_reference(h, nbins, maxval), nbins > 0, res, context);
    if (out != nullptr) *out = std::move(res);
  }

  int device_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Against the reference

TEST_F(PerSampleStatsCudaTest, RandomMixedListsForEveryBatchSize) {
  for (int64_t B : {int64_t{2}, int64_t{3}, int64_t{33}, int64_t{128}, int64_t{1000}}) {
    std::mt19937_64 rng(static_cast<uint64_t>(100 + B));
    const int count = B >= 1000 ? 8 : 24;
    const HostList h = build_list(B, random_specs(rng, count, B >= 1000 ? 700 : 1200), 200 + B);
    for (int64_t nbins : {int64_t{0}, int64_t{100}}) {
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, nbins, 0.05, "random mixed list"));
    }
  }
}

TEST_F(PerSampleStatsCudaTest, EachDtypeAloneAndFloat64WithOthers) {
  // Without float64 the tile is staged as float; one float64 tensor makes the whole launch stage
  // doubles (a narrower tile for the same B).
  for (int64_t B : {int64_t{3}, int64_t{128}}) {
    for (int d = 0; d < 4; ++d) {
      std::mt19937_64 rng(static_cast<uint64_t>(10 * B + d));
      std::vector<TensorSpec> specs = random_specs(rng, 12, 600, false);
      for (auto& s : specs) s.dtype = static_cast<DType>(d);
      const HostList h = build_list(B, specs, 300 + d);
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, 100, 0.05, std::string("only ") + dtype_name(static_cast<DType>(d))));
    }
  }
}

TEST_F(PerSampleStatsCudaTest, WidthsAroundTheTileWidths) {
  for (int64_t B : {int64_t{2}, int64_t{33}, int64_t{128}}) {
    std::vector<TensorSpec> specs;
    for (int64_t w : {1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 513, 1000, 4099}) {
      specs.push_back({static_cast<DType>(w % 4), w, w % 3 == 0});
    }
    const HostList h = build_list(B, specs, 400 + B);
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, 64, 0.05, "widths around tiles"));
  }
}

TEST_F(PerSampleStatsCudaTest, MoreTensorsThanOneLaunchGroup) {
  for (int64_t B : {int64_t{2}, int64_t{33}}) {
    for (int count : {static_cast<int>(kGroupTensors), static_cast<int>(kGroupTensors) + 1, 250}) {
      std::mt19937_64 rng(static_cast<uint64_t>(count + B));
      const HostList h = build_list(B, random_specs(rng, count, 300), 500 + count);
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, 100, 0.05, std::to_string(count) + " tensors"));
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, 0, 0.05, std::to_string(count) + " tensors"));
    }
  }
}

TEST_F(PerSampleStatsCudaTest, ManyTilesPerTensor) {
  // Tensors far wider than the persistent grid has blocks: each block walks many tiles.
  std::vector<TensorSpec> specs = {{DType::kFloat32, 300001, false}, {DType::kBFloat16, 70000, true},
                                   {DType::kFloat64, 5, false}};
  const HostList h = build_list(8, specs, 600);
  ASSERT_NO_FATAL_FAILURE(run_and_check(h, 100, 0.05, "wide tensors"));
}

// ---------------------------------------------------------------------------------------------
// Histogram

TEST_F(PerSampleStatsCudaTest, HistogramsAreExactForManyBinCounts) {
  // 100: privatised in shared memory; 3600, 5000 and 65536 bins do not fit there next to the
  // tile, so the kernel counts in global memory; 2^20 is the largest accepted.
  std::mt19937_64 rng(7);
  std::vector<TensorSpec> specs = random_specs(rng, 10, 500);
  specs.push_back({DType::kFloat64, 300, false});
  HostList h = build_list(33, specs, 700);
  // Values on the rounded bin edges −m + k·w, ±m and far outliers, in the wide float64 tensor.
  for (int64_t nbins : {int64_t{1}, int64_t{7}, int64_t{100}, int64_t{3600}, int64_t{5000}, int64_t{65536},
                        tc::kMaxHistBins}) {
    for (double maxval : {0.05, 1.0}) {
      const double w = 2.0 * maxval / static_cast<double>(nbins);
      const size_t t = h.size() - 1;
      for (int64_t r = 0; r < h.batch; ++r) {
        for (int64_t c = 0; c < 290; ++c) {
          h.set(t, r, c, static_cast<double>((r * 290 + c) * 7919 % (nbins + 1)) * w - maxval);
        }
        h.set(t, r, 290, maxval);
        h.set(t, r, 291, -maxval);
        h.set(t, r, 292, 1e4);
        h.set(t, r, 293, -1e4);
      }
      std::ostringstream os;
      os << "nbins=" << nbins << " maxval=" << maxval;
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, nbins, maxval, os.str()));
    }
  }
}

TEST_F(PerSampleStatsCudaTest, NonfiniteValuesAreCountedAndNotBinned) {
  for (int64_t B : {int64_t{3}, int64_t{128}}) {
    std::mt19937_64 rng(static_cast<uint64_t>(8 + B));
    std::vector<TensorSpec> specs = random_specs(rng, 20, 400);
    specs.push_back({DType::kFloat16, 50, false});
    specs.push_back({DType::kFloat64, 50, true});
    HostList h = build_list(B, specs, 800 + B);
    // Row 0 stays finite; rows 1 and 2 get NaN, +Inf and −Inf in the last two tensors.
    const size_t a = h.size() - 2, b = h.size() - 1;
    h.set(a, 1, 3, kNaN);
    h.set(a, 1, 49, kInf);
    h.set(b, 2, 0, -kInf);
    h.set(b, 2, 17, kNaN);
    h.set(b, 1, 20, kInf);
    for (int64_t nbins : {int64_t{0}, int64_t{100}, int64_t{5000}}) {
      Results res;
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, nbins, 0.05, "non-finite", &res));
      EXPECT_EQ(res.nonfinite, 5);
      EXPECT_TRUE(std::isfinite(res.sq_norms[0]));
      EXPECT_FALSE(std::isfinite(res.sq_norms[1]));
      EXPECT_FALSE(std::isfinite(res.sq_norms[2]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Degenerate lists

TEST_F(PerSampleStatsCudaTest, EmptyListAndListOfEmptyTensors) {
  for (int count : {0, 3, 200}) {
    std::vector<TensorSpec> specs(static_cast<size_t>(count));
    for (size_t t = 0; t < specs.size(); ++t) specs[t].dtype = static_cast<DType>(t % 4);
    const HostList h = build_list(5, specs, 900);
    for (int64_t nbins : {int64_t{0}, int64_t{100}}) {
      Results res;
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, nbins, 0.05, std::to_string(count) + " empty tensors", &res));
      EXPECT_EQ(res.sq_norms, std::vector<double>(5, 0.0));
      EXPECT_EQ(res.dots, std::vector<double>(5, 0.0));
      EXPECT_EQ(res.mean_sq_norm, 0.0);
      EXPECT_EQ(res.nonfinite, 0);
      EXPECT_EQ(res.hist, std::vector<int64_t>(static_cast<size_t>(nbins), 0));
    }
  }
}

TEST_F(PerSampleStatsCudaTest, OppositePairsGiveAZeroMean) {
  // gᵢ and −gᵢ with dyadic values: every column sum is exactly 0 in any order.
  std::vector<TensorSpec> specs = {{DType::kFloat32, 300, false}, {DType::kBFloat16, 7, true}};
  HostList h = build_list(6, specs, 1000);
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int> k(-8, 8);
  for (size_t t = 0; t < h.size(); ++t) {
    for (int64_t c = 0; c < h.specs[t].cols; ++c) {
      for (int64_t r = 0; r < 3; ++r) {
        const double v = k(rng) / 16.0;
        h.set(t, r, c, v);
        h.set(t, r + 3, c, -v);
      }
    }
  }
  Results res;
  ASSERT_NO_FATAL_FAILURE(run_and_check(h, 100, 0.05, "opposite pairs", &res));
  EXPECT_EQ(res.mean_sq_norm, 0.0);
  for (int64_t r = 0; r < 6; ++r) EXPECT_EQ(res.dots[r], 0.0) << r;
}

// ---------------------------------------------------------------------------------------------
// Determinism, asynchrony, graph capture

TEST_F(PerSampleStatsCudaTest, RepeatedLaunchesAreBitwiseEqual) {
  for (int64_t B : {int64_t{33}, int64_t{1000}}) {
    std::mt19937_64 rng(static_cast<uint64_t>(11 + B));
    std::vector<TensorSpec> specs = random_specs(rng, B >= 1000 ? 10 : 150, B >= 1000 ? 1000 : 2000);
    specs.push_back({DType::kFloat32, B >= 1000 ? 5000 : 200000, false});
    const HostList h = build_list(B, specs, 1100 + B);
    for (int64_t nbins : {int64_t{0}, int64_t{100}, int64_t{5000}}) {
      Launch L;
      ASSERT_NO_FATAL_FAILURE(prepare(h, nbins, 0.05, &L));
      Results first;
      ASSERT_NO_FATAL_FAILURE(poison_launch_fetch(L, &first));
      check_results(h, compute_reference(h, nbins, 0.05), nbins > 0, first, "determinism");
      for (int rep = 0; rep < 3; ++rep) {
        Results again;
        ASSERT_NO_FATAL_FAILURE(poison_launch_fetch(L, &again));
        expect_bitwise_equal(first, again, "B=" + std::to_string(B) + " nbins=" + std::to_string(nbins) +
                                               " repetition " + std::to_string(rep));
      }
    }
  }
}

TEST_F(PerSampleStatsCudaTest, LaunchDoesNotWaitForTheStream) {
  std::mt19937_64 rng(13);
  const HostList h = build_list(33, random_specs(rng, 20, 500), 1300);
  Launch L;
  ASSERT_NO_FATAL_FAILURE(prepare(h, 100, 0.05, &L));
  ASSERT_NO_FATAL_FAILURE(poison(L));
  spin_for_cycles<<<1, 1, 0, stream_>>>(static_cast<long long>(1) << 30);  // about half a second
  ASSERT_CUDA_OK(cudaGetLastError());
  ASSERT_NO_FATAL_FAILURE(launch(L));
  EXPECT_EQ(cudaStreamQuery(stream_), cudaErrorNotReady) << "the launcher waited for the stream";
  Results res;
  ASSERT_NO_FATAL_FAILURE(fetch(L, &res));
  check_results(h, compute_reference(h, 100, 0.05), true, res, "after spin");
}

TEST_F(PerSampleStatsCudaTest, GraphCaptureMatchesEager) {
  for (int64_t B : {int64_t{3}, int64_t{128}}) {
    std::mt19937_64 rng(static_cast<uint64_t>(15 + B));
    const HostList h = build_list(B, random_specs(rng, 130, 800), 1500 + B);
    for (int64_t nbins : {int64_t{0}, int64_t{100}, int64_t{5000}}) {
      const std::string context = "B=" + std::to_string(B) + " nbins=" + std::to_string(nbins);
      Launch L;
      ASSERT_NO_FATAL_FAILURE(prepare(h, nbins, 0.05, &L));
      Results eager;
      ASSERT_NO_FATAL_FAILURE(poison_launch_fetch(L, &eager));
      check_results(h, compute_reference(h, nbins, 0.05), nbins > 0, eager, context + " eager");

      cudaGraphExec_t exec = nullptr;
      ASSERT_NO_FATAL_FAILURE(capture_graph(cudaStreamCaptureModeThreadLocal, [&] {
        return tc::per_sample_launch(L.args, L.workspace.get(), L.workspace_bytes, stream_, device_);
      }, &exec));

      for (int replay = 0; replay < 2; ++replay) {
        ASSERT_NO_FATAL_FAILURE(poison(L));
        ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream_));
        Results graphed;
        ASSERT_NO_FATAL_FAILURE(fetch(L, &graphed));
        expect_bitwise_equal(eager, graphed, context + " graph replay " + std::to_string(replay));
      }
      // New values in the same buffers: the replay reads them (nothing was baked in).
      const HostList h2 = build_list(B, h.specs, 1600 + B);
      ASSERT_CUDA_OK(cudaMemcpyAsync(L.data.get(), h2.bytes.data(), h2.bytes.size(), cudaMemcpyHostToDevice, stream_));
      ASSERT_NO_FATAL_FAILURE(poison(L));
      ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream_));
      Results fresh;
      ASSERT_NO_FATAL_FAILURE(fetch(L, &fresh));
      check_results(h2, compute_reference(h2, nbins, 0.05), nbins > 0, fresh, context + " replay on new values");
      EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
    }
  }
}

// A launch that stages a large tile (B = 128 float64 rows: over the 48 KB every kernel gets without
// asking) and one that stages a small tile. The kernel's shared-memory limit is device state: a
// small launch must never lower it under a graph captured earlier or another thread's launch.
TEST_F(PerSampleStatsCudaTest, SmallerLaunchesNeverLowerTheSharedMemoryLimit) {
  std::vector<TensorSpec> big_specs(6), small_specs(3);
  for (auto& s : big_specs) s = TensorSpec{DType::kFloat64, 700, false};
  for (auto& s : small_specs) s = TensorSpec{DType::kFloat32, 300, false};
  const HostList big = build_list(128, big_specs, 4100), small = build_list(3, small_specs, 4200);
  Launch Lb, Ls;
  ASSERT_NO_FATAL_FAILURE(prepare(big, 100, 0.05, &Lb));
  ASSERT_NO_FATAL_FAILURE(prepare(small, 100, 0.05, &Ls));

  // Graph of the large launch, then a small eager launch, then the replay.
  cudaGraphExec_t exec = nullptr;
  ASSERT_NO_FATAL_FAILURE(capture_graph(cudaStreamCaptureModeThreadLocal, [&] {
    return tc::per_sample_launch(Lb.args, Lb.workspace.get(), Lb.workspace_bytes, stream_, device_);
  }, &exec));
  Results small_res, big_res;
  ASSERT_NO_FATAL_FAILURE(poison_launch_fetch(Ls, &small_res));
  check_results(small, compute_reference(small, 100, 0.05), true, small_res, "small, eager");
  ASSERT_NO_FATAL_FAILURE(poison(Lb));
  ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream_));
  ASSERT_NO_FATAL_FAILURE(fetch(Lb, &big_res));
  check_results(big, compute_reference(big, 100, 0.05), true, big_res, "large, graph replay after a small launch");
  EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));

  // Two threads, each on its own stream, launching the large and the small plan over and over.
  auto hammer = [this](const Launch* L, cudaError_t* first_error) {
    cudaStream_t s = nullptr;
    *first_error = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    for (int i = 0; i < 300 && *first_error == cudaSuccess; ++i) {
      *first_error = tc::per_sample_launch(L->args, L->workspace.get(), L->workspace_bytes, s, device_);
    }
    if (s != nullptr) {
      const cudaError_t sync = cudaStreamSynchronize(s);
      if (*first_error == cudaSuccess) *first_error = sync;
      cudaStreamDestroy(s);
    }
  };
  cudaError_t big_status = cudaSuccess, small_status = cudaSuccess;
  std::thread tb(hammer, &Lb, &big_status), ts(hammer, &Ls, &small_status);
  tb.join();
  ts.join();
  EXPECT_EQ(big_status, cudaSuccess) << cudaGetErrorString(big_status);
  EXPECT_EQ(small_status, cudaSuccess) << cudaGetErrorString(small_status);
  ASSERT_NO_FATAL_FAILURE(fetch(Lb, &big_res));
  ASSERT_NO_FATAL_FAILURE(fetch(Ls, &small_res));
  check_results(big, compute_reference(big, 100, 0.05), true, big_res, "large, beside another thread");
  check_results(small, compute_reference(small, 100, 0.05), true, small_res, "small, beside another thread");
}

// ---------------------------------------------------------------------------------------------
// Limits and bad arguments

TEST_F(PerSampleStatsCudaTest, BatchesTooLargeToStageAreRefused) {
  // Any device stages B ≤ 1000 rows of one column (≤ 28 KB of shared memory with float64); no
  // device stages 30000 (≥ 600 KB at the narrowest tile). Callers fall back to a composite path.
  for (bool f64 : {false, true}) {
    for (int64_t B : {int64_t{2}, int64_t{3}, int64_t{33}, int64_t{128}, int64_t{1000}}) {
      EXPECT_TRUE(tc::per_sample_launch_supported(B, f64, device_)) << "B=" << B << " f64=" << f64;
    }
    EXPECT_FALSE(tc::per_sample_launch_supported(30000, f64, device_)) << "f64=" << f64;
    EXPECT_FALSE(tc::per_sample_launch_supported(int64_t{1} << 20, f64, device_)) << "f64=" << f64;
  }
  // The launcher itself refuses such a batch instead of overrunning shared memory, and the
  // workspace query says 0.
  tc::PerSampleTensorDesc desc{nullptr, 3, DType::kFloat32};
  tc::PerSampleArgs a{};
  a.tensors = &desc;
  a.num_tensors = 1;
  a.batch = 30000;
  a.histogram = false;
  a.hist_spec = tc::make_hist_spec(1, 1.0);
  EXPECT_EQ(tc::per_sample_workspace_bytes(a, device_), 0u);
  DeviceMemory out, ws;
  ASSERT_CUDA_OK(out.allocate(4 * 30000 * sizeof(double)));
  ASSERT_CUDA_OK(ws.allocate(1 << 20));
  a.sq_norms = out.get<double>();
  a.dots = out.get<double>() + 30000;
  a.mean_sq_norm = out.get<double>() + 60000;
  a.nonfinite = reinterpret_cast<int64_t*>(out.get<double>() + 60001);
  EXPECT_NE(tc::per_sample_launch(a, ws.get(), ws.bytes(), stream_, device_), cudaSuccess);
  EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
}

TEST_F(PerSampleStatsCudaTest, WorkspaceTooSmallAndBadArgumentsAreInvalidValue) {
  std::mt19937_64 rng(17);
  const HostList h = build_list(33, random_specs(rng, 10, 300), 1700);
  Launch L;
  ASSERT_NO_FATAL_FAILURE(prepare(h, 100, 0.05, &L));
  ASSERT_NO_FATAL_FAILURE(poison(L));
  auto status = [&](const tc::PerSampleArgs& a, void* ws, size_t bytes) {
    return tc::per_sample_launch(a, ws, bytes, stream_, device_);
  };
  EXPECT_EQ(status(L.args, L.workspace.get(), L.workspace_bytes - 1), cudaErrorInvalidValue) << "one byte short";
  EXPECT_EQ(status(L.args, L.workspace.get(), 0), cudaErrorInvalidValue) << "0 bytes";
  EXPECT_EQ(status(L.args, nullptr, L.workspace_bytes), cudaErrorInvalidValue) << "null workspace";
  // The launch's arguments with one change, and the workspace it needs.
  auto status_with = [&](const std::function<void(tc::PerSampleArgs&)>& change) {
    tc::PerSampleArgs a = L.args;
    change(a);
    return status(a, L.workspace.get(), L.workspace_bytes);
  };
  EXPECT_EQ(status_with([](tc::PerSampleArgs& a) { a.batch = 0; }), cudaErrorInvalidValue) << "batch 0";
  EXPECT_EQ(status_with([](tc::PerSampleArgs& a) { a.tensors = nullptr; }), cudaErrorInvalidValue) << "null tensors";
  EXPECT_EQ(status_with([](tc::PerSampleArgs& a) { a.num_tensors = -1; }), cudaErrorInvalidValue) << "num_tensors -1";
  for (int64_t nbins : {int64_t{0}, int64_t{-1}, tc::kMaxHistBins + 1}) {
    EXPECT_EQ(status_with([&](tc::PerSampleArgs& a) {
                a.hist_spec = tc::make_hist_spec(1, 0.05);
                a.hist_spec.nbins = nbins;
              }),
              cudaErrorInvalidValue)
        << "nbins=" << nbins;
  }
  for (double maxval : {0.0, -0.05, kNaN}) {
    EXPECT_EQ(status_with([&](tc::PerSampleArgs& a) { a.hist_spec = tc::make_hist_spec(100, maxval); }),
              cudaErrorInvalidValue)
        << "maxval=" << maxval;
  }
  // Nothing was enqueued by the refused calls: the outputs still hold the poison.
  Results res;
  ASSERT_NO_FATAL_FAILURE(fetch(L, &res));
  int64_t poison_count = 0;
  std::memset(&poison_count, 0x7F, sizeof poison_count);
  EXPECT_EQ(res.nonfinite, poison_count);
  // The workspace query is what the launch needs: exactly that many bytes work.
  ASSERT_NO_FATAL_FAILURE(launch(L));
  ASSERT_NO_FATAL_FAILURE(fetch(L, &res));
  check_results(h, compute_reference(h, 100, 0.05), true, res, "after the refused calls");
}

TEST_F(PerSampleStatsCudaTest, WorkspaceDependsOnBatchAndTensorCount) {
  std::vector<tc::PerSampleTensorDesc> descs(300, tc::PerSampleTensorDesc{nullptr, 1000, DType::kFloat32});
  tc::PerSampleArgs a{};
  a.tensors = descs.data();
  a.histogram = true;
  a.hist_spec = tc::make_hist_spec(100, 0.05);
  a.batch = 33;
  a.num_tensors = 10;
  const size_t small = tc::per_sample_workspace_bytes(a, device_);
  a.num_tensors = 300;  // four launch groups, each with its own partial slots
  const size_t many = tc::per_sample_workspace_bytes(a, device_);
  a.batch = 1000;
  const size_t wide = tc::per_sample_workspace_bytes(a, device_);
  EXPECT_GT(small, 0u);
  EXPECT_GE(many, small);
  EXPECT_GT(wide, many);
  a.num_tensors = 0;
  EXPECT_GT(tc::per_sample_workspace_bytes(a, device_), 0u) << "an empty list still writes its outputs";
}

}  // namespace
