// io/accept.cc
//
// tcp_listener::accept(). On io_uring, one multishot accept per listener
// (see *Multishot operations* in io/driver.h) feeds a queue of accepted
// descriptors in the listener's accept_state: accept() pops one, or parks
// until the multishot delivers one. When the queue is empty it first tries
// one accept4 of its own (accept_now()), before it arms the multishot or
// parks on the armed one, so that a connection already waiting is taken
// by a call with a deadline of now, as the epoll driver's accept4 takes
// it. The epoll driver keeps one accept per call (accept_once()), one
// acceptor at a time: see *Polled accepts*.
//
// The multishot is armed on the ring of the worker where an accept() finds
// none armed. Its CQEs arrive in that worker's reap() even after the
// acceptor moved elsewhere, so on_result() only queues the result and
// wakes a parked acceptor (claim under lock_, ready after): it never
// touches a fiber's stack.
//
// Invariants:
//   - lock_ guards ready_, waiters_ (and its promises), armed_, owner_,
//     closed_, polling_ and queued_.
//   - armed_ <=> a multishot SQE on owner_'s ring names this state and
//     holds one share of refs_. Only its last CQE (more == false) or
//     on_driver_gone() clears armed_, and drops that share after.
//   - refs_ = 1 for the listener (held by its fd_state until that is
//     deleted) + 1 while armed + 1 per accept() call in progress. The last unref() deletes
//     the state, closing the descriptors still in ready_.
//   - Once closed_, nothing arms again, accept() fails with EBADF and
//     descriptors queued or still arriving are closed at once (shut(),
//     on_result()), except for a descriptor promised to an acceptor
//     (*Promises* in io/parked.h): an acceptor an arrival woke, when it
//     runs after a close, still takes a queued descriptor, as a reader
//     woken by data gets it in io/recv.cc. So ready_ then holds at most
//     one descriptor per promise.
//   - Back-pressure: the multishot accepts only while someone wants
//     connections. It is cancelled (stopping_) once ready_ holds cap_
//     descriptors nobody took, and when an accept() gives up (deadline,
//     stop) leaving no acceptor parked; the kernel's listen queue then
//     holds further connections, as its backlog says. The next accept()
//     that finds ready_ empty arms it again.
//   - waiters_ holds the wake tokens of parked acceptors; a waker pops a
//     token and claims it under lock_ (the lock an acceptor takes to
//     retract its token after a timeout or cancel: the rule on
//     sched::claim).
//
// *Deadlock*: the deadlock detector (sched/report.cc) treats a fiber
// parked here as one that something outside can wake (a client that
// connects), as it does a fiber parked on any other I/O, but not the
// multishot itself: armed with nobody parked for its results (a server
// that accepted and went on to wait for something else), it wakes no
// one, so it does not count in the driver's pending(). A parked acceptor
// holds a scheduler outside reference instead, as a fiber in blocking()
// does: taken before its park and dropped after it, while its fiber runs,
// so the detector (which runs only while every worker is idle) always
// sees the exact count.
//
// *Polled accepts* (a driver without multishot accept: epoll): each
// worker's epoll instance has the listener armed for its own waiters, so
// a connection would wake every acceptor parked on it (all report it
// readable; one wins accept4, the rest find EAGAIN and park again: a
// thundering herd). Instead, as Go's accept waits on the fd's lock, one
// acceptor at a time holds the poller role (polling_) and waits for
// readiness in accept_once(); the others park in queued_, oldest first.
// The poller hands the role to the oldest when its call ends for any
// reason (a connection, an error, its deadline, a stop request): claimed
// under lock_, polling_ stays set and belongs to the woken fiber, which
// then polls; with none queued polling_ is cleared. So a connection wakes
// one acceptor, and acceptors are served in turn (a server with an
// acceptor per worker gets its connections spread over them). A queued
// acceptor that gives up forgets its token under lock_, so the role is
// never handed to a fiber that is gone; a close wakes the poller (its
// readiness wait is cancelled, and the shut-down listener is readable)
// and shut() every queued acceptor, all failing with EBADF. A call whose
// deadline is already here tries one accept4 of its own (accept_now())
// instead of queueing: a connection already waiting is taken at once. Any
// other call queues behind the poller, even with a connection waiting
// (the poller takes it): an acceptor that came back for more would
// otherwise take it first, and the turns would go to the quickest (under
// TSan, one acceptor of four took 89 of 200 connections and another 24).
//
// Who calls what:
//   accept()               a fiber, any worker
//   shut_accept_state()    fd_state::close(), any thread
//   close_accept_state()   fd_state's destructor, any thread
//   on_result()            the arming driver, on its worker thread
//   on_driver_gone()       the arming driver's destructor
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <deque>
#include <string>
#include <vector>

#include "io/accept.h"
#include "io/driver.h"
#include "io/fd_state.h"
#include "io/parked.h"
#include "io/socket.h"
#include "sched/scheduler.h"

namespace weft::io {

namespace {
// Descriptors a multishot accept queued that no accept() took yet, all
// listeners together (io_stats::accept_queued). relaxed: a gauge.
std::atomic<std::int64_t> g_accept_queued{0};
}  // namespace

std::uint64_t accept_queued_descriptors() noexcept {
  return static_cast<std::uint64_t>(
      std::max<std::int64_t>(0, g_accept_queued.load(std::memory_order_relaxed)));
}

class accept_state final : public multishot_sink {
 public:
  // cap: the listen backlog (see *Back-pressure*).
  explicit accept_state(int cap) : cap_(cap < 1 ? 1 : cap > kMaxReady ? kMaxReady : cap) {}

  // relaxed: the caller already holds a share, so the count cannot reach
  // zero meanwhile; nothing is published by taking one.
  void ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  // acq_rel: the release publishes this holder's use of the state; the
  // acquire in the last unref() pairs with every earlier release, so the
  // delete comes after all of them.
  void unref() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // A descriptor from the queue, arming the multishot if needed and
  // parking until one arrives. std::errc::not_supported: this worker's
  // driver has no multishot accept (the caller accepts once instead).
  result<int> take(int listen_fd, clock::time_point deadline, std::source_location where);
  // A connection taken one acceptor at a time (*Polled accepts*).
  result<int> take_polled(fd_guard& g, clock::time_point deadline, std::source_location where);
  void shut() noexcept;
  void on_result(int res, std::uint32_t flags, bool more) noexcept override;
  void on_driver_gone() noexcept override;
  void unlink_on_close(std::string path);

 private:
  ~accept_state() {
    for (int fd : ready_)
      if (fd >= 0) {
        g_accept_queued.fetch_sub(1, std::memory_order_relaxed);
        ::close(fd);
      }
  }
  int pop_locked() noexcept;
  void drop_unpromised_locked(std::vector<int>& out);
  static result<int> accept_now(int listen_fd);
  static void publish(void* self, sched::wake_token t);
  static void publish_queued(void* self, sched::wake_token t);
  sched::wake_reason park_acceptor(sched::publish_fn publish, clock::time_point deadline,
                                   std::source_location where);
  void hand_on() noexcept;
  void retract() noexcept;
  io_driver* stop_locked() noexcept;

  // At most this many accepted descriptors wait in ready_ (a listener with
  // a larger backlog keeps the rest in the kernel's queue).
  static constexpr int kMaxReady = 64;
  const std::size_t cap_;

  weft::spinlock lock_;
  std::deque<int> ready_;                  // guarded by lock_: fds, or -errno
  parked_fibers waiters_;                  // guarded by lock_
  io_driver* owner_ = nullptr;             // guarded by lock_: the arming driver
  bool armed_ = false;                     // guarded by lock_
  bool stopping_ = false;                  // guarded by lock_: a cancel of the armed multishot was sent
  bool closed_ = false;                    // guarded by lock_
  // *Polled accepts*, guarded by lock_: an acceptor holds the poller role;
  // the acceptors waiting for it.
  bool polling_ = false;
  parked_fibers queued_;
  std::string unlink_path_;                // set before any accept(); used by shut() once
  std::atomic<int> refs_{1};
};

namespace {

std::unexpected<std::error_code> sys_error(int e) {
  return std::unexpected(std::error_code(e, std::system_category()));
}

// One IORING_OP_ACCEPT, or epoll's readiness wait and accept4.
result<int> accept_once(fd_guard& g, clock::time_point deadline, std::source_location where) {
  op o{.kind = op_kind::accept, .fd = g.fd(), .use = g.use()};
  return perform(o, deadline, "tcp accept", where);
}

}  // namespace

// The park's publish step, on the scheduler stack after the switch:
// take() parked holding lock_.
void accept_state::publish(void* self, sched::wake_token t) {
  auto* s = static_cast<accept_state*>(self);
  s->waiters_.add(t);
  s->lock_.unlock();
}

// Parks the calling acceptor, lock_ held; `publish` records its token and
// drops lock_. It holds an outside reference meanwhile: a client that
// connects can wake it (*Deadlock*).
sched::wake_reason accept_state::park_acceptor(sched::publish_fn publish,
                                               clock::time_point deadline,
                                               std::source_location where) {
  sched::scheduler::add_fiber_outside_ref(+1);
  sched::wake_reason why = sched::park({.publish = publish,
                                        .arg = this,
                                        .deadline = deadline,
                                        .cancellable = true,
                                        .what = "tcp accept",
                                        .where = where});
  sched::scheduler::add_fiber_outside_ref(-1);
  return why;
}

// take_polled()'s park: it parked holding lock_.
void accept_state::publish_queued(void* self, sched::wake_token t) {
  auto* s = static_cast<accept_state*>(self);
  s->queued_.add(t);
  s->lock_.unlock();
}

// The poller's call ends: the role goes to the oldest queued acceptor
// still parked (polling_ stays set, now for it), or is given up.
void accept_state::hand_on() noexcept {
  std::vector<sched::fiber*> next;
  lock_.lock();
  queued_.claim(next, /*all=*/false);
  if (next.empty()) polling_ = false;
  lock_.unlock();
  for (sched::fiber* f : next) sched::ready(f);
}

result<int> accept_state::take_polled(fd_guard& g, clock::time_point deadline,
                                      std::source_location where) {
  bool handed = false;  // the last park ended with a wake: hand_on() or shut()
  for (;;) {
    lock_.lock();
    if (closed_) {  // shut() woke us (or the role came just before it)
      lock_.unlock();
      return sys_error(EBADF);
    }
    if (handed || !polling_) {
      polling_ = true;
      lock_.unlock();
      break;
    }
    if (clock::now() >= deadline) {
      // Its deadline already here: one accept4 of its own, so a connection
      // waiting is taken at once, as epoll's accept4 always took it. Not
      // before: one that came back for more would take the connection the
      // poller woke for, ahead of the acceptors queued in turn.
      lock_.unlock();
      auto r = accept_now(g.fd());
      if (r && *r >= 0)
        if (io_driver* d = current_driver())  // no park since: d's worker, its writer
          io_counters::bump(d->counters().ops);
      if (!r || *r >= 0) return r;
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    }
    // publish_queued() records the token and unlocks lock_. A client that
    // connects wakes it (through the poller).
    sched::wake_reason why = park_acceptor(&accept_state::publish_queued, deadline, where);
    if (why == sched::wake_reason::notified) {  // the waker popped the token
      handed = true;
      continue;
    }
    // No waker took the token, so the role was not handed to us.
    lock_.lock();
    queued_.forget_current();
    lock_.unlock();
    if (why == sched::wake_reason::timed_out)
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    sched::unwind_point();
    return std::unexpected(std::make_error_code(std::errc::operation_canceled));
  }
  // The poller: the role passes on however the call ends, also when the
  // runtime unwinds this fiber.
  struct role {
    accept_state* s;
    ~role() { s->hand_on(); }
  } held{this};
  return accept_once(g, deadline, where);
}

// After a park that was not a notify: forgets this fiber's token if no
// waker took it. The last acceptor to give up stops the multishot
// (*Back-pressure*).
void accept_state::retract() noexcept {
  lock_.lock();
  waiters_.forget_current();
  io_driver* stop = waiters_.empty() ? stop_locked() : nullptr;
  lock_.unlock();
  if (stop) stop->cancel_multishot(*this);
}

// Under lock_: the driver to ask to cancel the armed multishot, unless no
// multishot is armed or a cancel is on its way.
io_driver* accept_state::stop_locked() noexcept {
  if (!armed_ || stopping_ || closed_) return nullptr;
  stopping_ = true;
  return owner_;
}

result<int> accept_state::take(int listen_fd, clock::time_point deadline,
                               std::source_location where) {
  bool tried = false;  // accept_now() before arming or parking, once per call
  bool woken = false;  // the last park ended with a wake (maybe an arrival's)
  for (;;) {
    lock_.lock();
    const bool promised = woken && waiters_.take_promise();
    woken = false;
    if (closed_) {
      // An arrival that woke this acceptor before the close: its
      // descriptor is this call's (*Promises*).
      if (promised && !ready_.empty()) {
        int r = pop_locked();
        lock_.unlock();
        if (r < 0) return sys_error(-r);
        return r;
      }
      lock_.unlock();
      return sys_error(EBADF);
    }
    if (!ready_.empty()) {
      int r = pop_locked();
      lock_.unlock();
      if (r < 0) return sys_error(-r);
      return r;
    }
    if (!tried) {
      // A connection that waits in the kernel's queue is taken now (Go's
      // accept tries before it waits), also while the multishot is armed:
      // the multishot (armed already, or below) takes it only once its
      // worker reaps its ring (under DEFER_TASKRUN, only then does the
      // kernel even accept it), after a deadline of now or a moment away
      // has ended the call. A connection either one takes is served.
      lock_.unlock();
      tried = true;
      auto r = accept_now(listen_fd);
      if (r && *r >= 0)
        if (io_driver* d = current_driver())  // no park since: d's worker, its writer
          io_counters::bump(d->counters().ops);
      if (!r || *r >= 0) return r;
      continue;  // none: look again under lock_, then arm or park
    }
    if (!armed_) {
      // Read here, not before a park: the fiber may have moved since.
      io_driver* d = current_driver();
      if (!d || !d->has_multishot_accept()) {
        lock_.unlock();
        return std::unexpected(std::make_error_code(std::errc::not_supported));
      }
      armed_ = true;
      stopping_ = false;
      owner_ = d;
      ref();  // the armed SQE's share, dropped by its last on_result()
      lock_.unlock();
      // Still on d's worker: nothing parked since current_driver(). If the
      // kernel would not take it, the multishot ends before it began, with
      // -EBUSY for an acceptor (a listener's passing error, as EMFILE).
      if (!d->arm_multishot_accept(listen_fd, *this)) on_result(-EBUSY, 0, /*more=*/false);
      continue;
    }
    // publish() records the token and unlocks lock_.
    sched::wake_reason why = park_acceptor(&accept_state::publish, deadline, where);
    if (why == sched::wake_reason::notified) {  // the waker popped the token
      woken = true;
      continue;
    }
    retract();  // queued descriptors stay for the next accept()
    if (why == sched::wake_reason::timed_out)
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    sched::unwind_point();
    return std::unexpected(std::make_error_code(std::errc::operation_canceled));
  }
}

// Under lock_, ready_ not empty: its first entry (a descriptor, or -errno).
int accept_state::pop_locked() noexcept {
  int r = ready_.front();
  ready_.pop_front();
  if (r >= 0) g_accept_queued.fetch_sub(1, std::memory_order_relaxed);
  return r;
}

// Under lock_, once closed_: keeps in ready_ one descriptor for each
// woken acceptor promised one (*Promises*: it takes the front ones), and
// moves the other descriptors to `out`, for the caller to close; a queued
// error, which nobody can be told of any more, is dropped.
void accept_state::drop_unpromised_locked(std::vector<int>& out) {
  std::size_t keep = waiters_.promises();
  std::deque<int> kept;
  for (int r : ready_) {
    if (r < 0) continue;
    if (kept.size() < keep) {
      kept.push_back(r);
    } else {
      g_accept_queued.fetch_sub(1, std::memory_order_relaxed);
      out.push_back(r);
    }
  }
  ready_.swap(kept);
}

// One accept4 that never blocks: the listener is non-blocking
// (tcp_listener::bind), so when there is no connection, or the multishot
// took it first, it fails with EAGAIN: then -1. EMFILE and the like are
// returned as any accept returns them.
result<int> accept_state::accept_now(int listen_fd) {
  int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd >= 0) return fd;
  int e = errno;  // read right after the call
  if (e == EAGAIN || e == EWOULDBLOCK) return -1;
  return sys_error(e);
}

void accept_state::on_result(int res, std::uint32_t flags, bool more) noexcept {
  (void)flags;
  std::vector<sched::fiber*> wake;
  int stray = -1;
  io_driver* stop = nullptr;
  lock_.lock();
  if (!more) {
    armed_ = false;
    stopping_ = false;
    owner_ = nullptr;
  }
  if (closed_) {
    if (res >= 0) stray = res;
  } else {
    // -ECANCELED is our own cancel's, not news for an acceptor; EMFILE and
    // the like are, and the listener stays usable.
    if (res != -ECANCELED) {
      ready_.push_back(res);
      if (res >= 0) g_accept_queued.fetch_add(1, std::memory_order_relaxed);
    }
    // The multishot ended: wake everyone, so that one of them re-arms it
    // on its worker and the others park again behind it.
    if (!more) waiters_.claim(wake, /*all=*/true);
    else if (res != -ECANCELED) waiters_.claim(wake, /*all=*/false);
    // The first one woken is promised this arrival (*Promises*).
    if (res >= 0 && !wake.empty()) waiters_.promise(wake.front());
    if (more && ready_.size() >= cap_) stop = stop_locked();  // *Back-pressure*
  }
  lock_.unlock();
  for (sched::fiber* f : wake) sched::ready(f);
  if (stray >= 0) ::close(stray);
  // The armed SQE's share keeps *this alive: its last CQE is still to come.
  if (stop) stop->cancel_multishot(*this);
  // SAFETY: the armed SQE's share: after this, *this may be gone.
  if (!more) unref();
}

void accept_state::on_driver_gone() noexcept {
  lock_.lock();
  armed_ = false;
  owner_ = nullptr;
  lock_.unlock();
  unref();  // the armed SQE's share: its last CQE will never be reaped
}

void accept_state::shut() noexcept {
  std::vector<sched::fiber*> wake;
  std::vector<int> strays;
  lock_.lock();
  bool first = !closed_;
  closed_ = true;
  io_driver* owner = armed_ ? owner_ : nullptr;
  waiters_.claim(wake, /*all=*/true);
  queued_.claim(wake, /*all=*/true);  // *Polled accepts*: they fail with EBADF
  drop_unpromised_locked(strays);
  lock_.unlock();
  for (sched::fiber* f : wake) sched::ready(f);
  // Their clients see the end now, as those still in the kernel's queue
  // do when the listening socket goes: not when the listener object is
  // destroyed, which a server draining its connections may keep for long.
  for (int fd : strays) ::close(fd);
  // The listener's share keeps *this alive across the call; the cancel
  // only uses its address as a key. The last CQE (-ECANCELED) follows.
  if (owner) owner->cancel_multishot(*this);
  if (first && !unlink_path_.empty()) ::unlink(unlink_path_.c_str());
}

void accept_state::unlink_on_close(std::string path) { unlink_path_ = std::move(path); }

accept_state* new_accept_state(int backlog) { return new accept_state(backlog); }

void shut_accept_state(accept_state* s) noexcept { s->shut(); }

void unlink_on_close(accept_state* s, std::string path) { s->unlink_on_close(std::move(path)); }

void close_accept_state(accept_state* s) noexcept {
  s->shut();
  s->unref();  // the listener's share
}

result<tcp_stream> tcp_listener::accept(deadline_arg d, std::source_location where) {
  // The guard keeps the descriptor number ours, and the accept state
  // alive, until this call returns, even if another fiber closes the
  // listener meanwhile (io/fd_state.h).
  fd_guard g(st_);
  if (!g) return sys_error(EBADF);
  accept_state* s = g.accept();  // null: adopted, not made by bind()
  io_driver* here = current_driver();
  result<int> r = std::unexpected(std::make_error_code(std::errc::not_supported));
  if (s && here && here->has_multishot_accept()) {
    s->ref();  // this call's share, for the multishot's bookkeeping
    struct share {
      accept_state* s;
      ~share() { s->unref(); }  // also when the runtime unwinds this fiber
    } held{s};
    r = s->take(g.fd(), d.when, where);
  }
  if (!r && r.error() == std::errc::not_supported) {
    // epoll (or a plain thread): one acceptor at a time waits for
    // readiness (*Polled accepts*); a listener adopted, not made by
    // bind(), has no state to queue on.
    if (s && here) r = s->take_polled(g, d.when, where);
    else r = accept_once(g, d.when, where);
  }
  if (!r && g.closed()) return sys_error(EBADF);
  if (!r) return std::unexpected(r.error());
  return tcp_stream(*r);
}

}  // namespace weft::io