// Device-side histogram counting shared by the kernels of every family.
#pragma once

#include <cstdint>

namespace trainscope {
namespace cuda {

// Counts bin indices for one thread into a shared-memory histogram (per warp or per block) or,
// when that does not fit, straight into a global int64 histogram. Values crowd into a few bins
// (gradients into the two either side of zero), so most elements hit a bin one of the thread's
// last two elements hit: two per-thread (bin, count) slots are flushed only when a third bin
// turns up, which keeps the atomics off the hottest addresses. Integer atomics commute, so the
// counts are deterministic. Call flush() once the thread is done.
struct HistCounter {
  unsigned int* shared;        // shared-memory counters, or null
  unsigned long long* global;  // global counters, used when shared is null
  int32_t slot_bin[2];         // bins of up to 2^31 counters (flat index for 2-D histograms)
  unsigned int slot_count[2];

  __device__ void init(unsigned int* shared_counts, unsigned long long* global_counts) {
    shared = shared_counts;
    global = global_counts;
    slot_bin[0] = slot_bin[1] = -1;
    slot_count[0] = slot_count[1] = 0;
  }

  __device__ void flush_slot(int s) {
    if (slot_count[s] == 0) return;
    if (shared != nullptr) {
      atomicAdd(shared + slot_bin[s], slot_count[s]);
    } else {
      atomicAdd(global + slot_bin[s], static_cast<unsigned long long>(slot_count[s]));
    }
    slot_count[s] = 0;
  }

  __device__ void add(int32_t b) {
    if (b == slot_bin[0]) {
      ++slot_count[0];
    } else if (b == slot_bin[1]) {
      ++slot_count[1];
    } else {
      flush_slot(1);
      slot_bin[1] = slot_bin[0];
      slot_count[1] = slot_count[0];
      slot_bin[0] = b;
      slot_count[0] = 1;
    }
  }

  __device__ void flush() {
    flush_slot(0);
    flush_slot(1);
  }
};

}  // namespace cuda
}  // namespace trainscope
