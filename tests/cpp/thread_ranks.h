// Ranks as threads of one test process, for the cross-rank functions (trainscope/distributed.h):
// each rank's RankGroup sums through shared memory, in rank order (so the sums are the same
// bits on every rank), with a barrier before and after.
//
//   trainscope_test::ThreadRanks ranks(3);
//   ranks.run([&](int64_t rank, const trainscope::RankGroup& group) { ... });
//
// Not a test executable (tests/CMakeLists.txt globs test_*).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

#include "trainscope/distributed.h"

namespace trainscope_test {

class ThreadRanks {
 public:
  explicit ThreadRanks(int64_t size) : size_(size), slots_(static_cast<size_t>(size)) {}

  trainscope::RankGroup group(int64_t rank) {
    return trainscope::RankGroup(rank, size_, [this, rank](at::Tensor& t) { all_reduce(rank, t); }, "threads");
  }

  // Runs body(rank, group) on one thread per rank; rethrows the first exception of any rank.
  void run(const std::function<void(int64_t, const trainscope::RankGroup&)>& body) {
    std::vector<std::thread> threads;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(size_));
    for (int64_t r = 0; r < size_; ++r) {
      threads.emplace_back([&, r] {
        try {
          body(r, group(r));
        } catch (...) {
          errors[static_cast<size_t>(r)] = std::current_exception();
        }
      });
    }
    for (std::thread& t : threads) t.join();
    for (const std::exception_ptr& e : errors) {
      if (e) std::rethrow_exception(e);
    }
  }

 private:
  void barrier() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

  void all_reduce(int64_t rank, at::Tensor& t) {
    slots_[static_cast<size_t>(rank)] = t.clone();
    barrier();
    at::Tensor sum = slots_[0].clone();
    for (int64_t r = 1; r < size_; ++r) sum.add_(slots_[static_cast<size_t>(r)]);
    barrier();  // every rank has read every slot
    t.copy_(sum);
  }

  int64_t size_;
  std::vector<at::Tensor> slots_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int64_t arrived_ = 0, generation_ = 0;
};

// fn(rank, group) on one thread per rank (ThreadRanks::run); the results in rank order.
template <typename Result>
std::vector<Result> collect_ranks(int64_t size,
                                  const std::function<Result(int64_t, const trainscope::RankGroup&)>& fn) {
  ThreadRanks ranks(size);
  std::vector<Result> out(static_cast<size_t>(size));
  ranks.run([&](int64_t rank, const trainscope::RankGroup& group) { out[static_cast<size_t>(rank)] = fn(rank, group); });
  return out;
}

// A group of `size` whose all-reduce must not be reached: for checks that must fail before it
// (on one thread: a rank that throws there would leave the others waiting).
inline trainscope::RankGroup unreachable_group(int64_t rank, int64_t size) {
  return trainscope::RankGroup(
      rank, size, [](at::Tensor&) { throw std::logic_error("trainscope_test: the all-reduce was reached"); },
      "unreachable");
}

}  // namespace trainscope_test
