// io/blocking.cc — the blocking pool behind io::blocking() (io/blocking.h).
//
// Invariants:
//   - mu_ guards queue_, threads_ and idle_. A pool thread runs a job
//     outside the lock.
//   - threads_ <= max_threads_; a job queued while no thread is idle starts
//     a new thread if the cap allows, otherwise it waits for a free one.
//   - The pool is never destroyed (its threads are detached and may still
//     be waiting when main returns).
//   - After fork(), the child has none of the pool's threads: the child's
//     pool starts empty (see *Forking*).
//   - The fiber returns only after the pool thread set job.finished, its
//     last touch of the job and of the scheduler (the wake): so a runtime
//     that ends right after the call never has a pool thread inside it.
//   - watching_ says the stall watchdog thread exists; told_job_,
//     told_queued_at_ and next_report_ are what it reported last (see
//     *Stalls*); all guarded by mu_.
//   - While a job is queued or running, its fiber holds an outside
//     reference on the scheduler, so the deadlock detector does not take
//     the parked fiber for a stuck one. The fiber drops it after it woke:
//     between the pool thread's wake and then, the fiber is runnable or
//     queued, which the detector also sees.
#include "io/blocking.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

#include "alloc/env.h"
#include "sched/park.h"
#include "sched/scheduler.h"

namespace weft::io::detail {
namespace {

// How long a pool thread waits for work before it exits (the pool shrinks).
constexpr auto kIdleExit = std::chrono::seconds(10);
// How long a queued call waits for a thread before *Stalls* reports it,
// and how long after a report the next one may come.
constexpr auto kStallReport = std::chrono::seconds(1);
constexpr auto kStallRepeat = std::chrono::seconds(60);
constexpr unsigned kDefaultMaxThreads = 64;

unsigned max_threads_from_env() {
  const char* e = std::getenv("WEFT_BLOCKING_THREADS");
  if (!e || !*e) return kDefaultMaxThreads;
  unsigned long long n = 0;
  // As WEFT_WORKERS: a value that is not a whole number in range is said
  // to be ignored, not quietly read as another (strtoul takes "8x" as 8).
  if (!alloc::parse_decimal(e, 4096, n) || n < 1) {
    std::fprintf(stderr, "weft: ignoring WEFT_BLOCKING_THREADS=%s (want 1..4096); using %u\n", e,
                 kDefaultMaxThreads);
    return kDefaultMaxThreads;
  }
  return static_cast<unsigned>(n);
}

class pool {
 public:
  // Queues j; false if the pool has no thread and cannot start one (then j
  // is not queued and the caller runs it itself).
  bool submit(blocking_job* j, std::source_location where) {
    std::lock_guard g(mu_);
    bool started = false;  // a thread for j
    if (queued_ + 1 > idle_ && threads_ < max_threads_) {
      ++threads_;
      try {
        std::thread([this] { loop(); }).detach();
        started = true;
      } catch (const std::exception& e) {  // EAGAIN (RLIMIT_NPROC, pids.max, memory), bad_alloc
        --threads_;
        if (!told_.exchange(true, std::memory_order_relaxed))  // relaxed: dedupes a log line
          std::fprintf(stderr,
                       "weft: blocking pool: cannot start a thread (%s); %s\n",
                       e.what(),
                       threads_ ? "calls queue for the pool's running threads"
                                : "calls run on the calling worker instead");
        if (threads_ == 0) return false;
      }
    }
    j->next = nullptr;
    j->queued_at = clock::now();
    j->where = where;
    if (tail_) tail_->next = j;
    else head_ = j;
    tail_ = j;
    ++queued_;
    cv_.notify_one();
    // Every thread busy and none started (the cap, or a start that
    // failed): j waits for one.
    if (!started && queued_ > idle_) watch_locked();
    return true;
  }

  // *Forking*: fork() copies the counts of the pool's threads into the
  // child, but none of the threads. A child that then called blocking()
  // (or did file I/O under epoll) found "idle" threads that do not exist
  // there, queued its call for them and waited for ever. So the forking
  // thread holds mu_ across the fork (no pool thread is inside it in the
  // copy), and the child starts with no threads and no queue: calls queued
  // in the parent belong to fibers whose workers the child does not have.
  void before_fork() noexcept { mu_.lock(); }
  void after_fork_in_parent() noexcept { mu_.unlock(); }
  void after_fork_in_child() noexcept {
    head_ = tail_ = nullptr;
    queued_ = 0;
    threads_ = 0;
    idle_ = 0;
    watching_ = false;
    told_job_ = nullptr;
    next_report_ = {};
    // SAFETY: this thread is the child's only one. cv_ may record waiters
    // (the parent's idle threads) that will never wake: a fresh one in its
    // place, without the destructor, which would wait for them. So for
    // watch_cv_ and the watchdog.
    new (&cv_) std::condition_variable;
    new (&watch_cv_) std::condition_variable;
    mu_.unlock();  // taken by before_fork() on this thread
  }

 private:
  // *Stalls*: a bounded pool whose threads all run calls that wait for the
  // results of calls queued behind them (a lookup that waits for another
  // blocking() call's answer, a pool of 64 database calls each waiting for
  // a 65th's lock) never finishes them, and nothing else would say so: the
  // fibers waiting hold outside references, which keep the deadlock report
  // quiet. So once the oldest queued call has waited kStallReport for a
  // thread, a watchdog thread says where it was made: each such call once,
  // and at most once per kStallRepeat (a pool merely saturated by slow
  // calls says so now and then, not at every call). Started the first time
  // a call has to wait; it sleeps on watch_cv_ while no call is queued, and
  // looks again at least every kStallReport while one is.
  void watch_locked() {
    if (watching_) {
      watch_cv_.notify_one();
      return;
    }
    try {
      std::thread([this] { watch(); }).detach();
      watching_ = true;
    } catch (const std::exception&) {
      // No thread for the watchdog: calls still run; only the report is lost.
    }
  }

  void watch() {
    std::unique_lock lk(mu_);
    for (;;) {
      if (!head_) {
        watch_cv_.wait(lk);
        continue;
      }
      const clock::time_point now = clock::now();
      const clock::duration waited = now - head_->queued_at;
      const bool told = head_ == told_job_ && head_->queued_at == told_queued_at_;
      if (waited < kStallReport) {
        watch_cv_.wait_for(lk, kStallReport - waited);
        continue;
      }
      if (told || now < next_report_) {
        watch_cv_.wait_for(lk, told ? clock::duration(kStallReport) : next_report_ - now);
        continue;
      }
      told_job_ = head_;
      told_queued_at_ = head_->queued_at;
      next_report_ = now + kStallRepeat;
      const std::source_location where = head_->where;
      const std::size_t queued = queued_;
      const unsigned threads = threads_;
      lk.unlock();
      std::fprintf(stderr,
                   "weft: blocking pool: a call made at %s:%u has waited %.1f s for a thread; "
                   "all %u are busy and %zu calls wait. Calls that wait for each other's "
                   "results never finish in a bounded pool; if these do not, raise "
                   "WEFT_BLOCKING_THREADS (now %u) or make fewer calls at once.\n",
                   where.file_name(), static_cast<unsigned>(where.line()),
                   std::chrono::duration<double>(waited).count(), threads, queued, max_threads_);
      lk.lock();
    }
  }

  void loop() {
    // Started by a worker, this thread inherited that worker's one CPU:
    // calls from fibers all over the machine would queue behind each other
    // there, and beside the worker. It runs where the program's own
    // threads may (sched::unpinned_cpus()); advice, so a refusal is ignored.
    if (cpu_set_t cpus; sched::unpinned_cpus(&cpus))
      (void)pthread_setaffinity_np(pthread_self(), sizeof cpus, &cpus);
    std::unique_lock lk(mu_);
    for (;;) {
      ++idle_;
      bool got = cv_.wait_for(lk, kIdleExit, [this] { return head_ != nullptr; });
      --idle_;
      if (!got) {
        --threads_;
        return;
      }
      blocking_job* j = head_;
      head_ = j->next;
      if (!head_) tail_ = nullptr;
      --queued_;
      lk.unlock();
      // A shared job whose fiber already let go (it stopped waiting while
      // the job was queued) is not run: its answer would go to no one, and
      // a lookup that takes seconds would hold this thread from the calls
      // queued behind it (as Go gives up a lookup whose context ended
      // while it waited for a thread). acquire: pairs with the fiber's
      // acq_rel decrement in let_go(); a fiber that lets go just after
      // this load only costs a run nobody reads.
      const bool abandoned = j->shared && static_cast<shared_job*>(j)->refs.load(
                                              std::memory_order_acquire) == 1;
      if (!abandoned) j->run(j);
      // A job that took a weft lock made this thread a possible waker
      // (sched::note_plain_thread()); idle in the pool it wakes no one, and
      // holding on would keep the deadlock detector quiet until the thread
      // exits (kIdleExit). The fiber in blocking() holds its own reference
      // until the wake below.
      sched::forget_plain_thread();
      const bool shared = j->shared;  // read while the job is surely there
      j->done.complete(0);  // wakes the fiber: sched::ready() touches the scheduler
      // SAFETY: the fiber (and with it the runtime) cannot finish before
      // this store, so the wake above never touches a destroyed scheduler;
      // after it the job may be gone, unless it is shared, which we still
      // hold. A shared job's fiber that stopped waiting took its token back
      // first (park_until_done()), so the wake touched no fiber at all.
      j->finished.store(true, std::memory_order_release);  // pairs with run_on_pool()
      if (shared) let_go(static_cast<shared_job*>(j));
      lk.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  blocking_job* head_ = nullptr;  // guarded by mu_
  blocking_job* tail_ = nullptr;  // guarded by mu_
  std::size_t queued_ = 0;        // guarded by mu_
  unsigned threads_ = 0;          // guarded by mu_
  unsigned idle_ = 0;             // guarded by mu_
  const unsigned max_threads_ = max_threads_from_env();
  std::atomic<bool> told_{false};  // the thread-start failure was reported
  std::condition_variable watch_cv_;  // the watchdog's; see *Stalls*
  bool watching_ = false;                      // guarded by mu_
  const blocking_job* told_job_ = nullptr;     // guarded by mu_; with told_queued_at_,
  clock::time_point told_queued_at_{};         // the job last reported (its address alone
                                               // may be a later job's on the same stack)
  clock::time_point next_report_{};            // guarded by mu_
};

// The pool the fork handlers act on; set once, before they are registered
// (pthread_atfork() orders that registration before any fork that runs them).
pool* g_pool = nullptr;

pool& the_pool() {
  static pool* p = [] {
    g_pool = new pool;  // never destroyed: see the invariants
    (void)pthread_atfork([] { g_pool->before_fork(); }, [] { g_pool->after_fork_in_parent(); },
                         [] { g_pool->after_fork_in_child(); });  // ENOMEM: no fork hooks
    return g_pool;
  }();
  return *p;
}

}  // namespace

void run_on_pool(blocking_job& job, std::source_location where) {
  // Not on a fiber (a pool thread, where fn itself called blocking(), or
  // a plain thread): this thread may block, so the call runs right here.
  // Queuing it and parking is impossible off a fiber, and a pool thread
  // that waited for another pool thread could deadlock a full pool.
  if (!sched::current_fiber()) {
    job.run(&job);
    return;
  }
  // SAFETY: job lives on this fiber's stack; the pool holds it until
  // complete(), and this fiber does not return before that.
  if (!the_pool().submit(&job, where)) {
    // No pool thread at all: better a blocked worker than a lost call.
    job.run(&job);
    return;
  }
  sched::scheduler::add_fiber_outside_ref(+1);
  if (!job.done.park_until_done(/*cancellable=*/false, clock::time_point::max(), "blocking",
                                where)) {
    // Only the unwinder wakes a non-cancellable park early: parks now return
    // at once, so wait without parking (see *Waiting while unwinding* in
    // io/perform.cc) — the call runs on the caller's data and cannot be
    // abandoned. Sleeping, not spinning, once it takes long, and saying
    // once what the shutdown waits for (a call that never returns, such as
    // an open of a FIFO nobody opens, keeps weft::run from returning).
    auto t0 = clock::now();
    bool told = false;
    for (int i = 0; !job.done.is_done(); ++i) {
      if (i < 1000) {
        sched_yield();
        continue;
      }
      ::usleep(1000);
      if (!told && clock::now() - t0 > std::chrono::seconds(1)) {
        told = true;
        std::fprintf(stderr,
                     "weft: shutdown waits for a blocking call (weft::blocking, or file I/O under "
                     "epoll) made at %s:%u\n",
                     where.file_name(), static_cast<unsigned>(where.line()));
      }
    }
  }
  // The pool thread is at most a few instructions from its last touch.
  while (!job.finished.load(std::memory_order_acquire)) sched_yield();  // pairs with loop()
  sched::scheduler::add_fiber_outside_ref(-1);
}

void let_go(shared_job* j) noexcept {
  // acq_rel: our touches of the job happen before the other side's delete.
  if (j->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) j->destroy(j);
}

std::error_code wait_on_pool(shared_job& job, clock::time_point deadline,
                             std::source_location where) {
  job.shared = true;
  if (clock::now() >= deadline) {  // already past: not tried, as connect() does
    let_go(&job);                  // the pool's reference: it never had the job
    return std::make_error_code(std::errc::timed_out);
  }
  // Off a fiber, or no pool thread at all: as in run_on_pool().
  if (!sched::current_fiber() || !the_pool().submit(&job, where)) {
    job.run(&job);
    let_go(&job);
    return {};
  }
  // The pool may wake us, as in run_on_pool(): not a deadlock meanwhile.
  sched::scheduler::add_fiber_outside_ref(+1);
  sched::wake_reason why = sched::wake_reason::notified;
  const bool done =
      job.done.park_until_done(/*cancellable=*/true, deadline, "blocking", where, &why);
  // Done: the pool thread's wake may still be inside the scheduler until
  // `finished` (run_on_pool()). Not done: our token is back, so the pool
  // thread will wake no one, and it lets go of the job itself.
  if (done)
    while (!job.finished.load(std::memory_order_acquire)) sched_yield();  // pairs with loop()
  sched::scheduler::add_fiber_outside_ref(-1);
  if (done) return {};
  if (why == sched::wake_reason::timed_out) return std::make_error_code(std::errc::timed_out);
  // Cancelled: an unwind point (the rule on sched::park()). Returning
  // operation_canceled to a fiber the runtime unwinds let a loop that
  // retries its lookup spin on, each try queueing another, and weft::run
  // wait for it. The caller's reference is let go as the exception leaves.
  sched::unwind_point();
  return std::make_error_code(std::errc::operation_canceled);
}

}  // namespace weft::io::detail
