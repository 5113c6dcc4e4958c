// io/fd_state.cc — see io/fd_state.h.
#include "io/fd_state.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "io/accept.h"
#include "io/recv.h"

namespace weft::io {

namespace {
// The calling fiber's id (0 on a plain thread; fibers' start at 1): who
// started a write-behind.
std::uint64_t current_fiber_id() noexcept {
  sched::fiber* f = sched::current_fiber();
  return f ? f->id_ : 0;
}
}  // namespace

fd_state::~fd_state() {
  if (accept_) close_accept_state(accept_);  // gives back the listener's share
  if (recv_state* r = recv_.load(std::memory_order_relaxed))  // relaxed: nobody else holds *this
    close_recv_state(r);  // gives back the socket's share
  std::free(wb_buf_);  // null unless the driver went away with it in flight
}

recv_state* fd_state::make_recv() noexcept {
  lock_.lock();
  recv_state* r = recv_.load(std::memory_order_relaxed);  // relaxed: under lock_
  if (!r && !closed_) {
    r = new_recv_state();
    recv_.store(r, std::memory_order_release);  // pairs with recv()'s acquire
  }
  lock_.unlock();
  return r;
}

bool fd_state::closed() const noexcept {
  lock_.lock();
  bool c = closed_;
  lock_.unlock();
  return c;
}

bool fd_state::enter(fd_use& u) noexcept {
  u.st = this;
  lock_.lock();
  bool ok = !closed_;
  if (ok) ++users_;
  lock_.unlock();
  return ok;
}

void fd_state::leave(fd_use& u) noexcept {
  lock_.lock();
  if (u.slot) detach(u);  // a driver that returned early (an error before its park)
  bool last = --users_ == 0;
  bool close_now = last && closed_;
  bool gone = last && !owned_;
  const int fd = fd_;  // *this may be gone after the unlock (see close_fd())
  lock_.unlock();
  if (close_now) close_fd(fd);
  // SAFETY: nobody else holds *this: the socket object released it and no
  // operation is in flight.
  if (gone) delete this;
}

// Under lock_.
void fd_state::attach(fd_use& u, io_driver& owner, completion& c) noexcept {
  u.owner = &owner;
  u.slot = &c;
  u.prev = nullptr;
  u.next = uses_;
  if (uses_) uses_->prev = &u;
  uses_ = &u;
  // Closed between enter() and now: this operation was not there for
  // close() to cancel, so it cancels itself.
  if (closed_) owner.cancel(c);
}

// Under lock_.
void fd_state::detach(fd_use& u) noexcept {
  if (u.prev) u.prev->next = u.next;
  else uses_ = u.next;
  if (u.next) u.next->prev = u.prev;
  u.slot = nullptr;
  u.prev = u.next = nullptr;
}

result<void> fd_state::close(int* take_fd) noexcept {
  if (take_fd) *take_fd = -1;
  // A write-behind in flight is waited for as its write would have been:
  // until that write's deadline or a stop request (see *Write-behind*).
  // Given up on, it is cancelled; the descriptor closes when it ends.
  lock_.lock();
  // No write-behind starts from here on: one started after the settle
  // below would be cancelled with its write already reported sent. A write
  // racing this close() sends as a plain one, which close() cancels (EBADF)
  // or which completes first.
  wb_closing_ = true;
  // Only the fiber that wrote it waits (a write, then a close, in program
  // order). Another fiber's close() cuts it short, as it would cut short
  // that fiber's blocked send: a timeout fiber dropping a peer that stopped
  // reading must not wait for it. So does a plain thread's (id 0: fiber
  // ids start at 1).
  const bool behind = wb_pending_ && !closed_ && wb_starter_ == current_fiber_id();
  const clock::time_point behind_deadline = wb_deadline_;
  lock_.unlock();
  result<void> sent;
  if (behind) sent = settle(behind_deadline, std::source_location::current(), /*unwind=*/false);
  lock_.lock();
  // Another fiber's shutdown() ended the stream while it was in flight
  // (*Lingering*): its bytes still go, and close() is no failure, as a
  // close(2) after another thread's shutdown(2) is not.
  if (!sent && wb_abort_ != 0 && sent.error().value() == wb_abort_ &&
      sent.error().category() == std::system_category())
    sent = {};
  if (closed_) {
    lock_.unlock();
    return {};
  }
  sched::fiber* aborted = nullptr;
  if (wb_pending_ && !wb_done_) {
    // Its writer gave up on it (its write's deadline, a stop request):
    // cancelled now. Otherwise its write returned, so its bytes are the
    // kernel's to deliver, as a blocking send's would be after close(2):
    // it goes on, up to its write's deadline, and the descriptor closes
    // when it ends (*Lingering*).
    const bool gave_up = behind && !sent &&
                         (sent.error() == std::errc::timed_out ||
                          sent.error() == std::errc::operation_canceled);
    if (gave_up)
      wb_owner_->cancel_send_behind(*this, wb_seq_);  // only queues the cancel
    else
      aborted = linger_locked(EBADF);
  }
  closed_ = true;
  // A listener: the kernel stops queueing connections for it now. Under
  // lock_, while the descriptor is surely still open (after the unlock the
  // last operation to leave may close it).
  if (accept_) (void)::shutdown(fd_, SHUT_RDWR);
  // Under lock_: an attached slot stays alive until its detach(), which
  // needs lock_. The cancel itself only queues work for the slot's driver.
  for (fd_use* u = uses_; u; u = u->next) u->owner->cancel(*u->slot);
  bool idle = users_ == 0;
  // relaxed: made under lock_ (make_recv()), which we hold.
  recv_state* recv = recv_.load(std::memory_order_relaxed);
  lock_.unlock();
  if (aborted) sched::ready(aborted);  // SAFETY: its settle holds a user
  // Its parked readers wake with EBADF and the multishot receive is
  // cancelled (the kernel holds the socket open until it ends). *this,
  // and so the state, lives until our caller's release().
  if (recv) shut_recv_state(recv);
  // Its parked acceptors wake with EBADF and the multishot accept is
  // cancelled. The listener's share keeps the accept state alive.
  if (accept_) shut_accept_state(accept_);
  if (!idle) return sent;  // the last operation to leave closes it
  // Idle and closed: no enter() succeeds any more, so nobody else closes it.
  if (take_fd) {
    *take_fd = fd_;
    return sent;
  }
  if (::close(fd_) < 0 && errno != EINTR)  // EINTR: Linux closed it anyway
    return std::unexpected(std::error_code(errno, std::system_category()));
  return sent;
}

// Takes the number, not *this: with closed_ set and users_ zero after the
// caller's unlock, the owner's release() may delete *this at once.
void fd_state::close_fd(int fd) noexcept { (void)::close(fd); }

void fd_state::release() noexcept {
  lock_.lock();
  owned_ = false;
  bool gone = users_ == 0;
  lock_.unlock();
  if (gone) delete this;  // SAFETY: as in leave()
}

// ---- Write-behind ----------------------------------------------------------------

bool fd_state::start_write_behind(io_driver& d, std::span<const char> buf,
                                  clock::time_point deadline) {
  const write_behind_mode mode = d.sends_behind();
  if (mode == write_behind_mode::none || buf.empty() || buf.size() > kWriteBehindMax)
    return false;
  if (mode == write_behind_mode::tcp && !is_inet()) return false;
  auto* copy = static_cast<char*>(std::malloc(buf.size()));
  if (!copy) return false;
  std::memcpy(copy, buf.data(), buf.size());
  lock_.lock();
  if (closed_ || wb_closing_ || wb_pending_ || wb_shut_) {
    lock_.unlock();
    std::free(copy);
    return false;
  }
  wb_pending_ = true;
  wb_done_ = false;
  wb_res_ = 0;
  wb_len_ = buf.size();
  wb_buf_ = copy;
  wb_owner_ = &d;
  wb_deadline_ = deadline;
  ++users_;  // the send's, until on_write_behind_done()
  wb_starter_ = current_fiber_id();
  if (!wb_used_.load(std::memory_order_relaxed))  // see write_behind_used()
    wb_used_.store(true, std::memory_order_relaxed);
  // Numbered per thread, which is d's owner (send_behind()): a cancel
  // queued from another thread may be drained after this send completed
  // and *this was freed, and a new fd_state at the same address must not
  // have a send behind under the same key (*Cancel keys* in
  // io/uring_driver.cc). Per fd_state, both would be number 1.
  static thread_local std::uint64_t next_seq = 0;
  const std::uint64_t seq = wb_seq_ = ++next_seq;
  lock_.unlock();
  // A close() from another fiber now waits for it, or cancels it: a cancel
  // from another thread is queued for d's thread, which is this one, and
  // runs after the SQE below.
  d.send_behind(*this, seq, fd_, copy, buf.size());
  return true;
}

// One getsockopt per socket, at its first small write; a race of two
// first writers only asks twice (relaxed: the answer never changes).
bool fd_state::is_inet() noexcept {
  std::uint8_t k = family_.load(std::memory_order_relaxed);
  if (k == kFamilyUnknown) {
    int domain = 0;
    socklen_t len = sizeof domain;
    const bool inet = ::getsockopt(fd_, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
                      (domain == AF_INET || domain == AF_INET6);
    k = inet ? kFamilyInet : kFamilyOther;
    family_.store(k, std::memory_order_relaxed);
  }
  return k == kFamilyInet;
}

// Under lock_, with a write-behind in flight that outlives a call ending
// the stream from a fiber other than its writer (*Lingering*): a settle
// parked for it returns `err` (as that fiber's blocked send would), and the
// send is cancelled at its write's deadline, or the driver's linger cap
// from now if that comes first (a write with no deadline to a peer that
// never reads would otherwise hold the descriptor and the copy until the
// runtime ends), if it has not ended by then. Returns the settler to make
// ready after the unlock.
sched::fiber* fd_state::linger_locked(int err) noexcept {
  wb_abort_ = err;
  if (!wb_timed_) {
    clock::time_point until = wb_deadline_;
    const clock::duration cap = wb_owner_->linger_cap();
    if (cap != clock::duration::max()) until = std::min(until, clock::now() + cap);
    if (until != clock::time_point::max()) {
      wb_timed_ = true;
      wb_owner_->cancel_send_behind_at(*this, wb_seq_, until);  // only queues it
    }
  }
  // Claimed under lock_ (the rule on sched::claim; see on_write_behind_done()).
  if (!wb_waiter_) return nullptr;
  return sched::claim(std::exchange(wb_waiter_, {}), sched::wake_reason::notified);
}

bool fd_state::defer_shutdown() noexcept {
  lock_.lock();
  // No write-behind starts from here on, decided with the look below under
  // one lock: a writer's small write that started after a look found none
  // in flight, and before wb_shut_ was set, would return success and then
  // be refused (EPIPE) by the shutdown(2) that follows, and the peer would
  // read a clean end of stream without its bytes.
  wb_shut_ = true;
  const bool defer = wb_pending_ && !wb_done_ && !closed_;
  sched::fiber* aborted = nullptr;
  if (defer) {
    wb_fin_ = true;
    aborted = linger_locked(EPIPE);
  }
  lock_.unlock();
  if (aborted) sched::ready(aborted);  // SAFETY: its settle holds a user
  return defer;
}

bool fd_state::on_write_behind_done(int res) noexcept {
  lock_.lock();
  const bool timed = wb_timed_;
  char* copy = std::exchange(wb_buf_, nullptr);
  wb_res_ = res;
  wb_done_ = true;
  // A shutdown(SHUT_WR) another fiber asked for while it was in flight:
  // the end of the stream goes after its bytes. The descriptor is open:
  // the send still counts in users_.
  const bool fin = std::exchange(wb_fin_, false);
  // Cut short (cancelled at its deadline or the linger cap, or failed)
  // after the stream was ended (closed, or shut down by another fiber):
  // nobody is left to report it to, and the peer must not see a clean end
  // of stream after a gap. So no end of stream: the connection is reset
  // (connect(AF_UNSPEC) on TCP: the kernel sends a reset and later sends
  // fail), as the kernel's own close(2) does when it throws data away
  // (unread input). The peer reads what arrived and then ECONNRESET. A
  // Unix stream (WEFT_WRITE_BEHIND=1) has no reset: its end goes as asked.
  const bool cut = res < 0 || static_cast<std::size_t>(res) < wb_len_;
  bool reset = false;
  if (cut && (fin || closed_)) {
    ::sockaddr unspec{};
    unspec.sa_family = AF_UNSPEC;
    reset = ::connect(fd_, &unspec, sizeof unspec) == 0;
  }
  if (fin && !reset) (void)::shutdown(fd_, SHUT_WR);
  // Claimed under lock_: the settler takes lock_ to forget its waiter
  // after waking (the rule on sched::claim).
  sched::fiber* f = nullptr;
  if (wb_waiter_) f = sched::claim(std::exchange(wb_waiter_, {}), sched::wake_reason::notified);
  bool last = --users_ == 0;
  bool close_now = last && closed_;
  bool gone = last && !owned_;
  const int fd = fd_;  // *this may be gone after the unlock (see close_fd())
  lock_.unlock();
  std::free(copy);
  if (f) sched::ready(f);
  if (close_now) close_fd(fd);
  // SAFETY: as in leave(); a settler holds a user, so f's socket is not gone.
  if (gone) delete this;
  return timed;
}

bool fd_state::write_behind_is_callers() const noexcept {
  lock_.lock();
  bool r = wb_pending_ && wb_starter_ == current_fiber_id();
  lock_.unlock();
  return r;
}

bool fd_state::write_behind_unsent() const noexcept {
  lock_.lock();
  bool r = wb_pending_ && !wb_done_;
  lock_.unlock();
  return r;
}

clock::time_point fd_state::write_behind_deadline() const noexcept {
  lock_.lock();
  clock::time_point d = wb_pending_ ? wb_deadline_ : clock::time_point::max();
  lock_.unlock();
  return d;
}

// The settle's park, on the scheduler stack after the switch.
void fd_state::publish_settle(void* self, sched::wake_token t) {
  auto* st = static_cast<fd_state*>(self);
  st->lock_.lock();
  // Done already, the stream ended by another fiber (*Lingering*: its
  // linger_locked() ran after the settle looked and found no waiter to
  // wake, so nothing else would wake this one until the send ends, up to
  // the linger cap), or another fiber waits: at once (the settle returns
  // the abort; the latter polls).
  bool now = !st->wb_pending_ || st->wb_done_ || st->wb_abort_ || st->wb_waiter_;
  if (!now) st->wb_waiter_ = t;
  st->lock_.unlock();
  // Still `parking` until this claim: waking it after the unlock is safe.
  if (now) sched::wake(t);
}

result<void> fd_state::settle(clock::time_point deadline, std::source_location where,
                              bool unwind) {
  lock_.lock();
  while (wb_pending_ && !wb_done_) {
    if (wb_abort_) {  // another fiber ended the stream (*Lingering*)
      const int err = wb_abort_;
      lock_.unlock();
      return std::unexpected(std::error_code(err, std::system_category()));
    }
    lock_.unlock();
    sched::fiber* self = sched::current_fiber();
    if (!self) return std::unexpected(std::make_error_code(std::errc::operation_would_block));
    sched::wake_reason why = sched::park({.publish = &fd_state::publish_settle,
                                          .arg = this,
                                          .deadline = deadline,
                                          .cancellable = true,
                                          .what = "tcp write (behind)",
                                          .where = where});
    lock_.lock();
    if (wb_waiter_.f == self) wb_waiter_ = {};  // a stale token must not be claimed
    if (!wb_pending_ || wb_done_) continue;  // the loop ends: its result is taken below
    if (why == sched::wake_reason::cancelled) {
      lock_.unlock();
      if (unwind) sched::unwind_point();
      return std::unexpected(std::make_error_code(std::errc::operation_canceled));
    }
    if (wb_abort_) continue;  // the loop's top returns it
    if (why == sched::wake_reason::timed_out) {
      lock_.unlock();
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    }
    // Another fiber is the waiter (two fibers writing one socket at once):
    // look again in a millisecond.
    lock_.unlock();
    auto soon = std::min(deadline, clock::now() + std::chrono::milliseconds(1));
    why = sched::park({.publish = [](void*, sched::wake_token) {},
                       .deadline = soon,
                       .cancellable = true,
                       .what = "tcp write (behind)",
                       .where = where});
    if (why == sched::wake_reason::cancelled) {
      if (unwind) sched::unwind_point();
      return std::unexpected(std::make_error_code(std::errc::operation_canceled));
    }
    lock_.lock();
  }
  if (!wb_pending_) {
    lock_.unlock();
    return {};
  }
  const int res = wb_res_;
  const std::size_t len = wb_len_;
  // Another fiber ended the stream meanwhile (*Lingering*): a send cut
  // short then failed because of that (its linger's timed cancel:
  // ECANCELED, which no one here asked for), so that is the error.
  const int abort = std::exchange(wb_abort_, 0);
  wb_pending_ = wb_done_ = false;
  wb_timed_ = false;
  lock_.unlock();
  const bool cut = res < 0 || static_cast<std::size_t>(res) < len;
  if (cut && abort) return std::unexpected(std::error_code(abort, std::system_category()));
  if (res < 0) return std::unexpected(std::error_code(-res, std::system_category()));
  // MSG_WAITALL: short only when an error cut it off, which it then hides.
  if (static_cast<std::size_t>(res) < len)
    return std::unexpected(std::make_error_code(std::errc::broken_pipe));
  return {};
}

result<int> perform_on(fd_state* st, op& o, clock::time_point deadline, const char* what,
                       std::source_location where) {
  fd_guard g(st);
  if (!g) return bad_fd_error();
  o.fd = g.fd();
  o.use = g.use();
  auto r = perform(o, deadline, what, where);
  if (!r && g.closed()) return bad_fd_error();
  return r;
}

void fd_use::attach(io_driver& d, completion& c) noexcept {
  st->lock_.lock();
  st->attach(*this, d, c);
  st->lock_.unlock();
}

void fd_use::detach() noexcept {
  st->lock_.lock();
  if (slot) st->detach(*this);
  st->lock_.unlock();
}

}  // namespace weft::io
