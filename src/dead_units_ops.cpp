// Torch ops of the dead-units family: schemas and their CPU and CUDA kernels. The fake kernels
// torch.compile traces are registered in python_bindings/trainscope/dead_units.py.
#include <string>
#include <tuple>

#include <torch/library.h>

#include "trainscope/dead_units.h"

namespace trainscope {
namespace {

at::Tensor active_counts_op(const at::Tensor& acts, c10::string_view kind, double eps) {
  return active_counts(acts, parse_activation_kind(std::string(kind)), eps);
}

void add_active_counts_op(at::Tensor& counts, const at::Tensor& acts, c10::string_view kind, double eps) {
  add_active_counts(counts, acts, parse_activation_kind(std::string(kind)), eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dead_units_op(const at::Tensor& acts, c10::string_view kind,
                                                             double eps, double tau) {
  const DeadUnits d = dead_units(acts, DeadUnitOptions{parse_activation_kind(std::string(kind)), eps, tau});
  return {d.count, d.fraction, d.active_fraction};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dead_units_from_counts_op(const at::Tensor& counts,
                                                                         int64_t observations, double tau) {
  const DeadUnits d = dead_units_from_counts(counts, observations, tau);
  return {d.count, d.fraction, d.active_fraction};
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  m.def("active_counts(Tensor acts, str kind=\"relu\", float eps=0.01) -> Tensor");
  m.def("add_active_counts_(Tensor(a!) counts, Tensor acts, str kind=\"relu\", float eps=0.01) -> ()");
  m.def("dead_units(Tensor acts, str kind=\"relu\", float eps=0.01, float tau=0.0) -> (Tensor, Tensor, Tensor)");
  m.def("dead_units_from_counts(Tensor counts, int observations, float tau=0.0) -> (Tensor, Tensor, Tensor)");
}

// Diagnostics, not differentiable outputs: below autograd the ops see plain tensors, and their
// results never carry a grad_fn, even for activations that require grad.
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  m.impl("active_counts", torch::CppFunction::makeFallthrough());
  m.impl("add_active_counts_", torch::CppFunction::makeFallthrough());
  m.impl("dead_units", torch::CppFunction::makeFallthrough());
  m.impl("dead_units_from_counts", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(trainscope, CPU, m) {
  m.impl("active_counts", &trainscope::active_counts_op);
  m.impl("add_active_counts_", &trainscope::add_active_counts_op);
  m.impl("dead_units", &trainscope::dead_units_op);
  m.impl("dead_units_from_counts", &trainscope::dead_units_from_counts_op);
}

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) {
  m.impl("active_counts", &trainscope::active_counts_op);
  m.impl("add_active_counts_", &trainscope::add_active_counts_op);
  m.impl("dead_units", &trainscope::dead_units_op);
  m.impl("dead_units_from_counts", &trainscope::dead_units_from_counts_op);
}
