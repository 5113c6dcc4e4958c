// runtime/sync.h — synchronization that parks fibers and also works from
// plain OS threads (which block on a futex), as *NSYNC does for pthreads.
//
//   mutex               spins briefly, then parks; unlock wakes at most one
//                       waiter; a waiter that has waited more than 1 ms gets
//                       the lock handed to it (Go's starvation mode).
//   shared_mutex        FIFO between readers and writers: a writer waits for
//                       the readers before it; readers queued behind a writer
//                       wait for it (no writer starvation).
//   condition_variable  with weft::mutex; predicate and deadline forms.
//   semaphore           counting; release hands units to waiters in FIFO order.
//   latch, wait_group   wait for a count to reach zero (a wait_group's count
//                       may grow again; a latch's only shrinks).
//   once_flag           call_once: one caller runs fn, the others park.
//   outside_ref         keeps the deadlock detector quiet while a plain
//                       thread that may wake fibers is alive.
//
// A plain thread that takes a mutex or shared_mutex counts from then on as
// a thread that may wake fibers (see outside_ref below), as one that
// blocked in weft does: fibers parked on the lock it holds are not a
// deadlock.
//
// Cancellation and deadlines: waits that return result<void> return
// std::errc::operation_canceled when the calling fiber's stop was requested
// and std::errc::timed_out at their deadline. Lock acquisition (mutex,
// shared_mutex, call_once) cannot fail, as with std::mutex: it parks
// without honouring stop requests (critical sections are short).
//
// None of these types may be destroyed while anyone waits on it; a
// destructor that finds a fiber or thread parked on its object stops the
// process with a message (as ~channel does), instead of leaving the
// sleeper to unlink its record from freed memory when it wakes or when
// the runtime unwinds it after main returns.
// (A condition_variable, as std::condition_variable, may go once every
// waiter was notified, before they have relocked the mutex: a notified
// waiter does not touch it again.)
// Nor may a mutex or shared_mutex be destroyed while locked (its holder's
// unlock would write to freed memory): that stops the process too.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <source_location>
#include <utility>

#include "alloc/check.h"
#include "runtime/wait_list.h"
#include "runtime/weft.h"

namespace weft {

class mutex {
 public:
  mutex() = default;
  ~mutex();  // checks that nobody holds it or is parked on it (runtime/mutex.cc)
  mutex(const mutex&) = delete;
  mutex& operator=(const mutex&) = delete;

  void lock(std::source_location where = std::source_location::current()) {
    detail::note_plain_user();  // a plain thread holding it may wake fibers
    // A fiber whose locks are all uncontended never parks here: it spends
    // the coop budget (sched/park.h), as Tokio's Mutex::lock does, or a
    // loop of lock/unlock would hold its worker. Before taking the lock,
    // so that the yield, when due, does not hold it.
    sched::spend_budget();
    // relaxed: as in try_lock().
    if (!try_acquire(state_.load(std::memory_order_relaxed), 0)) lock_slow(where);
  }
  bool try_lock() noexcept {
    detail::note_plain_user();  // as in lock()
    // relaxed: a first guess; try_acquire's CAS validates it. Looking first
    // (rather than a CAS from 0) saves a failing CAS when the lock is free
    // but others are parked (bench/micro.cc `mutex`).
    return try_acquire(state_.load(std::memory_order_relaxed), 0);
  }
  void unlock() noexcept {
    // relaxed: a first guess; the CAS validates it. Looking first saves a
    // failing CAS when others wait (bench/micro.cc `mutex`).
    std::uint32_t s = state_.load(std::memory_order_relaxed);
    // release: publishes the section; pairs with the acquire in try_lock()
    // and the slow paths. Nobody waiting: this RMW is the last touch of the
    // mutex (see *Unlocking* in runtime/mutex.cc).
    if (s != kLocked || !state_.compare_exchange_strong(s, 0, std::memory_order_release,
                                                        std::memory_order_relaxed))
      unlock_slow(s);
  }

 private:
  // state_ bits; see runtime/mutex.cc.
  static constexpr std::uint32_t kLocked = 1;    // someone owns the lock
  static constexpr std::uint32_t kWoken = 2;     // a woken waiter is on its way
  static constexpr std::uint32_t kStarving = 4;  // hand-off mode
  static constexpr std::uint32_t kOneWaiter = 8; // the rest: records in q_
  bool try_acquire(std::uint32_t s, std::uint32_t clear) noexcept {
    while (!(s & kLocked))
      // acquire: pairs with the release in unlock(); the previous holder's
      // section is visible.
      if (state_.compare_exchange_weak(s, (s | kLocked) & ~clear, std::memory_order_acquire,
                                       std::memory_order_relaxed))
        return true;
    return false;
  }
  void lock_slow(const std::source_location& where);
  void unlock_slow(std::uint32_t s) noexcept;
  bool spin_then_try(bool woken) noexcept;
  enum class park_end : unsigned char { acquired, woken, unwound };
  park_end park_once(bool requeue, clock::time_point since, const std::source_location& where);
  detail::waiter* pop_waiter(detail::wake_ticket& t) noexcept;
  void wake_one() noexcept;
  void hand_off() noexcept;
  std::atomic<std::uint32_t> state_{0};  // see runtime/mutex.cc
  detail::short_lock lk_;
  detail::wait_list q_;  // guarded by lk_
};

class shared_mutex {
 public:
  shared_mutex() = default;
  ~shared_mutex();  // checks that nobody holds it or is parked on it
  shared_mutex(const shared_mutex&) = delete;
  shared_mutex& operator=(const shared_mutex&) = delete;

  void lock(std::source_location where = std::source_location::current());
  bool try_lock() noexcept;
  void unlock() noexcept;
  void lock_shared(std::source_location where = std::source_location::current());
  bool try_lock_shared() noexcept;
  void unlock_shared() noexcept;

 private:
  void acquire(bool writer, const std::source_location& where);
  void grant_locked(detail::wake_batch& woken) noexcept;
  detail::short_lock lk_;
  detail::wait_list q_;       // guarded by lk_; waiter::aux 1 = writer
  std::size_t readers_ = 0;   // guarded by lk_
  bool writer_ = false;       // guarded by lk_
};

class condition_variable {
 public:
  condition_variable() = default;
  // Checks that nobody is parked on it; waits for a waiter that woke by
  // its deadline or a stop request and is still retracting its record.
  ~condition_variable();
  condition_variable(const condition_variable&) = delete;
  condition_variable& operator=(const condition_variable&) = delete;

  void notify_one() noexcept;
  void notify_all() noexcept;

  // Unlocks lk, waits for a notify (or a spurious wake), relocks lk.
  result<void> wait(std::unique_lock<mutex>& lk, deadline d = {},
                    std::source_location where = std::source_location::current());
  // Waits until pred() holds (checked with lk held). timed_out or
  // operation_canceled if pred() is still false then.
  template <typename Pred>
  result<void> wait(std::unique_lock<mutex>& lk, Pred pred, deadline d = {},
                    std::source_location where = std::source_location::current()) {
    while (!pred()) {
      result<void> r = wait(lk, d, where);
      if (!r) return pred() ? result<void>{} : r;
    }
    return {};
  }

 private:
  detail::short_lock lk_;
  detail::wait_list q_;  // guarded by lk_
  // Guarded by lk_: waiters that will take lk_ again (linked, and not
  // claimed by a notify). See *Destroying after a notify* in sync.cc.
  std::size_t waiting_ = 0;
};

class semaphore {
 public:
  explicit semaphore(std::ptrdiff_t initial = 0) : count_(initial) {
    WEFT_CHECK(initial >= 0, "semaphore: negative initial count");
  }
  ~semaphore();  // checks that nobody is parked on it
  semaphore(const semaphore&) = delete;
  semaphore& operator=(const semaphore&) = delete;

  result<void> acquire(deadline d = {},
                       std::source_location where = std::source_location::current());
  bool try_acquire() noexcept;
  void release(std::ptrdiff_t n = 1);

 private:
  detail::short_lock lk_;
  detail::wait_list q_;   // guarded by lk_
  std::ptrdiff_t count_;  // guarded by lk_; > 0 implies q_ empty
};

namespace detail {
// A count and the waiters for it to reach zero: latch, wait_group and
// task_group. See *Counting to zero* in runtime/sync.cc.
class zero_waiter {
 public:
  explicit zero_waiter(std::ptrdiff_t n);
  ~zero_waiter();  // checks that nobody is parked on it
  zero_waiter(const zero_waiter&) = delete;
  zero_waiter& operator=(const zero_waiter&) = delete;
  void add(std::ptrdiff_t delta, const char* who);  // wakes everyone at zero
  result<void> wait(deadline d, const char* what, const std::source_location& where,
                    bool cancellable = true);
  // Waits for zero without a deadline, without honouring stop requests and
  // without throwing, even while the runtime unwinds the caller: for
  // destructors (~task_group).
  void wait_noexcept(const char* what, const std::source_location& where) noexcept;
  bool is_zero() noexcept;

 private:
  enum class ending { zero, timed_out, cancelled };
  ending block(deadline d, const char* what, const std::source_location& where,
               bool cancellable);
  void wake_closed() noexcept;
  // state_: the count in the high 32 bits (never negative); kClosing; the
  // number of registered waiters in the low 31 bits.
  static constexpr std::uint64_t kOneWaiter = 1;
  static constexpr std::uint64_t kClosing = std::uint64_t{1} << 31;
  static constexpr std::uint64_t kWaiterMask = kClosing - 1;
  short_lock lk_;
  wait_list q_;  // guarded by lk_
  std::atomic<std::uint64_t> state_;  // any thread; see sync.cc
};
}  // namespace detail

class latch {
 public:
  explicit latch(std::ptrdiff_t n) : z_(n) {}
  void count_down(std::ptrdiff_t n = 1) {
    WEFT_CHECK(n >= 0, "latch::count_down: negative count (a latch only counts down)");
    z_.add(-n, "weft::latch::count_down");
  }
  bool try_wait() noexcept { return z_.is_zero(); }
  result<void> wait(deadline d = {},
                    std::source_location where = std::source_location::current()) {
    return z_.wait(d, "latch", where);
  }
  result<void> arrive_and_wait(std::ptrdiff_t n = 1, deadline d = {},
                               std::source_location where = std::source_location::current()) {
    count_down(n);
    return wait(d, where);
  }

 private:
  detail::zero_waiter z_;
};

class wait_group {
 public:
  wait_group() : z_(0) {}
  void add(std::ptrdiff_t n = 1) { z_.add(n, "weft::wait_group::add"); }
  void done() { z_.add(-1, "weft::wait_group::done"); }
  result<void> wait(deadline d = {},
                    std::source_location where = std::source_location::current()) {
    return z_.wait(d, "wait_group", where);
  }

 private:
  detail::zero_waiter z_;
};

class once_flag;
// Declared here for its default argument (a friend of once_flag below; a
// function template's default arguments go on its first declaration).
template <typename F>
void call_once(once_flag& flag, F&& fn,
               std::source_location where = std::source_location::current());

class once_flag {
 public:
  once_flag() = default;
  ~once_flag();  // checks that nobody is parked on it
  once_flag(const once_flag&) = delete;
  once_flag& operator=(const once_flag&) = delete;

 private:
  template <typename F>
  friend void call_once(once_flag& flag, F&& fn, std::source_location where);
  // true: the caller must run fn, then finish(). `where`: the caller's
  // call_once, for dump() and the deadlock report while it waits.
  bool begin(const std::source_location& where);
  void finish(bool ran) noexcept;  // false: fn threw; another caller retries
  static constexpr std::uint32_t kNew = 0, kRunning = 1, kDone = 2;
  static constexpr std::uint32_t kWaiting = 4;  // with kRunning: someone parked
  std::atomic<std::uint32_t> state_{kNew};  // see sync.cc
  detail::short_lock lk_;
  detail::wait_list q_;  // guarded by lk_
};

// Runs fn exactly once per flag (again if it threw). Callers that arrive
// while it runs wait, then return.
template <typename F>
void call_once(once_flag& flag, F&& fn, std::source_location where) {
  // acquire: pairs with the release in finish(); fn's effects are visible.
  if (flag.state_.load(std::memory_order_acquire) == once_flag::kDone) return;
  if (!flag.begin(where)) return;
  try {
    std::forward<F>(fn)();
  } catch (...) {
    flag.finish(false);
    throw;  // also the runtime's fiber_unwind
  }
  flag.finish(true);
}

// Held by, or on behalf of, a plain OS thread that may wake fibers: while
// any is alive, the deadlock detector does not report. A plain thread that
// blocks in weft takes one implicitly for the rest of its life; take one
// explicitly before starting a thread that fibers will wait for, and move it
// into the thread. Only inside weft::run.
class outside_ref {
 public:
  outside_ref();
  ~outside_ref();
  outside_ref(outside_ref&& o) noexcept : run_(std::exchange(o.run_, 0)) {}
  outside_ref& operator=(outside_ref&&) = delete;

 private:
  std::uint64_t run_;  // the run (scheduler) it counts on; 0 once moved from
};

}  // namespace weft
