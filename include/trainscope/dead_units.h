// trainscope — dead units of a layer's representation (SPEC.md §3 `dead_units`): per-unit
// active counts over a probe set, streamed batch by batch, accumulated on the device.
//
//   // one shot
//   trainscope::DeadUnits d = trainscope::dead_units(acts, {trainscope::ActivationKind::kReLU});
//   d.count;            // [] int64: units with active fraction f_u ≤ τ
//   d.fraction;         // [] float64: count / units
//   d.active_fraction;  // [units] float64: f_u
//
//   // streamed over a probe set larger than one batch
//   trainscope::DeadUnitCounter counter({trainscope::ActivationKind::kTanh, /*eps=*/0.01});
//   for (const at::Tensor& batch_acts : batches) counter.add(batch_acts);
//   trainscope::DeadUnits d = counter.result();
//
// Activations are [N, units], or [N, C, *spatial] where a unit is a channel and every spatial
// position is one more observation. "Active" for one observation a (SPEC.md §3):
//   ReLU:    a ≠ 0
//   tanh:    |a| ≤ 1 − ε
//   sigmoid: ε ≤ a ≤ 1 − ε
// decided exactly as in float64 whatever the input dtype. The comparisons are IEEE: a NaN counts
// as active for ReLU (NaN ≠ 0) and as inactive for tanh and sigmoid. A unit is dead when
// f_u = active_count_u / observations ≤ τ (τ = 0: never active on any observation; LOP's CIFAR
// "dormant" units are f_u < 0.01, close to τ = 0.01).
//
// Counts are int64 and exact, so results are deterministic; nothing waits for the GPU (the number
// of observations is known from the shapes on the host).
#pragma once

#include <cstdint>
#include <string>

#include <ATen/ATen.h>

namespace trainscope {

enum class ActivationKind : int32_t { kReLU = 0, kTanh = 1, kSigmoid = 2 };

// "relu", "tanh", "sigmoid" (any case) → the kind; anything else throws c10::Error naming `arg`.
ActivationKind parse_activation_kind(const std::string& name, const char* arg = "kind");
const char* activation_kind_name(ActivationKind kind);  // "relu", "tanh", "sigmoid"

struct DeadUnitOptions {
  ActivationKind kind = ActivationKind::kReLU;
  double eps = 0.01;  // saturation margin of tanh and sigmoid, in [0, 0.5]; unused by ReLU
  double tau = 0.0;   // dead when f_u ≤ tau, tau in [0, 1]
};

struct DeadUnits {
  at::Tensor count;            // [] int64
  at::Tensor fraction;         // [] float64: count / units (NaN with no units)
  at::Tensor active_fraction;  // [units] float64 (NaN for every unit with no observations)
};

// Per-unit active counts of one batch: [units] int64, on the activations' device. Activations
// are [N, units] or [N, C, *spatial] (≥ 2-D), float32/float64/bfloat16/float16, any strides,
// CPU or CUDA; N = 0 gives zeros. Bad input throws c10::Error naming the argument.
at::Tensor active_counts(const at::Tensor& acts, ActivationKind kind, double eps = 0.01);

// Adds one batch's active counts into `counts` ([units] int64, on the activations' device).
void add_active_counts(at::Tensor& counts, const at::Tensor& acts, ActivationKind kind, double eps = 0.01);

// Observations per unit in one batch: N · Π spatial (host arithmetic on the shape).
int64_t observations_per_unit(const at::Tensor& acts);

// The results from accumulated counts and the number of observations per unit. A count outside
// [0, observations] cannot come from that many observations: its unit's f_u is NaN, not dead.
DeadUnits dead_units_from_counts(const at::Tensor& counts, int64_t observations, double tau = 0.0);

// One batch, one call.
DeadUnits dead_units(const at::Tensor& acts, const DeadUnitOptions& options = {});

// A probe set streamed batch by batch: per-unit counts stay on the device between batches.
class DeadUnitCounter {
 public:
  explicit DeadUnitCounter(const DeadUnitOptions& options = {});
  // The first batch fixes the number of units and the device; later batches must match.
  void add(const at::Tensor& acts);
  DeadUnits result() const;  // throws c10::Error before the first add
  void reset();  // forgets every batch: the next add fixes the units and the device again
  int64_t observations() const { return observations_; }
  const at::Tensor& counts() const { return counts_; }
  const DeadUnitOptions& options() const { return options_; }

 private:
  DeadUnitOptions options_;
  at::Tensor counts_;  // [units] int64, undefined before the first add
  int64_t observations_ = 0;
};

}  // namespace trainscope
