// io/signal.h
//
// POSIX signals as a fiber waits for them (Go's signal.Notify, Tokio's
// signal()). Re-exported as weft::signal_set by runtime/net.h.
//
//   auto stop = weft::signal_set::watch({SIGINT, SIGTERM});
//   if (!stop) { /* EINVAL: a signal that cannot be watched */ }
//   auto sig = stop->wait();            // parks this fiber; result<int>
//   // ... shut down: stop accepting, close connections, return from main
//
// Semantics:
//   - From watch() on, every delivery of a watched signal to the process is
//     counted for the set, whichever thread the kernel picks, and wait()
//     returns one signal number per delivery (deliveries before the watch,
//     or that POSIX merged while pending, are not seen). Every set watching
//     a signal sees each delivery.
//   - While some set watches a signal, its previous disposition (say, the
//     default: terminate on SIGINT) is replaced by weft's handler; when the
//     last such set is destroyed, the previous disposition is restored —
//     unless the program installed a handler of its own meanwhile, which
//     stays (and from then on the sets watching see nothing).
//   - wait() takes a deadline (timed_out) and honours the fiber's stop
//     token (operation_canceled); a fiber waiting for a signal counts as
//     I/O in flight, so it is never reported as a deadlock. A plain thread
//     may wait too (it blocks in poll(2)).
//   - watch() fails with EINVAL for numbers outside 1..64, SIGKILL and
//     SIGSTOP (they cannot be caught), and the synchronous fault signals
//     SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP and SIGSYS (a fault cannot
//     be waited for, and weft's stack overflow report owns SIGSEGV); with
//     EMFILE/ENFILE if no descriptor is left for its eventfd;
//     with ENOSPC if 64 sets exist at once.
//
// Invariants (signal.cc): a set owns one eventfd; the handler, which only
// does async-signal-safe things (atomic increments, write(2) to eventfds),
// bumps the signal's delivery count and writes to the eventfd of every set
// registered for it. A set is unregistered before its eventfd is closed,
// and close waits until no handler is inside the registry.
//
// Who calls what: watch(), wait() and the destructor from any fiber or
// thread; one waiter per set at a time.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "io/driver.h"
#include "io/socket.h"  // deadline_arg

namespace weft::io {

class signal_set {
 public:
  [[nodiscard]] static result<signal_set> watch(std::initializer_list<int> signals);

  signal_set(signal_set&& o) noexcept
      : slot_(std::exchange(o.slot_, -1)), efd_(std::exchange(o.efd_, -1)), seen_(o.seen_),
        mask_(o.mask_), next_(o.next_) {}
  signal_set& operator=(signal_set&& o) noexcept;
  signal_set(const signal_set&) = delete;
  signal_set& operator=(const signal_set&) = delete;
  ~signal_set();

  // The next delivery of a watched signal not yet returned: its number.
  [[nodiscard]] result<int> wait(deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // As wait(), without blocking: resource_unavailable_try_again if none.
  [[nodiscard]] result<int> try_wait();

 private:
  signal_set() = default;
  void reset() noexcept;
  int take_delivered() noexcept;  // a signal number, or 0

  int slot_ = -1;  // the registry slot (signal.cc), -1 when moved from
  int efd_ = -1;
  std::array<std::uint64_t, 65> seen_{};  // deliveries returned, per signal
  std::uint64_t mask_ = 0;                // bit s-1: signal s is watched
  int next_ = 1;                          // where the next scan starts (fairness)
};

}  // namespace weft::io
