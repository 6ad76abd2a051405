// A setting made once per device, for launchers that must configure a kernel before its first
// launch (e.g. raise its dynamic shared-memory limit). Plain C++, so CPU tests exercise it.
//
// Why once, and never again: a kernel attribute is state of the device's context, shared by every
// thread and by every CUDA graph already captured. Setting it per call to that call's need lets a
// later, smaller call lower it under another thread's launch or under a graph's replay. Set once
// to the largest value any call will need, it only ever holds a value every launch fits under.
#pragma once

#include <mutex>
#include <set>
#include <utility>

namespace trainscope {
namespace cuda {

class OncePerDevice {
 public:
  // Runs `set()` (returning a status, 0 for success) the first time it is called for `device`,
  // and again on later calls only until it has succeeded once; returns `set()`'s status, or 0
  // when the setting was already made. Calls for one object are serialised.
  template <typename Set>
  auto run(int device, Set&& set) -> decltype(set()) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_.count(device) != 0) return decltype(set()){};
    const auto status = std::forward<Set>(set)();
    if (static_cast<int>(status) == 0) done_.insert(device);
    return status;
  }

  bool done(int device) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_.count(device) != 0;
  }

 private:
  mutable std::mutex mutex_;
  std::set<int> done_;
};

}  // namespace cuda
}  // namespace trainscope
