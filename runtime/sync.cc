// runtime/sync.cc — condition_variable, semaphore, latch and wait_group
// (zero_waiter), once_flag, shared_mutex and outside_ref. weft::mutex is in
// runtime/mutex.cc. Every wait follows the protocol of runtime/waiter.h.
//
// Invariants:
//   - condition_variable: a waiter's record is linked (under lk_) before
//     the user's mutex is released, by the publish step of its park: a
//     notify that follows the release finds it (no lost wake-up), and the
//     waiter touches the condition variable again only to retract a record
//     that no notify claimed (see *Destroying after a notify*).
//   - semaphore: count_ > 0 implies q_ is empty; release() hands units to
//     parked acquirers first, in FIFO order.
//   - once_flag::state_: kNew, kRunning (| kWaiting once someone parked),
//     kDone. kNew->kRunning and kRunning->|kWaiting under lk_; finish()
//     moves it to kDone or kNew with one exchange, which pairs with
//     call_once's acquire load.
//   - latch, wait_group: see *Counting to zero*.
//   - shared_mutex: a parked record is granted (handed = true) with the
//     lock already counted for it (writer_ or readers_).
#include <sched.h>

#include <climits>
#include <cstdint>
#include <cstdio>

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

}  // namespace

// --- condition_variable ------------------------------------------------------

condition_variable::~condition_variable() {
  lk_.lock();
  // A waiter woken by its deadline or a stop request, whose record a
  // notify then dropped (its claim lost), still takes lk_ to retract it: it
  // is runnable and a few instructions from done, so give it the CPU.
  while (waiting_ != 0 && q_.empty()) {
    lk_.unlock();
    detail::let_others_run();
    lk_.lock();
  }
  bool idle = q_.empty();
  lk_.unlock();
  WEFT_CHECK(idle, "weft::condition_variable destroyed while fibers wait on it (keep it alive "
                   "until they are done)");
}

void condition_variable::notify_one() noexcept {
  lk_.lock();
  wake_ticket t;
  if (detail::pop_claimed(q_, t)) --waiting_;  // that waiter leaves without lk_
  lk_.unlock();
  detail::ready(t);
}

void condition_variable::notify_all() noexcept {
  detail::wake_batch woken;
  lk_.lock();
  waiting_ -= woken.claim_all(q_);  // those waiters leave without lk_
  lk_.unlock();
  woken.ready_all();
}

// *Destroying after a notify* (std::condition_variable's contract): the
// condition variable may be destroyed once every waiter was notified, even
// before they return from wait() (they may still be relocking the mutex).
// A waiter waits from the moment it releases the mutex, so it must not
// touch the condition variable after that release unless its record is
// linked: it links the record and releases lk_, then the user's mutex, in
// the publish step of its park. A notify claims and unlinks the record;
// the woken waiter then only relocks the mutex. (It used to release the
// mutex first, then take lk_ to link, reading freed memory when a notify
// and the destruction came in between.)
// A waiter woken otherwise (its deadline, a stop request) retracts its
// record under lk_. A notify_all that comes first drops the record (its
// claim loses) and the program may then destroy the condition variable
// before the waiter got to lk_: waiting_ counts the waiters that will
// still take lk_, and the destructor waits for them, as glibc's
// pthread_cond_destroy waits for its waiters to leave.
// waiting_: +1 when the record is linked; -1 by the notify that claims it,
// or by the waiter when it retracts; all under lk_.
result<void> condition_variable::wait(std::unique_lock<mutex>& ulk, deadline d,
                                      std::source_location where) {
  WEFT_CHECK(ulk.owns_lock(), "condition_variable::wait: the lock is not held");
  // Released by the publish step below; relocked through ulk afterwards, so
  // that ulk owns it again exactly when lock() returned.
  mutex* mu = ulk.release();
  detail::parker p;
  detail::waiter w;
  w.p = &p;
  struct ctx {
    condition_variable* cv;
    detail::waiter* w;
    mutex* mu;
  } c{this, &w, mu};
  lk_.lock();
  wake_reason r = p.block(
      [](void* a) {
        // SAFETY: *c outlives this step: a plain thread runs it itself, and
        // a fiber woken once the record is linked waits in park() for its
        // old worker to finish this step (see park()).
        auto* c = static_cast<ctx*>(a);
        mutex* mu = c->mu;
        detail::push_back(c->cv->q_, c->w);
        ++c->cv->waiting_;
        c->cv->lk_.unlock();  // findable: a notify from now on claims it
        mu->unlock();         // now it waits; touches only the mutex
      },
      &c, {.deadline = d.when, .what = "condition wait", .where = where});
  if (r != wake_reason::notified) {  // no notify claimed it: still ours to retract
    lk_.lock();
    detail::unlink(q_, &w);
    --waiting_;
    lk_.unlock();  // the last touch: the destructor may run from here on
  }
  ulk = std::unique_lock<mutex>(*mu, std::defer_lock);
  // Relocked with the caller's site, not through ulk.lock(), whose default
  // site is a line of <bits/unique_lock.h>: a fiber stuck here is named at
  // its wait() by dump() and the deadlock report. ulk owns it once it is
  // held, as ulk.lock() would.
  mu->lock(where);
  ulk = std::unique_lock<mutex>(*mu, std::adopt_lock);
  return to_result(r);
}

// --- semaphore -----------------------------------------------------------------

semaphore::~semaphore() {
  detail::check_no_waiters(lk_, q_, "weft::semaphore destroyed while fibers wait on it (keep "
                                    "it alive until they are done)");
}

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
    // Completed without parking: an acquirer that producers keep ahead
    // would otherwise hold its worker (*Coop budget* in sched/park.h), as
    // a channel receiver does; Tokio's acquire spends its budget too.
    sched::spend_budget();
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
  detail::wake_batch woken;
  lk_.lock();
  wake_ticket t;
  while (n > 0) {
    detail::waiter* w = detail::pop_claimed(q_, t);
    if (!w) break;
    woken.add(w, t);
    --n;
  }
  // Past PTRDIFF_MAX the count would wrap (undefined behaviour) and the
  // semaphore would stay shut; more units than that means releases
  // without their acquires.
  WEFT_CHECK(n <= PTRDIFF_MAX - count_, "semaphore::release: the count overflows");
  count_ += n;
  lk_.unlock();
  woken.ready_all();
}

// --- latch, wait_group ------------------------------------------------------------

namespace detail {

// *Counting to zero* (after Go's WaitGroup). The count and the number of
// registered waiters share one 64-bit word, state_, so that the add() that
// reaches zero learns in the same RMW whether anyone waits:
//
//   - No waiter counted: that RMW is add()'s last touch of the object. A
//     waiter that then sees zero (the lock-free fast path, or under lk_)
//     may return and free it at once, and nobody touches it after.
//   - Waiters counted: the RMW also zeroes the waiter count and sets
//     kClosing; the adder (the closer) then owes those waiters a wake. It
//     takes lk_, claims every record in q_, clears kClosing and unlocks lk_:
//     that unlock is its last touch. A counted waiter cannot have returned
//     before it (see *Leaving* below), so the object is still alive.
//
// Registering: a waiter increments the waiter count with a CAS that sees a
// non-zero count and no kClosing, under lk_, and links its record before it
// releases lk_ (in the publish step of its park). So a closer whose RMW saw
// the registration finds the record when it takes lk_: had the closer's lk_
// section come first, its RMW would precede the registration CAS in state_'s
// modification order and could not have seen it.
//
// Phases (a wait_group reused): while kClosing is set nobody registers, so
// every record the closer finds is of the phase it closed; a waiter of the
// next phase (the count already up again) waits for the closer to finish
// before registering, and is never woken by an earlier phase's zero.
//
// *Leaving* on a deadline or a stop request, under lk_:
//   - record unlinked: a closer claimed it (its claim lost to ours) and, in
//     the same lk_ section, cleared kClosing. It is done with the object:
//     the count reached zero, and the wait succeeds.
//   - record linked, no kClosing: the registration still counts; a CAS
//     takes it back and the wait returns timed_out or cancelled. Nobody
//     owes this waiter anything, so nobody touches the object for it.
//   - record linked, kClosing: a closer consumed this registration and is on
//     its way to lk_. The waiter leaves the record for it to unlink and
//     waits for that, as in the first case.
//
// Invariants:
//   - kClosing set => the waiter count is 0 and a closer is between its RMW
//     and its unlock of lk_; every record in q_ belongs to it.
//   - A record is linked while its registration is counted or kClosing is
//     set; only the waiter (counted) or the closer (kClosing) unlinks it.
namespace {
constexpr std::int64_t count_of(std::uint64_t s) { return static_cast<std::int64_t>(s >> 32); }
constexpr std::uint64_t with_count(std::uint64_t s, std::int64_t n) {
  return (static_cast<std::uint64_t>(n) << 32) | (s & 0xffff'ffffu);
}
// A closer is between its RMW and its unlock of lk_ (a few list
// operations, no park: it cannot be a fiber of this worker), unless its
// thread was preempted: spin, then give the CPU away.
void wait_for_closer(int& round) noexcept {
  if (++round < 64) __builtin_ia32_pause(); else sched_yield();
}
// A count out of range is a bug in the program: said with the caller's
// name and what went wrong ("weft::wait_group::done: negative counter",
// as Go's "sync: negative WaitGroup counter").
[[noreturn]] void count_failed(const char* who, const char* what) noexcept {
  char msg[160];
  std::snprintf(msg, sizeof msg, "%s: %s", who, what);
  ::weft::detail::check_failed(__FILE__, __LINE__, "count out of range", msg);
}
}  // namespace

zero_waiter::zero_waiter(std::ptrdiff_t n) : state_(with_count(0, n)) {
  WEFT_CHECK(n >= 0 && n <= INT32_MAX, "latch/wait_group: count out of range");
}

zero_waiter::~zero_waiter() {
  check_no_waiters(lk_, q_, "weft::latch, wait_group or task_group destroyed while fibers wait "
                            "on it (keep it alive until they are done)");
}

void zero_waiter::add(std::ptrdiff_t delta, const char* who) {
  // relaxed: a first guess; the CAS below validates it.
  std::uint64_t s = state_.load(std::memory_order_relaxed);
  std::uint64_t next;
  for (;;) {
    std::int64_t now = count_of(s) + delta;
    if (now < 0) count_failed(who, "negative counter (more count-downs than count-ups)");
    if (now > INT32_MAX) count_failed(who, "counter above INT32_MAX");
    bool closes = now == 0 && (s & kWaiterMask) != 0;
    next = closes ? kClosing : with_count(s, now);
    // release: the work before a count-down is visible to whoever sees
    // zero (pairs with the acquire loads in is_zero() and block(), and,
    // through the closer's lk_ and claim, with the woken waiters).
    // acquire: a closer reads the records of waiters registered before.
    if (state_.compare_exchange_weak(s, next, std::memory_order_acq_rel,
                                     std::memory_order_relaxed))
      break;
  }
  if (next == kClosing) wake_closed();  // else: the RMW was the last touch
}

// The closer's half of *Counting to zero*.
void zero_waiter::wake_closed() noexcept {
  detail::wake_batch woken;
  lk_.lock();
  woken.claim_all(q_);  // unlinks every record, also those whose claim lost
  // relaxed: kClosing is read under lk_ (registration, leaving), and the
  // count bits may change concurrently (the next phase), hence an RMW.
  state_.fetch_and(~kClosing, std::memory_order_relaxed);
  lk_.unlock();  // the last touch of the object
  woken.ready_all();
}

bool zero_waiter::is_zero() noexcept {
  return count_of(state_.load(std::memory_order_acquire)) == 0;  // pairs with add()
}

zero_waiter::ending zero_waiter::block(deadline d, const char* what,
                                       const std::source_location& where, bool cancellable) {
  if (is_zero()) return ending::zero;
  lk_.lock();
  // acquire: pairs with add() when it reads zero.
  std::uint64_t s = state_.load(std::memory_order_acquire);
  for (int round = 0;;) {
    if (count_of(s) == 0) {
      lk_.unlock();
      return ending::zero;
    }
    if (s & kClosing) {  // a closer of the previous phase is not done yet
      lk_.unlock();
      wait_for_closer(round);
      lk_.lock();
      s = state_.load(std::memory_order_acquire);  // as above
      continue;
    }
    // Registration is ordered with the closer by lk_ (see *Counting to
    // zero*); acquire is for the failure reload, which may read zero. The
    // success order is acquire too: GCC refuses a failure order stronger
    // than the success order (it would make the success seq_cst).
    if (state_.compare_exchange_weak(s, s + kOneWaiter, std::memory_order_acquire,
                                     std::memory_order_acquire))
      break;
  }
  parker p;
  waiter w;
  w.p = &p;
  struct ctx {
    zero_waiter* z;
    waiter* w;
  } c{this, &w};
  wake_reason r = p.block(
      [](void* a) {
        auto* c = static_cast<ctx*>(a);
        push_back(c->z->q_, c->w);
        c->z->lk_.unlock();  // taken above; the record is findable now
      },
      &c, {.deadline = d.when, .cancellable = cancellable, .what = what, .where = where});
  if (r == wake_reason::notified) return ending::zero;
  // *Leaving*.
  for (int round = 0;;) {
    lk_.lock();
    if (!w.linked) {  // a closer unlinked it and is done: see *Leaving*
      lk_.unlock();
      return ending::zero;
    }
    s = state_.load(std::memory_order_relaxed);  // relaxed: the CAS below validates it
    if (!(s & kClosing)) {
      // relaxed: only takes our registration back; an add() that races
      // with it either saw it (then it sets kClosing and this CAS fails)
      // or does not see it (and touches nothing for us).
      if (state_.compare_exchange_strong(s, s - kOneWaiter, std::memory_order_relaxed,
                                         std::memory_order_relaxed)) {
        unlink(q_, &w);
        lk_.unlock();
        return r == wake_reason::timed_out ? ending::timed_out : ending::cancelled;
      }
      lk_.unlock();
      continue;  // the count changed; look again
    }
    lk_.unlock();
    wait_for_closer(round);
  }
}

result<void> zero_waiter::wait(deadline d, const char* what,
                               const std::source_location& where, bool cancellable) {
  switch (block(d, what, where, cancellable)) {
    case ending::zero: return {};
    case ending::timed_out: return to_result(wake_reason::timed_out);
    case ending::cancelled: break;
  }
  return to_result(wake_reason::cancelled);  // throws fiber_unwind when unwinding
}

// While the runtime unwinds the caller, every park returns `cancelled` at
// once, after a trip through the scheduler: the loop then yields to the
// other fibers (the ones being counted down among them) until zero.
void zero_waiter::wait_noexcept(const char* what, const std::source_location& where) noexcept {
  while (block({}, what, where, false) != ending::zero) {
  }
}

}  // namespace detail

// --- once_flag -------------------------------------------------------------------

once_flag::~once_flag() {
  detail::check_no_waiters(lk_, q_, "weft::once_flag destroyed while fibers wait on it (keep "
                                    "it alive until they are done)");
  // As ~mutex: the caller running fn would finish() on freed memory.
  // acquire: pairs with finish()'s release, as in call_once(); a destroyer
  // ordered after the run sees kDone or kNew.
  WEFT_CHECK((state_.load(std::memory_order_acquire) & ~kWaiting) != kRunning,
             "weft::once_flag destroyed while its call_once function runs (the caller would "
             "finish on freed memory)");
}

// The finisher's store of kDone (or kNew) and its decision to wake are one
// RMW, as in *Unlocking* in runtime/mutex.cc: a caller that sees kDone on
// call_once's lock-free path may return and free the flag at once, so with
// nobody parked that exchange is finish()'s last touch. A waiter sets
// kWaiting with a CAS under lk_ and links its record before releasing lk_;
// a finisher that saw kWaiting finds the record under lk_, and the waiters
// it found cannot leave (nor the flag be freed) before it wakes them.
bool once_flag::begin(const std::source_location& where) {
  // A plain thread that runs fn wakes, in finish(), the fibers that came
  // meanwhile: while it runs, the deadlock detector must not take them for
  // stuck (all parked on the flag, nothing else running: a false report).
  detail::note_plain_user();
  for (;;) {
    lk_.lock();
    // acquire: pairs with the release in finish(); fn's effects are visible.
    std::uint32_t s = state_.load(std::memory_order_acquire);
    if (s == kDone) {
      lk_.unlock();
      return false;
    }
    if (s == kNew) {
      // relaxed: under lk_; nothing but this moves it from kNew, and 2 is
      // what the lock-free readers await.
      state_.store(kRunning, std::memory_order_relaxed);
      lk_.unlock();
      return true;
    }
    // relaxed: reaches finish() through lk_ (see above). Fails if finish()
    // moved on meanwhile: look again.
    if (!(s & kWaiting) &&
        !state_.compare_exchange_strong(s, s | kWaiting, std::memory_order_relaxed,
                                        std::memory_order_relaxed)) {
      lk_.unlock();
      continue;
    }
    detail::parker p;
    detail::waiter w;
    wake_reason r = detail::wait_on(lk_, q_, w, p,
                                    {.cancellable = false, .what = "call_once", .where = where});
    if (r == wake_reason::cancelled) sched::unwind_point();
  }
}

void once_flag::finish(bool ran) noexcept {
  // release: publishes fn's effects; pairs with the acquire in call_once()
  // and begin(). The last touch unless someone parked (see above).
  std::uint32_t s = state_.exchange(ran ? kDone : kNew, std::memory_order_release);
  if (!(s & kWaiting)) return;
  detail::wake_batch woken;
  lk_.lock();
  woken.claim_all(q_);
  lk_.unlock();
  woken.ready_all();
}

// --- shared_mutex ------------------------------------------------------------------

shared_mutex::~shared_mutex() {
  detail::check_no_waiters(lk_, q_, "weft::shared_mutex destroyed while fibers wait on it "
                                    "(keep it alive until they are done)");
  // As ~mutex: a holder would unlock freed memory later.
  lk_.lock();
  bool held = writer_ || readers_ > 0;
  lk_.unlock();
  WEFT_CHECK(!held, "weft::shared_mutex destroyed while locked (its holder would unlock freed "
                    "memory)");
}

// Grants the lock to the waiters at the front of q_ that can have it now:
// one writer, or every reader up to the next writer. Under lk_.
void shared_mutex::grant_locked(detail::wake_batch& woken) noexcept {
  while (detail::waiter* h = q_.head_) {
    bool wr = h->aux == 1;
    if (writer_ || (wr && readers_ > 0)) return;
    detail::unlink(q_, h);
    wake_ticket t = h->p->claim(wake_reason::notified);
    if (!t) continue;  // unwound meanwhile
    h->handed = true;
    if (wr) writer_ = true; else ++readers_;
    woken.add(h, t);
  }
}

void shared_mutex::acquire(bool wr, const std::source_location& where) {
  detail::note_plain_user();  // before taking it: see note_plain_user()
  sched::spend_budget();      // as mutex::lock(): before taking it
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
    if (r == wake_reason::notified) return;  // granted (grant_locked()); p noted a plain thread
    if (wr) {
      // A writer that left the queue (the runtime unwinds it) held back the
      // readers queued behind it: they may share the lock with its holders
      // now, not only once those leave.
      detail::wake_batch woken;
      lk_.lock();
      grant_locked(woken);
      lk_.unlock();
      woken.ready_all();
    }
    sched::unwind_point();
  }
}

void shared_mutex::lock(std::source_location where) { acquire(true, where); }
void shared_mutex::lock_shared(std::source_location where) { acquire(false, where); }

bool shared_mutex::try_lock() noexcept {
  detail::note_plain_user();  // before taking it: see note_plain_user()
  lk_.lock();
  bool ok = !writer_ && readers_ == 0 && q_.empty();
  if (ok) writer_ = true;
  lk_.unlock();
  return ok;
}

bool shared_mutex::try_lock_shared() noexcept {
  detail::note_plain_user();  // before taking it: see note_plain_user()
  lk_.lock();
  bool ok = !writer_ && q_.empty();
  if (ok) ++readers_;
  lk_.unlock();
  return ok;
}

void shared_mutex::unlock() noexcept {
  detail::wake_batch woken;
  lk_.lock();
  WEFT_CHECK(writer_, "weft::shared_mutex::unlock: not locked exclusively");
  writer_ = false;
  grant_locked(woken);
  lk_.unlock();
  woken.ready_all();
}

void shared_mutex::unlock_shared() noexcept {
  detail::wake_batch woken;
  lk_.lock();
  WEFT_CHECK(readers_ > 0, "shared_mutex::unlock_shared: not locked shared");
  if (--readers_ == 0) grant_locked(woken);
  lk_.unlock();
  woken.ready_all();
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
