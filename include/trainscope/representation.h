// trainscope — representation metrics of several layers on a probe set (SPEC.md §3): dead units
// and the four rank measures per layer and averaged, streamed batch by batch, as used at a task
// boundary in continual learning (Dohare et al., Nature 2024) or every k steps.
//
//   // The callable runs the forward pass on one batch of probe inputs and returns the
//   // activations to measure, one tensor per layer, in the same order every call.
//   auto forward = [&](const at::Tensor& x) {
//     at::Tensor h1 = torch::relu(fc1->forward(x));
//     at::Tensor h2 = torch::relu(fc2->forward(h1));
//     return std::vector<at::Tensor>{h1, h2};
//   };
//   trainscope::RepresentationMetrics m =
//       trainscope::probe_representations(forward, probe_inputs, /*batch_size=*/500, {"fc1", "fc2"});
//   m.effective_rank();           // [L] float64 per layer
//   m.summary();                  // averaged over layers: {"effective_rank": [], ...}
//
// Batches run under at::NoGradGuard. Setting the model's train/eval state is the caller's (the
// Python RepresentationProbe does it from its hooks and restores it). Streaming keeps per-unit
// active counts (dead_units.h) and a Gram matrix (rank.h) per layer on the device; one batched
// eigensolve across layers finishes it.
//
// A diverged model is measured, never an error: a layer whose activations hold NaN or ±Inf gets
// NaN effective and stable rank and −1 approximate ranks (rank.h), and its dead units follow
// IEEE comparisons (a NaN is active for ReLU, NaN ≠ 0, and inactive for tanh and sigmoid).
//
// Across the ranks of a torch.distributed job (each rank streaming its own part of the probe
// set), RepresentationAccumulator::result(group) sums what adds up — per-unit active counts,
// observation counts and ΦᵀΦ — over the ranks before the eigensolve, so the metrics are those of
// the whole probe set (see distributed.h for RankGroup).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "trainscope/dead_units.h"
#include "trainscope/rank.h"

namespace trainscope {

class RankGroup;  // distributed.h

struct RepresentationOptions {
  // Dead-unit criterion of every layer: dead.kind, unless `kinds` names one kind per layer.
  DeadUnitOptions dead;
  std::vector<ActivationKind> kinds;
  RankOptions rank;  // prop and method of the rank measures
};

// Metric names of RepresentationMetrics::per_layer() and summary(), as logs spell them.
extern const std::vector<std::string> kRepresentationMetricNames;  // dead_units, dead_fraction,
                                                                     // effective_rank, ...

struct RepresentationMetrics {
  std::vector<std::string> names;  // one per layer
  std::vector<int64_t> units;      // per layer
  std::vector<int64_t> observations;  // per unit, per layer (N · Π spatial)
  at::Tensor dead_units;           // [L] int64
  at::Tensor dead_fraction;        // [L] float64
  std::vector<at::Tensor> active_fraction;  // per layer, [units] float64
  RankMeasures rank;               // each [L]

  at::Tensor effective_rank() const { return rank.effective_rank; }
  // Every metric per layer: name → [L] tensor.
  std::map<std::string, at::Tensor> per_layer() const;
  // Averaged over layers, 0-d tensors: dead_units is the total over layers, dead_fraction the
  // total over the total number of units (the share of the network's units that are dead), and
  // each rank measure the mean over layers (float64, also for the two integer ranks; NaN when a
  // layer's measure is undefined: NaN, or −1 for an approximate rank).
  std::map<std::string, at::Tensor> summary() const;
};

// Streams batches of activations of L layers into the dead-unit counts and Gram matrices.
class RepresentationAccumulator {
 public:
  explicit RepresentationAccumulator(std::vector<std::string> names, RepresentationOptions options = {});
  // One batch: one tensor per layer, in the order of `names`.
  void add(const std::vector<at::Tensor>& acts);
  RepresentationMetrics result() const;  // throws c10::Error before the first add
  // The metrics of the whole probe set when every rank of `group` has streamed its own part:
  // per layer, the active counts, the observation count and ΦᵀΦ [units, units] are summed over
  // the ranks in ONE all-reduce of Σ_l (1 + units_l + units_l²) doubles (exact for counts up to
  // 2^53), then dead units and the rank measures are taken as result() takes them (one batched
  // eigensolve of the summed ΦᵀΦ; RankMethod::kSvd too, since the rows stay on their ranks). The
  // L observation counts are read back to the host (host values of RepresentationMetrics): the one
  // wait for the device. A collective: every rank calls it, with the same layers and units, after
  // adding at least one batch (a batch of zero rows will do: it fixes units and device and adds
  // nothing); a rank without one throws c10::Error saying so. A group of one: result().
  RepresentationMetrics result(const RankGroup& group) const;
  void reset();
  const std::vector<std::string>& names() const { return names_; }
  // Units per layer, -1 for a layer no batch has reached yet.
  std::vector<int64_t> units() const;

 private:
  std::vector<std::string> names_;
  RepresentationOptions options_;
  std::vector<DeadUnitCounter> dead_;
  std::vector<GramAccumulator> grams_;
};

using ProbeForward = std::function<std::vector<at::Tensor>(const at::Tensor& inputs)>;

// Runs `forward` on probe_inputs (rows along dim 0) in batches of batch_size under NoGradGuard and
// returns the metrics of the returned activations; `names` names the layers (empty: "layer<i>").
RepresentationMetrics probe_representations(const ProbeForward& forward, const at::Tensor& probe_inputs,
                                            int64_t batch_size, std::vector<std::string> names = {},
                                            const RepresentationOptions& options = {});

}  // namespace trainscope
