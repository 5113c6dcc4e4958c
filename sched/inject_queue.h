// sched/inject_queue.h
//
// The global queue of runnable fibers: where fibers spawned or woken by
// plain threads go, and where a worker's overflowing run queue sends half of
// its fibers. A spinlock-protected intrusive FIFO (link: fiber::next_).
//
// Invariants: len_ equals the number of fibers in the list whenever the
// lock is free; it is also read without the lock as an emptiness hint.
//
// Who calls what: push(), push_batch(), pop(), pop_batch(): any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

#include "sched/fiber.h"
#include "sched/spinlock.h"

namespace weft::sched {

class inject_queue {
 public:
  void push(fiber* f) noexcept {
    f->next_ = nullptr;
    std::lock_guard g(lock_);
    append(f, f, 1);
  }
  // `n` fibers in FIFO order from an array.
  void push_batch(fiber** fs, std::uint32_t n) noexcept {
    if (n == 0) return;
    for (std::uint32_t i = 0; i + 1 < n; ++i) fs[i]->next_ = fs[i + 1];
    fs[n - 1]->next_ = nullptr;
    std::lock_guard g(lock_);
    append(fs[0], fs[n - 1], n);
  }
  fiber* pop() noexcept {
    if (empty_hint()) return nullptr;
    std::lock_guard g(lock_);
    fiber* f = head_;
    if (!f) return nullptr;
    head_ = f->next_;
    if (!head_) tail_ = nullptr;
    len_.store(len_.load(std::memory_order_relaxed) - 1,
               std::memory_order_relaxed);  // relaxed: writes are under lock_
    return f;
  }
  // Up to `max` fibers, FIFO, into out[]; returns how many.
  std::uint32_t pop_batch(fiber** out, std::uint32_t max) noexcept {
    if (empty_hint()) return 0;
    std::lock_guard g(lock_);
    std::uint32_t n = 0;
    while (n < max && head_) {
      out[n++] = head_;
      head_ = head_->next_;
    }
    if (!head_) tail_ = nullptr;
    len_.store(len_.load(std::memory_order_relaxed) - n,
               std::memory_order_relaxed);  // relaxed: writes are under lock_
    return n;
  }
  // seq_cst: the sleeping worker's re-check in the StoreLoad pattern with
  // wake_idle_worker() (see *Spinning* in worker.cc).
  bool empty_hint() const noexcept {
    return len_.load(std::memory_order_seq_cst) == 0;
  }
  std::uint64_t size_hint() const noexcept {
    return len_.load(std::memory_order_relaxed);  // relaxed: statistic
  }

 private:
  void append(fiber* first, fiber* last, std::uint32_t n) noexcept {
    if (tail_)
      tail_->next_ = first;
    else
      head_ = first;
    tail_ = last;
    // seq_cst: the publisher's store in the StoreLoad pattern with a worker
    // going to sleep (see *Spinning* in worker.cc).
    len_.store(len_.load(std::memory_order_relaxed) + n,
               std::memory_order_seq_cst);
  }

  spinlock lock_;
  fiber* head_ = nullptr;  // guarded by lock_
  fiber* tail_ = nullptr;  // guarded by lock_
  std::atomic<std::uint64_t> len_{0};
};

}  // namespace weft::sched
