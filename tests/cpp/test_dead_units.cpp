// The LibTorch API of include/trainscope/dead_units.h against a float64 reference written here from
// SPEC.md §3 (`dead_units`): constructed activations with known dead units for each kind, [N, units]
// and [N, C, H, W], non-contiguous inputs, every dtype, streaming over batches equal to one shot,
// tau > 0, empty inputs, determinism, and the errors bad input must raise. Each case runs on CPU,
// and on CUDA when a GPU is present (skipped otherwise).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tests/cpp/torch_test_util.h"
#include "tests/cpp/reference_activity.h"
#include "trainscope/dead_units.h"

namespace {

using namespace trainscope_test;
using trainscope::ActivationKind;
using trainscope::DeadUnitCounter;
using trainscope::DeadUnitOptions;
using trainscope::DeadUnits;

const ActivationKind kKinds[] = {ActivationKind::kReLU, ActivationKind::kTanh, ActivationKind::kSigmoid};

// Per-unit active counts in float64 of the values as stored; units are dim 1, the rest observations.
std::vector<int64_t> reference_counts(const at::Tensor& acts, ActivationKind k, double eps) {
  const int64_t n = acts.size(0), units = acts.size(1);
  const at::Tensor x = as_double_cpu(acts).contiguous().reshape({n, units, -1});
  const int64_t inner = x.size(2);
  const double* p = x.data_ptr<double>();
  std::vector<int64_t> counts(static_cast<size_t>(units), 0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t u = 0; u < units; ++u) {
      for (int64_t i = 0; i < inner; ++i) counts[u] += reference_active(p[(r * units + u) * inner + i], k, eps) ? 1 : 0;
    }
  }
  return counts;
}

// The results a float64 reading of SPEC.md §3 gives for counts out of `obs` observations.
void expect_results(const DeadUnits& d, const std::vector<int64_t>& counts, int64_t obs, double tau,
                    at::Device device, const std::string& what) {
  ASSERT_EQ(d.count.scalar_type(), at::kLong) << what;
  ASSERT_EQ(d.fraction.scalar_type(), at::kDouble) << what;
  ASSERT_EQ(d.active_fraction.scalar_type(), at::kDouble) << what;
  EXPECT_EQ(d.count.dim(), 0) << what;
  EXPECT_EQ(d.fraction.dim(), 0) << what;
  ASSERT_EQ(d.active_fraction.dim(), 1) << what;
  ASSERT_EQ(d.active_fraction.size(0), static_cast<int64_t>(counts.size())) << what;
  EXPECT_EQ(d.count.device(), device) << what;
  EXPECT_EQ(d.fraction.device(), device) << what;
  EXPECT_EQ(d.active_fraction.device(), device) << what;
  const at::Tensor af = as_double_cpu(d.active_fraction);
  int64_t dead = 0;
  for (size_t u = 0; u < counts.size(); ++u) {
    const double f = static_cast<double>(counts[u]) / static_cast<double>(obs);
    dead += f <= tau ? 1 : 0;
    const double got = af[static_cast<int64_t>(u)].item<double>();
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(got)) << what << " unit " << u;
    } else {
      EXPECT_EQ(got, f) << what << " unit " << u;
    }
  }
  EXPECT_EQ(to_vector(d.count)[0], dead) << what;
  const double want_fraction = static_cast<double>(dead) / static_cast<double>(counts.size());
  EXPECT_CLOSE(value(d.fraction), want_fraction, 0.0) << what;
}

// Activations of `kind` with the units in `dead` never active: ReLU outputs (half zeros, dead units
// all zero), tanh outputs (many saturated; dead units ±1 or ±0.995) or sigmoid outputs (dead units
// 0.001 or 0.999). Drawn in float64 on the CPU, then cast and moved.
at::Tensor make_acts(at::IntArrayRef shape, ActivationKind kind, const std::vector<int64_t>& dead,
                     const at::TensorOptions& opt, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor z = at::randn(shape, gen, f64);
  at::Tensor a;
  at::Tensor dead_values;
  const at::Tensor sign = at::where(at::rand(shape, gen, f64) < 0.5, -1.0, 1.0);
  switch (kind) {
    case ActivationKind::kReLU:
      a = at::relu(z);
      dead_values = at::zeros(shape, f64);
      break;
    case ActivationKind::kTanh:
      a = at::tanh(2.5 * z);
      dead_values = sign * at::where(at::rand(shape, gen, f64) < 0.5, 1.0, 0.995);
      break;
    default:
      a = at::sigmoid(3.0 * z);
      dead_values = at::where(sign < 0, 0.001, 0.999);
      break;
  }
  for (int64_t u : dead) a.select(1, u).copy_(dead_values.select(1, u));
  return a.to(opt);
}

std::string kind_label(ActivationKind k) { return trainscope::activation_kind_name(k); }

class DeadUnitsTest : public DeviceDtypeTest {};

TEST_P(DeadUnitsTest, KnownDeadUnits2D) {
  const std::vector<int64_t> dead = {0, 3, 7, 11};
  for (ActivationKind k : kKinds) {
    const at::Tensor acts = make_acts({50, 12}, k, dead, options(), 11);
    const DeadUnits d = trainscope::dead_units(acts, DeadUnitOptions{k, 0.01, 0.0});
    const std::vector<int64_t> want = reference_counts(acts, k, 0.01);
    for (int64_t u : dead) EXPECT_EQ(want[u], 0) << kind_label(k) << " unit " << u;
    EXPECT_EQ(to_vector(d.count)[0], 4) << kind_label(k);
    EXPECT_EQ(value(d.fraction), 4.0 / 12.0) << kind_label(k);
    expect_results(d, want, 50, 0.0, device(), kind_label(k));
    EXPECT_EQ(to_vector(trainscope::active_counts(acts, k, 0.01)), want) << kind_label(k);
  }
}

TEST_P(DeadUnitsTest, KnownDeadChannels4D) {
  const std::vector<int64_t> dead = {1, 4};
  for (ActivationKind k : kKinds) {
    const at::Tensor acts = make_acts({4, 6, 5, 3}, k, dead, options(), 12);
    const DeadUnits d = trainscope::dead_units(acts, DeadUnitOptions{k, 0.01, 0.0});
    const std::vector<int64_t> want = reference_counts(acts, k, 0.01);
    EXPECT_EQ(to_vector(d.count)[0], 2) << kind_label(k);
    expect_results(d, want, 4 * 15, 0.0, device(), kind_label(k));
    EXPECT_EQ(trainscope::observations_per_unit(acts), 60);
  }
}

TEST_P(DeadUnitsTest, WideAndOddShapes) {
  // Rows no multiple of any vector width, wide rows, a single unit, 3-D and 5-D activations.
  const std::vector<std::vector<int64_t>> shapes = {{3, 4097}, {257, 1}, {9, 7, 3}, {2, 3, 2, 2, 5}, {1, 1}, {33, 1023}};
  uint64_t seed = 20;
  for (const auto& shape : shapes) {
    for (ActivationKind k : kKinds) {
      for (double eps : {0.0, 0.01, 0.5}) {
        const at::Tensor acts = make_acts(shape, k, {0}, options(), seed++);
        const DeadUnits d = trainscope::dead_units(acts, DeadUnitOptions{k, eps, 0.0});
        const std::string what = kind_label(k) + " shape " + c10::str(acts.sizes()) + " eps " + std::to_string(eps);
        expect_results(d, reference_counts(acts, k, eps), trainscope::observations_per_unit(acts), 0.0, device(), what);
      }
    }
  }
}

TEST_P(DeadUnitsTest, NonContiguousInputs) {
  for (ActivationKind k : kKinds) {
    const at::Tensor base2 = make_acts({20, 9}, k, {2}, options(), 30);
    const at::Tensor transposed = base2.t().contiguous().t();  // [20, 9] with strides (1, 20)
    ASSERT_FALSE(transposed.is_contiguous());
    const at::Tensor stepped = make_acts({40, 18}, k, {4}, options(), 31).slice(0, 0, 40, 2).slice(1, 1, 18, 2);
    const at::Tensor base4 = make_acts({3, 8, 4, 5}, k, {3}, options(), 32);
    const at::Tensor channels_last = base4.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor expanded = make_acts({1, 6}, k, {1}, options(), 33).expand({64, 6});
    for (const at::Tensor& acts : {transposed, stepped, channels_last, expanded}) {
      const std::string what = kind_label(k) + " strides " + c10::str(acts.strides());
      const DeadUnits d = trainscope::dead_units(acts, DeadUnitOptions{k, 0.01, 0.0});
      expect_results(d, reference_counts(acts, k, 0.01), trainscope::observations_per_unit(acts), 0.0, device(), what);
      EXPECT_EQ(to_vector(trainscope::active_counts(acts, k, 0.01)), to_vector(trainscope::active_counts(acts.contiguous(), k, 0.01)))
          << what;
    }
  }
}

TEST_P(DeadUnitsTest, StreamedEqualsOneShot) {
  for (ActivationKind k : kKinds) {
    for (bool four_d : {false, true}) {
      const at::Tensor all = four_d ? make_acts({23, 5, 3, 4}, k, {0, 2}, options(), 40)
                                    : make_acts({37, 16}, k, {5, 9}, options(), 41);
      const DeadUnitOptions opt{k, 0.05, 0.1};
      DeadUnitCounter counter(opt);
      const std::vector<int64_t> cuts = {0, 7, 7, 20, all.size(0)};  // an empty batch in between
      for (size_t i = 0; i + 1 < cuts.size(); ++i) counter.add(all.slice(0, cuts[i], cuts[i + 1]));
      const DeadUnits streamed = counter.result();
      const DeadUnits once = trainscope::dead_units(all, opt);
      const std::string what = kind_label(k) + (four_d ? " 4-D" : " 2-D");
      EXPECT_EQ(counter.observations(), trainscope::observations_per_unit(all)) << what;
      EXPECT_EQ(counter.counts().device(), device()) << what;
      EXPECT_TRUE(at::equal(streamed.count, once.count)) << what;
      EXPECT_TRUE(at::equal(streamed.fraction, once.fraction)) << what;
      EXPECT_TRUE(at::equal(streamed.active_fraction, once.active_fraction)) << what;
      expect_results(streamed, reference_counts(all, k, 0.05), counter.observations(), 0.1, device(), what);

      // add_active_counts into counts of one's own, and the results from them.
      at::Tensor counts = at::zeros({all.size(1)}, at::TensorOptions().dtype(at::kLong).device(device()));
      for (size_t i = 0; i + 1 < cuts.size(); ++i) trainscope::add_active_counts(counts, all.slice(0, cuts[i], cuts[i + 1]), k, 0.05);
      EXPECT_TRUE(at::equal(counts, counter.counts())) << what;
      const DeadUnits from = trainscope::dead_units_from_counts(counts, counter.observations(), 0.1);
      EXPECT_TRUE(at::equal(from.active_fraction, once.active_fraction)) << what;

      counter.reset();
      EXPECT_EQ(counter.observations(), 0);
      EXPECT_FALSE(counter.counts().defined());
      counter.add(all);
      EXPECT_TRUE(at::equal(counter.result().active_fraction, once.active_fraction)) << what << " after reset";
    }
  }
}

TEST_P(DeadUnitsTest, TauIsInclusive) {
  // Unit u is active in exactly u of 10 rows: f_u = u / 10.
  at::Tensor acts = at::zeros({10, 11}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t u = 0; u <= 10; ++u) acts.select(1, u).slice(0, 0, u).fill_(0.5);
  acts = acts.to(options());
  const std::vector<int64_t> want_counts = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  for (ActivationKind k : kKinds) {
    // 0.5 is active for every kind; 0 for tanh only, so tanh's counts use the saturated 1.0 instead.
    const at::Tensor a = k == ActivationKind::kTanh ? at::where(acts != 0, acts, 1.0) : acts;
    EXPECT_EQ(to_vector(trainscope::active_counts(a, k, 0.01)), want_counts) << kind_label(k);
    for (double tau : {0.0, 0.1, 0.3, 0.35, 0.99, 1.0}) {
      const DeadUnits d = trainscope::dead_units(a, DeadUnitOptions{k, 0.01, tau});
      int64_t want = 0;
      for (int64_t u = 0; u <= 10; ++u) want += static_cast<double>(u) / 10.0 <= tau ? 1 : 0;
      EXPECT_EQ(to_vector(d.count)[0], want) << kind_label(k) << " tau " << tau;
      expect_results(d, want_counts, 10, tau, device(), kind_label(k) + " tau " + std::to_string(tau));
    }
  }
  EXPECT_EQ(to_vector(trainscope::dead_units(acts, DeadUnitOptions{ActivationKind::kReLU, 0.01, 0.3}).count)[0], 4);
}

TEST_P(DeadUnitsTest, EmptyInputs) {
  const DeadUnits no_rows = trainscope::dead_units(at::zeros({0, 5}, options()));
  expect_results(no_rows, {0, 0, 0, 0, 0}, 0, 0.0, device(), "N = 0");
  EXPECT_EQ(to_vector(no_rows.count)[0], 0);  // NaN fractions are not ≤ tau
  const DeadUnits no_units = trainscope::dead_units(at::zeros({4, 0}, options()));
  EXPECT_EQ(no_units.active_fraction.numel(), 0);
  EXPECT_EQ(to_vector(no_units.count)[0], 0);
  EXPECT_TRUE(std::isnan(value(no_units.fraction)));
  const DeadUnits no_positions = trainscope::dead_units(at::zeros({4, 3, 0, 2}, options()));
  expect_results(no_positions, {0, 0, 0}, 0, 0.0, device(), "no spatial positions");
  EXPECT_EQ(to_vector(trainscope::active_counts(at::zeros({0, 3}, options()), ActivationKind::kReLU)),
            (std::vector<int64_t>{0, 0, 0}));
}

TEST_P(DeadUnitsTest, NaNAndInf) {
  const at::Tensor acts =
      at::tensor({kNaN, kInf, -kInf, 0.0, 0.5, -0.0}, at::TensorOptions().dtype(at::kDouble)).reshape({6, 1}).to(options());
  EXPECT_EQ(to_vector(trainscope::active_counts(acts, ActivationKind::kReLU)), std::vector<int64_t>{4});
  EXPECT_EQ(to_vector(trainscope::active_counts(acts, ActivationKind::kTanh)), std::vector<int64_t>{3});
  EXPECT_EQ(to_vector(trainscope::active_counts(acts, ActivationKind::kSigmoid)), std::vector<int64_t>{1});
}

TEST_P(DeadUnitsTest, Deterministic) {
  const at::Tensor acts = make_acts({301, 40, 3, 3}, ActivationKind::kReLU, {1}, options(), 50);
  const DeadUnits first = trainscope::dead_units(acts);
  for (int i = 0; i < 3; ++i) {
    const DeadUnits again = trainscope::dead_units(acts);
    EXPECT_TRUE(at::equal(again.count, first.count));
    EXPECT_TRUE(at::equal(again.active_fraction, first.active_fraction));
  }
}

TEST_P(DeadUnitsTest, CounterAcrossDevicesIsRejected) {
  if (!GetParam().cuda) GTEST_SKIP() << "needs a second device kind";
  DeadUnitCounter counter;
  counter.add(at::zeros({3, 4}, options()));
  expect_error_naming([&] { counter.add(at::zeros({3, 4}, at::TensorOptions().dtype(dtype()))); }, "acts",
                      "CPU batch after a CUDA one");
  at::Tensor cpu_counts = at::zeros({4}, at::kLong);
  expect_error_naming(
      [&] { trainscope::add_active_counts(cpu_counts, at::zeros({3, 4}, options()), ActivationKind::kReLU); },
      "counts", "counts on the CPU, acts on CUDA");
}

INSTANTIATE_TEST_SUITE_P(AllCases, DeadUnitsTest, all_cases(), case_name);

// ---------------------------------------------------------------------------------------------
// Kinds, and bad input: a clear c10::Error naming the argument, before any work.

TEST(DeadUnitsKinds, ParseAndName) {
  EXPECT_EQ(trainscope::parse_activation_kind("relu"), ActivationKind::kReLU);
  EXPECT_EQ(trainscope::parse_activation_kind("ReLU"), ActivationKind::kReLU);
  EXPECT_EQ(trainscope::parse_activation_kind("TANH"), ActivationKind::kTanh);
  EXPECT_EQ(trainscope::parse_activation_kind("Sigmoid"), ActivationKind::kSigmoid);
  for (ActivationKind k : kKinds) {
    EXPECT_EQ(trainscope::parse_activation_kind(trainscope::activation_kind_name(k)), k);
  }
  expect_error_naming([] { trainscope::parse_activation_kind("gelu"); }, "kind", "unknown kind");
  expect_error_naming([] { trainscope::parse_activation_kind(""); }, "kind", "empty kind");
  expect_error_naming([] { trainscope::parse_activation_kind("elu", "activation"); }, "activation", "named argument");
}

TEST(DeadUnitsErrors, BadActivations) {
  const auto relu = ActivationKind::kReLU;
  expect_error_naming([&] { trainscope::dead_units(at::zeros({5})); }, "acts", "1-D acts");
  expect_error_naming([&] { trainscope::dead_units(at::zeros({})); }, "acts", "0-d acts");
  expect_error_naming([&] { trainscope::active_counts(at::zeros({5}), relu); }, "acts", "1-D acts");
  expect_error_naming([&] { trainscope::dead_units(at::ones({4, 3}, at::kInt)); }, "acts", "int acts");
  expect_error_naming([&] { trainscope::active_counts(at::ones({4, 3}, at::kLong), relu); }, "acts", "long acts");
  expect_error_naming([&] { trainscope::dead_units(at::ones({4, 3}, at::kBool)); }, "acts", "bool acts");
  expect_error_naming([&] { trainscope::dead_units(at::Tensor()); }, "acts", "undefined acts");
  expect_error_naming([&] { trainscope::observations_per_unit(at::zeros({5})); }, "acts", "1-D acts");
  expect_error_naming([&] { trainscope::dead_units(at::zeros({4, 3}, at::TensorOptions().device(at::kMeta))); }, "acts",
                      "meta acts");
}

TEST(DeadUnitsErrors, BadOptions) {
  const at::Tensor acts = at::zeros({4, 3});
  for (double eps : {-0.01, 0.51, kNaN, kInf}) {
    for (ActivationKind k : kKinds) {
      expect_error_naming([&] { trainscope::dead_units(acts, DeadUnitOptions{k, eps, 0.0}); }, "eps", "eps out of range");
      expect_error_naming([&] { trainscope::active_counts(acts, k, eps); }, "eps", "eps out of range");
      expect_error_naming([&] { DeadUnitCounter c(DeadUnitOptions{k, eps, 0.0}); }, "eps", "counter eps");
    }
  }
  for (double tau : {-0.1, 1.01, kNaN}) {
    expect_error_naming([&] { trainscope::dead_units(acts, DeadUnitOptions{ActivationKind::kReLU, 0.01, tau}); }, "tau",
                        "tau out of range");
    expect_error_naming([&] { trainscope::dead_units_from_counts(at::zeros({3}, at::kLong), 4, tau); }, "tau",
                        "tau out of range");
    expect_error_naming([&] { DeadUnitCounter c(DeadUnitOptions{ActivationKind::kReLU, 0.01, tau}); }, "tau",
                        "counter tau");
  }
  expect_error_naming([&] { trainscope::active_counts(acts, static_cast<ActivationKind>(5)); }, "kind", "bad enum");
  // The edges are allowed.
  EXPECT_NO_THROW(trainscope::dead_units(acts, DeadUnitOptions{ActivationKind::kSigmoid, 0.5, 1.0}));
  EXPECT_NO_THROW(trainscope::dead_units(acts, DeadUnitOptions{ActivationKind::kTanh, 0.0, 0.0}));
}

TEST(DeadUnitsErrors, BadCounts) {
  const at::Tensor acts = at::zeros({4, 3});
  const auto relu = ActivationKind::kReLU;
  at::Tensor wrong_shape = at::zeros({4}, at::kLong);
  at::Tensor wrong_dim = at::zeros({3, 1}, at::kLong);
  at::Tensor wrong_dtype = at::zeros({3}, at::kInt);
  at::Tensor float_counts = at::zeros({3}, at::kFloat);
  at::Tensor undefined;
  for (at::Tensor* c : {&wrong_shape, &wrong_dim, &wrong_dtype, &float_counts, &undefined}) {
    expect_error_naming([&] { trainscope::add_active_counts(*c, acts, relu); }, "counts", "bad counts");
  }
  EXPECT_TRUE(at::equal(wrong_shape, at::zeros({4}, at::kLong)));  // untouched
  expect_error_naming([&] { trainscope::dead_units_from_counts(at::zeros({3, 1}, at::kLong), 4); }, "counts", "2-D counts");
  expect_error_naming([&] { trainscope::dead_units_from_counts(at::zeros({3}, at::kInt), 4); }, "counts", "int32 counts");
  expect_error_naming([&] { trainscope::dead_units_from_counts(at::zeros({3}, at::kLong), -1); }, "observations",
                      "negative observations");
  // A strided counts view is accumulated through.
  at::Tensor backing = at::zeros({3, 2}, at::kLong);
  at::Tensor column = backing.select(1, 1);
  trainscope::add_active_counts(column, at::ones({4, 3}), relu);
  EXPECT_EQ(to_vector(backing), (std::vector<int64_t>{0, 4, 0, 4, 0, 4}));
}

TEST(DeadUnitsErrors, CounterBatches) {
  DeadUnitCounter counter(DeadUnitOptions{ActivationKind::kTanh, 0.01, 0.0});
  expect_error_naming([&] { counter.result(); }, "add", "result before add");
  counter.add(at::zeros({3, 4}));
  expect_error_naming([&] { counter.add(at::zeros({3, 5})); }, "acts", "later batch with other units");
  expect_error_naming([&] { counter.add(at::zeros({3, 2, 2})); }, "acts", "later batch with other channels");
  expect_error_naming([&] { counter.add(at::zeros({4})); }, "acts", "1-D batch");
  expect_error_naming([&] { counter.add(at::ones({3, 4}, at::kInt)); }, "acts", "int batch");
  EXPECT_EQ(counter.observations(), 3);  // the rejected batches changed nothing
  EXPECT_EQ(to_vector(counter.counts()), (std::vector<int64_t>{3, 3, 3, 3}));
  // Spatial sizes may change between batches: each position is one more observation.
  counter.add(at::zeros({2, 4, 3}));
  EXPECT_EQ(counter.observations(), 9);
  EXPECT_EQ(to_vector(counter.result().count)[0], 0);
}

}  // namespace
