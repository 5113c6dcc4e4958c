// io/recv.cc
//
// A stream socket's receives on io_uring: one multishot receive per socket
// (see *Multishot operations* in io/driver.h) into the driver's pooled
// buffers, armed by the first read and left armed. Each arrival lands in
// a buffer the kernel picks then, so an idle connection still holds none,
// and a read costs no submission, no file lookup and no poll arming of its
// own: the poll stays armed, as a hand-written event loop's does (the
// loop in bench/ spends 6–9 % less CPU per echo request with it than with
// one receive per read). The state keeps what arrived before a reader
// asked for it in ready_; read_pooled() hands a chunk on as it is, read()
// and readv() copy out of it (recv_put_back() keeps the rest in order).
//
// The multishot is armed on the ring of the worker where a read finds
// none armed. Its CQEs arrive in that worker's reap() even after the
// reader moved elsewhere, so on_result() only queues the chunk and wakes
// a parked reader (claim under lock_, ready after): it never touches a
// fiber's stack. The buffer stays the arming driver's (the chunk names
// it), which takes it back from any thread (release_buffer()).
//
// Invariants (the shape of io/accept.cc's accept_state):
//   - lock_ guards ready_, waiters_ (and its promises), armed_, owner_,
//     stopping_, closed_, dry_ and refused_.
//   - armed_ <=> a multishot SQE on owner_'s ring names this state and
//     holds one share of refs_. Only its last CQE (more == false) or
//     on_driver_gone() clears armed_, and drops that share after.
//   - refs_ = 1 for the socket (its fd_state's, until that is deleted) +
//     1 while armed + 1 per recv_take() in progress. The last unref()
//     deletes the state, giving back the buffers still in ready_.
//   - ready_ holds chunks in arrival order; once closed_, it holds only
//     chunks promised to woken readers (promises, below), nothing is
//     queued (arrivals give their buffer back) and nothing arms again.
//   - A chunk names its driver and the count of drivers destroyed when it
//     was queued: if that count moved since (a stream that outlives the
//     runtime, its multishot ended or cancelled, so on_driver_gone() never
//     reached it), the buffer went with its driver's arena and the chunk
//     is forgotten, never given back (orphaned()).
//   - *Back-pressure*: unread chunks hold pooled buffers, where a single
//     receive per read leaves unread bytes in the kernel's socket buffer
//     (and TCP's window closes on the sender). So once kQueued chunks wait
//     with no reader parked, the multishot is cancelled (stopping_); the
//     next read that empties ready_ arms it again. The cancel reaches the
//     kernel at the owner's next turn, and until then a wake-up may still
//     deliver up to 32 chunks (the kernel's multishot retry limit). When
//     the pool runs dry (-ENOBUFS ends the multishot), the next kDryReads
//     reads receive once each the old way (into a heap buffer if the ring
//     is still empty: io/uring_driver.cc's recv_pooled) before one arms
//     again. So does a read whose deadline has passed (see take()); one
//     that finds the multishot armed on its own worker's ring reaps that
//     ring once before it gives up.
//   - waiters_ holds the wake tokens of parked readers; a waker pops a
//     token and claims it under lock_ (the lock a reader takes to retract
//     its token after a timeout or cancel: the rule on sched::claim). A
//     reader that gives up leaves the multishot armed: its next read, the
//     usual thing after a timeout, finds it there.
//   - waiters_' promises (*Promises* in io/parked.h) name the readers an
//     arrival woke, until each is back in take(). A close() keeps that
//     many chunks at the head of ready_ for them (shut()): a reader woken
//     by data that came before the close gets it, even if the close runs
//     first; every other call gets EBADF, and the rest of ready_ is
//     dropped, as the kernel drops what is unread in a closed socket.
//
// *Deadlock*: as a parked acceptor (io/accept.cc), a parked reader holds
// a scheduler outside reference across its park: the multishot itself
// does not count in the driver's pending().
//
// Who calls what:
//   recv_take(), recv_put_back()   a fiber inside an fd_guard, any worker
//   shut_recv_state()      fd_state::close(), any thread
//   close_recv_state()     fd_state's destructor, any thread
//   on_result()            the arming driver, on its worker thread or the
//                          monitor's (rescue)
//   on_driver_gone()       the arming driver's destructor
#include "io/recv.h"

#include <liburing.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <vector>

#include "alloc/check.h"
#include "io/parked.h"
#include "sched/scheduler.h"

namespace weft::io {

namespace {

std::unexpected<std::error_code> sys_error(int e) {
  return std::unexpected(std::error_code(e, std::system_category()));
}

// Chunks holding a buffer in some ready_ (relaxed: a statistic).
std::atomic<std::int64_t> g_queued{0};
void count_queued(const recv_chunk& c, int delta) noexcept {
  if (c.res > 0) g_queued.fetch_add(delta, std::memory_order_relaxed);
}

// Drivers destroyed so far (recv_driver_destroyed()). acquire/release: a
// reader that sees the count a chunk was queued under saw no destructor
// begin since, so the chunk's owner is still there.
std::atomic<std::uint32_t> g_drivers_gone{0};
std::uint32_t drivers_gone() noexcept { return g_drivers_gone.load(std::memory_order_acquire); }
// Whether chunk c's buffer may have gone with its driver: a stream that
// outlives the runtime that queued it.
bool orphaned(const recv_chunk& c) noexcept { return !c.owner || c.epoch != drivers_gone(); }

}  // namespace

class recv_state final : public multishot_sink {
 public:
  // relaxed: the caller already holds a share; see accept_state::ref().
  void ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  // acq_rel: the last unref()'s acquire pairs with every earlier release,
  // so the delete comes after all uses.
  void unref() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  result<recv_chunk> take(int fd, clock::time_point deadline, const char* what,
                          std::source_location where);
  void put_back(const recv_chunk& c) noexcept;
  void shut() noexcept;
  void on_result(int res, std::uint32_t flags, bool more) noexcept override;
  void on_driver_gone() noexcept override;

 private:
  ~recv_state() {
    for (const recv_chunk& c : ready_) give_back(c);
  }
  // A queued chunk nobody will read: its buffer back to its ring.
  static void give_back(const recv_chunk& c) noexcept {
    count_queued(c, -1);
    if (c.res > 0 && !orphaned(c)) c.owner->release_buffer(c.id, c.owner->pooled_buffer_at(c.id));
  }
  static void publish(void* self, sched::wake_token t);
  void retract() noexcept;

  // Unread chunks that stop the multishot when no reader waits (see
  // *Back-pressure*): enough for a reader a few arrivals behind a stream.
  static constexpr std::size_t kQueued = 4;
  // Reads that receive once each after the pool ran dry.
  static constexpr int kDryReads = 16;

  weft::spinlock lock_;
  std::vector<recv_chunk> ready_;             // guarded by lock_
  parked_fibers waiters_;                     // guarded by lock_
  io_driver* owner_ = nullptr;                // guarded by lock_: the arming driver
  bool armed_ = false;                        // guarded by lock_
  bool stopping_ = false;                     // guarded by lock_: a cancel is on its way
  bool closed_ = false;                       // guarded by lock_
  bool refused_ = false;                      // guarded by lock_: the kernel has no multishot receive
  int dry_ = 0;                               // guarded by lock_: reads left to receive once
  std::atomic<int> refs_{1};
};


std::uint64_t recv_queued_buffers() noexcept {
  return static_cast<std::uint64_t>(std::max<std::int64_t>(0, g_queued.load(std::memory_order_relaxed)));
}

// The park's publish step, on the scheduler stack after the switch:
// take() parked holding lock_.
void recv_state::publish(void* self, sched::wake_token t) {
  auto* s = static_cast<recv_state*>(self);
  s->waiters_.add(t);
  s->lock_.unlock();
}

// After a park that was not a notify: forgets this fiber's token if no
// waker took it.
void recv_state::retract() noexcept {
  lock_.lock();
  waiters_.forget_current();
  lock_.unlock();
}

result<recv_chunk> recv_state::take(int fd, clock::time_point deadline, const char* what,
                                    std::source_location where) {
  const auto once = std::make_error_code(std::errc::not_supported);
  bool reaped = false;  // a past deadline's one look at the owner's ring (below)
  bool woken = false;   // back from a park that a waker ended
  bool parked = false;  // parked at least once (for the coop budget)
  for (;;) {
    lock_.lock();
    // An arrival that woke this reader promised it a chunk (*Promises*).
    const bool promised = woken && waiters_.take_promise();
    woken = false;
    if (closed_ && !(promised && !ready_.empty())) {
      lock_.unlock();
      return sys_error(EBADF);
    }
    if (!ready_.empty()) {
      recv_chunk c = ready_.front();
      ready_.erase(ready_.begin());
      lock_.unlock();
      count_queued(c, -1);
      // Queued by a runtime that ended since: its bytes went with that
      // runtime's buffers, and the stream cannot go on in order.
      if (c.res > 0 && orphaned(c)) return sys_error(EIO);
      // Found queued without parking: spends the coop budget, as an epoll
      // read that finds data does (sched/park.h), so a reader whose peer
      // keeps its queue full still gives the worker away. The chunk is
      // ours: its buffer goes back to its ring from any thread.
      if (!parked) sched::spend_budget();
      return c;
    }
    if (!armed_) {
      // Read here, not before a park: the fiber may have moved since.
      io_driver* d = current_driver();
      // A deadline already past: one receive the old way, which the kernel
      // still tries once, takes what has arrived; a multishot armed now
      // would deliver it only at this worker's next reap, after the park
      // below timed out (as accept_now() in io/accept.cc).
      if (refused_ || !d || !d->has_multishot_recv() || dry_ > 0 || deadline <= clock::now()) {
        if (dry_ > 0) --dry_;
        lock_.unlock();
        return std::unexpected(once);
      }
      armed_ = true;
      stopping_ = false;
      owner_ = d;
      ref();  // the armed SQE's share, dropped by its last on_result()
      lock_.unlock();
      // Still on d's worker: nothing parked since current_driver(). If the
      // kernel would not take it, the multishot ends before it began: as a
      // dry pool's, the next reads receive once each the old way.
      if (!d->arm_multishot_recv(fd, *this)) on_result(-EBUSY, 0, /*more=*/false);
      continue;
    }
    // A plain thread (a socket call that waits is a fiber's): it cannot
    // park here, nor hold a fiber's outside reference; it fails as its
    // receive the old way does (io::perform(): not_supported).
    if (!sched::current_fiber()) {
      lock_.unlock();
      return std::unexpected(once);
    }
    // A deadline already past with the multishot armed on this worker's
    // ring: what has arrived in the socket is there only after this
    // worker's next reap (the kernel runs the multishot's receive then),
    // which the park below, timing out at once, would not wait for. So
    // reap it now, once, as one receive per read takes what has arrived.
    // (Armed on another worker's ring, it waits for that worker's reap.)
    // (The coarse clock first: a server's reads wait with deadlines seconds
    // away, and a precise read per park is ~20 ns; see sched/park.h.)
    if (!reaped && !sched::surely_later(deadline, clock::duration::zero()) &&
        deadline <= clock::now() && owner_ == current_driver()) {
      reaped = true;
      io_driver* d = owner_;
      lock_.unlock();
      d->poll_now();  // on d's worker: its owner thread; on_result() takes lock_
      continue;
    }
    // publish() records the token and unlocks lock_. See *Deadlock*.
    if (io_driver* d = current_driver())
      io_counters::bump(d->counters().parked);  // on d's worker: its writer
    sched::scheduler::add_fiber_outside_ref(+1);
    parked = true;
    sched::wake_reason why = sched::park({.publish = &recv_state::publish,
                                          .arg = this,
                                          .deadline = deadline,
                                          .cancellable = true,
                                          .what = what,
                                          .where = where});
    sched::scheduler::add_fiber_outside_ref(-1);
    if (why == sched::wake_reason::notified) {  // the waker popped the token
      woken = true;
      continue;
    }
    retract();  // what arrives meanwhile waits in ready_ for the next read
    if (why == sched::wake_reason::timed_out)
      return std::unexpected(std::make_error_code(std::errc::timed_out));
    sched::unwind_point();
    return std::unexpected(std::make_error_code(std::errc::operation_canceled));
  }
}

void recv_state::put_back(const recv_chunk& c) noexcept {
  lock_.lock();
  if (closed_) {
    lock_.unlock();
    if (!orphaned(c)) c.owner->release_buffer(c.id, c.owner->pooled_buffer_at(c.id));
    return;
  }
  ready_.insert(ready_.begin(), c);
  lock_.unlock();
  count_queued(c, +1);
}

void recv_state::on_result(int res, std::uint32_t flags, bool more) noexcept {
  std::vector<sched::fiber*> wake;
  io_driver* stop = nullptr;
  lock_.lock();
  io_driver* from = owner_;
  WEFT_DCHECK(from, "recv_state: a result with no arming driver");
  recv_chunk c{.res = res, .owner = from, .epoch = drivers_gone()};
  const bool buffer = flags & IORING_CQE_F_BUFFER;
  // The buffer's id, also for one given back below (c.id is 0 then).
  const std::uint32_t bid = buffer ? flags >> IORING_CQE_BUFFER_SHIFT : 0;
  c.id = bid;
  if (!more) {
    armed_ = false;
    stopping_ = false;
    owner_ = nullptr;
  }
  bool queued = false, refused = false;
  if (closed_ || res == -ECANCELED) {
    // Closed: dropped. -ECANCELED: our own cancel's, not news for a reader.
  } else if (res == -ENOBUFS || res == -EBUSY) {
    dry_ = kDryReads;  // *Back-pressure*; -EBUSY: an arming the kernel did not take (take())
  } else if (res == -EINVAL && !more) {
    refused_ = refused = true;  // an old kernel: receive once per read from now on
  } else {
    WEFT_CHECK(res <= 0 || buffer, "recv_state: data without a buffer");
    if (res <= 0) c.id = 0;  // the end, or an error: no buffer kept
    ready_.push_back(c);
    count_queued(c, +1);
    queued = true;
  }
  // The multishot ended: wake everyone, so that one re-arms it (or
  // receives once) on its worker and the others park again behind it.
  if (!more) waiters_.claim(wake, /*all=*/true);
  else if (queued) waiters_.claim(wake, /*all=*/false);
  if (queued && !wake.empty()) waiters_.promise(wake.front());
  if (more && !stopping_ && ready_.size() >= kQueued && waiters_.empty()) {
    stopping_ = true;  // *Back-pressure*
    stop = from;
  }
  lock_.unlock();
  for (sched::fiber* f : wake) sched::ready(f);
  // A buffer the kernel filled that nobody will read (closed; or the end
  // of the stream, which may come in one): back to its ring.
  if (buffer && (!queued || res <= 0)) from->release_buffer(bid, from->pooled_buffer_at(bid));
  if (refused) from->multishot_recv_refused();
  // The armed SQE's share keeps *this alive: its last CQE is still to come.
  if (stop) stop->cancel_multishot(*this);
  // SAFETY: the armed SQE's share: after this, *this may be gone.
  if (!more) unref();
}

void recv_state::on_driver_gone() noexcept {
  lock_.lock();
  io_driver* gone = owner_;
  armed_ = false;
  owner_ = nullptr;
  // Its buffers go with its arena: forgotten, not given back.
  for (recv_chunk& c : ready_)
    if (c.owner == gone) c.owner = nullptr;
  lock_.unlock();
  unref();  // the armed SQE's share: its last CQE will never be reaped
}

void recv_state::shut() noexcept {
  std::vector<sched::fiber*> wake;
  std::vector<recv_chunk> drop;
  lock_.lock();
  closed_ = true;
  io_driver* owner = armed_ && !stopping_ ? owner_ : nullptr;
  if (owner) stopping_ = true;
  waiters_.claim(wake, /*all=*/true);
  // The chunks promised to readers already woken stay for them (see
  // promised_); the rest go back now.
  const std::size_t keep = std::min(waiters_.promises(), ready_.size());
  drop.assign(ready_.begin() + static_cast<std::ptrdiff_t>(keep), ready_.end());
  ready_.resize(keep);
  lock_.unlock();
  for (sched::fiber* f : wake) sched::ready(f);
  for (const recv_chunk& c : drop) give_back(c);
  // The socket's share keeps *this alive across the call; the cancel only
  // uses its address as a key. The last CQE (-ECANCELED) follows.
  if (owner) owner->cancel_multishot(*this);
}

void recv_driver_destroyed() noexcept { g_drivers_gone.fetch_add(1, std::memory_order_acq_rel); }

std::uint32_t drivers_destroyed() noexcept { return drivers_gone(); }

recv_state* new_recv_state() { return new recv_state; }

void shut_recv_state(recv_state* s) noexcept { s->shut(); }

void close_recv_state(recv_state* s) noexcept {
  s->shut();
  s->unref();  // the socket's share
}

result<recv_chunk> recv_take(recv_state* s, int fd, clock::time_point deadline, const char* what,
                             std::source_location where) {
  s->ref();  // this call's share, for the multishot's bookkeeping
  struct share {
    recv_state* s;
    ~share() { s->unref(); }  // also when the runtime unwinds this fiber
  } held{s};
  return s->take(fd, deadline, what, where);
}

void recv_put_back(recv_state* s, const recv_chunk& c) noexcept { s->put_back(c); }

}  // namespace weft::io
