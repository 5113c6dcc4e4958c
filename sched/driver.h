// sched/driver.h
//
// What the scheduler needs from an I/O layer, and nothing more (as Go's
// netpoll.go states what each poller must implement). sched/ never includes
// io/; io/ implements this interface and runtime/ wires a factory in.
//
// Contract for an implementation:
//   - One driver per worker, created on that worker's thread by the factory
//     and used by that thread only — except wake(), which any thread calls.
//   - wait(deadline) blocks until wake() is called, one of its operations
//     completes, or `deadline` passes (time_point::max(): no deadline). It
//     makes the fibers whose operations completed runnable through
//     sched::ready(). Spurious returns are allowed.
//   - wake() is sticky: a wake() that happens before wait() makes that wait
//     return at once. It must be cheap when called repeatedly.
//   - poll() does what wait() does without blocking, taking completions
//     only while a wake_budget (below) allows and leaving the rest in the
//     kernel's queue, in order, for the next poll. flush() submits queued
//     operations (called once per scheduler turn before running a fiber
//     that may queue more, and before wait()).
//   - pending() counts operations in flight whose completion can wake a
//     fiber (the deadlock detector treats a worker with pending() > 0 as able
//     to make progress).
//   - quiesce() is the worker's last call, on its thread, after its loop
//     ended (no fiber is left): the driver ends what it still has in flight
//     on its own account (io_uring's write-behind sends) and waits, boundedly,
//     for their completions.
//   - idle() is a hint for the owner: true only if a flush() and poll()
//     now would do nothing at all (nothing to submit, no completion or
//     deferred work to reap, no request from another thread queued). A
//     yield or hand-off on the loop's periodic tick then skips the loop
//     pass that would do them (see *Direct yield* in sched/worker.cc).
//     false is always correct (the default); a true that races with a
//     completion or a request is as late as a poll just before it, and
//     the next periodic tick looks again.
//   - rescue() is the exception to "that thread only": the runtime's
//     monitor calls it from its own thread while the driver's worker is
//     stuck in one fiber (the same fiber ran for a whole monitor period).
//     It makes the fibers whose operations have completed runnable through
//     sched::ready() from the calling thread (so other workers run them),
//     as far as the driver can without its owner, and never waits for the
//     owner. Its state is then shared with the monitor: an implementation
//     guards what rescue() touches (see io/uring_driver.cc *Rescue*).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "sched/park.h"

namespace weft::sched {

class driver {
 public:
  explicit driver(bool io = false) noexcept : is_io_(io) {}
  virtual ~driver() = default;
  virtual void wait(clock::time_point deadline) = 0;
  virtual void poll() = 0;
  virtual void flush() {}
  virtual void quiesce() { flush(); }
  virtual void wake() noexcept = 0;
  virtual std::size_t pending() const noexcept { return 0; }
  virtual bool idle() noexcept { return false; }
  virtual void rescue() noexcept {}
  virtual const char* name() const noexcept = 0;

  // True for io/'s drivers (io::io_driver's constructor says so): how
  // io::current_driver() tells them apart with a load instead of a
  // dynamic_cast (~20 ns on every I/O operation).
  bool is_io() const noexcept { return is_io_; }

 private:
  const bool is_io_;
};

// The time left until `deadline` as a relative timeout for the kernel
// (futex, epoll_pwait2, io_uring waits): zero if it has passed, nullptr (no
// timeout) for time_point::max(). TS is timespec or __kernel_timespec.
template <typename TS>
TS* relative_timeout(clock::time_point deadline, TS& ts) {
  if (deadline == clock::time_point::max()) return nullptr;
  // Compared before subtracting: a deadline long past (time_point::min())
  // minus now overflows.
  const clock::time_point now = clock::now();
  const auto ns =
      deadline <= now ? 0 : std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
  ts.tv_sec = ns / 1'000'000'000;
  ts.tv_nsec = ns % 1'000'000'000;
  return &ts;
}

// The calling worker's free local run-queue slots (a lower bound: thieves
// only add room); SIZE_MAX off the worker threads.
std::size_t run_queue_room() noexcept;

// *Fairness*: how many completions one poll hands to fibers. A busy worker
// polls every 61 fibers it runs; completions beyond its local queue's room
// would overflow the queue's older half to the back of the inject queue,
// behind fibers that became runnable later, poll after poll (at 1,000 echo
// connections, half of all fibers run had overflowed first, and p99 was
// three times Go's). So a poll takes at most kBatch completions, and stops
// once one of them filled the queue or overflowed it; the kernel's queue
// (the CQ ring, epoll's ready list) keeps the rest in order. A completion
// that woke nobody, or a pinned fiber (its worker's pinned queue is not
// bounded), uses no room and does not stop it. The first completion is
// always taken, so a queue kept full by fibers that yield still lets I/O
// in (it overflows once, and the periodic tick serves the inject queue
// before it polls). Owner thread only.
class wake_budget {
 public:
  static constexpr std::size_t kBatch = 64;
  wake_budget() noexcept : room_(run_queue_room()) {}
  // Free slots when the poll began, or at the last more().
  std::size_t room() const noexcept { return room_; }
  // Whether to take another completion after `taken` of them (those that
  // may wake a fiber, as the caller counts them).
  bool more(std::size_t taken) noexcept {
    if (taken == 0) return true;
    if (taken >= kBatch) return false;
    std::size_t now = run_queue_room();
    bool filled = now == 0 && now < room_;
    bool overflowed = now > room_;  // or a thief took some: stop early, harmless
    room_ = now;
    return !filled && !overflowed;
  }

 private:
  std::size_t room_;
};

// Called on each worker thread at start with the worker's index.
using driver_factory = std::function<std::unique_ptr<driver>(unsigned worker)>;

// A driver with no I/O: sleeps on a futex. Enough for a scheduler without
// io/ (and its tests).
std::unique_ptr<driver> make_futex_driver();

}  // namespace weft::sched
