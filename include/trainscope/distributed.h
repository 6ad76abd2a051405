// trainscope — metrics that stay right across the ranks of a torch.distributed job (DDP, FSDP).
//
// Every rank computes its partial sums on its own tensors; one all-reduce of a small tensor
// through the job's process group sums them; every rank then finishes the same global values.
//
//   // Python: ProcessGroup.group_name ("0" for the default group); C++: the name the group was
//   // registered under with c10d::register_process_group.
//   trainscope::RankGroup group = trainscope::RankGroup::from_process_group(name);
//
//   // FSDP: each rank holds a shard of every parameter; DDP: every rank holds all of it.
//   std::vector<trainscope::TensorLayout> layouts(params.size(), {trainscope::Placement::kSharded});
//   trainscope::ParamStats s = trainscope::param_stats_across_ranks(grads, params, init, prev,
//                                                                   layouts, group);
//
// A replicated tensor (DDP, or a parameter FSDP does not shard) counts once: rank 0's copy.
// A sharded tensor is the concatenation of the ranks' shards (any split, empty shards allowed).
// Every rank must make the same calls in the same order with lists of the same length: each call
// is a collective. Nothing here waits for the GPU beyond what the process group's all-reduce does
// (NCCL: nothing; Gloo on CPU tensors: the host computes the sum).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "trainscope/param_stats.h"
#include "trainscope/per_sample_stats.h"

namespace trainscope {

// The ranks a metric is combined over. The default is one process alone (rank 0 of 1), where
// every function below gives the single-process result without any collective.
class RankGroup {
 public:
  using AllReduceSum = std::function<void(at::Tensor&)>;

  RankGroup();
  // The torch.distributed process group registered under `name`; "" gives RankGroup().
  // An unknown name throws c10::Error naming `process_group`.
  static RankGroup from_process_group(const std::string& name);
  // A group whose sum all-reduce is `all_reduce_sum` (in place, on every rank's tensor of the same
  // shape and dtype): for frameworks with their own collectives, and tests that run ranks as
  // threads. Throws c10::Error naming the argument unless 0 <= rank < size and the function is set.
  RankGroup(int64_t rank, int64_t size, AllReduceSum all_reduce_sum, std::string name = "custom");

  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  const std::string& name() const { return name_; }  // "" for a single process
  bool is_distributed() const { return size_ > 1; }

  // Sums `t` over the ranks, in place (nothing happens in a group of one). Every rank passes a
  // tensor of the same shape and dtype on its device.
  void all_reduce_sum_(at::Tensor& t) const;

 private:
  int64_t rank_ = 0;
  int64_t size_ = 1;
  std::string name_;
  AllReduceSum all_reduce_;
};

// How one tensor of a list lies across the ranks.
enum class Placement : int64_t {
  kReplicated = 0,  // every rank holds the whole tensor (DDP): counted once, from rank 0
  kSharded = 1,     // the ranks hold disjoint parts of it (FSDP): the parts add up
};

// "replicated" / "sharded", and back (c10::Error naming `arg` otherwise).
const char* placement_name(Placement p);
Placement parse_placement(const std::string& text, const char* arg = "placement");

struct TensorLayout {
  Placement placement = Placement::kReplicated;
  // The whole tensor's number of dimensions, for ParamStatsOptions::weights_matrices_only (FSDP's
  // flat shards are 1-D views of matrices); -1: the local tensor's.
  int64_t full_dim = -1;
};

// Layouts from text, as the Python package passes them: placements[i] is "replicated" or
// "sharded", full_dims[i] the whole tensor's dims; either list may be empty (defaults), otherwise
// they pair up (c10::Error naming the argument).
std::vector<TensorLayout> tensor_layouts(const std::vector<std::string>& placements,
                                         const std::vector<int64_t>& full_dims);

// param_stats (param_stats.h) of tensors laid out over `group` as `layouts` says (one entry per
// tensor of the lists; empty: all replicated). Each rank passes its own parts; every rank gets
// the global metrics, per-tensor results for the whole tensors, and the whole histograms.
// Results have param_stats's dtypes. Cost beyond the local pass: one all-reduce of
// T·(8 + nbins) + extra doubles. `extra_sums`, when given, is a float64 tensor on the inputs'
// device that rides in the same all-reduce and is replaced by its sum over the ranks (the
// Monitor sends the loss's sum and count this way).
// Histogram counts and numels travel as float64: exact up to 2^53.
ParamStats param_stats_across_ranks(at::TensorList grads, at::TensorList params, at::TensorList init_params,
                                    at::TensorList prev_params, const std::vector<TensorLayout>& layouts,
                                    const RankGroup& group, const ParamStatsOptions& options = {},
                                    at::Tensor* extra_sums = nullptr);

// Mean of the per-sample losses of the whole batch (every rank's share), as loss() would give on
// the concatenated losses: one all-reduce of two doubles.
at::Tensor loss_across_ranks(const at::Tensor& per_sample_losses, const RankGroup& group);

// Per-sample statistics (per_sample_stats.h) of the batch split over the ranks, each rank
// passing the per-sample gradients of its own samples (each [B_r, *param_shape], the same shapes
// after the batch dim on every rank). They equal those of the concatenated batch of
// B = Σ_r B_r samples:
//   1. one all-reduce of P + 1 doubles (P the elements of a sample's gradient): every rank's
//      Σᵢ gᵢ (float64, formed in column chunks of bounded size) and B_r, giving the global
//      ḡ = Σ_r Σᵢ gᵢ / B on every rank, B staying a device value;
//   2. this rank's ‖gᵢ‖² (the fused pass of per_sample_stats, which also counts the histogram
//      and the non-finite elements) and gᵢ·ḡ against the global ḡ, float64;
//   3. per_sample_stats_from_local_parts: one all-reduce of 4 + nbins + 1 doubles (the sums
//      below, the histogram counts and the non-finite count; exact up to 2^53).
// In a group of more than one rank every rank needs B_r >= 1 (c10::Error naming
// per_sample_grads otherwise), so that B >= 2 holds without reading device values. The
// returned parts are this rank's (B_r entries, against the global ḡ); stats, hist and
// nonfinite are the whole batch's, the same on every rank. A group of one: per_sample_stats.
// Bad input throws before the first all-reduce — on that rank only, so the other ranks would
// wait in it: pass every rank inputs that pass the checks.
PerSampleStats per_sample_stats_across_ranks(at::TensorList per_sample_grads, const RankGroup& group,
                                             const PerSampleOptions& options = {});

// The six statistics [kNumPerSampleStats] (float64) of the whole batch from each rank's parts,
// which must be taken against the *global* ḡ (so ‖ḡ‖² is the same on every rank): layer factors
// computed against a shared ḡ, say. The statistics are sums over samples, so one all-reduce of
// [B_r, Σ‖gᵢ‖², Σ(gᵢ·ḡ − ‖ḡ‖²)², Σ(gᵢ·ḡ)²] (plus `extra_sums`, as in param_stats_across_ranks:
// a float64 tensor on the parts' device, replaced by its sum over the ranks) finishes them with
// per_sample_stats_from_parts's formulas (shared code); B stays on the device. B_r >= 1 on every
// rank of a group of more than one (c10::Error naming sq_norms otherwise). A group of one:
// per_sample_stats_from_parts, and extra_sums left as it is (its own sum).
at::Tensor per_sample_stats_from_local_parts(const PerSampleParts& local, const RankGroup& group,
                                             at::Tensor* extra_sums = nullptr);

}  // namespace trainscope
