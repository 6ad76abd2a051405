// DeviceConstantCache (src/device_constants.h).
#include "src/device_constants.h"

#include <algorithm>

#if defined(TRAINSCOPE_WITH_CUDA)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace trainscope {

bool is_capturing(const at::Device& device) {
#if defined(TRAINSCOPE_WITH_CUDA)
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
#endif
  return false;
}

at::Tensor DeviceConstantCache::get(const std::vector<double>& values, const at::Device& device, bool capturing,
                                    const char* op) {
  const auto key = std::make_pair(device.str(), values);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(key);
    if (it != entries_.end()) {
      it->second.pinned = it->second.pinned || capturing;  // a graph may read it from now on
      return it->second.tensor;
    }
  }
  TORCH_CHECK(!capturing, op, ": called for the first time with these tensors inside a CUDA graph capture; "
              "its constants must reach the device first: run the same call (e.g. one training step) once "
              "eagerly before capturing");
  // Through pinned memory, without waiting (the caching host allocator keeps the buffer until the
  // copy is done).
  const auto host_opt = at::TensorOptions().dtype(at::kDouble).pinned_memory(device.is_cuda());
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, host_opt);
  std::copy(values.begin(), values.end(), host.data_ptr<double>());
  at::Tensor out = device.is_cpu() ? host : host.to(device, /*non_blocking=*/true);
  std::lock_guard<std::mutex> lock(mutex_);
  size_t unpinned = 0;
  for (const auto& e : entries_) unpinned += e.second.pinned ? 0 : 1;
  if (unpinned >= max_unpinned_) {
    // Drop what no capture read; an eager kernel still using one is safe (the caching allocator
    // reuses its memory only in stream order).
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.pinned ? std::next(it) : entries_.erase(it);
    }
  }
  return entries_.emplace(key, Entry{out, false}).first->second.tensor;
}

size_t DeviceConstantCache::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.size();
}

size_t DeviceConstantCache::pinned() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t n = 0;
  for (const auto& e : entries_) n += e.second.pinned ? 1 : 0;
  return n;
}

at::Tensor device_constants(const std::vector<double>& values, const at::Device& device, const char* op) {
  static auto& cache = *new DeviceConstantCache(64);
  return cache.get(values, device, is_capturing(device), op);
}

}  // namespace trainscope
