// Torch ops of the parameter-space family: schemas and their CPU and CUDA kernels. This file
// holds the namespace's one TORCH_LIBRARY block; other families add theirs with
// TORCH_LIBRARY_FRAGMENT in src/<family>_ops.cpp. The fake kernels torch.compile traces are
// registered next to each family's Python functions.
//
// Every family registers its kernels for CUDA in a CPU-only build too: they refuse CUDA tensors
// with the library's own error (check_device, src/tensor_checks.h), where the dispatcher would
// only say that no CUDA kernel exists.
#include <tuple>

#include <torch/library.h>

#include "src/param_stats_internal.h"

namespace trainscope {
namespace {

using ParamStatsTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ParamStatsTuple as_tuple(const ParamStats& s) {
  return {s.metrics, s.per_tensor, s.nonfinite, s.nonfinite_per_tensor, s.hist, s.hist_per_tensor};
}

ParamStatsTuple param_stats_op(at::TensorList grads, at::TensorList params, at::TensorList init_params,
                               at::TensorList prev_params, bool histogram, int64_t nbins, double maxval,
                               bool weights_matrices_only) {
  return as_tuple(param_stats_impl("trainscope.param_stats", grads, params, init_params, prev_params,
                                   param_stats_options(histogram, nbins, maxval, weights_matrices_only, false)));
}

ParamStatsTuple param_stats_refresh_op(at::TensorList grads, at::TensorList params,
                                       at::TensorList init_params, at::TensorList prev_params,
                                       bool histogram, int64_t nbins, double maxval,
                                       bool weights_matrices_only) {
  return as_tuple(param_stats_impl("trainscope.param_stats", grads, params, init_params, prev_params,
                                   param_stats_options(histogram, nbins, maxval, weights_matrices_only, true)));
}

at::Tensor loss_op(const at::Tensor& losses) { return loss(losses); }

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY(trainscope, m) {
  m.def(
      "param_stats(Tensor[] grads, Tensor[] params, Tensor[] init_params, Tensor[] prev_params, "
      "bool histogram=True, int nbins=100, float maxval=0.05, bool weights_matrices_only=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "param_stats_refresh_(Tensor[] grads, Tensor[] params, Tensor[] init_params, "
      "Tensor(a!)[] prev_params, bool histogram=True, int nbins=100, float maxval=0.05, "
      "bool weights_matrices_only=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("loss(Tensor losses) -> Tensor");
  m.def("built_with_cuda() -> bool", &trainscope::built_with_cuda);
}

// Metrics are diagnostics, not differentiable outputs: below autograd the ops see plain tensors,
// and results never carry a grad_fn, even when the inputs are nn.Parameters.
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  m.impl("param_stats", torch::CppFunction::makeFallthrough());
  m.impl("param_stats_refresh_", torch::CppFunction::makeFallthrough());
  m.impl("loss", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(trainscope, CPU, m) {
  m.impl("param_stats", &trainscope::param_stats_op);
  m.impl("param_stats_refresh_", &trainscope::param_stats_refresh_op);
  m.impl("loss", &trainscope::loss_op);
}

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) {
  m.impl("param_stats", &trainscope::param_stats_op);
  m.impl("param_stats_refresh_", &trainscope::param_stats_refresh_op);
  m.impl("loss", &trainscope::loss_op);
}
