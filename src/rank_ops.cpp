// Torch ops of the rank-measure family: schemas and their CPU and CUDA kernels. The fake kernels
// torch.compile traces are registered in python_bindings/trainscope/rank.py.
#include <tuple>
#include <vector>

#include <torch/library.h>

#include "trainscope/rank.h"

namespace trainscope {
namespace {

using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Four as_tuple(const RankMeasures& r) {
  return {r.effective_rank, r.approximate_rank, r.abs_approximate_rank, r.stable_rank};
}

Four rank_measures_op(at::TensorList matrices, double prop, c10::string_view method) {
  return as_tuple(rank_measures(matrices, RankOptions{prop, parse_rank_method(std::string(method))}));
}

Four rank_measures_batch_op(const at::Tensor& matrices, double prop, c10::string_view method) {
  return as_tuple(rank_measures(matrices, RankOptions{prop, parse_rank_method(std::string(method))}));
}

Four rank_measures_from_singular_values_op(const at::Tensor& sigma, double prop) {
  return as_tuple(rank_measures_from_singular_values(sigma, prop));
}

Four rank_measures_from_grams_op(at::TensorList grams, double prop) {
  return as_tuple(rank_measures_from_grams(grams, prop));
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  // A list of matrices of any shapes: [L] results.
  m.def(
      "rank_measures(Tensor[] matrices, float prop=0.99, str method=\"gram\") -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // One matrix [n, m] (0-d results) or a batch [L, n, m] ([L] results).
  m.def(
      "rank_measures_batch(Tensor matrices, float prop=0.99, str method=\"gram\") -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def("rank_measures_from_singular_values(Tensor sigma, float prop=0.99) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rank_measures_from_grams(Tensor[] grams, float prop=0.99) -> (Tensor, Tensor, Tensor, Tensor)");
}

// Diagnostics, not differentiable outputs: below autograd the ops see plain tensors, and their
// results never carry a grad_fn.
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  m.impl("rank_measures", torch::CppFunction::makeFallthrough());
  m.impl("rank_measures_batch", torch::CppFunction::makeFallthrough());
  m.impl("rank_measures_from_singular_values", torch::CppFunction::makeFallthrough());
  m.impl("rank_measures_from_grams", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(trainscope, CPU, m) {
  m.impl("rank_measures", &trainscope::rank_measures_op);
  m.impl("rank_measures_batch", &trainscope::rank_measures_batch_op);
  m.impl("rank_measures_from_singular_values", &trainscope::rank_measures_from_singular_values_op);
  m.impl("rank_measures_from_grams", &trainscope::rank_measures_from_grams_op);
}

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) {
  m.impl("rank_measures", &trainscope::rank_measures_op);
  m.impl("rank_measures_batch", &trainscope::rank_measures_batch_op);
  m.impl("rank_measures_from_singular_values", &trainscope::rank_measures_from_singular_values_op);
  m.impl("rank_measures_from_grams", &trainscope::rank_measures_from_grams_op);
}
