// The torch-free CUDA launcher param_stats_launch (cuda/param_stats.cu) against a CPU float64
// reference written here from SPEC.md §1 and §4: random lists mixing dtypes, sizes that are not
// multiples of the chunk or the vector width, misaligned pointers, empty tensors, lists longer
// than one launch group, every flag subset, exact histograms, non-finite counts, the θ_prev
// refresh, bitwise determinism and CUDA-graph capture.
//
// Every test that needs a GPU skips cleanly when none is present.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda/param_stats.h"
#include "tests/cpp/cuda_test_util.h"
#include "tests/cpp/reference_bin.h"

namespace {

using namespace trainscope_test;
namespace tc = trainscope::cuda;

constexpr int64_t kGroupTensors = 96;  // kMaxGroupTensors of the launcher: lists above take several launches
constexpr uint32_t kAllFlags = tc::kGradSq | tc::kGradAbs | tc::kParamAbs | tc::kDistSq |
                               tc::kUpdateSq | tc::kHistogram | tc::kRefreshPrev | tc::kParamSq;
constexpr uint32_t kAllMetrics = kAllFlags & ~static_cast<uint32_t>(tc::kRefreshPrev);
constexpr uint32_t kSlotFlag[tc::kNumSums] = {tc::kGradSq, tc::kGradAbs, tc::kParamAbs, tc::kDistSq,
                                              tc::kUpdateSq, tc::kParamSq};

// ---------------------------------------------------------------------------------------------
// Host lists

enum Role : int { kGrad = 0, kParam = 1, kInit = 2, kPrev = 3 };
constexpr int kNumRoles = 4;

struct TensorSpec {
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
  bool selected = true;                    // counts toward the global weight magnitude
  std::array<bool, kNumRoles> misaligned{};  // start one element past a 256-byte boundary
};

// One list on the host: per role, one byte buffer holding every tensor (with padding between
// them), the byte offset of each tensor, and the values stored, decoded to float64.
struct HostList {
  std::vector<TensorSpec> specs;
  std::array<std::vector<unsigned char>, kNumRoles> bytes;
  std::array<std::vector<size_t>, kNumRoles> offset;
  std::array<std::vector<std::vector<double>>, kNumRoles> values;

  size_t size() const { return specs.size(); }
  void set(Role r, size_t t, int64_t i, double v) {
    const DType dt = specs[t].dtype;
    values[r][t][static_cast<size_t>(i)] =
        store_value(bytes[r].data() + offset[r][t] + static_cast<size_t>(i) * elem_size(dt), dt, v);
  }
  const unsigned char* tensor_bytes(Role r, size_t t) const { return bytes[r].data() + offset[r][t]; }
  size_t tensor_byte_count(size_t t) const {
    return static_cast<size_t>(specs[t].numel) * elem_size(specs[t].dtype);
  }
};

// Gradients ~ N(0, grad_scale²) (so the default histogram range has both inliers and outliers),
// θ ~ N(0, 1), θ₀ = θ + N(0, 0.1²), θ_prev = θ + N(0, 0.01²).
HostList build_list(const std::vector<TensorSpec>& specs, uint64_t seed, double grad_scale = 0.03) {
  HostList h;
  h.specs = specs;
  for (int r = 0; r < kNumRoles; ++r) {
    size_t cursor = 0;
    h.offset[r].resize(specs.size());
    h.values[r].resize(specs.size());
    for (size_t t = 0; t < specs.size(); ++t) {
      h.offset[r][t] = place_tensor(&cursor, static_cast<size_t>(specs[t].numel), elem_size(specs[t].dtype),
                                    specs[t].misaligned[r]);
      h.values[r][t].resize(static_cast<size_t>(specs[t].numel));
    }
    h.bytes[r].assign(padded_bytes(cursor), kPadByte);
  }
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (size_t t = 0; t < specs.size(); ++t) {
    for (int64_t i = 0; i < specs[t].numel; ++i) {
      const double p = normal(rng);
      h.set(kGrad, t, i, grad_scale * normal(rng));
      h.set(kParam, t, i, p);
      h.set(kInit, t, i, p + 0.1 * normal(rng));
      h.set(kPrev, t, i, p + 0.01 * normal(rng));
    }
  }
  return h;
}

// Sizes around the chunk length and the vector widths (4 floats, 2 doubles, 8 halves), and empty.
std::vector<TensorSpec> random_specs(std::mt19937_64& rng, int count, int64_t chunk_elems,
                                     bool misalign = true, bool mixed_dtypes = true) {
  std::uniform_int_distribution<int> pick(0, 99);
  std::uniform_int_distribution<int64_t> small(1, 40);
  std::uniform_int_distribution<int64_t> within(1, 3 * chunk_elems);
  std::uniform_int_distribution<int64_t> delta(-3, 3);
  std::vector<TensorSpec> specs(static_cast<size_t>(count));
  for (auto& s : specs) {
    s.dtype = mixed_dtypes ? static_cast<DType>(pick(rng) % 4) : DType::kFloat32;
    const int kind = pick(rng);
    if (kind < 12) {
      s.numel = 0;
    } else if (kind < 35) {
      s.numel = small(rng);
    } else if (kind < 60) {
      s.numel = std::max<int64_t>(1, (1 + pick(rng) % 3) * chunk_elems + delta(rng));
    } else {
      s.numel = within(rng);
    }
    s.selected = pick(rng) < 70;
    for (bool& m : s.misaligned) m = misalign && pick(rng) < 30;
  }
  return specs;
}

// ---------------------------------------------------------------------------------------------
// Float64 reference

struct Reference {
  // Per tensor: Σg², Σ|g|, Σ|θ|, Σ(θ−θ₀)², Σ(θ−θ_prev)², Σθ², in the slot order of the launcher.
  std::vector<std::array<double, tc::kNumSums>> sums;
  std::vector<int64_t> nonfinite;
  std::vector<std::vector<int64_t>> hist;  // per tensor; empty when nbins == 0
};

Reference compute_reference(const HostList& h, int64_t nbins, double maxval) {
  Reference ref;
  ref.sums.resize(h.size());
  ref.nonfinite.assign(h.size(), 0);
  ref.hist.resize(h.size());
  for (size_t t = 0; t < h.size(); ++t) {
    long double s[tc::kNumSums] = {0, 0, 0, 0, 0, 0};
    if (nbins > 0) ref.hist[t].assign(static_cast<size_t>(nbins), 0);
    const auto& g = h.values[kGrad][t];
    const auto& p = h.values[kParam][t];
    const auto& p0 = h.values[kInit][t];
    const auto& pp = h.values[kPrev][t];
    for (size_t i = 0; i < g.size(); ++i) {
      const long double gi = g[i], pi = p[i];
      s[tc::kSlotGradNorm] += gi * gi;
      s[tc::kSlotGradMagnitude] += std::fabs(gi);
      s[tc::kSlotWeightMagnitude] += std::fabs(pi);
      s[tc::kSlotDistance] += (pi - p0[i]) * (pi - p0[i]);
      s[tc::kSlotUpdateSize] += (pi - pp[i]) * (pi - pp[i]);
      s[tc::kSlotWeightNorm] += pi * pi;
      if (!std::isfinite(g[i])) {
        ++ref.nonfinite[t];
      } else if (nbins > 0) {
        ++ref.hist[t][static_cast<size_t>(reference_bin(g[i], nbins, maxval))];
      }
    }
    for (int k = 0; k < tc::kNumSums; ++k) ref.sums[t][k] = static_cast<double>(s[k]);
  }
  return ref;
}

// SPEC.md §1 from the sums: norms are square roots, magnitudes means, the update ratio
// update_size / weight_norm; NaN when not requested.
double metric_from_sums(int slot, const std::array<double, tc::kNumSums>& sums, double count, uint32_t flags) {
  if (slot == tc::kSlotUpdateRatio) {
    if ((flags & tc::kUpdateSq) == 0 || (flags & tc::kParamSq) == 0) return kNaN;
    return std::sqrt(sums[tc::kSlotUpdateSize]) / std::sqrt(sums[tc::kSlotWeightNorm]);
  }
  if ((flags & kSlotFlag[slot]) == 0) return kNaN;
  if (slot == tc::kSlotGradMagnitude || slot == tc::kSlotWeightMagnitude) return sums[slot] / count;
  return std::sqrt(sums[slot]);
}

double expected_tensor_metric(const HostList& h, const Reference& ref, size_t t, int slot, uint32_t flags) {
  return metric_from_sums(slot, ref.sums[t], static_cast<double>(h.specs[t].numel), flags);
}

double expected_global_metric(const HostList& h, const Reference& ref, int slot, uint32_t flags) {
  std::array<long double, tc::kNumSums> sums{};
  long double count = 0, weight_count = 0;
  for (size_t t = 0; t < h.size(); ++t) {
    for (int k = 0; k < tc::kNumSums; ++k) {
      if (k != tc::kSlotWeightMagnitude || h.specs[t].selected) sums[k] += ref.sums[t][k];
    }
    count += h.specs[t].numel;
    if (h.specs[t].selected) weight_count += h.specs[t].numel;
  }
  std::array<double, tc::kNumSums> s;
  for (int k = 0; k < tc::kNumSums; ++k) s[k] = static_cast<double>(sums[k]);
  const long double n = slot == tc::kSlotWeightMagnitude ? weight_count : count;
  return metric_from_sums(slot, s, static_cast<double>(n), flags);
}

// ---------------------------------------------------------------------------------------------
// Device lists and launches

struct DeviceList {
  std::array<DeviceMemory, kNumRoles> buf;
};

struct LaunchConfig {
  uint32_t flags = kAllMetrics;
  int64_t nbins = 100;
  double maxval = 0.05;
  int64_t chunk_elems = tc::kDefaultChunkElems;
  DType out_dtype = DType::kFloat32;
};

LaunchConfig launch_config(uint32_t flags, int64_t nbins = 100, double maxval = 0.05,
                           int64_t chunk_elems = tc::kDefaultChunkElems, DType out_dtype = DType::kFloat32) {
  LaunchConfig c;
  c.flags = flags;
  c.nbins = nbins;
  c.maxval = maxval;
  c.chunk_elems = chunk_elems;
  c.out_dtype = out_dtype;
  return c;
}

std::string describe(const LaunchConfig& c) {
  std::ostringstream os;
  os << "flags=0x" << std::hex << c.flags << std::dec << " nbins=" << c.nbins << " maxval=" << c.maxval
     << " chunk=" << c.chunk_elems << " out=" << dtype_name(c.out_dtype);
  return os.str();
}

struct DeviceOutputs {
  DeviceMemory global, per_tensor, nonfinite, nonfinite_per_tensor, hist, hist_per_tensor;
};

// Everything one launch needs; args.tensors points into descs, so a Launch stays where it is made.
struct Launch {
  Launch() = default;
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;

  LaunchConfig cfg;
  std::vector<tc::TensorDesc> descs;
  tc::ParamStatsArgs args{};
  DeviceMemory workspace;
  size_t workspace_bytes = 0;
  DeviceOutputs out;
};

// Host copy of every output of one launch.
struct Results {
  DType out_dtype = DType::kFloat32;
  std::vector<unsigned char> global, per_tensor;  // raw bytes, out_dtype
  int64_t nonfinite = 0;
  std::vector<int64_t> nonfinite_per_tensor, hist, hist_per_tensor;

  double read(const std::vector<unsigned char>& raw, size_t index) const {
    if (out_dtype == DType::kFloat64) {
      double v;
      std::memcpy(&v, raw.data() + index * sizeof v, sizeof v);
      return v;
    }
    float v;
    std::memcpy(&v, raw.data() + index * sizeof v, sizeof v);
    return v;
  }
  double metric(int slot) const { return read(global, static_cast<size_t>(slot)); }
  double metric(size_t t, int slot) const { return read(per_tensor, t * tc::kNumSlots + slot); }
};

void expect_bitwise_equal(const Results& a, const Results& b, const std::string& context) {
  EXPECT_TRUE(a.global == b.global) << context << ": global metrics differ";
  EXPECT_TRUE(a.per_tensor == b.per_tensor) << context << ": per-tensor metrics differ";
  EXPECT_EQ(a.nonfinite, b.nonfinite) << context;
  EXPECT_TRUE(a.nonfinite_per_tensor == b.nonfinite_per_tensor) << context << ": per-tensor nonfinite differ";
  EXPECT_TRUE(a.hist == b.hist) << context << ": histograms differ";
  EXPECT_TRUE(a.hist_per_tensor == b.hist_per_tensor) << context << ": per-tensor histograms differ";
}

// Compares one launch's results with the reference: metrics within tolerance (float64 data into
// float64 outputs: 1e-12; anything accumulated in float32: SPEC.md's 1e-5), counts exactly.
void check_results(const HostList& h, const Reference& ref, const LaunchConfig& cfg, const Results& res,
                   const std::string& context) {
  Mismatches m;
  const uint32_t f = cfg.flags;
  bool all_double = true;
  for (size_t t = 0; t < h.size(); ++t) {
    const bool tensor_double = h.specs[t].dtype == DType::kFloat64;
    all_double = all_double && tensor_double;
    const double rel = (cfg.out_dtype == DType::kFloat64 && tensor_double) ? 1e-12 : 1e-5;
    for (int k = 0; k < tc::kNumSlots; ++k) {
      const double got = res.metric(t, k), want = expected_tensor_metric(h, ref, t, k, f);
      if (!close_enough(got, want, rel)) {
        m.add("tensor ", t, " (", dtype_name(h.specs[t].dtype), ", numel ", h.specs[t].numel, ") slot ", k,
              ": got ", got, ", want ", want, ", tolerance ", rel);
      }
    }
    const int64_t want_nf = tc::reads_grad(f) ? ref.nonfinite[t] : 0;
    if (res.nonfinite_per_tensor[t] != want_nf) {
      m.add("tensor ", t, " nonfinite: got ", res.nonfinite_per_tensor[t], ", want ", want_nf);
    }
  }
  const double rel = (cfg.out_dtype == DType::kFloat64 && all_double) ? 1e-12 : 1e-5;
  for (int k = 0; k < tc::kNumSlots; ++k) {
    const double got = res.metric(k), want = expected_global_metric(h, ref, k, f);
    if (!close_enough(got, want, rel)) m.add("global slot ", k, ": got ", got, ", want ", want, ", tolerance ", rel);
  }
  int64_t want_nf = 0;
  int64_t finite = 0;
  for (size_t t = 0; t < h.size(); ++t) {
    want_nf += ref.nonfinite[t];
    finite += h.specs[t].numel - ref.nonfinite[t];
  }
  if (!tc::reads_grad(f)) want_nf = 0;
  if (res.nonfinite != want_nf) m.add("global nonfinite: got ", res.nonfinite, ", want ", want_nf);

  if (f & tc::kHistogram) {
    const size_t nb = static_cast<size_t>(cfg.nbins);
    std::vector<int64_t> want_global(nb, 0);
    for (size_t t = 0; t < h.size(); ++t) {
      for (size_t b = 0; b < nb; ++b) {
        const int64_t want = ref.hist[t][b];
        want_global[b] += want;
        const int64_t got = res.hist_per_tensor[t * nb + b];
        if (got != want) m.add("tensor ", t, " bin ", b, ": got ", got, ", want ", want);
      }
    }
    for (size_t b = 0; b < nb; ++b) {
      if (res.hist[b] != want_global[b]) m.add("global bin ", b, ": got ", res.hist[b], ", want ", want_global[b]);
    }
    const int64_t total = std::accumulate(res.hist.begin(), res.hist.end(), int64_t{0});
    if (total != finite) m.add("histogram holds ", total, " elements, want the ", finite, " finite ones");
  }
  m.expect_none(context + " [" + describe(cfg) + "]");
}

// ---------------------------------------------------------------------------------------------
// Fixture: a stream of its own (CudaStreamTest); every memory operation goes through it.

class ParamStatsCudaTest : public CudaStreamTest {
 protected:
  void upload_role(const HostList& h, Role r, DeviceList* d) {
    ASSERT_CUDA_OK(cudaMemcpyAsync(d->buf[r].get(), h.bytes[r].data(), h.bytes[r].size(),
                                   cudaMemcpyHostToDevice, stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void upload(const HostList& h, DeviceList* d) {
    for (int r = 0; r < kNumRoles; ++r) {
      ASSERT_CUDA_OK(d->buf[r].allocate(h.bytes[r].size()));
      ASSERT_NO_FATAL_FAILURE(upload_role(h, static_cast<Role>(r), d));
    }
  }

  void download_role(const HostList& h, const DeviceList& d, Role r, std::vector<unsigned char>* out) {
    out->assign(h.bytes[r].size(), 0);
    ASSERT_CUDA_OK(cudaMemcpyAsync(out->data(), d.buf[r].get(), out->size(), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  // Descriptors, outputs and workspace for one launch. Arrays the flags do not read are null,
  // and so are the histogram outputs without kHistogram: the launcher must not touch them.
  void prepare(const HostList& h, const DeviceList& d, const LaunchConfig& cfg, Launch* L) {
    const uint32_t f = cfg.flags;
    L->cfg = cfg;
    L->descs.resize(h.size());
    for (size_t t = 0; t < h.size(); ++t) {
      tc::TensorDesc& desc = L->descs[t];
      desc.grad = tc::reads_grad(f) ? d.buf[kGrad].bytes_at(h.offset[kGrad][t]) : nullptr;
      desc.param = tc::reads_param(f) ? d.buf[kParam].bytes_at(h.offset[kParam][t]) : nullptr;
      desc.init = tc::reads_init(f) ? d.buf[kInit].bytes_at(h.offset[kInit][t]) : nullptr;
      desc.prev = (tc::reads_prev(f) || (f & tc::kRefreshPrev)) ? d.buf[kPrev].bytes_at(h.offset[kPrev][t])
                                                               : nullptr;
      desc.numel = h.specs[t].numel;
      desc.dtype = h.specs[t].dtype;
      desc.weight_selected = h.specs[t].selected ? 1 : 0;
    }
    const size_t n = h.size();
    const size_t nb = static_cast<size_t>(cfg.nbins);
    const bool hist = (f & tc::kHistogram) != 0;
    ASSERT_CUDA_OK(L->out.global.allocate(tc::kNumSlots * sizeof(double)));
    ASSERT_CUDA_OK(L->out.per_tensor.allocate(n * tc::kNumSlots * sizeof(double)));
    ASSERT_CUDA_OK(L->out.nonfinite.allocate(sizeof(int64_t)));
    ASSERT_CUDA_OK(L->out.nonfinite_per_tensor.allocate(n * sizeof(int64_t)));
    if (hist) {
      ASSERT_CUDA_OK(L->out.hist.allocate(nb * sizeof(int64_t)));
      ASSERT_CUDA_OK(L->out.hist_per_tensor.allocate(n * nb * sizeof(int64_t)));
    }
    tc::ParamStatsArgs& a = L->args;
    a = tc::ParamStatsArgs{};
    a.tensors = n > 0 ? L->descs.data() : nullptr;
    a.num_tensors = static_cast<int64_t>(n);
    a.flags = f;
    a.hist_spec = tc::make_hist_spec(cfg.nbins, cfg.maxval);
    a.chunk_elems = cfg.chunk_elems;
    a.out_dtype = cfg.out_dtype;
    a.global = L->out.global.get();
    a.per_tensor = L->out.per_tensor.get();
    a.nonfinite = L->out.nonfinite.get<int64_t>();
    a.nonfinite_per_tensor = L->out.nonfinite_per_tensor.get<int64_t>();
    a.hist = hist ? L->out.hist.get<int64_t>() : nullptr;
    a.hist_per_tensor = hist ? L->out.hist_per_tensor.get<int64_t>() : nullptr;
    L->workspace_bytes = tc::param_stats_workspace_bytes(a);
    ASSERT_GT(L->workspace_bytes, 0u);
    ASSERT_CUDA_OK(L->workspace.allocate(L->workspace_bytes));
  }

  // Fills every output with 0x7F bytes (finite floats, large counts), so that a slot the launch
  // fails to write shows up, NaN slots included.
  void poison(const Launch& L) {
    for (const DeviceMemory* m : {&L.out.global, &L.out.per_tensor, &L.out.nonfinite,
                                  &L.out.nonfinite_per_tensor, &L.out.hist, &L.out.hist_per_tensor}) {
      if (m->get() != nullptr) ASSERT_CUDA_OK(cudaMemsetAsync(m->get(), 0x7F, m->bytes(), stream_));
    }
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void fetch(const Launch& L, Results* r) {
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
    const size_t n = L.descs.size();
    const size_t osize = L.cfg.out_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
    r->out_dtype = L.cfg.out_dtype;
    r->global.assign(tc::kNumSlots * osize, 0);
    r->per_tensor.assign(n * tc::kNumSlots * osize, 0);
    r->nonfinite_per_tensor.assign(n, 0);
    ASSERT_CUDA_OK(cudaMemcpyAsync(r->global.data(), L.out.global.get(), r->global.size(), cudaMemcpyDeviceToHost, stream_));
    if (n > 0) {
      ASSERT_CUDA_OK(cudaMemcpyAsync(r->per_tensor.data(), L.out.per_tensor.get(), r->per_tensor.size(),
                                     cudaMemcpyDeviceToHost, stream_));
      ASSERT_CUDA_OK(cudaMemcpyAsync(r->nonfinite_per_tensor.data(), L.out.nonfinite_per_tensor.get(),
                                     n * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    }
    ASSERT_CUDA_OK(cudaMemcpyAsync(&r->nonfinite, L.out.nonfinite.get(), sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    if (L.cfg.flags & tc::kHistogram) {
      const size_t nb = static_cast<size_t>(L.cfg.nbins);
      r->hist.assign(nb, 0);
      r->hist_per_tensor.assign(n * nb, 0);
      ASSERT_CUDA_OK(cudaMemcpyAsync(r->hist.data(), L.out.hist.get(), nb * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
      if (n > 0) {
        ASSERT_CUDA_OK(cudaMemcpyAsync(r->hist_per_tensor.data(), L.out.hist_per_tensor.get(),
                                       n * nb * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
      }
    } else {
      r->hist.clear();
      r->hist_per_tensor.clear();
    }
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  }

  void run(const HostList& h, const DeviceList& d, const LaunchConfig& cfg, Results* r) {
    Launch L;
    ASSERT_NO_FATAL_FAILURE(prepare(h, d, cfg, &L));
    ASSERT_NO_FATAL_FAILURE(poison(L));
    ASSERT_CUDA_OK(tc::param_stats_launch(L.args, L.workspace.get(), L.workspace_bytes, stream_));
    ASSERT_NO_FATAL_FAILURE(fetch(L, r));
  }

  // θ_prev on the device against what it must hold: θ where refreshed, the upload elsewhere,
  // and the padding between tensors untouched.
  void expect_prev(const HostList& h, const DeviceList& d, bool refreshed, const std::string& context) {
    std::vector<unsigned char> got;
    ASSERT_NO_FATAL_FAILURE(download_role(h, d, kPrev, &got));
    std::vector<unsigned char> want = h.bytes[kPrev];
    if (refreshed) {
      for (size_t t = 0; t < h.size(); ++t) {
        std::memcpy(want.data() + h.offset[kPrev][t], h.tensor_bytes(kParam, t), h.tensor_byte_count(t));
      }
    }
    size_t first_diff = want.size();
    for (size_t i = 0; i < want.size(); ++i) {
      if (got[i] != want[i]) {
        first_diff = i;
        break;
      }
    }
    EXPECT_EQ(first_diff, want.size()) << context << ": θ_prev differs from " << (refreshed ? "θ" : "its upload")
                                       << " first at byte " << first_diff;
  }

  void expect_unchanged(const HostList& h, const DeviceList& d, Role r, const std::string& context) {
    std::vector<unsigned char> got;
    ASSERT_NO_FATAL_FAILURE(download_role(h, d, r, &got));
    EXPECT_TRUE(got == h.bytes[r]) << context << ": input array of role " << r << " was modified";
  }

  // Runs cfg on the list and checks it against the reference (re-uploading θ_prev first).
  void run_and_check(const HostList& h, DeviceList& d, const Reference& ref, const LaunchConfig& cfg,
                     const std::string& context, Results* res_out = nullptr) {
    ASSERT_NO_FATAL_FAILURE(upload_role(h, kPrev, &d));
    Results res;
    ASSERT_NO_FATAL_FAILURE(run(h, d, cfg, &res));
    check_results(h, ref, cfg, res, context);
    ASSERT_NO_FATAL_FAILURE(expect_prev(h, d, (cfg.flags & tc::kRefreshPrev) != 0, context + " [" + describe(cfg) + "]"));
    if (res_out != nullptr) *res_out = std::move(res);
  }
};

// ---------------------------------------------------------------------------------------------
// Argument checks: they come before any CUDA call, so this test needs no GPU.

TEST(ParamStatsLaunchArgs, InvalidArgumentsAreRejectedBeforeAnyWork) {
  std::vector<tc::TensorDesc> descs(2);
  for (auto& d : descs) {
    d = tc::TensorDesc{};
    d.numel = 5000;
    d.dtype = DType::kFloat32;
    d.weight_selected = 1;
  }
  tc::ParamStatsArgs good{};
  good.tensors = descs.data();
  good.num_tensors = 2;
  good.flags = tc::kGradSq | tc::kHistogram;
  good.hist_spec = tc::make_hist_spec(100, 0.05);
  good.chunk_elems = 1024;
  good.out_dtype = DType::kFloat32;
  const size_t ws_bytes = tc::param_stats_workspace_bytes(good);
  ASSERT_GT(ws_bytes, 0u);
  // Never dereferenced: each call below must fail its checks first.
  std::vector<unsigned char> fake_workspace(ws_bytes);

  auto expect_invalid = [&](const tc::ParamStatsArgs& a, void* ws, size_t bytes, const char* what) {
    EXPECT_EQ(tc::param_stats_launch(a, ws, bytes, nullptr), cudaErrorInvalidValue) << what;
  };

  for (int64_t chunk : {int64_t{1000}, int64_t{0}, int64_t{-1024}, int64_t{1025}, int64_t{512}}) {
    tc::ParamStatsArgs a = good;
    a.chunk_elems = chunk;
    EXPECT_EQ(tc::param_stats_launch(a, fake_workspace.data(), ws_bytes, nullptr), cudaErrorInvalidValue)
        << "chunk_elems=" << chunk;
  }
  for (int64_t nbins : {int64_t{0}, int64_t{-1}, tc::kMaxHistBins + 1}) {
    tc::ParamStatsArgs a = good;
    a.hist_spec = tc::make_hist_spec(1, 0.05);
    a.hist_spec.nbins = nbins;
    EXPECT_EQ(tc::param_stats_launch(a, fake_workspace.data(), ws_bytes, nullptr), cudaErrorInvalidValue)
        << "nbins=" << nbins;
  }
  for (double maxval : {0.0, -0.05, kNaN}) {
    tc::ParamStatsArgs a = good;
    a.hist_spec = tc::make_hist_spec(100, maxval);
    EXPECT_EQ(tc::param_stats_launch(a, fake_workspace.data(), ws_bytes, nullptr), cudaErrorInvalidValue)
        << "maxval=" << maxval;
  }
  {
    tc::ParamStatsArgs a = good;
    a.num_tensors = -1;
    expect_invalid(a, fake_workspace.data(), ws_bytes, "num_tensors=-1");
  }
  {
    tc::ParamStatsArgs a = good;
    a.tensors = nullptr;
    expect_invalid(a, fake_workspace.data(), ws_bytes, "tensors=nullptr with num_tensors=2");
  }
  expect_invalid(good, nullptr, ws_bytes, "workspace=nullptr");
  expect_invalid(good, fake_workspace.data(), ws_bytes - 1, "workspace one byte short");
  expect_invalid(good, fake_workspace.data(), 0, "workspace of 0 bytes");
}

TEST(ParamStatsLaunchArgs, WorkspaceGrowsWithChunksAndTensors) {
  std::vector<tc::TensorDesc> descs(3);
  for (auto& d : descs) {
    d = tc::TensorDesc{};
    d.numel = 100000;
    d.dtype = DType::kFloat16;
  }
  tc::ParamStatsArgs a{};
  a.tensors = descs.data();
  a.num_tensors = 3;
  a.flags = kAllMetrics;
  a.hist_spec = tc::make_hist_spec(100, 0.05);
  a.chunk_elems = tc::kDefaultChunkElems;
  const size_t coarse = tc::param_stats_workspace_bytes(a);
  a.chunk_elems = 1024;
  const size_t fine = tc::param_stats_workspace_bytes(a);
  EXPECT_GT(fine, coarse);
  a.num_tensors = 0;
  a.tensors = nullptr;
  EXPECT_GT(tc::param_stats_workspace_bytes(a), 0u);
  // 64-bit sizes: a descriptor of 2^33 elements is only arithmetic here.
  descs[0].numel = int64_t{1} << 33;
  a.tensors = descs.data();
  a.num_tensors = 1;
  a.chunk_elems = tc::kDefaultChunkElems;
  EXPECT_GT(tc::param_stats_workspace_bytes(a), static_cast<size_t>(int64_t{1} << 19));
}

// ---------------------------------------------------------------------------------------------
// Against the reference

TEST_F(ParamStatsCudaTest, EveryFlagSubsetOnAMixedList) {
  std::mt19937_64 rng(1234);
  // 230 tensors: three launch groups; chunk 1024: many chunks per tensor.
  const HostList h = build_list(random_specs(rng, 230, 1024), 1);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05);
  for (uint32_t flags = 0; flags <= kAllFlags; ++flags) {
    for (DType out : {DType::kFloat32, DType::kFloat64}) {
      const LaunchConfig cfg = launch_config(flags, 100, 0.05, 1024, out);
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "mixed list"));
    }
  }
  for (Role r : {kGrad, kParam, kInit}) ASSERT_NO_FATAL_FAILURE(expect_unchanged(h, d, r, "after all subsets"));
}

TEST_F(ParamStatsCudaTest, DefaultChunkOnLargerTensors) {
  std::vector<TensorSpec> specs;
  const int64_t sizes[] = {(int64_t{1} << 20) + 3, 300001, 16384, 16385, 16383, 65536 * 3 + 7, 0, 1, 777777};
  int i = 0;
  for (int64_t n : sizes) {
    TensorSpec s;
    s.numel = n;
    s.dtype = static_cast<DType>(i % 4);
    s.selected = i % 3 != 0;
    s.misaligned = {i % 2 == 1, i % 5 == 2, false, i % 4 == 3};
    specs.push_back(s);
    ++i;
  }
  const HostList h = build_list(specs, 2);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05);
  for (uint32_t flags : {kAllMetrics, kAllFlags, uint32_t{tc::kHistogram}, uint32_t{tc::kUpdateSq | tc::kRefreshPrev}}) {
    for (int64_t chunk : {tc::kDefaultChunkElems, int64_t{3072}, int64_t{65536}}) {
      const LaunchConfig cfg = launch_config(flags, 100, 0.05, chunk);
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "larger tensors"));
    }
  }
}

TEST_F(ParamStatsCudaTest, LaunchGroupBoundaries) {
  const int g = static_cast<int>(kGroupTensors);
  for (int count : {1, g - 1, g, g + 1, 2 * g, 2 * g + 1, 300}) {
    std::mt19937_64 rng(static_cast<uint64_t>(count));
    const HostList h = build_list(random_specs(rng, count, 1024), static_cast<uint64_t>(count) + 100);
    DeviceList d;
    ASSERT_NO_FATAL_FAILURE(upload(h, &d));
    const Reference ref = compute_reference(h, 100, 0.05);
    const LaunchConfig cfg = launch_config(kAllFlags, 100, 0.05, 1024);
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, std::to_string(count) + " tensors"));
  }
}

TEST_F(ParamStatsCudaTest, Float64ListIntoFloat64OutputsIsTight) {
  std::mt19937_64 rng(77);
  std::vector<TensorSpec> specs = random_specs(rng, 120, 1024, /*misalign=*/true, /*mixed_dtypes=*/false);
  for (auto& s : specs) s.dtype = DType::kFloat64;
  const HostList h = build_list(specs, 78);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05);
  // A float64 output: check_results then holds every metric to 1e-12.
  const LaunchConfig cfg = launch_config(kAllFlags, 100, 0.05, 1024, DType::kFloat64);
  ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "float64 list"));
}

TEST_F(ParamStatsCudaTest, HistogramsAreExactForManyBinCounts) {
  std::mt19937_64 rng(4321);
  std::vector<TensorSpec> specs = random_specs(rng, 14, 1024);
  specs[0].numel = 50000;
  specs[0].dtype = DType::kFloat32;
  specs[1].numel = 20000;
  specs[1].dtype = DType::kFloat64;
  HostList base = build_list(specs, 5);
  // 1536 bins fill exactly 48 KiB of per-warp shared counters; 1537 and up count in global memory.
  const int64_t nbins_list[] = {1, 2, 7, 100, 1520, 1536, 1537, 65536, tc::kMaxHistBins};
  for (int64_t nbins : nbins_list) {
    for (double maxval : {0.05, 1.0}) {
      HostList h = base;
      // Put values exactly at ±maxval, at and one float32/float64 ulp around many bin edges,
      // and far outside the range, into the first two tensors.
      const double w = 2.0 * maxval / static_cast<double>(nbins);
      std::uniform_int_distribution<int64_t> edge(0, nbins);
      for (size_t t = 0; t < 2; ++t) {
        const bool f32 = h.specs[t].dtype == DType::kFloat32;
        const int64_t n = h.specs[t].numel;
        h.set(kGrad, t, 0, maxval);
        h.set(kGrad, t, 1, -maxval);
        h.set(kGrad, t, 2, 1e6);
        h.set(kGrad, t, 3, -1e6);
        for (int64_t i = 4; i < n; i += 3) {
          const double e = -maxval + static_cast<double>(edge(rng)) * w;
          const double below = f32 ? std::nextafter(static_cast<float>(e), -1e30f) : std::nextafter(e, -kInf);
          const double above = f32 ? std::nextafter(static_cast<float>(e), 1e30f) : std::nextafter(e, kInf);
          h.set(kGrad, t, i, i % 2 ? below : above);
          if (i + 1 < n) h.set(kGrad, t, i + 1, e);
        }
      }
      // Spread the other tensors' gradients over the range.
      for (size_t t = 2; t < h.size(); ++t) {
        std::uniform_real_distribution<double> u(-1.1 * maxval, 1.1 * maxval);
        for (int64_t i = 0; i < h.specs[t].numel; ++i) h.set(kGrad, t, i, u(rng));
      }
      DeviceList d;
      ASSERT_NO_FATAL_FAILURE(upload(h, &d));
      const Reference ref = compute_reference(h, nbins, maxval);
      const LaunchConfig cfg = launch_config(tc::kHistogram | tc::kGradSq, nbins, maxval, 1024);
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "histogram"));
    }
  }
}

TEST_F(ParamStatsCudaTest, NonfiniteGradientsAreCountedAndNotBinned) {
  std::mt19937_64 rng(99);
  std::vector<TensorSpec> specs = random_specs(rng, 110, 1024);
  HostList h = build_list(specs, 6);
  std::uniform_int_distribution<int> pick(0, 99);
  for (size_t t = 0; t < h.size(); ++t) {
    const int64_t n = h.specs[t].numel;
    if (n == 0) continue;
    const int kind = static_cast<int>(t % 4);  // 0: none, 1: NaN, 2: +-Inf only, 3: both
    if (kind == 0) continue;
    std::uniform_int_distribution<int64_t> where(0, n - 1);
    const int count = 1 + pick(rng) % 20;
    for (int k = 0; k < count; ++k) {
      const int64_t i = where(rng);
      double v;
      if (kind == 1) {
        v = kNaN;
      } else if (kind == 2) {
        v = k % 2 ? kInf : -kInf;
      } else {
        v = k % 3 == 0 ? kNaN : (k % 3 == 1 ? kInf : -kInf);
      }
      h.set(kGrad, t, i, v);
    }
  }
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05);
  int64_t total = 0;
  for (int64_t v : ref.nonfinite) total += v;
  ASSERT_GT(total, 0);
  for (uint32_t flags : {kAllFlags, uint32_t{tc::kHistogram}, uint32_t{tc::kGradSq}, uint32_t{tc::kGradAbs},
                         uint32_t{tc::kParamAbs | tc::kDistSq}}) {
    for (int64_t nbins : {int64_t{100}, int64_t{4096}}) {
      const LaunchConfig cfg = launch_config(flags, nbins, 0.05, 1024);
      ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "non-finite gradients"));
    }
  }
}

TEST_F(ParamStatsCudaTest, RefreshPrevMakesTheNextUpdateZero) {
  std::mt19937_64 rng(5);
  const HostList h = build_list(random_specs(rng, 150, 1024), 7);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05);
  const LaunchConfig cfg = launch_config(tc::kUpdateSq | tc::kRefreshPrev, 100, 0.05, 1024);
  ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "refresh"));  // update from the old θ_prev
  Results second;
  ASSERT_NO_FATAL_FAILURE(run(h, d, cfg, &second));
  for (size_t t = 0; t < h.size(); ++t) {
    EXPECT_EQ(second.metric(t, tc::kSlotUpdateSize), 0.0) << "tensor " << t;
  }
  EXPECT_EQ(second.metric(tc::kSlotUpdateSize), 0.0);
  ASSERT_NO_FATAL_FAILURE(expect_prev(h, d, true, "after second refresh"));
}

TEST_F(ParamStatsCudaTest, WeightMagnitudeOverSelectedTensorsOnly) {
  std::mt19937_64 rng(8);
  std::vector<TensorSpec> specs = random_specs(rng, 40, 1024);
  for (bool any_selected : {true, false}) {
    for (size_t t = 0; t < specs.size(); ++t) specs[t].selected = any_selected && t % 2 == 0;
    const HostList h = build_list(specs, 9);
    DeviceList d;
    ASSERT_NO_FATAL_FAILURE(upload(h, &d));
    const Reference ref = compute_reference(h, 100, 0.05);
    const LaunchConfig cfg = launch_config(kAllMetrics, 100, 0.05, 1024);
    Results res;
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, "weight selection", &res));
    if (!any_selected) {
      EXPECT_TRUE(std::isnan(res.metric(tc::kSlotWeightMagnitude))) << "no tensor selected: 0/0";
      EXPECT_FALSE(std::isnan(res.metric(tc::kSlotGradMagnitude)));
    }
  }
}

TEST_F(ParamStatsCudaTest, EmptyListAndListOfEmptyTensors) {
  for (int count : {0, 5, 200}) {
    std::vector<TensorSpec> specs(static_cast<size_t>(count));
    for (size_t t = 0; t < specs.size(); ++t) {
      specs[t].dtype = static_cast<DType>(t % 4);
      specs[t].misaligned[kPrev] = t % 2 == 1;
    }
    const HostList h = build_list(specs, 10);
    DeviceList d;
    ASSERT_NO_FATAL_FAILURE(upload(h, &d));
    const Reference ref = compute_reference(h, 100, 0.05);
    const LaunchConfig cfg = launch_config(kAllFlags);
    Results res;
    ASSERT_NO_FATAL_FAILURE(run_and_check(h, d, ref, cfg, std::to_string(count) + " empty tensors", &res));
    EXPECT_EQ(res.metric(tc::kSlotGradNorm), 0.0);
    EXPECT_TRUE(std::isnan(res.metric(tc::kSlotGradMagnitude)));
    EXPECT_TRUE(std::isnan(res.metric(tc::kSlotWeightMagnitude)));
    EXPECT_EQ(res.metric(tc::kSlotDistance), 0.0);
    EXPECT_EQ(res.metric(tc::kSlotUpdateSize), 0.0);
    EXPECT_EQ(res.nonfinite, 0);
    EXPECT_EQ(std::count(res.hist.begin(), res.hist.end(), int64_t{0}), 100);
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism, asynchrony, graph capture

TEST_F(ParamStatsCudaTest, RepeatedLaunchesAreBitwiseEqual) {
  std::mt19937_64 rng(11);
  const HostList h = build_list(random_specs(rng, 200, 1024), 12);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  for (int64_t nbins : {int64_t{100}, int64_t{5000}}) {
    for (int64_t chunk : {int64_t{1024}, tc::kDefaultChunkElems}) {
      const LaunchConfig cfg = launch_config(kAllMetrics, nbins, 0.05, chunk);
      Results first;
      ASSERT_NO_FATAL_FAILURE(run(h, d, cfg, &first));
      for (int rep = 0; rep < 3; ++rep) {
        Results again;
        ASSERT_NO_FATAL_FAILURE(run(h, d, cfg, &again));
        expect_bitwise_equal(first, again, describe(cfg) + " repetition " + std::to_string(rep));
      }
    }
  }
}

TEST_F(ParamStatsCudaTest, LaunchDoesNotWaitForTheStream) {
  std::mt19937_64 rng(13);
  const HostList h = build_list(random_specs(rng, 20, 1024), 14);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const LaunchConfig cfg = launch_config(kAllFlags);
  Launch L;
  ASSERT_NO_FATAL_FAILURE(prepare(h, d, cfg, &L));
  ASSERT_NO_FATAL_FAILURE(poison(L));
  spin_for_cycles<<<1, 1, 0, stream_>>>(static_cast<long long>(1) << 30);  // about half a second
  ASSERT_CUDA_OK(cudaGetLastError());
  ASSERT_CUDA_OK(tc::param_stats_launch(L.args, L.workspace.get(), L.workspace_bytes, stream_));
  EXPECT_EQ(cudaStreamQuery(stream_), cudaErrorNotReady) << "the launcher waited for the stream";
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  Results res;
  ASSERT_NO_FATAL_FAILURE(fetch(L, &res));
  check_results(h, compute_reference(h, 100, 0.05), cfg, res, "after spin");
}

TEST_F(ParamStatsCudaTest, GraphCaptureMatchesEager) {
  std::mt19937_64 rng(15);
  const HostList h = build_list(random_specs(rng, 210, 1024), 16);
  DeviceList d;
  ASSERT_NO_FATAL_FAILURE(upload(h, &d));
  const Reference ref = compute_reference(h, 100, 0.05);
  for (int64_t nbins : {int64_t{100}, int64_t{3000}}) {
    const LaunchConfig cfg = launch_config(kAllFlags, nbins, 0.05, 1024);
    const Reference& r = nbins == 100 ? ref : compute_reference(h, nbins, 0.05);

    Results eager;
    ASSERT_NO_FATAL_FAILURE(upload_role(h, kPrev, &d));
    ASSERT_NO_FATAL_FAILURE(run(h, d, cfg, &eager));
    check_results(h, r, cfg, eager, "eager");

    Launch L;
    ASSERT_NO_FATAL_FAILURE(prepare(h, d, cfg, &L));
    cudaGraphExec_t exec = nullptr;
    ASSERT_NO_FATAL_FAILURE(capture_graph(cudaStreamCaptureModeThreadLocal, [&] {
      return tc::param_stats_launch(L.args, L.workspace.get(), L.workspace_bytes, stream_);
    }, &exec));

    for (int replay = 0; replay < 2; ++replay) {
      ASSERT_NO_FATAL_FAILURE(upload_role(h, kPrev, &d));
      ASSERT_NO_FATAL_FAILURE(poison(L));
      ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream_));
      Results graphed;
      ASSERT_NO_FATAL_FAILURE(fetch(L, &graphed));
      const std::string context = describe(cfg) + " graph replay " + std::to_string(replay);
      expect_bitwise_equal(eager, graphed, context);
      ASSERT_NO_FATAL_FAILURE(expect_prev(h, d, true, context));
    }
    EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
  }
}

// ---------------------------------------------------------------------------------------------
// 64-bit sizes on the device

TEST_F(ParamStatsCudaTest, TensorOfMoreThan2To31Elements) {
  // 2^31 + 2^17 + 4097 elements: even the non-finite count of the second pattern passes 2^31.
  const int64_t n = (int64_t{1} << 31) + (int64_t{1} << 17) + 4097;
  const size_t bytes = static_cast<size_t>(n) * sizeof(uint16_t);
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_CUDA_OK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < bytes + (size_t{1} << 30)) GTEST_SKIP() << "needs " << bytes << " bytes of device memory";

  // A periodic bf16 pattern (period prime, so it does not line up with chunks): element i holds
  // table[i % P], so the reference is exact from the counts of each table entry.
  const int64_t period = 65537;
  std::mt19937_64 rng(17);
  std::normal_distribution<double> normal(0.0, 0.03);
  DeviceMemory data, table_dev;
  ASSERT_CUDA_OK(data.allocate(bytes));
  ASSERT_CUDA_OK(table_dev.allocate(static_cast<size_t>(period) * sizeof(uint16_t)));

  for (bool with_nonfinite : {false, true}) {
    std::vector<uint16_t> table(static_cast<size_t>(period));
    std::vector<double> value(table.size());
    for (size_t j = 0; j < table.size(); ++j) {
      double v = j % 4 == 0 ? 0.0 : normal(rng);
      if (j % 97 == 1) v = 0.05;  // last bin
      if (with_nonfinite && j != 5) v = j % 2 ? kNaN : kInf;
      value[j] = store_value(reinterpret_cast<unsigned char*>(&table[j]), DType::kBFloat16, v);
    }
    ASSERT_CUDA_OK(cudaMemcpyAsync(table_dev.get(), table.data(), table.size() * sizeof(uint16_t),
                                   cudaMemcpyHostToDevice, stream_));
    fill_periodic<<<4096, 256, 0, stream_>>>(data.get<uint16_t>(), n, table_dev.get<uint16_t>(), period);
    ASSERT_CUDA_OK(cudaGetLastError());
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));

    const int64_t nbins = 100;
    long double gsq = 0, gabs = 0;
    int64_t nonfinite = 0;
    std::vector<int64_t> hist(nbins, 0);
    for (int64_t j = 0; j < period; ++j) {
      const int64_t count = n / period + (j < n % period ? 1 : 0);
      const double v = value[static_cast<size_t>(j)];
      gsq += static_cast<long double>(count) * v * v;
      gabs += static_cast<long double>(count) * std::fabs(v);
      if (std::isfinite(v)) {
        hist[static_cast<size_t>(reference_bin(v, nbins, 0.05))] += count;
      } else {
        nonfinite += count;
      }
    }

    tc::TensorDesc desc{};
    desc.grad = data.get();
    desc.param = data.get();  // read-only arrays may alias
    desc.numel = n;
    desc.dtype = DType::kBFloat16;
    desc.weight_selected = 1;
    tc::ParamStatsArgs a{};
    a.tensors = &desc;
    a.num_tensors = 1;
    a.flags = tc::kGradSq | tc::kGradAbs | tc::kParamAbs | tc::kHistogram;
    a.hist_spec = tc::make_hist_spec(nbins, 0.05);
    a.chunk_elems = tc::kDefaultChunkElems;
    a.out_dtype = DType::kFloat64;
    DeviceMemory global, per_tensor, nf, nf_pt, hist_dev, hist_pt;
    ASSERT_CUDA_OK(global.allocate(tc::kNumSlots * sizeof(double)));
    ASSERT_CUDA_OK(per_tensor.allocate(tc::kNumSlots * sizeof(double)));
    ASSERT_CUDA_OK(nf.allocate(sizeof(int64_t)));
    ASSERT_CUDA_OK(nf_pt.allocate(sizeof(int64_t)));
    ASSERT_CUDA_OK(hist_dev.allocate(nbins * sizeof(int64_t)));
    ASSERT_CUDA_OK(hist_pt.allocate(nbins * sizeof(int64_t)));
    a.global = global.get();
    a.per_tensor = per_tensor.get();
    a.nonfinite = nf.get<int64_t>();
    a.nonfinite_per_tensor = nf_pt.get<int64_t>();
    a.hist = hist_dev.get<int64_t>();
    a.hist_per_tensor = hist_pt.get<int64_t>();
    const size_t ws_bytes = tc::param_stats_workspace_bytes(a);
    DeviceMemory ws;
    ASSERT_CUDA_OK(ws.allocate(ws_bytes));
    ASSERT_CUDA_OK(tc::param_stats_launch(a, ws.get(), ws_bytes, stream_));

    double got[tc::kNumSlots];
    int64_t got_nf = 0, got_nf_pt = 0;
    std::vector<int64_t> got_hist(nbins), got_hist_pt(nbins);
    ASSERT_CUDA_OK(cudaMemcpyAsync(got, global.get(), sizeof got, cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(&got_nf, nf.get(), sizeof got_nf, cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(&got_nf_pt, nf_pt.get(), sizeof got_nf_pt, cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(got_hist.data(), hist_dev.get(), nbins * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaMemcpyAsync(got_hist_pt.data(), hist_pt.get(), nbins * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));

    SCOPED_TRACE(with_nonfinite ? "mostly non-finite" : "finite");
    EXPECT_EQ(got_nf, nonfinite);
    EXPECT_EQ(got_nf_pt, nonfinite);
    EXPECT_EQ(got_hist, hist);
    EXPECT_EQ(got_hist_pt, hist);
    EXPECT_EQ(std::accumulate(got_hist.begin(), got_hist.end(), int64_t{0}), n - nonfinite);
    if (with_nonfinite) {
      EXPECT_GT(nonfinite, int64_t{1} << 31);  // the count itself needs 64 bits
      EXPECT_TRUE(std::isnan(got[tc::kSlotGradNorm]));
    } else {
      EXPECT_GT(*std::max_element(hist.begin(), hist.end()), int64_t{1} << 28);
      const double dn = static_cast<double>(n);
      EXPECT_NEAR(got[tc::kSlotGradNorm], std::sqrt(static_cast<double>(gsq)), 1e-5 * std::sqrt(static_cast<double>(gsq)));
      EXPECT_NEAR(got[tc::kSlotGradMagnitude], static_cast<double>(gabs) / dn, 1e-5 * static_cast<double>(gabs) / dn);
      EXPECT_NEAR(got[tc::kSlotWeightMagnitude], static_cast<double>(gabs) / dn, 1e-5 * static_cast<double>(gabs) / dn);
    }
    EXPECT_TRUE(std::isnan(got[tc::kSlotDistance]));
    EXPECT_TRUE(std::isnan(got[tc::kSlotUpdateSize]));
  }
}

}  // namespace
