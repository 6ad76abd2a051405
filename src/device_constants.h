// Host constants on the device, copied once: a layout's per-tensor counts and selections, which a
// training loop uses at every step. A CUDA graph captured after the copy reads the cached device
// tensor at every replay, so what a graph can read is never freed; the copy itself cannot be
// captured (a graph would replay it from a pinned host buffer the caching host allocator recycles
// at once), so a first use inside a capture is refused with an error saying what to do.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace trainscope {

// Whether the current stream of `device` is capturing a CUDA graph (false on the CPU).
bool is_capturing(const at::Device& device);

class DeviceConstantCache {
 public:
  // At most `max_unpinned` entries no capture has read; beyond that those are dropped (entries a
  // capture read stay for the life of the cache).
  explicit DeviceConstantCache(size_t max_unpinned) : max_unpinned_(max_unpinned) {}

  // `values` as a float64 tensor on `device`. `capturing`: the caller's stream is capturing a
  // CUDA graph, so the entry is pinned, and a missing one is an error naming `op`.
  at::Tensor get(const std::vector<double>& values, const at::Device& device, bool capturing, const char* op);

  size_t size() const;
  size_t pinned() const;

 private:
  struct Entry {
    at::Tensor tensor;
    bool pinned = false;
  };
  mutable std::mutex mutex_;
  size_t max_unpinned_;
  std::map<std::pair<std::string, std::vector<double>>, Entry> entries_;
};

// The process's cache (never destroyed: freeing device memory after CUDA shut down at exit would
// fail), with the capture state read from `device`'s current stream.
at::Tensor device_constants(const std::vector<double>& values, const at::Device& device, const char* op);

}  // namespace trainscope
