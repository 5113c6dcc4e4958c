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
//   - poll(room) does what wait() does without blocking, but makes about
//     `room` fibers runnable at most (one more per event that wakes a
//     reader and a writer at once) and leaves the rest of what completed
//     in the kernel's queue for the next poll, in order. `room` is the
//     space left in the worker's run queue: a fuller one would overflow
//     its older half to the back of the inject queue, behind fibers that
//     became runnable later (see *Fairness* in io/uring_driver.cc). The
//     worker passes at least 1 (worker::poll_room()). flush() submits queued operations (called
//     once per scheduler turn before running a fiber that may queue more,
//     and before wait()).
//   - pending() counts operations in flight whose completion can wake a
//     fiber (the deadlock detector treats a worker with pending() > 0 as able
//     to make progress).
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
  virtual ~driver() = default;
  virtual void wait(clock::time_point deadline) = 0;
  virtual void poll(std::size_t room) = 0;
  virtual void flush() {}
  virtual void wake() noexcept = 0;
  virtual std::size_t pending() const noexcept { return 0; }
  virtual void rescue() noexcept {}
  virtual const char* name() const noexcept = 0;
};

// The time left until `deadline` as a relative timeout for the kernel
// (futex, epoll_pwait2, io_uring waits): zero if it has passed, nullptr (no
// timeout) for time_point::max(). TS is timespec or __kernel_timespec.
template <typename TS>
TS* relative_timeout(clock::time_point deadline, TS& ts) {
  if (deadline == clock::time_point::max()) return nullptr;
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - clock::now()).count();
  if (ns < 0) ns = 0;
  ts.tv_sec = ns / 1'000'000'000;
  ts.tv_nsec = ns % 1'000'000'000;
  return &ts;
}

// Called on each worker thread at start with the worker's index.
using driver_factory = std::function<std::unique_ptr<driver>(unsigned worker)>;

// A driver with no I/O: sleeps on a futex. Enough for a scheduler without
// io/ (and its tests).
std::unique_ptr<driver> make_futex_driver();

}  // namespace weft::sched
