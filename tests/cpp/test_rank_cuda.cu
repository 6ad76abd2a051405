// The torch-free CUDA launchers of cuda/rank.h against host references: the syrk Gram update
// (both sides, overwrite and accumulate, a padded leading dimension), the eigensolve on both
// routes against known spectra, gesvdj singular values, the rank kernel against the host
// rank_values(), solver status and non-finite flags turning results undefined, NaN and Inf
// matrices flagged and zeroed and then undefined through every solver, the batched eigensolve
// cut into calls under cuSOLVER's element limit, the cuBLAS stream left alone when already set,
// which launchers return before the device is done, and argument errors. Own cuBLAS and
// cuSOLVER handles; every test skips without a GPU.
#include <gtest/gtest.h>

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/rank.h"
#include "tests/cpp/cuda_test_util.h"

namespace {

using namespace trainscope_test;
namespace tc = trainscope::cuda;

#define ASSERT_RANK_OK(expr)                                                                     \
  do {                                                                                           \
    const tc::RankStatus s_ = (expr);                                                            \
    ASSERT_TRUE(s_.ok()) << #expr << ": " << tc::rank_status_library(s_) << " " << s_.what << ": " \
                         << tc::rank_status_name(s_);                                            \
  } while (0)

class RankCudaTest : public CudaStreamTest {
 protected:
  void SetUp() override {
    CudaStreamTest::SetUp();
    if (IsSkipped()) return;
    ASSERT_EQ(cublasCreate(&blas_), CUBLAS_STATUS_SUCCESS);
    ASSERT_EQ(cusolverDnCreate(&solver_), CUSOLVER_STATUS_SUCCESS);
  }
  void TearDown() override {
    if (blas_ != nullptr) cublasDestroy(blas_);
    if (solver_ != nullptr) cusolverDnDestroy(solver_);
    CudaStreamTest::TearDown();
  }

  template <typename T>
  void upload(DeviceMemory& d, const std::vector<T>& h) {
    ASSERT_CUDA_OK(d.allocate(h.size() * sizeof(T)));
    ASSERT_CUDA_OK(cudaMemcpyAsync(d.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice, stream_));
  }
  template <typename T>
  std::vector<T> download(const DeviceMemory& d, size_t count) {
    std::vector<T> h(count);
    EXPECT_CUDA_OK(cudaMemcpyAsync(h.data(), d.get(), count * sizeof(T), cudaMemcpyDeviceToHost, stream_));
    EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
    return h;
  }

  // A batch of `dims.size()` symmetric n × n slots, matrix b in its leading dims[b] block:
  // buffers (w and info poisoned), arguments and workspaces of one eigensolve.
  struct EigLaunch {
    std::vector<int64_t> dims;
    DeviceMemory a, w, info, workspace;
    std::vector<unsigned char> host_workspace;
    tc::EigvalsArgs args{};
    size_t dev_bytes = 0, host_bytes = 0;
  };
  void prepare_eig(const std::vector<double>& a, int64_t n, const std::vector<int64_t>& dims, tc::EigRoute route,
                   int64_t max_elements_per_call, EigLaunch* L) {
    const int64_t batch = static_cast<int64_t>(dims.size());
    L->dims = dims;
    upload(L->a, a);
    ASSERT_CUDA_OK(L->w.allocate(sizeof(double) * batch * n));
    ASSERT_CUDA_OK(L->info.allocate(sizeof(int) * batch));
    ASSERT_CUDA_OK(cudaMemsetAsync(L->w.get(), 0x7f, sizeof(double) * batch * n, stream_));
    ASSERT_CUDA_OK(cudaMemsetAsync(L->info.get(), 0x7f, sizeof(int) * batch, stream_));
    L->args = tc::EigvalsArgs{solver_, L->a.get<double>(), n, batch, L->dims.data(), L->w.get<double>(),
                              L->info.get<int>(), route, max_elements_per_call};
    ASSERT_RANK_OK(tc::eigvals_workspace(L->args, &L->dev_bytes, &L->host_bytes));
    ASSERT_CUDA_OK(L->workspace.allocate(std::max<size_t>(L->dev_bytes, 1)));
    L->host_workspace.assign(std::max<size_t>(L->host_bytes, 1), 0);
  }
  tc::RankStatus launch_eig(EigLaunch& L) {
    return tc::eigvals_launch(L.args, L.workspace.get(), L.dev_bytes, L.host_workspace.data(), L.host_bytes, stream_);
  }
  // Every slot's n values: the padding's zeros first, then the spectrum ascending (lambdas[b],
  // sorted), each within rel · n · (1 + λ_max); info 0.
  void expect_spectra(EigLaunch& L, const std::vector<std::vector<double>>& lambdas, double rel,
                      const std::string& context) {
    const int64_t n = L.args.n, batch = L.args.batch;
    const std::vector<double> w = download<double>(L.w, static_cast<size_t>(batch * n));
    const std::vector<int> info = download<int>(L.info, static_cast<size_t>(batch));
    Mismatches bad;
    for (int64_t b = 0; b < batch; ++b) {
      if (info[b] != 0) bad.add("info[", b, "] = ", info[b]);
      const double lmax = lambdas[b].empty() ? 0.0 : lambdas[b].back();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = i - (n - L.dims[b]);  // right-aligned: padding first
        const double want = j >= 0 ? lambdas[b][j] : 0.0;
        if (!(std::fabs(w[b * n + i] - want) <= rel * n * (1.0 + lmax))) {
          bad.add("w[", b, ",", i, "] = ", w[b * n + i], " want ", want);
        }
      }
    }
    bad.expect_none(context);
  }

  // gesvdj's singular values of one column-major m × n matrix: buffers, arguments, workspace.
  struct SvdLaunch {
    DeviceMemory a, s, info, workspace;
    tc::SvdvalsArgs args{};
    size_t bytes = 0;
  };
  void prepare_svd(const std::vector<double>& col_major, int64_t m, int64_t n, SvdLaunch* L) {
    upload(L->a, col_major);
    ASSERT_CUDA_OK(L->s.allocate(sizeof(double) * std::min(m, n)));
    ASSERT_CUDA_OK(L->info.allocate(sizeof(int)));
    L->args = tc::SvdvalsArgs{solver_, L->a.get<double>(), m, n, L->s.get<double>(), L->info.get<int>()};
    ASSERT_RANK_OK(tc::svdvals_workspace(L->args, &L->bytes));
    ASSERT_CUDA_OK(L->workspace.allocate(std::max<size_t>(L->bytes, 1)));
  }
  tc::RankStatus launch_svd(const SvdLaunch& L) {
    return tc::svdvals_launch(L.args, L.workspace.get(), L.bytes, stream_);
  }

  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
};

std::vector<double> random_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<double> m(static_cast<size_t>(rows * cols));
  for (double& v : m) v = nd(rng);
  return m;
}

// Q diag(λ) Qᵀ (row-major n × n) with Q a product of random Householder reflections.
std::vector<double> symmetric_with_eigenvalues(const std::vector<double>& lambda, uint32_t seed) {
  const int64_t n = static_cast<int64_t>(lambda.size());
  std::vector<double> a(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) a[i * n + i] = lambda[i];
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  for (int r = 0; r < 3; ++r) {
    std::vector<double> v(static_cast<size_t>(n));
    double vv = 0;
    for (double& x : v) {
      x = nd(rng);
      vv += x * x;
    }
    // A ← H A H, H = I − 2 v vᵀ / vᵀv.
    std::vector<double> av(static_cast<size_t>(n), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) av[i] += a[i * n + j] * v[j];
    double vav = 0;
    for (int64_t i = 0; i < n; ++i) vav += v[i] * av[i];
    const double c = 2.0 / vv;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        a[i * n + j] += -c * v[i] * av[j] - c * av[i] * v[j] + c * c * vav * v[i] * v[j];
  }
  return a;
}

// Matrices with the spectra lambdas[b] (sorted in place), each in the leading lambdas[b].size()
// block of an n × n zero-padded slot, row-major [batch, n, n].
std::vector<double> padded_symmetric(std::vector<std::vector<double>>& lambdas, int64_t n, uint32_t seed) {
  std::vector<double> a(lambdas.size() * static_cast<size_t>(n * n), 0.0);
  for (size_t b = 0; b < lambdas.size(); ++b) {
    const int64_t d = static_cast<int64_t>(lambdas[b].size());
    const std::vector<double> g = symmetric_with_eigenvalues(lambdas[b], static_cast<uint32_t>(seed + b));
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) a[b * n * n + i * n + j] = g[i * d + j];
    std::sort(lambdas[b].begin(), lambdas[b].end());
  }
  return a;
}

std::vector<int64_t> dims_of(const std::vector<std::vector<double>>& lambdas) {
  std::vector<int64_t> dims;
  for (const auto& l : lambdas) dims.push_back(static_cast<int64_t>(l.size()));
  return dims;
}

TEST_F(RankCudaTest, GramUpdateBothSidesAndAccumulate) {
  const int64_t rows = 37, cols = 23;
  const std::vector<double> phi = random_matrix(rows, cols, 1);
  const std::vector<double> phi2 = random_matrix(rows, cols, 2);
  DeviceMemory dphi, dphi2;
  upload(dphi, phi);
  upload(dphi2, phi2);
  for (const tc::GramSide side : {tc::GramSide::kUnits, tc::GramSide::kRows}) {
    const int64_t n = side == tc::GramSide::kUnits ? cols : rows;
    const int64_t ld = n + 5;  // the leading block of a padded matrix
    DeviceMemory dc;
    std::vector<double> init(static_cast<size_t>(n * ld), kNaN);  // beta = 0 must not read these
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = n; j < ld; ++j) init[i * ld + j] = 42.0;  // outside the block: untouched
    upload(dc, init);
    ASSERT_RANK_OK(tc::gram_update_launch(blas_, dphi.get<double>(), rows, cols, side, 0.0, dc.get<double>(), ld, stream_));
    ASSERT_RANK_OK(tc::gram_update_launch(blas_, dphi2.get<double>(), rows, cols, side, 1.0, dc.get<double>(), ld, stream_));
    const std::vector<double> c = download<double>(dc, init.size());
    Mismatches bad;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double want = 0;
        if (side == tc::GramSide::kUnits) {
          for (int64_t r = 0; r < rows; ++r) want += phi[r * cols + i] * phi[r * cols + j] + phi2[r * cols + i] * phi2[r * cols + j];
        } else {
          for (int64_t q = 0; q < cols; ++q) want += phi[i * cols + q] * phi[j * cols + q] + phi2[i * cols + q] * phi2[j * cols + q];
        }
        if (!(std::fabs(c[i * ld + j] - want) <= 1e-12 * (1.0 + std::fabs(want)))) bad.add(i, ",", j, ": ", c[i * ld + j], " want ", want);
        if (c[i * ld + j] != c[j * ld + i]) bad.add(i, ",", j, ": not symmetric");
      }
      for (int64_t j = n; j < ld; ++j) {
        if (c[i * ld + j] != 42.0) bad.add(i, ",", j, ": padding written");
      }
    }
    bad.expect_none(side == tc::GramSide::kUnits ? "PhiT Phi" : "Phi PhiT");
  }
}

TEST_F(RankCudaTest, EigensolveBothRoutesAgainstKnownSpectra) {
  // Three matrices of sizes 12, 5, 0 padded to 12, and the same at size 40 (above the batched
  // threshold) to give kAuto both routes.
  for (const int64_t n : {int64_t{12}, int64_t{40}}) {
    std::vector<std::vector<double>> lambdas(3);
    for (int b = 0; b < 3; ++b) {
      for (int64_t i = 0; i < (b == 0 ? n : b == 1 ? 5 : 0); ++i) {
        lambdas[b].push_back(std::pow(10.0, -0.15 * static_cast<double>(i)) * (b + 1));
      }
    }
    const std::vector<double> a = padded_symmetric(lambdas, n, 10);
    for (const tc::EigRoute route : {tc::EigRoute::kBatched, tc::EigRoute::kPerMatrix, tc::EigRoute::kAuto}) {
      EigLaunch L;
      ASSERT_NO_FATAL_FAILURE(prepare_eig(a, n, dims_of(lambdas), route, 0, &L));
      ASSERT_RANK_OK(launch_eig(L));
      expect_spectra(L, lambdas, 1e-12, "n = " + std::to_string(n) + " route " + std::to_string(static_cast<int>(route)));
    }
  }
}

// The batched route in several cuSOLVER calls: a limit of 3 matrices' elements per call cuts 8
// matrices into calls of 3, 3 and 2; every matrix's spectrum must come out as in one call.
TEST_F(RankCudaTest, BatchedEigensolveInSeveralCallsUnderTheElementLimit) {
  const int64_t n = 6, batch = 8;
  std::vector<std::vector<double>> lambdas(batch);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < 1 + b % n; ++i) {
      lambdas[b].push_back(0.5 + static_cast<double>(b) + 0.37 * static_cast<double>(i * i));
    }
  }
  const std::vector<double> a = padded_symmetric(lambdas, n, 50);
  ASSERT_EQ(tc::syev_batched_chunk(n, batch, 3 * n * n), 3);
  EigLaunch L;
  ASSERT_NO_FATAL_FAILURE(prepare_eig(a, n, dims_of(lambdas), tc::EigRoute::kBatched, 3 * n * n, &L));
  ASSERT_RANK_OK(launch_eig(L));
  expect_spectra(L, lambdas, 1e-12, "batched in calls of 3");
}

// A handle already on the stream keeps it (cublasSetStream would also reset the workspace a
// caller such as PyTorch configured); a handle on another stream is moved.
TEST_F(RankCudaTest, CublasStreamIsSetOnlyWhenItDiffers) {
  bool changed = true;
  ASSERT_EQ(cublasSetStream(blas_, stream_), CUBLAS_STATUS_SUCCESS);
  ASSERT_RANK_OK(tc::cublas_use_stream(blas_, stream_, &changed));
  EXPECT_FALSE(changed);
  cudaStream_t other = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  ASSERT_RANK_OK(tc::cublas_use_stream(blas_, other, &changed));
  EXPECT_TRUE(changed);
  cudaStream_t now = nullptr;
  ASSERT_EQ(cublasGetStream(blas_, &now), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(now, other);
  ASSERT_RANK_OK(tc::cublas_use_stream(blas_, other, &changed));
  EXPECT_FALSE(changed);
  // gram_update_launch goes through it: the handle ends on the launch's stream.
  const std::vector<double> phi = random_matrix(7, 5, 9);
  DeviceMemory dphi, dc;
  upload(dphi, phi);
  ASSERT_CUDA_OK(dc.allocate(sizeof(double) * 25));
  ASSERT_RANK_OK(tc::gram_update_launch(blas_, dphi.get<double>(), 7, 5, tc::GramSide::kUnits, 0.0, dc.get<double>(), 5,
                                        stream_));
  ASSERT_EQ(cublasGetStream(blas_, &now), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(now, stream_);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  EXPECT_CUDA_OK(cudaStreamDestroy(other));
}

// Which launchers return while the stream is still busy. A kernel spinning for about half a
// second runs first; a launcher that waited for the device inside returns after it finished.
// The Gram update, the batched eigensolve and the rank kernels are ours and must never wait. The
// per-matrix syevd and gesvdj are cuSOLVER's: their outcome is recorded (the test's properties,
// shown in its XML report and printed), and the README's "What waits for the device" states it.
TEST_F(RankCudaTest, LaunchesDoNotWaitForTheStream) {
  const int64_t rows = 300, cols = 40;
  const std::vector<double> phi = random_matrix(rows, cols, 21);
  DeviceMemory dphi, dgram;
  upload(dphi, phi);
  ASSERT_CUDA_OK(dgram.allocate(sizeof(double) * cols * cols));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  auto busy_then = [&](const char* what, const std::function<tc::RankStatus()>& launch) -> bool {
    EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
    spin_for_cycles<<<1, 1, 0, stream_>>>(static_cast<long long>(1) << 30);
    EXPECT_CUDA_OK(cudaGetLastError());
    const tc::RankStatus st = launch();
    EXPECT_TRUE(st.ok()) << what << ": " << tc::rank_status_library(st) << " " << st.what;
    const bool returned_early = cudaStreamQuery(stream_) == cudaErrorNotReady;
    EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
    return returned_early;
  };
  // Warm up handles and workspaces (first calls may load modules, which waits).
  auto gram = [&] {
    return tc::gram_update_launch(blas_, dphi.get<double>(), rows, cols, tc::GramSide::kUnits, 0.0, dgram.get<double>(),
                                  cols, stream_);
  };
  busy_then("gram_update (warm-up)", gram);
  EXPECT_TRUE(busy_then("gram_update", gram)) << "the Gram update waited for the stream";
  DeviceMemory dflags;
  ASSERT_CUDA_OK(dflags.allocate(sizeof(int)));
  auto zero = [&] {
    return tc::zero_nonfinite_launch(dgram.get<double>(), cols * cols, cols * cols, 1, dflags.get<int>(), stream_);
  };
  busy_then("zero_nonfinite (warm-up)", zero);
  EXPECT_TRUE(busy_then("zero_nonfinite", zero)) << "the non-finite check waited for the stream";

  for (const int64_t n : {int64_t{16}, int64_t{40}}) {  // batched route, per-matrix syevd route
    std::vector<std::vector<double>> lambdas(2);
    for (int b = 0; b < 2; ++b) {
      for (int64_t i = 0; i < (b == 0 ? n : n / 2); ++i) lambdas[b].push_back(1.0 + static_cast<double>(i));
    }
    EigLaunch L;
    ASSERT_NO_FATAL_FAILURE(prepare_eig(padded_symmetric(lambdas, n, 70), n, dims_of(lambdas), tc::EigRoute::kAuto, 0, &L));
    DeviceMemory de, dr, dab, dst;
    for (DeviceMemory* m : {&de, &dr, &dab, &dst}) ASSERT_CUDA_OK(m->allocate(sizeof(double) * 2));
    auto solve = [&] { return launch_eig(L); };
    const tc::RankOut out{de.get<double>(), dr.get<int64_t>(), dab.get<int64_t>(), dst.get<double>()};
    auto ranks = [&] {
      return tc::rank_from_eigenvalues_launch(L.w.get<double>(), n, 2, L.dims.data(), L.info.get<int>(), nullptr,
                                              0.99, out, stream_);
    };
    busy_then("eigvals (warm-up)", solve);
    busy_then("rank_from_eigenvalues (warm-up)", ranks);
    const bool batched = tc::resolve_eig_route(tc::EigRoute::kAuto, n) == tc::EigRoute::kBatched;
    const bool solve_early = busy_then("eigvals", solve);
    EXPECT_TRUE(busy_then("rank_from_eigenvalues", ranks)) << "the rank kernel's launch waited for the stream";
    if (batched) {
      EXPECT_TRUE(solve_early) << "the batched eigensolve (cusolverDnXsyevBatched) waited for the stream";
    }
    const std::string key = batched ? "syevBatched_returns_before_the_device" : "syevd_returns_before_the_device";
    RecordProperty(key, solve_early ? "yes" : "no");
    std::printf("[rank launch] %s (n = %lld): %s\n", batched ? "cusolverDnXsyevBatched" : "cusolverDnXsyevd",
                static_cast<long long>(n), solve_early ? "returns before the device is done" : "WAITS for the device");
  }

  // gesvdj on one matrix.
  SvdLaunch L;
  ASSERT_NO_FATAL_FAILURE(prepare_svd(random_matrix(60, 20, 23), 60, 20, &L));
  auto svd = [&] { return launch_svd(L); };
  busy_then("svdvals (warm-up)", svd);
  const bool svd_early = busy_then("svdvals", svd);
  RecordProperty("gesvdj_returns_before_the_device", svd_early ? "yes" : "no");
  std::printf("[rank launch] cusolverDnDgesvdj: %s\n", svd_early ? "returns before the device is done"
                                                                  : "WAITS for the device");
}

TEST_F(RankCudaTest, SvdvalsAgainstKnownSpectrum) {
  // A = diag(σ) rotated by reflections on both sides is awkward for non-square: use a tall
  // matrix with orthogonal columns from a symmetric eigenbasis, σ_i = 2^-i.
  const int64_t n = 9;
  const std::vector<double> q = symmetric_with_eigenvalues(std::vector<double>{1, -1, 1, -1, 1, -1, 1, -1, 1}, 5);
  // q is Q diag(±1) Qᵀ: orthogonal. Column-major m × n with m = n: A = q · diag(σ).
  std::vector<double> a(static_cast<size_t>(n * n));
  std::vector<double> sigma;
  for (int64_t j = 0; j < n; ++j) sigma.push_back(std::ldexp(1.0, -static_cast<int>(j)));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < n; ++i) a[j * n + i] = q[i * n + j] * sigma[j];
  SvdLaunch L;
  ASSERT_NO_FATAL_FAILURE(prepare_svd(a, n, n, &L));
  ASSERT_RANK_OK(launch_svd(L));
  const std::vector<double> s = download<double>(L.s, n);
  EXPECT_EQ(download<int>(L.info, 1)[0], 0);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(s[i], sigma[i], 1e-12) << i;
}

TEST_F(RankCudaTest, RankKernelEqualsHostFunction) {
  const int64_t n = 50, batch = 300;  // more than kRankGroup: two launches
  std::vector<double> w(static_cast<size_t>(batch * n));
  std::vector<int64_t> dims(static_cast<size_t>(batch));
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  for (int64_t b = 0; b < batch; ++b) {
    dims[b] = b % (n + 1);
    std::vector<double> row(static_cast<size_t>(n));
    for (double& v : row) v = b % 7 == 0 ? 0.0 : std::pow(ud(rng), 4.0);
    std::sort(row.begin(), row.end());
    std::copy(row.begin(), row.end(), w.begin() + b * n);
  }
  std::vector<int> info(static_cast<size_t>(batch), 0);
  info[17] = 3;  // a failed solve
  std::vector<int> flags(static_cast<size_t>(batch), 0);
  flags[23] = flags[290] = 1;  // non-finite input (290: in the second launch's group)
  DeviceMemory dw, dinfo, dflags, de, da, dab, dst;
  upload(dw, w);
  upload(dinfo, info);
  upload(dflags, flags);
  ASSERT_CUDA_OK(de.allocate(sizeof(double) * batch));
  ASSERT_CUDA_OK(da.allocate(sizeof(int64_t) * batch));
  ASSERT_CUDA_OK(dab.allocate(sizeof(int64_t) * batch));
  ASSERT_CUDA_OK(dst.allocate(sizeof(double) * batch));
  const tc::RankOut out{de.get<double>(), da.get<int64_t>(), dab.get<int64_t>(), dst.get<double>()};
  for (const double prop : {0.5, 0.99, 1.0}) {
    ASSERT_RANK_OK(tc::rank_from_eigenvalues_launch(dw.get<double>(), n, batch, dims.data(), dinfo.get<int>(),
                                                    dflags.get<int>(), prop, out, stream_));
    const auto e = download<double>(de, batch);
    const auto a = download<int64_t>(da, batch);
    const auto ab = download<int64_t>(dab, batch);
    const auto st = download<double>(dst, batch);
    Mismatches bad;
    for (int64_t b = 0; b < batch; ++b) {
      const tc::RankValues want = b == 17 || flags[b] != 0
                                      ? tc::undefined_rank_values()
                                      : tc::rank_values_from_eigenvalues(w.data() + b * n, n, dims[b], prop);
      if (!close_enough(e[b], want.effective_rank, 1e-13)) bad.add(b, ": erank ", e[b], " want ", want.effective_rank);
      if (!close_enough(st[b], want.stable_rank, 1e-13)) bad.add(b, ": srank ", st[b], " want ", want.stable_rank);
      if (a[b] != want.approximate_rank) bad.add(b, ": arank ", a[b], " want ", want.approximate_rank);
      if (ab[b] != want.abs_approximate_rank) bad.add(b, ": abs ", ab[b], " want ", want.abs_approximate_rank);
    }
    bad.expect_none("eigenvalues, prop " + std::to_string(prop));
  }
  // Singular values: sqrt of the same rows, reversed.
  std::vector<double> s(w.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n; ++i) s[b * n + i] = std::sqrt(w[b * n + n - 1 - i]);
  DeviceMemory ds;
  upload(ds, s);
  ASSERT_RANK_OK(tc::rank_from_singular_values_launch(ds.get<double>(), n, batch, nullptr, dflags.get<int>(), 0.9, out,
                                                      stream_));
  const auto e = download<double>(de, batch);
  const auto a = download<int64_t>(da, batch);
  Mismatches bad;
  for (int64_t b = 0; b < batch; ++b) {
    const tc::RankValues want = flags[b] != 0 ? tc::undefined_rank_values()
                                              : tc::rank_values_from_singular_values(s.data() + b * n, n, 0.9);
    if (!close_enough(e[b], want.effective_rank, 1e-13)) bad.add(b, ": erank ", e[b], " want ", want.effective_rank);
    if (a[b] != want.approximate_rank) bad.add(b, ": arank ", a[b], " want ", want.approximate_rank);
  }
  bad.expect_none("singular values");
  // Without flags (null) nothing is undefined but what the values make so.
  ASSERT_RANK_OK(tc::rank_from_singular_values_launch(ds.get<double>(), n, batch, nullptr, nullptr, 0.9, out, stream_));
  EXPECT_EQ(download<int64_t>(da, batch)[23],
            tc::rank_values_from_singular_values(s.data() + 23 * n, n, 0.9).approximate_rank);
}

// Matrices of a batch with a gap between them (stride > count): those holding NaN or ±Inf are
// flagged and zeroed, the others and the gaps left alone; a matrix longer than a block's threads
// many times over with its only NaN in the last entry; flags are overwritten (poisoned first).
TEST_F(RankCudaTest, ZeroNonfiniteFlagsAndZeroesOnlyTheBadMatrices) {
  for (const int64_t count : {int64_t{7}, int64_t{70001}}) {
    const int64_t stride = count + 3, batch = 5;
    std::vector<double> a = random_matrix(batch, stride, 31);
    a[1 * stride + count - 1] = kNaN;                                 // last entry
    a[3 * stride + 0] = std::numeric_limits<double>::infinity();      // first entry
    a[4 * stride + count / 2] = -std::numeric_limits<double>::infinity();
    a[0 * stride + count] = kNaN;                                     // in the gap: not read
    DeviceMemory da, dflags;
    upload(da, a);
    upload(dflags, std::vector<int>(static_cast<size_t>(batch), 0x7f7f7f7f));
    ASSERT_RANK_OK(tc::zero_nonfinite_launch(da.get<double>(), count, stride, batch, dflags.get<int>(), stream_));
    const std::vector<double> got = download<double>(da, a.size());
    const std::vector<int> flags = download<int>(dflags, static_cast<size_t>(batch));
    EXPECT_EQ(flags, (std::vector<int>{0, 1, 0, 1, 1})) << "count " << count;
    Mismatches bad;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < stride; ++i) {
        const size_t at = static_cast<size_t>(b * stride + i);
        const bool zeroed = flags[b] == 1 && i < count;
        const double want = zeroed ? 0.0 : a[at];
        if (!(got[at] == want || (std::isnan(got[at]) && std::isnan(want)))) {
          bad.add(b, ",", i, ": ", got[at], " want ", want);
        }
      }
    }
    bad.expect_none("count " + std::to_string(count));
  }
  ASSERT_RANK_OK(tc::zero_nonfinite_launch(nullptr, 0, 0, 0, nullptr, stream_));  // an empty batch
  EXPECT_EQ(tc::zero_nonfinite_launch(nullptr, 4, 4, 1, nullptr, stream_).kind, tc::RankStatus::kInvalidValue);
}

// The whole device route for a batch with a NaN matrix and an Inf one: zero_nonfinite_launch, the
// eigensolve (both routes) or gesvdj, the rank kernel. The bad matrices read undefined, the others
// their spectra's measures, and every solve converged (it saw zeros, not NaN).
TEST_F(RankCudaTest, NonfiniteMatricesAreUndefinedThroughTheSolvers) {
  for (const int64_t n : {int64_t{12}, int64_t{40}}) {
    std::vector<std::vector<double>> lambdas(4);
    for (int b = 0; b < 4; ++b) {
      for (int64_t i = 0; i < (b == 3 ? 5 : n); ++i) {
        lambdas[b].push_back(std::pow(10.0, -0.1 * static_cast<double>(i)) * (b + 1));
      }
    }
    std::vector<double> a = padded_symmetric(lambdas, n, 80);
    a[1 * n * n + 2 * n + 3] = kNaN;
    a[2 * n * n + 0] = std::numeric_limits<double>::infinity();
    for (const tc::EigRoute route : {tc::EigRoute::kBatched, tc::EigRoute::kPerMatrix}) {
      EigLaunch L;
      ASSERT_NO_FATAL_FAILURE(prepare_eig(a, n, dims_of(lambdas), route, 0, &L));
      DeviceMemory dflags, de, dr, dab, dst;
      ASSERT_CUDA_OK(dflags.allocate(sizeof(int) * 4));
      for (DeviceMemory* m : {&de, &dr, &dab, &dst}) ASSERT_CUDA_OK(m->allocate(sizeof(double) * 4));
      const tc::RankOut out{de.get<double>(), dr.get<int64_t>(), dab.get<int64_t>(), dst.get<double>()};
      ASSERT_RANK_OK(tc::zero_nonfinite_launch(L.args.a, n * n, n * n, 4, dflags.get<int>(), stream_));
      ASSERT_RANK_OK(launch_eig(L));
      ASSERT_RANK_OK(tc::rank_from_eigenvalues_launch(L.w.get<double>(), n, 4, L.dims.data(), L.info.get<int>(),
                                                      dflags.get<int>(), 0.99, out, stream_));
      const std::string what = "n = " + std::to_string(n) + " route " + std::to_string(static_cast<int>(route));
      EXPECT_EQ(download<int>(L.info, 4), std::vector<int>(4, 0)) << what;
      EXPECT_EQ(download<int>(dflags, 4), (std::vector<int>{0, 1, 1, 0})) << what;
      const auto e = download<double>(de, 4);
      const auto r = download<int64_t>(dr, 4);
      const auto ab = download<int64_t>(dab, 4);
      const auto st = download<double>(dst, 4);
      for (int b = 0; b < 4; ++b) {
        std::vector<double> sigma;
        for (auto it = lambdas[b].rbegin(); it != lambdas[b].rend(); ++it) sigma.push_back(std::sqrt(*it));
        const int64_t k = static_cast<int64_t>(sigma.size());
        const tc::RankValues want = b == 1 || b == 2 ? tc::undefined_rank_values()
                                                     : tc::rank_values_from_singular_values(sigma.data(), k, 0.99);
        EXPECT_TRUE(close_enough(e[b], want.effective_rank, 1e-10)) << what << " matrix " << b << ": " << e[b];
        EXPECT_TRUE(close_enough(st[b], want.stable_rank, 1e-10)) << what << " matrix " << b << ": " << st[b];
        EXPECT_EQ(r[b], want.approximate_rank) << what << " matrix " << b;
        EXPECT_EQ(ab[b], want.abs_approximate_rank) << what << " matrix " << b;
      }
    }
  }
  // gesvdj on a NaN matrix: zeroed first, so it converges on zeros and the flag decides.
  std::vector<double> m = random_matrix(30, 8, 41);
  m[17] = kNaN;
  SvdLaunch S;
  ASSERT_NO_FATAL_FAILURE(prepare_svd(m, 30, 8, &S));
  DeviceMemory dflag, de, dr, dab, dst;
  ASSERT_CUDA_OK(dflag.allocate(sizeof(int)));
  for (DeviceMemory* d : {&de, &dr, &dab, &dst}) ASSERT_CUDA_OK(d->allocate(sizeof(double)));
  const tc::RankOut out{de.get<double>(), dr.get<int64_t>(), dab.get<int64_t>(), dst.get<double>()};
  ASSERT_RANK_OK(tc::zero_nonfinite_launch(S.args.a, 30 * 8, 30 * 8, 1, dflag.get<int>(), stream_));
  ASSERT_RANK_OK(launch_svd(S));
  ASSERT_RANK_OK(
      tc::rank_from_singular_values_launch(S.args.s, 8, 1, S.args.info, dflag.get<int>(), 0.99, out, stream_));
  EXPECT_EQ(download<int>(S.info, 1)[0], 0);
  EXPECT_EQ(download<int>(dflag, 1)[0], 1);
  EXPECT_TRUE(std::isnan(download<double>(de, 1)[0]));
  EXPECT_EQ(download<int64_t>(dr, 1)[0], -1);
  EXPECT_EQ(download<int64_t>(dab, 1)[0], -1);
  EXPECT_TRUE(std::isnan(download<double>(dst, 1)[0]));
}

TEST_F(RankCudaTest, InvalidArguments) {
  const std::vector<int64_t> dims = {5};
  tc::EigvalsArgs args{solver_, nullptr, 4, 1, dims.data(), nullptr, nullptr, tc::EigRoute::kAuto};
  size_t dev = 0, host = 0;
  EXPECT_EQ(tc::eigvals_workspace(args, &dev, &host).kind, tc::RankStatus::kInvalidValue);  // dims > n
  EXPECT_EQ(tc::gram_update_launch(blas_, nullptr, 3, 4, tc::GramSide::kUnits, 0.0, nullptr, 4, stream_).kind,
            tc::RankStatus::kInvalidValue);
  double dummy = 0;
  EXPECT_EQ(tc::gram_update_launch(blas_, &dummy, 3, 4, tc::GramSide::kUnits, 0.0, &dummy, 3, stream_).kind,
            tc::RankStatus::kInvalidValue);  // ldc < n
  tc::SvdvalsArgs sv{solver_, nullptr, int64_t{1} << 33, 2, nullptr, nullptr};
  size_t bytes = 0;
  EXPECT_EQ(tc::svdvals_workspace(sv, &bytes).kind, tc::RankStatus::kInvalidValue);
}

}  // namespace
