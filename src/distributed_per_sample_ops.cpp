// Torch ops of the cross-rank per-sample statistics (include/trainscope/distributed.h). The
// process group is passed by name (ProcessGroup.group_name in Python, "" for none) and resolved in
// C++, so the collectives are torch.distributed's own. Python wrappers:
// python_bindings/trainscope/distributed.py.
#include <optional>
#include <string>
#include <tuple>

#include <torch/library.h>

#include "trainscope/distributed.h"

namespace trainscope {
namespace {

// (sq_norms, dots, mean_sq_norm, stats, hist, nonfinite): this rank's parts against the global
// ḡ, and the statistics, histogram and non-finite count of the whole batch.
using StatsTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

StatsTuple per_sample_stats_across_ranks_op(at::TensorList per_sample_grads, const std::string& process_group,
                                            bool histogram, int64_t nbins, double maxval) {
  PerSampleOptions o;
  o.histogram = histogram;
  o.nbins = nbins;
  o.maxval = maxval;
  const PerSampleStats s =
      per_sample_stats_across_ranks(per_sample_grads, RankGroup::from_process_group(process_group), o);
  return {s.parts.sq_norms, s.parts.dots, s.parts.mean_sq_norm, s.stats, s.hist, s.nonfinite};
}

// (stats [6], the sum of extra_sums over the ranks, or [0] without it).
std::tuple<at::Tensor, at::Tensor> per_sample_stats_from_local_parts_op(const at::Tensor& sq_norms,
                                                                        const at::Tensor& dots,
                                                                        const at::Tensor& mean_sq_norm,
                                                                        const std::string& process_group,
                                                                        const std::optional<at::Tensor>& extra_sums) {
  at::Tensor extra = extra_sums.has_value() ? extra_sums->clone() : at::Tensor();
  const at::Tensor stats = per_sample_stats_from_local_parts(PerSampleParts{sq_norms, dots, mean_sq_norm},
                                                             RankGroup::from_process_group(process_group),
                                                             extra.defined() ? &extra : nullptr);
  return {stats, extra.defined() ? extra : at::empty({0}, stats.options())};
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  // Collectives: every rank calls them in the same order. Device-generic, so registered for
  // every backend.
  m.def(
      "per_sample_stats_across_ranks(Tensor[] per_sample_grads, str process_group, bool histogram=True, "
      "int nbins=100, float maxval=0.05) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      &trainscope::per_sample_stats_across_ranks_op);
  m.def(
      "per_sample_stats_from_local_parts(Tensor sq_norms, Tensor dots, Tensor mean_sq_norm, str process_group, "
      "Tensor? extra_sums=None) -> (Tensor, Tensor)",
      &trainscope::per_sample_stats_from_local_parts_op);
}
