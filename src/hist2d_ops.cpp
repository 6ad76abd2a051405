// Torch op of the 2-D histogram family: schema and its CPU and CUDA kernels. The fake kernel
// torch.compile traces is registered in python_bindings/trainscope/hist2d.py.
#include <tuple>

#include <torch/library.h>

#include "trainscope/hist2d.h"

namespace trainscope {
namespace {

std::tuple<at::Tensor, at::Tensor> grad_hist2d_op(at::TensorList per_sample_grads, at::TensorList params,
                                                  int64_t nbins_grad, double maxval_grad, int64_t nbins_param,
                                                  double maxval_param) {
  const Hist2d h = grad_hist2d(per_sample_grads, params,
                               Hist2dOptions{nbins_grad, maxval_grad, nbins_param, maxval_param});
  return {h.counts, h.nonfinite};
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  m.def(
      "grad_hist2d(Tensor[] per_sample_grads, Tensor[] params, int nbins_grad=100, float maxval_grad=0.05, "
      "int nbins_param=100, float maxval_param=1.0) -> (Tensor, Tensor)");
}

// A diagnostic, not a differentiable output: below autograd the op sees plain tensors, and its
// results never carry a grad_fn, even for nn.Parameters.
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  m.impl("grad_hist2d", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(trainscope, CPU, m) { m.impl("grad_hist2d", &trainscope::grad_hist2d_op); }

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) { m.impl("grad_hist2d", &trainscope::grad_hist2d_op); }
