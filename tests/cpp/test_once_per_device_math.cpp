// OncePerDevice (cuda/once_per_device.h): a per-device setting made once, retried until it
// succeeds, never repeated after, and made once however many threads ask at the same time.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "cuda/once_per_device.h"

namespace {

using trainscope::cuda::OncePerDevice;

TEST(OncePerDevice, RunsOncePerDeviceAfterSuccess) {
  OncePerDevice once;
  int calls = 0;
  auto set = [&] { ++calls; return 0; };
  EXPECT_EQ(once.run(0, set), 0);
  EXPECT_EQ(once.run(0, set), 0);
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(once.done(0));
  EXPECT_FALSE(once.done(1));
  EXPECT_EQ(once.run(1, set), 0);
  EXPECT_EQ(calls, 2);
}

TEST(OncePerDevice, AFailureIsReturnedAndRetried) {
  OncePerDevice once;
  int calls = 0;
  EXPECT_EQ(once.run(3, [&] { ++calls; return 7; }), 7);
  EXPECT_FALSE(once.done(3));
  EXPECT_EQ(once.run(3, [&] { ++calls; return 0; }), 0);
  EXPECT_EQ(once.run(3, [&] { ++calls; return 9; }), 0);  // already made: not run again
  EXPECT_EQ(calls, 2);
}

TEST(OncePerDevice, ConcurrentCallersSetItOnce) {
  OncePerDevice once;
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) once.run(i % 2, [&] { ++calls; return 0; });
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(calls.load(), 2);
}

}  // namespace
