// sched/timer_heap.h
//
// Per-worker deadlines: a 4-ary min-heap of (deadline, node). A node is
// armed by its worker when a fiber parks with a deadline, and cancelled in
// O(1) by the fiber when it wakes for another reason; cancelled nodes are
// dropped lazily when they reach the top, or all at once by compact() when
// they are the majority. That check runs at every arm() as well as when
// timers fire: a server whose reads all finish long before their 30 s
// deadlines has nothing due for 30 s, and would otherwise pile up 30 s
// worth of cancelled nodes (Go clears its deleted timers when they pass a
// quarter of the heap, due or not).
//
// The timer handshake (why a node is freed by two different parties):
//   node state: armed -> firing -> fired     (a worker fires it)
//               armed -> cancelled           (the fiber cancels it)
//   - The firing worker (the owner, or a thief; see below) pops the node
//     under the heap's lock, CASes armed->firing, calls
//     claim(token, timed_out), then stores fired. It never touches the node again: the fiber frees it.
//   - The fiber, after resuming, CASes armed->cancelled; on success the heap
//     frees the node later. Otherwise it waits until `fired` (the worker is
//     inside a few instructions) and frees it. This is what makes claim()
//     on the node's token safe: the fiber cannot finish its cleanup, and so
//     cannot exit, while the worker is firing.
//
// Taking over a stuck worker's timers: a worker whose fiber computes
// without parking fires none of its timers, so another worker fires the
// overdue ones for it (worker::steal_timers; Go's stealWork runs other Ps'
// timers the same way). The heap is therefore guarded by a spinlock that
// the owner takes to arm and fire (uncontended but for a thief, ~5 ns),
// and a thief only tries. next_deadline() and size() are snapshots
// published under the lock, readable without it.
//
// Who calls what:
//   arm()                        the owning worker
//   fire_expired()               the owning worker; a thief with try_only
//   next_deadline(), size(), armed()   any thread (snapshots; the owner never sees
//                                a later deadline or a smaller size than the
//                                truth, since only the owner adds: it may
//                                wake early, never late)
//   finish()                     the parked fiber, once
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "alloc/spinlock.h"
#include "sched/park.h"

namespace weft::sched {

class timer_heap;

struct timer_node {
  enum : std::uint8_t { armed, firing, fired, cancelled };
  std::atomic<std::uint8_t> state{armed};
  wake_token token;
  timer_heap* owner = nullptr;  // the heap that holds it (lives as long as its worker)
};

class timer_heap {
 public:
  timer_heap() = default;
  ~timer_heap();  // frees cancelled nodes; no armed node may remain
  timer_heap(const timer_heap&) = delete;
  timer_heap& operator=(const timer_heap&) = delete;

  timer_node* arm(clock::time_point deadline, wake_token t);
  // Fires every node whose deadline is <= now; claimed fibers are passed to
  // on_ready (under the heap's lock: keep it short). Returns how many
  // fibers it claimed. With try_only, gives up at once if the lock is held.
  template <typename F>
  unsigned fire_expired(clock::time_point now, F&& on_ready, bool try_only = false);
  // The earliest deadline, or time_point::max() if none (a snapshot).
  clock::time_point next_deadline() const noexcept {
    // relaxed: a snapshot published under lock_; see *Who calls what*.
    return clock::time_point(clock::duration(next_due_.load(std::memory_order_relaxed)));
  }
  std::size_t size() const noexcept {
    return size_.load(std::memory_order_relaxed);  // relaxed: as next_deadline()
  }
  // Nodes still armed (size() less the cancelled ones). Exact when read by
  // the deadlock detector: every worker is idle then, and each party
  // published its change before taking the idle lock the detector holds.
  std::size_t armed() const noexcept {
    // relaxed: as size(); see above for when it is exact.
    std::ptrdiff_t live = static_cast<std::ptrdiff_t>(size()) -
                          cancelled_.load(std::memory_order_relaxed);
    return live > 0 ? static_cast<std::size_t>(live) : 0;
  }

  // The fiber's side of the handshake; frees or hands over the node.
  static void finish(timer_node* n) noexcept;

 private:
  struct entry {
    clock::time_point when;
    timer_node* node;
  };
  static constexpr std::size_t kArity = 4;
  void push(entry e);
  entry pop();
  void sift_down(std::size_t i);
  bool mostly_cancelled() const noexcept;  // under lock_: worth a compact()
  void compact();
  fiber* fire(timer_node* n) noexcept;
  void publish_snapshot() noexcept;  // under lock_

  spinlock lock_;
  std::vector<entry> heap_;  // guarded by lock_
  // Snapshots of heap_'s top deadline and size, stored under lock_.
  std::atomic<clock::rep> next_due_{clock::time_point::max().time_since_epoch().count()};
  std::atomic<std::size_t> size_{0};
  // Cancelled nodes still in heap_; incremented by fibers on any thread
  // (relaxed: a compaction heuristic; may lag or lead by a few).
  std::atomic<std::ptrdiff_t> cancelled_{0};
};

template <typename F>
unsigned timer_heap::fire_expired(clock::time_point now, F&& on_ready, bool try_only) {
  if (next_deadline() > now) return 0;  // the common case: nothing due, no lock
  if (try_only) {
    if (!lock_.try_lock()) return 0;
  } else {
    lock_.lock();
  }
  unsigned n = 0;
  while (!heap_.empty() && heap_.front().when <= now) {
    entry e = pop();
    if (fiber* f = fire(e.node)) {
      on_ready(f);
      ++n;
    }
  }
  if (mostly_cancelled()) compact();
  publish_snapshot();
  lock_.unlock();
  return n;
}

}  // namespace weft::sched
