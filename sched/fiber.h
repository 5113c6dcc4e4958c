// sched/fiber.h
//
// The fiber control block. It is one heap allocation with the fiber's
// callable right after it; the stack is bound only when the fiber first
// runs (bind_stack() in scheduler.cc), from the running worker's warm
// cache. So a fiber spawned but not yet started costs a few cache lines,
// not a stack: a spawner that runs ahead of its children (a million
// pending fibers) touches no fresh stack pages, and the stack a child gets
// is the one the previous child just left, hot in cache. The top
// kStackTopReserve bytes of a bound stack hold a back-pointer to the block
// (fiber_of_stack()), for the overflow handler.
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
class stop_state;  // sched/park.h
struct timer_node;
void release_stop_state(stop_state* s) noexcept;  // sched/park.cc

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
  // Fields are ordered to pack (the block is per fiber, and a million
  // parked fibers pay for every word of it) and so that the first cache
  // line holds what a waker touches: state_ (its claim's CAS), home_
  // (where ready() queues it), and ctx_.fctx and stack_hi_ (ready()'s
  // prefetch of the stack). A wake of a cold fiber then misses on one
  // line of its block.
  exec_context ctx_;  // switch state; fctx written at every switch away
  // The park protocol (see sched/park.cc): written by park() (owner) and
  // the wake CAS (any thread); acquire/release as stated at each use.
  std::atomic<std::uint64_t> state_{0};
  worker* home_ = nullptr;  // non-null: pinned to this worker (see unpin_on_start_)
  const std::byte* stack_hi_ = nullptr;  // stack_.hi: where ready()'s prefetch stops

  // --- set at spawn (stack_ at the first run), then immutable.
  alloc::stack stack_;               // empty until the first run
  std::uint32_t stack_want_ = 0;     // the stack size it asked for
  std::uint32_t reg_slot_ = 0;       // its slot in the fiber_registry
  std::uint64_t id_ = 0;
  void (*body_)(void*) = nullptr;     // runs the callable at callable_, destroys it
  void (*discard_)(void*) = nullptr;  // destroys the callable unrun
  void* callable_ = nullptr;          // the callable, after this block
  const char* name_ = "";             // its name, after the callable

  // --- the rest of the park protocol (state_ is above)
  std::uint64_t gen_ = 0;  // owner: generation of the last park
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

  // The worker that last ran it (relaxed: observability and tests only).
  std::atomic<unsigned> last_worker_{~0u};
  // Set by request_stop() / the unwinder (any thread), read by the owner
  // and the scheduler; seq_cst, see *Stopping a parked fiber* in park.cc.
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> unwinding_{false};
  std::atomic<bool> started_{false};  // body entered (relaxed: diagnostic)
  // Placed on a worker without being pinned: pinned (home_) until its first
  // run, so no thief moves it before it starts there; fiber_main clears
  // home_ then, before anyone else can read it.
  bool unpin_on_start_ = false;
  std::uint8_t callable_align_ = 0;  // log2 of the callable's alignment
  // Its block's alloc::block_cache class plus one; 0: from operator new.
  std::uint8_t block_class_ = 0;
  bool canary_ = false;  // its stack has no guard page: check the canary at switches
  // Owner: its body has returned, or been unwound, or was discarded unrun;
  // what runs now are destructors (its callable's, its fiber_locals'), so
  // unwind_point() no longer throws (see park.h).
  bool body_ended_ = false;

  // --- queues
  fiber* next_ = nullptr;  // link in a worker's inbox or pinned queue; guarded by that queue
  void* fls_ = nullptr;    // fiber-local storage table; owner only

  // Null until the fiber hands out its first stop token; then the state it
  // shares with its tokens (it holds one reference). Written once, by the
  // owner; read by request_stop() from any thread. seq_cst, see *Stop
  // states* in park.cc.
  std::atomic<stop_state*> stop_state_{nullptr};

  // Run by scheduler::exited(): nobody can request a stop any more (the
  // join state dropped its pointer at completion), so the fiber's
  // reference goes; its tokens keep the state, with its last flag.
  ~fiber() {
    if (stop_state* s = stop_state_.load(std::memory_order_relaxed))  // relaxed: the owner wrote it
      release_stop_state(s);
  }
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

// A bound stack's top holds the owning fiber's address (see above).
inline constexpr std::size_t kStackTopReserve = 64;
inline fiber*& fiber_of_stack(const alloc::stack& s) {
  return *reinterpret_cast<fiber**>(s.hi - kStackTopReserve);
}

}  // namespace weft::sched
