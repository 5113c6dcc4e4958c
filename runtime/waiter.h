// runtime/waiter.h — waiters that work for fibers and for plain OS threads.
//
// Internal to runtime/. Every blocking operation of weft's channels, select
// and synchronization types goes through the three pieces here:
//
//   parker  one blocking operation of one fiber or plain thread, on its
//           stack. A fiber parks through sched::park (see *The park
//           protocol* in sched/park.cc); a plain thread sleeps on a futex
//           word inside the parker.
//   waiter  a record linked into a wait_list (runtime/wait_list.h): which
//           parker, and the operation's payload (a value slot, a flag).
//           select links several records that share one parker.
//   wake_ticket  what a waker keeps after a successful claim, to make the
//           blocker runnable once it has dropped its locks.
//
// The protocol, for both kinds of blocker:
//
//   blocker                              waker (any thread)
//   -------                              ------------------
//   lock(list)
//   not ready: block(publish)
//     publish: link record; unlock ────> lock(list); find record
//                                        t = record.p->claim(r)   (first claim wins)
//                                        if t: fill payload, unlink record
//                                        unlock(list); ready(t)
//   block returns the reason
//   not notified: lock(list); unlink record if still linked; unlock
//
// Invariants:
//   - A claim is made only under the lock of the list that holds the
//     record, so the blocker, which takes that lock to retract its record,
//     cannot leave (and free the record) while a waker holds it (the rule
//     on sched::claim()).
//   - The payload is written after the claim succeeded and before ready():
//     a blocker never sees a half-written hand-off, and a claim that loses
//     writes nothing.
//   - Thread word: 0 = waiting, 1 = claimed (the waker is filling the
//     payload), 2 + wake_reason = done. Only 0 -> 1 (waker) and
//     0 -> 2+timed_out (the thread itself) are compare-exchanges; the waker
//     stores 2 + reason in ready().
//
// Who calls what:
//   parker::block()           the blocker, once per parker
//   parker::claim(), ready()  any thread; claim under the list's lock
//   wait_on()                 the blocker, with the list's lock held
#pragma once

#include <atomic>
#include <cstdint>
#include <source_location>

#include "runtime/wait_list.h"
#include "sched/park.h"

namespace weft::detail {

using sched::wake_reason;
using wclock = sched::clock;

struct wake_ticket {
  sched::fiber* f = nullptr;                  // a claimed fiber
  std::atomic<std::uint32_t>* word = nullptr;  // a claimed plain thread's word
  std::uint32_t final = 0;                     // what ready() stores into *word
  explicit operator bool() const { return f != nullptr || word != nullptr; }
};

// Makes a claimed blocker runnable. Call after releasing the list's lock.
void ready(const wake_ticket& t) noexcept;

struct block_opts {
  wclock::time_point deadline = wclock::time_point::max();
  bool cancellable = true;  // fibers only: request_stop() wakes it
  const char* what = "wait";  // the deadlock report's [reason]
  std::source_location where = std::source_location::current();
};

class parker {
 public:
  parker() noexcept;
  parker(const parker&) = delete;
  parker& operator=(const parker&) = delete;

  bool on_fiber() const noexcept { return self_ != nullptr; }
  // Blocks until claimed, the deadline or (fibers) a stop request.
  // publish(arg) runs once the parker can be claimed; it must release the
  // caller's locks. Returns why it woke.
  wake_reason block(void (*publish)(void*), void* arg, const block_opts& o);
  // First claim wins; a losing claim returns an empty ticket.
  wake_ticket claim(wake_reason r) noexcept;

  // select: the case that fired; written by the winning claimer under the
  // lock of that case's list (a channel's, or for a stop case the token's
  // stop_state's), read by the blocker after block().
  int chosen = -1;
  // mutex: when this operation started waiting (starvation hand-off).
  wclock::time_point since{};

 private:
  wake_reason block_thread(void (*publish)(void*), void* arg, const block_opts& o);

  sched::fiber* self_ = nullptr;  // null: a plain thread
  sched::wake_token token_{};     // fiber: set by the publish step
  std::atomic<std::uint32_t> word_{0};  // thread: see *Thread word* above
};

struct waiter {
  parker* p = nullptr;
  waiter* prev = nullptr;  // list links; guarded by the list's lock
  waiter* next = nullptr;
  bool linked = false;     // guarded by the list's lock
  // Payload, written by the winning waker under the list's lock.
  void* slot = nullptr;    // channel: the value (send) or its destination (recv)
  void (*deliver)(void* dst, void* src) = nullptr;  // channel recv: builds *dst from *src
  bool closed = false;     // channel: woken by close()
  bool handed = false;     // mutex, shared_mutex: ownership was handed over
  int case_index = 0;      // select: which case this record belongs to
  std::uint32_t aux = 0;   // shared_mutex: 1 = writer; semaphore: units wanted
  wake_ticket ticket{};    // wake_batch: the claim, kept until ready_all()
};

// The blockers one waker claims at once (close, notify_all, an unlock that
// grants several readers), made runnable after it drops the list's lock.
// Allocates nothing, so the wakers stay noexcept and cheap: the claimed
// records themselves hold the chain and their tickets. A claimed record is
// unlinked and cannot be freed by its blocker before ready(), so the waker
// owns its links and `ticket` until then.
//
// Who calls what: the waker, on its own stack; add() and claim_all() under
// the list's lock, ready_all() after dropping it, before the batch ends.
class wake_batch {
 public:
  wake_batch() = default;
  wake_batch(const wake_batch&) = delete;
  wake_batch& operator=(const wake_batch&) = delete;
  ~wake_batch();  // checks that ready_all() ran

  // `w` was unlinked from its list and claimed with ticket `t`.
  void add(waiter* w, const wake_ticket& t) noexcept;
  // Claims and adds every record of `q`; records whose claim fails are
  // dropped from the list, as by pop_claimed(). Returns how many it claimed.
  std::size_t claim_all(wait_list& q, wake_reason r = wake_reason::notified) noexcept;
  void ready_all() noexcept;

 private:
  waiter* head_ = nullptr;
  waiter* tail_ = nullptr;
};

void push_back(wait_list& q, waiter* w) noexcept;
void push_front(wait_list& q, waiter* w) noexcept;
void unlink(wait_list& q, waiter* w) noexcept;
// Pops records from the front until one's parker is claimed with `r`; the
// records whose claim fails (timed out, cancelled, another select case won)
// are dropped from the list. Returns the claimed record (unlinked) or null.
waiter* pop_claimed(wait_list& q, wake_ticket& t,
                    wake_reason r = wake_reason::notified) noexcept;

// With `lk` held: links `w` (whose p is `p`) into `q` and blocks; returns
// with `lk` released. On a wake other than notified the record is retracted
// (under lk). On `cancelled` the caller must call sched::unwind_point()
// after its own cleanup (see park.h).
wake_reason wait_on(short_lock& lk, wait_list& q, waiter& w, parker& p,
                    const block_opts& o, bool at_front = false);

// For the destructors of the types that embed a wait list: aborts with
// `msg` if a record is still linked in `q`. Under `lk`, so that a blocker
// retracting its record (woken by a deadline or a stop request) is done
// with the object once we hold it. One still linked is a fiber or thread
// parked on an object that is going away, which would unlink its record
// from freed memory when it wakes (or when the runtime unwinds it): a bug
// in the program, said at once instead of a corrupted heap or stack.
void check_no_waiters(short_lock& lk, const wait_list& q, const char* msg) noexcept;

// Plain threads: registers the calling thread as an outside reference of
// the running scheduler (once per thread and scheduler), so the deadlock
// detector stays quiet while the thread may still wake fibers.
void note_plain_thread() noexcept;

// Futex on a 32-bit word; the deadline is absolute on steady_clock
// (CLOCK_MONOTONIC). Spurious returns are allowed.
void futex_wait(std::atomic<std::uint32_t>* w, std::uint32_t expect,
                wclock::time_point deadline) noexcept;
void futex_wake_all(std::atomic<std::uint32_t>* w) noexcept;

// A cheap per-thread random number (select's choice among ready cases).
std::uint32_t fast_random() noexcept;

// For a destructor that waits for a runnable blocker to finish with the
// object (condition_variable): on a fiber, yields (also while the runtime
// unwinds the caller); on a plain thread, gives the CPU away.
void let_others_run() noexcept;

}  // namespace weft::detail
