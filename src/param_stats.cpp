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

// The histogram alone (per-sample histograms bin billions of elements): a tight loop, with few
// bins counted in several copies so that increments of one bin do not wait on each other.
// Non-finite values are counted in acc.nonfinite.
template <typename T>
void cpu_hist_only(const T* g, int64_t n, const tc::HistSpec& hist, tc::ParamSums<double>& acc,
                   int64_t* counts) {
  const int64_t nbins = hist.nbins;
  const int64_t copies = nbins <= 4096 ? 4 : 1;
  std::vector<int64_t> local(copies * (nbins + 1), 0);  // slot nbins of each copy: non-finite
  const auto bin = [&](int64_t i) -> int64_t {
    const double x = tc::widen(g[i]);
    return tc::is_finite(x) ? tc::hist_bin(x, hist) : nbins;
  };
  int64_t i = 0;
  for (; i + copies <= n; i += copies) {
    for (int64_t k = 0; k < copies; ++k) ++local[k * (nbins + 1) + bin(i + k)];
  }
  for (; i < n; ++i) ++local[bin(i)];
  for (int64_t k = 0; k < copies; ++k) {
    const int64_t* l = local.data() + k * (nbins + 1);
    for (int64_t b = 0; b < nbins; ++b) counts[b] += l[b];
    acc.nonfinite += l[nbins];
  }
}

// Sums of one chunk, and the histogram counts it found, on the CPU.
template <typename T>
void cpu_chunk(const tc::TensorDesc& d, int64_t begin, int64_t end, uint32_t flags,
               const tc::HistSpec& hist, tc::ParamSums<double>& acc, int64_t* counts) {
  const T* g = static_cast<const T*>(d.grad);
  const T* p = static_cast<const T*>(d.param);
  const T* p0 = static_cast<const T*>(d.init);
  T* pp = static_cast<T*>(d.prev);
  const bool rg = tc::reads_grad(flags), rp = tc::reads_param(flags);
  const bool ri = tc::reads_init(flags), rv = tc::reads_prev(flags);
  if (flags == tc::kHistogram) {
    cpu_hist_only(g + begin, end - begin, hist, acc, counts);
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    if (rg) {
      const double gx = tc::widen(g[i]);
      tc::accumulate_grad(acc, flags, gx);
      if ((flags & tc::kHistogram) && tc::is_finite(gx)) ++counts[tc::hist_bin(gx, hist)];
    }
    if (rp) {
      tc::accumulate_param(acc, flags, static_cast<double>(tc::widen(p[i])),
                           ri ? static_cast<double>(tc::widen(p0[i])) : 0.0,
                           rv ? static_cast<double>(tc::widen(pp[i])) : 0.0);
    }
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
    std::vector<int64_t> counts(nbins, 0);
    int64_t counts_tensor = -1;
    auto flush = [&]() {
      if (counts_tensor < 0) return;
      std::lock_guard<std::mutex> lock(hist_mutex);  // integer adds commute: deterministic
      for (int64_t b = 0; b < nbins; ++b) hist_pt[counts_tensor * nbins + b] += counts[b];
      std::fill(counts.begin(), counts.end(), 0);
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
        case tc::DType::kFloat32: cpu_chunk<float>(d, begin, end, flags, hist, acc, counts.data()); break;
        case tc::DType::kFloat64: cpu_chunk<double>(d, begin, end, flags, hist, acc, counts.data()); break;
        case tc::DType::kBFloat16: cpu_chunk<tc::bf16_bits>(d, begin, end, flags, hist, acc, counts.data()); break;
        case tc::DType::kFloat16: cpu_chunk<tc::f16_bits>(d, begin, end, flags, hist, acc, counts.data()); break;
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
