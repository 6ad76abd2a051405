// What the tests of the torch-free CUDA launchers (tests/cpp/test_*_cuda.cu) share: CUDA status
// checks, a GPU-present skip, host byte buffers in any dtype (the 16-bit encoders are CUDA's own
// host functions, independent of the library's decoders), device-memory RAII, a fixture with a
// stream of its own, graph capture, a mismatch collector and the kernels the tests fill and stall
// the device with.
//
// Not a test executable (tests/CMakeLists.txt globs test_*): each test includes it as
// "tests/cpp/cuda_test_util.h" and uses namespace trainscope_test.
#pragma once

#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>

#include "cuda/common.h"

// CHECK(status, cudaSuccess) with the expression, the error's name and its description.
#define TRAINSCOPE_TEST_CUDA_CHECK_(CHECK, expr, text)                                           \
  do {                                                                                           \
    const cudaError_t ts_status_ = (expr);                                                       \
    CHECK(ts_status_, cudaSuccess) << text << " -> " << cudaGetErrorName(ts_status_) << ": "     \
                                   << cudaGetErrorString(ts_status_);                            \
  } while (0)

#define ASSERT_CUDA_OK(expr) TRAINSCOPE_TEST_CUDA_CHECK_(ASSERT_EQ, expr, #expr)
#define EXPECT_CUDA_OK(expr) TRAINSCOPE_TEST_CUDA_CHECK_(EXPECT_EQ, expr, #expr)

namespace trainscope_test {

using trainscope::cuda::DType;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

inline bool gpu_present() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls do not see it
    return false;
  }
  return count > 0;
}

// ---------------------------------------------------------------------------------------------
// Host buffers

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
inline size_t elem_size(DType t) { return static_cast<size_t>(trainscope::cuda::dtype_size(t)); }

// Byte offset of a tensor of `count` elements of `es` bytes placed after *cursor in a host list's
// buffer: at the next 256-byte boundary, or one element past it when misaligned. Moves *cursor
// past the tensor.
inline size_t place_tensor(size_t* cursor, size_t count, size_t es, bool misaligned) {
  const size_t offset = align_up(*cursor, 256) + (misaligned ? es : 0);
  *cursor = offset + count * es;
  return offset;
}

// Size of a buffer holding tensors up to `cursor`, padding included (fill it with kPadByte, a
// known pattern a kernel must not write over).
inline size_t padded_bytes(size_t cursor) { return align_up(cursor, 256) + 256; }
constexpr unsigned char kPadByte = 0xA5;

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "?";
}

// Stores v in dtype t at dst (round to nearest even) and returns the value actually stored.
// The 16-bit conversions are CUDA's own host functions, independent of the library's decoders.
inline double store_value(unsigned char* dst, DType t, double v) {
  switch (t) {
    case DType::kFloat32: {
      const float f = static_cast<float>(v);
      std::memcpy(dst, &f, sizeof f);
      return f;
    }
    case DType::kFloat64:
      std::memcpy(dst, &v, sizeof v);
      return v;
    case DType::kBFloat16: {
      const __nv_bfloat16 b = __float2bfloat16_rn(static_cast<float>(v));
      std::memcpy(dst, &b, sizeof b);
      return static_cast<double>(__bfloat162float(b));
    }
    case DType::kFloat16: {
      const __half h = __float2half_rn(static_cast<float>(v));
      std::memcpy(dst, &h, sizeof h);
      return static_cast<double>(__half2float(h));
    }
  }
  return kNaN;
}

// ---------------------------------------------------------------------------------------------
// Checking results

// Collects mismatches so that a systematic error reports a few examples, not thousands.
class Mismatches {
 public:
  template <typename... Args>
  void add(const Args&... parts) {
    if (count_++ < 12) {
      std::ostringstream os;
      (os << ... << parts);
      text_ += "\n  " + os.str();
    }
  }
  void expect_none(const std::string& context) const {
    EXPECT_EQ(count_, 0) << context << ": " << count_ << " mismatches, first ones:" << text_;
  }

 private:
  int64_t count_ = 0;
  std::string text_;
};

// NaN matches NaN, ±Inf matches itself, anything else within rel·|want|.
inline bool close_enough(double got, double want, double rel) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= rel * std::fabs(want);
}

// ---------------------------------------------------------------------------------------------
// Device memory

class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() { release(); }

  cudaError_t allocate(size_t bytes) {
    release();
    bytes_ = bytes;
    return cudaMalloc(&ptr_, std::max<size_t>(bytes, 256));
  }
  void release() {
    if (ptr_ != nullptr) EXPECT_CUDA_OK(cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  unsigned char* bytes_at(size_t offset) const { return static_cast<unsigned char*>(ptr_) + offset; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Keeps the device busy for about `cycles` clock cycles (2^30: about half a second).
static __global__ void spin_for_cycles(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// out[i] = table[i % period] for i < n, with 64-bit indices.
static __global__ void fill_periodic(uint16_t* out, int64_t n, const uint16_t* table, int64_t period) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = table[i % period];
  }
}

// ---------------------------------------------------------------------------------------------
// Fixture: a stream of its own; every memory operation goes through it. Skips without a GPU.

class CudaStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_present()) GTEST_SKIP() << "no CUDA device";
    ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      EXPECT_CUDA_OK(cudaStreamSynchronize(stream_));
      EXPECT_CUDA_OK(cudaStreamDestroy(stream_));
      stream_ = nullptr;
    }
  }

  // Captures launch() on stream_ in `mode` and instantiates the graph into *exec (the caller
  // destroys it). Call under ASSERT_NO_FATAL_FAILURE.
  void capture_graph(cudaStreamCaptureMode mode, const std::function<cudaError_t()>& launch,
                     cudaGraphExec_t* exec) {
    cudaGraph_t graph = nullptr;
    ASSERT_CUDA_OK(cudaStreamBeginCapture(stream_, mode));
    const cudaError_t launch_status = launch();
    const cudaError_t end_status = cudaStreamEndCapture(stream_, &graph);
    ASSERT_EQ(launch_status, cudaSuccess) << "launch under capture: " << cudaGetErrorString(launch_status);
    ASSERT_EQ(end_status, cudaSuccess) << "end capture: " << cudaGetErrorString(end_status);
    ASSERT_NE(graph, nullptr);
    *exec = nullptr;
    const cudaError_t inst_status = cudaGraphInstantiate(exec, graph, 0);
    EXPECT_CUDA_OK(cudaGraphDestroy(graph));
    ASSERT_EQ(inst_status, cudaSuccess) << "instantiate: " << cudaGetErrorString(inst_status);
  }

  cudaStream_t stream_ = nullptr;
};

}  // namespace trainscope_test
