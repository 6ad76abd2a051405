// A scope in which float32 convolutions on a GPU run in IEEE float32, for the convolutions and
// backward passes trainscope runs itself (the per-sample projections, the curvature family).
#pragma once

#include <ATen/Context.h>
#include <c10/core/Device.h>

namespace trainscope {

// While one lives, float32 convolutions on a GPU run in IEEE float32: cuDNN's default for them is
// TF32 (torch.backends.cudnn.conv.fp32_precision), whose inputs keep 10 mantissa bits (~5e-4
// relative), far beyond SPEC.md §5's 1e-5. The setting it found is restored; a CPU's is untouched.
class IeeeFloat32Convolutions {
 public:
  explicit IeeeFloat32Convolutions(const at::Device& device) : active_(device.is_cuda()) {
    if (!active_) return;
    previous_ = at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV);
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, at::Float32Precision::IEEE);
  }
  ~IeeeFloat32Convolutions() {
    if (active_) at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, previous_);
  }
  IeeeFloat32Convolutions(const IeeeFloat32Convolutions&) = delete;
  IeeeFloat32Convolutions& operator=(const IeeeFloat32Convolutions&) = delete;

 private:
  bool active_;
  at::Float32Precision previous_ = at::Float32Precision::NONE;
};

}  // namespace trainscope
