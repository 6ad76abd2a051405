// Torch op of the per-element gradient variance family (include/trainscope/grad_variance.h). Its
// fake kernel lives in python_bindings/trainscope/grad_variance.py.
#include <cmath>
#include <optional>

#include <torch/library.h>

#include "trainscope/grad_variance.h"

namespace trainscope {
namespace {

at::Tensor grad_variance_stats_op(at::TensorList grad_sum, at::TensorList sum_grad_sq, int64_t batch_size,
                                  const std::optional<at::Tensor>& loss, std::optional<double> lr) {
  return grad_variance_stats(grad_sum, sum_grad_sq, batch_size, loss.has_value() ? *loss : at::Tensor(),
                             lr.has_value() ? *lr : std::nan(""));
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  m.def("grad_variance_stats(Tensor[] grad_sum, Tensor[] sum_grad_sq, int batch_size, Tensor? loss=None, "
        "float? lr=None) -> Tensor");
}

// A diagnostic, not a differentiable output (see param_stats_ops.cpp).
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  m.impl("grad_variance_stats", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(trainscope, CPU, m) { m.impl("grad_variance_stats", &trainscope::grad_variance_stats_op); }

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) { m.impl("grad_variance_stats", &trainscope::grad_variance_stats_op); }
