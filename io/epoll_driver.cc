// io/epoll_driver.cc
//
// The readiness driver: one epoll instance per worker, used when io_uring
// is unavailable or WEFT_IO=epoll. An operation is tried at once as a
// non-blocking system call; on EAGAIN the fiber waits for readiness
// (edge-triggered, EPOLLONESHOT, as libtorque does) and tries again.
//
// Invariants:
//   - table_, waiting_ and woken_ are guarded by lock_, which the owning
//     worker's thread takes (a fiber arms a wait only while it runs
//     there; poll() and wait() hold it, wait() through its epoll_pwait2),
//     and rescue() tries: the monitor's thread, while the owner is stuck
//     in one fiber, takes the cancels and readiness events the owner cannot
//     and completes their waits (their fibers go to the inject queue and
//     run on other workers). Other threads reach the driver through wake()
//     and cancel(), and its receive buffers (free_bufs_, guarded by
//     buf_lock_ alone) through release_buffer() and a recv_pooled whose
//     fiber moved (see *Receive buffers*).
//   - table_[fd] lists the fibers of this worker waiting to read and to
//     write fd; each is a wait_slot on its fiber's stack, counted in
//     waiting_ until complete() ran for it (see *Completion slots* in
//     io/driver.h). An event wakes every waiter of its direction: they all
//     try again, and those that find nothing wait again. (A listener has
//     one waiter across all workers: io/accept.cc, *Polled accepts*.)
//   - An epoll event carries the fd, never a pointer: a stale event (the
//     wait was cancelled, the fd closed and reused) finds no slot or wakes
//     a waiter early, which just tries its system call again.
//   - Deadlines are the scheduler's timers (park_request::deadline): a
//     timed-out or stopped wait is removed by its owner (cancel()) before
//     the fiber goes on.
//
// Regular-file operations (openat, read_at, write_at, fsync, close) have
// no readiness: they run on the blocking pool (io/blocking.h) while the
// fiber parks, so a slow disk never stalls the worker. Nor has a connect to
// a Unix listener whose accept queue is full, nor a datagram sent by
// address to a full Unix receiver: see *Full Unix listeners*.
//
// *Receive buffers* (recv_pooled, for tcp_stream::read_pooled): each
// try of the receive borrows a heap buffer of kPooledBufferSize from the
// driver's free list (free_bufs_; the heap when it is empty) and puts it
// back unless the receive returned data, so a connection that waits for
// readiness holds none, and a try that finds nothing (EAGAIN: the common
// case of a server that reads again after its reply) costs two list
// operations, not an allocation. A buffer lent with data comes back
// through release_buffer(), from any thread, and goes onto the list while
// it has room (kFreeBuffers; beyond that to the heap). So a steady
// request/response server allocates nothing per request. Buffers are taken
// from the driver perform() was called on (the one read_pooled names as
// the owner), even when the fiber has since moved to another worker.
//
// Who calls what:
//   perform(), poll(), flush(), wait(), pending()   owner thread
//   wake(), cancel(), release_buffer()              any thread
//   take_buffer(), give_back()                      any thread (recv_pooled's
//                                                   fiber, wherever it runs)
//   rescue()                                        the monitor
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <mutex>
#include <utility>
#include <vector>

#include "io/blocking.h"
#include "io/driver.h"
#include "io/fd_state.h"
#include "io/recv.h"
#include "sched/worker.h"

namespace weft::io {
namespace {

// Events taken per epoll_wait: a batch, not a bound (the rest stay queued
// in the kernel, in order); poll() takes fewer (sched::wake_budget).
constexpr int kMaxEvents = static_cast<int>(sched::wake_budget::kBatch);
// A fiber whose calls keep succeeding at once (a fast peer, a full receive
// buffer) never parks: each success spends its coop budget (sched/park.h),
// so it yields now and then. io_uring parks on every operation.

// Free receive buffers a driver keeps (see *Receive buffers*): 256 KiB at
// most per worker, enough for a wake_budget batch of fibers each holding
// one while they reply.
constexpr std::size_t kFreeBuffers = sched::wake_budget::kBatch;

// A readiness wait on a fiber's stack.
struct wait_slot : completion {
  int fd = -1;
  bool write = false;
  std::uint64_t seq = 0;      // set by arm(): tells this arming from a later one at the same address
  wait_slot* next = nullptr;  // the fd's list of waiters (under the driver's lock_)
};

// A cancel asked for by a fiber that has moved to another worker. By
// value: by the time the owner or rescue() drains it, the wait may have
// completed and its slot's stack been reused (even by a new slot at the
// same address), so only armed slots, found in table_, are ever read.
struct cancel_req {
  wait_slot* slot;
  int fd;
  bool write;
  std::uint64_t seq;
};

int set_nonblocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) return -errno;  // errno read right after the call
  if ((fl & O_NONBLOCK) == 0 && ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
  return 0;
}

// One non-blocking attempt; -errno on failure.
int try_once(const op& o) {
  ssize_t r = -1;
  switch (o.kind) {
    case op_kind::recv:
      r = ::recv(o.fd, o.buf, o.len, o.flags | MSG_DONTWAIT);
      break;
    case op_kind::recv_pooled:  // perform() handles it (recv_pooled())
      return -EINVAL;
    case op_kind::send:
      r = ::send(o.fd, o.buf, o.len, o.flags | MSG_DONTWAIT | MSG_NOSIGNAL);
      break;
    case op_kind::recvmsg:
      r = ::recvmsg(o.fd, o.msg, o.flags | MSG_DONTWAIT);
      break;
    case op_kind::sendmsg:
      r = ::sendmsg(o.fd, o.msg, o.flags | MSG_DONTWAIT | MSG_NOSIGNAL);
      break;
    case op_kind::accept: {
      // The listener must not block a worker when another took the
      // connection first.
      if (int e = set_nonblocking(o.fd)) return e;
      r = ::accept4(o.fd, o.addr, o.addrlen, o.flags | SOCK_CLOEXEC);
      break;
    }
    case op_kind::read_at:
      r = ::pread(o.fd, o.buf, o.len, static_cast<off_t>(o.offset));
      break;
    case op_kind::write_at:
      r = ::pwrite(o.fd, o.buf, o.len, static_cast<off_t>(o.offset));
      break;
    case op_kind::fsync:
      r = o.flags ? ::fdatasync(o.fd) : ::fsync(o.fd);
      break;
    case op_kind::connect:
      r = ::connect(o.fd, o.addr, *o.addrlen);
      break;
    case op_kind::openat:
      r = ::openat(AT_FDCWD, static_cast<const char*>(o.buf), o.flags | O_CLOEXEC,
                   static_cast<mode_t>(o.offset));
      break;
    case op_kind::close:
      r = ::close(o.fd);
      if (r < 0 && errno == EINTR) r = 0;  // Linux closed it anyway
      break;
    case op_kind::read: {
      // The fd stays in blocking mode (io_uring needs that on older
      // kernels), so read only once it is readable; its single reader is us.
      pollfd p{.fd = o.fd, .events = POLLIN, .revents = 0};
      r = ::poll(&p, 1, 0);
      if (r == 0) return -EAGAIN;
      if (r > 0) r = ::read(o.fd, o.buf, o.len);
      break;
    }
    case op_kind::poll: {
      pollfd p{.fd = o.fd, .events = static_cast<short>(o.flags), .revents = 0};
      int n = ::poll(&p, 1, 0);
      if (n < 0) return errno == EINTR ? -EAGAIN : -errno;  // errno right after the call
      if (n == 0) return -EAGAIN;
      if (p.revents & POLLNVAL) return -EBADF;  // not an open descriptor
      return p.revents;
    }
  }
  if (r < 0) return -errno;  // errno read right after the call
  return static_cast<int>(r);
}

result<int> to_result(int r) {
  if (r >= 0) return r;
  return std::unexpected(std::error_code(-r, std::system_category()));
}

// *Full Unix listeners*: a non-blocking connect to a Unix listener whose
// accept queue is full fails with EAGAIN (never EINPROGRESS), where a
// blocking connect(2) waits until the listener accepts, and so does
// io_uring's (it runs one in io-wq). Nothing tells a waiter that room was
// made: the refused socket polls writable (POLLOUT|POLLHUP) at once, so a
// wait for readiness would spin. So the connect is tried again by the
// clock, at intervals doubling from kUnixRetryFirst to kUnixRetryMax, until
// it is not EAGAIN (EAGAIN from a Unix stream connect means only a full
// queue), the deadline passes (timed_out) or the fiber is asked to stop
// (operation_canceled). Room is found at most kUnixRetryMax after it
// appears (io_uring's at once), for one connect(2) per interval.
//
// The same holds for a datagram sent by address (sendto, udp_socket::
// send_to) from a Unix datagram socket to a receiver whose queue is full
// (net.unix.max_dgram_qlen, 10 by default: a slow syslog reader): EAGAIN,
// while the sender polls writable at once (the kernel only watches the
// receiver of a *connected* socket, whose send() therefore waits for
// readiness as any other). Waiting for readiness spun a core until the
// deadline; it is retried by the clock too. A close() of the socket by
// another fiber cannot cancel a wait that was never armed, so each retry
// first looks whether the socket was closed (bad_file_descriptor, as for
// every call that close() ends), within kUnixRetryMax of the close.
constexpr auto kUnixRetryFirst = std::chrono::milliseconds(1);
constexpr auto kUnixRetryMax = std::chrono::milliseconds(16);

result<int> retry_by_clock(op& o, int r, clock::time_point deadline, const char* what,
                           std::source_location where) {
  for (auto pause = kUnixRetryFirst; r == -EAGAIN; pause = std::min(pause * 2, kUnixRetryMax)) {
    const clock::time_point now = clock::now();
    if (now >= deadline) return std::unexpected(std::make_error_code(std::errc::timed_out));
    // No publish step: only the timer or a stop request wakes it.
    sched::wake_reason why = sched::park(
        {.deadline = std::min(deadline, now + pause), .what = what, .where = where});
    if (why == sched::wake_reason::cancelled) {
      sched::unwind_point();
      return std::unexpected(std::make_error_code(std::errc::operation_canceled));
    }
    if (o.use && o.use->st && o.use->st->closed()) return to_result(-EBADF);
    r = try_once(o);
  }
  return to_result(r);
}

// A send by address to a Unix datagram receiver (see above).
bool unix_send_to(const op& o) {
  return o.kind == op_kind::sendmsg && o.msg->msg_name &&
         o.msg->msg_namelen >= sizeof(sa_family_t) &&
         static_cast<const sockaddr*>(o.msg->msg_name)->sa_family == AF_UNIX;
}

bool is_file_op(op_kind k) {
  return k == op_kind::read_at || k == op_kind::write_at || k == op_kind::fsync ||
         k == op_kind::openat || k == op_kind::close;
}

// A file operation, on a blocking-pool thread. A signal whose handler was
// installed without SA_RESTART interrupts a call that sleeps there (an
// open of a FIFO waiting for its other end, a read on NFS or FUSE) with
// EINTR before anything was done: made again, as io_uring's (its io-wq
// threads take no signals) and Go's never return it. A close is not
// repeated: Linux released the descriptor anyway (try_once() says 0).
int file_call(const op& o) {
  int r;
  do r = try_once(o);
  while (r == -EINTR);
  return r;
}

bool wants_write(const op& o) {
  return o.kind == op_kind::send || o.kind == op_kind::sendmsg || o.kind == op_kind::connect ||
         (o.kind == op_kind::poll && (o.flags & POLLOUT));
}

class epoll_driver final : public io_driver {
 public:
  epoll_driver(int epfd, int efd) : io_driver(io_driver_kind::epoll), epfd_(epfd), efd_(efd) {}
  ~epoll_driver() override {
    // First: a pooled_buffer kept past weft::run's return stops naming it
    // (pooled_buffer::release()).
    recv_driver_destroyed();
    // After every worker joined.
    for (std::size_t i = 0; i < n_free_; ++i) delete[] free_bufs_[i];
    ::close(epfd_);
    ::close(efd_);
  }

  result<int> perform(op& o, clock::time_point deadline, const char* what,
                      std::source_location where) override;
  void cancel(completion& c) noexcept override;
  void wait(sched::clock::time_point deadline) override;
  void poll() override;
  void flush() override {
    std::lock_guard g(lock_);
    drain_cancels();
  }
  void wake() noexcept override;
  std::size_t pending() const noexcept override {
    std::lock_guard g(lock_);
    return waiting_;
  }
  void rescue() noexcept override;
  const char* name() const noexcept override { return "epoll"; }
  void release_buffer(std::uint32_t id, void* p) noexcept override;

 private:
  struct fd_entry {
    wait_slot* reader = nullptr;
    wait_slot* writer = nullptr;
    bool registered = false;  // added to epfd_ (it may since have been closed)
  };
  static result<void> wait_ready(int fd, fd_use* use, bool write, clock::time_point deadline,
                                 const char* what, std::source_location where);
  result<int> recv_pooled(op& o, clock::time_point deadline, const char* what,
                          std::source_location where);
  // See *Receive buffers*. Any thread.
  char* take_buffer();
  void give_back(char* p) noexcept;
  void arm(wait_slot& s);
  // Owner thread, from the fiber whose call just succeeded without a wait.
  void spend_budget() {
    io_counters::bump(counters_.ops);
    sched::spend_budget();  // *Coop budget* in sched/park.h
  }
  // From here to dispatch(): under lock_.
  void update(int fd, fd_entry& e);
  void cancel_now(const cancel_req& r);
  void drain_cancels();
  void dispatch(const epoll_event* ev, int n);
  int wait_events(epoll_event* ev, const timespec* tsp);
  bool on_owner_thread() const noexcept {
    sched::worker* w = sched::current_worker();
    return w && w->io() == this;
  }

  const int epfd_;
  const int efd_;
  mutable weft::spinlock lock_;  // see the invariants
  std::vector<fd_entry> table_;  // by fd; guarded by lock_
  std::size_t waiting_ = 0;      // guarded by lock_: armed wait slots
  // Guarded by lock_: a wake() was consumed by poll() or rescue() and no
  // wait() has returned since. wake() is sticky (sched/driver.h): the next
  // wait() returns at once.
  bool woken_ = false;

  // release in wake() publishes the waker's work; pairs with the acq_rel
  // exchange in dispatch() that clears it (as in io/uring_driver.cc).
  std::atomic<bool> wake_pending_{false};
  handoff_list<cancel_req> cancels_;  // from other threads (cancel())
  std::uint64_t next_seq_ = 0;        // guarded by lock_: see wait_slot::seq

  // *Receive buffers*: free_bufs_[0, n_free_) are free, guarded by
  // buf_lock_ (taken by any thread, never with lock_ held, nor lock_ under
  // it). A fixed array: putting one back never allocates.
  weft::spinlock buf_lock_;
  char* free_bufs_[kFreeBuffers] = {};
  std::size_t n_free_ = 0;
};

// The current worker's epoll driver, or nullptr (no I/O driver, or one of
// another kind: WEFT_IO=auto may mix them).
epoll_driver* current_epoll_driver() noexcept {
  io_driver* d = current_driver();
  // SAFETY: only epoll_driver constructs an io_driver of kind epoll.
  return d && d->kind() == io_driver_kind::epoll ? static_cast<epoll_driver*>(d) : nullptr;
}

// ---- Waiting for readiness ---------------------------------------------------

void epoll_driver::arm(wait_slot& s) {
  std::lock_guard g(lock_);
  if (static_cast<std::size_t>(s.fd) >= table_.size()) table_.resize(s.fd + 64);
  fd_entry& e = table_[s.fd];
  io_counters::bump(counters_.ops);
  io_counters::bump(counters_.parked);
  wait_slot*& list = s.write ? e.writer : e.reader;
  s.seq = next_seq_++;
  s.next = list;
  list = &s;
  ++waiting_;
  update(s.fd, e);
}

void epoll_driver::update(int fd, fd_entry& e) {
  epoll_event ev{};
  ev.events = EPOLLET | EPOLLONESHOT | (e.reader ? EPOLLIN | EPOLLRDHUP : 0u) |
              (e.writer ? EPOLLOUT : 0u);
  ev.data.fd = fd;
  // Registered: MOD, or ADD if the fd was closed and reused meanwhile.
  // New: ADD, or MOD if an earlier file at this fd left it registered.
  int first = e.registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  int r = ::epoll_ctl(epfd_, first, fd, &ev);
  if (r < 0 && (errno == ENOENT || errno == EEXIST))  // errno right after the call
    r = ::epoll_ctl(epfd_, first == EPOLL_CTL_MOD ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev);
  if (r == 0) {
    e.registered = true;
    return;
  }
  const int err = errno;  // read right after the last call
  if (err == EPERM || err == EBADF) {
    // Not pollable (EPERM: a regular file, which poll(2) calls always
    // ready) or gone (EBADF): say "ready", so the waiters try their system
    // call and get its answer.
    epoll_event fake{.events = EPOLLIN | EPOLLOUT, .data = {.fd = fd}};
    dispatch(&fake, 1);
    return;
  }
  // The kernel will not watch it (ENOSPC: fs.epoll.max_user_watches
  // reached; ENOMEM; ELOOP, EINVAL: an epoll descriptor that would nest
  // this one): the waiters fail with that error, as Go's netpoll and
  // Tokio's registration report it. Said "ready", they would find nothing,
  // ask again and fail again, at a full core until their deadline, or
  // forever without one.
  for (wait_slot* list : {std::exchange(e.reader, nullptr), std::exchange(e.writer, nullptr)})
    while (list) {
      wait_slot* next = list->next;  // SAFETY: as in dispatch()
      --waiting_;
      list->complete(-err);
      list = next;
    }
}

result<void> epoll_driver::wait_ready(int fd, fd_use* use, bool write,
                                      clock::time_point deadline, const char* what,
                                      std::source_location where) {
  // The current worker's driver: the fiber may have moved since its last try.
  epoll_driver* d = current_epoll_driver();
  if (!d) return std::unexpected(std::make_error_code(std::errc::not_supported));
  wait_slot s;
  s.fd = fd;
  s.write = write;
  // SAFETY: d holds &s until it completes it; wait_for() returns only then.
  d->arm(s);
  if (use) use->attach(*d, s);  // a close() of the socket cancels the wait
  sched::wake_reason why = wait_for(*d, s, deadline, what, where);
  if (use) use->detach();
  // A wait cancelled by close() (-ECANCELED) is not readiness: no retry.
  if (why == sched::wake_reason::notified && s.res() < 0)
    return std::unexpected(std::error_code(-s.res(), std::system_category()));
  if (why == sched::wake_reason::notified) return {};
  if (why == sched::wake_reason::timed_out)
    return std::unexpected(std::make_error_code(std::errc::timed_out));
  sched::unwind_point();
  return std::unexpected(std::make_error_code(std::errc::operation_canceled));
}

result<int> epoll_driver::perform(op& o, clock::time_point deadline, const char* what,
                                  std::source_location where) {
  if (o.kind == op_kind::connect) {
    if (int e = set_nonblocking(o.fd)) return to_result(e);
    int r = try_once(o);
    if (r == -EAGAIN && o.addr->sa_family == AF_UNIX)
      return retry_by_clock(o, r, deadline, what, where);
    if (r != -EINPROGRESS) return to_result(r);
    for (;;) {
      if (auto w = wait_ready(o.fd, o.use, true, deadline, what, where); !w)
        return std::unexpected(w.error());
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(o.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return to_result(-errno);
      if (err != 0) return to_result(-err);
      // A wake is not proof of a connection (a stale event for the fd
      // number): connected only once the socket has a peer.
      sockaddr_storage peer{};
      socklen_t plen = sizeof peer;
      if (::getpeername(o.fd, reinterpret_cast<sockaddr*>(&peer), &plen) == 0) return 0;
      if (errno != ENOTCONN) return to_result(-errno);  // errno right after the call
    }
  }
  if (o.kind == op_kind::recv_pooled) return recv_pooled(o, deadline, what, where);
  if (is_file_op(o.kind)) return to_result(blocking([&] { return file_call(o); }, where));
  for (bool waited = false;; waited = true) {
    int r = try_once(o);
    if (r != -EAGAIN) {
      if (!waited) spend_budget();  // still on this driver's worker: no park yet
      return to_result(r);
    }
    if (clock::now() >= deadline)
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    if (unix_send_to(o)) return retry_by_clock(o, r, deadline, what, where);
    if (auto w = wait_ready(o.fd, o.use, wants_write(o), deadline, what, where); !w)
      return std::unexpected(w.error());
  }
}

// See *Receive buffers*. Runs on this driver's worker until its first
// wait; after one, on whichever worker the fiber was woken on, still
// borrowing from this driver (the owner read_pooled gives the buffer).
result<int> epoll_driver::recv_pooled(op& o, clock::time_point deadline, const char* what,
                                      std::source_location where) {
  o.buf = nullptr;  // lent nothing unless data arrives
  o.len = 0;
  o.buf_id = kHeapBufferId;
  for (bool waited = false;; waited = true) {
    char* buf = take_buffer();
    ssize_t r = ::recv(o.fd, buf, kPooledBufferSize, o.flags | MSG_DONTWAIT);
    int e = r < 0 ? errno : 0;  // read right after the call
    if (r > 0) {
      o.buf = buf;
      o.len = kPooledBufferSize;
      if (!waited) spend_budget();  // still on this driver's worker: no park yet
      return static_cast<int>(r);
    }
    give_back(buf);  // nothing in it: end of stream, an error or EAGAIN
    if (r == 0) {
      if (!waited) spend_budget();
      return 0;  // end of stream: no buffer lent
    }
    if (e != EAGAIN) return to_result(-e);
    if (clock::now() >= deadline)
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    if (auto w = wait_ready(o.fd, o.use, false, deadline, what, where); !w)
      return std::unexpected(w.error());
  }
}

char* epoll_driver::take_buffer() {
  {
    std::lock_guard g(buf_lock_);
    if (n_free_ > 0) return free_bufs_[--n_free_];
  }
  io_counters::add(counters_.heap_buffers);  // any thread: add()
  return new char[kPooledBufferSize];
}

void epoll_driver::give_back(char* p) noexcept {
  {
    std::lock_guard g(buf_lock_);
    if (n_free_ < kFreeBuffers) {
      free_bufs_[n_free_++] = p;
      return;
    }
  }
  delete[] p;  // the list is full: a burst is over
}

// Every buffer this driver lends is its own heap buffer (kHeapBufferId).
void epoll_driver::release_buffer(std::uint32_t id, void* p) noexcept {
  (void)id;
  give_back(static_cast<char*>(p));
}

// ---- Cancelling ----------------------------------------------------------------

void epoll_driver::cancel_now(const cancel_req& r) {
  if (static_cast<std::size_t>(r.fd) >= table_.size()) return;
  fd_entry& e = table_[r.fd];
  wait_slot** link = r.write ? &e.writer : &e.reader;
  // Compares the address before reading anything through it: a slot in
  // the list is armed, so alive.
  while (*link && !(*link == r.slot && (*link)->seq == r.seq)) link = &(*link)->next;
  if (!*link) return;  // already completed
  wait_slot& s = **link;
  *link = s.next;
  --waiting_;
  s.complete(-ECANCELED);
  // A registration left armed for nobody is harmless: its event finds no slot.
}

void epoll_driver::cancel(completion& c) noexcept {
  auto& s = static_cast<wait_slot&>(c);  // every slot this driver holds is one
  // The caller owns the slot (it is on its stack), so it may read it.
  const cancel_req r{&s, s.fd, s.write, s.seq};
  if (on_owner_thread()) {
    std::lock_guard g(lock_);
    cancel_now(r);
    return;
  }
  cancels_.push(r);
  wake();
}

// Under lock_ (the owner's poll() and wait(), or rescue()).
void epoll_driver::drain_cancels() {
  std::vector<cancel_req> todo;
  if (cancels_.take(todo))
    for (const cancel_req& r : todo) cancel_now(r);
}

// ---- The loop's side -------------------------------------------------------------

void epoll_driver::dispatch(const epoll_event* ev, int n) {
  io_counters::bump(counters_.completions, static_cast<std::uint64_t>(n));
  for (int i = 0; i < n; ++i) {
    int fd = ev[i].data.fd;
    std::uint32_t events = ev[i].events;
    if (fd == efd_) {
      std::uint64_t v;
      ssize_t r = ::read(efd_, &v, sizeof v);  // non-blocking: resets the counter
      (void)r;
      // acq_rel: pairs with wake()'s exchange; later wakes write again.
      wake_pending_.exchange(false, std::memory_order_acq_rel);
      woken_ = true;
      continue;
    }
    if (static_cast<std::size_t>(fd) >= table_.size()) continue;
    fd_entry& e = table_[fd];
    wait_slot* r = nullptr;
    wait_slot* w = nullptr;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) r = std::exchange(e.reader, nullptr);
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) w = std::exchange(e.writer, nullptr);
    if (e.reader || e.writer) update(fd, e);  // ONESHOT disarmed the other waiter too
    // SAFETY: each slot's fiber waits in wait_for() until complete() ran;
    // read next before completing (the slot may be gone after).
    for (wait_slot* list : {r, w})
      while (list) {
        wait_slot* next = list->next;
        --waiting_;
        list->complete(0);
        list = next;
      }
  }
}

void epoll_driver::poll() {
  if (!lock_.try_lock()) return;  // rescue() is at work for us
  drain_cancels();
  // Events in chunks the run queue has room for, while the wake_budget
  // allows (sched/driver.h); the kernel keeps the rest for the next poll,
  // in order. With no room, one event per epoll_wait: it may wake a pinned
  // fiber, which takes no room.
  sched::wake_budget budget;
  std::size_t taken = 0;
  while (waiting_ > 0 && budget.more(taken)) {  // else nothing to learn without a syscall
    std::size_t want = std::clamp<std::size_t>(budget.room(), 1, std::size_t{kMaxEvents} - taken);
    epoll_event ev[kMaxEvents];
    int n = ::epoll_wait(epfd_, ev, static_cast<int>(want), 0);
    if (n <= 0) break;
    dispatch(ev, n);
    taken += static_cast<std::size_t>(n);
    if (static_cast<std::size_t>(n) < want) break;  // the kernel had no more
  }
  lock_.unlock();
}

void epoll_driver::wait(sched::clock::time_point deadline) {
  if (!lock_.try_lock()) return;  // rescue() is at work: a spurious return
  drain_cancels();
  if (std::exchange(woken_, false)) deadline = sched::clock::now();  // see woken_
  timespec ts{};
  timespec* tsp = sched::relative_timeout(deadline, ts);
  epoll_event ev[kMaxEvents];
  // lock_ stays held: a worker waiting here is not stuck.
  int n = wait_events(ev, tsp);  // EINTR: a plain return
  if (n > 0) dispatch(ev, n);
  woken_ = false;  // this wait returns: any wake seen so far is delivered
  lock_.unlock();
}

// epoll_pwait2 (nanosecond timeouts) where the kernel has it (Linux 5.11)
// and a seccomp profile allows it; epoll_wait with the timeout rounded up
// to whole milliseconds elsewhere. Without this, an idle worker there would
// spin: every wait would return at once.
int epoll_driver::wait_events(epoll_event* ev, const timespec* tsp) {
  // relaxed: each thread may find out for itself; the answer never changes.
  static std::atomic<bool> no_pwait2{false};
  if (!no_pwait2.load(std::memory_order_relaxed)) {
    int n = ::epoll_pwait2(epfd_, ev, kMaxEvents, tsp, nullptr);
    if (n >= 0 || (errno != ENOSYS && errno != EPERM)) return n;  // errno right after the call
    no_pwait2.store(true, std::memory_order_relaxed);
  }
  int ms = -1;
  if (tsp) {
    std::int64_t ns = std::int64_t{tsp->tv_sec} * 1'000'000'000 + tsp->tv_nsec;
    ms = static_cast<int>(std::min<std::int64_t>((ns + 999'999) / 1'000'000, INT32_MAX));
  }
  return ::epoll_wait(epfd_, ev, kMaxEvents, ms);
}

// The monitor, while the owner is stuck in one fiber (see the invariants):
// what the owner's poll() would do, until the kernel has no more events.
void epoll_driver::rescue() noexcept {
  if (!lock_.try_lock()) return;  // the owner is in poll() or wait(): not stuck
  const std::size_t before = waiting_;
  drain_cancels();
  for (int round = 0; round < 64 && waiting_ > 0; ++round) {
    epoll_event ev[kMaxEvents];
    int n = ::epoll_wait(epfd_, ev, kMaxEvents, 0);
    if (n > 0) dispatch(ev, n);
    if (n < kMaxEvents) break;
  }
  // Waits completed here (events or cancels; a wait armed meanwhile cannot
  // be: arming takes lock_). Single writer: the monitor.
  io_counters::bump(counters_.rescued, before - waiting_);
  lock_.unlock();
}

void epoll_driver::wake() noexcept {
  // acq_rel: the release publishes the caller's queued work to the owner
  // (pairs with the exchange in dispatch()); only the first waker writes.
  if (wake_pending_.exchange(true, std::memory_order_acq_rel)) return;
  std::uint64_t one = 1;
  ssize_t n = ::write(efd_, &one, sizeof one);
  (void)n;  // cannot fail short of a bad fd: the counter never nears its max
}

}  // namespace

std::unique_ptr<io_driver> make_epoll_driver(unsigned worker, std::error_code& why) {
  (void)worker;
  int epfd = ::epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) {
    why = std::error_code(errno, std::system_category());  // read right after the call
    return nullptr;
  }
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) {
    why = std::error_code(errno, std::system_category());  // read right after the call
    ::close(epfd);
    return nullptr;
  }
  epoll_event ev{.events = EPOLLIN, .data = {.fd = efd}};  // level-triggered: sticky wakes
  if (::epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev) < 0) {
    why = std::error_code(errno, std::system_category());  // read right after the call
    ::close(efd);
    ::close(epfd);
    return nullptr;
  }
  return std::make_unique<epoll_driver>(epfd, efd);
}

}  // namespace weft::io
