// Joint (per-sample gradient, parameter) histogram: argument checks, the CPU implementation, and
// the adapter that hands CUDA tensors to the torch-free launcher in cuda/hist2d.cu.
//
// The CPU path walks the same items (hist2d_plan / hist2d_item) with the same binning functions
// (cuda/hist2d.h) as the kernel, so both devices put every pair in the same bin.
#include "trainscope/hist2d.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include <ATen/Parallel.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cuda/hist2d.h"
#include "src/hist2d_internal.h"
#include "src/nvtx.h"
#include "src/param_stats_internal.h"
#include "src/tensor_checks.h"

namespace trainscope {

namespace tc = trainscope::cuda;

namespace {

constexpr const char* kOp = "trainscope::grad_hist2d";

// Elements per CPU task of the outer-product path (as the fused parameter pass's chunks).
constexpr int64_t kCpuGrainElems = int64_t{1} << 14;

// Local counters per CPU task up to this many bins; beyond, tasks add straight into the output
// with integer atomics (a private copy per thread would cost up to 128 MiB each).
constexpr int64_t kMaxPrivateCpuBins = int64_t{1} << 20;

// Everything SPEC.md §5 asks to reject, checked before any work; messages name the argument.
// Returns B (0 when both lists are empty).
int64_t check_inputs(at::TensorList grads, at::TensorList params, const Hist2dOptions& o) {
  check_hist_axis(kOp, "nbins_grad", o.nbins_grad, "maxval_grad", o.maxval_grad);
  check_hist_axis(kOp, "nbins_param", o.nbins_param, "maxval_param", o.maxval_param);
  TORCH_CHECK(o.nbins_grad * o.nbins_param <= tc::kMaxHist2dBins, kOp, ": nbins_grad * nbins_param must be at most ",
              tc::kMaxHist2dBins, " (2^24 bins), got ", o.nbins_grad, " * ", o.nbins_param, " = ",
              o.nbins_grad * o.nbins_param);
  TORCH_CHECK(grads.size() == params.size(), kOp, ": per_sample_grads has ", grads.size(),
              " tensors but params has ", params.size(), "; the lists are paired by position");
  if (grads.empty()) return 0;

  const int64_t n = static_cast<int64_t>(grads.size());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].defined(), kOp, ": per_sample_grads[", i, "] is an undefined tensor");
    TORCH_CHECK(params[i].defined(), kOp, ": params[", i, "] is an undefined tensor");
  }
  const at::Device device = grads[0].device();
  check_device(kOp, "per_sample_grads[0]", device);
  TORCH_CHECK(grads[0].dim() >= 1, kOp,
              ": per_sample_grads[0] is 0-d; per-sample gradients are [B, *param_shape]");
  const int64_t batch = grads[0].size(0);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& p = params[i];
    check_float_dtype(kOp, "per_sample_grads", static_cast<int64_t>(i), g);
    check_float_dtype(kOp, "params", static_cast<int64_t>(i), p);
    TORCH_CHECK(g.device() == device, kOp, ": per_sample_grads[", i, "] is on ", g.device(),
                " but per_sample_grads[0] is on ", device, "; all tensors must share one device");
    TORCH_CHECK(p.device() == device, kOp, ": params[", i, "] is on ", p.device(),
                " but per_sample_grads[0] is on ", device, "; all tensors must share one device");
    TORCH_CHECK(g.dim() == p.dim() + 1 && g.sizes().slice(1) == p.sizes(), kOp, ": per_sample_grads[", i,
                "] has shape ", g.sizes(), " but params[", i, "] has shape ", p.sizes(),
                "; per-sample gradients are [B, *param_shape]");
    TORCH_CHECK(g.size(0) == batch, kOp, ": per_sample_grads[", i, "] has batch size ", g.size(0),
                " but per_sample_grads[0] has ", batch, "; one B for the whole list");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), kOp, ": per_sample_grads[", i, "] has dtype ",
                g.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
  }
  // No B >= 2 check: unlike the statistics of SPEC.md §2 that divide by B − 1, the histogram is a
  // sum over samples, so any B works, and callers that count a batch in tiles of samples
  // (src/per_sample_factors.cpp) may pass a single sample.
  return batch;
}

// Adds n to counts[b]: with integer atomics where tasks share the output (integer adds commute).
inline void add_count(int64_t* counts, int64_t b, int64_t n, bool atomic) {
  if (atomic) {
    __atomic_fetch_add(counts + b, n, __ATOMIC_RELAXED);
  } else {
    counts[b] += n;
  }
}

// Counts one pair of bins: gbin from hist_bins (slot nbins_grad: non-finite), pbin from
// hist2d_param_bin (-1: non-finite).
inline void count_pair(int32_t gbin, int32_t pbin, int32_t nbins_grad, int64_t nbins_param, int64_t* counts,
                       bool atomic, int64_t& nonfinite) {
  if (gbin == nbins_grad || pbin < 0) {
    ++nonfinite;
    return;
  }
  add_count(counts, gbin * nbins_param + pbin, 1, atomic);
}

// One item on the CPU: the parameter bins of its columns once, then each row's gradient bins in a
// vectorised pass (hist_bins: the bins of hist2d_flat_bin), then their counts.
template <typename T>
void cpu_item(const tc::Hist2dPair& d, const tc::Hist2dPlan& plan, int64_t batch, int64_t item,
              const tc::HistSpec& gs, const tc::HistSpec& ps, int64_t* counts, bool atomic,
              std::vector<int32_t>& pbin, std::vector<int32_t>& gbin, int64_t& nonfinite) {
  const tc::Hist2dItem it = tc::hist2d_item(plan, batch, d.numel, item);
  const T* theta = static_cast<const T*>(d.param);
  const T* grad = static_cast<const T*>(d.grad);
  const int64_t width = it.col_end - it.col_begin;
  const int32_t ng = static_cast<int32_t>(gs.nbins);
  pbin.resize(static_cast<size_t>(width));
  gbin.resize(static_cast<size_t>(width));
  for (int64_t c = 0; c < width; ++c) {
    pbin[c] = tc::hist2d_param_bin(static_cast<double>(tc::widen(theta[it.col_begin + c])), ps);
  }
  for (int64_t r = it.row_begin; r < it.row_end; ++r) {
    hist_bins(grad + r * d.numel + it.col_begin, width, gs.maxval, gs.width, ng, gbin.data());
    for (int64_t c = 0; c < width; ++c) count_pair(gbin[c], pbin[c], ng, ps.nbins, counts, atomic, nonfinite);
  }
}

void cpu_hist2d(const std::vector<tc::Hist2dPair>& pairs, int64_t batch, const tc::HistSpec& gs,
                const tc::HistSpec& ps, const Hist2d& out) {
  const int64_t n = static_cast<int64_t>(pairs.size());
  std::vector<tc::Hist2dPlan> plans(n);
  std::vector<int64_t> first_item(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    plans[i] = tc::hist2d_plan(batch, pairs[i].numel);
    first_item[i] = total;
    total += plans[i].items;
  }
  const int64_t nbins = gs.nbins * ps.nbins;
  const bool large = nbins > kMaxPrivateCpuBins;
  int64_t* counts = out.counts.data_ptr<int64_t>();
  int64_t nonfinite = 0;
  std::mutex mutex;

  // Items hold up to 2^15 elements: a grain of 4 keeps a small call on one thread.
  at::parallel_for(0, total, 4, [&](int64_t lo, int64_t hi) {
    // One task for the whole range (a small call, or one thread) owns the output outright.
    const bool alone = lo == 0 && hi == total;
    const bool shared = large && !alone;
    std::vector<int64_t> local(large || alone ? 0 : static_cast<size_t>(nbins), 0);
    int64_t* dst = large || alone ? counts : local.data();
    std::vector<int32_t> pbin, gbin;
    int64_t bad = 0;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t t = tc::find_owner(first_item.data(), n, item);
      const tc::Hist2dPair& d = pairs[t];
      auto run = [&](auto element) {
        cpu_item<decltype(element)>(d, plans[t], batch, item - first_item[t], gs, ps, dst, shared, pbin, gbin,
                                    bad);
      };
      switch (d.dtype) {
        case tc::DType::kFloat32: run(float{}); break;
        case tc::DType::kFloat64: run(double{}); break;
        case tc::DType::kBFloat16: run(tc::bf16_bits{}); break;
        case tc::DType::kFloat16: run(tc::f16_bits{}); break;
      }
    }
    std::lock_guard<std::mutex> lock(mutex);  // integer sums: the order does not matter
    if (!local.empty()) {
      for (int64_t b = 0; b < nbins; ++b) counts[b] += local[b];
    }
    nonfinite += bad;
  });
  out.nonfinite.fill_(nonfinite);
}

template <typename T>
void cpu_outer_product(const at::Tensor& d, const at::Tensor& x, const at::Tensor& w, const tc::HistSpec& gs,
                       const tc::HistSpec& ps, const Hist2d& out) {
  const int64_t rows = d.size(0), dout = d.size(1), din = x.size(1), groups = w.size(0);
  const T* D = d.data_ptr<T>();
  const T* X = x.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  const int64_t np = ps.nbins;
  // The parameter bins once; every sample's rows reuse them. Per parameter row, also how many of
  // its values fall in each parameter bin (slot np: non-finite), for the rows of zeros below.
  std::vector<int32_t> pbin(static_cast<size_t>(w.numel()));
  std::vector<int64_t> prow_hist(static_cast<size_t>(groups * dout * (np + 1)), 0);
  at::parallel_for(0, groups * dout, std::max<int64_t>(1, kCpuGrainElems / din), [&](int64_t lo, int64_t hi) {
    for (int64_t a = lo; a < hi; ++a) {
      int64_t* h = prow_hist.data() + a * (np + 1);
      for (int64_t k = a * din; k < (a + 1) * din; ++k) {
        pbin[k] = tc::hist2d_param_bin(static_cast<double>(W[k]), ps);
        ++h[pbin[k] < 0 ? np : pbin[k]];
      }
    }
  });
  // A zero δ (a unit a ReLU switched off: often half the rows) makes a row of zeros, against a
  // sample's finite inputs: such a row is counted from its parameter row's bins, never formed.
  const std::vector<int64_t> finite = finite_per_row(X, x.size(0), din);
  const int32_t ng = static_cast<int32_t>(gs.nbins);
  const int64_t zero_row = tc::hist_bin(0.0, gs) * np;
  const int64_t nbins = gs.nbins * ps.nbins;
  const bool large = nbins > kMaxPrivateCpuBins;
  int64_t* counts = out.counts.data_ptr<int64_t>();
  int64_t nonfinite = 0;
  std::mutex mutex;
  // Unit u = one row of one sample's gradient: u / d_out is r, u % d_out the output unit.
  at::parallel_for(0, rows * dout, std::max<int64_t>(1, kCpuGrainElems / din), [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> local(large ? 0 : static_cast<size_t>(nbins), 0);
    int64_t* dst = large ? counts : local.data();
    std::vector<T> row(static_cast<size_t>(din));
    std::vector<int32_t> gbin(static_cast<size_t>(din));
    int64_t bad = 0;
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t r = u / dout, a = u - r * dout;
      const T dv = D[u];
      if (dv == T(0) && finite[r] == din) {
        const int64_t* h = prow_hist.data() + ((r % groups) * dout + a) * (np + 1);
        for (int64_t j = 0; j < np; ++j) {
          if (h[j] != 0) add_count(dst, zero_row + j, h[j], large);
        }
        bad += h[np];
        continue;
      }
      const T* xr = X + r * din;
      for (int64_t k = 0; k < din; ++k) row[k] = dv * xr[k];  // one rounding, as a GEMM of depth one
      hist_bins(row.data(), din, gs.maxval, gs.width, ng, gbin.data());
      const int32_t* prow = pbin.data() + ((r % groups) * dout + a) * din;
      for (int64_t k = 0; k < din; ++k) count_pair(gbin[k], prow[k], ng, np, dst, large, bad);
    }
    std::lock_guard<std::mutex> lock(mutex);  // integer sums: the order does not matter
    for (size_t b = 0; b < local.size(); ++b) counts[b] += local[b];
    nonfinite += bad;
  });
  out.nonfinite.add_(nonfinite);
}

#if defined(TRAINSCOPE_WITH_CUDA)
void cuda_hist2d(const std::vector<tc::Hist2dPair>& pairs, int64_t batch, const tc::HistSpec& gs,
                 const tc::HistSpec& ps, const Hist2d& out, at::Device device) {
  c10::cuda::CUDAGuard guard(device);
  tc::Hist2dArgs args{};
  args.pairs = pairs.data();
  args.num_pairs = static_cast<int64_t>(pairs.size());
  args.batch = batch;
  args.grad_spec = gs;
  args.param_spec = ps;
  args.counts = out.counts.data_ptr<int64_t>();
  args.nonfinite = out.nonfinite.data_ptr<int64_t>();
  const cudaError_t err = tc::hist2d_launch(args, at::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

void cpu_outer_product_hist2d(const at::Tensor& d, const at::Tensor& x, const at::Tensor& w,
                              const Hist2dOptions& options, const Hist2d& out) {
  TORCH_INTERNAL_ASSERT(d.is_cpu() && d.dim() == 2 && x.dim() == 2 && w.dim() == 3 && d.size(0) == x.size(0) &&
                        d.size(1) == w.size(1) && x.size(1) == w.size(2) && d.size(0) % w.size(0) == 0 &&
                        d.scalar_type() == x.scalar_type() && d.scalar_type() == w.scalar_type());
  if (d.numel() == 0 || x.size(1) == 0) return;
  const tc::HistSpec gs = tc::make_hist_spec(options.nbins_grad, options.maxval_grad);
  const tc::HistSpec ps = tc::make_hist_spec(options.nbins_param, options.maxval_param);
  const at::Tensor dc = d.contiguous(), xc = x.contiguous(), wc = w.contiguous();
  switch (dc.scalar_type()) {
    case at::kFloat: cpu_outer_product<float>(dc, xc, wc, gs, ps, out); break;
    case at::kDouble: cpu_outer_product<double>(dc, xc, wc, gs, ps, out); break;
    default: TORCH_INTERNAL_ASSERT(false, "cpu_outer_product_hist2d: float32 or float64 rows");
  }
}

Hist2d grad_hist2d(at::TensorList per_sample_grads, at::TensorList params, const Hist2dOptions& options) {
  NvtxRange range{kOp};
  const int64_t batch = check_inputs(per_sample_grads, params, options);
  const at::Device device = per_sample_grads.empty() ? at::Device(at::kCPU) : per_sample_grads[0].device();

  // Contiguous views (a copy only for non-contiguous inputs), kept alive for the launch; pairs
  // without elements are left out.
  std::vector<at::Tensor> keep;
  std::vector<tc::Hist2dPair> pairs;
  for (size_t i = 0; i < per_sample_grads.size(); ++i) {
    if (per_sample_grads[i].numel() == 0) continue;
    keep.push_back(per_sample_grads[i].contiguous());
    const void* g = keep.back().data_ptr();
    keep.push_back(params[i].contiguous());
    const void* p = keep.back().data_ptr();
    pairs.push_back(tc::Hist2dPair{g, p, params[i].numel(), to_kernel_dtype(params[i].scalar_type())});
  }

  const tc::HistSpec gs = tc::make_hist_spec(options.nbins_grad, options.maxval_grad);
  const tc::HistSpec ps = tc::make_hist_spec(options.nbins_param, options.maxval_param);
  const auto iopt = at::TensorOptions().device(device).dtype(at::kLong);
  Hist2d out;
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) {
    // The launcher clears both outputs itself.
    out.counts = at::empty({options.nbins_grad, options.nbins_param}, iopt);
    out.nonfinite = at::empty({}, iopt);
    cuda_hist2d(pairs, batch, gs, ps, out, device);
    return out;
  }
#endif
  out.counts = at::zeros({options.nbins_grad, options.nbins_param}, iopt);
  out.nonfinite = at::zeros({}, iopt);
  cpu_hist2d(pairs, batch, gs, ps, out);
  return out;
}

}  // namespace trainscope
