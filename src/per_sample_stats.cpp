// Per-sample gradient statistics: argument checks, the CPU implementation, the adapter to the
// CUDA launcher (cuda/per_sample_stats.cu), and the statistics from the additive parts.
#include "trainscope/per_sample_stats.h"

#include "trainscope/param_stats.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include <ATen/Parallel.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cuda/param_stats.h"
#include "cuda/per_sample_stats.h"
#include "src/nvtx.h"
#include "src/per_sample_stats_internal.h"
#include "src/tensor_checks.h"

namespace trainscope {

namespace tc = trainscope::cuda;

const char* per_sample_stat_name(PerSampleStat s) {
  switch (s) {
    case PerSampleStat::kNormTest: return "norm_test";
    case PerSampleStat::kInnerTest: return "inner_test";
    case PerSampleStat::kOrthoTest: return "ortho_test";
    case PerSampleStat::kGradVarianceTrace: return "grad_variance_trace";
    case PerSampleStat::kGradSqNormUnbiased: return "grad_sq_norm_unbiased";
    case PerSampleStat::kGradientNoiseScale: return "gradient_noise_scale";
  }
  return "unknown";
}

PerSampleParts& PerSampleParts::operator+=(const PerSampleParts& other) {
  TORCH_CHECK(other.sq_norms.size(0) == sq_norms.size(0), "PerSampleParts +=: batch sizes differ (",
              sq_norms.size(0), " and ", other.sq_norms.size(0), ")");
  TORCH_CHECK(other.sq_norms.device() == sq_norms.device(), "PerSampleParts +=: parts on ",
              sq_norms.device(), " and ", other.sq_norms.device());
  sq_norms = sq_norms + other.sq_norms;
  dots = dots + other.dots;
  mean_sq_norm = mean_sq_norm + other.mean_sq_norm;
  return *this;
}

int64_t check_per_sample_parts(const char* op, const PerSampleParts& parts, int64_t min_batch) {
  TORCH_CHECK(parts.sq_norms.defined() && parts.dots.defined() && parts.mean_sq_norm.defined(), op,
              ": sq_norms, dots and mean_sq_norm must all be given");
  TORCH_CHECK(parts.sq_norms.dim() == 1, op, ": sq_norms must be 1-D [B], got shape ", parts.sq_norms.sizes());
  TORCH_CHECK(parts.dots.sizes() == parts.sq_norms.sizes(), op, ": dots has shape ", parts.dots.sizes(),
              " but sq_norms has shape ", parts.sq_norms.sizes());
  TORCH_CHECK(parts.mean_sq_norm.numel() == 1, op, ": mean_sq_norm must hold one value, got shape ",
              parts.mean_sq_norm.sizes());
  TORCH_CHECK(parts.dots.device() == parts.sq_norms.device() &&
                  parts.mean_sq_norm.device() == parts.sq_norms.device(),
              op, ": sq_norms, dots and mean_sq_norm must be on one device");
  check_device(op, "sq_norms", parts.sq_norms.device());
  for (const at::Tensor* t : {&parts.sq_norms, &parts.dots, &parts.mean_sq_norm}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": parts must be floating point, got ", t->scalar_type());
  }
  const int64_t b = parts.sq_norms.size(0);
  check_batch_size(op, "sq_norms", b, min_batch);
  return b;
}

void check_batch_size(const char* op, const char* arg, int64_t b, int64_t min_batch) {
  if (min_batch >= 2) {
    TORCH_CHECK(b >= min_batch, op, ": ", arg, ": the per-sample statistics need a batch of B >= 2 samples, got B = ",
                b);
  } else {
    TORCH_CHECK(b >= min_batch, op, ": ", arg, " holds B_r = ", b,
                " samples on this rank; with the batch split over several ranks every rank needs at least one "
                "sample (so that the whole batch has B >= 2 without reading device values)");
  }
}

at::Tensor per_sample_stats_from_sums(const at::Tensor& batch, const at::Tensor& sum_sq, const at::Tensor& sum_dev_sq,
                                      const at::Tensor& sum_dots_sq, const at::Tensor& mean_sq_norm) {
  const at::Tensor& B = batch;
  const at::Tensor& m = mean_sq_norm;
  const at::Tensor pairs = B * (B - 1.0);
  const at::Tensor norm_test = (sum_sq / m - B) / pairs;
  const at::Tensor inner_test = sum_dev_sq / (pairs * m.square());
  // Σ‖gᵢ − (gᵢ·ḡ/‖ḡ‖²) ḡ‖² = Σ‖gᵢ‖² − Σ(gᵢ·ḡ)²/‖ḡ‖²
  const at::Tensor ortho_test = (sum_sq - sum_dots_sq / m) / (pairs * m);
  const at::Tensor trace = (sum_sq - B * m) / (B - 1.0);
  const at::Tensor sq_norm_unbiased = m - trace / B;
  const at::Tensor noise_scale = trace / sq_norm_unbiased;
  return at::stack({norm_test, inner_test, ortho_test, trace, sq_norm_unbiased, noise_scale});
}

at::Tensor per_sample_stats_from_parts(const PerSampleParts& parts) {
  NvtxRange range{"trainscope::per_sample_stats_from_parts"};
  const int64_t b = check_per_sample_parts("trainscope::per_sample_stats_from_parts", parts, 2);

  // In float64: the statistics subtract nearly equal quantities (Σ‖gᵢ‖²/‖ḡ‖² and B, say).
  // B is a host scalar (a 0-d CPU tensor) here; across ranks it is the device sum of the ranks'.
  const at::Tensor sq = parts.sq_norms.to(at::kDouble);
  const at::Tensor dots = parts.dots.to(at::kDouble);
  const at::Tensor m = parts.mean_sq_norm.to(at::kDouble).reshape({});
  return per_sample_stats_from_sums(at::scalar_tensor(static_cast<double>(b), at::kDouble), sq.sum(),
                                    (dots - m).square().sum(), dots.square().sum(), m);
}

int64_t check_per_sample_grads(const char* op, at::TensorList grads, const PerSampleOptions& o, int64_t min_batch) {
  TORCH_CHECK(!grads.empty(), op, ": per_sample_grads is empty");
  int64_t b = -1;
  at::Device device = at::kCPU;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& t = grads[i];
    TORCH_CHECK(t.defined(), op, ": per_sample_grads[", i, "] is an undefined tensor");
    check_float_dtype(op, "per_sample_grads", static_cast<int64_t>(i), t);
    TORCH_CHECK(t.dim() >= 1, op, ": per_sample_grads[", i,
                "] is 0-d; each entry is [B, *param_shape] with the batch first");
    if (i == 0) {
      b = t.size(0);
      device = t.device();
      check_device(op, "per_sample_grads[0]", device);
    }
    TORCH_CHECK(t.device() == device, op, ": per_sample_grads[", i, "] is on ", t.device(),
                " but per_sample_grads[0] is on ", device);
    TORCH_CHECK(t.size(0) == b, op, ": per_sample_grads[", i, "] has batch size ", t.size(0),
                " but per_sample_grads[0] has ", b, "; every entry is [B, *param_shape] with one B");
  }
  check_batch_size(op, "per_sample_grads", b, min_batch);
  if (o.histogram) {
    check_hist_axis(op, "nbins", o.nbins, "maxval", o.maxval);
  }
  return b;
}

namespace {

struct Outputs {
  at::Tensor sq, dots, msq, nonfinite, hist;
};

// CPU: units of up to kUnitCols columns of one tensor run in parallel; each cuts its columns
// into tiles of kTileCols, forms the tile's column means and adds each row's sums. Units are
// fixed by the shapes alone and added in order, so the result does not depend on thread count.
constexpr int64_t kTileCols = 256;
constexpr int64_t kUnitCols = 64 * kTileCols;

template <typename T>
void cpu_unit(const T* g, int64_t b, int64_t cols, int64_t c_begin, int64_t c_end, bool histogram,
              const tc::HistSpec& hist, double* sq, double* dots, double* msq, int64_t* nonfinite,
              int64_t* counts) {
  std::vector<double> tile(static_cast<size_t>(b * kTileCols)), mean(kTileCols);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTileCols) {
    const int64_t w = std::min(kTileCols, c_end - c0);
    std::fill(mean.begin(), mean.end(), 0.0);
    for (int64_t r = 0; r < b; ++r) {
      for (int64_t c = 0; c < w; ++c) {
        const double v = static_cast<double>(tc::widen(g[r * cols + c0 + c]));
        tile[r * kTileCols + c] = v;
        mean[c] += v;
        if (!tc::is_finite(v)) {
          ++*nonfinite;
        } else if (histogram) {
          ++counts[tc::hist_bin(v, hist)];
        }
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      mean[c] /= static_cast<double>(b);
      *msq += mean[c] * mean[c];
    }
    for (int64_t r = 0; r < b; ++r) {
      double s = 0.0, d = 0.0;
      for (int64_t c = 0; c < w; ++c) {
        const double v = tile[r * kTileCols + c];
        s += v * v;
        d += v * mean[c];
      }
      sq[r] += s;
      dots[r] += d;
    }
  }
}

void cpu_parts(const std::vector<tc::PerSampleTensorDesc>& descs, int64_t b, const PerSampleOptions& o,
               const Outputs& out) {
  struct Unit {
    size_t tensor;
    int64_t c_begin, c_end;
  };
  std::vector<Unit> units;
  for (size_t t = 0; t < descs.size(); ++t) {
    for (int64_t c = 0; c < descs[t].cols; c += kUnitCols) {
      units.push_back({t, c, std::min(c + kUnitCols, descs[t].cols)});
    }
  }
  const int64_t nu = static_cast<int64_t>(units.size());
  std::vector<double> sq(static_cast<size_t>(nu * b), 0.0), dots(static_cast<size_t>(nu * b), 0.0), msq(nu, 0.0);
  std::vector<int64_t> nonfinite(nu, 0);
  const int64_t nbins = o.histogram ? o.nbins : 0;
  const tc::HistSpec hist = tc::make_hist_spec(o.histogram ? o.nbins : 1, o.histogram ? o.maxval : 1.0);
  int64_t* hist_out = o.histogram ? out.hist.data_ptr<int64_t>() : nullptr;
  std::mutex hist_mutex;

  at::parallel_for(0, nu, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> counts(nbins, 0);
    for (int64_t u = lo; u < hi; ++u) {
      const Unit& un = units[u];
      const tc::PerSampleTensorDesc& d = descs[un.tensor];
      double* s = sq.data() + u * b;
      double* dt = dots.data() + u * b;
      switch (d.dtype) {
        case tc::DType::kFloat32:
          cpu_unit(static_cast<const float*>(d.grads), b, d.cols, un.c_begin, un.c_end, o.histogram, hist, s, dt, &msq[u], &nonfinite[u], counts.data());
          break;
        case tc::DType::kFloat64:
          cpu_unit(static_cast<const double*>(d.grads), b, d.cols, un.c_begin, un.c_end, o.histogram, hist, s, dt, &msq[u], &nonfinite[u], counts.data());
          break;
        case tc::DType::kBFloat16:
          cpu_unit(static_cast<const tc::bf16_bits*>(d.grads), b, d.cols, un.c_begin, un.c_end, o.histogram, hist, s, dt, &msq[u], &nonfinite[u], counts.data());
          break;
        case tc::DType::kFloat16:
          cpu_unit(static_cast<const tc::f16_bits*>(d.grads), b, d.cols, un.c_begin, un.c_end, o.histogram, hist, s, dt, &msq[u], &nonfinite[u], counts.data());
          break;
      }
    }
    if (nbins > 0) {
      std::lock_guard<std::mutex> lock(hist_mutex);  // integer adds commute: deterministic
      for (int64_t k = 0; k < nbins; ++k) hist_out[k] += counts[k];
    }
  });

  double* out_sq = out.sq.data_ptr<double>();
  double* out_dots = out.dots.data_ptr<double>();
  std::fill(out_sq, out_sq + b, 0.0);
  std::fill(out_dots, out_dots + b, 0.0);
  double total_msq = 0.0;
  int64_t total_nonfinite = 0;
  for (int64_t u = 0; u < nu; ++u) {
    for (int64_t r = 0; r < b; ++r) {
      out_sq[r] += sq[u * b + r];
      out_dots[r] += dots[u * b + r];
    }
    total_msq += msq[u];
    total_nonfinite += nonfinite[u];
  }
  out.msq.fill_(total_msq);
  out.nonfinite.fill_(total_nonfinite);
}

#if defined(TRAINSCOPE_WITH_CUDA)
// Two passes with ATen ops, for batches too large to stage on chip: ḡ first, then the sums.
void composite_parts(const std::vector<at::Tensor>& grads, int64_t b, const PerSampleOptions& o,
                     const Outputs& out) {
  out.sq.zero_();
  out.dots.zero_();
  out.msq.zero_();
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : grads) {
    if (t.numel() == 0) continue;
    const PerSampleParts parts = parts_of_rows(t.reshape({b, -1}).to(at::kDouble));
    out.sq.add_(parts.sq_norms);
    out.dots.add_(parts.dots);
    out.msq.add_(parts.mean_sq_norm);
    flat.push_back(t);
  }
  if (flat.empty()) {
    out.nonfinite.zero_();
    return;
  }
  ParamStatsOptions po;
  po.histogram = o.histogram;
  po.nbins = o.nbins;
  po.maxval = o.maxval;
  const ParamStats s = param_stats(flat, {}, {}, {}, po);
  out.nonfinite.copy_(s.nonfinite);
  if (o.histogram) out.hist.copy_(s.hist);
}

// The fused kernel when it can stage a tile of B rows on this device, the two passes otherwise.
void cuda_parts(const char* op, const std::vector<at::Tensor>& keep, const std::vector<tc::PerSampleTensorDesc>& descs,
                int64_t b, bool has_f64, const PerSampleOptions& o, const at::Device& device, const Outputs& out) {
  c10::cuda::CUDAGuard guard(device);
  const int dev = device.index();
  if (!tc::per_sample_launch_supported(b, has_f64, dev)) {
    out.hist.zero_();
    composite_parts(keep, b, o, out);
    return;
  }
  tc::PerSampleArgs args{};
  args.tensors = descs.data();
  args.num_tensors = static_cast<int64_t>(descs.size());
  args.batch = b;
  args.histogram = o.histogram;
  args.hist_spec = tc::make_hist_spec(o.histogram ? o.nbins : 1, o.histogram ? o.maxval : 1.0);
  args.sq_norms = out.sq.data_ptr<double>();
  args.dots = out.dots.data_ptr<double>();
  args.mean_sq_norm = out.msq.data_ptr<double>();
  args.nonfinite = out.nonfinite.data_ptr<int64_t>();
  args.hist = o.histogram ? out.hist.data_ptr<int64_t>() : nullptr;
  const size_t ws_bytes = tc::per_sample_workspace_bytes(args, dev);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  const cudaError_t err = tc::per_sample_launch(args, workspace.data_ptr(), ws_bytes,
                                                at::cuda::getCurrentCUDAStream(dev).stream(), dev);
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

PerSampleParts parts_of_rows(const at::Tensor& rows) {
  const at::Tensor mean = rows.mean(0);
  return {rows.square().sum(1), at::mv(rows, mean), mean.square().sum()};
}

PerSampleStats per_sample_parts_impl(const char* op, at::TensorList per_sample_grads, const PerSampleOptions& o,
                                     int64_t min_batch) {
  NvtxRange range{op};
  const int64_t b = check_per_sample_grads(op, per_sample_grads, o, min_batch);
  const at::Device device = per_sample_grads[0].device();

  std::vector<at::Tensor> keep;
  std::vector<tc::PerSampleTensorDesc> descs;
  bool has_f64 = false;
  for (const at::Tensor& t : per_sample_grads) {
    keep.push_back(t.contiguous());
    tc::PerSampleTensorDesc d;
    d.grads = keep.back().data_ptr();
    d.cols = t.numel() / b;
    d.dtype = to_kernel_dtype(t.scalar_type());
    has_f64 = has_f64 || (t.scalar_type() == at::kDouble && t.numel() > 0);
    descs.push_back(d);
  }

  const auto fopt = at::TensorOptions().device(device).dtype(at::kDouble);
  const auto iopt = at::TensorOptions().device(device).dtype(at::kLong);
  Outputs out;
  out.sq = at::empty({b}, fopt);
  out.dots = at::empty({b}, fopt);
  out.msq = at::empty({}, fopt);
  out.nonfinite = at::empty({}, iopt);
  const int64_t nbins = o.histogram ? o.nbins : 0;
  out.hist = device.is_cpu() ? at::zeros({nbins}, iopt) : at::empty({nbins}, iopt);  // the CUDA launcher clears it

#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) cuda_parts(op, keep, descs, b, has_f64, o, device, out);
#endif
  if (device.is_cpu()) cpu_parts(descs, b, o, out);

  PerSampleStats s;
  s.parts = PerSampleParts{out.sq, out.dots, out.msq};
  s.hist = out.hist;
  s.nonfinite = out.nonfinite;
  return s;
}

namespace {
PerSampleStats with_stats(PerSampleStats s) {
  s.stats = per_sample_stats_from_parts(s.parts);
  return s;
}
}  // namespace

PerSampleStats per_sample_stats(at::TensorList per_sample_grads, const PerSampleOptions& options) {
  return with_stats(per_sample_parts_impl("trainscope::per_sample_stats", per_sample_grads, options));
}

namespace {
PerSampleOptions without_histogram() {
  PerSampleOptions o;
  o.histogram = false;
  return o;
}
}  // namespace

PerSampleParts per_sample_parts(at::TensorList per_sample_grads) {
  return per_sample_parts_impl("trainscope::per_sample_parts", per_sample_grads, without_histogram()).parts;
}

at::Tensor norm_test(at::TensorList g) {
  return with_stats(per_sample_parts_impl("trainscope::norm_test", g, without_histogram())).stat(PerSampleStat::kNormTest);
}

at::Tensor inner_test(at::TensorList g) {
  return with_stats(per_sample_parts_impl("trainscope::inner_test", g, without_histogram())).stat(PerSampleStat::kInnerTest);
}

at::Tensor ortho_test(at::TensorList g) {
  return with_stats(per_sample_parts_impl("trainscope::ortho_test", g, without_histogram())).stat(PerSampleStat::kOrthoTest);
}

at::Tensor gradient_noise_scale(at::TensorList g) {
  return with_stats(per_sample_parts_impl("trainscope::gradient_noise_scale", g, without_histogram()))
      .stat(PerSampleStat::kGradientNoiseScale);
}

at::Tensor per_sample_grad_hist1d(at::TensorList g, int64_t nbins, double maxval) {
  PerSampleOptions o;
  o.nbins = nbins;
  o.maxval = maxval;
  return per_sample_parts_impl("trainscope::per_sample_grad_hist1d", g, o).hist;
}

}  // namespace trainscope
