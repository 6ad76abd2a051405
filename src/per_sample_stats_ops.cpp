// Torch ops of the per-sample family: the parts of materialised per-sample gradients, and the
// statistics from parts (of any origin: materialised, layer factors, or summed over ranks).
#include <tuple>

#include <torch/library.h>

#include "src/per_sample_stats_internal.h"

namespace trainscope {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_sample_parts_op(
    at::TensorList per_sample_grads, bool histogram, int64_t nbins, double maxval) {
  PerSampleOptions o;
  o.histogram = histogram;
  o.nbins = nbins;
  o.maxval = maxval;
  const PerSampleStats s = per_sample_parts_impl("trainscope.per_sample_parts", per_sample_grads, o);
  return {s.parts.sq_norms, s.parts.dots, s.parts.mean_sq_norm, s.hist, s.nonfinite};
}

at::Tensor per_sample_stats_from_parts_op(const at::Tensor& sq_norms, const at::Tensor& dots,
                                          const at::Tensor& mean_sq_norm) {
  return per_sample_stats_from_parts(PerSampleParts{sq_norms, dots, mean_sq_norm});
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  m.def(
      "per_sample_parts(Tensor[] per_sample_grads, bool histogram=True, int nbins=100, "
      "float maxval=0.05) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("per_sample_stats_from_parts(Tensor sq_norms, Tensor dots, Tensor mean_sq_norm) -> Tensor");
}

// Diagnostics, not differentiable outputs (see param_stats_ops.cpp).
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  m.impl("per_sample_parts", torch::CppFunction::makeFallthrough());
  m.impl("per_sample_stats_from_parts", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(trainscope, CPU, m) {
  m.impl("per_sample_parts", &trainscope::per_sample_parts_op);
  m.impl("per_sample_stats_from_parts", &trainscope::per_sample_stats_from_parts_op);
}

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) {
  m.impl("per_sample_parts", &trainscope::per_sample_parts_op);
  m.impl("per_sample_stats_from_parts", &trainscope::per_sample_stats_from_parts_op);
}
