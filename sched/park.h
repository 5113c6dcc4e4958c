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
//   stop_state_of_current()           a fiber only
//   stop_state members                any thread holding a reference
#pragma once

#include <chrono>
#include <cstdint>
#include <source_location>

#include "alloc/spinlock.h"
#include "sched/fiber.h"

namespace weft::sched {

using clock = std::chrono::steady_clock;

// *The coarse clock*: a lower bound on clock::now() for a few nanoseconds
// (CLOCK_MONOTONIC_COARSE, the timekeeper's value at its last tick: a
// memory read) instead of ~33 (a TSC read, here in a VM). A hot path that
// only needs to know that a deadline is far away — the loop's "any timer
// due?", an I/O deadline's "near enough for the kernel?" — asks
// surely_later() and reads the precise clock only when the answer is no.
// coarse_now() <= clock::now() < coarse_now() + coarse_lag(): the coarse
// clock is where the precise one extrapolates from, and a running CPU's
// tick keeps it within one tick period; coarse_lag() is six periods plus
// 1 ms, for a VM's missed ticks (or, where the kernel reports no usable
// period, so large that surely_later() is never true and every caller
// reads the precise clock). A lag beyond it delays a due timer until the
// coarse clock catches up; it never loses one.
clock::time_point coarse_now() noexcept;
clock::duration coarse_lag() noexcept;
// True only if `when` is certainly later than clock::now() + d (d >= 0, a
// few seconds at most); time_point::max() (no deadline) always is.
inline bool surely_later(clock::time_point when, clock::duration d) noexcept {
  if (when == clock::time_point::max()) return true;
  const clock::duration lag = coarse_lag();
  return lag != clock::duration::max() && when >= coarse_now() + lag + d;
}

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
// `cancelled`, but only when the runtime unwinds; an operation that cannot
// fail (a lock) then waits on, parking again, if unwind_point() returns.
wake_reason park(const park_request& req);

// Gives the worker to other runnable fibers; the caller stays runnable.
void yield(std::source_location where = std::source_location::current());
// The same without the unwind point, for a destructor that waits for a
// runnable fiber to finish with its object (it must let that fiber run even
// while the runtime unwinds the caller). Never throws.
void yield_in_cleanup(std::source_location where = std::source_location::current()) noexcept;

// *Coop budget*: every operation that could have parked but completed at
// once (a channel send or receive with room or values, a select with a
// ready case, a semaphore acquire, a socket call under epoll), and every
// spawn, calls this after completing (a mutex or shared_mutex lock calls
// it before taking the lock, so that a yield never holds one). A fiber
// whose operations keep completing at once would otherwise never give its
// worker away, and the fibers queued behind it would wait (a consumer that
// producers on other workers keep busy). So a fiber that has
// done kCoopBudget such operations since it switched in starts a time
// slice, and once the slice is kCoopSlice old it yields at its next
// kCoopBudget-th such operation (Tokio's coop budget, with a slice: yielding
// after a fixed count alone would also break up producer/consumer pairs
// that take turns every few microseconds, and a yielded fiber can be
// stolen, which splits the pair over two cores). Such a yield goes behind
// the inject queue when it holds fibers (see coop_yield() in worker.cc),
// so a spawn loop waits for what it spawned. The clock is read once
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
// `cancelled`, and its stop_state (if it has one) is set. `f` must be alive
// (its join handle keeps it so).
void request_stop(fiber* f) noexcept;
// The unwinder's version: every park of `f`, cancellable or not, returns
// `cancelled`, and later parks throw fiber_unwind.
void force_unwind(fiber* f) noexcept;

// Throws fiber_unwind if the runtime is unwinding the calling fiber, unless
// an exception is already unwinding its stack (std::uncaught_exceptions():
// the caller runs in a destructor, where a throw is std::terminate) or its
// body has ended (fiber::body_ended_: what runs is the destructor of its
// callable or of a fiber_local, with no exception in flight); the
// operation then reports its cancellation as a value, or, if it cannot
// fail, keeps waiting.
void unwind_point();

// *Stop states* — what a weft::stop_token points at: a fiber's stop flag
// that outlives the fiber, and the list of blockers (selects) to wake when
// the fiber is asked to stop. A fiber gets one the first time it hands out
// a token (stop_state_of_current()), so a fiber that never does pays one
// null pointer. The fiber and every token hold a reference; the last
// release frees it.
//
// A blocker links a stop_waiter, whose two hooks it provides:
//   claim(w)  called by request_stop() with the state's lock held, after it
//             unlinked w: claims the blocker (the park protocol's claim, or
//             a plain thread's word) and returns true if this claim won. A
//             won claim keeps the blocker from running, so w stays valid
//             until ready(w).
//   ready(w)  called once per won claim, after the lock is dropped: makes
//             the blocker runnable. The last touch of w.
//
//   blocker                              request_stop() (any thread)
//   -------                              ---------------------------
//   publish step: add(w)                 lock; stopped = true
//     (false if already stopped:          unlink every w; claim(w)
//      the blocker wakes itself)          unlock; ready(w) for each won claim
//   wakes, for whatever reason
//   remove(w): lock; unlink if linked
//
// Invariants:
//   - lk_ guards head_ and every linked record's links; stopped_ changes
//     from false to true once, under lk_, so add() and request_stop()
//     cannot miss each other (no lost wake-up).
//   - A record is claimed only under lk_ and only while linked; remove()
//     takes lk_, so the blocker cannot leave (and free w) while a claimer
//     holds w (the rule on claim() above).
struct stop_waiter {
  bool (*claim)(stop_waiter* w) noexcept = nullptr;
  void (*ready)(stop_waiter* w) noexcept = nullptr;
  stop_waiter* prev = nullptr;  // guarded by the state's lk_
  stop_waiter* next = nullptr;  // guarded by lk_; request_stop() reuses it after unlinking
  bool linked = false;          // guarded by lk_
};

class stop_state {
 public:
  stop_state(const stop_state&) = delete;
  stop_state& operator=(const stop_state&) = delete;

  // Reference counting: acquire() for a new holder, release() when one
  // lets go (the last one frees the state).
  void acquire() noexcept;
  void release() noexcept;

  bool stop_requested() const noexcept;
  // Sets the flag (once) and wakes every linked waiter.
  void request_stop() noexcept;
  // Links w, unless a stop was already requested: then returns false and
  // leaves w unlinked.
  bool add(stop_waiter* w) noexcept;
  // Unlinks w if it is still linked.
  void remove(stop_waiter* w) noexcept;

 private:
  friend stop_state* stop_state_of_current();
  stop_state() = default;
  ~stop_state() = default;

  std::atomic<std::uint32_t> refs_{1};  // see acquire()/release()
  std::atomic<bool> stopped_{false};    // written under lk_; read anywhere (acquire)
  weft::spinlock lk_;
  stop_waiter* head_ = nullptr;         // guarded by lk_
};

// The calling fiber's stop state, created on first use (the fiber holds
// one reference, dropped when its control block is destroyed). Returns a
// state on which the caller holds a fresh reference; nullptr on a plain
// thread.
stop_state* stop_state_of_current();
// The calling fiber's stop state if it has one yet, without taking a
// reference (for identity checks); nullptr otherwise.
stop_state* own_stop_state() noexcept;
// Drops the reference a fiber holds (fiber's destructor).
void release_stop_state(stop_state* s) noexcept;

fiber* current_fiber() noexcept;  // nullptr on a plain thread
// True if the calling fiber's worker has other runnable fibers (a hint,
// for spin-or-park decisions: spinning then only delays them). False on a
// plain thread.
bool others_runnable_here() noexcept;
worker* current_worker() noexcept;  // nullptr off the worker threads

}  // namespace weft::sched
