// sched/scheduler.h
//
// The M:N scheduler: workers (one OS thread per processing unit, pinned),
// their run queues, the global inject queue, idle workers and the fiber
// registry. The loop itself is in sched/worker.cc; parking in sched/park.cc.
//
// Invariants:
//   - At most one scheduler exists at a time (instance()).
//   - registry_ holds every fiber from create() until it exits; after
//     unwind_all() the scheduler stops when it becomes empty.
//   - nspinning_ counts workers looking for work by stealing; at most half
//     of the non-idle workers spin (see *Spinning* in worker.cc).
//   - A worker is in idle_ iff it has registered as sleeping and no one has
//     taken it out; idle_mu_ guards idle_ and each worker's in_idle_.
//
// Who calls what:
//   create(), start_fiber()     any thread (spawn)
//   submit()                    any thread: a runnable fiber to the inject queue
//   wake_idle_worker()          any thread, after publishing work
//   unwind_all(), run()         the runtime (runtime/)
#pragma once

#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string_view>
#include <thread>
#include <vector>

#include "alloc/block_cache.h"
#include "alloc/stack_pool.h"
#include "alloc/topology.h"
#include "sched/driver.h"
#include "sched/fiber.h"
#include "sched/inject_queue.h"
#include "sched/registry.h"
#include "alloc/spinlock.h"

namespace weft::sched {

class worker;

struct scheduler_options {
  unsigned workers = 0;     // 0: one per processing unit of the cpuset
  bool pin = true;          // hard affinity, one worker per PU
  alloc::topology topology = alloc::topology::discover();
  driver_factory make_driver;  // default: make_futex_driver()
  std::size_t default_stack = alloc::stack_pool::kDefaultStackSize;
  bool deadlock_detection = true;
  // The monitor (see monitor() in scheduler.cc) looks at every worker this
  // often; a fiber that runs this long without parking or yielding is
  // reported once on stderr (0: never).
  std::chrono::milliseconds monitor_period{10};
  std::chrono::milliseconds hog_warning{500};
};

struct fiber_attrs {
  std::string_view name;
  std::size_t stack_size = 0;  // 0: the scheduler's default
  bool pinned = false;         // never leaves the worker it starts on
  int worker = -1;             // start on worker (worker % count); -1: the spawner's
};

// Sums of the per-worker counters; see worker_counters in worker.h.
struct scheduler_stats {
  std::vector<std::uint64_t> fibers_run;  // per worker
  std::vector<std::uint64_t> steals;      // fibers taken from others, per worker
  std::vector<std::uint64_t> overflowed;  // fibers moved to the inject queue, per worker
  std::uint64_t spawned = 0, parks = 0, yields = 0, sleeps = 0, wakeups = 0,
                lifo_runs = 0, inject_pops = 0, timer_steals = 0;
  std::uint64_t live_fibers = 0;
  alloc::stack_pool_stats stacks;
  std::string driver;
};

// The stack pool a scheduler with these options uses: one cache per worker,
// each on the NUMA node of its worker's processing unit (scheduler.cc).
alloc::stack_pool_options stack_pool_options_for(const scheduler_options& o);
// The kernel's NUMA node of each worker's PU, by worker index, on machines
// with more than one node; empty otherwise (nothing to prefer).
std::vector<int> worker_node_os(const scheduler_options& o);

// The CPUs of the thread that last started a runtime, taken before any
// worker was pinned (the process's, unless the program restricted that
// thread). A thread started from a pinned worker inherits that worker's
// one CPU; threads the runtime starts for other work (the blocking pool)
// set this set instead, and so may weft::unpin_this_thread(). False if no
// runtime has started yet. Any thread.
bool unpinned_cpus(cpu_set_t* out) noexcept;

// A plain thread that may wake fibers (it blocks on weft, or holds a lock
// fibers may park on) counts as an outside reference of the running
// runtime, once, until it exits or calls forget_plain_thread(): the
// deadlock detector must not report fibers such a thread may still wake.
// By run id, not address: a later run may reuse the address. Plain
// threads only (a worker's fibers never call these).
void note_plain_thread() noexcept;
// Drops the calling thread's reference now, if it holds one: for threads
// that outlive what made them a waker (the blocking pool, between jobs).
void forget_plain_thread() noexcept;

class scheduler {
 public:
  explicit scheduler(scheduler_options opts);
  ~scheduler();  // joins the workers; every fiber must have exited
  scheduler(const scheduler&) = delete;
  scheduler& operator=(const scheduler&) = delete;

  static scheduler* instance() noexcept;

  // A plain (non-worker) thread brackets each use of the running scheduler
  // with a plain_use: ~scheduler waits until no plain thread is inside one,
  // so a thread that just made a fiber runnable (the fiber may run, exit
  // and let the runtime shut down at once) never touches a freed scheduler.
  // Keep the bracket short; get() is null when no runtime is running, or
  // one is still starting (start() has not returned).
  class plain_use {
   public:
    plain_use() noexcept;
    ~plain_use();
    plain_use(const plain_use&) = delete;
    plain_use& operator=(const plain_use&) = delete;
    scheduler* get() const noexcept { return s_; }

   private:
    scheduler* s_;
  };
  // Unique per scheduler ever created in this process (an address may be
  // reused by a later weft::run; this is not).
  std::uint64_t run_id() const noexcept { return run_id_; }

  // Starts the worker threads. run_main is submitted first.
  void start();
  // Blocks the calling (non-worker) thread until stop() was called and all
  // workers have exited.
  void join();

  // Spawning. create() allocates the control block with `callable_size`
  // bytes after it; the caller constructs the callable at f->callable_,
  // sets body_ and discard_, then start_fiber(). The stack comes later:
  // bind_stack(), by the worker about to run the fiber for the first time.
  // Null for a plain thread once main has returned (the runtime is
  // shutting down).
  fiber* create(const fiber_attrs& a, std::size_t callable_size,
                std::size_t callable_align);
  void start_fiber(fiber* f);
  // Undoes create() for a fiber never started (its callable's construction
  // threw): unregisters and frees it.
  void abandon(fiber* f) noexcept;
  // Gives a fiber that has never run its stack, from `cache`; called only
  // by the worker (cache) that is about to switch to it.
  void bind_stack(fiber* f, unsigned cache);
  // A stack without a guard page: aborts with the overflow report if its
  // canary was overwritten. Called right after the fiber switched away
  // (worker::finish_switch()).
  void check_canary(const fiber* f) const noexcept {
    if (f->canary_ && !alloc::stack_pool::canary_intact(f->stack_))
      alloc::report_stack_overflow(f->stack_);
  }

  // Makes a runnable fiber visible to every worker.
  void submit(fiber* f) noexcept;
  // Wakes one idle worker if none is spinning (see *Spinning* in worker.cc).
  // `fenced`: the caller published work that only a woken worker would
  // find (the inject queue); a worker publishing into its own queue needs
  // no fence, since it will run that work itself if no one else does.
  void wake_idle_worker(bool fenced = false) noexcept;

  // After the main fiber returned: every other fiber is asked to unwind.
  void unwind_all();
  bool unwinding() const noexcept {
    return unwinding_.load(std::memory_order_acquire);  // pairs with unwind_all()
  }
  // Asks the workers to exit once no fiber is alive.
  void request_exit() noexcept;

  // Plain threads that may wake fibers (channel users, the blocking pool)
  // hold a reference while they can; a fiber parked for something outside
  // the runtime that no driver counts in pending() holds one through
  // add_fiber_outside_ref() below. The deadlock detector never fires while
  // any is held.
  void add_outside_ref(int delta) noexcept {
    outside_refs_.fetch_add(delta, std::memory_order_acq_rel);  // read under idle_mu_ by the detector
  }
  // The same from a fiber, around one park (a blocking-pool call, a
  // multishot's delivery: io/blocking.cc, io/accept.cc, io/recv.cc),
  // counted on the calling worker, which alone writes its count: a wait
  // touches no line shared between workers. The matching -1 may land on
  // another worker (the fiber moved); the detector sums the counts.
  static void add_fiber_outside_ref(int delta) noexcept;

  scheduler_stats stats() const;
  void dump(int fd) const;  // every fiber: id, name, state, park site
  unsigned worker_count() const noexcept { return unsigned(workers_.size()); }
  worker& worker_at(unsigned i) noexcept { return *workers_[i]; }
  std::size_t default_stack() const noexcept { return opts_.default_stack; }
  std::uint64_t live() const noexcept { return registry_.live_approx(); }
  // fiber_main(): f's registry slot, wanted at its exit (see there).
  void prefetch_exit(const fiber* f) const noexcept { registry_.prefetch_slot(f); }

 private:
  friend class worker;
  static unsigned workers_wanted(const scheduler_options& o);
  void exited(fiber* f, unsigned cache) noexcept;  // the last step of a fiber
  void free_fiber(fiber* f, unsigned cache) noexcept;
  worker* pop_idle() noexcept;
  bool report_deadlock_if_stuck() noexcept;  // under idle_mu_
  void monitor();
  void wake_dozing_monitor() noexcept;  // any worker
  void check_worker(worker& w);
  void report_hog(std::uint64_t id, std::chrono::milliseconds ran, unsigned worker);

  scheduler_options opts_;
  alloc::stack_pool stacks_;
  alloc::block_cache blocks_;  // control blocks; caches: one per worker, then the plain threads
  std::vector<std::unique_ptr<worker>> workers_;
  inject_queue inject_;

  std::mutex idle_mu_;
  std::vector<worker*> idle_;             // guarded by idle_mu_
  std::atomic<unsigned> nidle_{0};        // see *Spinning* in worker.cc
  std::atomic<unsigned> nspinning_{0};    // see *Spinning* in worker.cc

  std::atomic<int> outside_refs_{0};
  std::atomic<bool> unwinding_{false};
  std::atomic<bool> exit_{false};

  // The monitor thread: sleeps on monitor_cv_ for monitor_period at a time
  // (ten while every worker is idle: it "dozes"); request_exit() wakes it
  // to leave, and a worker waking from idle wakes a dozing monitor
  // (wake_dozing_monitor()).
  std::thread monitor_;
  std::mutex monitor_mu_;
  std::condition_variable monitor_cv_;
  // Set by the monitor under monitor_mu_ before a long wait, cleared by
  // whoever wakes it (see monitor() and wake_dozing_monitor() for the
  // orders).
  std::atomic<bool> monitor_dozing_{false};

  fiber_registry registry_;  // shards: one per worker, then the plain threads
  const std::uint64_t run_id_;
  // Set by start() once every worker made its driver; until then a
  // plain_use finds no runtime (the workers are still writing what plain
  // threads read: their drivers).
  std::atomic<bool> started_{false};
};

}  // namespace weft::sched
