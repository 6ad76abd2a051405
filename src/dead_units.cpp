// Dead units: argument checks, the CPU implementation, the adapter that hands CUDA tensors to the
// torch-free launcher in cuda/dead_units.cu, and the results from accumulated counts.
//
// Both devices decide activity with the same function (cuda/dead_units.h), so they count the same
// elements; counts are int64 and exact, so the results are deterministic. Nothing here waits for
// the GPU: the number of observations comes from shapes on the host.
#include "trainscope/dead_units.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cuda/dead_units.h"
#include "src/nvtx.h"
#include "src/tensor_checks.h"

namespace trainscope {

namespace tc = trainscope::cuda;

static_assert(static_cast<int32_t>(ActivationKind::kReLU) == static_cast<int32_t>(tc::ActivityKind::kReLU) &&
                  static_cast<int32_t>(ActivationKind::kTanh) == static_cast<int32_t>(tc::ActivityKind::kTanh) &&
                  static_cast<int32_t>(ActivationKind::kSigmoid) == static_cast<int32_t>(tc::ActivityKind::kSigmoid),
              "the public and the kernels' activation kinds share their values");

namespace {

constexpr const char* kActiveCounts = "trainscope::active_counts";
constexpr const char* kAddActiveCounts = "trainscope::add_active_counts";
constexpr const char* kDeadUnits = "trainscope::dead_units";
constexpr const char* kFromCounts = "trainscope::dead_units_from_counts";
constexpr const char* kObservations = "trainscope::observations_per_unit";
constexpr const char* kCounterNew = "trainscope::DeadUnitCounter";
constexpr const char* kCounterAdd = "trainscope::DeadUnitCounter::add";
constexpr const char* kCounterResult = "trainscope::DeadUnitCounter::result";

// Activations: defined, ≥ 2-D, a supported float dtype, on a device of this build (check_device).
void check_acts(const char* op, const at::Tensor& acts) {
  TORCH_CHECK(acts.defined(), op, ": acts is an undefined tensor");
  TORCH_CHECK(acts.dim() >= 2, op, ": acts is ", acts.dim(), "-D (shape ", acts.sizes(),
              "); activations are [N, units] or [N, C, *spatial]");
  check_float_dtype(op, "acts", -1, acts);
  check_device(op, "acts", acts.device());
}

void check_kind(const char* op, ActivationKind kind) {
  const auto k = static_cast<int32_t>(kind);
  TORCH_CHECK(k >= 0 && k <= 2, op, ": kind ", k, " is not an ActivationKind (relu, tanh or sigmoid)");
}

// NaN fails both range checks.
void check_eps(const char* op, double eps) {
  TORCH_CHECK(eps >= 0.0 && eps <= 0.5, op, ": eps must be in [0, 0.5], got ", eps);
}

void check_tau(const char* op, double tau) {
  TORCH_CHECK(tau >= 0.0 && tau <= 1.0, op, ": tau must be in [0, 1], got ", tau);
}

// Counts of `units` units on `device`: [units] int64.
void check_counts(const char* op, const at::Tensor& counts, int64_t units, at::Device device) {
  TORCH_CHECK(counts.defined(), op, ": counts is an undefined tensor");
  TORCH_CHECK(counts.scalar_type() == at::kLong, op, ": counts has dtype ", counts.scalar_type(),
              "; per-unit counts are int64");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == units, op, ": counts has shape ", counts.sizes(), " but acts has ",
              units, " units (acts.size(1)); counts must be [", units, "]");
  TORCH_CHECK(counts.device() == device, op, ": counts is on ", counts.device(), " but acts is on ", device,
              "; both must share one device");
}

int64_t inner_size(const at::Tensor& acts) {
  int64_t inner = 1;
  for (int64_t d = 2; d < acts.dim(); ++d) inner *= acts.size(d);
  return inner;
}

// Per-channel counts of a contiguous [n, channels, inner] array, added into `counts`. Tasks count
// rows into counts of their own, then add them under a lock: integer sums, so the order in which
// tasks finish does not change the result.
template <typename T>
void cpu_add_counts(const T* x, int64_t n, int64_t channels, int64_t inner, const tc::ActivityTest& test,
                    int64_t* counts) {
  const int64_t m = channels * inner;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(m, 1));
  std::mutex mutex;
  at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> local(static_cast<size_t>(channels), 0);
    for (int64_t r = lo; r < hi; ++r) {
      const T* row = x + r * m;
      if (inner == 1) {
        for (int64_t c = 0; c < channels; ++c) local[c] += tc::is_active_value(row[c], test) ? 1 : 0;
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          const T* p = row + c * inner;
          int64_t k = 0;
          for (int64_t i = 0; i < inner; ++i) k += tc::is_active_value(p[i], test) ? 1 : 0;
          local[c] += k;
        }
      }
    }
    std::lock_guard<std::mutex> lock(mutex);
    for (int64_t c = 0; c < channels; ++c) counts[c] += local[c];
  });
}

// Adds the active counts of checked `acts` into checked, contiguous `counts`.
void add_counts_unchecked(const char* op, at::Tensor& counts, const at::Tensor& acts, ActivationKind kind,
                          double eps) {
  const int64_t n = acts.size(0), channels = acts.size(1), inner = inner_size(acts);
  if (n == 0 || channels == 0 || inner == 0) return;
  const at::Tensor x = acts.contiguous();  // a copy only for non-contiguous input
  const tc::ActivityTest test = tc::make_activity_test(static_cast<tc::ActivityKind>(kind), eps);
#if defined(TRAINSCOPE_WITH_CUDA)
  if (acts.device().is_cuda()) {
    c10::cuda::CUDAGuard guard(acts.device());
    const cudaError_t err = tc::launch_add_active_counts(
        x.data_ptr(), to_kernel_dtype(x.scalar_type()), n, channels, inner, test, counts.data_ptr<int64_t>(),
        at::cuda::getCurrentCUDAStream(acts.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
    return;
  }
#endif
  int64_t* out = counts.data_ptr<int64_t>();
  switch (x.scalar_type()) {
    case at::kFloat: cpu_add_counts(x.data_ptr<float>(), n, channels, inner, test, out); break;
    case at::kDouble: cpu_add_counts(x.data_ptr<double>(), n, channels, inner, test, out); break;
    case at::kBFloat16:
      cpu_add_counts(static_cast<const tc::bf16_bits*>(x.data_ptr()), n, channels, inner, test, out);
      break;
    default: cpu_add_counts(static_cast<const tc::f16_bits*>(x.data_ptr()), n, channels, inner, test, out); break;
  }
}

at::Tensor zero_counts(const at::Tensor& acts) {
  return at::zeros({acts.size(1)}, at::TensorOptions().dtype(at::kLong).device(acts.device()));
}

// Checked inputs → results. The divisions are by a tensor, not a host scalar: ATen turns division
// by a host scalar into multiplication by its reciprocal on CUDA, which can be an ulp off, and
// f_u ≤ tau must be decided on the correctly rounded quotient.
DeadUnits results_unchecked(const at::Tensor& counts, int64_t observations, double tau) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(counts.device());
  DeadUnits d;
  // observations = 0: 0 / 0 = NaN for every unit, and NaN ≤ tau is false, so no unit is dead. A
  // count outside [0, observations] cannot come from that many observations: its f_u is NaN too
  // (found on the device, without waiting for it), never a fraction above 1 or a dead unit.
  const at::Tensor impossible = counts.lt(0).logical_or_(counts.gt(observations));
  d.active_fraction = counts.to(at::kDouble)
                          .div(at::full({}, static_cast<double>(observations), f64))
                          .masked_fill_(impossible, std::numeric_limits<double>::quiet_NaN());
  d.count = d.active_fraction.le(tau).sum(at::kLong);
  d.fraction = d.count.to(at::kDouble).div(at::full({}, static_cast<double>(counts.size(0)), f64));  // 0/0 = NaN
  return d;
}

}  // namespace

ActivationKind parse_activation_kind(const std::string& name, const char* arg) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "relu") return ActivationKind::kReLU;
  if (lower == "tanh") return ActivationKind::kTanh;
  if (lower == "sigmoid") return ActivationKind::kSigmoid;
  TORCH_CHECK(false, "trainscope: ", arg, " must be \"relu\", \"tanh\" or \"sigmoid\", got \"", name, "\"");
}

const char* activation_kind_name(ActivationKind kind) {
  switch (kind) {
    case ActivationKind::kReLU: return "relu";
    case ActivationKind::kTanh: return "tanh";
    case ActivationKind::kSigmoid: return "sigmoid";
  }
  TORCH_CHECK(false, "trainscope: kind ", static_cast<int32_t>(kind), " is not an ActivationKind");
}

at::Tensor active_counts(const at::Tensor& acts, ActivationKind kind, double eps) {
  NvtxRange range{kActiveCounts};
  check_acts(kActiveCounts, acts);
  check_kind(kActiveCounts, kind);
  check_eps(kActiveCounts, eps);
  at::Tensor counts = zero_counts(acts);
  add_counts_unchecked(kActiveCounts, counts, acts, kind, eps);
  return counts;
}

void add_active_counts(at::Tensor& counts, const at::Tensor& acts, ActivationKind kind, double eps) {
  NvtxRange range{kAddActiveCounts};
  check_acts(kAddActiveCounts, acts);
  check_kind(kAddActiveCounts, kind);
  check_eps(kAddActiveCounts, eps);
  check_counts(kAddActiveCounts, counts, acts.size(1), acts.device());
  if (counts.is_contiguous()) {
    add_counts_unchecked(kAddActiveCounts, counts, acts, kind, eps);
  } else {  // a strided view: count into a fresh buffer, then add through the view
    at::Tensor fresh = zero_counts(acts);
    add_counts_unchecked(kAddActiveCounts, fresh, acts, kind, eps);
    counts.add_(fresh);
  }
}

int64_t observations_per_unit(const at::Tensor& acts) {
  TORCH_CHECK(acts.defined(), kObservations, ": acts is an undefined tensor");
  TORCH_CHECK(acts.dim() >= 2, kObservations, ": acts is ", acts.dim(), "-D (shape ", acts.sizes(),
              "); activations are [N, units] or [N, C, *spatial]");
  return acts.size(0) * inner_size(acts);
}

DeadUnits dead_units_from_counts(const at::Tensor& counts, int64_t observations, double tau) {
  NvtxRange range{kFromCounts};
  TORCH_CHECK(counts.defined(), kFromCounts, ": counts is an undefined tensor");
  TORCH_CHECK(counts.scalar_type() == at::kLong, kFromCounts, ": counts has dtype ", counts.scalar_type(),
              "; per-unit counts are int64");
  TORCH_CHECK(counts.dim() == 1, kFromCounts, ": counts has shape ", counts.sizes(), "; per-unit counts are [units]");
  check_device(kFromCounts, "counts", counts.device());
  TORCH_CHECK(observations >= 0, kFromCounts, ": observations must be >= 0, got ", observations);
  check_tau(kFromCounts, tau);
  return results_unchecked(counts, observations, tau);
}

DeadUnits dead_units(const at::Tensor& acts, const DeadUnitOptions& options) {
  NvtxRange range{kDeadUnits};
  check_acts(kDeadUnits, acts);
  check_kind(kDeadUnits, options.kind);
  check_eps(kDeadUnits, options.eps);
  check_tau(kDeadUnits, options.tau);
  at::Tensor counts = zero_counts(acts);
  add_counts_unchecked(kDeadUnits, counts, acts, options.kind, options.eps);
  return results_unchecked(counts, observations_per_unit(acts), options.tau);
}

DeadUnitCounter::DeadUnitCounter(const DeadUnitOptions& options) : options_(options) {
  check_kind(kCounterNew, options.kind);
  check_eps(kCounterNew, options.eps);
  check_tau(kCounterNew, options.tau);
}

void DeadUnitCounter::add(const at::Tensor& acts) {
  NvtxRange range{kCounterAdd};
  check_acts(kCounterAdd, acts);
  if (counts_.defined()) {
    TORCH_CHECK(acts.size(1) == counts_.size(0), kCounterAdd, ": acts has ", acts.size(1),
                " units (acts.size(1)) but the counter's earlier batches had ", counts_.size(0));
    TORCH_CHECK(acts.device() == counts_.device(), kCounterAdd, ": acts is on ", acts.device(),
                " but the counter's earlier batches were on ", counts_.device());
  }
  const int64_t obs = observations_per_unit(acts);
  TORCH_CHECK(obs <= std::numeric_limits<int64_t>::max() - observations_, kCounterAdd,
              ": the number of observations overflows int64");
  if (!counts_.defined()) counts_ = zero_counts(acts);
  add_counts_unchecked(kCounterAdd, counts_, acts, options_.kind, options_.eps);
  observations_ += obs;
}

DeadUnits DeadUnitCounter::result() const {
  NvtxRange range{kCounterResult};
  TORCH_CHECK(counts_.defined(), kCounterResult, ": no batch added yet; call add(acts) first");
  return results_unchecked(counts_, observations_, options_.tau);
}

void DeadUnitCounter::reset() {
  counts_ = at::Tensor();
  observations_ = 0;
}

}  // namespace trainscope
