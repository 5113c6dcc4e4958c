// runtime/mutex.cc — weft::mutex (after Go's sync.Mutex).
//
// State: one word, state_, so that unlock() with nobody waiting is one RMW
// and that RMW is its last touch of the mutex: POSIX lets a thread destroy
// a mutex as soon as it can lock and unlock it (`lock; last = --refs == 0;
// unlock; if (last) delete`), and whoever takes the lock right after our
// release may do just that.
//   kLocked    someone owns the lock. Set by a CAS that sees it clear, or
//              kept by an unlocker that hands the lock to a waiter
//              (starvation mode).
//   kWoken     an unlocker woke a waiter that has not yet either taken the
//              lock or registered again: later unlocks wake nobody (no
//              thundering herd: at most one woken waiter at a time). The
//              woken waiter clears it in the CAS that takes the lock or
//              registers it again.
//   kStarving  hand-off mode: unlock gives the lock directly to the oldest
//              waiter instead of releasing it.
//   waiters    (state_ / kOneWaiter) the records in q_. Incremented under lk_
//              by a locker in the CAS that sees the lock held, before it
//              links its record (still under lk_); decremented under lk_ by
//              whoever unlinks a record.
//   q_         parked lockers, FIFO; a woken locker that lost the race goes
//              back to the front, keeping its `since`.
//
// Invariants:
//   - kStarving implies kLocked: it is set only by a CAS that sees the lock
//     held, cleared only by an unlocker that still holds it, and an unlocker
//     in starvation mode never releases (it hands over).
//   - A locker registers (waiters + 1) only in a CAS that sees kLocked, so
//     some holder's unlock comes after it and sees it.
//
// *Unlocking*: the release and the decision to wake are one RMW. With no
// waiters, that RMW is the last touch. With waiters and no kWoken, the same
// RMW sets kWoken: this unlocker alone owes a wake. The waiters it counted
// are parked (or about to be, under lk_) and cannot leave lock() until
// someone wakes them, and nobody else does while kWoken is set; so whoever
// may free the mutex must first get the lock after them, and the mutex
// outlives this unlocker's wake_one(). A waiter's record is in q_ when the
// unlocker takes lk_: the unlocker's RMW saw the registration CAS, which
// the locker made under lk_ and kept lk_ until its record was linked.
// (Exception: a waiter the runtime unwinds leaves lock() unwoken; a mutex
// freed by the unwinding code while another fiber unlocks it is not
// covered.)
//
// *Unwinding*: while the runtime unwinds a fiber (after main returned),
// its parks end at once with `cancelled`, and a lock() that has to park
// throws fiber_unwind, as any parking call does. Not inside a destructor
// that an exception is running (the unwind itself runs the fiber's
// destructors, and a session may lock a registry there to leave it): a
// throw there is std::terminate, so lock() keeps waiting, as std::mutex
// would, parking again and again (each park a trip through the scheduler,
// so the holder, unwinding too or not a fiber, runs and unlocks).
//
// *Starvation*: a woken waiter that fails to take the lock after having
// waited more than kStarvationThreshold sets kStarving. From then on
// unlock hands the lock to the oldest waiter (kLocked stays set, so
// newcomers cannot barge), until the queue empties or a waiter is served
// within the threshold. Normal mode is much faster (the running fiber keeps
// the lock hot); starvation mode bounds the wait.
#include "alloc/check.h"
#include "runtime/sync.h"
#include "runtime/waiter.h"

namespace weft {
namespace {

// Go's starvationThresholdNs.
constexpr auto kStarvationThreshold = std::chrono::milliseconds(1);
// Spins of ~40 cycles each before parking: enough to cover a short critical
// section on another worker (the `mutex` workload of bench/micro.cc), far
// shorter than a park and a wake.
constexpr int kSpins = 100;

}  // namespace

// No spinning in starvation mode: the lock goes to the head of the queue
// and is never free while anyone waits, so spinning is futile; parking at
// once lets the handed-to fiber run (it is in this worker's LIFO slot when
// this worker handed it the lock).
//
// Nor when other fibers are runnable on this worker (Go's sync_runtime_
// canSpin asks the same of the local run queue): the holder is then on
// another worker, and spinning only delays this worker's own fibers while
// the lock's cache line bounces between the two.
//
// `woken`: the caller is the woken waiter; taking the lock clears kWoken.
bool mutex::spin_then_try(bool woken) noexcept {
  std::uint32_t clear = woken ? kWoken : 0;
  // relaxed: a first guess; try_acquire's CAS is the real test.
  if (sched::others_runnable_here())
    return try_acquire(state_.load(std::memory_order_relaxed), clear);
  for (int i = 0; i < kSpins; ++i) {
    // relaxed: a hint; a stale value only costs a few spins.
    if (state_.load(std::memory_order_relaxed) & kStarving) return false;
    __builtin_ia32_pause();
    std::uint32_t s = state_.load(std::memory_order_relaxed);  // relaxed: as above
    if (!(s & kLocked) && try_acquire(s, clear)) return true;
  }
  return false;
}

// Registers and parks once: acquired if the lock was handed over or taken;
// woken if an unlocker woke us to compete (kWoken is ours); unwound if the
// park ended because the runtime unwinds this fiber, inside a destructor
// (elsewhere that throws fiber_unwind; see *Unwinding*).
// `requeue`: the caller is the woken waiter, which lost the race.
mutex::park_end mutex::park_once(bool requeue, clock::time_point since,
                                 const std::source_location& where) {
  std::uint32_t clear = requeue ? kWoken : 0;
  bool starving = requeue && clock::now() - since > kStarvationThreshold;
  lk_.lock();
  std::uint32_t s = state_.load(std::memory_order_relaxed);  // relaxed: the CASes validate it
  for (;;) {
    if (!(s & kLocked)) {
      if (try_acquire(s, clear)) {
        lk_.unlock();
        return park_end::acquired;
      }
      s = state_.load(std::memory_order_relaxed);  // relaxed: as above
      continue;
    }
    std::uint32_t next = (s + kOneWaiter) & ~clear;
    if (starving) next |= kStarving;  // s has kLocked: see *Invariants*
    // relaxed: the registration reaches the unlocker through lk_ (see
    // *Unlocking*); nothing else is published by it.
    if (state_.compare_exchange_weak(s, next, std::memory_order_relaxed,
                                     std::memory_order_relaxed))
      break;
  }
  detail::parker p;
  p.since = since;
  detail::waiter w;
  w.p = &p;
  struct ctx {
    mutex* m;
    detail::waiter* w;
    bool front;
  } c{this, &w, requeue};
  auto r = p.block(
      [](void* a) {
        auto* c = static_cast<ctx*>(a);
        if (c->front) detail::push_front(c->m->q_, c->w); else detail::push_back(c->m->q_, c->w);
        c->m->lk_.unlock();
      },
      &c, {.cancellable = false, .what = "mutex lock", .where = where});
  if (r == detail::wake_reason::notified) return w.handed ? park_end::acquired : park_end::woken;
  // Only when the runtime unwinds (the park is not cancellable). The
  // unwinder's claim won, so no unlocker woke us: kWoken is not ours (a
  // requeued waiter gave it up in its registration CAS).
  lk_.lock();
  if (w.linked) {
    detail::unlink(q_, &w);
    state_.fetch_sub(kOneWaiter, std::memory_order_relaxed);  // relaxed: under lk_
  }
  lk_.unlock();
  sched::unwind_point();
  return park_end::unwound;
}

void mutex::lock_slow(const std::source_location& where) {
  if (spin_then_try(false)) return;
  auto since = clock::now();
  bool requeue = false;
  for (;;) {
    switch (park_once(requeue, since, where)) {
      case park_end::acquired: return;
      case park_end::woken:  // to compete: kWoken is set for us
        if (spin_then_try(true)) return;
        requeue = true;
        break;
      case park_end::unwound:  // a destructor the unwind runs: see *Unwinding*
        if (spin_then_try(false)) return;
        requeue = false;
        break;
    }
  }
}

// unlock() found someone waiting, or kWoken or kStarving set. s: the
// current state, kLocked set (ours).
void mutex::unlock_slow(std::uint32_t s) noexcept {
  // The fast path sends every unlock of an unlocked mutex here (s is not
  // kLocked): a double unlock, or an unlock without a lock, is a bug in the
  // program, said at once (Go: "sync: unlock of unlocked mutex") rather
  // than left to release, later, a lock someone else holds.
  WEFT_CHECK(s & kLocked, "weft::mutex::unlock: the mutex is not locked");
  bool wake;
  for (;;) {
    if (s & kStarving) {
      hand_off();
      return;
    }
    wake = s >= kOneWaiter && !(s & kWoken);
    // release: as in unlock(). The RMW that releases also takes the duty
    // to wake (see *Unlocking*).
    if (state_.compare_exchange_weak(s, (s & ~kLocked) | (wake ? kWoken : 0),
                                     std::memory_order_release, std::memory_order_relaxed))
      break;
  }
  if (wake) wake_one();  // else: the CAS was the last touch
}

// lk_ held. Unlinks waiters from the front until one is claimed (the others
// are being unwound); the waiter count drops for every record unlinked.
detail::waiter* mutex::pop_waiter(detail::wake_ticket& t) noexcept {
  while (detail::waiter* w = q_.head_) {
    detail::unlink(q_, w);
    state_.fetch_sub(kOneWaiter, std::memory_order_relaxed);  // relaxed: under lk_
    if ((t = w->p->claim(detail::wake_reason::notified))) return w;
  }
  return nullptr;
}

// Locked at its destruction: its holder's unlock() would write to freed
// memory (or to whatever reused it) later. Said at once, as a waiter is.
// relaxed: whoever destroys it must already be ordered after the last
// unlock (else the destruction races with it anyway).
//
// Nor with kWoken set: the unlocker woke a locker that has not run yet (its
// record left q_, and the lock may be free), and that locker, still inside
// lock(), takes the lock from freed memory when it runs. kWoken is cleared
// only by that locker (or by an unlocker that found nobody to wake, before
// its unlock() returns), so a destroyer ordered after every lock() and
// unlock() of the mutex never sees it.
mutex::~mutex() {
  detail::check_no_waiters(lk_, q_, "weft::mutex destroyed while fibers wait on it (keep it "
                                    "alive until they are done)");
  std::uint32_t s = state_.load(std::memory_order_relaxed);
  WEFT_CHECK(!(s & kLocked),
             "weft::mutex destroyed while locked (its holder would unlock freed memory)");
  WEFT_CHECK(!(s & kWoken),
             "weft::mutex destroyed while a locker it woke is on its way (keep it alive until "
             "every lock() has returned)");
}

// The unlocker that set kWoken.
void mutex::wake_one() noexcept {
  detail::wake_ticket t;
  lk_.lock();
  if (!pop_waiter(t)) {
    // Only waiters being unwound were left: nobody is woken, so kWoken must
    // go. Under lk_: nobody registers meanwhile.
    state_.fetch_and(~kWoken, std::memory_order_relaxed);  // relaxed: a flag; see *Unlocking*
  }
  lk_.unlock();
  detail::ready(t);
}

// Starvation mode: the lock goes to the oldest waiter; kLocked stays set,
// so the mutex is alive (held, on the waiter's behalf) until ready().
void mutex::hand_off() noexcept {
  detail::wake_ticket t;
  lk_.lock();
  if (detail::waiter* w = pop_waiter(t)) {
    w->handed = true;
    if (q_.empty() || clock::now() - w->p->since < kStarvationThreshold)
      state_.fetch_and(~kStarving, std::memory_order_relaxed);  // relaxed: under lk_; back to normal mode
    lk_.unlock();
    detail::ready(t);
    return;
  }
  // Nobody to hand to (only unwound waiters were left): leave starvation
  // mode, still holding the lock, then release it as a normal unlock does.
  state_.fetch_and(~kStarving, std::memory_order_relaxed);  // relaxed: we hold the lock
  lk_.unlock();
  unlock_slow(state_.load(std::memory_order_relaxed));  // relaxed: its CAS validates it
}

}  // namespace weft
