// The torch-free CUDA launcher hist2d_launch (cuda/hist2d.cu) against a CPU float64 reference
// written here from SPEC.md §2 (grad_hist2d) and §4: random lists mixing dtypes, batch sizes and
// widths around the kernel's window, misaligned pointers, empty pairs, lists longer than one
// launch group, histograms in per-warp, per-block and global counters, values on bin edges,
// non-finite values on either side, bitwise determinism, asynchrony, CUDA-graph capture and a
// pair of more than 2^31 elements.
//
// Every test that needs a GPU skips cleanly when none is present.
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
#include <vector>

#include "cuda/hist2d.h"
#include "tests/cpp/cuda_test_util.h"
#include "tests/cpp/reference_bin.h"

namespace {

using namespace trainscope_test;
namespace tc = trainscope::cuda;

constexpr int64_t kGroupPairs = 128;  // kMaxGroupPairs of the launcher: longer lists take several launches

// ---------------------------------------------------------------------------------------------
// Host lists

struct PairSpec {
  DType dtype = DType::kFloat32;
  int64_t numel = 0;             // P
  bool misaligned_grad = false;  // start one element past a 256-byte boundary
  bool misaligned_param = false;
};

// One list on the host: all gradients in one byte buffer and all parameters in another (with
// padding between the pairs), the byte offset of each, and the stored values decoded to float64.
struct HostList {
  int64_t batch = 0;
  std::vector<PairSpec> specs;
  std::vector<unsigned char> grad_bytes, param_bytes;
  std::vector<size_t> grad_offset, param_offset;
  std::vector<std::vector<double>> grad, param;  // [B·P] row-major, [P]

  size_t size() const { return specs.size(); }
  void set_grad(size_t t, int64_t b, int64_t j, double v) {
    const DType dt = specs[t].dtype;
    const int64_t i = b * specs[t].numel + j;
    grad[t][static_cast<size_t>(i)] =
        store_value(grad_bytes.data() + grad_offset[t] + static_cast<size_t>(i) * elem_size(dt), dt, v);
  }
  void set_param(size_t t, int64_t j, double v) {
    const DType dt = specs[t].dtype;
    param[t][static_cast<size_t>(j)] =
        store_value(param_bytes.data() + param_offset[t] + static_cast<size_t>(j) * elem_size(dt), dt, v);
  }
};

// Per-sample gradients ~ N(0, grad_scale²) (inliers and outliers of ±0.05), θ ~ N(0, param_scale²)
// (inliers and outliers of ±1).
HostList build_list(const std::vector<PairSpec>& specs, int64_t batch, uint64_t seed, double grad_scale = 0.03,
                    double param_scale = 0.6) {
  HostList h;
  h.batch = batch;
  h.specs = specs;
  size_t gcur = 0, pcur = 0;
  for (const PairSpec& s : specs) {
    const size_t es = elem_size(s.dtype);
    h.grad_offset.push_back(place_tensor(&gcur, static_cast<size_t>(batch * s.numel), es, s.misaligned_grad));
    h.param_offset.push_back(place_tensor(&pcur, static_cast<size_t>(s.numel), es, s.misaligned_param));
    h.grad.emplace_back(static_cast<size_t>(batch * s.numel), 0.0);
    h.param.emplace_back(static_cast<size_t>(s.numel), 0.0);
  }
  h.grad_bytes.assign(padded_bytes(gcur), kPadByte);
  h.param_bytes.assign(padded_bytes(pcur), kPadByte);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (size_t t = 0; t < specs.size(); ++t) {
    for (int64_t j = 0; j < specs[t].numel; ++j) h.set_param(t, j, param_scale * normal(rng));
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j = 0; j < specs[t].numel; ++j) h.set_grad(t, b, j, grad_scale * normal(rng));
    }
  }
  return h;
}

// Widths around the window (2048) and the narrow/wide switch, tiny ones, and empty pairs.
std::vector<PairSpec> random_specs(std::mt19937_64& rng, int count, bool misalign = true) {
  std::uniform_int_distribution<int> pick(0, 99);
  std::uniform_int_distribution<int64_t> small(1, 40), medium(41, 1500), delta(-3, 3);
  std::vector<PairSpec> specs(static_cast<size_t>(count));
  for (PairSpec& s : specs) {
    s.dtype = static_cast<DType>(pick(rng) % 4);
    const int kind = pick(rng);
    if (kind < 10) {
      s.numel = 0;
    } else if (kind < 40) {
      s.numel = small(rng);
    } else if (kind < 65) {
      s.numel = medium(rng);
    } else {
      s.numel = std::max<int64_t>(1, (1 + pick(rng) % 3) * tc::kHist2dWindow + delta(rng));
    }
    s.misaligned_grad = misalign && pick(rng) < 30;
    s.misaligned_param = misalign && pick(rng) < 30;
  }
  return specs;
}

// ---------------------------------------------------------------------------------------------
// Float64 reference (SPEC.md §4 per axis, from reference_bin)

struct Reference {
  std::vector<int64_t> counts;  // [nbins_grad · nbins_param]
  int64_t nonfinite = 0;
};

Reference compute_reference(const HostList& h, int64_t nbg, double mg, int64_t nbp, double mp) {
  Reference ref;
  ref.counts.assign(static_cast<size_t>(nbg * nbp), 0);
  for (size_t t = 0; t < h.size(); ++t) {
    const int64_t P = h.specs[t].numel;
    for (int64_t j = 0; j < P; ++j) {
      const double p = h.param[t][static_cast<size_t>(j)];
      const int64_t by = std::isfinite(p) ? reference_bin(p, nbp, mp) : -1;
      for (int64_t b = 0; b < h.batch; ++b) {
        const double g = h.grad[t][static_cast<size_t>(b * P + j)];
        if (by < 0 || !std::isfinite(g)) {
          ++ref.nonfinite;
        } else {
          ++ref.counts[static_cast<size_t>(reference_bin(g, nbg, mg) * nbp + by)];
        }
      }
    }
  }
  return ref;
}

int64_t total_pairs(const HostList& h) {
  int64_t n = 0;
  for (const PairSpec& s : h.specs) n += h.batch * s.numel;
  return n;
}

struct Results {
  std::vector<int64_t> counts;
  int64_t nonfinite = 0;
};

void expect_matches(const Reference& ref, const Results& res, int64_t nbp, int64_t pairs, const std::string& context) {
  ASSERT_EQ(res.counts.size(), ref.counts.size()) << context;
  int64_t mismatches = 0;
  std::ostringstream first;
  for (size_t i = 0; i < ref.counts.size(); ++i) {
    if (res.counts[i] != ref.counts[i] && mismatches++ < 10) {
      first << "\n  bin (" << static_cast<int64_t>(i) / nbp << ", " << static_cast<int64_t>(i) % nbp
            << "): got " << res.counts[i] << ", want " << ref.counts[i];
    }
  }
  EXPECT_EQ(mismatches, 0) << context << ": " << mismatches << " bins differ, first ones:" << first.str();
  EXPECT_EQ(res.nonfinite, ref.nonfinite) << context << ": nonfinite";
  const int64_t total = std::accumulate(res.counts.begin(), res.counts.end(), int64_t{0});
  EXPECT_EQ(total + res.nonfinite, pairs) << context << ": counts + nonfinite must be B·ΣP";
}

// ---------------------------------------------------------------------------------------------
// Device lists and launches

struct DeviceList {
  DeviceMemory grad, param;
};

// Everything one launch needs; args.pairs points into pairs, so a Launch stays where it is made.
struct Launch {
  Launch() = default;
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;

  int64_t nbg = 100, nbp = 100;
  std::vector<tc::Hist2dPair> pairs;
  tc::Hist2dArgs args{};
  DeviceMemory counts, nonfinite;
};

// Fixture: a stream of its own (CudaStreamTest); every memory operation goes through it.
class Hist2dCudaTest : public CudaStreamTest {
 protected:
  void upload(const HostList& h, DeviceList* d) {
    ASSERT_CUDA_OK(d->grad.allocate(h.grad_bytes.size()));
    ASSERT_CUDA_OK(d->param.allocate(h.param_bytes.size()));
    ASSERT_CUDA_OK(cudaMemcpyAsync(d->grad.get(), h.grad_bytes.data(), h.grad_bytes.size(), cudaMemcpyHostToDevice, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(d->param.get(), h.param_bytes.data(), h.param_bytes.size(), cudaMemcpyHostToDevice, stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void prepare(const HostList& h, const DeviceList& d, int64_t nbg, double mg, int64_t nbp, double mp, Launch* L) {
    L->nbg = nbg;
    L->nbp = nbp;
    L->pairs.resize(h.size());
    for (size_t t = 0; t < h.size(); ++t) {
      L->pairs[t].grad = d.grad.bytes_at(h.grad_offset[t]);
      L->pairs[t].param = d.param.bytes_at(h.param_offset[t]);
      L->pairs[t].numel = h.specs[t].numel;
      L->pairs[t].dtype = h.specs[t].dtype;
    }
    ASSERT_CUDA_OK(L->counts.allocate(static_cast<size_t>(nbg * nbp) * sizeof(int64_t)));
    ASSERT_CUDA_OK(L->nonfinite.allocate(sizeof(int64_t)));
    tc::Hist2dArgs& a = L->args;
    a = tc::Hist2dArgs{};
    a.pairs = L->pairs.empty() ? nullptr : L->pairs.data();
    a.num_pairs = static_cast<int64_t>(L->pairs.size());
    a.batch = h.batch;
    a.grad_spec = tc::make_hist_spec(nbg, mg);
    a.param_spec = tc::make_hist_spec(nbp, mp);
    a.counts = L->counts.get<int64_t>();
    a.nonfinite = L->nonfinite.get<int64_t>();
  }

  // Fills the outputs with 0x7F bytes, so that a count the launch fails to clear shows up.
  void poison(const Launch& L) {
    ASSERT_CUDA_OK(cudaMemsetAsync(L.counts.get(), 0x7F, L.counts.bytes(), stream_));
    ASSERT_CUDA_OK(cudaMemsetAsync(L.nonfinite.get(), 0x7F, L.nonfinite.bytes(), stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void fetch(const Launch& L, Results* r) {
    r->counts.assign(static_cast<size_t>(L.nbg * L.nbp), 0);
    ASSERT_CUDA_OK(cudaMemcpyAsync(r->counts.data(), L.counts.get(), r->counts.size() * sizeof(int64_t),
                                   cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(&r->nonfinite, L.nonfinite.get(), sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void run(const HostList& h, const DeviceList& d, int64_t nbg, double mg, int64_t nbp, double mp, Results* r) {
    Launch L;
    ASSERT_NO_FATAL_FAILURE(prepare(h, d, nbg, mg, nbp, mp, &L));
    ASSERT_NO_FATAL_FAILURE(poison(L));
    ASSERT_CUDA_OK(tc::hist2d_launch(L.args, stream_));
    ASSERT_NO_FATAL_FAILURE(fetch(L, r));
  }

  void run_and_check(const HostList& h, const DeviceList& d, int64_t nbg, double mg, int64_t nbp, double mp,
                     const std::string& context) {
    std::ostringstream os;
    os << context << " [B=" << h.batch << ", " << h.size() << " pairs, " << nbg << "x" << nbp << " bins, maxval "
       << mg << "/" << mp << "]";
    Results res;
    ASSERT_NO_FATAL_FAILURE(run(h, d, nbg, mg, nbp, mp, &res));
    ASSERT_NO_FATAL_FAILURE(expect_matches(compute_reference(h, nbg, mg, nbp, mp), res, nbp, total_pairs(h), os.str()));
  }

  void expect_inputs_unchanged(const HostList& h, const DeviceList& d) {
    std::vector<unsigned char> g(h.grad_bytes.size()), p(h.param_bytes.size());
    ASSERT_CUDA_OK(cudaMemcpyAsync(g.data(), d.grad.get(), g.size(), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(p.data(), d.param.get(), p.size(), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
    EXPECT_TRUE(g == h.grad_bytes) << "per-sample gradients were modified";
    EXPECT_TRUE(p == h.param_bytes) << "parameters were modified";
  }
};

// ---------------------------------------------------------------------------------------------
// Argument checks: they come before any CUDA call, so this test needs no GPU.

TEST(Hist2dLaunchArgs, InvalidArgumentsAreRejectedBeforeAnyWork) {
  std::vector<tc::Hist2dPair> pairs(2);
  for (auto& p : pairs) {
    p.grad = reinterpret_cast<const void*>(uintptr_t{4096});  // never dereferenced
    p.param = reinterpret_cast<const void*>(uintptr_t{8192});
    p.numel = 5000;
    p.dtype = DType::kFloat32;
  }
  int64_t fake_out[2];  // never written: every call below fails its checks first
  tc::Hist2dArgs good{};
  good.pairs = pairs.data();
  good.num_pairs = 2;
  good.batch = 4;
  good.grad_spec = tc::make_hist_spec(100, 0.05);
  good.param_spec = tc::make_hist_spec(100, 1.0);
  good.counts = fake_out;
  good.nonfinite = fake_out + 1;

  auto expect_invalid = [](const tc::Hist2dArgs& a, const std::string& what) {
    EXPECT_EQ(tc::hist2d_launch(a, nullptr), cudaErrorInvalidValue) << what;
  };
  // `good` with one change.
  auto expect_invalid_with = [&](const std::function<void(tc::Hist2dArgs&)>& change, const std::string& what) {
    tc::Hist2dArgs a = good;
    change(a);
    expect_invalid(a, what);
  };
  expect_invalid_with([](tc::Hist2dArgs& a) { a.num_pairs = -1; }, "num_pairs = -1");
  expect_invalid_with([](tc::Hist2dArgs& a) { a.pairs = nullptr; }, "pairs = nullptr with num_pairs = 2");
  expect_invalid_with([](tc::Hist2dArgs& a) { a.batch = -1; }, "batch = -1");
  expect_invalid_with([](tc::Hist2dArgs& a) { a.counts = nullptr; }, "counts = nullptr");
  expect_invalid_with([](tc::Hist2dArgs& a) { a.nonfinite = nullptr; }, "nonfinite = nullptr");
  for (int64_t nbins : {int64_t{0}, int64_t{-1}, tc::kMaxHistBins + 1}) {
    tc::Hist2dArgs a = good;
    a.grad_spec = tc::make_hist_spec(1, 0.05);
    a.grad_spec.nbins = nbins;
    expect_invalid(a, "nbins_grad = " + std::to_string(nbins));
    a = good;
    a.param_spec = tc::make_hist_spec(1, 1.0);
    a.param_spec.nbins = nbins;
    expect_invalid(a, "nbins_param = " + std::to_string(nbins));
  }
  {
    tc::Hist2dArgs a = good;  // each axis allowed, the product over 2^24
    a.grad_spec = tc::make_hist_spec(4097, 0.05);
    a.param_spec = tc::make_hist_spec(4096, 1.0);
    expect_invalid(a, "4097 x 4096 bins");
  }
  for (double maxval : {0.0, -0.05, kNaN, kInf}) {
    tc::Hist2dArgs a = good;
    a.grad_spec = tc::make_hist_spec(100, maxval);
    expect_invalid(a, "maxval_grad = " + std::to_string(maxval));
    a = good;
    a.param_spec = tc::make_hist_spec(100, maxval);
    expect_invalid(a, "maxval_param = " + std::to_string(maxval));
  }
  {
    std::vector<tc::Hist2dPair> bad = pairs;
    bad[1].numel = -1;
    tc::Hist2dArgs a = good;
    a.pairs = bad.data();
    expect_invalid(a, "numel = -1");
    bad = pairs;
    bad[0].dtype = static_cast<DType>(7);
    a.pairs = bad.data();
    expect_invalid(a, "dtype 7");
    bad = pairs;
    bad[1].grad = nullptr;
    a.pairs = bad.data();
    expect_invalid(a, "grad = nullptr");
    bad = pairs;
    bad[0].param = nullptr;
    a.pairs = bad.data();
    expect_invalid(a, "param = nullptr");
  }
}

// ---------------------------------------------------------------------------------------------
// Against the reference

TEST_F(Hist2dCudaTest, MixedDtypeListsMatchTheReference) {
  std::mt19937_64 rng(2024);
  for (int64_t batch : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{17}, int64_t{40}}) {
    const HostList h = build_list(random_specs(rng, 24), batch, static_cast<uint64_t>(batch));
    DeviceList d;
    ASSERT_NO_FATAL_FAILURE(upload(h, &d));
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, 100, 0.05, 100, 1.0, "defaults"));
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, 7, 0.01, 13, 0.3, "odd bins"));
    ASSERT_NO_FATAL_FAILURE(expect_inputs_unchanged(h, d));
  }
}

TEST_F(Hist2dCudaTest, SharedPerWarpPerBlockAndGlobalCounters) {
  // 10x10: eight per-warp copies; 40x50: a few copies; 100x100 (40 KB): one per block;
  // 120x110 and 200x100 (over 48 KB): global int64 atomics; 4096x4096: the 2^24-bin maximum.
  std::mt19937_64 rng(7);
  std::vector<PairSpec> specs = random_specs(rng, 30);
  specs[0].numel = 3 * tc::kHist2dWindow + 11;
  specs[0].dtype = DType::kFloat32;
  const HostList h = build_list(specs, 9, 8, 0.03, 0.6);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  struct Bins { int64_t g, p; };
  for (const Bins& b : {Bins{1, 1}, Bins{10, 10}, Bins{40, 50}, Bins{100, 100}, Bins{120, 110}, Bins{200, 100},
                        Bins{1, 20000}, Bins{20000, 1}, Bins{4096, 4096}}) {
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, b.g, 0.05, b.p, 1.0, "counter placement"));
  }
}

TEST_F(Hist2dCudaTest, NarrowTallAndWideShortPairs) {
  struct Shape { int64_t batch, numel; };
  for (const Shape& s : {Shape{5000, 1}, Shape{3001, 3}, Shape{700, 683}, Shape{33, 1023}, Shape{33, 1025},
                         Shape{2, 2047}, Shape{2, 2049}, Shape{1, 100000}, Shape{3, 3 * 2048}}) {
    for (DType dt : {DType::kFloat32, DType::kFloat16}) {
      PairSpec spec;
      spec.dtype = dt;
      spec.numel = s.numel;
      const HostList h = build_list({spec, spec}, s.batch, static_cast<uint64_t>(s.batch * 7 + s.numel));
      DeviceList d;
      ASSERT_NO_FATAL_FAILURE(upload(h, &d));
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, 100, 0.05, 100, 1.0, std::string("shape, ") + dtype_name(dt)));
    }
  }
}

TEST_F(Hist2dCudaTest, LaunchGroupBoundaries) {
  const int g = static_cast<int>(kGroupPairs);
  for (int count : {1, g - 1, g, g + 1, 2 * g + 1, 300}) {
    std::mt19937_64 rng(static_cast<uint64_t>(count));
    const HostList h = build_list(random_specs(rng, count), 3, static_cast<uint64_t>(count) + 100);
    DeviceList d;
    ASSERT_NO_FATAL_FAILURE(upload(h, &d));
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, 100, 0.05, 100, 1.0, std::to_string(count) + " pairs"));
  }
}

TEST_F(Hist2dCudaTest, ValuesOnBinEdgesOfBothAxes) {
  // Values at ±maxval, exactly on edges and one float32/float64 ulp either side, and far outside.
  std::mt19937_64 rng(11);
  for (DType dt : {DType::kFloat32, DType::kFloat64}) {
    for (double mg : {0.05, 0.0625}) {
      const int64_t nbg = 100, nbp = 64;
      const double mp = 1.0;
      PairSpec spec;
      spec.dtype = dt;
      spec.numel = 3000;
      HostList h = build_list({spec}, 6, 12);
      const bool f32 = dt == DType::kFloat32;
      const double wg = 2 * mg / nbg, wp = 2 * mp / nbp;
      std::uniform_int_distribution<int64_t> eg(0, nbg), ep(0, nbp);
      auto near = [&](double e, int which) {
        if (which == 0) return e;
        const double dir = which == 1 ? -kInf : kInf;
        return f32 ? static_cast<double>(std::nextafter(static_cast<float>(e), static_cast<float>(dir)))
                   : std::nextafter(e, dir);
      };
      for (int64_t j = 0; j < spec.numel; ++j) {
        const int64_t k = ep(rng);
        h.set_param(0, j, j == 0 ? mp : (j == 1 ? -mp : (j == 2 ? 1e6 : near(-mp + k * wp, static_cast<int>(j % 3)))));
        for (int64_t b = 0; b < h.batch; ++b) {
          const int64_t i = eg(rng);
          const double v = (b + j) % 7 == 0 ? mg : ((b + j) % 7 == 1 ? -1e6 : near(-mg + i * wg, static_cast<int>((b + j) % 3)));
          h.set_grad(0, b, j, v);
        }
      }
      DeviceList d;
      ASSERT_NO_FATAL_FAILURE(upload(h, &d));
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, nbg, mg, nbp, mp, std::string("edges, ") + dtype_name(dt)));
    }
  }
}

TEST_F(Hist2dCudaTest, NonFinitePairsAreCountedAndNotBinned) {
  std::mt19937_64 rng(13);
  HostList h = build_list(random_specs(rng, 60), 5, 14);
  std::uniform_int_distribution<int> pick(0, 99);
  const double bad[] = {kNaN, kInf, -kInf};
  int64_t planted = 0;
  for (size_t t = 0; t < h.size(); ++t) {
    const int64_t P = h.specs[t].numel;
    for (int64_t j = 0; j < P; ++j) {
      if (pick(rng) < 3) {
        h.set_param(t, j, bad[pick(rng) % 3]);  // the whole column is left out
        ++planted;
      }
      for (int64_t b = 0; b < h.batch; ++b) {
        if (pick(rng) < 2) h.set_grad(t, b, j, bad[pick(rng) % 3]);
      }
    }
  }
  ASSERT_GT(planted, 0);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05, 100, 1.0);
  ASSERT_GT(ref.nonfinite, planted);
  for (int64_t nbg : {int64_t{100}, int64_t{200}}) {
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, nbg, 0.05, 100, 1.0, "non-finite"));
  }
}

TEST_F(Hist2dCudaTest, EmptyListsPairsAndBatches) {
  // Outputs are poisoned first: the launch must clear them even when it counts nothing.
  std::mt19937_64 rng(17);
  std::vector<PairSpec> empties(5);
  for (size_t t = 0; t < empties.size(); ++t) empties[t].dtype = static_cast<DType>(t % 4);
  for (const HostList& h : {build_list({}, 4, 1), build_list(empties, 4, 2), build_list(random_specs(rng, 10), 0, 3)}) {
    DeviceList d;
    ASSERT_NO_FATAL_FAILURE(upload(h, &d));
    Results res;
    ASSERT_NO_FATAL_FAILURE(run(h, d, 30, 0.05, 20, 1.0, &res));
    EXPECT_EQ(std::count(res.counts.begin(), res.counts.end(), int64_t{0}), 600);
    EXPECT_EQ(res.nonfinite, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism, asynchrony, graph capture

TEST_F(Hist2dCudaTest, RepeatedLaunchesAreBitwiseEqual) {
  std::mt19937_64 rng(19);
  const HostList h = build_list(random_specs(rng, 150), 8, 20);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  for (int64_t nbg : {int64_t{100}, int64_t{300}}) {
    Results first;
    ASSERT_NO_FATAL_FAILURE(run(h, d, nbg, 0.05, 100, 1.0, &first));
    for (int rep = 0; rep < 3; ++rep) {
      Results again;
      ASSERT_NO_FATAL_FAILURE(run(h, d, nbg, 0.05, 100, 1.0, &again));
      EXPECT_TRUE(again.counts == first.counts) << nbg << " bins, repetition " << rep;
      EXPECT_EQ(again.nonfinite, first.nonfinite);
    }
  }
}

TEST_F(Hist2dCudaTest, LaunchDoesNotWaitForTheStream) {
  std::mt19937_64 rng(23);
  const HostList h = build_list(random_specs(rng, 20), 4, 24);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  Launch L;
  ASSERT_NO_FATAL_FAILURE(prepare(h, d, 100, 0.05, 100, 1.0, &L));
  ASSERT_NO_FATAL_FAILURE(poison(L));
  spin_for_cycles<<<1, 1, 0, stream_>>>(static_cast<long long>(1) << 30);  // about half a second
  ASSERT_CUDA_OK(cudaGetLastError());
  ASSERT_CUDA_OK(tc::hist2d_launch(L.args, stream_));
  EXPECT_EQ(cudaStreamQuery(stream_), cudaErrorNotReady) << "the launcher waited for the stream";
  Results res;
  ASSERT_NO_FATAL_FAILURE(fetch(L, &res));
  expect_matches(compute_reference(h, 100, 0.05, 100, 1.0), res, 100, total_pairs(h), "after spin");
}

TEST_F(Hist2dCudaTest, GraphCaptureMatchesEager) {
  std::mt19937_64 rng(29);
  const HostList h = build_list(random_specs(rng, 140), 6, 30);  // two launch groups
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  for (int64_t nbg : {int64_t{100}, int64_t{250}}) {  // shared and global counters
    Results eager;
    ASSERT_NO_FATAL_FAILURE(run(h, d, nbg, 0.05, 100, 1.0, &eager));
    expect_matches(compute_reference(h, nbg, 0.05, 100, 1.0), eager, 100, total_pairs(h), "eager");

    Launch L;
    ASSERT_NO_FATAL_FAILURE(prepare(h, d, nbg, 0.05, 100, 1.0, &L));
    cudaGraphExec_t exec = nullptr;
    ASSERT_NO_FATAL_FAILURE(
        capture_graph(cudaStreamCaptureModeGlobal, [&] { return tc::hist2d_launch(L.args, stream_); }, &exec));
    for (int replay = 0; replay < 2; ++replay) {
      ASSERT_NO_FATAL_FAILURE(poison(L));
      ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream_));
      Results graphed;
      ASSERT_NO_FATAL_FAILURE(fetch(L, &graphed));
      EXPECT_TRUE(graphed.counts == eager.counts) << nbg << " bins, graph replay " << replay;
      EXPECT_EQ(graphed.nonfinite, eager.nonfinite) << nbg << " bins, graph replay " << replay;
    }
    EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
  }
}

// ---------------------------------------------------------------------------------------------
// 64-bit sizes on the device

TEST_F(Hist2dCudaTest, PairOfMoreThan2To31Elements) {
  // B = 2, P = 2^30 + 4096 (a multiple of 4) in bfloat16: 2^31 + 8192 gradient elements. Element
  // e = b·P + j holds gtable[e % G] and θ_j holds ptable[j % 4]; G and P are multiples of 4, so
  // j % 4 = e % 4 and the pair of element e is fixed by e % G: the reference is exact from counts.
  const int64_t batch = 2, P = (int64_t{1} << 30) + 4096, n = batch * P, G = 65540;
  const size_t bytes = static_cast<size_t>(n + P) * sizeof(uint16_t);
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_CUDA_OK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < bytes + (size_t{1} << 30)) GTEST_SKIP() << "needs " << bytes << " bytes of device memory";

  std::mt19937_64 rng(31);
  std::normal_distribution<double> normal(0.0, 0.03);
  std::vector<uint16_t> gtable(static_cast<size_t>(G)), ptable(4);
  std::vector<double> gval(gtable.size()), pval(4);
  for (size_t k = 0; k < gtable.size(); ++k) {
    double v = k % 2 == 0 ? 0.0 : normal(rng);  // half the pairs in two bins: counts past 2^28
    if (k % 97 == 1) v = 0.05;
    if (k % 1009 == 2) v = kNaN;
    gval[k] = store_value(reinterpret_cast<unsigned char*>(&gtable[k]), DType::kBFloat16, v);
  }
  const double pv[4] = {-0.3, 0.0, 0.7, 2.0};
  for (size_t k = 0; k < 4; ++k) pval[k] = store_value(reinterpret_cast<unsigned char*>(&ptable[k]), DType::kBFloat16, pv[k]);

  DeviceMemory grad, param, gt, pt, counts, nonfinite;
  ASSERT_CUDA_OK(grad.allocate(static_cast<size_t>(n) * sizeof(uint16_t)));
  ASSERT_CUDA_OK(param.allocate(static_cast<size_t>(P) * sizeof(uint16_t)));
  ASSERT_CUDA_OK(gt.allocate(gtable.size() * sizeof(uint16_t)));
  ASSERT_CUDA_OK(pt.allocate(ptable.size() * sizeof(uint16_t)));
  ASSERT_CUDA_OK(cudaMemcpyAsync(gt.get(), gtable.data(), gtable.size() * sizeof(uint16_t), cudaMemcpyHostToDevice, stream_));
  ASSERT_CUDA_OK(cudaMemcpyAsync(pt.get(), ptable.data(), ptable.size() * sizeof(uint16_t), cudaMemcpyHostToDevice, stream_));
  fill_periodic<<<4096, 256, 0, stream_>>>(grad.get<uint16_t>(), n, gt.get<uint16_t>(), G);
  fill_periodic<<<4096, 256, 0, stream_>>>(param.get<uint16_t>(), P, pt.get<uint16_t>(), 4);
  ASSERT_CUDA_OK(cudaGetLastError());

  const int64_t nbg = 100, nbp = 10;
  ASSERT_CUDA_OK(counts.allocate(static_cast<size_t>(nbg * nbp) * sizeof(int64_t)));
  ASSERT_CUDA_OK(nonfinite.allocate(sizeof(int64_t)));
  tc::Hist2dPair pair{grad.get(), param.get(), P, DType::kBFloat16};
  tc::Hist2dArgs a{};
  a.pairs = &pair;
  a.num_pairs = 1;
  a.batch = batch;
  a.grad_spec = tc::make_hist_spec(nbg, 0.05);
  a.param_spec = tc::make_hist_spec(nbp, 1.0);
  a.counts = counts.get<int64_t>();
  a.nonfinite = nonfinite.get<int64_t>();
  ASSERT_CUDA_OK(tc::hist2d_launch(a, stream_));
  Results res;
  res.counts.assign(static_cast<size_t>(nbg * nbp), 0);
  ASSERT_CUDA_OK(cudaMemcpyAsync(res.counts.data(), counts.get(), res.counts.size() * sizeof(int64_t),
                                 cudaMemcpyDeviceToHost, stream_));
  ASSERT_CUDA_OK(cudaMemcpyAsync(&res.nonfinite, nonfinite.get(), sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));

  Reference ref;
  ref.counts.assign(static_cast<size_t>(nbg * nbp), 0);
  for (int64_t r = 0; r < G; ++r) {
    const int64_t count = n / G + (r < n % G ? 1 : 0);
    const double g = gval[static_cast<size_t>(r)], p = pval[static_cast<size_t>(r % 4)];
    if (!std::isfinite(g)) {
      ref.nonfinite += count;
    } else {
      ref.counts[static_cast<size_t>(reference_bin(g, nbg, 0.05) * nbp + reference_bin(p, nbp, 1.0))] += count;
    }
  }
  EXPECT_GT(*std::max_element(ref.counts.begin(), ref.counts.end()), int64_t{1} << 28);
  expect_matches(ref, res, nbp, n, "2^31 + 8192 elements");
}

}  // namespace
