// sched/worker.h
//
// One worker: an OS thread pinned to one processing unit that runs fibers.
// The loop is sched/worker.cc; read it top to bottom.
//
// Invariants:
//   - Everything not marked otherwise is touched only by the worker's own
//     thread (the owner).
//   - pinned_ holds fibers no other worker may run; local_ and displaced_
//     may be stolen from; inbox_ receives pinned fibers woken by other
//     threads.
//   - lifo_ (the LIFO slot) is the owner's, except that a thief may take an
//     unpinned fiber out of it with a CAS once the owner looks stuck in one
//     fiber (see steal_lifo() in worker.cc). So the owner takes a fiber
//     out of it only through exchange_lifo(), sets an empty slot with a
//     release store (only the owner fills it), and never reads the fiber
//     in it before taking it. With one worker (alone_) there is no thief,
//     and exchange_lifo() is a load and a store; with several it is one
//     too, made safe against a thief by an asymmetric fence (*Asymmetric
//     LIFO takes* in worker.cc), or an exchange where the kernel lacks one.
//
// Who calls what:
//   run()                              the worker thread, once
//   push_inbox()                       any thread (waking a pinned fiber)
//   schedule_local()                   the owner (a fiber running on it)
#pragma once

#include <atomic>
#include <cstdint>
#include <latch>
#include <memory>
#include <source_location>
#include <thread>
#include <vector>

#include "alloc/topology.h"
#include "sched/context.h"
#include "sched/driver.h"
#include "sched/fiber.h"
#include "sched/park.h"
#include "sched/run_queue.h"
#include "alloc/spinlock.h"
#include "sched/timer_heap.h"

namespace weft::sched {

class scheduler;

// Written only by the owner: relaxed atomics so stats() may read them from
// any thread without a lock.
struct worker_counters {
  std::atomic<std::uint64_t> fibers_run{0}, steals{0}, spawned{0}, parks{0},
      yields{0}, sleeps{0}, wakeups{0}, lifo_runs{0}, inject_pops{0}, timer_steals{0},
      overflowed{0};  // fibers a full local queue moved to the inject queue
  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) {
    c.store(c.load(std::memory_order_relaxed) + n,
            std::memory_order_relaxed);  // relaxed: statistic, single writer
  }
};

// What the fiber that just switched away asks its worker to do next.
// yield_behind: to the inject queue's tail (see coop_yield()).
enum class after_switch : std::uint8_t { none, yield, yield_behind, park, exit };

class worker {
 public:
  worker(scheduler& s, unsigned index,
         std::vector<std::vector<unsigned>> steal_groups);
  worker(const worker&) = delete;
  worker& operator=(const worker&) = delete;

  // The worker thread's body; counts `ready` down once its driver exists.
  void run(const alloc::topology* pin_to, const driver_factory& make_driver,
           std::latch& ready);
  void push_inbox(fiber* f) noexcept;
  // A fiber running here made f runnable: into the LIFO slot (if hot) or the
  // local queue. `share`: wake an idle worker even if only the LIFO slot
  // changed (spawn does, as Go's newproc: a spawner that goes on computing
  // must not hold its child; see steal_lifo()).
  void schedule_local(fiber* f, bool hot, bool share = false) noexcept;
  // The running fiber gives up the worker; `what` is done after the switch
  // by whichever context runs next here (see *Hand-off* in worker.cc).
  // Returns when the fiber is resumed, possibly on another worker.
  void switch_away(after_switch what, const park_request* req);
  // Runs the step a fiber left for after its switch; every context that
  // resumes on this worker calls it first.
  void finish_switch();
  // The running fiber yields (see *Direct yield* in worker.cc): continues
  // in place, switches to the local queue's head, or goes through the loop.
  // Returns when it runs again, possibly on another worker.
  void yield_current(const std::source_location& where);
  void coop_yield();  // spend_budget()'s yield: see worker.cc
  // Fibers another worker could take from here (the LIFO slot unless
  // pinned, the local and displaced queues): any thread, a snapshot.
  bool has_stealable_work() const noexcept {
    std::uintptr_t l = lifo_.load(std::memory_order_relaxed);  // relaxed: a snapshot
    return (l != 0 && !(l & kPinnedTag)) || !queues_empty_approx();
  }
  // The local and displaced queues: any thread, racy snapshots.
  bool queues_empty_approx() const noexcept {
    return local_.empty_approx() && displaced_.empty_approx();
  }
  std::uint32_t queues_size_approx() const noexcept {
    return local_.size_approx() + displaced_.size_approx();
  }
  // Free slots of the local queue: owner only (see sched::wake_budget).
  std::uint32_t local_room() const noexcept { return local_.room(); }
  // Another fiber is runnable here (LIFO slot, local or pinned queue):
  // owner only, a hint.
  bool has_local_work() const noexcept {
    // relaxed: our own slot.
    return lifo_.load(std::memory_order_relaxed) != 0 || pinned_head_ != nullptr ||
           !queues_empty_approx();
  }

  unsigned index() const noexcept { return index_; }
  fiber* current() const noexcept { return current_; }
  driver* io() noexcept { return driver_.get(); }
  timer_heap& timers() noexcept { return timers_; }
  // The coop budget of the running fiber (see spend_budget() in park.h).
  // Owner only. take_budget(): false once kCoopBudget operations are spent.
  // coop_slice_over(): starts a new count; true if the fiber has run for
  // kCoopSlice since its first spent budget (which starts the slice).
  bool take_budget() noexcept { return --coop_left_ != 0; }
  bool coop_slice_over(clock::time_point now) noexcept {
    coop_left_ = kCoopBudget;
    if (coop_since_ == clock::time_point{}) {
      coop_since_ = now;
      return false;
    }
    return now - coop_since_ >= kCoopSlice;
  }
  void refill_budget() noexcept {
    coop_left_ = kCoopBudget;
    coop_since_ = {};
  }
  worker_counters& counters() noexcept { return counters_; }
  const worker_counters& counters() const noexcept { return counters_; }
  std::thread& thread() noexcept { return thread_; }

 private:
  friend class scheduler;
  // The loop and its named steps (worker.cc).
  fiber* find_runnable();
  fiber* next_local();
  fiber* take_inject(std::uint32_t keep_free = 0);
  void poll_driver();
  fiber* steal();
  fiber* wait_for_steal_candidate();
  bool try_spin() noexcept;
  bool worth_stealing(unsigned v, const worker& victim) noexcept;
  void init_steal_state(unsigned workers);
  void stop_spinning() noexcept;
  void sleep();
  bool has_work_hint() const noexcept;
  void run_fiber(fiber* f);
  void after_park(fiber* f, const park_request& req);
  fiber* take_handoff(const fiber* from, bool exiting) noexcept;
  bool periodic_duties_idle() noexcept;
  bool lifo_allowed() const noexcept;
  void count_lifo_run(const fiber* to, bool from_exiting) noexcept;
  bool others_waiting() const noexcept;
  // The local queue's head, and the LIFO slot's exchange, without a locked
  // instruction when the worker is alone_ (see there).
  fiber* pop_local() noexcept { return alone_ ? local_.pop_unshared() : local_.pop(); }
  fiber* pop_displaced() noexcept {
    return alone_ ? displaced_.pop_unshared() : displaced_.pop();
  }
  // The next fiber from the local or the displaced queue. A worker that
  // displaced nothing since its last look reads only the local queue, as
  // before there was a displaced queue: looking at two more cache lines
  // on every yield between two fibers cost ~2 ns, a tenth of it.
  fiber* pop_queued() noexcept {
    if (!displaced_used_) [[likely]]
      return pop_local();
    return pop_queued_both();
  }
  fiber* pop_queued_both() noexcept;
  void move_displaced_to_local(std::uint32_t most) noexcept;
  void requeue_own_displaced() noexcept;
  std::uintptr_t exchange_lifo(std::uintptr_t v) noexcept;
  void switch_to(after_switch what, const park_request* req, fiber* to);
  bool handoff_stack_ok(const fiber* from, const fiber* to) const noexcept;
  fiber* take_lifo() noexcept;
  fiber* steal_lifo(unsigned v, worker& victim) noexcept;
  fiber* steal_timers(worker& victim) noexcept;
  bool has_overdue_timers(clock::time_point now) const noexcept;  // any thread
  static void finish_after_park(fiber* f, std::uint64_t gen) noexcept;
  // Into the local queue (a pinned fiber: the pinned queue).
  void push_local(fiber* f) noexcept;
  // The same, inline: for a yield's requeue (finish_switch()), where the
  // call was ~9% of a yield's instructions (callgrind).
  void push_local_inline(fiber* f) noexcept {
    if (f->home_) [[unlikely]] {  // pinned: never in the stealable queue
      push_pinned(f);
      return;
    }
    local_.push(f, [this](fiber** batch, std::uint32_t n) { overflow(batch, n); });
  }
  void push_pinned(fiber* f) noexcept;
  void push_displaced(fiber* f) noexcept;
  void overflow(fiber** batch, std::uint32_t n) noexcept;
  void drain_inbox() noexcept;
  void fire_timers();

  scheduler& sched_;
  const unsigned index_;
  const std::vector<std::vector<unsigned>> steal_groups_;

  run_queue<fiber, 256> local_;
  // The displaced queue (see *Depth first* in worker.cc): fibers the LIFO
  // slot gave up for newer ones, pushed at the head only (push_front()),
  // so the owner and thieves take the newest first. A run_queue like
  // local_, with the same rules for who calls what.
  static constexpr std::uint32_t kDisplacedCapacity = 256;
  run_queue<fiber, kDisplacedCapacity> displaced_;
  // Owner only: alternates pop_queued() between the two queues.
  bool local_first_ = false;
  // Owner only: set by a push into displaced_, cleared when a pop finds it
  // empty (only the owner pushes; thieves only take). Clear: empty.
  bool displaced_used_ = false;
  // Owner only: the tick since which displaced_ has not drained, at least
  // (see move_displaced_to_local()).
  std::uint32_t displaced_since_ = 0;
  // Owner only: fibers the running fiber put into displaced_ since it
  // started running here (see requeue_own_displaced()).
  std::uint32_t displaced_by_current_ = 0;
  // Owner only: scratch for move_displaced_to_local(), which may run on a
  // fiber's stack (a yield), too small for 256 pointers.
  fiber* displaced_scratch_[kDisplacedCapacity];
  // The scheduler has this one worker: nobody ever steals from local_,
  // displaced_ or the LIFO slot, so the owner takes from them with plain
  // loads and stores (run_queue::pop_unshared()). Set before the worker
  // starts, never changed.
  bool alone_ = false;
  // The LIFO slot: a fiber* with kPinnedTag set for a pinned fiber, so a
  // thief can skip it without touching the fiber; 0 when empty. The owner
  // sets it with a release store or exchange (release: a thief's acquire
  // CAS sees the fiber's fields); see steal_lifo() for the thief.
  static constexpr std::uintptr_t kPinnedTag = 1;
  std::atomic<std::uintptr_t> lifo_{0};
  // *Asymmetric LIFO takes* (see exchange_lifo() and steal_lifo()): with
  // asym_lifo_ the owner takes from the slot with a load and a store inside
  // lifo_taking_ = 1 ... 0, and a thief announces itself in lifo_thieves_
  // and runs asym_fence::heavy() before it looks at lifo_taking_ and CASes.
  // lifo_taking_: written by the owner only. lifo_thieves_: thieves add
  // and remove themselves; the owner only reads it. asym_lifo_: set before
  // the workers start, never changed (thieves read the victim's).
  std::atomic<std::uint32_t> lifo_taking_{0};
  std::atomic<std::uint32_t> lifo_thieves_{0};
  bool asym_lifo_ = false;
  // LIFO runs in a row (see *Depth first* in worker.cc): by fibers that
  // ran before (a ping-pong pair), and first runs or runs after an exit.
  unsigned lifo_streak_ = 0, lifo_chain_ = 0;
  fiber* pinned_head_ = nullptr;  // owner-only FIFO of pinned fibers
  fiber* pinned_tail_ = nullptr;

  spinlock inbox_lock_;
  fiber* inbox_head_ = nullptr;  // guarded by inbox_lock_
  fiber* inbox_tail_ = nullptr;  // guarded by inbox_lock_
  // seq_cst: StoreLoad with sleeping_ (see *Sleeping and waking*).
  std::atomic<bool> inbox_nonempty_{false};
  std::atomic<bool> sleeping_{false};
  // Set by the monitor on an awake worker whose loop has not polled its
  // driver for a whole period (loop_polls_ did not move); cleared by the
  // owner in find_runnable(). While set, yields and hand-offs go through
  // the loop, which then does its periodic duties at once: the inject
  // queue, the driver (flush and poll) and due timers. They do none of
  // these themselves, and fibers that compute for milliseconds between
  // switches would otherwise leave them to the periodic tick, 61 switches
  // away (see *Direct yield* in worker.cc): timers, I/O completions and
  // fibers woken by plain threads would wait over a second. (Go's sysmon
  // polls the network when nobody has for 10 ms.) A worker whose periodic
  // tick comes sooner than that is left alone. Relaxed on both sides: a
  // hint that orders nothing; each duty orders its own data.
  std::atomic<bool> duties_due_{false};
  // The loop's non-blocking polls (poll_driver()): written by the owner,
  // read by the monitor (relaxed: a snapshot).
  std::atomic<std::uint64_t> loop_polls_{0};
  // Owner only: the local queue's head_stamp() after the last non-blocking
  // poll; see find_runnable().
  std::uint64_t head_at_poll_ = 0;

  timer_heap timers_;
  std::unique_ptr<driver> driver_;
  exec_context sched_ctx_;
  fiber* current_ = nullptr;
  unsigned coop_left_ = kCoopBudget;  // owner only: see take_budget()
  clock::time_point coop_since_{};     // owner only: see coop_slice_over()
  struct pending_switch {
    after_switch what = after_switch::none;
    fiber* from = nullptr;
    const park_request* req = nullptr;  // on from's stack; park only
  };
  pending_switch pending_;

  std::uint32_t tick_ = 0;
  std::uint64_t rng_;
  // Per victim, what our previous looks saw: the queue position of a lone
  // queued fiber and since when (worth_stealing()); the fiber in its LIFO
  // slot, the victim's fibers_run count then, and since when
  // (steal_lifo()).
  struct lone_look {
    std::uint64_t pos = ~std::uint64_t{0};
    clock::time_point since{};
    std::uintptr_t lifo = 0;
    std::uint64_t runs = 0;
    clock::time_point lifo_since{};
  };
  std::vector<lone_look> last_seen_;
  // While a candidate above is being timed, a spinning worker waits for
  // its delay to be up, and probes once more, before it sleeps (bounded;
  // see wait_for_steal_candidate()). {}: no candidate seen since the last
  // such probe.
  clock::time_point candidate_until_{};
  bool spinning_ = false;
  bool in_idle_ = false;  // guarded by scheduler::idle_mu_
  // Published for the deadlock detector before registering idle; read by
  // the last worker to go idle under idle_mu_ (which orders them). (Its
  // timers are read live instead: a fiber elsewhere may cancel one while
  // this worker sleeps, which wakes nobody.)
  std::size_t io_when_idle_ = 0;
  // scheduler::add_fiber_outside_ref()'s count on this worker (negative
  // when a fiber that took its reference elsewhere dropped it here). The
  // owner writes it (relaxed: a single writer) before it next registers
  // idle under idle_mu_; the detector reads it under idle_mu_.
  std::atomic<int> outside_refs_{0};

  worker_counters counters_;
  // The id of the fiber running here, 0 while in the loop: written by the
  // owner at each switch, read by the monitor (relaxed: a snapshot).
  std::atomic<std::uint64_t> running_id_{0};
  // The monitor's notes on this worker (monitor thread only).
  std::uint64_t mon_runs_ = ~std::uint64_t{0}, mon_id_ = 0, mon_warned_id_ = 0;
  std::uint64_t mon_polls_ = ~std::uint64_t{0};
  unsigned mon_periods_ = 0;
  std::thread thread_;
};

}  // namespace weft::sched
