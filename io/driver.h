// io/driver.h
//
// The I/O half of a worker's driver, and the one way a fiber does I/O:
// io::perform(op, deadline). An `op` describes a system call (recv, send,
// accept, connect, read_at, ...); the worker's driver carries it out while
// the fiber is parked — io_uring submits it (io/uring_driver.cc), a
// readiness driver would wait for readiness and retry the call.
//
// *Completion slots*
//   A parked operation's state lives on the fiber's stack, in a
//   `completion`. The driver that owns the operation fills it in when the
//   kernel reports the result and wakes the waiter recorded there. The slot
//   lock orders the three parties that touch it: the driver (complete()),
//   the park's publish step (records the waiter) and the fiber after it
//   woke (forgets the waiter, reads the result).
//   SAFETY: the kernel holds pointers into the fiber's stack (the slot,
//   buffers, addresses) until the operation's completion arrives. perform()
//   therefore never returns before complete() ran, even on a deadline, a
//   stop request or while the runtime unwinds: it cancels, then parks again
//   until the original completion arrives.
//
// Who calls what:
//   perform()                 a fiber only
//   completion::complete()    the driver that owns the operation, on its
//                             worker thread (never while holding the slot)
//   io_driver::cancel()       any thread (the fiber may have migrated)
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <expected>
#include <memory>
#include <source_location>
#include <system_error>

#include "sched/driver.h"
#include "sched/park.h"
#include "sched/spinlock.h"

namespace weft::io {

using clock = std::chrono::steady_clock;
template <typename T>
using result = std::expected<T, std::error_code>;

enum class op_kind : std::uint8_t {
  recv,      // fd, buf, len, flags
  send,      // fd, buf, len, flags (MSG_NOSIGNAL is always added)
  recvmsg,   // fd, msg, flags
  sendmsg,   // fd, msg, flags (MSG_NOSIGNAL is always added)
  accept,    // fd, addr, addrlen (out; may be null), flags (SOCK_CLOEXEC added)
  connect,   // fd, addr, *addrlen
  read_at,   // fd, buf, len, offset
  write_at,  // fd, buf, len, offset
  fsync,     // fd, flags (0 or IORING_FSYNC_DATASYNC-like: datasync if nonzero)
};

struct op {
  op_kind kind;
  int fd = -1;
  void* buf = nullptr;
  std::size_t len = 0;
  msghdr* msg = nullptr;
  sockaddr* addr = nullptr;
  socklen_t* addrlen = nullptr;
  std::uint64_t offset = 0;
  int flags = 0;
};

// See *Completion slots*. Lives on the parked fiber's stack.
class completion {
 public:
  // The driver: the result arrived. Wakes the recorded waiter, if any.
  // After it returns, *this may no longer exist.
  void complete(int res) noexcept;
  // The fiber: parks until complete() ran or the park is woken otherwise
  // (stop request, unwinding). Returns whether the result is in.
  bool park_until_done(bool cancellable, const char* what, std::source_location where);
  int res() const noexcept { return res_; }  // valid once done
  bool is_done() noexcept {
    lock_.lock();
    bool d = done_;
    lock_.unlock();
    return d;
  }

 private:
  static void publish(void* self, sched::wake_token t);
  sched::spinlock lock_;
  bool done_ = false;         // guarded by lock_
  int res_ = 0;               // written before done_ under lock_
  sched::wake_token waiter_;  // guarded by lock_
};

// A worker's driver that can perform operations.
class io_driver : public sched::driver {
 public:
  // Starts `o` on this driver (the calling fiber's current worker), with
  // `c` as its completion slot; `deadline` (max: none) bounds it in the
  // kernel where the driver can. Returns false if the driver could not
  // start it (then c is untouched and res holds -errno).
  virtual bool start(op& o, completion& c, clock::time_point deadline, int& res) = 0;
  // Asks the driver to cancel the operation whose slot is `c`. Any thread.
  // The operation still completes (perhaps with -ECANCELED) through c.
  virtual void cancel(completion& c) noexcept = 0;
  // Reaps completions on the calling thread without blocking; only the
  // owning worker thread calls it (used while a fiber must wait without
  // parking, see perform()).
  virtual void poll_now() { poll(); }
};

// Performs `o` on the calling fiber's worker, parking the fiber until it
// completes. Returns the system call's non-negative result, or:
//   std::errc::timed_out           the deadline passed first
//   std::errc::operation_canceled  the fiber's stop was requested
//   std::errc::not_supported       the runtime has no I/O driver
//   the system error otherwise (e.g. EPIPE, ECONNRESET, EMFILE).
result<int> perform(op& o, clock::time_point deadline, const char* what,
                    std::source_location where = std::source_location::current());

// The driver of the calling fiber's worker, or nullptr.
io_driver* current_driver() noexcept;

// Driver factories (io/uring_driver.cc, io/epoll_driver.cc). make_uring
// returns nullptr and sets `why` when io_uring is unavailable.
std::unique_ptr<io_driver> make_uring_driver(unsigned worker, std::error_code& why);

// Called once per process by the driver factory: SIGPIPE ignored, so a
// write to a closed peer is an EPIPE value, never a signal.
void ignore_sigpipe_once() noexcept;

}  // namespace weft::io
