// Representation metrics of several layers on a probe set: the per-layer dead-unit counters and
// Gram accumulators of dead_units.cpp and rank.cpp, streamed together, finished with one batched
// eigensolve across layers.
#include "trainscope/representation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "src/nvtx.h"
#include "src/tensor_checks.h"
#include "trainscope/distributed.h"

namespace trainscope {

namespace {
constexpr const char* kOp = "trainscope::RepresentationAccumulator";
}  // namespace

const std::vector<std::string> kRepresentationMetricNames = {
    "dead_units",     "dead_fraction",        "effective_rank",
    "approximate_rank", "abs_approximate_rank", "stable_rank",
};

std::map<std::string, at::Tensor> RepresentationMetrics::per_layer() const {
  return {
      {"dead_units", dead_units},
      {"dead_fraction", dead_fraction},
      {"effective_rank", rank.effective_rank},
      {"approximate_rank", rank.approximate_rank},
      {"abs_approximate_rank", rank.abs_approximate_rank},
      {"stable_rank", rank.stable_rank},
  };
}

std::map<std::string, at::Tensor> RepresentationMetrics::summary() const {
  int64_t total_units = 0;
  for (int64_t u : units) total_units += u;
  const at::Tensor dead_total = dead_units.sum();
  // A layer without units has no dead units; the share is over the network's units.
  const at::Tensor share = total_units > 0 ? dead_total.to(at::kDouble) / static_cast<double>(total_units)
                                           : at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                      dead_units.options().dtype(at::kDouble));
  // An undefined layer (−1) makes the mean of an approximate rank NaN, as it does the float ones.
  const auto mean_rank = [](const at::Tensor& r) {
    return r.to(at::kDouble).masked_fill(r < 0, std::numeric_limits<double>::quiet_NaN()).mean();
  };
  return {
      {"dead_units", dead_total},
      {"dead_fraction", share},
      {"effective_rank", rank.effective_rank.mean()},
      {"approximate_rank", mean_rank(rank.approximate_rank)},
      {"abs_approximate_rank", mean_rank(rank.abs_approximate_rank)},
      {"stable_rank", rank.stable_rank.mean()},
  };
}

RepresentationAccumulator::RepresentationAccumulator(std::vector<std::string> names, RepresentationOptions options)
    : names_(std::move(names)), options_(std::move(options)) {
  TORCH_CHECK(!names_.empty(), kOp, ": names is empty; give one name per layer to measure");
  TORCH_CHECK(options_.kinds.empty() || options_.kinds.size() == names_.size(), kOp, ": options.kinds has ",
              options_.kinds.size(), " entries but names has ", names_.size(),
              "; give one activation kind per layer, or none to use options.dead.kind for all");
  TORCH_CHECK(options_.rank.prop > 0.0 && options_.rank.prop <= 1.0, kOp,
              ": options.rank.prop must be in (0, 1], got ", options_.rank.prop);
  dead_.reserve(names_.size());
  grams_.reserve(names_.size());
  for (size_t i = 0; i < names_.size(); ++i) {
    DeadUnitOptions d = options_.dead;
    if (!options_.kinds.empty()) d.kind = options_.kinds[i];
    dead_.emplace_back(d);  // checks eps and tau
    grams_.emplace_back(options_.rank.method);
  }
}

void RepresentationAccumulator::add(const std::vector<at::Tensor>& acts) {
  NvtxRange range{"trainscope::RepresentationAccumulator::add"};
  TORCH_CHECK(acts.size() == names_.size(), kOp, ": acts has ", acts.size(), " tensors but the accumulator measures ",
              names_.size(), " layers; pass one activation tensor per layer, in the order of names");
  for (size_t i = 0; i < acts.size(); ++i) {
    TORCH_CHECK(acts[i].defined(), kOp, ": acts[", i, "] (layer ", names_[i], ") is an undefined tensor");
  }
  for (size_t i = 0; i < acts.size(); ++i) {
    try {
      dead_[i].add(acts[i]);
      grams_[i].add(acts[i]);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, kOp, ": layer ", names_[i], " (acts[", i, "]): ", e.what_without_backtrace());
    }
  }
}

RepresentationMetrics RepresentationAccumulator::result() const {
  NvtxRange range{"trainscope::RepresentationAccumulator::result"};
  const int64_t num_layers = static_cast<int64_t>(names_.size());
  RepresentationMetrics m;
  m.names = names_;
  std::vector<at::Tensor> counts, fractions;
  for (int64_t i = 0; i < num_layers; ++i) {
    TORCH_CHECK(grams_[i].units() >= 0, kOp, ": no batch has been added yet");
    const DeadUnits d = dead_[i].result();
    counts.push_back(d.count);
    fractions.push_back(d.fraction);
    m.active_fraction.push_back(d.active_fraction);
    m.units.push_back(grams_[i].units());
    m.observations.push_back(dead_[i].observations());
  }
  m.dead_units = at::stack(counts);
  m.dead_fraction = at::stack(fractions);

  if (options_.rank.method == RankMethod::kGram) {
    std::vector<at::Tensor> grams;
    grams.reserve(num_layers);
    for (const GramAccumulator& g : grams_) grams.push_back(g.gram());
    m.rank = rank_measures_from_grams(grams, options_.rank.prop);  // one batched eigensolve
  } else {
    std::vector<at::Tensor> rows;
    rows.reserve(num_layers);
    for (const GramAccumulator& g : grams_) rows.push_back(g.rows());
    m.rank = rank_measures(at::TensorList(rows), options_.rank);
  }
  return m;
}

RepresentationMetrics RepresentationAccumulator::result(const RankGroup& group) const {
  if (!group.is_distributed()) return result();
  NvtxRange range{"trainscope::RepresentationAccumulator::result_across_ranks"};
  const int64_t num_layers = static_cast<int64_t>(names_.size());
  for (int64_t i = 0; i < num_layers; ++i) {
    TORCH_CHECK(grams_[i].units() >= 0, kOp, ": no batch has been added on rank ", group.rank(), " of ", group.size(),
                " (layer ", names_[i], "); every rank must add at least one batch before the results are combined "
                "(a batch of zero rows will do)");
  }
  const at::Device device = dead_[0].counts().device();
  for (int64_t i = 1; i < num_layers; ++i) {
    TORCH_CHECK(dead_[i].counts().device() == device, kOp, ": layer ", names_[i], " is on ",
                dead_[i].counts().device(), " but layer ", names_[0], " is on ", device,
                "; combining across ranks needs every layer on one device");
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);

  // [observations (L) | counts of every layer | ΦᵀΦ of every layer], float64.
  std::vector<at::Tensor> pieces;
  for (const DeadUnitCounter& d : dead_) pieces.push_back(at::full({1}, static_cast<double>(d.observations()), f64));
  for (const DeadUnitCounter& d : dead_) pieces.push_back(d.counts().to(at::kDouble));
  for (const GramAccumulator& g : grams_) pieces.push_back(g.unit_gram().reshape({-1}));
  at::Tensor packed = at::cat(pieces);
  group.all_reduce_sum_(packed);

  const at::Tensor obs_host = packed.narrow(0, 0, num_layers).to(at::kCPU);  // the one wait
  RepresentationMetrics m;
  m.names = names_;
  std::vector<at::Tensor> counts, fractions, grams;
  int64_t offset = num_layers;
  for (int64_t i = 0; i < num_layers; ++i) {
    const int64_t units = grams_[i].units();
    const at::Tensor c = packed.narrow(0, offset, units).round().to(at::kLong);
    offset += units;
    const int64_t observations = std::llround(obs_host.data_ptr<double>()[i]);
    const DeadUnits d = dead_units_from_counts(c, observations, dead_[i].options().tau);
    counts.push_back(d.count);
    fractions.push_back(d.fraction);
    m.active_fraction.push_back(d.active_fraction);
    m.units.push_back(units);
    m.observations.push_back(observations);
  }
  for (int64_t i = 0; i < num_layers; ++i) {
    const int64_t units = grams_[i].units();
    grams.push_back(packed.narrow(0, offset, units * units).view({units, units}));
    offset += units * units;
  }
  m.dead_units = at::stack(counts);
  m.dead_fraction = at::stack(fractions);
  m.rank = rank_measures_from_grams(grams, options_.rank.prop);  // one batched eigensolve
  return m;
}

std::vector<int64_t> RepresentationAccumulator::units() const {
  std::vector<int64_t> out;
  out.reserve(grams_.size());
  for (const GramAccumulator& g : grams_) out.push_back(g.units());
  return out;
}

void RepresentationAccumulator::reset() {
  for (DeadUnitCounter& d : dead_) d.reset();
  for (GramAccumulator& g : grams_) g.reset();
}

RepresentationMetrics probe_representations(const ProbeForward& forward, const at::Tensor& probe_inputs,
                                            int64_t batch_size, std::vector<std::string> names,
                                            const RepresentationOptions& options) {
  NvtxRange range{"trainscope::probe_representations"};
  constexpr const char* op = "trainscope::probe_representations";
  TORCH_CHECK(static_cast<bool>(forward), op, ": forward is empty; pass a callable that runs the model");
  TORCH_CHECK(probe_inputs.defined() && probe_inputs.dim() >= 1, op,
              ": probe_inputs must be a tensor with the examples along dim 0");
  TORCH_CHECK(probe_inputs.size(0) >= 1, op, ": probe_inputs has no examples");
  check_device(op, "probe_inputs", probe_inputs.device());
  TORCH_CHECK(batch_size >= 1, op, ": batch_size must be >= 1, got ", batch_size);

  at::NoGradGuard no_grad;
  std::unique_ptr<RepresentationAccumulator> acc;
  const int64_t n = probe_inputs.size(0);
  for (int64_t start = 0; start < n; start += batch_size) {
    const at::Tensor batch = probe_inputs.narrow(0, start, std::min(batch_size, n - start));
    std::vector<at::Tensor> acts = forward(batch);
    if (!acc) {
      TORCH_CHECK(!acts.empty(), op, ": forward returned no activation tensors");
      if (names.empty()) {
        for (size_t i = 0; i < acts.size(); ++i) names.push_back("layer" + std::to_string(i));
      }
      TORCH_CHECK(names.size() == acts.size(), op, ": names has ", names.size(), " entries but forward returned ",
                  acts.size(), " activation tensors");
      acc = std::make_unique<RepresentationAccumulator>(names, options);
    }
    acc->add(acts);
  }
  return acc->result();
}

}  // namespace trainscope
