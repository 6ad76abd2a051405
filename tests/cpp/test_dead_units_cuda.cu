// The torch-free CUDA launcher of cuda/dead_units.h against a CPU reference written here from
// SPEC.md §3 (`dead_units`, in float64 on the values actually stored): 2-D and 4-D shapes, rows
// whose width is no multiple of the vector width, pointers off the 16-byte grid, every dtype and
// kind, values on and next to the thresholds, accumulation across launches, CUDA-graph capture,
// asynchrony, more than 2^31 elements, and the argument checks (which need no GPU).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/dead_units.h"
#include "tests/cpp/reference_activity.h"
#include "tests/cpp/cuda_test_util.h"

namespace {

namespace tc = trainscope::cuda;
using namespace trainscope_test;
using tc::ActivityKind;

const DType kDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16};
const ActivityKind kKinds[] = {ActivityKind::kReLU, ActivityKind::kTanh, ActivityKind::kSigmoid};

struct Shape {
  int64_t n, channels, inner;
};

std::string label(const Shape& s, DType t, ActivityKind k, bool misaligned) {
  return std::to_string(s.n) + "x" + std::to_string(s.channels) + "x" + std::to_string(s.inner) + " " +
         dtype_name(t) + " " + reference_kind_name(k) + (misaligned ? " misaligned" : "");
}

// A [n, channels, inner] array in dtype t on the host, and the float64 reference counts of the
// values as stored. Every fifth channel is dead (saturated or zero throughout); the others mix
// values on and next to the thresholds, specials and random values.
struct Input {
  std::vector<unsigned char> bytes;
  std::vector<int64_t> want;
};

Input make_input(const Shape& s, DType t, ActivityKind k, double eps, uint64_t seed) {
  const double lo = eps, hi = 1.0 - eps;
  const std::vector<double> pool = {0.0, -0.0, lo, hi, -hi, std::nextafter(lo, 0.0), std::nextafter(hi, 2.0),
                                    std::nextafter(-hi, -2.0), std::nextafter(hi, 0.0), 1.0, -1.0, 0.5,
                                    kNaN, kInf, -kInf, 1e-40, -1e-8, 0.25, 0.75};
  const double dead_value = k == ActivityKind::kReLU ? 0.0 : 1.0;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, pool.size() - 1);
  std::normal_distribution<double> normal(0.0, 0.6);
  std::bernoulli_distribution coin(0.5);
  const size_t es = elem_size(t);
  Input in;
  in.bytes.resize(static_cast<size_t>(s.n * s.channels * s.inner) * es);
  in.want.assign(static_cast<size_t>(s.channels), 0);
  size_t i = 0;
  for (int64_t r = 0; r < s.n; ++r) {
    for (int64_t c = 0; c < s.channels; ++c) {
      for (int64_t j = 0; j < s.inner; ++j, ++i) {
        const double v = c % 5 == 0 ? dead_value : (coin(rng) ? pool[pick(rng)] : normal(rng));
        const double stored = store_value(in.bytes.data() + i * es, t, v);
        in.want[c] += reference_active(stored, k, eps) ? 1 : 0;
      }
    }
  }
  return in;
}

class DeadUnitsCudaTest : public CudaStreamTest {
 protected:
  // Copies `in` to the device (one element past a 16-byte boundary when misaligned), with counts
  // starting at `base`.
  void upload(const Input& in, DType t, bool misaligned, const std::vector<int64_t>& base) {
    offset_ = misaligned ? elem_size(t) : 0;
    ASSERT_CUDA_OK(acts_.allocate(in.bytes.size() + 256));
    ASSERT_CUDA_OK(cudaMemcpyAsync(acts_.bytes_at(offset_), in.bytes.data(), in.bytes.size(), cudaMemcpyHostToDevice,
                                   stream_));
    ASSERT_CUDA_OK(counts_.allocate(base.size() * sizeof(int64_t)));
    set_counts(base);
  }
  void set_counts(const std::vector<int64_t>& base) {
    ASSERT_CUDA_OK(cudaMemcpyAsync(counts_.get(), base.data(), base.size() * sizeof(int64_t), cudaMemcpyHostToDevice,
                                   stream_));
  }
  cudaError_t launch(const Shape& s, DType t, const tc::ActivityTest& test) {
    return tc::launch_add_active_counts(acts_.bytes_at(offset_), t, s.n, s.channels, s.inner, test,
                                        counts_.get<int64_t>(), stream_);
  }
  std::vector<int64_t> fetch(int64_t channels) {
    std::vector<int64_t> out(static_cast<size_t>(channels));
    EXPECT_CUDA_OK(cudaMemcpyAsync(out.data(), counts_.get(), out.size() * sizeof(int64_t), cudaMemcpyDeviceToHost,
                                   stream_));
    EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
    return out;
  }

  DeviceMemory acts_, counts_;
  size_t offset_ = 0;
};

const Shape kShapes[] = {
    {1, 1, 1}, {7, 10, 1}, {2000, 256, 1}, {33, 1023, 1}, {3, 4097, 1}, {1000, 3, 1}, {4099, 1, 1},
    {300, 2, 1}, {64, 40, 1},                                        // 2-D: [N, units]
    {4, 3, 49}, {2, 64, 1024}, {6, 5, 9}, {3, 17, 8}, {5, 2, 1000}, {9, 7, 3}, {2, 300, 4}, {40, 4, 2}};  // [N, C, H·W]

TEST_F(DeadUnitsCudaTest, MatchesTheReferenceForEveryShapeDtypeAndKind) {
  uint64_t seed = 1;
  for (const Shape& s : kShapes) {
    for (DType t : kDtypes) {
      for (ActivityKind k : kKinds) {
        for (bool misaligned : {false, true}) {
          const double eps = k == ActivityKind::kReLU ? 0.01 : (seed % 2 ? 0.01 : 0.1);
          const Input in = make_input(s, t, k, eps, seed++);
          std::vector<int64_t> base(static_cast<size_t>(s.channels));
          for (size_t c = 0; c < base.size(); ++c) base[c] = static_cast<int64_t>(1000 * c + 7);
          ASSERT_NO_FATAL_FAILURE(upload(in, t, misaligned, base));
          ASSERT_CUDA_OK(launch(s, t, tc::make_activity_test(k, eps)));
          const std::vector<int64_t> got = fetch(s.channels);
          Mismatches bad;
          for (size_t c = 0; c < got.size(); ++c) {
            if (got[c] != base[c] + in.want[c]) bad.add("channel ", c, ": got ", got[c] - base[c], " want ", in.want[c]);
          }
          bad.expect_none(label(s, t, k, misaligned));
        }
      }
    }
  }
}

TEST_F(DeadUnitsCudaTest, CountsAccumulateAcrossLaunches) {
  const Shape s{129, 12, 25};
  for (DType t : kDtypes) {
    const Input in = make_input(s, t, ActivityKind::kTanh, 0.01, 42);
    ASSERT_NO_FATAL_FAILURE(upload(in, t, false, std::vector<int64_t>(12, 0)));
    const tc::ActivityTest test = tc::make_activity_test(ActivityKind::kTanh, 0.01);
    ASSERT_CUDA_OK(launch(s, t, test));
    ASSERT_CUDA_OK(launch(s, t, test));
    const std::vector<int64_t> got = fetch(s.channels);
    for (size_t c = 0; c < got.size(); ++c) EXPECT_EQ(got[c], 2 * in.want[c]) << dtype_name(t) << " channel " << c;
  }
}

TEST_F(DeadUnitsCudaTest, GraphReplayMatchesEager) {
  const Shape s{517, 33, 7};
  for (DType t : kDtypes) {
    const Input in = make_input(s, t, ActivityKind::kSigmoid, 0.05, 9);
    const std::vector<int64_t> zeros(static_cast<size_t>(s.channels), 0);
    ASSERT_NO_FATAL_FAILURE(upload(in, t, false, zeros));
    const tc::ActivityTest test = tc::make_activity_test(ActivityKind::kSigmoid, 0.05);
    ASSERT_CUDA_OK(launch(s, t, test));
    const std::vector<int64_t> eager = fetch(s.channels);
    EXPECT_EQ(eager, in.want) << dtype_name(t);

    cudaGraphExec_t exec = nullptr;
    ASSERT_NO_FATAL_FAILURE(capture_graph(
        cudaStreamCaptureModeGlobal,
        [&] {
          const cudaError_t err = cudaMemsetAsync(counts_.get(), 0, zeros.size() * sizeof(int64_t), stream_);
          return err != cudaSuccess ? err : launch(s, t, test);
        },
        &exec));
    for (int replay = 0; replay < 2; ++replay) {
      set_counts(std::vector<int64_t>(zeros.size(), 99));  // the graph clears them itself
      ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream_));
      EXPECT_EQ(fetch(s.channels), eager) << dtype_name(t) << " replay " << replay;
    }
    EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
  }
}

TEST_F(DeadUnitsCudaTest, LaunchDoesNotWaitForTheStream) {
  const Shape s{256, 64, 1};
  const Input in = make_input(s, DType::kFloat32, ActivityKind::kReLU, 0.01, 5);
  ASSERT_NO_FATAL_FAILURE(upload(in, DType::kFloat32, false, std::vector<int64_t>(64, 0)));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream_));
  spin_for_cycles<<<1, 1, 0, stream_>>>(int64_t{1} << 30);
  ASSERT_CUDA_OK(cudaGetLastError());
  ASSERT_CUDA_OK(launch(s, DType::kFloat32, tc::make_activity_test(ActivityKind::kReLU, 0.01)));
  EXPECT_EQ(cudaStreamQuery(stream_), cudaErrorNotReady);  // the launch returned while the stream was busy
  EXPECT_EQ(fetch(s.channels), in.want);
}

// bfloat16 [n, 64, 64] with n · 4096 > 2^31, filled on the device with a table of period
// 4097 = M + 1, so element (r, j) is table[(j − r) mod 4097] and every column sees every value.
TEST_F(DeadUnitsCudaTest, MoreThan2To31Elements) {
  const int64_t channels = 64, inner = 64, m = channels * inner, period = m + 1;
  const int64_t n = (int64_t{1} << 31) / m + 3;
  const size_t bytes = static_cast<size_t>(n * m) * 2;
  size_t free_bytes = 0, total = 0;
  ASSERT_CUDA_OK(cudaMemGetInfo(&free_bytes, &total));
  if (free_bytes < bytes + (size_t{1} << 30)) GTEST_SKIP() << "needs " << bytes << " bytes of device memory";

  std::mt19937_64 rng(3);
  std::vector<uint16_t> table(static_cast<size_t>(period));
  std::vector<int> act(static_cast<size_t>(period));
  const double eps = 0.01;
  const std::vector<double> values = {0.0, 0.995, 0.5, -0.3, 1.0, -0.999, 0.0625};
  for (int64_t i = 0; i < period; ++i) {
    unsigned char buf[2];
    const double v = store_value(buf, DType::kBFloat16, values[rng() % values.size()]);
    std::memcpy(&table[i], buf, 2);
    act[i] = reference_active(v, ActivityKind::kTanh, eps) ? 1 : 0;
  }
  int64_t all_active = 0;
  for (int a : act) all_active += a;
  std::vector<int64_t> want(static_cast<size_t>(channels), 0);
  const int64_t full = n / period, rest = n % period;
  for (int64_t j = 0; j < m; ++j) {
    int64_t c = full * all_active;
    for (int64_t r = 0; r < rest; ++r) c += act[((j - r) % period + period) % period];
    want[j / inner] += c;
  }

  DeviceMemory table_dev;
  ASSERT_CUDA_OK(table_dev.allocate(table.size() * 2));
  ASSERT_CUDA_OK(cudaMemcpyAsync(table_dev.get(), table.data(), table.size() * 2, cudaMemcpyHostToDevice, stream_));
  ASSERT_CUDA_OK(acts_.allocate(bytes));
  fill_periodic<<<4096, 256, 0, stream_>>>(acts_.get<uint16_t>(), n * m, table_dev.get<uint16_t>(), period);
  ASSERT_CUDA_OK(cudaGetLastError());
  ASSERT_CUDA_OK(counts_.allocate(static_cast<size_t>(channels) * sizeof(int64_t)));
  set_counts(std::vector<int64_t>(static_cast<size_t>(channels), 0));
  offset_ = 0;
  ASSERT_CUDA_OK(launch(Shape{n, channels, inner}, DType::kBFloat16, tc::make_activity_test(ActivityKind::kTanh, eps)));
  EXPECT_EQ(fetch(channels), want);
}

// ---------------------------------------------------------------------------------------------
// Argument checks: answered before any CUDA call, so no GPU is needed.

TEST(DeadUnitsLaunchArgs, InvalidArgumentsAreRejectedBeforeAnyWork) {
  const tc::ActivityTest test = tc::make_activity_test(ActivityKind::kReLU, 0.01);
  alignas(16) float data[8] = {};
  int64_t counts[2] = {};
  const auto call = [&](const void* p, DType t, int64_t n, int64_t c, int64_t inner, int64_t* out) {
    return tc::launch_add_active_counts(p, t, n, c, inner, test, out, nullptr);
  };
  EXPECT_EQ(call(data, DType::kFloat32, -1, 2, 1, counts), cudaErrorInvalidValue);
  EXPECT_EQ(call(data, DType::kFloat32, 2, -2, 1, counts), cudaErrorInvalidValue);
  EXPECT_EQ(call(data, DType::kFloat32, 2, 2, -1, counts), cudaErrorInvalidValue);
  EXPECT_EQ(call(data, static_cast<DType>(7), 2, 2, 1, counts), cudaErrorInvalidValue);
  EXPECT_EQ(call(nullptr, DType::kFloat32, 2, 2, 1, counts), cudaErrorInvalidValue);
  EXPECT_EQ(call(data, DType::kFloat32, 2, 2, 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(call(data, DType::kFloat32, int64_t{1} << 40, int64_t{1} << 40, 1, counts), cudaErrorInvalidValue);
  // A pointer not aligned to its element type.
  EXPECT_EQ(call(reinterpret_cast<const unsigned char*>(data) + 1, DType::kFloat32, 2, 2, 1, counts),
            cudaErrorInvalidValue);
  // Empty arrays launch nothing.
  EXPECT_EQ(call(nullptr, DType::kFloat32, 0, 2, 1, counts), cudaSuccess);
  EXPECT_EQ(call(nullptr, DType::kFloat32, 2, 2, 0, counts), cudaSuccess);
  EXPECT_EQ(call(nullptr, DType::kFloat32, 2, 0, 1, nullptr), cudaSuccess);
}

}  // namespace
