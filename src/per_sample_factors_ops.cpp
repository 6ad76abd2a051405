// Torch ops of the layer-factor family: per-sample parts, histograms, moments and projections of nn.Linear and
// nn.Conv2d from their inputs and output gradients (include/trainscope/per_sample_factors.h).
// Fake kernels live in python_bindings/trainscope/per_sample_factors.py.
#include <optional>
#include <string>
#include <tuple>

#include <torch/library.h>

#include "trainscope/per_sample_factors.h"

namespace trainscope {
namespace {

using PartsTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

PartsTuple as_tuple(const PerSampleParts& p) { return {p.sq_norms, p.dots, p.mean_sq_norm}; }

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

Hist2dOptions hist2d_options(int64_t nbins_grad, double maxval_grad, int64_t nbins_param,
                             double maxval_param) {
  return Hist2dOptions{nbins_grad, maxval_grad, nbins_param, maxval_param};
}

// One adapter per op for both overloads: In is `const at::Tensor&` (one use of the layer) or
// at::TensorList (".uses": every use in one step, one tensor per use), as the C++ API overloads.

template <typename In>
PartsTuple linear_parts_op(In input, In grad_output, bool has_bias, c10::string_view method) {
  return as_tuple(linear_per_sample_parts(input, grad_output, has_bias, parse_factor_method(std::string(method))));
}

template <typename In>
PartsTuple conv2d_parts_op(In input, In grad_output, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool has_bias,
                           c10::string_view method) {
  return as_tuple(conv2d_per_sample_parts(input, grad_output, kernel_size, stride, padding, dilation, groups,
                                          has_bias, parse_factor_method(std::string(method))));
}

using PartsAndGradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Without a bias, an empty [0] bias gradient.
PartsAndGradTuple as_tuple(const PerSamplePartsAndWeightGrad& r) {
  const at::Tensor bias = r.bias_grad.defined() ? r.bias_grad : at::empty({0}, r.parts.sq_norms.options());
  return {r.parts.sq_norms, r.parts.dots, r.parts.mean_sq_norm, r.weight_grad, bias};
}

PartsAndGradTuple linear_parts_and_grad_op(const at::Tensor& input, const at::Tensor& grad_output, bool has_bias,
                                           c10::string_view method) {
  return as_tuple(linear_per_sample_parts_and_weight_grad(input, grad_output, has_bias,
                                                          parse_factor_method(std::string(method))));
}

PartsAndGradTuple conv2d_parts_and_grad_op(const at::Tensor& input, const at::Tensor& grad_output,
                                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                           bool has_bias, c10::string_view method) {
  return as_tuple(conv2d_per_sample_parts_and_weight_grad(input, grad_output, kernel_size, stride, padding,
                                                          dilation, groups, has_bias,
                                                          parse_factor_method(std::string(method))));
}

template <typename In>
at::Tensor linear_hist1d_op(In input, In grad_output, bool has_bias, int64_t nbins, double maxval) {
  return linear_per_sample_grad_hist1d(input, grad_output, has_bias, nbins, maxval);
}

template <typename In>
at::Tensor conv2d_hist1d_op(In input, In grad_output, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool has_bias,
                            int64_t nbins, double maxval) {
  return conv2d_per_sample_grad_hist1d(input, grad_output, kernel_size, stride, padding, dilation, groups,
                                       has_bias, nbins, maxval);
}

template <typename In>
std::tuple<at::Tensor, at::Tensor> linear_hist2d_op(In input, In grad_output, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, int64_t nbins_grad,
                                                    double maxval_grad, int64_t nbins_param, double maxval_param) {
  return linear_per_sample_grad_hist2d(input, grad_output, weight, or_undefined(bias),
                                       hist2d_options(nbins_grad, maxval_grad, nbins_param, maxval_param));
}

template <typename In>
std::tuple<at::Tensor, at::Tensor> conv2d_hist2d_op(In input, In grad_output, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                                    int64_t groups, int64_t nbins_grad, double maxval_grad,
                                                    int64_t nbins_param, double maxval_param) {
  return conv2d_per_sample_grad_hist2d(input, grad_output, weight, or_undefined(bias), stride, padding, dilation,
                                       groups, hist2d_options(nbins_grad, maxval_grad, nbins_param, maxval_param));
}

using MomentsTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Without a bias, its two sums are empty [0] tensors.
MomentsTuple as_tuple(const PerSampleMoments& m) {
  auto none = [&] { return at::empty({0}, m.weight_sum.options()); };  // one each: outputs never alias
  return {m.weight_sum, m.weight_sq_sum, m.bias_sum.defined() ? m.bias_sum : none(),
          m.bias_sq_sum.defined() ? m.bias_sq_sum : none()};
}

template <typename In>
MomentsTuple linear_moments_op(In input, In grad_output, bool has_bias) {
  return as_tuple(linear_per_sample_grad_moments(at::TensorList(input), at::TensorList(grad_output), has_bias));
}

template <typename In>
MomentsTuple conv2d_moments_op(In input, In grad_output, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool has_bias) {
  return as_tuple(conv2d_per_sample_grad_moments(at::TensorList(input), at::TensorList(grad_output), kernel_size,
                                                 stride, padding, dilation, groups, has_bias));
}

template <typename In>
at::Tensor linear_projections_op(In input, In grad_output, const at::Tensor& weight_dir,
                                 const std::optional<at::Tensor>& bias_dir) {
  return linear_per_sample_projections(at::TensorList(input), at::TensorList(grad_output), weight_dir,
                                       or_undefined(bias_dir));
}

template <typename In>
at::Tensor conv2d_projections_op(In input, In grad_output, const at::Tensor& weight_dir,
                                 const std::optional<at::Tensor>& bias_dir, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_per_sample_projections(at::TensorList(input), at::TensorList(grad_output), weight_dir,
                                       or_undefined(bias_dir), stride, padding, dilation, groups);
}

}  // namespace
}  // namespace trainscope

// Each op has a second overload, ".uses", taking the input and output gradient of every use of
// the layer in one step as lists (include/trainscope/per_sample_factors.h).
TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  m.def("linear_per_sample_parts(Tensor input, Tensor grad_output, bool has_bias=True, "
        "str method=\"auto\") -> (Tensor, Tensor, Tensor)");
  m.def("conv2d_per_sample_parts(Tensor input, Tensor grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True, "
        "str method=\"auto\") -> (Tensor, Tensor, Tensor)");
  // The parts, the layer's weight gradient Σᵢ Gᵢ shaped as its weight, and its bias gradient
  // (float64; empty without has_bias).
  m.def("linear_per_sample_parts_and_weight_grad(Tensor input, Tensor grad_output, bool has_bias=True, "
        "str method=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("conv2d_per_sample_parts_and_weight_grad(Tensor input, Tensor grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True, "
        "str method=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_per_sample_grad_hist1d(Tensor input, Tensor grad_output, bool has_bias=True, "
        "int nbins=100, float maxval=0.05) -> Tensor");
  m.def("conv2d_per_sample_grad_hist1d(Tensor input, Tensor grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True, "
        "int nbins=100, float maxval=0.05) -> Tensor");
  m.def("linear_per_sample_grad_hist2d(Tensor input, Tensor grad_output, Tensor weight, "
        "Tensor? bias=None, int nbins_grad=100, float maxval_grad=0.05, int nbins_param=100, "
        "float maxval_param=1.0) -> (Tensor, Tensor)");
  m.def("conv2d_per_sample_grad_hist2d(Tensor input, Tensor grad_output, Tensor weight, "
        "Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, "
        "int nbins_grad=100, float maxval_grad=0.05, int nbins_param=100, float maxval_param=1.0) "
        "-> (Tensor, Tensor)");
  m.def("linear_per_sample_grad_moments(Tensor input, Tensor grad_output, bool has_bias=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv2d_per_sample_grad_moments(Tensor input, Tensor grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_per_sample_grad_moments.uses(Tensor[] input, Tensor[] grad_output, bool has_bias=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv2d_per_sample_grad_moments.uses(Tensor[] input, Tensor[] grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_per_sample_projections(Tensor input, Tensor grad_output, Tensor weight_dir, "
        "Tensor? bias_dir=None) -> Tensor");
  m.def("conv2d_per_sample_projections(Tensor input, Tensor grad_output, Tensor weight_dir, "
        "Tensor? bias_dir=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor");
  m.def("linear_per_sample_projections.uses(Tensor[] input, Tensor[] grad_output, Tensor weight_dir, "
        "Tensor? bias_dir=None) -> Tensor");
  m.def("conv2d_per_sample_projections.uses(Tensor[] input, Tensor[] grad_output, Tensor weight_dir, "
        "Tensor? bias_dir=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor");
  m.def("linear_per_sample_parts.uses(Tensor[] input, Tensor[] grad_output, bool has_bias=True, "
        "str method=\"auto\") -> (Tensor, Tensor, Tensor)");
  m.def("conv2d_per_sample_parts.uses(Tensor[] input, Tensor[] grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True, "
        "str method=\"auto\") -> (Tensor, Tensor, Tensor)");
  m.def("linear_per_sample_grad_hist1d.uses(Tensor[] input, Tensor[] grad_output, bool has_bias=True, "
        "int nbins=100, float maxval=0.05) -> Tensor");
  m.def("conv2d_per_sample_grad_hist1d.uses(Tensor[] input, Tensor[] grad_output, int[2] kernel_size, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, bool has_bias=True, "
        "int nbins=100, float maxval=0.05) -> Tensor");
  m.def("linear_per_sample_grad_hist2d.uses(Tensor[] input, Tensor[] grad_output, Tensor weight, "
        "Tensor? bias=None, int nbins_grad=100, float maxval_grad=0.05, int nbins_param=100, "
        "float maxval_param=1.0) -> (Tensor, Tensor)");
  m.def("conv2d_per_sample_grad_hist2d.uses(Tensor[] input, Tensor[] grad_output, Tensor weight, "
        "Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1, "
        "int nbins_grad=100, float maxval_grad=0.05, int nbins_param=100, float maxval_param=1.0) "
        "-> (Tensor, Tensor)");
}

// Diagnostics, not differentiable outputs (see param_stats_ops.cpp).
TORCH_LIBRARY_IMPL(trainscope, Autograd, m) {
  for (const char* name : {"linear_per_sample_parts", "conv2d_per_sample_parts",
                           "linear_per_sample_parts_and_weight_grad", "conv2d_per_sample_parts_and_weight_grad",
                           "linear_per_sample_grad_hist1d", "conv2d_per_sample_grad_hist1d",
                           "linear_per_sample_grad_hist2d", "conv2d_per_sample_grad_hist2d",
                           "linear_per_sample_parts.uses", "conv2d_per_sample_parts.uses",
                           "linear_per_sample_grad_hist1d.uses", "conv2d_per_sample_grad_hist1d.uses",
                           "linear_per_sample_grad_hist2d.uses", "conv2d_per_sample_grad_hist2d.uses",
                           "linear_per_sample_grad_moments", "conv2d_per_sample_grad_moments",
                           "linear_per_sample_grad_moments.uses", "conv2d_per_sample_grad_moments.uses",
                           "linear_per_sample_projections", "conv2d_per_sample_projections",
                           "linear_per_sample_projections.uses", "conv2d_per_sample_projections.uses"}) {
    m.impl(name, torch::CppFunction::makeFallthrough());
  }
}

namespace {
void define_kernels(torch::Library& m) {
  using One = const at::Tensor&;
  using Uses = at::TensorList;
  m.impl("linear_per_sample_parts", &trainscope::linear_parts_op<One>);
  m.impl("conv2d_per_sample_parts", &trainscope::conv2d_parts_op<One>);
  m.impl("linear_per_sample_parts_and_weight_grad", &trainscope::linear_parts_and_grad_op);
  m.impl("conv2d_per_sample_parts_and_weight_grad", &trainscope::conv2d_parts_and_grad_op);
  m.impl("linear_per_sample_grad_hist1d", &trainscope::linear_hist1d_op<One>);
  m.impl("conv2d_per_sample_grad_hist1d", &trainscope::conv2d_hist1d_op<One>);
  m.impl("linear_per_sample_grad_hist2d", &trainscope::linear_hist2d_op<One>);
  m.impl("conv2d_per_sample_grad_hist2d", &trainscope::conv2d_hist2d_op<One>);
  m.impl("linear_per_sample_parts.uses", &trainscope::linear_parts_op<Uses>);
  m.impl("conv2d_per_sample_parts.uses", &trainscope::conv2d_parts_op<Uses>);
  m.impl("linear_per_sample_grad_hist1d.uses", &trainscope::linear_hist1d_op<Uses>);
  m.impl("conv2d_per_sample_grad_hist1d.uses", &trainscope::conv2d_hist1d_op<Uses>);
  m.impl("linear_per_sample_grad_hist2d.uses", &trainscope::linear_hist2d_op<Uses>);
  m.impl("conv2d_per_sample_grad_hist2d.uses", &trainscope::conv2d_hist2d_op<Uses>);
  m.impl("linear_per_sample_grad_moments", &trainscope::linear_moments_op<One>);
  m.impl("conv2d_per_sample_grad_moments", &trainscope::conv2d_moments_op<One>);
  m.impl("linear_per_sample_grad_moments.uses", &trainscope::linear_moments_op<Uses>);
  m.impl("conv2d_per_sample_grad_moments.uses", &trainscope::conv2d_moments_op<Uses>);
  m.impl("linear_per_sample_projections", &trainscope::linear_projections_op<One>);
  m.impl("conv2d_per_sample_projections", &trainscope::conv2d_projections_op<One>);
  m.impl("linear_per_sample_projections.uses", &trainscope::linear_projections_op<Uses>);
  m.impl("conv2d_per_sample_projections.uses", &trainscope::conv2d_projections_op<Uses>);
}
}  // namespace

TORCH_LIBRARY_IMPL(trainscope, CPU, m) { define_kernels(m); }

TORCH_LIBRARY_IMPL(trainscope, CUDA, m) { define_kernels(m); }
