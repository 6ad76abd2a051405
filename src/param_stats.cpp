// Parameter-space metrics: argument checks, the CPU implementation, and the adapter that hands
// CUDA tensors to the torch-free launcher in cuda/param_stats.cu.
//
// The CPU path runs the same per-element, combine and finalise functions as the kernel
// (cuda/param_stats.h), chunk by chunk, so both devices implement one definition.
#include "trainscope/param_stats.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cuda/param_stats.h"
#include "src/nvtx.h"
#include "src/param_stats_internal.h"
#include "src/tensor_checks.h"

namespace trainscope {

namespace tc = trainscope::cuda;

// The histogram alone (per-sample histograms bin billions of elements), in two passes per block
// of values: the bins, computed without branches so that the compiler vectorises them (with the
// widest vector unit the CPU has, chosen when the library loads), then the counts, with few bins
// counted in several copies so that increments of one bin do not wait on each other.
// The bin is hist_bin's: floor((clamp(x, -m, m) + m) / w), the last bin for x = m, by the exact
// division hist_bin falls back to near an edge (a divide per value costs less here than the branch).
// Non-finite values go to slot nbins and are counted in acc.nonfinite. (The file is compiled with
// -fno-trapping-math: without it the compiler may not divide a lane whose value is then unused.)
namespace {
template <typename T>
[[gnu::always_inline]] inline void hist_bins_of_block(const T* g, int64_t n, double maxval, double width,
                                                      int32_t nbins, int32_t* bins) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = tc::widen(g[i]);
    const bool finite = x - x == 0.0;  // false for NaN and ±Inf
    double c = x < -maxval ? -maxval : x;
    c = c > maxval ? maxval : c;
    c = finite ? c : 0.0;
    const int32_t b = static_cast<int32_t>((c + maxval) / width);  // c + maxval >= 0: truncation is floor
    const int32_t last = b < nbins ? b : nbins - 1;
    bins[i] = finite ? last : nbins;
  }
}

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define TRAINSCOPE_HIST_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TRAINSCOPE_HIST_TARGETS
#endif

#define TRAINSCOPE_HIST_BINS(T, NAME)                                                                \
  TRAINSCOPE_HIST_TARGETS void NAME(const T* g, int64_t n, double maxval, double width, int32_t nbins, \
                                    int32_t* bins) {                                                  \
    hist_bins_of_block(g, n, maxval, width, nbins, bins);                                             \
  }
TRAINSCOPE_HIST_BINS(float, hist_bins_f32)
TRAINSCOPE_HIST_BINS(double, hist_bins_f64)
TRAINSCOPE_HIST_BINS(tc::bf16_bits, hist_bins_bf16)
TRAINSCOPE_HIST_BINS(tc::f16_bits, hist_bins_f16)
#undef TRAINSCOPE_HIST_BINS
}  // namespace

void hist_bins(const float* g, int64_t n, double m, double w, int32_t nb, int32_t* b) { hist_bins_f32(g, n, m, w, nb, b); }
void hist_bins(const double* g, int64_t n, double m, double w, int32_t nb, int32_t* b) { hist_bins_f64(g, n, m, w, nb, b); }
void hist_bins(const tc::bf16_bits* g, int64_t n, double m, double w, int32_t nb, int32_t* b) { hist_bins_bf16(g, n, m, w, nb, b); }
void hist_bins(const tc::f16_bits* g, int64_t n, double m, double w, int32_t nb, int32_t* b) { hist_bins_f16(g, n, m, w, nb, b); }

const char* metric_name(Metric m) {
  switch (m) {
    case Metric::kGradNorm: return "grad_norm";
    case Metric::kGradMagnitude: return "grad_magnitude";
    case Metric::kWeightMagnitude: return "weight_magnitude";
    case Metric::kDistance: return "distance";
    case Metric::kUpdateSize: return "update_size";
    case Metric::kWeightNorm: return "weight_norm";
    case Metric::kUpdateRatio: return "update_ratio";
  }
  return "unknown";
}

namespace {

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// Everything SPEC.md §5 asks to reject, checked before any work; messages name the argument.
// Returns the device of the inputs (CPU when every list is empty).
at::Device check_inputs(const char* op, const std::vector<NamedList>& lists) {
  int64_t n = 0;
  const NamedList* ref = nullptr;
  for (const auto& l : lists) {
    if (l.tensors.empty()) continue;
    if (ref == nullptr) {
      ref = &l;
      n = static_cast<int64_t>(l.tensors.size());
    }
    TORCH_CHECK(static_cast<int64_t>(l.tensors.size()) == n, op, ": ", l.name, " has ",
                l.tensors.size(), " tensors but ", ref->name, " has ", n,
                "; lists passed together are paired by position");
  }
  if (ref == nullptr) return at::Device(at::kCPU);
  const at::Tensor& first = ref->tensors[0];
  TORCH_CHECK(first.defined(), op, ": ", ref->name, "[0] is an undefined tensor");
  const at::Device device = first.device();
  check_device(op, std::string(ref->name) + "[0]", device);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor* pair = nullptr;
    const char* pair_name = nullptr;
    for (const auto& l : lists) {
      if (l.tensors.empty()) continue;
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is an undefined tensor");
      check_float_dtype(op, l.name, i, t);
      TORCH_CHECK(t.device() == device, op, ": ", l.name, "[", i, "] is on ", t.device(),
                  " but ", ref->name, "[0] is on ", device, "; all tensors must share one device");
      if (pair == nullptr) {
        pair = &t;
        pair_name = l.name;
        continue;
      }
      TORCH_CHECK(t.sizes() == pair->sizes(), op, ": ", l.name, "[", i, "] has shape ",
                  t.sizes(), " but ", pair_name, "[", i, "] has shape ", pair->sizes());
      TORCH_CHECK(t.scalar_type() == pair->scalar_type(), op, ": ", l.name, "[", i,
                  "] has dtype ", t.scalar_type(), " but ", pair_name, "[", i, "] has dtype ",
                  pair->scalar_type());
    }
  }
  return device;
}


// Counts values into nbins bins (slot nbins: non-finite) in kCopies copies when the bins are few,
// kept across calls so that a caller binning many short runs pays for the copies once.
class CpuHistCounter {
 public:
  explicit CpuHistCounter(const tc::HistSpec& hist)
      : hist_(hist), nbins_(static_cast<int32_t>(hist.nbins)), copies_(hist.nbins <= 4096 ? kCopies : 1),
        local_(copies_ * (hist.nbins + 1), 0) {}

  template <typename T>
  void add(const T* g, int64_t n) {
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t len = std::min(kBlock, n - i0);
      hist_bins(g + i0, len, hist_.maxval, hist_.width, nbins_, bins_);
      int64_t i = 0;
      if (copies_ == kCopies) {
        int64_t* l = local_.data();
        const int64_t stride = nbins_ + 1;
        for (; i + kCopies <= len; i += kCopies) {
          ++l[bins_[i]];
          ++l[stride + bins_[i + 1]];
          ++l[2 * stride + bins_[i + 2]];
          ++l[3 * stride + bins_[i + 3]];
        }
      }
      for (; i < len; ++i) ++local_[bins_[i]];
    }
  }

  // Counts n values of bin `bin` (0 <= bin < nbins) at once.
  void add_to_bin(int32_t bin, int64_t n) { local_[bin] += n; }

  // The non-finite values counted since the last call.
  int64_t take_nonfinite() {
    int64_t nonfinite = 0;
    for (int64_t k = 0; k < copies_; ++k) {
      nonfinite += local_[k * (nbins_ + 1) + nbins_];
      local_[k * (nbins_ + 1) + nbins_] = 0;
    }
    return nonfinite;
  }

  // Adds the counts to counts[nbins] (the non-finite values left out); the counter starts afresh.
  void flush(int64_t* counts) {
    for (int64_t k = 0; k < copies_; ++k) {
      int64_t* l = local_.data() + k * (nbins_ + 1);
      for (int64_t b = 0; b < nbins_; ++b) counts[b] += l[b];
      std::fill(l, l + nbins_ + 1, 0);
    }
  }

 private:
  static constexpr int64_t kBlock = 1024;
  static constexpr int64_t kCopies = 4;
  tc::HistSpec hist_;
  int32_t nbins_;  // at most kMaxHistBins
  int64_t copies_;
  std::vector<int64_t> local_;
  int32_t bins_[kBlock];
};

// Sums of one chunk, and its histogram counts (added to `counter`), on the CPU. The values are
// binned in a second pass over the chunk, still in cache: the binning loop vectorises alone.
template <typename T>
void cpu_chunk(const tc::TensorDesc& d, int64_t begin, int64_t end, uint32_t flags,
               tc::ParamSums<double>& acc, CpuHistCounter* counter) {
  const T* g = static_cast<const T*>(d.grad);
  const T* p = static_cast<const T*>(d.param);
  const T* p0 = static_cast<const T*>(d.init);
  T* pp = static_cast<T*>(d.prev);
  const uint32_t sums = flags & ~tc::kHistogram;
  const bool rg = tc::reads_grad(sums), rp = tc::reads_param(sums);
  const bool ri = tc::reads_init(sums), rv = tc::reads_prev(sums);
  if (rg || rp) {
    for (int64_t i = begin; i < end; ++i) {
      if (rg) tc::accumulate_grad(acc, sums, static_cast<double>(tc::widen(g[i])));
      if (rp) {
        tc::accumulate_param(acc, sums, static_cast<double>(tc::widen(p[i])),
                             ri ? static_cast<double>(tc::widen(p0[i])) : 0.0,
                             rv ? static_cast<double>(tc::widen(pp[i])) : 0.0);
      }
    }
  }
  if (flags & tc::kHistogram) {
    counter->add(g + begin, end - begin);
    // Non-finite values: counted by the sums when they read the gradient, else by the counter.
    if (!rg) acc.nonfinite += counter->take_nonfinite();
  }
  if (flags & tc::kRefreshPrev) std::memcpy(pp + begin, p + begin, sizeof(T) * (end - begin));
}

void cpu_param_stats(const std::vector<tc::TensorDesc>& descs, uint32_t flags,
                     const tc::HistSpec& hist, const ParamStats& out) {
  const int64_t n = static_cast<int64_t>(descs.size());
  const int64_t chunk = tc::kDefaultChunkElems;
  std::vector<int64_t> numel(n), first_chunk(n);
  for (int64_t i = 0; i < n; ++i) numel[i] = descs[i].numel;
  const int64_t total_chunks = tc::assign_first_chunks(numel.data(), n, chunk, first_chunk.data());

  const bool want_hist = (flags & tc::kHistogram) != 0;
  const int64_t nbins = want_hist ? hist.nbins : 0;
  std::vector<tc::ParamSums<double>> partials(total_chunks);
  int64_t* hist_pt = want_hist ? out.hist_per_tensor.data_ptr<int64_t>() : nullptr;
  std::mutex hist_mutex;

  at::parallel_for(0, total_chunks, 1, [&](int64_t lo, int64_t hi) {
    CpuHistCounter counter(hist);
    int64_t counts_tensor = -1;
    auto flush = [&]() {
      if (counts_tensor < 0) return;
      std::lock_guard<std::mutex> lock(hist_mutex);  // integer adds commute: deterministic
      counter.flush(hist_pt + counts_tensor * nbins);
    };
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t t = tc::find_owner(first_chunk.data(), n, c);
      if (want_hist && t != counts_tensor) {
        flush();
        counts_tensor = t;
      }
      const tc::TensorDesc& d = descs[t];
      const int64_t begin = (c - first_chunk[t]) * chunk;
      const int64_t end = std::min(begin + chunk, d.numel);
      tc::ParamSums<double>& acc = partials[c];
      acc.clear();
      switch (d.dtype) {
        case tc::DType::kFloat32: cpu_chunk<float>(d, begin, end, flags, acc, &counter); break;
        case tc::DType::kFloat64: cpu_chunk<double>(d, begin, end, flags, acc, &counter); break;
        case tc::DType::kBFloat16: cpu_chunk<tc::bf16_bits>(d, begin, end, flags, acc, &counter); break;
        case tc::DType::kFloat16: cpu_chunk<tc::f16_bits>(d, begin, end, flags, acc, &counter); break;
      }
    }
    if (want_hist) flush();
  });

  // Per tensor, then the list, each summed in a fixed order.
  tc::ParamSums<double> list_sums;
  list_sums.clear();
  double list_numel = 0.0, weight_numel = 0.0, weight_abs = 0.0;
  int64_t* nf_pt = out.nonfinite_per_tensor.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(out.metrics.scalar_type(), "param_stats_cpu_finalize", [&] {
    scalar_t* per_tensor = out.per_tensor.data_ptr<scalar_t>();
    for (int64_t t = 0; t < n; ++t) {
      tc::ParamSums<double> s;
      s.clear();
      const int64_t nc = tc::num_chunks(descs[t].numel, chunk);
      for (int64_t c = 0; c < nc; ++c) s.add(partials[first_chunk[t] + c]);
      const double numel_t = static_cast<double>(descs[t].numel);
      tc::finalize_metrics(s.s, numel_t, numel_t, flags, per_tensor + t * tc::kNumSlots);
      nf_pt[t] = s.nonfinite;
      list_sums.add(s);
      list_numel += numel_t;
      if (descs[t].weight_selected) {
        weight_numel += numel_t;
        weight_abs += s.s[tc::kSlotWeightMagnitude];
      }
    }
    list_sums.s[tc::kSlotWeightMagnitude] = weight_abs;
    tc::finalize_metrics(list_sums.s, list_numel, weight_numel, flags, out.metrics.data_ptr<scalar_t>());
  });
  out.nonfinite.fill_(list_sums.nonfinite);
  if (want_hist) out.hist.copy_(out.hist_per_tensor.sum(0));
}

#if defined(TRAINSCOPE_WITH_CUDA)
void cuda_param_stats(const std::vector<tc::TensorDesc>& descs, uint32_t flags,
                      const tc::HistSpec& hist, const ParamStats& out, at::Device device) {
  c10::cuda::CUDAGuard guard(device);
  tc::ParamStatsArgs args{};
  args.tensors = descs.data();
  args.num_tensors = static_cast<int64_t>(descs.size());
  args.flags = flags;
  args.hist_spec = hist;
  args.chunk_elems = tc::kDefaultChunkElems;
  args.out_dtype = out.metrics.scalar_type() == at::kDouble ? tc::DType::kFloat64 : tc::DType::kFloat32;
  args.global = out.metrics.data_ptr();
  args.per_tensor = out.per_tensor.data_ptr();
  args.nonfinite = out.nonfinite.data_ptr<int64_t>();
  args.nonfinite_per_tensor = out.nonfinite_per_tensor.data_ptr<int64_t>();
  args.hist = (flags & tc::kHistogram) ? out.hist.data_ptr<int64_t>() : nullptr;
  args.hist_per_tensor = (flags & tc::kHistogram) ? out.hist_per_tensor.data_ptr<int64_t>() : nullptr;
  const size_t ws_bytes = tc::param_stats_workspace_bytes(args);
  // From the caching allocator on the current stream: no device synchronisation.
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)},
                                   at::TensorOptions().dtype(at::kByte).device(device));
  const cudaError_t err = tc::param_stats_launch(args, workspace.data_ptr(), ws_bytes,
                                                 at::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "trainscope::param_stats: CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

// refresh_prev writes prev_params in place, as an optimizer writes parameters: each must be a
// tensor that can take that write without surprising its owner.
void check_writable_prev(const char* op, at::TensorList prev_params) {
  for (size_t i = 0; i < prev_params.size(); ++i) {
    const at::Tensor& t = prev_params[i];
    TORCH_CHECK(!t.requires_grad(), op, ": prev_params[", i, "] requires grad, and refresh_prev writes it in place; "
                "keep θ_prev as detached copies (p.detach().clone())");
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": prev_params[", i,
                "] is an inference tensor, which cannot be written in place outside torch.inference_mode(); "
                "make θ_prev under torch.no_grad() instead");
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": prev_params[", i,
                "] has elements that share memory (an expanded or stride-0 tensor), and refresh_prev writes it "
                "in place; pass a tensor of its own (clone())");
  }
}

}  // namespace

ParamStats param_stats_impl(const char* op, at::TensorList grads, at::TensorList params,
                            at::TensorList init_params, at::TensorList prev_params,
                            const ParamStatsOptions& o, const char* grads_name, bool grad_sums) {
  NvtxRange range{op};
  const at::Device device = check_inputs(op, {{grads_name, grads}, {"params", params},
                                              {"init_params", init_params}, {"prev_params", prev_params}});
  TORCH_CHECK(init_params.empty() || !params.empty(), op,
              ": init_params were given without params; distance needs both");
  TORCH_CHECK(prev_params.empty() || !params.empty(), op,
              ": prev_params were given without params; update_size needs both");
  TORCH_CHECK(!o.refresh_prev || !prev_params.empty(), op, ": refresh_prev needs prev_params");
  if (o.refresh_prev) check_writable_prev(op, prev_params);
  if (o.histogram) {
    check_hist_axis(op, "nbins", o.nbins, "maxval", o.maxval);
  }

  uint32_t flags = 0;
  if (!grads.empty()) {
    flags |= (grad_sums ? tc::kGradSq | tc::kGradAbs : 0u) | (o.histogram ? tc::kHistogram : 0u);
  }
  if (!params.empty()) flags |= tc::kParamAbs | tc::kParamSq;
  if (!init_params.empty()) flags |= tc::kDistSq;
  if (!prev_params.empty()) flags |= tc::kUpdateSq | (o.refresh_prev ? tc::kRefreshPrev : 0u);

  // Contiguous views (a copy only for non-contiguous inputs), kept alive for the launch.
  const int64_t n = static_cast<int64_t>(std::max({grads.size(), params.size(), init_params.size(), prev_params.size()}));
  std::vector<at::Tensor> keep;
  keep.reserve(4 * n);
  std::vector<std::pair<at::Tensor, at::Tensor>> refresh_back;  // (caller's prev, contiguous copy)
  std::vector<tc::TensorDesc> descs(n);
  bool all_double = n > 0;
  for (int64_t i = 0; i < n; ++i) {
    tc::TensorDesc& d = descs[i];
    d = tc::TensorDesc{};
    const at::Tensor& any = !grads.empty() ? grads[i] : params[i];
    d.numel = any.numel();
    d.dtype = to_kernel_dtype(any.scalar_type());
    d.weight_selected = (!o.weights_matrices_only || any.dim() >= 2) ? 1 : 0;
    auto take = [&](at::TensorList l) -> void* {
      if (l.empty()) return nullptr;
      all_double = all_double && l[i].scalar_type() == at::kDouble;
      keep.push_back(l[i].contiguous());
      return keep.back().data_ptr();
    };
    d.grad = take(grads);
    d.param = take(params);
    d.init = take(init_params);
    d.prev = take(prev_params);
    if ((flags & tc::kRefreshPrev) && !prev_params[i].is_contiguous()) {
      refresh_back.emplace_back(prev_params[i], keep.back());
    }
  }

  const auto fopt =
      at::TensorOptions().device(device).dtype(all_double || o.float64_results ? at::kDouble : at::kFloat);
  const auto iopt = at::TensorOptions().device(device).dtype(at::kLong);
  const int64_t nbins = o.histogram ? o.nbins : 0;
  ParamStats out;
  out.metrics = at::empty({kNumMetrics}, fopt);
  out.per_tensor = at::empty({n, kNumMetrics}, fopt);
  out.nonfinite = at::empty({}, iopt);
  out.nonfinite_per_tensor = at::empty({n}, iopt);
  // The CUDA launcher clears and fills both histograms itself when it counts.
  const bool launcher_fills_hist = device.is_cuda() && (flags & tc::kHistogram);
  out.hist = launcher_fills_hist ? at::empty({nbins}, iopt) : at::zeros({nbins}, iopt);
  out.hist_per_tensor = launcher_fills_hist ? at::empty({n, nbins}, iopt) : at::zeros({n, nbins}, iopt);

  const tc::HistSpec hist = tc::make_hist_spec(o.histogram ? o.nbins : 1, o.histogram ? o.maxval : 1.0);
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) cuda_param_stats(descs, flags, hist, out, device);
#endif
  if (device.is_cpu()) cpu_param_stats(descs, flags, hist, out);
  for (auto& [prev, copy] : refresh_back) prev.copy_(copy);
  return out;
}

ParamStats param_stats(at::TensorList grads, at::TensorList params, at::TensorList init_params,
                       at::TensorList prev_params, const ParamStatsOptions& options) {
  return param_stats_impl("trainscope::param_stats", grads, params, init_params, prev_params, options);
}

namespace {
ParamStatsOptions no_histogram() {
  ParamStatsOptions o;
  o.histogram = false;
  return o;
}

at::Tensor pick(const ParamStats& s, Metric m, bool per_tensor) {
  return per_tensor ? s.metric_per_tensor(m) : s.metric(m);
}
}  // namespace

at::Tensor grad_norm(at::TensorList grads, bool per_tensor) {
  return pick(param_stats_impl("trainscope::grad_norm", grads, {}, {}, {}, no_histogram()),
              Metric::kGradNorm, per_tensor);
}

at::Tensor grad_magnitude(at::TensorList grads, bool per_tensor) {
  return pick(param_stats_impl("trainscope::grad_magnitude", grads, {}, {}, {}, no_histogram()),
              Metric::kGradMagnitude, per_tensor);
}

at::Tensor weight_magnitude(at::TensorList params, bool per_tensor, bool matrices_only) {
  ParamStatsOptions o = no_histogram();
  o.weights_matrices_only = matrices_only;
  return pick(param_stats_impl("trainscope::weight_magnitude", {}, params, {}, {}, o),
              Metric::kWeightMagnitude, per_tensor);
}

at::Tensor distance(at::TensorList params, at::TensorList init_params, bool per_tensor) {
  TORCH_CHECK(!init_params.empty() || params.empty(), "trainscope::distance: init_params is empty");
  return pick(param_stats_impl("trainscope::distance", {}, params, init_params, {}, no_histogram()),
              Metric::kDistance, per_tensor);
}

at::Tensor update_size(at::TensorList params, at::TensorList prev_params, bool per_tensor) {
  TORCH_CHECK(!prev_params.empty() || params.empty(), "trainscope::update_size: prev_params is empty");
  return pick(param_stats_impl("trainscope::update_size", {}, params, {}, prev_params, no_histogram()),
              Metric::kUpdateSize, per_tensor);
}

at::Tensor weight_norm(at::TensorList params, bool per_tensor) {
  return pick(param_stats_impl("trainscope::weight_norm", {}, params, {}, {}, no_histogram()),
              Metric::kWeightNorm, per_tensor);
}

at::Tensor update_ratio(at::TensorList params, at::TensorList prev_params, bool per_tensor) {
  TORCH_CHECK(!prev_params.empty() || params.empty(), "trainscope::update_ratio: prev_params is empty");
  return pick(param_stats_impl("trainscope::update_ratio", {}, params, {}, prev_params, no_histogram()),
              Metric::kUpdateRatio, per_tensor);
}

template <typename T>
std::vector<int64_t> finite_per_row(const T* x, int64_t rows, int64_t cols) {
  std::vector<int64_t> out(static_cast<size_t>(rows));
  at::parallel_for(0, rows, std::max<int64_t>(1, tc::kDefaultChunkElems / std::max<int64_t>(cols, 1)),
                   [&](int64_t lo, int64_t hi) {
                     for (int64_t r = lo; r < hi; ++r) {
                       int64_t n = 0;
                       for (int64_t k = 0; k < cols; ++k) n += std::isfinite(static_cast<double>(x[r * cols + k]));
                       out[r] = n;
                     }
                   });
  return out;
}
template std::vector<int64_t> finite_per_row(const float*, int64_t, int64_t);
template std::vector<int64_t> finite_per_row(const double*, int64_t, int64_t);

void cpu_outer_product_hist1d(const at::Tensor& d, const at::Tensor& x, int64_t nbins, double maxval,
                              const at::Tensor& counts) {
  TORCH_INTERNAL_ASSERT(d.is_cpu() && x.is_cpu() && d.dim() == 2 && x.dim() == 2 && d.size(0) == x.size(0) &&
                        d.scalar_type() == x.scalar_type() && counts.scalar_type() == at::kLong &&
                        counts.numel() == nbins);
  const at::Tensor dc = d.contiguous(), xc = x.contiguous();
  const int64_t rows = dc.size(0) * dc.size(1), dout = dc.size(1), din = xc.size(1);
  if (rows == 0 || din == 0) return;
  const tc::HistSpec hist = tc::make_hist_spec(nbins, maxval);
  int64_t* out = counts.data_ptr<int64_t>();
  std::mutex mutex;
  AT_DISPATCH_FLOATING_TYPES(dc.scalar_type(), "cpu_outer_product_hist1d", [&] {
    const scalar_t* D = dc.data_ptr<scalar_t>();
    const scalar_t* X = xc.data_ptr<scalar_t>();
    // A zero δ (a unit a ReLU switched off: often half the rows) makes a row of zeros, but for the
    // NaNs of non-finite inputs, which are left out: the row is counted without being formed.
    const std::vector<int64_t> finite = finite_per_row(X, xc.size(0), din);
    const int32_t zero_bin = static_cast<int32_t>(tc::hist_bin(0.0, hist));
    const int64_t grain = std::max<int64_t>(1, tc::kDefaultChunkElems / din);
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
      CpuHistCounter counter(hist);
      std::vector<scalar_t> row(din);
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t dv = D[r];
        if (dv == scalar_t(0)) {
          counter.add_to_bin(zero_bin, finite[r / dout]);
          continue;
        }
        const scalar_t* xr = X + (r / dout) * din;
        for (int64_t k = 0; k < din; ++k) row[k] = dv * xr[k];  // one rounding, as a GEMM of depth one
        counter.add(row.data(), din);
      }
      std::lock_guard<std::mutex> lock(mutex);  // integer adds commute: deterministic
      counter.flush(out);
    });
  });
}

at::Tensor grad_hist1d(at::TensorList tensors, int64_t nbins, double maxval, bool per_tensor) {
  ParamStatsOptions o;
  o.nbins = nbins;
  o.maxval = maxval;
  ParamStats s = param_stats_impl("trainscope::grad_hist1d", tensors, {}, {}, {}, o, "tensors", /*grad_sums=*/false);
  return per_tensor ? s.hist_per_tensor : s.hist;
}

at::Tensor nonfinite_count(at::TensorList tensors, bool per_tensor) {
  ParamStats s =
      param_stats_impl("trainscope::nonfinite_count", tensors, {}, {}, {}, no_histogram(), "tensors");
  return per_tensor ? s.nonfinite_per_tensor : s.nonfinite;
}

at::Tensor loss(const at::Tensor& per_sample_losses) {
  NvtxRange range{"trainscope::loss"};
  TORCH_CHECK(per_sample_losses.defined(), "trainscope::loss: losses is an undefined tensor");
  check_float_dtype("trainscope::loss", "losses", -1, per_sample_losses);
  check_device("trainscope::loss", "losses", per_sample_losses.device());
  const auto acc = per_sample_losses.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::mean(per_sample_losses.detach(), acc);  // a measurement: no autograd graph
}

bool built_with_cuda() { return kWithCuda; }

at::Tensor hist_bin_edges(int64_t nbins, double maxval, at::Device device) {
  check_hist_axis("trainscope::hist_bin_edges", "nbins", nbins, "maxval", maxval);
  return at::linspace(-maxval, maxval, nbins + 1, at::TensorOptions().dtype(at::kDouble).device(device));
}

}  // namespace trainscope
