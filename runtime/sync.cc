// runtime/sync.cc — condition_variable, semaphore, latch and wait_group
// (zero_waiter), once_flag, shared_mutex and outside_ref. weft::mutex is in
// runtime/mutex.cc. Every wait follows the protocol of runtime/waiter.h.
//
// Invariants:
//   - condition_variable: seq_ grows by one at every notify, under lk_. A
//     waiter reads it before unlocking the user's mutex and compares it
//     under lk_ before parking, so a notify between the two is never lost
//     (the waiter returns at once: a spurious wake-up, which callers of
//     wait() must tolerate).
//   - semaphore: count_ > 0 implies q_ is empty; release() hands units to
//     parked acquirers first, in FIFO order.
//   - once_flag::state_: 0 new, 1 running, 2 done. Moves 0->1 and 1->0/2
//     under lk_; the release store of 2 pairs with call_once's acquire load.
//   - shared_mutex: a parked record is granted (handed = true) with the
//     lock already counted for it (writer_ or readers_).
#include <vector>

#include "alloc/check.h"
#include "runtime/sync.h"
#include "runtime/waiter.h"
#include "sched/scheduler.h"

namespace weft {
namespace {

using detail::wake_reason;
using detail::wake_ticket;

result<void> to_result(wake_reason r) {
  switch (r) {
    case wake_reason::notified: return {};
    case wake_reason::timed_out: return make_error(std::errc::timed_out);
    case wake_reason::cancelled: break;
  }
  sched::unwind_point();
  return make_error(std::errc::operation_canceled);
}

// Claims every waiter of q (under its lock) into `out`.
void claim_all(detail::wait_list& q, std::vector<wake_ticket>& out) {
  wake_ticket t;
  while (detail::pop_claimed(q, t)) out.push_back(t);
}

void ready_all(const std::vector<wake_ticket>& ts) {
  for (wake_ticket t : ts) detail::ready(t);
}

}  // namespace

// --- condition_variable ------------------------------------------------------

void condition_variable::notify_one() noexcept {
  lk_.lock();
  ++seq_;
  wake_ticket t;
  detail::pop_claimed(q_, t);
  lk_.unlock();
  detail::ready(t);
}

void condition_variable::notify_all() noexcept {
  std::vector<wake_ticket> ts;
  lk_.lock();
  ++seq_;
  claim_all(q_, ts);
  lk_.unlock();
  ready_all(ts);
}

result<void> condition_variable::wait(std::unique_lock<mutex>& ulk, deadline d,
                                      std::source_location where) {
  WEFT_CHECK(ulk.owns_lock(), "condition_variable::wait: the lock is not held");
  lk_.lock();
  std::uint32_t seen = seq_;
  lk_.unlock();
  ulk.unlock();
  lk_.lock();
  if (seq_ != seen) {  // notified since: do not park
    lk_.unlock();
    ulk.lock();
    return {};
  }
  detail::parker p;
  detail::waiter w;
  wake_reason r = detail::wait_on(lk_, q_, w, p,
                                  {.deadline = d.when, .what = "condition wait", .where = where});
  ulk.lock();
  return to_result(r);
}

// --- semaphore -----------------------------------------------------------------

bool semaphore::try_acquire() noexcept {
  lk_.lock();
  bool ok = count_ > 0;
  if (ok) --count_;
  lk_.unlock();
  return ok;
}

result<void> semaphore::acquire(deadline d, std::source_location where) {
  lk_.lock();
  if (count_ > 0) {
    --count_;
    lk_.unlock();
    return {};
  }
  detail::parker p;
  detail::waiter w;
  // notified: release() handed us a unit.
  return to_result(detail::wait_on(lk_, q_, w, p,
                                   {.deadline = d.when, .what = "semaphore acquire",
                                    .where = where}));
}

void semaphore::release(std::ptrdiff_t n) {
  WEFT_CHECK(n >= 0, "semaphore::release: negative count");
  std::vector<wake_ticket> ts;
  lk_.lock();
  wake_ticket t;
  while (n > 0 && detail::pop_claimed(q_, t)) {
    ts.push_back(t);
    --n;
  }
  count_ += n;
  lk_.unlock();
  ready_all(ts);
}

// --- latch, wait_group ------------------------------------------------------------

namespace detail {

// The count is a lone atomic, so add() away from zero is one RMW with no
// lock (as Go's WaitGroup). Only the step that reaches zero takes lk_, to
// wake the waiters. Why no waiter is missed: wait() reads the count and
// enqueues itself under lk_; the adder that reached zero takes lk_ after
// its RMW. If the waiter held lk_ first, it is enqueued when the adder
// looks; if the adder held it first, the waiter's lock acquires the
// adder's unlock, which follows the RMW, so the waiter reads zero.
void zero_waiter::add(std::ptrdiff_t delta, const char* who) {
  // acq_rel: the work before a count_down is visible to whoever sees zero
  // (pairs with the acquire loads in wait() and is_zero()).
  std::ptrdiff_t now = count_.fetch_add(delta, std::memory_order_acq_rel) + delta;
  WEFT_CHECK(now >= 0, who);  // counted below zero
  if (now != 0) return;
  std::vector<wake_ticket> ts;
  lk_.lock();
  claim_all(q_, ts);
  lk_.unlock();
  ready_all(ts);
}

bool zero_waiter::is_zero() noexcept {
  return count_.load(std::memory_order_acquire) == 0;  // pairs with add()
}

result<void> zero_waiter::wait(deadline d, const char* what,
                               const std::source_location& where, bool cancellable) {
  if (is_zero()) return {};
  lk_.lock();
  if (count_.load(std::memory_order_acquire) == 0) {  // see add()
    lk_.unlock();
    return {};
  }
  parker p;
  waiter w;
  return to_result(wait_on(lk_, q_, w, p,
                           {.deadline = d.when, .cancellable = cancellable, .what = what,
                            .where = where}));
}

}  // namespace detail

// --- once_flag -------------------------------------------------------------------

bool once_flag::begin() {
  for (;;) {
    lk_.lock();
    std::uint32_t s = state_.load(std::memory_order_relaxed);  // relaxed: under lk_
    if (s == 2) {  // fn's effects are visible: finish() stored 2 under lk_
      lk_.unlock();
      return false;
    }
    if (s == 0) {
      state_.store(1, std::memory_order_relaxed);  // relaxed: under lk_; 2 is what readers await
      lk_.unlock();
      return true;
    }
    detail::parker p;
    detail::waiter w;
    wake_reason r = detail::wait_on(lk_, q_, w, p,
                                    {.cancellable = false, .what = "call_once"});
    if (r == wake_reason::cancelled) sched::unwind_point();
  }
}

void once_flag::finish(bool ran) noexcept {
  std::vector<wake_ticket> ts;
  lk_.lock();
  // release: publishes fn's effects; pairs with the acquire in call_once().
  state_.store(ran ? 2 : 0, std::memory_order_release);
  claim_all(q_, ts);
  lk_.unlock();
  ready_all(ts);
}

// --- shared_mutex ------------------------------------------------------------------

// Grants the lock to the waiters at the front of q_ that can have it now:
// one writer, or every reader up to the next writer. Under lk_.
void shared_mutex::grant_locked(void* tickets) {
  auto& ts = *static_cast<std::vector<wake_ticket>*>(tickets);
  while (detail::waiter* h = q_.head_) {
    bool wr = h->aux == 1;
    if (writer_ || (wr && readers_ > 0)) return;
    detail::unlink(q_, h);
    wake_ticket t = h->p->claim(wake_reason::notified);
    if (!t) continue;  // unwound meanwhile
    h->handed = true;
    if (wr) writer_ = true; else ++readers_;
    ts.push_back(t);
  }
}

void shared_mutex::acquire(bool wr, const std::source_location& where) {
  for (;;) {
    lk_.lock();
    bool free = !writer_ && q_.empty() && (!wr || readers_ == 0);
    if (free) {
      if (wr) writer_ = true; else ++readers_;
      lk_.unlock();
      return;
    }
    detail::parker p;
    detail::waiter w;
    w.aux = wr ? 1 : 0;
    wake_reason r = detail::wait_on(lk_, q_, w, p,
                                    {.cancellable = false,
                                     .what = wr ? "shared_mutex lock" : "shared_mutex lock_shared",
                                     .where = where});
    if (r == wake_reason::notified) return;  // granted: see grant_locked()
    sched::unwind_point();
  }
}

void shared_mutex::lock(std::source_location where) { acquire(true, where); }
void shared_mutex::lock_shared(std::source_location where) { acquire(false, where); }

bool shared_mutex::try_lock() noexcept {
  lk_.lock();
  bool ok = !writer_ && readers_ == 0 && q_.empty();
  if (ok) writer_ = true;
  lk_.unlock();
  return ok;
}

bool shared_mutex::try_lock_shared() noexcept {
  lk_.lock();
  bool ok = !writer_ && q_.empty();
  if (ok) ++readers_;
  lk_.unlock();
  return ok;
}

void shared_mutex::unlock() noexcept {
  std::vector<wake_ticket> ts;
  lk_.lock();
  writer_ = false;
  grant_locked(&ts);
  lk_.unlock();
  ready_all(ts);
}

void shared_mutex::unlock_shared() noexcept {
  std::vector<wake_ticket> ts;
  lk_.lock();
  WEFT_CHECK(readers_ > 0, "shared_mutex::unlock_shared: not locked shared");
  if (--readers_ == 0) grant_locked(&ts);
  lk_.unlock();
  ready_all(ts);
}

// --- outside_ref ---------------------------------------------------------------------

outside_ref::outside_ref() {
  sched::scheduler::plain_use use;
  WEFT_CHECK(use.get(), "weft::outside_ref: no runtime is running");
  use.get()->add_outside_ref(+1);
  run_ = use.get()->run_id();
}

// The run may be over (or another one running): then there is nothing to drop.
outside_ref::~outside_ref() {
  if (!run_) return;
  sched::scheduler::plain_use use;
  if (use.get() && use.get()->run_id() == run_) use.get()->add_outside_ref(-1);
}

}  // namespace weft
