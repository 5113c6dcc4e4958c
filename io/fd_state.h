// io/fd_state.h — internal: what a socket or file shares with the
// operations in flight on it, so that close() from one fiber works while
// others are parked on, or calling into, the same descriptor (as Go's
// fdMutex and pollDesc, and Tokio's ScheduledIo).
//
// close() marks the descriptor closed, cancels every operation in flight on it
// (each wakes with an error, or with its result if that came first: nothing
// received is lost), wakes the listener's parked acceptors, and closes the
// descriptor once the last operation has left. Until then the descriptor
// number stays taken, so an operation can never act on a new file that
// reused the number (a connection accepted or a file opened meanwhile).
// Operations that start after close() fail with EBADF without a system
// call.
//
// Invariants:
//   - lock_ guards closed_, owned_, users_ and uses_, and the making of
//     recv_ (a stream's multishot receive, io/recv.cc), which close()
//     shuts: its parked readers wake with EBADF.
//   - users_ counts the operations between enter() and leave(); uses_ lists
//     those whose wait is attached (a completion slot the driver may still
//     fill), so close() can cancel them. An attached fd_use's slot is
//     alive: the driver detaches it, under lock_, before the slot's frame
//     is gone.
//   - fd_ is immutable; close(2) runs exactly once, by close() if no
//     operation is in flight, else by the leave() that makes users_ zero.
//   - The state is deleted when the socket or file object has released it
//     and users_ is zero (whichever comes last).
//
// *Write-behind* (io_uring only; see io/driver.h): a small write is copied
// and queued, and the writing fiber goes on without parking. By default on
// TCP streams only (is_inet()), whose write failures are asynchronous
// anyway; never after this side's shutdown(SHUT_WR) (wb_shut_), whose
// EPIPE the kernel gives at once. At most one is in flight per socket.
// Every later call that sends (write, writev,
// shutdown, close) first settles it: waits for its completion and reports
// its failure, if any, as its own. Its invariants:
//   - wb_pending_ from start_write_behind() until a settle() consumed the
//     result; wb_done_ once the driver's completion arrived (guarded by
//     lock_, as are the other wb_ fields).
//   - A pending write-behind counts in users_ until its completion: the
//     descriptor stays open (and its number taken) while the kernel may
//     still send on it, and *this alive while the driver holds it.
//   - wb_waiter_ is the one fiber parked in settle(); it is claimed under
//     lock_ (the rule on sched::claim), and a second settler polls. Its
//     park publishes it only if nothing it waits for (the completion,
//     wb_abort_) has come since the settle looked, under the same lock.
//   - *Lingering*: a write that returned has handed its bytes on, as a
//     blocking send hands them to the kernel. So a close() or shutdown()
//     from a fiber other than the writer (or a plain thread) does not
//     cancel the write-behind in flight, nor wait for it: it goes on until
//     it ends, its write's deadline passes or the driver's linger cap
//     (WEFT_LINGER_MS, 60 s) from the close is up (a timed cancel,
//     wb_timed_), the descriptor staying open for it (users_); a
//     shutdown(SHUT_WR) is deferred to its end (wb_fin_), so the end of the
//     stream follows its bytes. Its writer, if parked in a settle, wakes
//     with the error its blocked send would have had (wb_abort_: EBADF,
//     EPIPE). Only the writer's own close() that gave up waiting (deadline,
//     stop) cancels it. One cut short after its stream was ended (closed,
//     or shut down by another fiber) resets the connection instead of
//     ending it: the peer never sees a clean end of stream after a gap.
//
// Who calls what:
//   enter(), leave()      a fiber, around one operation (fd_guard: socket.cc,
//                         accept.cc, file.cc)
//   fd_use::attach(), detach()   the driver's perform(), on the fiber
//   close(), release()    the object's owner; close() also from another
//                         fiber while operations are in flight
//   start_write_behind(), settle()   a fiber inside an fd_guard
//   defer_shutdown()      shutdown(), inside an fd_guard
//                         (a fiber or a plain thread)
//   on_write_behind_done()   the driver, on its worker thread or the monitor's
#pragma once

#include <atomic>
#include <cerrno>
#include <source_location>
#include <span>
#include <system_error>

#include "alloc/spinlock.h"
#include "io/driver.h"

namespace weft::io {

class accept_state;
class recv_state;

class fd_state {
 public:
  // Adopts fd; `accept` (listeners from bind(), may be null) is the
  // listener's accept state, whose listener share this state now holds.
  explicit fd_state(int fd, accept_state* accept = nullptr) noexcept
      : fd_(fd), accept_(accept) {}
  fd_state(const fd_state&) = delete;
  fd_state& operator=(const fd_state&) = delete;

  int fd() const noexcept { return fd_; }
  accept_state* accept() const noexcept { return accept_; }
  // The stream's multishot receive state (io/recv.cc), made by its first
  // pooled read; null once closed (the caller then fails with EBADF).
  // acquire: pairs with the release that published the new state.
  recv_state* recv() noexcept {
    recv_state* r = recv_.load(std::memory_order_acquire);
    return r ? r : make_recv();
  }
  // Whether a pooled read made one: read() and readv() then take what it
  // queued first, and wait on it, so that no byte is read out of order.
  recv_state* recv_if_made() const noexcept { return recv_.load(std::memory_order_acquire); }
  bool closed() const noexcept;

  // An operation begins: false (and nothing to undo) once closed.
  [[nodiscard]] bool enter(fd_use& u) noexcept;
  // The operation is over; its slot is detached. May close the descriptor.
  void leave(fd_use& u) noexcept;

  // Marks the descriptor closed and cancels what is in flight; closes it
  // now if nothing is (then returns close(2)'s error, if any). With
  // `take_fd`, an idle descriptor is handed to the caller instead (which
  // closes it through its driver: files); *take_fd stays -1 otherwise.
  result<void> close(int* take_fd = nullptr) noexcept;
  // The object lets go (its destructor, after close()). May delete *this.
  void release() noexcept;

  // Whether any write-behind has started in this process: until one has,
  // write(), writev() and read_pooled() skip the checks below (a lock
  // round trip each). relaxed: set before the first send is queued; a
  // fiber that started one, and migrated, carries its visibility with it
  // (its switch is ordered), and another fiber writing the same socket at
  // once has no order with it anyway.
  static bool write_behind_used() noexcept {
    return wb_used_.load(std::memory_order_relaxed);
  }
  // Copies buf and hands it to `d` to send behind the caller (see
  // *Write-behind*); false, with nothing done, if `d` cannot or the socket
  // is closed. The caller has settled any earlier one. `deadline` is how
  // long a later close() or shutdown() waits for it.
  bool start_write_behind(io_driver& d, std::span<const char> buf, clock::time_point deadline);
  // Waits for the write-behind in flight, if any, until `deadline`, and
  // consumes its result: its error (a short send is broken_pipe), or
  // timed_out / operation_canceled if the wait ended first (it then stays
  // in flight). On a plain thread it does not wait: would_block.
  // With `unwind`, a cancelled wait calls sched::unwind_point() (a
  // socket's call); close() and shutdown(), which cannot throw, pass false.
  result<void> settle(clock::time_point deadline, std::source_location where, bool unwind);
  // The socket's sending side is being shut down (shutdown(SHUT_WR or
  // SHUT_RDWR)): no write-behind starts any more (later writes go to the
  // kernel, which refuses them with EPIPE at once), decided under the same
  // lock as the look at the one in flight, so none slips in between. True
  // if one is in flight, started by a fiber other than the caller's (the
  // caller has settled its own): the end of the stream then goes after its
  // bytes, when it ends (*Lingering*). False if none is: the caller then
  // calls shutdown(2) itself.
  bool defer_shutdown() noexcept;
  // Whether the calling fiber started the write-behind in flight (it then
  // waits for it before ending the stream; another fiber does not).
  bool write_behind_is_callers() const noexcept;
  // Whether a write-behind is in flight whose completion has not arrived
  // (a reply to it cannot have come yet).
  bool write_behind_unsent() const noexcept;
  // The deadline of the write-behind in flight (max if none).
  clock::time_point write_behind_deadline() const noexcept;
  // The driver's completion of the write-behind (res: the send's result).
  // May close the descriptor and delete *this. True if a timed cancel was
  // arranged for it (cancel_send_behind_at(), *Lingering*): the driver
  // then keeps that cancel, when it fires, from cancelling a later send
  // with the same key.
  bool on_write_behind_done(int res) noexcept;

 private:
  friend struct fd_use;
  ~fd_state();
  void attach(fd_use& u, io_driver& owner, completion& c) noexcept;
  void detach(fd_use& u) noexcept;
  static void close_fd(int fd) noexcept;
  // Whether the descriptor is an AF_INET or AF_INET6 socket (asked once).
  bool is_inet() noexcept;
  sched::fiber* linger_locked(int err) noexcept;
  recv_state* make_recv() noexcept;

  const int fd_;
  accept_state* const accept_;
  // Made under lock_ unless closed_, so that close() (which sets closed_
  // under lock_, then shuts the state it finds) never misses one; read
  // without the lock (recv()); deleted with *this.
  std::atomic<recv_state*> recv_{nullptr};
  mutable weft::spinlock lock_;
  bool closed_ = false;      // guarded by lock_
  bool owned_ = true;        // guarded by lock_: the socket object holds it
  unsigned users_ = 0;       // guarded by lock_
  fd_use* uses_ = nullptr;   // guarded by lock_: attached operations
  static inline std::atomic<bool> wb_used_{false};  // see write_behind_used()
  // is_inet()'s answer, once asked (relaxed: every asker gets the same).
  static constexpr std::uint8_t kFamilyUnknown = 0, kFamilyInet = 1, kFamilyOther = 2;
  std::atomic<std::uint8_t> family_{kFamilyUnknown};
  // *Write-behind*, guarded by lock_.
  static void publish_settle(void* self, sched::wake_token t);
  std::uint64_t wb_seq_ = 0;  // the pending write-behind's number (its cancel key)
  std::uint64_t wb_starter_ = 0;  // the id of the fiber that wrote it
  bool wb_closing_ = false;   // close() began: no write-behind starts
  bool wb_shut_ = false;      // its sending side was shut down: none starts
  bool wb_fin_ = false;       // shutdown(SHUT_WR) waits for the one in flight
  bool wb_timed_ = false;     // its cancel at wb_deadline_ is arranged
  int wb_abort_ = 0;          // errno for its settlers: ended by another fiber
  bool wb_pending_ = false;
  bool wb_done_ = false;
  int wb_res_ = 0;
  std::size_t wb_len_ = 0;
  char* wb_buf_ = nullptr;         // the copy the kernel sends from
  io_driver* wb_owner_ = nullptr;  // the driver sending it
  clock::time_point wb_deadline_ = clock::time_point::max();
  sched::wake_token wb_waiter_;
};

// One call on a socket or file, from enter() to leave() (also when the
// fiber is unwound out of it).
class fd_guard {
 public:
  explicit fd_guard(fd_state* st) noexcept : st_(st && st->enter(use_) ? st : nullptr) {}
  ~fd_guard() {
    if (st_) st_->leave(use_);
  }
  fd_guard(const fd_guard&) = delete;
  fd_guard& operator=(const fd_guard&) = delete;

  explicit operator bool() const noexcept { return st_ != nullptr; }  // entered
  int fd() const noexcept { return st_->fd(); }
  fd_use* use() noexcept { return &use_; }
  accept_state* accept() const noexcept { return st_->accept(); }
  // The call failed: whether close() cut it short (the caller then reports
  // EBADF instead of what the cancelled operation returned).
  bool closed() const noexcept { return st_->closed(); }

 private:
  fd_use use_;
  fd_state* const st_;
};

inline std::unexpected<std::error_code> bad_fd_error() {
  return std::unexpected(std::error_code(EBADF, std::system_category()));
}

// Performs o as one call on the descriptor whose state is st: EBADF when it
// is empty or closed, or when close() cut the operation short.
result<int> perform_on(fd_state* st, op& o, clock::time_point deadline, const char* what,
                       std::source_location where = std::source_location::current());

// f(fd), a call that does not wait, on the descriptor whose state is st.
template <typename F>
auto on_fd(fd_state* st, F&& f) -> decltype(f(0)) {
  fd_guard g(st);
  if (!g) return bad_fd_error();
  return f(g.fd());
}

}  // namespace weft::io
