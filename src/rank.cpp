// Rank measures (include/trainscope/rank.h): argument checks, the CPU implementation and the
// adapter that hands CUDA tensors to the torch-free launchers of cuda/rank.cu.
//
// Both devices take the same steps: every matrix goes to float64 (exact for the four input
// dtypes), its Gram matrix (the smaller of ΦᵀΦ and ΦΦᵀ) is placed in the leading block of one
// zero-padded [L, K, K] batch, one eigensolve gives every spectrum, and the same rank_values()
// of cuda/rank.h turns each spectrum into the four measures. The SVD method replaces the Gram
// matrix and eigensolve by singular values (LAPACK on the CPU, cuSOLVER gesvdj on CUDA).
//
// Numerical trouble is a value, never an exception (SPEC.md §5): a matrix holding NaN or ±Inf
// (its Gram matrix, for the Gram method: Φ's NaN and Inf always reach it, and so does a Gram
// matrix that overflows) is zeroed before the solver sees it and flagged, and a flagged matrix, or
// one whose solve failed, gets NaN / −1. On CUDA nothing waits for the device: the flags and the
// solver status stay on the device and the kernel that writes the measures reads them. On the CPU
// a LAPACK solve that does not converge marks its matrix (rank_internal.h).
#include "trainscope/rank.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <c10/util/Exception.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cuda/rank.h"
#include "src/nvtx.h"
#include "src/rank_internal.h"
#include "src/tensor_checks.h"

namespace trainscope {

namespace tc = trainscope::cuda;

namespace {

constexpr const char* kOpMeasures = "trainscope::rank_measures";
constexpr const char* kOpFromSigma = "trainscope::rank_measures_from_singular_values";
constexpr const char* kOpFromGrams = "trainscope::rank_measures_from_grams";

void check_prop(const char* op, double prop) {
  TORCH_CHECK(prop > 0.0 && prop <= 1.0, op, ": prop must be in (0, 1], got ", prop);  // NaN fails too
}

void check_method(const char* op, RankMethod method) {
  TORCH_CHECK(method == RankMethod::kGram || method == RankMethod::kSvd, op, ": method must be RankMethod::kGram or ",
              "RankMethod::kSvd, got ", static_cast<int>(method));
}

// "op: name[i]" or "op: name" (index < 0).
std::string label(const char* name, int64_t index) {
  return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
}

void check_tensor(const char* op, const char* name, int64_t index, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", label(name, index), " is an undefined tensor");
  check_float_dtype(op, name, index, t);
  check_device(op, label(name, index), t.device());
}

void check_same_device(const char* op, const char* name, int64_t index, const at::Tensor& t, at::Device device) {
  TORCH_CHECK(t.device() == device, op, ": ", label(name, index), " is on ", t.device(), " but ", name,
              "[0] is on ", device, "; all tensors must share one device");
}

void check_list(const char* op, const char* name, at::TensorList list, bool square) {
  for (size_t i = 0; i < list.size(); ++i) {
    const int64_t idx = static_cast<int64_t>(i);
    check_tensor(op, name, idx, list[i]);
    TORCH_CHECK(list[i].dim() == 2, op, ": ", label(name, idx), " has ", list[i].dim(), " dimensions (shape ",
                list[i].sizes(), "); each entry must be a matrix [n, m]");
    if (square) {
      TORCH_CHECK(list[i].size(0) == list[i].size(1), op, ": ", label(name, idx), " has shape ", list[i].sizes(),
                  "; a Gram matrix is square");
    }
    check_same_device(op, name, idx, list[i], list[0].device());
  }
}

// float64, contiguous; the four input dtypes convert exactly.
at::Tensor to_f64(const at::Tensor& t) { return t.detach().to(at::kDouble).contiguous(); }

at::Device device_of(at::TensorList list) { return list.empty() ? at::Device(at::kCPU) : list[0].device(); }

RankMeasures alloc_results(int64_t count, at::Device device) {
  const auto f = at::TensorOptions().dtype(at::kDouble).device(device);
  const auto i = at::TensorOptions().dtype(at::kLong).device(device);
  return RankMeasures{at::empty({count}, f), at::empty({count}, i), at::empty({count}, i), at::empty({count}, f)};
}

RankMeasures zero_results(int64_t count, at::Device device) {
  const auto f = at::TensorOptions().dtype(at::kDouble).device(device);
  const auto i = at::TensorOptions().dtype(at::kLong).device(device);
  return RankMeasures{at::zeros({count}, f), at::zeros({count}, i), at::zeros({count}, i), at::zeros({count}, f)};
}

// [1] results → 0-d.
RankMeasures squeeze(const RankMeasures& r) {
  return RankMeasures{r.effective_rank.reshape({}), r.approximate_rank.reshape({}),
                      r.abs_approximate_rank.reshape({}), r.stable_rank.reshape({})};
}

void store(const RankMeasures& out, int64_t i, const tc::RankValues& v) {
  out.effective_rank.data_ptr<double>()[i] = v.effective_rank;
  out.approximate_rank.data_ptr<int64_t>()[i] = v.approximate_rank;
  out.abs_approximate_rank.data_ptr<int64_t>()[i] = v.abs_approximate_rank;
  out.stable_rank.data_ptr<double>()[i] = v.stable_rank;
}

// ---------------------------------------------------------------------------------------------
// The CUDA adapters (a build with CUDA only): cuBLAS and cuSOLVER through cuda/rank.h.

#if defined(TRAINSCOPE_WITH_CUDA)
tc::RankOut rank_out(const RankMeasures& r) {
  return tc::RankOut{r.effective_rank.data_ptr<double>(), r.approximate_rank.data_ptr<int64_t>(),
                     r.abs_approximate_rank.data_ptr<int64_t>(), r.stable_rank.data_ptr<double>()};
}

void throw_status(const char* op, const tc::RankStatus& s) {
  TORCH_CHECK(s.ok(), op, ": ", tc::rank_status_library(s), " call ", s.what, " failed: ", tc::rank_status_name(s));
}

cudaStream_t current_stream(at::Device device) { return at::cuda::getCurrentCUDAStream(device.index()).stream(); }

// cuSOLVER handles of our own: torch keeps its handle getter in libtorch_cuda_linalg, a library
// it loads lazily and that extensions do not link. A handle serves one call at a time, so calls
// lease one from a per-device pool (created on first need, reused, never destroyed: destroying
// handles at process exit races the CUDA runtime's own teardown). The launchers bind it to the
// current stream.
class SolverLease {
 public:
  explicit SolverLease(at::Device device) : device_(device.index()) {
    {
      std::lock_guard<std::mutex> lock(mutex());
      auto& free = pool()[device_];
      if (!free.empty()) {
        handle_ = free.back();
        free.pop_back();
        return;
      }
    }
    const cusolverStatus_t st = cusolverDnCreate(&handle_);
    TORCH_CHECK(st == CUSOLVER_STATUS_SUCCESS, "trainscope: cusolverDnCreate failed with status ",
                static_cast<int>(st));
  }
  ~SolverLease() {
    std::lock_guard<std::mutex> lock(mutex());
    pool()[device_].push_back(handle_);
  }
  SolverLease(const SolverLease&) = delete;
  SolverLease& operator=(const SolverLease&) = delete;
  cusolverDnHandle_t get() const { return handle_; }

 private:
  static std::mutex& mutex() {
    static auto* m = new std::mutex();
    return *m;
  }
  static std::unordered_map<int, std::vector<cusolverDnHandle_t>>& pool() {
    static auto* p = new std::unordered_map<int, std::vector<cusolverDnHandle_t>>();
    return *p;
  }
  int device_;
  cusolverDnHandle_t handle_ = nullptr;
};

// Gram update by cuBLAS syrk on the current stream (write_gram's CUDA half).
void cuda_write_gram(const at::Tensor& x, tc::GramSide side, double* dst_ptr, int64_t ld, double beta) {
  const tc::RankStatus s =
      tc::gram_update_launch(at::cuda::getCurrentCUDABlasHandle(), x.data_ptr<double>(), x.size(0), x.size(1), side,
                             beta, dst_ptr, ld, current_stream(x.device()));
  throw_status(kOpMeasures, s);
}

// The CUDA half of measures_of_padded: the NaN/Inf flags, the eigensolve and the measures, all
// on the stream; the flags and the solver's status stay on the device.
RankMeasures cuda_measures_of_padded(const char* op, at::Tensor batch, const std::vector<int64_t>& dims, double prop,
                                     at::Device device, RankMeasures out) {
  const int64_t L = static_cast<int64_t>(dims.size());
  const int64_t K = batch.size(1);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  at::Tensor w = at::empty({L, K}, batch.options());
  at::Tensor info = at::empty({L}, batch.options().dtype(at::kInt));
  at::Tensor nonfinite = at::empty({L}, batch.options().dtype(at::kInt));
  throw_status(op, tc::zero_nonfinite_launch(batch.data_ptr<double>(), K * K, K * K, L, nonfinite.data_ptr<int>(),
                                             stream));
  const SolverLease solver(device);
  tc::EigvalsArgs args{};
  args.handle = solver.get();
  args.a = batch.data_ptr<double>();
  args.n = K;
  args.batch = L;
  args.dims = dims.data();
  args.w = w.data_ptr<double>();
  args.info = info.data_ptr<int>();
  args.route = tc::EigRoute::kAuto;
  size_t dev_bytes = 0, host_bytes = 0;
  throw_status(op, tc::eigvals_workspace(args, &dev_bytes, &host_bytes));
  // From the caching allocator on the current stream: no device synchronisation.
  at::Tensor dev_ws = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))},
                                at::TensorOptions().dtype(at::kByte).device(device));
  std::vector<unsigned char> host_ws(std::max<size_t>(host_bytes, 1));
  throw_status(op, tc::eigvals_launch(args, dev_ws.data_ptr(), dev_bytes, host_ws.data(), host_bytes, stream));
  throw_status(op, tc::rank_from_eigenvalues_launch(args.w, K, L, dims.data(), args.info, nonfinite.data_ptr<int>(),
                                                    prop, rank_out(out), stream));
  return out;
}

// The CUDA half of measures_by_svd: sigma [L, K] zeros on the device.
RankMeasures cuda_measures_by_svd(const char* op, const std::vector<at::Tensor>& xs, double prop, at::Device device,
                                  at::Tensor sigma, RankMeasures out) {
  const int64_t L = static_cast<int64_t>(xs.size());
  const int64_t K = sigma.size(1);
  // cuSOLVER gesvdj directly: torch's linalg_svdvals checks gesvdj's convergence on the host,
  // which waits for the device.
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  at::Tensor info = at::empty({L}, at::TensorOptions().dtype(at::kInt).device(device));
  at::Tensor nonfinite = at::empty({L}, at::TensorOptions().dtype(at::kInt).device(device));
  std::vector<at::Tensor> work(static_cast<size_t>(L));
  std::vector<tc::SvdvalsArgs> args(static_cast<size_t>(L));
  size_t ws_bytes = 0;
  const SolverLease solver(device);
  const cusolverDnHandle_t handle = solver.get();
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& x = xs[i];
    // gesvdj overwrites its input: always a copy, laid out as a tall column-major matrix (the
    // row-major [r, c] buffer read column-major is Φᵀ, c × r).
    const bool tall_as_is = x.size(1) >= x.size(0);
    work[i] = tall_as_is ? x.clone(at::MemoryFormat::Contiguous) : x.t().clone(at::MemoryFormat::Contiguous);
    tc::SvdvalsArgs& a = args[i];
    a.handle = handle;
    a.a = work[i].data_ptr<double>();
    a.m = tall_as_is ? x.size(1) : x.size(0);
    a.n = tall_as_is ? x.size(0) : x.size(1);
    a.s = sigma.data_ptr<double>() + i * K;
    a.info = info.data_ptr<int>() + i;
    size_t b = 0;
    throw_status(op, tc::svdvals_workspace(a, &b));
    ws_bytes = std::max(ws_bytes, b);
  }
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))},
                            at::TensorOptions().dtype(at::kByte).device(device));
  for (int64_t i = 0; i < L; ++i) {
    // gesvdj sees zeros rather than a NaN; the flag makes the matrix undefined.
    const int64_t count = work[i].numel();
    throw_status(op, tc::zero_nonfinite_launch(count > 0 ? work[i].data_ptr<double>() : nullptr, count, count, 1,
                                               nonfinite.data_ptr<int>() + i, stream));
    throw_status(op, tc::svdvals_launch(args[i], ws.data_ptr(), ws_bytes, stream));
  }
  throw_status(op, tc::rank_from_singular_values_launch(sigma.data_ptr<double>(), K, L, info.data_ptr<int>(),
                                                        nonfinite.data_ptr<int>(), prop, rank_out(out), stream));
  return out;
}
#endif

// ---------------------------------------------------------------------------------------------
// Gram matrices

// The Gram matrix of a float64 [r, c] matrix whose eigenvalues are σ²: ΦᵀΦ when c ≤ r, else ΦΦᵀ.
int64_t gram_size(const at::Tensor& x) { return std::min(x.size(0), x.size(1)); }

// Writes that Gram matrix into `dst` (a [d, d] block, rows ld apart, on x's device): beta = 0
// overwrites, beta = 1 adds (CUDA); the CPU path always overwrites. Full symmetric result.
void write_gram(const at::Tensor& x, tc::GramSide side, at::Tensor dst_block, double* dst_ptr, int64_t ld,
                double beta) {
#if defined(TRAINSCOPE_WITH_CUDA)
  if (x.is_cuda()) return cuda_write_gram(x, side, dst_ptr, ld, beta);
#endif
  at::Tensor g = side == tc::GramSide::kUnits ? at::mm(x.t(), x) : at::mm(x, x.t());
  // The row-major lower triangle mirrored: exactly symmetric, as the CUDA path.
  g = at::tril(g) + at::tril(g, -1).t();
  if (beta == 0.0) {
    dst_block.copy_(g);
  } else {
    dst_block.add_(g);
  }
}

tc::GramSide smaller_side(const at::Tensor& x) {
  return x.size(1) <= x.size(0) ? tc::GramSide::kUnits : tc::GramSide::kRows;
}

// ---------------------------------------------------------------------------------------------
// From a padded batch of Gram matrices to the measures

// batch: [L, K, K] float64 contiguous on `device`, matrix i in its leading dims[i] block, zeros
// elsewhere. Consumed (non-finite matrices are zeroed; the CUDA solver overwrites it).
RankMeasures measures_of_padded(const char* op, at::Tensor batch, const std::vector<int64_t>& dims, double prop,
                                at::Device device) {
  const int64_t L = static_cast<int64_t>(dims.size());
  const int64_t K = L > 0 ? batch.size(1) : 0;
  if (L == 0 || K == 0) return zero_results(L, device);
  TORCH_INTERNAL_ASSERT(batch.is_contiguous() && batch.scalar_type() == at::kDouble);
  RankMeasures out = alloc_results(L, device);
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) return cuda_measures_of_padded(op, batch, dims, prop, device, out);
#endif
  double* bp = batch.data_ptr<double>();
  std::vector<uint8_t> nonfinite(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) nonfinite[i] = tc::zero_if_nonfinite(bp + i * K * K, K * K) ? 1 : 0;
  std::vector<uint8_t> failed;
  const at::Tensor w = detail::eigvalsh_cpu(batch, &failed).contiguous();  // ascending, like cuSOLVER
  const double* wp = w.data_ptr<double>();
  for (int64_t i = 0; i < L; ++i) {
    store(out, i, nonfinite[i] || failed[i] ? tc::undefined_rank_values()
                                            : tc::rank_values_from_eigenvalues(wp + i * K, K, dims[i], prop));
  }
  return out;
}

// Matrices (float64, contiguous, 2-D, one device) by the Gram method.
RankMeasures measures_by_gram(const char* op, const std::vector<at::Tensor>& xs, double prop, at::Device device) {
  const int64_t L = static_cast<int64_t>(xs.size());
  std::vector<int64_t> dims(static_cast<size_t>(L));
  int64_t K = 0;
  for (int64_t i = 0; i < L; ++i) {
    dims[i] = gram_size(xs[i]);
    K = std::max(K, dims[i]);
  }
  if (L == 0 || K == 0) return zero_results(L, device);
  c10::OptionalDeviceGuard guard(device);
  at::Tensor batch = at::zeros({L, K, K}, at::TensorOptions().dtype(at::kDouble).device(device));
  for (int64_t i = 0; i < L; ++i) {
    const int64_t d = dims[i];
    if (d == 0) continue;
    at::Tensor block = batch[i].narrow(0, 0, d).narrow(1, 0, d);
    write_gram(xs[i], smaller_side(xs[i]), block, batch.data_ptr<double>() + i * K * K, K, 0.0);
  }
  return measures_of_padded(op, batch, dims, prop, device);
}

// Matrices (float64, contiguous, 2-D, one device) by SVD.
RankMeasures measures_by_svd(const char* op, const std::vector<at::Tensor>& xs, double prop, at::Device device) {
  const int64_t L = static_cast<int64_t>(xs.size());
  int64_t K = 0;
  for (const at::Tensor& x : xs) K = std::max(K, gram_size(x));
  if (L == 0 || K == 0) return zero_results(L, device);
  // Zero padding after each row's min(r, c) values: zeros add nothing to any measure.
  at::Tensor sigma = at::zeros({L, K}, at::TensorOptions().dtype(at::kDouble).device(device));
  RankMeasures out = alloc_results(L, device);
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) return cuda_measures_by_svd(op, xs, prop, device, sigma, out);
#endif
  // A matrix holding NaN or ±Inf is not handed to LAPACK; one whose SVD does not converge is
  // undefined too.
  std::vector<uint8_t> undefined(static_cast<size_t>(L), 0);
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& x = xs[i];
    if (gram_size(x) == 0) continue;
    TORCH_INTERNAL_ASSERT(x.is_contiguous() && x.scalar_type() == at::kDouble);
    at::Tensor s;
    if (tc::all_finite(x.data_ptr<double>(), x.numel())) {
      s = detail::unless_not_converged([&] { return at::linalg_svdvals(x); });
    }
    if (s.defined()) {
      sigma[i].narrow(0, 0, gram_size(x)).copy_(s);
    } else {
      undefined[i] = 1;
    }
  }
  const double* sp = sigma.data_ptr<double>();
  for (int64_t i = 0; i < L; ++i) {
    store(out, i, undefined[i] ? tc::undefined_rank_values()
                               : tc::rank_values_from_singular_values(sp + i * K, K, prop));
  }
  return out;
}

RankMeasures measures_of(const char* op, const std::vector<at::Tensor>& xs, const RankOptions& o, at::Device device) {
  return o.method == RankMethod::kSvd ? measures_by_svd(op, xs, o.prop, device)
                                      : measures_by_gram(op, xs, o.prop, device);
}

// [n, C, *spatial] or [n, units] → Φ [n · Π spatial, C], float64, contiguous.
at::Tensor rows_of(const at::Tensor& acts) {
  const at::Tensor a = acts.detach();
  const at::Tensor rows = a.dim() == 2 ? a : a.movedim(1, -1).reshape({-1, a.size(1)});
  return rows.to(at::kDouble).contiguous();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

namespace detail {

at::Tensor unless_not_converged(const std::function<at::Tensor()>& solve) {
  try {
    return solve();
  } catch (const c10::LinAlgError&) {
    return at::Tensor();
  }
}

at::Tensor eigvalsh_cpu(const at::Tensor& batch, std::vector<uint8_t>* failed, const BatchEigvalsh& eigvalsh) {
  const auto solve = [&](const at::Tensor& a) { return eigvalsh ? eigvalsh(a) : at::linalg_eigvalsh(a); };
  const int64_t L = batch.size(0);
  failed->assign(static_cast<size_t>(L), 0);
  at::Tensor w = unless_not_converged([&] { return solve(batch); });
  if (w.defined()) return w;
  // LAPACK names one failing matrix; the others may be fine: each alone.
  w = at::zeros({L, batch.size(-1)}, batch.options());
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor wi = unless_not_converged([&] { return solve(batch.narrow(0, i, 1)); });
    if (wi.defined()) {
      w.narrow(0, i, 1).copy_(wi);
    } else {
      (*failed)[i] = 1;
    }
  }
  return w;
}

}  // namespace detail

RankMethod parse_rank_method(const std::string& name, const char* arg) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "gram") return RankMethod::kGram;
  if (lower == "svd") return RankMethod::kSvd;
  TORCH_CHECK(false, "trainscope: ", arg, " must be \"gram\" or \"svd\", got \"", name, "\"");
  return RankMethod::kGram;  // not reached
}

const char* rank_method_name(RankMethod method) {
  switch (method) {
    case RankMethod::kGram: return "gram";
    case RankMethod::kSvd: return "svd";
  }
  return "unknown";
}

RankMeasures rank_measures(const at::Tensor& matrices, const RankOptions& options) {
  NvtxRange range{kOpMeasures};
  check_prop(kOpMeasures, options.prop);
  check_method(kOpMeasures, options.method);
  check_tensor(kOpMeasures, "matrices", -1, matrices);
  TORCH_CHECK(matrices.dim() == 2 || matrices.dim() == 3, kOpMeasures, ": matrices has ", matrices.dim(),
              " dimensions (shape ", matrices.sizes(), "); expected a matrix [n, m] or a batch [L, n, m]");
  const at::Device device = matrices.device();
  c10::OptionalDeviceGuard guard(device);
  const at::Tensor x = to_f64(matrices);
  if (x.dim() == 2) return squeeze(measures_of(kOpMeasures, {x}, options, device));
  std::vector<at::Tensor> xs;
  xs.reserve(static_cast<size_t>(x.size(0)));
  for (int64_t i = 0; i < x.size(0); ++i) xs.push_back(x[i]);  // contiguous views
  return measures_of(kOpMeasures, xs, options, device);
}

RankMeasures rank_measures(at::TensorList matrices, const RankOptions& options) {
  NvtxRange range{kOpMeasures};
  check_prop(kOpMeasures, options.prop);
  check_method(kOpMeasures, options.method);
  check_list(kOpMeasures, "matrices", matrices, /*square=*/false);
  const at::Device device = device_of(matrices);
  c10::OptionalDeviceGuard guard(device);
  std::vector<at::Tensor> xs;
  xs.reserve(matrices.size());
  for (const at::Tensor& m : matrices) xs.push_back(to_f64(m));
  return measures_of(kOpMeasures, xs, options, device);
}

at::Tensor effective_rank(const at::Tensor& matrices, RankMethod method) {
  return rank_measures(matrices, RankOptions{0.99, method}).effective_rank;
}

at::Tensor approximate_rank(const at::Tensor& matrices, double prop, RankMethod method) {
  return rank_measures(matrices, RankOptions{prop, method}).approximate_rank;
}

at::Tensor abs_approximate_rank(const at::Tensor& matrices, double prop, RankMethod method) {
  return rank_measures(matrices, RankOptions{prop, method}).abs_approximate_rank;
}

at::Tensor stable_rank(const at::Tensor& matrices, RankMethod method) {
  return rank_measures(matrices, RankOptions{0.99, method}).stable_rank;
}

RankMeasures rank_measures_from_singular_values(const at::Tensor& sigma, double prop) {
  NvtxRange range{kOpFromSigma};
  check_prop(kOpFromSigma, prop);
  check_tensor(kOpFromSigma, "sigma", -1, sigma);
  TORCH_CHECK(sigma.dim() == 1 || sigma.dim() == 2, kOpFromSigma, ": sigma has ", sigma.dim(),
              " dimensions (shape ", sigma.sizes(), "); expected [k] or [L, k]");
  const at::Device device = sigma.device();
  c10::OptionalDeviceGuard guard(device);
  const at::Tensor s = to_f64(sigma).reshape({sigma.dim() == 1 ? 1 : sigma.size(0), sigma.size(-1)});
  const int64_t L = s.size(0), k = s.size(1);
  RankMeasures out = alloc_results(L, device);
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) {
    throw_status(kOpFromSigma, tc::rank_from_singular_values_launch(s.data_ptr<double>(), k, L, nullptr, nullptr,
                                                                    prop, rank_out(out), current_stream(device)));
  }
#endif
  if (device.is_cpu()) {
    const double* sp = s.data_ptr<double>();
    for (int64_t i = 0; i < L; ++i) store(out, i, tc::rank_values_from_singular_values(sp + i * k, k, prop));
  }
  return sigma.dim() == 1 ? squeeze(out) : out;
}

RankMeasures rank_measures_from_grams(at::TensorList grams, double prop) {
  NvtxRange range{kOpFromGrams};
  check_prop(kOpFromGrams, prop);
  check_list(kOpFromGrams, "grams", grams, /*square=*/true);
  const at::Device device = device_of(grams);
  c10::OptionalDeviceGuard guard(device);
  const int64_t L = static_cast<int64_t>(grams.size());
  std::vector<int64_t> dims(static_cast<size_t>(L));
  int64_t K = 0;
  for (int64_t i = 0; i < L; ++i) {
    dims[i] = grams[i].size(0);
    K = std::max(K, dims[i]);
  }
  if (L == 0 || K == 0) return zero_results(L, device);
  at::Tensor batch = at::zeros({L, K, K}, at::TensorOptions().dtype(at::kDouble).device(device));
  for (int64_t i = 0; i < L; ++i) {
    if (dims[i] > 0) batch[i].narrow(0, 0, dims[i]).narrow(1, 0, dims[i]).copy_(grams[i].detach());
  }
  return measures_of_padded(kOpFromGrams, batch, dims, prop, device);
}

// ---------------------------------------------------------------------------------------------
// GramAccumulator

namespace {
constexpr const char* kOpAdd = "trainscope::GramAccumulator::add";
constexpr const char* kOpMeasuresAcc = "trainscope::GramAccumulator::measures";
}  // namespace

GramAccumulator::GramAccumulator(RankMethod method) : method_(method) {
  check_method("trainscope::GramAccumulator", method);
}

void GramAccumulator::add(const at::Tensor& acts) {
  NvtxRange range{kOpAdd};
  check_tensor(kOpAdd, "acts", -1, acts);
  TORCH_CHECK(acts.dim() >= 2, kOpAdd, ": acts has ", acts.dim(), " dimensions (shape ", acts.sizes(),
              "); expected [n, units] or [n, C, *spatial]");
  const int64_t units = acts.size(1);
  if (units_ >= 0) {
    TORCH_CHECK(units == units_, kOpAdd, ": acts has ", units, " units (dimension 1 of shape ", acts.sizes(),
                ") but earlier batches had ", units_);
    TORCH_CHECK(acts.device() == device_, kOpAdd, ": acts is on ", acts.device(), " but earlier batches were on ",
                device_);
  }
  c10::OptionalDeviceGuard guard(acts.device());
  at::Tensor x = rows_of(acts);
  // A float64 contiguous input comes back as itself: keep a copy the caller cannot change.
  if (x.is_alias_of(acts)) x = x.clone();
  if (units_ < 0) {
    units_ = units;
    device_ = acts.device();
  }
  observations_ += x.size(0);
  if (x.size(0) == 0) return;  // a batch of zero rows (a rank with no probe data left) adds nothing

  if (!keeps_rows()) {
    write_gram(x, tc::GramSide::kUnits, unit_gram_, unit_gram_.data_ptr<double>(), units_, 1.0);
    return;
  }
  row_batches_.push_back(x);
  if (method_ == RankMethod::kSvd || observations_ < units_) return;
  // As many rows as units: ΦᵀΦ is no larger than ΦΦᵀ from here on.
  const at::Tensor all = rows();
  at::Tensor g = at::zeros({units_, units_}, all.options());
  write_gram(all, tc::GramSide::kUnits, g, g.data_ptr<double>(), units_, 0.0);
  unit_gram_ = g;
  row_batches_.clear();
}

at::Tensor GramAccumulator::rows() const {
  TORCH_CHECK(keeps_rows(), "trainscope::GramAccumulator::rows: the rows are not kept once as many rows as units ",
              "have arrived (RankMethod::kGram); use gram() or unit_gram()");
  const auto opt = at::TensorOptions().dtype(at::kDouble).device(device_);
  if (row_batches_.empty()) return at::empty({0, std::max<int64_t>(units_, 0)}, opt);
  if (row_batches_.size() == 1) return row_batches_[0];
  return at::cat(row_batches_, 0);
}

at::Tensor GramAccumulator::gram() const {
  if (!keeps_rows()) return unit_gram_.clone();
  c10::OptionalDeviceGuard guard(device_);
  const at::Tensor x = rows();
  const int64_t d = gram_size(x);
  at::Tensor g = at::zeros({d, d}, x.options());
  if (d > 0) write_gram(x, smaller_side(x), g, g.data_ptr<double>(), d, 0.0);
  return g;
}

at::Tensor GramAccumulator::unit_gram() const {
  if (!keeps_rows()) return unit_gram_.clone();
  c10::OptionalDeviceGuard guard(device_);
  const at::Tensor x = rows();
  const int64_t u = x.size(1);
  at::Tensor g = at::zeros({u, u}, x.options());
  if (u > 0) write_gram(x, tc::GramSide::kUnits, g, g.data_ptr<double>(), u, 0.0);
  return g;
}

RankMeasures GramAccumulator::measures(double prop) const {
  NvtxRange range{kOpMeasuresAcc};
  check_prop(kOpMeasuresAcc, prop);
  c10::OptionalDeviceGuard guard(device_);
  if (method_ == RankMethod::kSvd) return squeeze(measures_by_svd(kOpMeasuresAcc, {rows()}, prop, device_));
  if (keeps_rows()) return squeeze(measures_by_gram(kOpMeasuresAcc, {rows()}, prop, device_));
  // The eigensolve overwrites its input: a copy of the accumulated matrix.
  const at::Tensor batch = unit_gram_.unsqueeze(0).clone(at::MemoryFormat::Contiguous);
  return squeeze(measures_of_padded(kOpMeasuresAcc, batch, {units_}, prop, device_));
}

void GramAccumulator::reset() {
  observations_ = 0;
  units_ = -1;
  device_ = at::Device(at::kCPU);
  row_batches_.clear();
  unit_gram_ = at::Tensor();
}

}  // namespace trainscope
