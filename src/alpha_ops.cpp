// Torch ops of the normalised step length (include/trainscope/alpha.h). Their fake kernels live in
// python_bindings/trainscope/alpha.py.
#include <torch/library.h>

#include "trainscope/alpha.h"

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  m.def("alpha_point_moments(Tensor losses, Tensor projections, Tensor t) -> Tensor");
  m.def("fit_quadratic(Tensor t, Tensor fs, Tensor dfs, Tensor fs_var, Tensor dfs_var) -> Tensor");
  m.def("alpha_from_fit(Tensor mu, Tensor t) -> Tensor");
}

// Diagnostics, not differentiable outputs (see param_stats_ops.cpp).
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  for (const char* name : {"alpha_point_moments", "fit_quadratic", "alpha_from_fit"}) {
    m.impl(name, torch::CppFunction::makeFallthrough());
  }
}

namespace {
void define_kernels(torch::Library& m) {
  m.impl("alpha_point_moments", &trainscope::alpha_point_moments);
  m.impl("fit_quadratic", &trainscope::fit_quadratic);
  m.impl("alpha_from_fit", &trainscope::alpha_from_fit);
}
}  // namespace

TORCH_LIBRARY_IMPL(trainscope, CPU, m) { define_kernels(m); }

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) { define_kernels(m); }
