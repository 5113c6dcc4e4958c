// io/fd_state.cc — see io/fd_state.h.
#include "io/fd_state.h"

#include <unistd.h>

#include <cerrno>

#include "io/accept.h"

namespace weft::io {

fd_state::~fd_state() {
  if (accept_) close_accept_state(accept_);  // gives back the listener's share
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
  lock_.unlock();
  if (close_now) close_fd();
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
  lock_.lock();
  if (closed_) {
    lock_.unlock();
    return {};
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
  lock_.unlock();
  // Its parked acceptors wake with EBADF and the multishot accept is
  // cancelled. The listener's share keeps the accept state alive.
  if (accept_) shut_accept_state(accept_);
  if (!idle) return {};  // the last operation to leave closes it
  // Idle and closed: no enter() succeeds any more, so nobody else closes it.
  if (take_fd) {
    *take_fd = fd_;
    return {};
  }
  if (::close(fd_) < 0 && errno != EINTR)  // EINTR: Linux closed it anyway
    return std::unexpected(std::error_code(errno, std::system_category()));
  return {};
}

void fd_state::close_fd() noexcept { (void)::close(fd_); }

void fd_state::release() noexcept {
  lock_.lock();
  owned_ = false;
  bool gone = users_ == 0;
  lock_.unlock();
  if (gone) delete this;  // SAFETY: as in leave()
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
