// io/perform.cc
//
// io::perform() and the completion slot: how a fiber waits for an I/O
// operation, whichever driver carries it out. See *Completion slots* in
// io/driver.h for the invariant that shapes everything here: no return
// before the operation's own completion arrived.
//
// The life of one operation (io_uring's; epoll's waits for readiness the
// same way, then retries the system call):
//   fiber: prepares the op on its current worker's driver (the owner)
//   fiber: park (cancellable); publish records the wake token in the slot
//   owner: the completion arrives -> slot.complete(res) -> claim + ready
//   fiber: resumes (maybe on another worker), reads res
// On a stop request (the park returns without a result):
//   fiber: owner.cancel(slot) — queued for the owner's thread if the fiber
//          now runs elsewhere — then parks again, not cancellable, until
//          complete() ran. While the runtime unwinds the fiber, parks return
//          at once, so it waits instead by reaping its own worker's driver
//          and yielding the thread (see *Waiting while unwinding*).
#include <sched.h>

#include <cerrno>
#include <utility>

#include "io/accept.h"
#include "io/driver.h"
#include "io/recv.h"
#include "sched/scheduler.h"
#include "sched/worker.h"

namespace weft::io {

void completion::complete(int res, std::uint32_t flags) noexcept {
  sched::fiber* f = nullptr;
  lock_.lock();
  res_ = res;
  flags_ = flags;
  done_ = true;
  // claim under the slot lock: the fiber takes the lock after waking to
  // forget its waiter, so it cannot have finished that park yet (the rule
  // on sched::claim).
  if (waiter_) f = sched::claim(std::exchange(waiter_, {}), sched::wake_reason::notified);
  lock_.unlock();
  // SAFETY: from here on the fiber may return from perform() and its stack
  // frame (*this) may be gone; only f is touched.
  if (f) sched::ready(f);
}

// The park's publish step, on the scheduler stack after the switch.
void completion::publish(void* self, sched::wake_token t) {
  auto* c = static_cast<completion*>(self);
  c->lock_.lock();
  bool done = c->done_;
  if (!done) c->waiter_ = t;
  c->lock_.unlock();
  // The fiber is still `parking`: it cannot run until this claim, so waking
  // it after dropping the lock is safe.
  if (done) sched::wake(t);
}

bool completion::park_until_done(bool cancellable, clock::time_point deadline,
                                 const char* what, std::source_location where,
                                 sched::wake_reason* why) {
  sched::wake_reason r = sched::park({.publish = &completion::publish,
               .arg = this,
               .deadline = deadline,
               .cancellable = cancellable,
               .what = what,
               .where = where});
  lock_.lock();
  waiter_ = {};  // a stale token must not be claimed by a later complete()
  bool done = done_;
  lock_.unlock();
  if (why) *why = r;
  return done;
}

// Any thread, inside a run or not (zeros then). A plain thread cannot know
// when a run ends, so the read is bracketed (scheduler::plain_use): the
// scheduler it found, with its workers and drivers, is not destroyed until
// the bracket closes. (On a worker the run cannot end meanwhile; the
// bracket costs two atomic operations there, on a rare path.)
io_stats stats() {
  io_stats st;
  sched::scheduler::plain_use use;
  sched::scheduler* s = use.get();
  if (!s) return st;
  for (unsigned i = 0; i < s->worker_count(); ++i) {
    auto* d = dynamic_cast<io_driver*>(s->worker_at(i).io());
    if (!d) continue;
    io_counters& c = d->counters();
    auto get = [](const std::atomic<std::uint64_t>& a) {
      return a.load(std::memory_order_relaxed);  // relaxed: statistic
    };
    st.ops += get(c.ops);
    st.parked += get(c.parked);
    st.submits += get(c.submits);
    st.completions += get(c.completions);
    st.multishot_accepts += get(c.multishot_accepts);
    st.multishot_recvs += get(c.multishot_recvs);
    st.rescued += get(c.rescued);
    st.heap_buffers += get(c.heap_buffers);
    st.written_behind += get(c.written_behind);
    st.linger_timers += get(c.linger_timers);
    if (st.driver.empty()) {
      st.driver = d->name();
      st.buffer_backing = d->buffer_backing();
    }
  }
  st.recv_queued = recv_queued_buffers();
  st.accept_queued = accept_queued_descriptors();
  return st;
}

io_driver* current_driver() noexcept {
  sched::worker* w = sched::current_worker();
  sched::driver* d = w ? w->io() : nullptr;
  // SAFETY: only io_driver's constructor makes is_io() true.
  return d && d->is_io() ? static_cast<io_driver*>(d) : nullptr;
}

namespace {

bool current_fiber_unwinding() noexcept {
  sched::fiber* f = sched::current_fiber();
  // seq_cst: pairs with force_unwind()'s store (see *Stopping a parked
  // fiber* in sched/park.cc).
  return f && f->unwinding_.load(std::memory_order_seq_cst);
}

// *Waiting while unwinding*: the runtime unwinds this fiber, so every park
// returns at once; the operation still holds pointers into this stack. The
// fiber keeps its worker thread and reaps that worker's completions itself
// (so two workers waiting on each other's rings both progress), yielding
// the CPU between tries. Only on the unwinding path, after main returned.
void wait_without_parking(completion& c) {
  for (;;) {
    if (c.is_done()) return;
    if (io_driver* here = current_driver()) here->poll_now();
    sched_yield();
  }
}

void wait_after_cancel(completion& c, std::source_location where) {
  while (!current_fiber_unwinding())
    if (c.park_until_done(false, clock::time_point::max(), "io cancel", where)) return;
  wait_without_parking(c);
}

}  // namespace

sched::wake_reason wait_for(io_driver& owner, completion& c, clock::time_point deadline,
                            const char* what, std::source_location where, bool cancellable) {
  sched::wake_reason why = sched::wake_reason::notified;
  if (c.park_until_done(cancellable, deadline, what, where, &why))
    return sched::wake_reason::notified;
  if (cancellable) owner.cancel(c);  // the owner, even if this fiber now runs elsewhere
  wait_after_cancel(c, where);
  return why == sched::wake_reason::notified ? sched::wake_reason::cancelled : why;
}

result<int> perform(op& o, clock::time_point deadline, const char* what,
                    std::source_location where) {
  io_driver* d = current_driver();
  if (!d) return std::unexpected(std::make_error_code(std::errc::not_supported));
  return d->perform(o, deadline, what, where);
}

}  // namespace weft::io
