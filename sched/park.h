// sched/park.h
//
// Parking and waking fibers: the one protocol every blocking operation in
// weft goes through. The whole protocol is described, and implemented, in
// sched/park.cc; this header is its interface.
//
// A blocking operation looks like this:
//
//   lock(list);
//   if (ready) { ...; unlock(list); return; }
//   wake_reason r = park({.publish = [](void* a, wake_token t) {
//                             add waiter t to list; unlock(list);   // runs after the switch
//                         }, .arg = &list, .what = "chan receive"});
//   if (r != wake_reason::notified) { lock(list); remove waiter if still there; unlock(list); }
//
// Who calls what:
//   park(), yield(), current_fiber()  a fiber only
//   claim(), ready(), wake()          any thread, under the rule on claim()
//   request_stop()                    any thread
#pragma once

#include <chrono>
#include <cstdint>
#include <source_location>

#include "sched/fiber.h"

namespace weft::sched {

using clock = std::chrono::steady_clock;

// Identifies one park of one fiber.
struct wake_token {
  fiber* f = nullptr;
  std::uint64_t gen = 0;
  explicit operator bool() const { return f != nullptr; }
};

// Runs on the worker's scheduler stack right after the fiber switched away:
// this is where the fiber becomes visible to wakers.
using publish_fn = void (*)(void* arg, wake_token t);

struct park_request {
  publish_fn publish = nullptr;
  void* arg = nullptr;
  clock::time_point deadline = clock::time_point::max();  // max: none
  bool cancellable = true;  // request_stop() wakes it with `cancelled`
  const char* what = "park";  // shown by dump() and the deadlock report
  std::source_location where = std::source_location::current();
};

// Thrown out of park() and yield() while the runtime unwinds the fibers that
// are still alive after the main fiber returned. It is not a std::exception;
// a `catch (...)` in fiber code must rethrow it.
struct fiber_unwind {};

// Parks the calling fiber until a wake, its deadline or (if cancellable) a
// stop request. Returns why it woke; if a stop was already requested, it
// wakes at once with `cancelled`. The publish step always runs.
//
// Rule for every caller: on `cancelled`, clean up (remove the waiter
// record) and then call unwind_point() before returning
// operation_canceled, so that a fiber the runtime is unwinding cannot loop
// on a cancelled operation forever. A non-cancellable park can still return
// `cancelled`, but only when the runtime unwinds.
wake_reason park(const park_request& req);

// Gives the worker to other runnable fibers; the caller stays runnable.
void yield(std::source_location where = std::source_location::current());

// *Coop budget*: every operation that could have parked but completed at
// once (a channel send or receive with room or values, a select with a
// ready case, a socket call under epoll) calls this after completing. A
// fiber whose operations keep completing at once would otherwise never
// give its worker away, and the fibers queued behind it would wait (a
// consumer that producers on other workers keep busy). So a fiber that has
// done kCoopBudget such operations since it switched in starts a time
// slice, and once the slice is kCoopSlice old it yields at its next
// kCoopBudget-th such operation (Tokio's coop budget, with a slice: yielding
// after a fixed count alone would also break up producer/consumer pairs
// that take turns every few microseconds, and a yielded fiber can be
// stolen, which splits the pair over two cores). The clock is read once
// per kCoopBudget operations. Never throws, so it is safe in destructors;
// does nothing on a plain thread.
inline constexpr unsigned kCoopBudget = 128;
inline constexpr std::chrono::microseconds kCoopSlice{100};
void spend_budget() noexcept;

// The first claim of a park wins and returns the fiber, which the caller must
// then pass to ready() (possibly after dropping its own locks); later claims
// of the same park return nullptr.
//
// Rule: claim(t) may be called only while t.f cannot have finished the
// cleanup after that park — in practice, while holding the lock the fiber
// takes after waking to remove its waiter record (the record holds t), or
// through the timer handshake in sched/timer_heap.h.
fiber* claim(wake_token t, wake_reason r) noexcept;
void ready(fiber* f) noexcept;
inline bool wake(wake_token t, wake_reason r = wake_reason::notified) noexcept {
  fiber* f = claim(t, r);
  if (f) ready(f);
  return f != nullptr;
}

// Asks `f` to stop: its current and future cancellable parks return
// `cancelled`. `f` must be alive (its join handle keeps it so).
void request_stop(fiber* f) noexcept;
// The unwinder's version: every park of `f`, cancellable or not, returns
// `cancelled`, and later parks throw fiber_unwind.
void force_unwind(fiber* f) noexcept;

// Throws fiber_unwind if the runtime is unwinding the calling fiber. For
// operations that cannot report cancellation as a value.
void unwind_point();

fiber* current_fiber() noexcept;  // nullptr on a plain thread
// True if the calling fiber's worker has other runnable fibers (a hint,
// for spin-or-park decisions: spinning then only delays them). False on a
// plain thread.
bool others_runnable_here() noexcept;
worker* current_worker() noexcept;  // nullptr off the worker threads

}  // namespace weft::sched
