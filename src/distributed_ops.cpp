// Torch ops of the cross-rank functions (include/trainscope/distributed.h). The process group is
// passed by name (ProcessGroup.group_name in Python, "" for none) and resolved in C++, so the
// collectives are torch.distributed's own.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/library.h>

#include "src/param_stats_internal.h"
#include "trainscope/distributed.h"

namespace trainscope {
namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Result param_stats_across_ranks_op(at::TensorList grads, at::TensorList params, at::TensorList init_params,
                                   at::TensorList prev_params, std::vector<std::string> placements,
                                   at::IntArrayRef full_dims, const std::string& process_group, bool histogram,
                                   int64_t nbins, double maxval, bool weights_matrices_only, bool refresh_prev,
                                   const std::optional<at::Tensor>& extra_sums) {
  const ParamStatsOptions o = param_stats_options(histogram, nbins, maxval, weights_matrices_only, refresh_prev);
  at::Tensor extra = extra_sums.has_value() ? extra_sums->clone() : at::Tensor();
  const ParamStats s = param_stats_across_ranks(grads, params, init_params, prev_params,
                                                tensor_layouts(placements, full_dims.vec()),
                                                RankGroup::from_process_group(process_group), o,
                                                extra.defined() ? &extra : nullptr);
  return {s.metrics, s.per_tensor, s.nonfinite, s.nonfinite_per_tensor, s.hist, s.hist_per_tensor,
          extra.defined() ? extra : at::empty({0}, s.metrics.options().dtype(at::kDouble))};
}

at::Tensor loss_across_ranks_op(const at::Tensor& losses, const std::string& process_group) {
  return loss_across_ranks(losses, RankGroup::from_process_group(process_group));
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  // Collectives: every rank calls them in the same order. Device-generic (the local pass
  // dispatches on the tensors' device), so registered for every backend.
  m.def(
      "param_stats_across_ranks(Tensor[] grads, Tensor[] params, Tensor[] init_params, "
      "Tensor(a!)[] prev_params, str[] placements, int[] full_dims, str process_group, bool histogram=True, "
      "int nbins=100, float maxval=0.05, bool weights_matrices_only=False, bool refresh_prev=False, "
      "Tensor? extra_sums=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      &trainscope::param_stats_across_ranks_op);
  m.def("loss_across_ranks(Tensor losses, str process_group) -> Tensor", &trainscope::loss_across_ranks_op);
}
