// What the tests of the LibTorch API (tests/cpp/test_<family>.cpp) share: float64 CPU copies and
// int64 vectors of results, closeness checks, the SPEC.md §4 histogram of a tensor in float64,
// checks that bad input raises a c10::Error naming the argument, and the parameterisation over
// device and dtype (CUDA cases skip without a GPU).
//
// Not a test executable (tests/CMakeLists.txt globs test_*): each test includes it as
// "tests/cpp/torch_test_util.h" and uses namespace trainscope_test.
#pragma once

#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include "trainscope/param_stats.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

// NaN matches NaN, ±Inf itself, anything else within rel·|want|; takes << context like EXPECT_*.
#define EXPECT_CLOSE(got, want, rel) EXPECT_TRUE(::trainscope_test::is_close((got), (want), (rel)))

// Skips the test (from its body) when the CUDA cases cannot run (cuda_cases_run).
#define SKIP_WITHOUT_CUDA() \
  if (!::trainscope_test::cuda_cases_run()) GTEST_SKIP() << "no CUDA device, or trainscope built without CUDA"

namespace trainscope_test {

// Whether the CUDA cases run: LibTorch sees a CUDA device and trainscope has its CUDA kernels (a
// CPU-only build refuses CUDA tensors; test_device_check.cpp tests that).
inline bool cuda_cases_run() { return trainscope::built_with_cuda() && torch::cuda::is_available(); }

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

inline at::Device cuda0() { return at::Device(at::kCUDA, 0); }

// cuDNN's float32 convolutions set to TF32 (PyTorch's default, set explicitly) for the scope of
// one, the setting it found restored after.
class Tf32Convolutions {
 public:
  Tf32Convolutions() : previous_(precision()) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, at::Float32Precision::TF32);
  }
  ~Tf32Convolutions() {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, previous_);
  }
  Tf32Convolutions(const Tf32Convolutions&) = delete;
  Tf32Convolutions& operator=(const Tf32Convolutions&) = delete;
  // The current setting for cuDNN's float32 convolutions.
  static at::Float32Precision precision() {
    return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV);
  }

 private:
  at::Float32Precision previous_;
};

// ---------------------------------------------------------------------------------------------
// Results on the host

inline at::Tensor as_double_cpu(const at::Tensor& t) { return t.detach().to(at::kCPU).to(at::kDouble); }
inline double value(const at::Tensor& t) { return as_double_cpu(t).item<double>(); }

inline std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kCPU).to(at::kLong).contiguous().reshape({-1});
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// True when the raw bytes are equal (at::equal treats NaN as unequal).
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         at::equal(a.contiguous().reshape({-1}).view(at::kByte), b.contiguous().reshape({-1}).view(at::kByte));
}

// ---------------------------------------------------------------------------------------------
// Closeness

// NaN matches NaN, ±Inf itself, anything else within rel·|want|.
inline bool close_enough(double got, double want, double rel) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= rel * std::fabs(want);
}

inline testing::AssertionResult is_close(double got, double want, double rel) {
  if (close_enough(got, want, rel)) return testing::AssertionSuccess();
  return testing::AssertionFailure() << "got " << got << ", want " << want << " (relative tolerance " << rel << ")";
}

// As is_close, but within rel·scale: for results whose error follows the size of the terms that
// cancelled in them rather than their own.
inline testing::AssertionResult is_within(double got, double want, double scale, double rel) {
  if (std::isnan(want) ? std::isnan(got) : (std::isinf(want) ? got == want : std::fabs(got - want) <= rel * scale)) {
    return testing::AssertionSuccess();
  }
  return testing::AssertionFailure() << "got " << got << ", want " << want << " (tolerance " << rel << " × "
                                     << scale << ")";
}

// ---------------------------------------------------------------------------------------------
// Histogram reference

// Adds the SPEC.md §4 histogram of t to counts, in float64: floor((clamp(x, −m, m) + m) / w),
// x = m in the last bin; NaN/Inf skipped.
inline void add_reference_hist(const at::Tensor& t, int64_t nbins, double maxval, std::vector<int64_t>* counts) {
  const at::Tensor x = as_double_cpu(t).contiguous().reshape({-1});
  const double* p = x.data_ptr<double>();
  const double w = 2.0 * maxval / static_cast<double>(nbins);
  for (int64_t i = 0; i < x.numel(); ++i) {
    if (!std::isfinite(p[i])) continue;
    const double c = std::min(std::max(p[i], -maxval), maxval);
    const double b = std::floor((c + maxval) / w);
    const int64_t bin = b < 0.0 ? 0 : (b >= static_cast<double>(nbins) ? nbins - 1 : static_cast<int64_t>(b));
    ++(*counts)[static_cast<size_t>(bin)];
  }
}

// The histogram of one tensor, and of every tensor of a list together.
inline std::vector<int64_t> reference_hist(const at::Tensor& t, int64_t nbins, double maxval) {
  std::vector<int64_t> counts(static_cast<size_t>(nbins), 0);
  add_reference_hist(t, nbins, maxval, &counts);
  return counts;
}

inline std::vector<int64_t> reference_hist(const std::vector<at::Tensor>& tensors, int64_t nbins, double maxval) {
  std::vector<int64_t> counts(static_cast<size_t>(nbins), 0);
  for (const at::Tensor& t : tensors) add_reference_hist(t, nbins, maxval, &counts);
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Errors naming the argument

inline bool is_identifier_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// True when `name` appears in `text` as a whole word ("params" in "params[1]", not in
// "prev_params"; "B" in "got B = 1", not in "Batch").
inline bool names_argument(const std::string& text, const std::string& name) {
  for (size_t pos = text.find(name); pos != std::string::npos; pos = text.find(name, pos + 1)) {
    const bool start_ok = pos == 0 || !is_identifier_char(text[pos - 1]);
    const size_t end = pos + name.size();
    const bool end_ok = end == text.size() || !is_identifier_char(text[end]);
    if (start_ok && end_ok) return true;
  }
  return false;
}

// Bad input must raise c10::Error whose message names the offending argument.
inline void expect_error_naming(const std::function<void()>& call, const std::string& argument,
                                const std::string& what) {
  EXPECT_THROW(
      {
        try {
          call();
        } catch (const c10::Error& e) {
          const std::string msg = e.what_without_backtrace();
          EXPECT_TRUE(names_argument(msg, argument))
              << what << ": the message does not name `" << argument << "`: " << msg;
          throw;
        }
      },
      c10::Error)
      << what;
}

// ---------------------------------------------------------------------------------------------
// Parameterised over device and dtype

struct Case {
  bool cuda;
  at::ScalarType dtype;
};

inline std::string case_label(const Case& c) {
  std::string dt;
  switch (c.dtype) {
    case at::kFloat: dt = "float32"; break;
    case at::kDouble: dt = "float64"; break;
    case at::kBFloat16: dt = "bfloat16"; break;
    default: dt = "float16"; break;
  }
  return std::string(c.cuda ? "cuda_" : "cpu_") + dt;
}

inline std::string case_name(const testing::TestParamInfo<Case>& info) { return case_label(info.param); }

// How gtest prints a Case (test listings, failure messages).
inline void PrintTo(const Case& c, std::ostream* os) { *os << case_label(c); }

// Every dtype on the CPU, then every dtype on CUDA: for INSTANTIATE_TEST_SUITE_P(..., all_cases(), case_name).
inline auto all_cases() {
  return testing::Values(Case{false, at::kFloat}, Case{false, at::kDouble}, Case{false, at::kBFloat16},
                         Case{false, at::kHalf}, Case{true, at::kFloat}, Case{true, at::kDouble},
                         Case{true, at::kBFloat16}, Case{true, at::kHalf});
}

// Base of the parameterised fixtures: the case's device and dtype; CUDA cases skip without a GPU.
class DeviceDtypeTest : public testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (GetParam().cuda) {
      SKIP_WITHOUT_CUDA();
    }
  }
  at::Device device() const { return GetParam().cuda ? cuda0() : at::Device(at::kCPU); }
  at::ScalarType dtype() const { return GetParam().dtype; }
  at::TensorOptions options() const { return at::TensorOptions().dtype(dtype()).device(device()); }

  void expect_on_device(const at::Tensor& t, const char* what) const { EXPECT_EQ(t.device(), device()) << what; }
};

}  // namespace trainscope_test
