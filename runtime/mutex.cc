// runtime/mutex.cc — weft::mutex (after Go's sync.Mutex).
//
// State:
//   state_     1 while someone owns the lock. Set by a successful CAS 0->1
//              (try_lock), or kept at 1 by an unlocker that hands the lock
//              to a waiter (starvation mode).
//   nwaiters_  the number of records in q_. Incremented under lk_ by a
//              locker before its last try; decremented under lk_ by whoever
//              unlinks a record.
//   woken_     an unlocker woke a waiter that has not yet either taken the
//              lock or parked again: later unlocks wake nobody (no
//              thundering herd: at most one woken waiter at a time).
//   starving_  hand-off mode: unlock gives the lock directly to the oldest
//              waiter instead of releasing it.
//   q_         parked lockers, FIFO; a woken locker that lost the race goes
//              back to the front, keeping its `since`.
//
// *Unlocking*: the unlocker stores state_ = 0 and then loads nwaiters_ and
// woken_; a locker increments nwaiters_ (and, if it was the woken one,
// clears woken_) and then tries the CAS on state_. All are seq_cst (a
// StoreLoad pattern on each side): either the locker's CAS sees 0 and takes
// the lock, or the unlocker sees a waiter and no pending woken one, and
// wakes one — which it finds in q_, because the locker holds lk_ from the
// increment until its record is published.
//
// *Starvation*: a woken waiter that fails to take the lock after having
// waited more than kStarvationThreshold sets starving_. From then on
// unlock hands the lock to the oldest waiter (state_ stays 1, so newcomers
// cannot barge), until the queue empties or a waiter is served within the
// threshold. Normal mode is much faster (the running fiber keeps the lock
// hot); starvation mode bounds the wait.
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
// and state_ never drops to 0 while anyone waits, so spinning is futile;
// parking at once lets the handed-to fiber run (it is in this worker's LIFO
// slot when this worker handed it the lock).
//
// Nor when other fibers are runnable on this worker (Go's sync_runtime_
// canSpin asks the same of the local run queue): the holder is then on
// another worker, and spinning only delays this worker's own fibers while
// the lock's cache line bounces between the two.
bool mutex::spin_then_try() noexcept {
  if (sched::others_runnable_here()) return try_lock();
  for (int i = 0; i < kSpins; ++i) {
    // relaxed: a hint; a stale value only costs a few spins.
    if (starving_.load(std::memory_order_relaxed)) return false;
    __builtin_ia32_pause();
    // relaxed: a hint; try_lock() is the real test.
    if (state_.load(std::memory_order_relaxed) == 0 && try_lock()) return true;
  }
  return false;
}

// Parks once. True if the lock was handed over (or taken) meanwhile.
bool mutex::park_once(bool requeue, clock::time_point since,
                      const std::source_location& where) {
  lk_.lock();
  nwaiters_.fetch_add(1, std::memory_order_seq_cst);  // see *Unlocking*
  if (requeue) {
    woken_.store(false, std::memory_order_seq_cst);  // see *Unlocking*
    if (clock::now() - since > kStarvationThreshold)
      starving_.store(true, std::memory_order_seq_cst);  // read by unlock()
  }
  if (try_lock()) {
    nwaiters_.fetch_sub(1, std::memory_order_relaxed);  // relaxed: under lk_
    lk_.unlock();
    return true;
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
  if (r == detail::wake_reason::notified) return w.handed;
  // Only when the runtime unwinds (the park is not cancellable).
  lk_.lock();
  if (w.linked) {
    detail::unlink(q_, &w);
    nwaiters_.fetch_sub(1, std::memory_order_relaxed);  // relaxed: under lk_
  }
  lk_.unlock();
  sched::unwind_point();
  return false;
}

void mutex::lock_slow(const std::source_location& where) {
  if (spin_then_try()) return;
  auto since = clock::now();
  bool requeue = false;
  for (;;) {
    if (park_once(requeue, since, where)) return;
    // Woken to compete (woken_ is set for us).
    if (spin_then_try()) {
      woken_.store(false, std::memory_order_seq_cst);  // see *Unlocking*
      return;
    }
    requeue = true;
  }
}

void mutex::unlock() noexcept {
  if (starving_.load(std::memory_order_seq_cst)) {
    hand_off();
    return;
  }
  state_.store(0, std::memory_order_seq_cst);  // releases the section; see *Unlocking*
  if (nwaiters_.load(std::memory_order_seq_cst) == 0 ||
      woken_.load(std::memory_order_seq_cst))
    return;
  wake_one();
}

// lk_ held. Unlinks waiters from the front until one is claimed (the others
// timed out or are being unwound); nwaiters_ counts every record unlinked.
detail::waiter* mutex::pop_waiter(detail::wake_ticket& t) noexcept {
  while (detail::waiter* w = q_.head_) {
    detail::unlink(q_, w);
    nwaiters_.fetch_sub(1, std::memory_order_relaxed);  // relaxed: under lk_
    if ((t = w->p->claim(detail::wake_reason::notified))) return w;
  }
  return nullptr;
}

void mutex::wake_one() noexcept {
  detail::wake_ticket t;
  lk_.lock();
  if (pop_waiter(t)) woken_.store(true, std::memory_order_seq_cst);  // see *Unlocking*
  lk_.unlock();
  detail::ready(t);
}

// Starvation mode: the lock goes to the oldest waiter; state_ stays 1.
void mutex::hand_off() noexcept {
  detail::wake_ticket t;
  lk_.lock();
  if (detail::waiter* w = pop_waiter(t)) {
    w->handed = true;
    if (q_.empty() || clock::now() - w->p->since < kStarvationThreshold)
      starving_.store(false, std::memory_order_seq_cst);  // back to normal mode
    lk_.unlock();
    detail::ready(t);
    return;
  }
  // Nobody to hand to: release normally. Under lk_, so no locker is
  // between its increment of nwaiters_ and its park.
  starving_.store(false, std::memory_order_seq_cst);
  state_.store(0, std::memory_order_seq_cst);  // releases the section
  lk_.unlock();
}

}  // namespace weft
