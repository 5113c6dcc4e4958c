// sched/fiber.h
//
// The fiber control block. It lives at the top of the fiber's own stack
// (one allocation per fiber: the stack), directly above the fiber's callable.
// See *The park protocol* in sched/park.cc for how `state_` is used.
//
// Invariants:
//   - A fiber runs on at most one worker at a time. Only the thread running
//     it, or the scheduler that just switched away from it, touches the
//     fields marked "owner".
//   - state_ holds (generation << 5 | cancellable << 4 | reason << 2 |
//     phase). The generation grows by one at every park, so a wake meant for
//     an earlier park fails its compare-exchange.
//   - A pinned fiber (home_ != nullptr) is only ever run by home_.
#pragma once

#include <atomic>
#include <cstdint>
#include <source_location>

#include "alloc/stack_pool.h"
#include "sched/context.h"

namespace weft::sched {

class worker;
struct timer_node;

enum class park_phase : std::uint8_t {
  running = 0,  // on a worker, or runnable in a queue
  parking = 1,  // switched away, not yet published as parked (see park.cc)
  parked = 2,   // waiting for a wake
  woken = 3,    // a wake won; the fiber is (being) made runnable
};

enum class wake_reason : std::uint8_t {
  notified = 0,   // the thing it waited for happened
  timed_out = 1,  // its deadline passed
  cancelled = 2,  // stop requested, or the runtime is unwinding
};

struct fiber {
  // --- set at spawn, then immutable
  exec_context ctx_;
  alloc::stack stack_;
  std::uint64_t id_ = 0;
  worker* home_ = nullptr;  // non-null: pinned to this worker
  // Placed on a worker without being pinned: pinned (home_) until its first
  // run, so no thief moves it before it starts there; fiber_main clears
  // home_ then, before anyone else can read it.
  bool unpin_on_start_ = false;
  void (*body_)(void*) = nullptr;     // runs the callable at callable_, destroys it
  void (*discard_)(void*) = nullptr;  // destroys the callable unrun
  void* callable_ = nullptr;           // the callable, just below this block
  char name_[32] = {};

  // --- the park protocol (see sched/park.cc)
  // Writers: park() (owner) and the wake CAS (any thread). acquire/release
  // as stated at each use.
  std::atomic<std::uint64_t> state_{0};
  std::uint64_t gen_ = 0;             // owner: generation of the last park
  // The generation whose after_park() has finished touching this block;
  // written by the parking worker, awaited by the fiber (see park.cc).
  std::atomic<std::uint64_t> after_park_gen_{0};
  timer_node* timer_ = nullptr;       // owner: the deadline of the current park
  // What it waits on and where it parked, for dump() and the deadlock
  // report. Written by the owner at each park, read by dump() from any
  // thread: relaxed atomics, a diagnostic snapshot (the three may come
  // from different parks while the fiber runs; a parked fiber's are exact).
  std::atomic<const char*> wait_what_{"runnable"};
  std::atomic<const char*> park_file_{""};
  std::atomic<std::uint32_t> park_line_{0};

  // Set by request_stop() / the unwinder (any thread), read by the owner
  // and the scheduler; seq_cst, see *Stopping a parked fiber* in park.cc.
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> unwinding_{false};

  // --- queues and registry
  fiber* next_ = nullptr;  // link in a worker's inbox or pinned queue; guarded by that queue
  std::uint32_t reg_slot_ = 0;  // its slot in the fiber_registry

  void* fls_ = nullptr;  // fiber-local storage table; owner only
  // The worker that last ran it (relaxed: observability and tests only).
  std::atomic<unsigned> last_worker_{~0u};
  std::atomic<bool> started_{false};  // body entered (relaxed: diagnostic)
};

// Phase and reason packing of fiber::state_.
inline constexpr std::uint64_t pack_state(std::uint64_t gen, park_phase p,
                                          bool cancellable = false,
                                          wake_reason r = wake_reason::notified) {
  return gen << 5 | std::uint64_t{cancellable} << 4 |
         static_cast<std::uint64_t>(r) << 2 | static_cast<std::uint64_t>(p);
}
inline constexpr bool cancellable_of(std::uint64_t s) { return (s >> 4) & 1; }
inline constexpr park_phase phase_of(std::uint64_t s) {
  return static_cast<park_phase>(s & 3);
}
inline constexpr wake_reason reason_of(std::uint64_t s) {
  return static_cast<wake_reason>((s >> 2) & 3);
}
inline constexpr std::uint64_t gen_of(std::uint64_t s) { return s >> 5; }

// The block sits at the top of its stack, 64-byte aligned.
inline fiber* fiber_at_top(const alloc::stack& s) {
  auto top = reinterpret_cast<std::uintptr_t>(s.hi) - sizeof(fiber);
  return reinterpret_cast<fiber*>(top & ~std::uintptr_t{63});
}

}  // namespace weft::sched
