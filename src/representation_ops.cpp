// The streamed representation accumulator as a TorchScript custom class, so the Python probe
// (python_bindings/trainscope/representation.py) streams through the same C++ code as LibTorch
// users: torch.classes.trainscope.RepresentationAccumulator.
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/custom_class.h>
#include <torch/library.h>

#include "trainscope/distributed.h"
#include "trainscope/representation.h"

namespace trainscope {
namespace {

RepresentationOptions make_options(const std::vector<std::string>& kinds, double eps, double tau, double prop,
                                   const std::string& method) {
  RepresentationOptions o;
  o.dead.eps = eps;
  o.dead.tau = tau;
  for (const std::string& k : kinds) o.kinds.push_back(parse_activation_kind(k, "kinds"));
  o.rank.prop = prop;
  o.rank.method = parse_rank_method(method, "method");
  return o;
}

// Per-layer results, in the order of the names: dead counts [L], dead fractions [L], active
// fractions (one [units] tensor per layer), the four rank measures [L], units, observations, and
// the averages over layers (RepresentationMetrics::summary).
using ResultTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, std::vector<int64_t>, std::vector<int64_t>, c10::Dict<std::string, at::Tensor>>;

struct RepresentationAccumulatorHolder : torch::CustomClassHolder {
  RepresentationAccumulatorHolder(std::vector<std::string> names, std::vector<std::string> kinds, double eps,
                                  double tau, double prop, std::string method)
      : acc(std::move(names), make_options(kinds, eps, tau, prop, method)) {}

  void add(std::vector<at::Tensor> acts) { acc.add(acts); }

  ResultTuple result() { return as_tuple(acc.result()); }

  // The whole probe set's metrics when every rank of the process group (by name, "" for none)
  // streamed its own part: a collective (RepresentationAccumulator::result(group)).
  ResultTuple result_across_ranks(std::string process_group) {
    return as_tuple(acc.result(RankGroup::from_process_group(process_group)));
  }

  // Units per layer, -1 for a layer no batch has reached.
  std::vector<int64_t> units() { return acc.units(); }

  static ResultTuple as_tuple(const RepresentationMetrics& m) {
    c10::Dict<std::string, at::Tensor> summary;
    for (const auto& [name, value] : m.summary()) summary.insert(name, value);
    return {m.dead_units,
            m.dead_fraction,
            m.active_fraction,
            m.rank.effective_rank,
            m.rank.approximate_rank,
            m.rank.abs_approximate_rank,
            m.rank.stable_rank,
            m.units,
            m.observations,
            summary};
  }

  void reset() { acc.reset(); }

  RepresentationAccumulator acc;
};

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  using trainscope::RepresentationAccumulatorHolder;
  m.class_<RepresentationAccumulatorHolder>("RepresentationAccumulator")
      .def(torch::init<std::vector<std::string>, std::vector<std::string>, double, double, double, std::string>())
      .def("add", &RepresentationAccumulatorHolder::add)
      .def("result", &RepresentationAccumulatorHolder::result)
      .def("result_across_ranks", &RepresentationAccumulatorHolder::result_across_ranks)
      .def("units", &RepresentationAccumulatorHolder::units)
      .def("reset", &RepresentationAccumulatorHolder::reset);
}
