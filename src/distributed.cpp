// Metrics across the ranks of a torch.distributed job: the RankGroup (a c10d process group found
// by name, or a caller's sum all-reduce), and the cross-rank parameter metrics and loss.
//
// Parameter metrics: each rank turns its per-tensor results back into partial sums (Σg², Σ|g|,
// Σ|θ|, Σ(θ−θ₀)², Σ(θ−θ_prev)², numel, non-finite count, histogram counts), packs them into one
// float64 tensor, and one all-reduce adds them; every rank then finishes the same metrics. The
// local pass runs with float64 results, so turning a norm back into its sum of squares loses
// nothing that matters (one float64 rounding).
#include "trainscope/distributed.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "src/device_constants.h"
#include "src/nvtx.h"
#include "src/param_stats_internal.h"
#include "src/tensor_checks.h"

namespace trainscope {

// ---------------------------------------------------------------------------------------------
// RankGroup

RankGroup::RankGroup() = default;

RankGroup RankGroup::from_process_group(const std::string& name) {
  if (name.empty()) return RankGroup();
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(name);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "trainscope::RankGroup: process_group '", name,
                "' is not a registered torch.distributed process group (", e.what(), ")");
  }
  TORCH_CHECK(pg, "trainscope::RankGroup: process_group '", name, "' resolved to no process group");
  RankGroup g;
  g.rank_ = pg->getRank();
  g.size_ = pg->getSize();
  g.name_ = name;
  // Through the group's own allreduce: NCCL orders it on the current stream (wait() makes the
  // stream wait, not the host); Gloo sums CPU tensors on the host.
  g.all_reduce_ = [pg](at::Tensor& t) {
    std::vector<at::Tensor> tensors{t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    pg->allreduce(tensors, opts)->wait();
  };
  return g;
}

RankGroup::RankGroup(int64_t rank, int64_t size, AllReduceSum all_reduce_sum, std::string name)
    : rank_(rank), size_(size), name_(std::move(name)), all_reduce_(std::move(all_reduce_sum)) {
  TORCH_CHECK(size >= 1, "trainscope::RankGroup: size must be >= 1, got ", size);
  TORCH_CHECK(rank >= 0 && rank < size, "trainscope::RankGroup: rank must be in [0, size), got rank ", rank,
              " and size ", size);
  TORCH_CHECK(static_cast<bool>(all_reduce_) || size == 1, "trainscope::RankGroup: all_reduce_sum is empty");
}

void RankGroup::all_reduce_sum_(at::Tensor& t) const {
  if (size_ <= 1) return;
  TORCH_CHECK(t.defined(), "trainscope::RankGroup::all_reduce_sum_: the tensor is undefined");
  TORCH_CHECK(t.is_contiguous(), "trainscope::RankGroup::all_reduce_sum_: the tensor must be contiguous");
  all_reduce_(t);
}

const char* placement_name(Placement p) {
  return p == Placement::kSharded ? "sharded" : "replicated";
}

Placement parse_placement(const std::string& text, const char* arg) {
  if (text == "replicated") return Placement::kReplicated;
  if (text == "sharded") return Placement::kSharded;
  TORCH_CHECK(false, "trainscope: ", arg, " must be 'replicated' or 'sharded', got '", text, "'");
}

std::vector<TensorLayout> tensor_layouts(const std::vector<std::string>& placements,
                                         const std::vector<int64_t>& full_dims) {
  TORCH_CHECK(full_dims.empty() || placements.empty() || full_dims.size() == placements.size(),
              "trainscope: full_dims has ", full_dims.size(), " entries but placements has ", placements.size(),
              "; give one per tensor");
  std::vector<TensorLayout> out(std::max(placements.size(), full_dims.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (!placements.empty()) out[i].placement = parse_placement(placements[i], "placements");
    if (!full_dims.empty()) out[i].full_dim = full_dims[i];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Helpers

namespace {

at::Tensor checked_extra(const char* op, at::Tensor* extra_sums, const at::Device& device) {
  if (extra_sums == nullptr || !extra_sums->defined()) return {};
  TORCH_CHECK(extra_sums->scalar_type() == at::kDouble, op, ": extra_sums must be float64, got ",
              extra_sums->scalar_type());
  TORCH_CHECK(extra_sums->device() == device, op, ": extra_sums is on ", extra_sums->device(), " but the inputs are on ",
              device);
  return extra_sums->reshape({-1});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Parameter metrics

namespace {
// Columns of the packed per-tensor sums.
enum Col : int64_t { kSqGrad = 0, kAbsGrad, kAbsParam, kSqDist, kSqUpdate, kSqParam, kNumel, kNonfinite, kNumCols };
}  // namespace

ParamStats param_stats_across_ranks(at::TensorList grads, at::TensorList params, at::TensorList init_params,
                                    at::TensorList prev_params, const std::vector<TensorLayout>& layouts,
                                    const RankGroup& group, const ParamStatsOptions& options, at::Tensor* extra_sums) {
  const char* op = "trainscope::param_stats_across_ranks";
  NvtxRange range{op};
  const int64_t n = static_cast<int64_t>(
      std::max({grads.size(), params.size(), init_params.size(), prev_params.size()}));
  TORCH_CHECK(layouts.empty() || static_cast<int64_t>(layouts.size()) == n, op, ": layouts has ", layouts.size(),
              " entries but the tensor lists have ", n, "; give one layout per tensor (or none: all replicated)");
  bool any_full_dim = false;
  for (const TensorLayout& l : layouts) {
    TORCH_CHECK(l.full_dim >= -1, op, ": layouts[].full_dim must be >= -1, got ", l.full_dim);
    any_full_dim = any_full_dim || l.full_dim >= 0;
  }
  if (!group.is_distributed() && !any_full_dim) {
    // One process, local dims: exactly param_stats (extra_sums is its own sum).
    return param_stats_impl(op, grads, params, init_params, prev_params, options);
  }

  ParamStatsOptions local_opt = options;
  local_opt.float64_results = true;
  local_opt.weights_matrices_only = false;  // the global selection is made below, on whole tensors
  const ParamStats local = param_stats_impl(op, grads, params, init_params, prev_params, local_opt);
  const at::Device device = local.metrics.device();
  const at::Tensor extra = checked_extra(op, extra_sums, device);
  bool all_double = n > 0;
  for (at::TensorList l : {grads, params, init_params, prev_params}) {
    for (const at::Tensor& t : l) all_double = all_double && t.scalar_type() == at::kDouble;
  }

  // Per tensor: whether this rank's part counts (sharded: always; replicated: rank 0's copy),
  // its numel, and whether it is a weight matrix for weights_matrices_only.
  std::vector<double> counts(n), numel(n), selected(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& any = !grads.empty() ? grads[i] : params[i];
    const TensorLayout layout = layouts.empty() ? TensorLayout{} : layouts[i];
    const bool counted = layout.placement == Placement::kSharded || group.rank() == 0;
    counts[i] = counted ? 1.0 : 0.0;
    numel[i] = counted ? static_cast<double>(any.numel()) : 0.0;
    const int64_t dim = layout.full_dim >= 0 ? layout.full_dim : any.dim();
    selected[i] = (!options.weights_matrices_only || dim >= 2) ? 1.0 : 0.0;
  }
  std::vector<double> host = counts;
  host.insert(host.end(), numel.begin(), numel.end());
  host.insert(host.end(), selected.begin(), selected.end());
  // Copied to the device once per layout (and never freed once a CUDA graph captured them).
  const at::Tensor consts = device_constants(host, device, op);
  const at::Tensor counted = consts.narrow(0, 0, n).unsqueeze(1) > 0.5;  // [n, 1]
  const at::Tensor numel_t = consts.narrow(0, n, n);                     // [n]
  const at::Tensor selected_t = consts.narrow(0, 2 * n, n);              // [n]

  // Partial sums from the float64 per-tensor results; an empty part contributes nothing (its
  // magnitudes are 0/0), a part that does not count contributes zeros (not NaN · 0).
  const at::Tensor pt = local.per_tensor;  // [n, kNumMetrics]
  const at::Tensor nz = (numel_t > 0).unsqueeze(1);
  const at::Tensor sq = pt.square();
  const at::Tensor abs_sums = at::where(nz, pt * numel_t.unsqueeze(1), at::zeros({}, pt.options()));
  std::vector<at::Tensor> cols(kNumCols);
  cols[kSqGrad] = sq.select(1, static_cast<int64_t>(Metric::kGradNorm));
  cols[kAbsGrad] = abs_sums.select(1, static_cast<int64_t>(Metric::kGradMagnitude));
  cols[kAbsParam] = abs_sums.select(1, static_cast<int64_t>(Metric::kWeightMagnitude));
  cols[kSqDist] = sq.select(1, static_cast<int64_t>(Metric::kDistance));
  cols[kSqUpdate] = sq.select(1, static_cast<int64_t>(Metric::kUpdateSize));
  cols[kSqParam] = sq.select(1, static_cast<int64_t>(Metric::kWeightNorm));
  cols[kNumel] = numel_t;
  cols[kNonfinite] = local.nonfinite_per_tensor.to(at::kDouble);
  at::Tensor rows = at::where(counted, at::stack(cols, 1), at::zeros({}, pt.options()));  // [n, kNumCols]
  const int64_t nbins = local.hist_per_tensor.size(1);
  std::vector<at::Tensor> pieces{rows.reshape({-1})};
  if (nbins > 0) {
    pieces.push_back(at::where(counted, local.hist_per_tensor.to(at::kDouble), at::zeros({}, pt.options()))
                         .reshape({-1}));
  }
  if (extra.defined()) pieces.push_back(extra);
  at::Tensor packed = at::cat(pieces);
  group.all_reduce_sum_(packed);

  const at::Tensor sums = packed.narrow(0, 0, n * kNumCols).view({n, kNumCols});
  const at::Tensor total_numel = sums.select(1, kNumel);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Which metrics have inputs: the same on every rank (the lists are the same on every rank).
  const bool has[kNumMetrics] = {!grads.empty(), !grads.empty(), !params.empty(), !init_params.empty(),
                                 !prev_params.empty(), !params.empty(), !prev_params.empty()};
  auto finish = [&](const at::Tensor& s, const at::Tensor& numel_all, const at::Tensor& abs_param,
                    const at::Tensor& numel_sel) {
    std::vector<at::Tensor> m(kNumMetrics);
    m[0] = s.select(-1, kSqGrad).sqrt();
    m[1] = s.select(-1, kAbsGrad) / numel_all;
    m[2] = abs_param / numel_sel;
    m[3] = s.select(-1, kSqDist).sqrt();
    m[4] = s.select(-1, kSqUpdate).sqrt();
    m[5] = s.select(-1, kSqParam).sqrt();
    m[6] = m[4] / m[5];
    for (int64_t c = 0; c < kNumMetrics; ++c) {
      if (!has[c]) m[c] = at::full_like(m[c], nan);
    }
    return at::stack(m, -1);
  };
  const auto fdt = (all_double || options.float64_results) ? at::kDouble : at::kFloat;
  ParamStats out;
  out.per_tensor = finish(sums, total_numel, sums.select(1, kAbsParam), total_numel).to(fdt);
  const at::Tensor list = sums.sum(0);
  const at::Tensor abs_param_sel = (sums.select(1, kAbsParam) * selected_t).sum();
  const at::Tensor numel_sel = (total_numel * selected_t).sum();
  out.metrics = finish(list, list.select(0, kNumel), abs_param_sel, numel_sel).to(fdt);
  out.nonfinite_per_tensor = sums.select(1, kNonfinite).round().to(at::kLong);
  out.nonfinite = out.nonfinite_per_tensor.sum();
  if (nbins > 0) {
    out.hist_per_tensor = packed.narrow(0, n * kNumCols, n * nbins).view({n, nbins}).round().to(at::kLong);
    out.hist = out.hist_per_tensor.sum(0);
  } else {
    out.hist_per_tensor = local.hist_per_tensor;
    out.hist = local.hist;
  }
  if (extra.defined()) {
    extra_sums->copy_(packed.narrow(0, packed.numel() - extra.numel(), extra.numel()).view_as(*extra_sums));
  }
  return out;
}

at::Tensor loss_across_ranks(const at::Tensor& per_sample_losses, const RankGroup& group) {
  const char* op = "trainscope::loss_across_ranks";
  NvtxRange range{op};
  TORCH_CHECK(per_sample_losses.defined(), op, ": losses is an undefined tensor");
  if (!group.is_distributed()) return loss(per_sample_losses);
  check_device(op, "losses", per_sample_losses.device());
  TORCH_CHECK(at::isFloatingType(per_sample_losses.scalar_type()), op, ": losses must be floating point, got ",
              per_sample_losses.scalar_type());
  const at::Tensor sum = per_sample_losses.sum(c10::nullopt, false, at::kDouble).reshape({1});
  const at::Tensor count =
      at::full({1}, static_cast<double>(per_sample_losses.numel()), sum.options());
  at::Tensor packed = at::cat({sum, count});
  group.all_reduce_sum_(packed);
  const auto dt = per_sample_losses.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return (packed[0] / packed[1]).to(dt);
}

}  // namespace trainscope
