// alloc/spinlock.h
//
// A short-critical-section lock for weft's internals (wait lists of the
// sync types and channels, the inject queue, worker inboxes). It sits in
// alloc/, the lowest layer, so that every layer — and the public headers
// of runtime/, which embed it — can use the one implementation.
// Test-and-test-and-set with a pause, then sched_yield so a preempted
// holder gets the CPU back. Never held across a park or a system call that
// may block.
#pragma once

#include <sched.h>

#include <atomic>

namespace weft {

class spinlock {
 public:
  void lock() noexcept {
    for (int spins = 0;; ++spins) {
      // acquire: pairs with the release in unlock(); the protected data
      // written by the previous holder is visible after this succeeds.
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) {  // relaxed: a hint only
        if (spins++ < kSpinsBeforeYield)
          __builtin_ia32_pause();
        else
          sched_yield();
      }
    }
  }
  bool try_lock() noexcept {
    return !locked_.load(std::memory_order_relaxed) &&  // relaxed: a hint only
           !locked_.exchange(true, std::memory_order_acquire);  // as in lock()
  }
  void unlock() noexcept {
    locked_.store(false, std::memory_order_release);  // publishes the section; pairs with lock()
  }

 private:
  // Spins of ~40 cycles each before yielding: a critical section here is a
  // few list operations, so a holder that is not done after this was
  // probably preempted.
  static constexpr int kSpinsBeforeYield = 128;
  std::atomic<bool> locked_{false};
};

}  // namespace weft
