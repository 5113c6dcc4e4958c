// sched/inject_queue.h
//
// The global queue of runnable fibers: where fibers spawned or woken by
// plain threads go, and where a worker's overflowing run queue sends half of
// its fibers. A spinlock-protected ring of fiber pointers that grows by
// doubling. Pointers, not an intrusive list: taking a batch then copies
// contiguous words instead of chasing links through the control blocks of
// cold fibers, each on its own stack (a cache and TLB miss apiece).
//
// Invariants: under lock_, the fibers are ring_[(head_ + i) % cap] for
// i < size_; len_ mirrors size_ and is also read without the lock as an
// emptiness hint.
//
// Who calls what: every method, any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>

#include "sched/fiber.h"
#include "alloc/spinlock.h"

namespace weft::sched {

class inject_queue {
 public:
  void push(fiber* f) noexcept { push_batch(&f, 1); }

  // `n` fibers in FIFO order.
  void push_batch(fiber* const* fs, std::uint32_t n) noexcept {
    if (n == 0) return;
    std::lock_guard g(lock_);
    if (size_ + n > cap_) grow(size_ + n);
    for (std::uint32_t i = 0; i < n; ++i) ring_[(head_ + size_ + i) & (cap_ - 1)] = fs[i];
    size_ += n;
    // seq_cst: the publisher's store in the StoreLoad pattern with a worker
    // going to sleep (see *Spinning* in worker.cc).
    len_.store(size_, std::memory_order_seq_cst);
  }

  fiber* pop() noexcept {
    fiber* f = nullptr;
    return pop_batch(&f, 1) ? f : nullptr;
  }

  // Up to `max` fibers, FIFO, into out[]; returns how many.
  std::uint32_t pop_batch(fiber** out, std::uint32_t max) noexcept {
    if (empty_hint()) return 0;
    std::lock_guard g(lock_);
    std::uint32_t n = size_ < max ? size_ : max;
    for (std::uint32_t i = 0; i < n; ++i) out[i] = ring_[(head_ + i) & (cap_ - 1)];
    head_ = (head_ + n) & (cap_ - 1);
    size_ -= n;
    len_.store(size_, std::memory_order_relaxed);  // relaxed: writes are under lock_
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
  // lock_ held. Power-of-two capacity, unwrapped into the new ring.
  void grow(std::uint32_t need) {
    std::uint32_t cap = cap_ ? cap_ : 256;
    while (cap < need) cap *= 2;
    auto ring = std::make_unique<fiber*[]>(cap);
    for (std::uint32_t i = 0; i < size_; ++i) ring[i] = ring_[(head_ + i) & (cap_ - 1)];
    ring_ = std::move(ring);
    cap_ = cap;
    head_ = 0;
  }

  spinlock lock_;
  std::unique_ptr<fiber*[]> ring_;  // guarded by lock_
  std::uint32_t cap_ = 0, head_ = 0, size_ = 0;  // guarded by lock_
  std::atomic<std::uint32_t> len_{0};
};

}  // namespace weft::sched
