// runtime/fiber_test.cc — fibers through the public API: spawn, join,
// yield, sleep, pinning, fiber-local storage, unwinding, and the two fatal
// reports (stack overflow, deadlock).
#include <fcntl.h>
#include <fenv.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/select.h"
#include "runtime/sync.h"
#include "runtime/weft.h"
#include "sched/park.h"
#include "sched/scheduler.h"
#include "sched/worker.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class Fibers : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Fibers);

TEST_P(Fibers, AMillionFibersSpawnAndJoinWithTheRightSum) {
  long sum = -1;
  Run([&] {
    std::vector<join_handle<int>> hs;
    hs.reserve(testing::kMillion);
    for (int i = 0; i < testing::kMillion; ++i) hs.push_back(spawn([i] { return i % 7; }));
    sum = 0;
    for (auto& h : hs) sum += h.join();
  });
  long want = 0;
  for (int i = 0; i < testing::kMillion; ++i) want += i % 7;
  EXPECT_EQ(sum, want);
  if (testing::kMillion == 1'000'000) {
    EXPECT_EQ(sum, 2'999'997);
  }
}

TEST(FiberScale, AMillionFibersParkedAtOnceWithDefaultStacks) {
  // All parked together (each in a sleep with its own timer), with the
  // default 64 KiB stacks, the default vm.max_map_count and no tuning;
  // then all woken by request_stop and joined.
  std::atomic<int> parked{0};
  std::uint64_t guard_pages_ok = 0;
  weft::run([&] {
    std::vector<join_handle<bool>> hs;
    hs.reserve(testing::kMillion);
    for (int i = 0; i < testing::kMillion; ++i)
      hs.push_back(spawn([&] {
        parked.fetch_add(1, std::memory_order_relaxed);
        return !this_fiber::sleep_for(std::chrono::hours(1)).has_value();
      }));
    while (parked.load(std::memory_order_relaxed) < testing::kMillion)
      (void)this_fiber::sleep_for(1ms);
    (void)this_fiber::sleep_for(10ms);  // the last ones finish parking
    runtime_stats st = stats();
    EXPECT_EQ(st.live_fibers, static_cast<std::uint64_t>(testing::kMillion) + 1);
    guard_pages_ok = st.stack_guard == "madvise_guard" || st.stack_guard == "mprotect";
    for (auto& h : hs) h.request_stop();
    int cancelled = 0;
    for (auto& h : hs) cancelled += h.join();
    EXPECT_EQ(cancelled, testing::kMillion);
  });
  EXPECT_TRUE(guard_pages_ok);
}

TEST_P(Fibers, RunReturnsTheMainFibersValue) {
  EXPECT_EQ(Run([] { return 42; }), 42);
}

TEST_P(Fibers, CpuBoundFibersSpawnedFromOneFiberRunOnEveryWorker) {
  std::vector<std::uint64_t> ran;
  Run([&] {
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < 2000; ++i)
      hs.push_back(spawn([] {
        volatile std::uint64_t x = 0;
        for (int k = 0; k < 200'000; ++k) x = x + k;  // ~100 µs of work
      }));
    for (auto& h : hs) h.join();
    for (auto& w : stats().workers) ran.push_back(w.fibers_run);
  });
  ASSERT_EQ(ran.size(), workers());
  for (unsigned i = 0; i < workers(); ++i)
    EXPECT_GT(ran[i], 0u) << "worker " << i << " ran nothing";
}

// Spawn one fiber, then compute without parking: with more than one
// worker the fiber must run meanwhile, on another worker (Go steals its
// runnext the same way), not wait in the spawner's LIFO slot until the
// spawner parks.
TEST_P(Fibers, AFiberSpawnedBeforeALongComputationRunsInParallel) {
  if (workers() < 2) GTEST_SKIP() << "needs a second worker";
  bool ran_in_parallel = false;
  Run([&] {
    std::atomic<bool> ran{false};
    auto h = spawn([&] { ran.store(true, std::memory_order_release); });
    auto until = std::chrono::steady_clock::now() + 5s;
    while (!ran.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) {
      // busy: never parks, never yields
    }
    ran_in_parallel = ran.load(std::memory_order_acquire);
    h.join();
  });
  EXPECT_TRUE(ran_in_parallel) << "the spawned fiber waited for the spawner to park";
}

// weft::run(body) on two workers without the monitor thread (a sched/
// option weft::options does not expose): the monitor wakes an idle worker
// for what a worker stuck in one fiber has queued (scheduler::check_worker),
// which would hide whether the scheduler shares that work itself. body
// gets the scheduler.
template <typename F>
void run_two_workers_without_monitor(F body) {
  sched::scheduler_options so;
  so.workers = 2;
  so.monitor_period = std::chrono::milliseconds(0);
  sched::scheduler s(std::move(so));
  s.start();
  spawn([&] {
    body(s);
    s.unwind_all();
  }, {.name = "main"}).detach();
  s.join();
}

// Worker w has registered as idle and not yet left its sleep: a spawn now
// wakes it (or it was woken already, as a spinner). A snapshot of the
// owner's relaxed counters, read in the order it bumps them (the sleep
// before its wait, the wake-up after it): a sleep seen, then its wake-up
// not, is a sleep under way at the second load (x86 keeps loads in order;
// a test's heuristic, not a synchronization).
bool asleep(sched::scheduler& s, unsigned w) {
  const sched::worker_counters& c = s.worker_at(w).counters();
  std::uint64_t sleeps = c.sleeps.load(std::memory_order_relaxed);
  return sleeps > c.wakeups.load(std::memory_order_relaxed);
}

// AFiberSpawnedBeforeALongComputationRunsInParallel on two workers with
// the monitor left out, many times over: the spawn wakes the idle worker
// (schedule_local's `share`), which must take the child from the
// spawner's LIFO slot once it has waited there kLifoStealDelay
// (steal_lifo()), not go back to sleep first. At 4c45ae6, which stopped
// idle workers spinning, the woken worker probed only until the delay was
// up (wait_for_steal_candidate()): when its last probe fell just before
// that moment, or the thread was descheduled past it, it slept, and the
// child waited for the spawner (here its 2 s bound; with the monitor, two
// monitor periods). Each round starts with the other worker asleep. At
// 4c45ae6 10 runs of 10 failed, after 3 to 554 rounds; at its parent,
// which spun 50 µs past the delay, and since a probe must run after it,
// 10 of 10 passed.
TEST(FibersTwoWorkers, AFiberSpawnedBeforeALongComputationIsTakenWithoutTheMonitor) {
  int late = 0, rounds = 0;
  run_two_workers_without_monitor([&](sched::scheduler& s) {
    auto until_all = std::chrono::steady_clock::now() + 20s;
    for (; rounds < 1000 && late == 0 && std::chrono::steady_clock::now() < until_all; ++rounds) {
      // The other worker asleep: a spawn that finds it still on its way
      // there (not spinning, not yet idle) wakes nobody, and it rechecks
      // the run queues, not the LIFO slot (by design: the monitor covers
      // that race).
      do {
        (void)this_fiber::sleep_for(1ms);
      } while (!asleep(s, 1 - this_fiber::worker_index()) &&
               std::chrono::steady_clock::now() < until_all);
      std::atomic<bool> ran{false};
      auto h = spawn([&] { ran.store(true, std::memory_order_release); });
      auto until = std::chrono::steady_clock::now() + 2s;
      while (!ran.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) {
        // busy: never parks, never yields
      }
      if (!ran.load(std::memory_order_acquire)) ++late;
      h.join();
    }
  });
  EXPECT_EQ(late, 0) << "after " << rounds << " rounds: a spawned fiber waited 2 s for its "
                     << "spawner to park while the other worker slept";
}

// The owner takes from its LIFO slot with a plain load and store, which an
// asymmetric fence makes safe against a thief's CAS (*Asymmetric LIFO
// takes* in sched/worker.cc). Here the two meet: a spawned child waits in
// the spawner's slot while the spawner computes for 60-400 µs, around the
// kLifoStealDelay (100 µs) after which the woken worker steals it, and then
// the spawner takes it back itself (a join's hand-off, or a yield's pass
// through the loop) unless it was stolen. Each child must run exactly once.
// The window where both take it is nanoseconds wide, so a run rarely hits
// it. With a 2 µs pause put between the owner's load and store to widen
// it, and the thief's fence and check taken out, this test failed in each
// of 3 runs (a child run twice, or a crash); with the pause and the fence,
// 4 runs of 4 passed, ~60 % of the children stolen.
TEST(FibersTwoWorkers, AFiberTheOwnerTakesBackAsAThiefStealsItRunsOnce) {
  int rounds = 0, stolen = 0, taken = 0, twice = 0;
  run_two_workers_without_monitor([&](sched::scheduler& s) {
    auto until_all = std::chrono::steady_clock::now() + 10s;
    for (; rounds < 600 && twice == 0 && std::chrono::steady_clock::now() < until_all;
         ++rounds) {
      // The other worker asleep, so the spawn below wakes it (see
      // AFiberSpawnedBeforeALongComputationIsTakenWithoutTheMonitor).
      do {
        (void)this_fiber::sleep_for(200us);
      } while (!asleep(s, 1 - this_fiber::worker_index()) &&
               std::chrono::steady_clock::now() < until_all);
      const unsigned me = this_fiber::worker_index();
      std::atomic<int> runs{0};
      std::atomic<unsigned> ran_on{~0u};
      auto h = spawn([&] {
        ran_on.store(this_fiber::worker_index(), std::memory_order_relaxed);
        runs.fetch_add(1, std::memory_order_acq_rel);
      });
      auto busy = std::chrono::microseconds(60 + (rounds * 37) % 341);
      auto until = std::chrono::steady_clock::now() + busy;
      while (std::chrono::steady_clock::now() < until) {
        // busy: never parks, never yields
      }
      if (rounds % 2) this_fiber::yield();  // the loop's take_lifo()
      h.join();                             // take_handoff(), if still ours
      if (runs.load(std::memory_order_acquire) != 1) ++twice;
      if (ran_on.load(std::memory_order_relaxed) == me) ++taken; else ++stolen;
    }
  });
  EXPECT_EQ(twice, 0) << "a child ran more than once, after " << rounds << " rounds";
  EXPECT_GT(stolen, 0) << "no child was stolen in " << rounds << " rounds: the race was never run";
  EXPECT_GT(taken, 0) << "every child was stolen in " << rounds << " rounds";
}

// A fiber woken into the LIFO slot of a worker whose running fiber then
// computes for seconds, while the other workers sleep: the monitor sees the
// stuck worker and wakes one, which takes the fiber over.
TEST_P(Fibers, AFiberWokenBehindALongComputationIsTakenOver) {
  if (workers() < 2) GTEST_SKIP() << "needs a second worker";
  bool ran_in_parallel = false;
  Run([&] {
    weft::channel<int> ch(0);
    std::atomic<bool> ran{false};
    auto b = spawn([&] {
      (void)ch.recv();
      ran.store(true, std::memory_order_release);
    }, {.worker = 0});
    auto h = spawn([&] {
      (void)this_fiber::sleep_for(20ms);  // long enough for idle workers to sleep
      (void)ch.send(1);                   // b: into this worker's LIFO slot
      auto until = std::chrono::steady_clock::now() + 5s;
      while (!ran.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) {
      }
      ran_in_parallel = ran.load(std::memory_order_acquire);
    }, {.worker = 0});
    h.join();
    b.join();
  });
  EXPECT_TRUE(ran_in_parallel) << "the woken fiber waited for its waker to park";
}

// A fiber sleeping on a worker whose next fiber then computes for seconds:
// the sleep's timer is in that worker's heap, which the worker does not
// look at while it computes. Another worker fires it (steal_timers), so the
// sleeper wakes about on time instead of when the computation ends.
TEST_P(Fibers, ASleeperBehindALongComputationWakesOnTime) {
  if (workers() < 2) GTEST_SKIP() << "needs a second worker";
  std::chrono::steady_clock::duration slept{};
  unsigned slept_on = ~0u, hogged = ~0u;
  std::uint64_t timer_steals = 0;
  Run([&] {
    auto sleeper = spawn([&] {
      std::atomic<bool> woke{false};
      slept_on = this_fiber::worker_index();
      // Pinned here, so it cannot be taken over itself; it runs when the
      // sleeper parks, after the sleep's timer is armed on this worker.
      auto hog = spawn([&] {
        hogged = this_fiber::worker_index();
        auto until = std::chrono::steady_clock::now() + 5s;
        while (!woke.load(std::memory_order_acquire) &&
               std::chrono::steady_clock::now() < until) {
        }
      }, {.pinned = true});
      auto t0 = std::chrono::steady_clock::now();
      (void)this_fiber::sleep_for(30ms);
      slept = std::chrono::steady_clock::now() - t0;
      woke.store(true, std::memory_order_release);
      hog.join();
    });
    sleeper.join();
    timer_steals = weft::stats().timer_steals;
  });
  ASSERT_EQ(slept_on, hogged) << "the scenario needs both on one worker";
  EXPECT_LT(slept, 2s) << "the sleeper waited for the computation to end";
  EXPECT_GE(slept, 30ms);
  EXPECT_GE(timer_steals, 1u);
}

TEST_P(Fibers, PinnedFibersNeverChangeWorker) {
  std::atomic<int> moved{0};
  Run([&] {
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < 64; ++i)
      hs.push_back(spawn([&] {
        // Pinned to the spawner's worker; the child records where it runs.
        auto inner = spawn([&] {
          unsigned home = this_fiber::worker_index();
          for (int k = 0; k < 200; ++k) {
            this_fiber::yield();
            if (k % 50 == 0) (void)this_fiber::sleep_for(100us);
            if (this_fiber::worker_index() != home) moved.fetch_add(1);
          }
        }, {.name = "pinned", .pinned = true});
        inner.join();
      }));
    for (auto& h : hs) h.join();
  });
  EXPECT_EQ(moved.load(), 0);
}

TEST_P(Fibers, AFiberPlacedOnAWorkerStartsThere) {
  Run([&] {
    EXPECT_EQ(worker_count(), workers());
    std::vector<join_handle<unsigned>> hs;
    for (int i = 0; i < 64; ++i)
      hs.push_back(spawn([] { return this_fiber::worker_index(); }, {.worker = i}));
    for (int i = 0; i < 64; ++i) EXPECT_EQ(hs[i].join(), unsigned(i) % workers());
  });
}

// 40 ms apart: with 20, a worker descheduled for longer than that (TSan,
// the whole suite on two CPUs) woke 5 before 4 twice in thirteen sessions;
// the sleepers are on different workers, each with its own timers. The
// deadlines count from one instant taken before the spawns: counted from
// each sleeper's start (sleep_for), they moved with the order the fibers
// started in (the last spawned runs first, from the LIFO slot), and under
// TSan (~3 ms to make each fiber's context) on a loaded machine 3 started
// over 40 ms before 2 and woke first.
TEST_P(Fibers, SleepersWakeInDeadlineOrder) {
  std::vector<int> order;
  std::mutex mu;
  Run([&] {
    std::vector<join_handle<void>> hs;
    const auto base = std::chrono::steady_clock::now();
    for (int i : {5, 1, 4, 2, 3})
      hs.push_back(spawn([&, i] {
        (void)this_fiber::sleep_until(base + i * 40ms);
        std::lock_guard g(mu);
        order.push_back(i);
      }));
    for (auto& h : hs) h.join();
  });
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4, 5}));
}

TEST_P(Fibers, SleepLastsAtLeastItsDuration) {
  Run([] {
    auto t0 = clock::now();
    EXPECT_TRUE(this_fiber::sleep_for(30ms).has_value());
    EXPECT_GE(clock::now() - t0, 30ms);
  });
}

// A duration too long for a time_point (nanoseconds) saturates: the
// sleep lasts "forever", not a wrapped-around deadline in the past.
TEST_P(Fibers, ASleepLongerThanTheClockCanCountDoesNotEndEarly) {
  Run([] {
    constexpr auto kMillennium = std::chrono::hours(24 * 365 * 1000);
    EXPECT_FALSE(deadline(kMillennium).when < clock::now() + std::chrono::hours(24 * 365));
    EXPECT_FALSE(deadline(std::chrono::hours::max()).when < clock::now());
    EXPECT_FALSE(after(kMillennium).when < clock::now() + std::chrono::hours(24 * 365));
    auto h = spawn([] { return this_fiber::sleep_for(kMillennium); });
    auto g = spawn([] { return this_fiber::sleep_for(std::chrono::hours::max()); });
    (void)this_fiber::sleep_for(20ms);
    EXPECT_EQ(stats().live_fibers, 3u) << "a sleeper returned early";
    h.request_stop();
    g.request_stop();
    EXPECT_FALSE(h.join().has_value());  // cancelled, not timed out
    EXPECT_FALSE(g.join().has_value());
  });
}

// A long duration starts from the coarse clock (detail::time_after): the
// deadline is never before now() + d, and at most 1 % after it. Several
// units, and a sleep of 3 s that lasts at least 3 s.
TEST_P(Fibers, ALongDeadlineIsNeverEarlyAndAtMostOnePercentLate) {
  Run([] {
    auto check = [](auto d) {
      const auto lo = clock::now() + d;
      const auto when = deadline(d).when;
      const auto hi = clock::now() + d + std::chrono::nanoseconds(d) / 100;
      EXPECT_GE(when, lo) << "a deadline of " << std::chrono::nanoseconds(d).count() << " ns";
      EXPECT_LE(when, hi) << "a deadline of " << std::chrono::nanoseconds(d).count() << " ns";
    };
    for (int i = 0; i < 200; ++i) {  // across coarse ticks
      check(std::chrono::seconds(3));
      check(std::chrono::milliseconds(30'000));
      check(std::chrono::minutes(10));
      check(std::chrono::nanoseconds(2'600'000'000));
      check(std::chrono::seconds(1));  // below the coarse threshold here: precise
      if (i % 20 == 0) (void)this_fiber::sleep_for(3ms);
    }
    auto t0 = clock::now();
    EXPECT_TRUE(this_fiber::sleep_for(std::chrono::seconds(3)).has_value());
    EXPECT_GE(clock::now() - t0, std::chrono::seconds(3));
  });
}

// A unit coarser than an hour (days, weeks, years: std::chrono's own) is
// not scaled up to compare it with the coarse path's bounds: days::max()
// overflowed there (at -O2 a deadline a day in the past) and so timed out
// at once instead of meaning "never".
TEST_P(Fibers, ADeadlineInDaysOrYearsDoesNotOverflow) {
  Run([] {
    EXPECT_TRUE(deadline(std::chrono::days::max()).is_never());
    EXPECT_TRUE(deadline(std::chrono::weeks::max()).is_never());
    EXPECT_TRUE(deadline(std::chrono::years::max()).is_never());
    // (2^64 + 8) / 24 days: 8 hours once multiplied by 24 in 64 bits.
    EXPECT_TRUE(deadline(std::chrono::days(768614336404564651)).is_never());
    const auto lo = clock::now() + std::chrono::days(2);
    const auto when = deadline(std::chrono::days(2)).when;
    EXPECT_GE(when, lo);
    EXPECT_LE(when, clock::now() + std::chrono::days(2) + std::chrono::seconds(2));
    auto h = spawn([] { return this_fiber::sleep_for(std::chrono::days::max()); });
    (void)this_fiber::sleep_for(20ms);
    EXPECT_EQ(stats().live_fibers, 2u) << "a sleep of days::max() returned early";
    h.request_stop();
    EXPECT_FALSE(h.join().has_value());  // cancelled, not timed out
  });
}

// A fiber that spawns in a loop (a million fibers, as in the README's
// first example) spends its coop budget with each spawn: on one worker,
// the fibers it spawned run now and then while it goes on, instead of
// only once it parks (it held the worker for the whole loop, and for
// 500 ms got the hog report).
TEST(FibersOneWorker, AFiberSpawningInALoopLetsItsChildrenRun) {
  weft::run([] {
    std::atomic<int> ran{0};
    int ran_during = 0;
    const auto end = clock::now() + 20ms;  // 200 slices of 100 µs
    std::vector<join_handle<void>> hs;
    while (clock::now() < end) hs.push_back(spawn([&ran] { ran.fetch_add(1); }));
    ran_during = ran.load();
    for (auto& h : hs) h.join();
    EXPECT_GT(ran_during, 0) << "none of " << hs.size() << " fibers ran during the spawn loop";
  }, {.workers = 1});
}

// ...and its coop yields go behind what it spawned: past the local queue's
// 256 the spawned fibers wait in the inject queue, and a yield to the
// local queue's tail let the spawner back after those 256 only, so it ran
// ahead of its children without bound (all million alive at once in
// spawn_join on one worker: 480 ns a fiber, mostly page faults on fresh
// memory for them, against 130 ns with the yield behind them, as Go's
// Gosched and preemption put a goroutine on the global queue). Bounded
// now by what it spawns in one coop slice plus a queue's worth.
TEST(FibersOneWorker, AFiberSpawningInALoopDoesNotRunFarAheadOfItsChildren) {
#if defined(WEFT_TSAN)
  // Each fiber's context costs ~3 ms under TSan: 40,000 took 370 s, and
  // 4,000 passed also without the fix (checked). Scheduling, not a race.
  GTEST_SKIP() << "too slow to tell under TSan";
#endif
  weft::run([] {
    constexpr int kFibers = 40000;
    std::atomic<int> ran{0};
    int ahead = 0;  // the most spawned and not yet run
    for (int i = 0; i < kFibers; ++i) {
      go([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
      ahead = std::max(ahead, i + 1 - ran.load(std::memory_order_relaxed));
    }
    while (ran.load() < kFibers) this_fiber::yield();
    // ~3,000 spawn in a 100 µs slice here (fewer under sanitizers); before,
    // ~34,000 of the 40,000 were waiting by the end of the loop.
    EXPECT_LT(ahead, kFibers / 4) << "the spawner ran " << ahead << " fibers ahead";
  }, {.workers = 1});
}

// A 10-ary fork-join tree `depth` levels below this fiber, its fibers
// counted while they run (one worker: plain ints). Returns its size.
struct tree_watch {
  int alive = 0, peak = 0;
};
long fork_join_tree(int depth, tree_watch& w) {
  w.peak = std::max(w.peak, ++w.alive);
  long size = 1;
  if (depth > 0) {
    std::vector<join_handle<long>> kids;
    for (int i = 0; i < 10; ++i)
      kids.push_back(spawn([depth, &w] { return fork_join_tree(depth - 1, w); }));
    for (auto& k : kids) size += k.join();
  }
  --w.alive;
  return size;
}

// A fiber that yields until stopped, counting its turns (one worker:
// plain ints). Started at once: it waits at the local queue's tail.
struct yielder_watch {
  bool done = false;
  int turns = 0;
  join_handle<void> h = spawn([this] {
    while (!done) {
      ++turns;
      this_fiber::yield();
    }
  });
  yielder_watch() { this_fiber::yield(); }
  int stop() {
    done = true;
    h.join();
    return turns;
  }
};

// *Depth first* (sched/worker.cc): the children a parent spawns before it
// joins them run newest first, each one's subtree before the next, so on
// one worker about one path from the root to a leaf has started and not
// finished at any moment: 4 here. Breadth first (each child a spawn
// displaced from the LIFO slot at the local queue's tail, as before) 48 of
// these 1,111 fibers had started at once, each parked on its own stack.
TEST(FibersOneWorker, AForkJoinTreeRunsDepthFirst) {
  weft::run([] {
    tree_watch w;
    EXPECT_EQ(fork_join_tree(3, w), 1111);
    EXPECT_LE(w.peak, 8) << "fibers started and not finished at once";
  }, {.workers = 1});
}

// ...and a fiber at the local queue's tail keeps its turns meanwhile: the
// displaced queue, where the tree's children wait, takes turns with the
// local queue: ~1,000 turns here. Taking the displaced queue first, the
// yielder had 0 until the whole tree was done.
TEST(FibersOneWorker, AYielderKeepsItsTurnsWhileAForkJoinTreeRuns) {
  weft::run([] {
    yielder_watch yielder;
    tree_watch w;
    const int before = yielder.turns;
    EXPECT_EQ(fork_join_tree(3, w), 1111);
    const int during = yielder.turns - before;
    yielder.stop();
    EXPECT_GE(during, 100) << "turns of the yielder while 1,111 fibers ran";
  }, {.workers = 1});
}

// A fiber that spawns one child and exits, the child the same, thousands
// deep: each child runs from the LIFO slot as its parent exits, a chain
// that is no ping-pong pair (*Depth first*), so the streak limit of 3 does
// not cut it; kMaxLifoChain (64) does, so a yielder beside it keeps
// running: one turn per 64 spawns. With no limit on chains it had 0 turns
// during the relay.
void spawn_relay(int left, semaphore& finished) {
  if (left == 0) {
    finished.release();
    return;
  }
  go([left, &finished] { spawn_relay(left - 1, finished); });
}

TEST(FibersOneWorker, ARelayOfSpawnsDoesNotHoldUpAYielder) {
  weft::run([] {
    yielder_watch yielder;
    semaphore finished(0);
    const int before = yielder.turns;
    spawn_relay(3200, finished);
    EXPECT_TRUE(finished.acquire());
    const int during = yielder.turns - before;
    yielder.stop();
    EXPECT_GE(during, 20) << "turns of the yielder during a relay of 3,200 spawns";
  }, {.workers = 1});
}

// A loop that displaces two fibers a turn (it spawns three, then yields;
// the third runs from the LIFO slot) kept the displaced queue from ever
// draining, and the fibers at the bottom of that stack waited for the
// loop to end. A yield now moves what the yielder displaced to the local
// queue's tail (requeue_own_displaced() in sched/worker.cc).
TEST(FibersOneWorker, ALoopThatKeepsDisplacingFibersDoesNotStarveTheOldest) {
  weft::run([] {
    constexpr int kRounds = 4000;
    int round = 0;
    std::vector<int> ran_in(6, -1);  // the first two rounds' children: the round each ran in
    auto looper = spawn([&] {
      for (round = 0; round < kRounds; ++round) {
        for (int k = 0; k < 3; ++k)
          go([&ran_in, &round, id = round * 3 + k] {
            if (id < 6) ran_in[id] = round;
          });
        this_fiber::yield();
      }
    });
    looper.join();
    for (int id = 0; id < 6; ++id)  // -1: not before the loop ended
      EXPECT_TRUE(ran_in[id] >= 0 && ran_in[id] < 10)
          << "child " << id << " ran in round " << ran_in[id];
  }, {.workers = 1});
}

// ...and one that displaces a fiber a turn and parks, woken to go on by
// the fiber it spawned last (which runs from the LIFO slot as it parks),
// never yields: there the displaced queue goes to the local queue's tail
// once it has not drained for kDisplacedPatience ticks, about a million
// (350,000 rounds here).
TEST(FibersOneWorker, AProducerThatParksDoesNotHoldUpTheOldestDisplacedFibersForever) {
#if defined(WEFT_TSAN)
  GTEST_SKIP() << "a million fibers: too slow under TSan (~3 ms each)";
#endif
  weft::run([] {
    constexpr int kEarly = 200;  // the bottom of the stack, all of them
    int early_ran = 0, rounds = 0;
    semaphore again(0);
    auto early = [&early_ran] { ++early_ran; };
    go(early);  // displaced by the first spawn below
    for (; early_ran < kEarly && rounds < 2'000'000; ++rounds) {
      if (rounds < kEarly - 1)
        go(early);  // displaced by the next
      else
        go([] {});
      go([&again] { again.release(); });  // the LIFO slot's: wakes us
      EXPECT_TRUE(again.acquire());
    }
    // Taking the oldest alone every kDisplacedPatience ticks, the 200th
    // would wait 200 such periods.
    EXPECT_EQ(early_ran, kEarly) << "after " << rounds << " rounds";
  }, {.workers = 1});
}

TEST_P(Fibers, AFiberThatYieldsForeverDoesNotStarveOthers) {
  Run([] {
    std::atomic<bool> stop{false};
    std::vector<join_handle<void>> spinners;
    for (unsigned i = 0; i < 8; ++i)  // more yielders than workers
      spinners.push_back(spawn([&] {
        while (!stop.load(std::memory_order_relaxed)) this_fiber::yield();
      }));
    int done = 0;
    for (int i = 0; i < 100; ++i) done += spawn([] { return 1; }).join();
    (void)this_fiber::sleep_for(5ms);  // a timer fires between the yielders
    stop = true;
    for (auto& h : spinners) h.join();
    EXPECT_EQ(done, 100);
  });
}

// Two fibers that hand a token back and forth without end switch straight
// to each other (the hand-off), past the LIFO streak limit while nothing
// else waits; they must still let others run: a fiber the pair woke
// (queued behind it on the same worker), one a plain thread woke (the
// inject queue) and a sleeper (a timer). With hand-offs unbounded (no
// streak limit, and no loop turn on the periodic ticks either) all three
// starve on one worker and the test hangs.
TEST_P(Fibers, AHandOffPairThatNeverStopsStillLetsOthersRun) {
  Run([] {
    channel<int> a(0), b(0), from_thread(1), done(3);
    std::atomic<bool> stop{false};
    semaphore woken_by_pair(0);
    auto ping = spawn([&] {
      for (int i = 0; !stop.load(std::memory_order_relaxed); ++i) {
        if (i == 1000) woken_by_pair.release();
        if (!a.send(i) || !b.recv()) break;
      }
      a.close();
    });
    auto pong = spawn([&] {
      while (auto v = a.recv())
        if (!b.send(*v)) break;
    });
    go([&] { if (woken_by_pair.acquire()) (void)done.send(1); });
    go([&] { if (from_thread.recv()) (void)done.send(2); });
    go([&] { if (this_fiber::sleep_for(2ms)) (void)done.send(3); });
    std::thread t([&] {
      std::this_thread::sleep_for(5ms);
      (void)from_thread.send(0);
    });
    unsigned seen = 0;
    for (int k = 0; k < 3; ++k) {
      auto v = done.recv(deadline(20s));
      EXPECT_TRUE(v) << "a fiber starved behind the pair";
      if (!v) break;
      seen |= 1u << *v;
    }
    stop = true;
    ping.join();
    pong.join();
    t.join();
    EXPECT_EQ(seen, 0b1110u);
  });
}

// More fibers yielding on one worker than its run queue holds (256): the
// rest wait in the inject queue, which is then never empty. Yields switch
// straight to the next fiber and look at no clock, so the loop's periodic
// tick (every 61) is where due timers fire (see *Direct yield* in
// sched/worker.cc); it must fire them even when it also takes a fiber from
// the inject queue. A plain thread ends the yielders after 10 s if the
// sleeper has not woken by then (it never did while the periodic tick
// returned the inject queue's fiber first).
TEST(FiberYield, ASleeperWakesAmongMoreYieldersThanARunQueueHolds) {
  options o;
  o.workers = 1;
  constexpr int kYielders = 400;  // more than 256 plus an inject batch (32)
  std::atomic<bool> stop{false}, woke{false}, gave_up{false};
  std::thread watchdog([&] {
    auto until = std::chrono::steady_clock::now() + 10s;
    while (!woke.load() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    if (!woke.load()) gave_up.store(true);
    stop.store(true);
  });
  run([&] {
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < kYielders; ++i)
      hs.push_back(spawn([&] {
        while (!stop.load(std::memory_order_relaxed)) this_fiber::yield();
      }));
    auto sleeper = spawn([&] {
      (void)this_fiber::sleep_for(1ms);
      woke.store(true);
      stop.store(true);
    });
    sleeper.join();
    for (auto& h : hs) h.join();
    // Yields go to the local queue's tail: past 256 its older half went to
    // the inject queue, and the statistic counts them.
    EXPECT_GT(stats().workers[0].overflowed, 0u) << "the statistic missed the overflow";
  }, o);
  watchdog.join();
  EXPECT_FALSE(gave_up.load()) << "the sleeper's timer never fired while the fibers yielded";
}

// Fibers yielding on one worker take turns in a fixed cycle, whether the
// yield switches straight to the next fiber (see *Direct yield* in
// sched/worker.cc) or, for one on a tiny stack, goes through the loop.
// The cycle starts once each has had its first turn: until then those
// not yet started wait in the displaced queue, which takes turns with the
// yielders in the local queue (*Depth first* in sched/worker.cc).
TEST(FiberYield, FibersTakeTurnsInOrderOnOneWorker) {
  options o;
  o.workers = 1;
  std::vector<int> order;  // one worker: no concurrent access
  constexpr int kFibers = 4, kRounds = 200;
  order.reserve(kFibers * kRounds);
  run([&] {
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < kFibers; ++i) {
      spawn_options so{.name = "yielder"};
      // Below the 8 KiB a direct switch needs (kHandoffMinStack), and room
      // for the sanitizers' frames; order is reserved, so no allocation here.
      if (i == 2) so.stack_size = 4 * 1024;
      hs.push_back(spawn([&order, i] {
        for (int r = 0; r < kRounds; ++r) {
          order.push_back(i);
          this_fiber::yield();
        }
      }, so));
    }
    for (auto& h : hs) h.join();
  }, o);
  ASSERT_EQ(order.size(), std::size_t(kFibers * kRounds));
  const std::string start = ::testing::PrintToString(
      std::vector<int>(order.begin(), order.begin() + 3 * kFibers));
  // Every fiber's first turn comes within the first two rounds' worth...
  std::size_t all_in = 0;  // the turn by which each has had one
  std::set<int> seen;
  while (all_in < order.size() && (seen.insert(order[all_in]), seen.size() < kFibers))
    ++all_in;
  ASSERT_LT(all_in, std::size_t(2 * kFibers)) << start;
  // ...and from then on the turns repeat in a cycle of kFibers, until the
  // first to start, as many turns ahead as it had before the last
  // started (at most all_in), has had its last.
  for (std::size_t k = all_in + 1; k + (all_in + 1) * kFibers < order.size(); ++k)
    ASSERT_EQ(order[k], order[k - kFibers]) << "at turn " << k << ": " << start;
}

// Fibers that compute for a while between yields, as the hog warning asks
// long loops to do, keep every worker busy without ever getting stuck in
// one fiber: yields switch straight to the next fiber (or continue in
// place) and fire no timers, so only the loop's periodic tick, 61 yields
// apart, did. A 10 ms sleep then ended up to 61 slices (1.2 s here) late.
// The monitor now asks each worker for its loop's periodic duties once a
// period, and its next yield goes through the loop, which fires due
// timers (and polls the driver: io/readiness_test.cc): the sleeper runs within about
// a monitor period (10 ms) plus three slices (the one running, and two
// yielders queued before it). Ten sleeps land at random points of the
// 61-yield cycle: with the periodic tick alone, all ten under 700 ms late
// has a chance of about 1 in 270. The bound leaves room for a loaded
// machine (two cores, four workers, other builds), as in
// io/readiness_test.cc's AReaderWakesOnTime..., and lateness is counted in
// the time the workers ran (testing::run_time): a CI run that built beside
// it kept the worker off the CPU for over a second.
TEST_P(Fibers, ASleepEndsOnTimeWhileFibersComputeBetweenYields) {
  constexpr auto kSlice = 20ms, kSleep = 10ms;
  std::chrono::nanoseconds worst{};
  Run([&] {
    testing::busy_yielders busy(2 * workers(), kSlice);  // no worker left idle
    for (int i = 0; i < 10; ++i) {
      auto t0 = testing::when::now(workers());
      (void)this_fiber::sleep_for(kSleep);
      // Late by the smaller of wall and run time (see testing::run_time).
      worst = std::max(worst, testing::when::now(workers()).since(t0) - kSleep);
    }
  });
  EXPECT_LT(worst, 700ms) << "a sleep ended "
                          << std::chrono::duration_cast<std::chrono::milliseconds>(worst).count()
                          << " ms late";
}

// The floating-point control state (rounding mode: the x87 control word
// and MXCSR, callee-saved in the SysV ABI) belongs to each fiber: the
// switch saves and restores it (see *The switch itself* in
// sched/context.cc), by a direct switch and through the loop alike.
// fegetround() reads the x87 control word only; on x86-64, MXCSR's rounding
// bits (13-14, the x87 ones shifted by 3) must agree with it.
int rounding() {
  int m = std::fegetround();
#if defined(__x86_64__)
  if (static_cast<int>((_mm_getcsr() >> 3) & 0xc00) != m) return -1;
#endif
  return m;
}

TEST(FiberSwitch, EachFiberKeepsItsRoundingMode) {
  options o;
  o.workers = 1;
  std::atomic<int> bad{0};
  run([&] {
    const int modes[] = {FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO, FE_TONEAREST};
    std::vector<join_handle<void>> hs;
    for (int m : modes)
      hs.push_back(spawn([m, &bad] {
        std::fesetround(m);
        for (int r = 0; r < 100; ++r) {
          this_fiber::yield();
          if (rounding() != m) bad.fetch_add(1, std::memory_order_relaxed);
        }
        (void)this_fiber::sleep_for(1ms);  // through the loop
        if (rounding() != m) bad.fetch_add(1, std::memory_order_relaxed);
        std::fesetround(FE_TONEAREST);
      }));
    for (auto& h : hs) h.join();
  }, o);
  EXPECT_EQ(bad.load(), 0);
}

// ASan with detect_stack_use_after_return=1 (off in .bazelrc's asan
// config, but a user's ASAN_OPTIONS may turn it on) puts a function's
// address-taken locals on a fake stack, one per context, and a fiber's
// final switch destroys its fake stack before the jump
// (__sanitizer_start_switch_fiber with no save pointer). The record the
// switch passes through the jump (who suspended, who resumes) was such a
// local: the context resumed after an exiting fiber read it from the
// unmapped fake stack, a SEGV at the first fiber's exit. Here a child
// process with the option on spawns and joins fibers (their exits hand
// off to the joiner or go through the loop), ping-pongs two of them and
// parks some inside a catch block, across two workers. Without ASan the
// option is ignored and the child just runs.
TEST(FiberSwitch, AnExitingFibersSwitchWorksWithAsanFakeStacks) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const char* asan = std::getenv("ASAN_OPTIONS");
  const std::string saved = asan ? asan : "";
  ::setenv("ASAN_OPTIONS", (saved + ":detect_stack_use_after_return=1").c_str(), 1);
  EXPECT_EXIT(
      {
        int sum = 0;
        weft::run([&] {
          for (int round = 0; round < 10; ++round) {
            std::vector<join_handle<int>> hs;
            for (int i = 0; i < 100; ++i)
              hs.push_back(spawn([i] {
                try {
                  throw std::runtime_error("parked in a catch block");
                } catch (...) {
                  if (i % 4 == 0) (void)this_fiber::sleep_for(10us);
                }
                return 1;
              }));
            for (auto& h : hs) sum += h.join();
          }
          channel<int> ping(0), pong(0);
          auto h = spawn([&] {
            while (auto v = ping.recv()) (void)pong.send(*v + 1);
          });
          for (int i = 0; i < 1000; ++i) {
            (void)ping.send(i);
            sum += *pong.recv() - i;
          }
          ping.close();
          h.join();
        }, {.workers = 2});
        std::_Exit(sum == 2000 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  if (asan) ::setenv("ASAN_OPTIONS", saved.c_str(), 1); else ::unsetenv("ASAN_OPTIONS");
}

TEST_P(Fibers, AnExceptionCrossesJoin) {
  Run([] {
    auto h = spawn([]() -> int { throw std::runtime_error("boom"); });
    try {
      h.join();
      ADD_FAILURE() << "join did not rethrow";
    } catch (const std::runtime_error& e) {
      EXPECT_STREQ(e.what(), "boom");
    }
  });
}

// join() returns what the fiber returned, as std::future::get does: a
// move-only value, or a reference (join_handle<T&>), which refers to the
// same object. A callable returning a reference did not compile (the join
// state kept the result in a std::optional<T&>).
int g_referent = 5;
TEST_P(Fibers, JoinReturnsAMoveOnlyValueOrAReference) {
  Run([] {
    join_handle<int&> ref = spawn([]() -> int& { return g_referent; });
    EXPECT_EQ(&ref.join(), &g_referent);
    join_handle<const int&> cref = spawn([]() -> const int& { return g_referent; });
    EXPECT_EQ(&cref.join(), &g_referent);
    auto owned = spawn([] { return std::make_unique<int>(4); }).join();
    ASSERT_NE(owned, nullptr);
    EXPECT_EQ(*owned, 4);
  });
}

// The C++ runtime keeps, per thread, the exceptions being handled (what
// `throw;` and std::current_exception() use) and the count of exceptions in
// flight (std::uncaught_exceptions()). A fiber may park inside a catch
// block (to log, to write an error reply) or inside a destructor that an
// exception is running, then resume on another thread, while other fibers
// throw and catch on the thread it left: that state must go with the
// fiber. Here half the fibers park in a catch block and half in a
// destructor run by their throw, all at once; each must then still see its
// own exception and its own count. With the state left per thread, the
// fibers of one worker see each other's (the last one caught, the sum of
// the counts), and those that moved see another thread's.
TEST_P(Fibers, AnExceptionBeingHandledOrInFlightStaysWithItsFiberAcrossParks) {
  Run([] {
    constexpr int kFibers = 6;
    auto what_of = [](std::exception_ptr p) -> std::string {
      if (!p) return "(none)";
      try {
        std::rethrow_exception(p);
      } catch (const std::exception& e) {
        return e.what();
      }
    };
    for (int round = 0; round < 10; ++round) {
      latch inside(kFibers);  // every fiber is in its handler or destructor
      std::vector<join_handle<void>> hs;
      for (int i = 0; i < kFibers; ++i)
        hs.push_back(spawn([&, i] {
          std::string mine = "fiber " + std::to_string(i);
          auto park_inside = [&] {
            inside.count_down();
            ASSERT_TRUE(inside.wait());
            (void)this_fiber::sleep_for(std::chrono::microseconds(30 * (kFibers - i)));
          };
          if (i % 2 == 0) {
            try {
              throw std::runtime_error(mine);
            } catch (...) {
              park_inside();
              EXPECT_EQ(what_of(std::current_exception()), mine);
              EXPECT_EQ(std::uncaught_exceptions(), 0) << mine;
            }
          } else {
            struct in_flight {
              std::function<void()> check;
              ~in_flight() { check(); }
            };
            try {
              in_flight d{[&] {
                park_inside();
                EXPECT_EQ(std::uncaught_exceptions(), 1) << mine;
                EXPECT_EQ(what_of(std::current_exception()), "(none)") << mine;
              }};
              throw std::runtime_error(mine);
            } catch (const std::runtime_error& e) {
              EXPECT_EQ(std::string(e.what()), mine);
            }
          }
          EXPECT_EQ(std::uncaught_exceptions(), 0) << mine;
          EXPECT_EQ(what_of(std::current_exception()), "(none)") << mine;
        }));
      for (auto& h : hs) h.join();
    }
  });
}

// A handle with no fiber behind it (joined already, moved from, detached,
// default-constructed) refuses join() as std::thread::join does, with
// std::system_error(invalid_argument), on a fiber and on a plain thread,
// instead of following a null pointer.
TEST_P(Fibers, JoiningAHandleThatIsNotJoinableThrowsInvalidArgument) {
  auto expect_refused = [](auto& h) {
    try {
      h.join();
      ADD_FAILURE() << "join of a handle that is not joinable returned";
    } catch (const std::system_error& e) {
      EXPECT_EQ(e.code(), std::errc::invalid_argument);
    }
  };
  Run([&] {
    auto joined = spawn([] { return 1; });
    EXPECT_EQ(joined.join(), 1);
    expect_refused(joined);
    auto moved = spawn([] { return 2; });
    auto owner = std::move(moved);
    expect_refused(moved);
    EXPECT_EQ(owner.join(), 2);
    auto detached = spawn([] {});
    detached.detach();
    expect_refused(detached);
    join_handle<int> empty;
    expect_refused(empty);
    auto by_thread = spawn([] { return 3; });
    std::thread t([&] {
      EXPECT_EQ(by_thread.join(), 3);
      expect_refused(by_thread);
    });
    // The worker must stay free for `by_thread`: wait for the thread off it.
    blocking([&] { t.join(); });
  });
}

// A fiber that joins its own handle would wait for itself for ever (a
// deadlock report, or a hang while anything else runs): as std::thread,
// join() throws resource_deadlock_would_occur, and the handle stays
// joinable for someone else.
TEST_P(Fibers, AFiberJoiningItselfGetsResourceDeadlockWouldOccur) {
  Run([] {
    join_handle<int> h;
    latch handed(1);
    std::error_code got;
    h = spawn([&] {
      (void)handed.wait();
      try {
        (void)h.join();
      } catch (const std::system_error& e) {
        got = e.code();
      }
      return 5;
    });
    handed.count_down();
    EXPECT_EQ(h.join(), 5);
    EXPECT_EQ(got, std::errc::resource_deadlock_would_occur);
  });
}

// A plain thread may join a fiber (it blocks on a futex): it gets the
// value, or the exception, whether the fiber is still running or done.
TEST_P(Fibers, APlainThreadJoinsAFiber) {
  Run([] {
    auto slow = spawn([] {
      (void)this_fiber::sleep_for(30ms);
      return 42;
    });
    auto failing = spawn([]() -> int { throw std::runtime_error("boom"); });
    auto done = spawn([] { return 7; });
    (void)this_fiber::sleep_for(5ms);  // `done` has most likely finished
    int got = 0, got_done = 0;
    bool threw = false;
    std::thread t([&] {
      got = slow.join();  // still sleeping: the thread waits
      got_done = done.join();
      try {
        (void)failing.join();
      } catch (const std::runtime_error&) {
        threw = true;
      }
    });
    // The worker must stay free for `slow`: wait for the thread off it.
    blocking([&] { t.join(); });
    EXPECT_EQ(got, 42);
    EXPECT_EQ(got_done, 7);
    EXPECT_TRUE(threw);
  });
}

// A plain thread that joined a fiber may go on to wake others: until it
// exits it counts as a possible waker, and the deadlock detector must not
// kill a program whose main fiber waits for it.
TEST_P(Fibers, APlainThreadThatJoinedAFiberMayStillWakeOthers) {
  int got = -1;
  Run([&] {
    channel<int> ch(0);
    std::atomic<bool> joining{false};
    // Ends well after the thread has called join() (a thread that never
    // touched weft is unknown to the detector: it would rightly see a
    // deadlock if the job ended before the thread started on a busy machine).
    auto short_job = spawn([&joining] {
      while (!joining.load()) (void)this_fiber::sleep_for(1ms);
      (void)this_fiber::sleep_for(20ms);
      return 1;
    });
    std::thread t([&ch, &joining, h = std::move(short_job)]() mutable {
      joining.store(true);
      (void)h.join();
      std::this_thread::sleep_for(200ms);  // plain work, say a database call
      (void)ch.send(7);
    });
    got = ch.recv().value_or(-1);  // every worker idles meanwhile
    blocking([&] { t.join(); });
  });
  EXPECT_EQ(got, 7);
}

TEST_P(Fibers, FiberLocalStorageStaysWithItsFiberAcrossMigration) {
  static fiber_local<int> slot;
  std::atomic<int> wrong{0}, migrations{0};
  Run([&] {
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < 200; ++i)
      hs.push_back(spawn([&, i] {
        *slot = i;
        unsigned w = this_fiber::worker_index();
        for (int k = 0; k < 20; ++k) {
          // Joining a child placed on the next worker moves us: a child
          // wakes its parent onto the worker it finished on. (Left to
          // stealing, parent and child mostly stay together: the child
          // runs from the LIFO slot and hands its worker back to the
          // parent, see *Depth first* in sched/worker.cc.)
          spawn([] {
            volatile int x = 0;
            for (int j = 0; j < 20'000; ++j) x = x + j;
          }, {.worker = static_cast<int>(w + 1)}).join();
          if (this_fiber::worker_index() != w) migrations.fetch_add(1);
          w = this_fiber::worker_index();
          if (*slot != i) wrong.fetch_add(1);
        }
      }));
    for (auto& h : hs) h.join();
  });
  EXPECT_EQ(wrong.load(), 0);
  if (workers() > 1) {
    EXPECT_GT(migrations.load(), 0) << "no fiber migrated";
  }
}

// A T whose constructor uses a newer fiber_local (one whose key lies past
// the end of the fiber's table, which then grows and moves): the T must
// land in its slot, once.
struct fls_inner {
  int v = 7;
};
fiber_local<fls_inner>* g_fls_inner = nullptr;
std::atomic<int> g_fls_outer_made{0};
struct fls_outer {
  int x;
  fls_outer() : x(g_fls_inner->get().v) { g_fls_outer_made.fetch_add(1); }
};

TEST_P(Fibers, AFiberLocalWhoseConstructorUsesANewerOneIsBuiltOnce) {
  static fiber_local<fls_outer> outer;              // the older key
  static std::vector<fiber_local<int>> pad(200);    // pushes the next key far out
  static fiber_local<fls_inner> inner;              // the newer key
  g_fls_inner = &inner;
  g_fls_outer_made = 0;
  Run([] {
    spawn([] {
      fls_outer& a = outer.get();  // fls_outer() grows the table
      fls_outer& b = outer.get();
      EXPECT_EQ(&a, &b);
      EXPECT_EQ(a.x, 7);
    }).join();
  });
  EXPECT_EQ(g_fls_outer_made.load(), 1);
}

// At fiber exit, a destructor that uses a newer fiber_local grows the table
// being destroyed: every value is still destroyed exactly once.
fiber_local<fls_inner>* g_fls_inner_at_exit = nullptr;
std::atomic<int> g_fls_destroyed{0};
struct fls_uses_newer_at_exit {
  ~fls_uses_newer_at_exit() {
    g_fls_destroyed.fetch_add(1);
    g_fls_inner_at_exit->get().v = 1;
  }
};

TEST_P(Fibers, AFiberLocalWhoseDestructorUsesANewerOneIsDestroyedOnce) {
  static fiber_local<fls_uses_newer_at_exit> d;     // the older key
  static std::vector<fiber_local<int>> pad(200);
  static fiber_local<fls_inner> inner;              // the newer key, unused until exit
  g_fls_inner_at_exit = &inner;
  g_fls_destroyed = 0;
  Run([] {
    spawn([] {
      (void)d.get();
      (void)pad[0].get();  // a slot after d's, visited after d's destructor ran
    }).join();
  });
  EXPECT_EQ(g_fls_destroyed.load(), 1);
}

// A fiber_local that goes away gives its key back; the next one made takes
// it over. A fiber that had a value for the old one never sees it through
// the new one: the old value is destroyed when the new one is first used.
std::atomic<int> g_fls_counted_destroyed{0};
struct fls_counted {
  int v = 0;
  ~fls_counted() { g_fls_counted_destroyed.fetch_add(1); }
};

TEST_P(Fibers, AFiberLocalMadeAfterAnotherWentAwaySeesNoneOfItsValues) {
  g_fls_counted_destroyed = 0;
  Run([] {
    spawn([] {
      auto a = std::make_unique<fiber_local<fls_counted>>();
      a->get().v = 42;
      a.reset();
      fiber_local<fls_counted> b;  // takes over a's key, a new generation
      EXPECT_EQ(b.get().v, 0);
      EXPECT_EQ(g_fls_counted_destroyed.load(), 1) << "a's value was not destroyed on reuse";
      b.get().v = 5;
    }).join();
  });
  EXPECT_EQ(g_fls_counted_destroyed.load(), 2);  // b's, at fiber exit
}

// A fiber's locals are destroyed as it exits, before join() returns (as a
// thread's thread_locals are before std::thread::join returns): a joiner
// may then free what their destructors use. Here the destructor parks, so
// the joiner would run first if join() were completed before it.
std::atomic<int> g_fls_parking_destroyed{0};
struct fls_parks_at_exit {
  ~fls_parks_at_exit() {
    (void)this_fiber::sleep_for(2ms);
    g_fls_parking_destroyed.fetch_add(1);
  }
};

TEST_P(Fibers, FiberLocalsAreDestroyedBeforeJoinReturns) {
  static fiber_local<fls_parks_at_exit> d;
  g_fls_parking_destroyed = 0;
  Run([] {
    for (int i = 1; i <= 3; ++i) {
      spawn([] { (void)d.get(); }).join();
      EXPECT_EQ(g_fls_parking_destroyed.load(), i);
    }
  });
  EXPECT_EQ(g_fls_parking_destroyed.load(), 3);
}

// main's fiber_local values are destroyed as main returns, while the other
// fibers still run (as the main thread's thread_locals are destroyed while
// other threads run), so a destructor may hand its last words to them: a
// per-fiber log buffer flushed to a logger fiber. They were destroyed only
// after every other fiber had been told to unwind, and main itself was not
// unwound: a send to the (unwound) logger parked for ever and run() never
// returned (here the send's deadline ends it, with nothing received), and
// a join in such a destructor threw operation_canceled (std::terminate).
struct fls_flushes_to_logger {
  channel<int>* log = nullptr;
  ~fls_flushes_to_logger() {
    if (log) (void)log->send(1, deadline(2s));
  }
};
TEST_P(Fibers, MainsFiberLocalsAreDestroyedBeforeTheOtherFibersUnwind) {
  static fiber_local<fls_flushes_to_logger> buf;
  std::atomic<int> logged{0};
  auto log = std::make_shared<channel<int>>(0);  // outlives main's frame
  Run([&] {
    go([&, log] {
      while (auto v = log->recv()) logged.fetch_add(*v);
    });
    buf->log = log.get();
  });
  EXPECT_EQ(logged.load(), 1);
}

// A fiber's values are destroyed in the reverse order of their
// construction, as a thread's thread_locals are: a value whose constructor
// took a reference to another fiber_local's value may still use it in its
// destructor. They were destroyed in key order, so with the natural
// declaration order (the fiber_local others build on declared first, with
// the lower key) the value depended on went first, and the dependent's
// destructor used freed memory. Both declaration orders are tried.
std::atomic<int> g_fls_clock{0};
template <int N>
struct fls_dep {
  static inline std::atomic<int> destroyed_at{0};
  ~fls_dep() { destroyed_at = ++g_fls_clock; }
};
template <int N>
struct fls_user {
  static inline fiber_local<fls_dep<N>>* dep = nullptr;
  static inline std::atomic<int> destroyed_at{0};
  fls_dep<N>& d;  // kept, as a logger or a connection pool would be
  fls_user() : d(dep->get()) {}
  // A real one would use d here (a last flush); the test only records when.
  ~fls_user() { destroyed_at = ++g_fls_clock; }
};

TEST_P(Fibers, FiberLocalsAreDestroyedInTheReverseOrderOfTheirConstruction) {
  g_fls_clock = 0;
  fls_dep<0>::destroyed_at = fls_user<0>::destroyed_at = 0;
  fls_dep<1>::destroyed_at = fls_user<1>::destroyed_at = 0;
  Run([] {
    fiber_local<fls_dep<0>> dep0;  // declared before its user
    fiber_local<fls_user<0>> user0;
    fiber_local<fls_user<1>> user1;  // declared after its user
    fiber_local<fls_dep<1>> dep1;
    fls_user<0>::dep = &dep0;
    fls_user<1>::dep = &dep1;
    spawn([&] {
      (void)user0.get();
      (void)user1.get();
    }).join();
  });
  EXPECT_NE(fls_dep<0>::destroyed_at.load(), 0);
  EXPECT_LT(fls_user<0>::destroyed_at.load(), fls_dep<0>::destroyed_at.load());
  EXPECT_NE(fls_dep<1>::destroyed_at.load(), 0);
  EXPECT_LT(fls_user<1>::destroyed_at.load(), fls_dep<1>::destroyed_at.load());
}

// Two fiber_locals whose destructors each set the other: at fiber exit,
// destroying one made the other anew, whose destructor made the first
// anew, and so on forever (the fiber never ended, nor did its joiner). As
// POSIX does for pthread keys (PTHREAD_DESTRUCTOR_ITERATIONS, 4), values
// set by destructors are destroyed for four rounds at most; what is set in
// the fourth is left (never destroyed), with a line on stderr. Here the
// first value is destroyed in round 1, the one its destructor sets in
// round 2, and so on: four destructor runs, and one value left. The
// destructors stop setting after kFlsGiveUp runs, so that the old code
// fails here instead of hanging.
constexpr int kFlsGiveUp = 1000;
std::atomic<int> g_fls_bounce_destroyed{0};
// The values alive now, earlier runs' leftovers included: what the cleanup
// leaves stays reachable from here, to the end (it is never freed, and
// LeakSanitizer must not call it a leak), so the set is never destroyed.
std::mutex g_fls_bounce_mu;
std::set<void*>& g_fls_bounce_alive = *new std::set<void*>;
std::size_t fls_bounce_reset() {
  g_fls_bounce_destroyed = 0;
  std::lock_guard g(g_fls_bounce_mu);
  return g_fls_bounce_alive.size();
}
void fls_bounce_made(void* v) {
  std::lock_guard g(g_fls_bounce_mu);
  g_fls_bounce_alive.insert(v);
}
// Whether the destructor of v should set the other one again.
bool fls_bounce_destroyed(void* v) {
  std::lock_guard g(g_fls_bounce_mu);
  g_fls_bounce_alive.erase(v);
  return g_fls_bounce_destroyed.fetch_add(1) + 1 < kFlsGiveUp;
}
struct fls_ping {
  fls_ping() { fls_bounce_made(this); }
  ~fls_ping();
};
struct fls_pong {
  fls_pong() { fls_bounce_made(this); }
  ~fls_pong();
};
fiber_local<fls_ping> g_fls_ping;
fiber_local<fls_pong> g_fls_pong;
fls_ping::~fls_ping() {
  if (fls_bounce_destroyed(this)) (void)g_fls_pong.get();
}
fls_pong::~fls_pong() {
  if (fls_bounce_destroyed(this)) (void)g_fls_ping.get();
}

TEST_P(Fibers, FiberLocalsSetAgainByTheirDestructorsAreDestroyedForFourRoundsAtMost) {
  const std::size_t left_before = fls_bounce_reset();
  Run([] { spawn([] { (void)g_fls_ping.get(); }).join(); });
  EXPECT_EQ(g_fls_bounce_destroyed.load(), 4);
  std::lock_guard g(g_fls_bounce_mu);
  EXPECT_EQ(g_fls_bounce_alive.size(), left_before + 1)
      << "the value set in round 4 is left undestroyed";
}

TEST(FiberLocalDeath, FiberLocalsLeftAfterFourRoundsAreReportedWithTheFiber) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        (void)fls_bounce_reset();
        weft::run([] { spawn([] { (void)g_fls_ping.get(); }, {.name = "bouncer"}).join(); },
                  {.workers = 2});
        std::_Exit(g_fls_bounce_destroyed.load() == 4 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0),
      "weft: fiber [0-9]+ \"bouncer\": 1 fiber_local value set again by destructors "
      "after 4 rounds, left undestroyed");
}

TEST_P(Fibers, FibersStillAliveWhenMainReturnsAreUnwound) {
  static std::atomic<int> constructed, destroyed;
  constructed = 0;
  destroyed = 0;
  struct guard {
    guard() { constructed.fetch_add(1); }
    ~guard() { destroyed.fetch_add(1); }
  };
  Run([] {
    for (int i = 0; i < 10; ++i)
      spawn([] {
        guard g;
        for (;;) (void)this_fiber::sleep_for(1h);  // would never end by itself
      });
    for (int i = 0; i < 10; ++i)
      spawn([] {
        guard g;
        for (;;) this_fiber::yield();
      });
    while (constructed.load() < 20) (void)this_fiber::sleep_for(1ms);  // all started
    for (int i = 0; i < 10; ++i)
      spawn([] { guard g; });  // never started: unwound before it runs
  });
  EXPECT_EQ(destroyed.load(), constructed.load());
  EXPECT_GE(destroyed.load(), 20);
}

// While the runtime unwinds, an ordinary exception escaping a fiber is
// that fiber's result as at any other time (reported, or kept for join),
// not std::terminate: only fiber_unwind goes on up to the runtime.
TEST(FiberUnwind, AnExceptionEscapingAFiberWhileTheRuntimeUnwindsIsNotFatal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        int rc = weft::run(
            [] {
              static std::atomic<int> started{0};
              auto compute_then_fail = [] {
                started.fetch_add(1);
                while (!this_fiber::stop_requested()) {
                }  // computing when main returns
                throw std::runtime_error("late failure");
              };
              go(compute_then_fail);
              spawn(compute_then_fail).detach();
              while (started.load() < 2) this_fiber::yield();
              return 7;
            },
            {.workers = 3});
        std::_Exit(rc);
      },
      ::testing::ExitedWithCode(7), "nobody joined: late failure");
}

// A fiber's callable and its fiber_local values are destroyed after its
// body, also when the runtime unwinds it (or before it ever ran): no
// exception is in flight there, so a destructor that parks (a last flush,
// a sleep, a join) must see its call cancelled, as any destructor run by
// the unwinding does. unwind_point() threw fiber_unwind out of such a
// destructor instead: std::terminate. For spawn and go, a capture and a
// fiber_local, a fiber parked when main returns and one never started.
std::atomic<int> g_parked_after_body{0};
struct parks_when_destroyed {
  ~parks_when_destroyed() {
    if (!this_fiber::sleep_for(1h)) g_parked_after_body.fetch_add(1);  // cancelled at once
  }
};

TEST(FiberUnwind, DestructorsRunAfterAnUnwoundBodyMayPark) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        static fiber_local<parks_when_destroyed> local;
        static std::atomic<int> started{0};
        weft::run(
            [] {
              auto forever = [] {
                started.fetch_add(1);
                for (;;) (void)this_fiber::sleep_for(1h);
              };
              auto captured = [] { return std::make_shared<parks_when_destroyed>(); };
              spawn([c = captured(), forever] { forever(); }).detach();
              go([c = captured(), forever] { forever(); });
              spawn([forever] {
                (void)local.get();
                forever();
              }).detach();
              go([forever] {
                (void)local.get();
                forever();
              });
              while (started.load() < 4) (void)this_fiber::sleep_for(1ms);
              // Never started: unwound before they run, their callables discarded.
              spawn([c = captured()] {}).detach();
              go([c = captured()] {});
            },
            {.workers = 2});
        std::_Exit(g_parked_after_body.load() == 6 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

// A scope that joins the fibers it spawned (as std::jthread joins in its
// destructor) may be unwound by the runtime when main returns, with its
// children still running: the join in its destructor must wait for them
// (they are unwound too), not return at once and pop the frame they use
// (the children here write to it as they unwind). It returned at once,
// and its throw (operation_canceled) was std::terminate unless caught.
std::atomic<int> g_joined_early{0}, g_joined{0}, g_started{0};
TEST(FiberUnwind, AJoinInADestructorTheUnwindRunsWaitsForTheChild) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        weft::run(
            [] {
              for (int i = 0; i < 3; ++i)
                go([] {
                  std::atomic<bool> child_done{false};  // the child writes it as it ends
                  struct scope {
                    join_handle<void> h;
                    std::atomic<bool>* child_done;
                    ~scope() {
                      try {
                        h.join();
                      } catch (...) {  // the child was unwound: no value
                      }
                      if (!child_done->load()) g_joined_early.fetch_add(1);
                      g_joined.fetch_add(1);
                    }
                  } s{spawn([&child_done] {
                        struct mark {
                          std::atomic<bool>* done;
                          ~mark() {
                            (void)this_fiber::sleep_for(1ms);  // cancelled: returns at once
                            this_fiber::yield();
                            done->store(true);
                          }
                        } m{&child_done};
                        g_started.fetch_add(1);
                        for (;;) (void)this_fiber::sleep_for(1h);
                      }),
                      &child_done};
                  g_started.fetch_add(1);
                  for (;;) (void)this_fiber::sleep_for(1h);
                });
              // All six started before main returns (one never started
              // is not unwound: it has no scope). 10 ms was not always
              // enough under TSan (~3 ms a fiber) once main's timer wake
              // could run before the displaced fibers (*Depth first* in
              // sched/worker.cc).
              while (g_started.load() < 6) (void)this_fiber::sleep_for(100us);
              (void)this_fiber::sleep_for(1ms);  // the last ones park
            },
            {.workers = 1});
        std::_Exit(g_joined.load() == 3 && g_joined_early.load() == 0 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

// A child the runtime unwound produced no value: joining it must not
// return one (it used to return an empty optional's contents), and the
// joiner, unwound as well, must not run on past join().
TEST_P(Fibers, JoiningAChildThatWasUnwoundReturnsNoValue) {
  static std::atomic<int> after_join;
  after_join = 0;
  Run([] {
    go([] {
      auto c = spawn([] {
        (void)this_fiber::sleep_for(1h);
        return 42;
      });
      (void)c.join();  // parked here when main returns; both get unwound
      after_join.fetch_add(1);
    });
    (void)this_fiber::sleep_for(5ms);
  });
  EXPECT_EQ(after_join.load(), 0);
}

TEST_P(Fibers, RequestStopCancelsASleep) {
  Run([] {
    auto h = spawn([] { return this_fiber::sleep_for(1h); });
    (void)this_fiber::sleep_for(5ms);
    h.request_stop();
    result<void> r = h.join();
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error(), std::errc::operation_canceled);
  });
}

// A sleep whose time has come (sleep_for(0), a deadline already past) is a
// yield, as Go's Sleep(0) returns at once: it parks on no timer, which
// waited for the worker's next pass over its timers. A stop requested
// still cancels it.
TEST_P(Fibers, ASleepWhoseTimeHasComeYieldsInsteadOfParking) {
  Run([] {
    constexpr int kRounds = 1000;
    auto before = stats();
    for (int i = 0; i < kRounds; ++i) {
      ASSERT_TRUE(this_fiber::sleep_for(0ms).has_value());
      ASSERT_TRUE(this_fiber::sleep_for(-5ms).has_value());
      ASSERT_TRUE(this_fiber::sleep_until(clock::now() - 1s).has_value());
    }
    auto after = stats();
    EXPECT_LT(after.parks - before.parks, 100u) << "the sleeps parked";
    EXPECT_GE(after.yields - before.yields, 3u * kRounds) << "the sleeps did not yield";
    auto h = spawn([] {
      while (!this_fiber::stop_requested()) this_fiber::yield();
      return this_fiber::sleep_for(0ms);
    });
    h.request_stop();
    EXPECT_EQ(h.join().error(), std::errc::operation_canceled);
  });
}

// A sleep whose time has come is still an unwind point while the runtime
// unwinds the fiber at exit, as the park it replaced was: a detached
// fiber's loop that ignores sleep_for(0)'s result ends in fiber_unwind.
// It returned operation_canceled instead (its stop is requested too), so
// the loop spun on and weft::run waited for it.
TEST_P(Fibers, ASleepWhoseTimeHasComeIsAnUnwindPointAtExit) {
  std::atomic<bool> unwound{false};
  std::atomic<bool> looped_on{false};
  auto t0 = clock::now();
  Run([&] {
    spawn([&] {
      testing::unwind_witness g{unwound};
      auto until = clock::now() + 3s;  // bounded, so the test fails instead of hanging
      while (clock::now() < until) (void)this_fiber::sleep_for(0ms);
      looped_on.store(true);
    }).detach();
    (void)this_fiber::sleep_for(5ms);
  });
  EXPECT_TRUE(unwound.load()) << "the loop was not unwound";
  EXPECT_FALSE(looped_on.load());
  EXPECT_LT(clock::now() - t0, 2s) << "weft::run waited for the loop";
}

TEST_P(Fibers, RequestStopBeforeTheFiberParksStillCancels) {
  Run([] {
    auto h = spawn([] {
      this_fiber::yield();
      return this_fiber::sleep_for(1h);
    });
    h.request_stop();
    EXPECT_EQ(h.join().error(), std::errc::operation_canceled);
  });
}

TEST_P(Fibers, GoRunsAFiberWithoutAHandle) {
  std::atomic<int> ran{0};
  std::uint64_t id = 0;
  Run([&] {
    weft::wait_group wg;
    wg.add(1000);
    for (int i = 0; i < 1000; ++i)
      id = weft::go([&] {
        ran.fetch_add(1, std::memory_order_relaxed);
        wg.done();
      });
    ASSERT_TRUE(wg.wait());
  });
  EXPECT_EQ(ran.load(), 1000);
  EXPECT_GT(id, 0u);
}

TEST_P(Fibers, GoTakesTheSameOptionsAsSpawn) {
  std::string name;
  unsigned ran_on = ~0u;
  Run([&] {
    weft::wait_group wg;
    wg.add(1);
    weft::go([&] {
      name = std::string(this_fiber::name());
      ran_on = this_fiber::worker_index();
      wg.done();
    }, {.name = "errand", .stack_size = weft::kSmallStack, .pinned = true,
        .worker = static_cast<int>(workers() - 1)});
    ASSERT_TRUE(wg.wait());
  });
  EXPECT_EQ(name, "errand");
  EXPECT_EQ(ran_on, workers() - 1);
}

TEST_P(Fibers, AnExceptionEscapingAGoFiberIsReported) {
  ::testing::internal::CaptureStderr();
  Run([] {
    weft::wait_group wg;
    wg.add(1);
    weft::go([&] {
      struct done_on_exit {
        weft::wait_group& wg;
        ~done_on_exit() { wg.done(); }
      } d{wg};
      throw std::runtime_error("lost");
    });
    ASSERT_TRUE(wg.wait());
  });
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("nobody joined: lost"), std::string::npos) << err;
}

// A fiber gets its stack when it first runs, not at spawn: fibers waiting
// to start hold none (stats().stacks_live counts stacks handed out).
TEST_P(Fibers, FibersNotYetStartedHoldNoStack) {
  Run([] {
    const int here = static_cast<int>(this_fiber::worker_index());
    std::vector<join_handle<void>> hs;
    // Placed on this worker, which is busy running us until we join: none
    // of them can start before then.
    for (int i = 0; i < 10'000; ++i) hs.push_back(spawn([] {}, {.worker = here}));
    EXPECT_LT(weft::stats().stacks_live, 100u);
    for (auto& h : hs) h.join();
  });
}

// A fiber's control block holds its callable and its name. Blocks of up
// to 512 bytes come from per-worker caches (alloc/block_cache.h) and are
// recycled wherever the fiber ends; bigger or over-aligned callables come
// from operator new. Callables of sizes 32 bytes apart (every class, and
// across the 512-byte limit with and without a name), aligned as usual
// and to 64 bytes, and two that never fit, spawned on every worker and
// from a plain thread and ending anywhere, keep what they captured, many
// times over so that blocks are reused across workers.
template <std::size_t N, std::size_t Align>
struct alignas(Align) payload {
  std::uint8_t bytes[N];
};
template <std::size_t N, std::size_t Align>
bool spawn_and_check(std::uint64_t seed, bool named) {
  payload<N, Align> p;
  for (std::size_t i = 0; i < N; ++i) p.bytes[i] = std::uint8_t(seed + i * 7);
  spawn_options o;
  o.name = named ? "payload-with-a-name-of-some-length" : "";
  o.worker = int(seed % worker_count());
  auto h = spawn(
      [p, seed] {
        if (reinterpret_cast<std::uintptr_t>(&p) % Align != 0) return std::uint64_t{0};
        for (std::size_t i = 0; i < N; ++i)
          if (p.bytes[i] != std::uint8_t(seed + i * 7)) return std::uint64_t{0};
        this_fiber::yield();  // maybe onto another worker: it ends there
        return seed + 1;
      },
      o);
  return h.join() == seed + 1;
}
template <std::size_t... I>
std::uint64_t spawn_sizes(std::uint64_t seed, bool named, std::index_sequence<I...>) {
  constexpr std::size_t kUsual = alignof(std::max_align_t);
  return (std::uint64_t{0} + ... + spawn_and_check<8 + 32 * I, kUsual>(seed, named)) +
         (std::uint64_t{0} + ... + spawn_and_check<8 + 32 * I, 64>(seed, named));
}
constexpr std::size_t kSizes = 12;  // 8 .. 360 bytes
std::uint64_t spawn_every_kind(std::uint64_t seed) {
  std::uint64_t ok = 0;
  for (bool named : {false, true}) {
    ok += spawn_sizes(seed, named, std::make_index_sequence<kSizes>());
    ok += spawn_and_check<700, alignof(std::max_align_t)>(seed, named);  // operator new
    ok += spawn_and_check<64, 128>(seed, named);  // too aligned: operator new
  }
  return ok;
}

TEST_P(Fibers, CallablesOfEverySizeAndAlignmentKeepWhatTheyCaptured) {
  constexpr std::uint64_t kKinds = 2 * (2 * kSizes + 2);
#if defined(WEFT_TSAN)
  constexpr std::uint64_t kRounds = 3;  // a fiber costs ~3 ms under TSan
#else
  constexpr std::uint64_t kRounds = 100;
#endif
  Run([] {
    std::atomic<std::uint64_t> from_thread{0};
    std::thread t([&] {
      for (std::uint64_t r = 0; r < kRounds; ++r) from_thread += spawn_every_kind(r);
    });
    std::vector<join_handle<std::uint64_t>> hs;
    for (unsigned w = 0; w < 4; ++w)
      hs.push_back(spawn([] {
        std::uint64_t ok = 0;
        for (std::uint64_t r = 0; r < kRounds; ++r) ok += spawn_every_kind(r * 13 + 5);
        return ok;
      }));
    for (auto& h : hs) EXPECT_EQ(h.join(), kKinds * kRounds);
    blocking([&] { t.join(); });
    EXPECT_EQ(from_thread.load(), kKinds * kRounds);
  });
}

#if !defined(WEFT_ASAN)  // under ASan blocks come from operator new (see create())
// A fiber spawned on one worker and ended on another leaves its block in
// the second one's cache, whose next spawn reuses it. (From mimalloc, the
// block would go back to the first worker's heap, and the second worker's
// spawn would get one of its own.)
TEST(FibersTwoWorkers, ABlockFreedOnAnotherWorkerIsReusedThere) {
  options o;
  o.workers = 2;
  weft::run(
      [] {
        spawn([] {
        auto block_of_a_child_on = [](int w) {
          return spawn([] { return static_cast<const void*>(sched::current_fiber()); },
                       {.worker = w})
              .join();
        };
        int reused = 0;
        for (int round = 0; round < 20; ++round) {
          // Allocated from worker 0's cache, released to worker 1's.
          ASSERT_EQ(this_fiber::worker_index(), 0u);
          const void* first = block_of_a_child_on(1);
          // Allocated from worker 1's cache.
          const void* second = spawn([&] { return block_of_a_child_on(1); }, {.worker = 1}).join();
          reused += first == second;
        }
        EXPECT_GE(reused, 15) << "blocks freed on worker 1 were not reused there";
        }, {.pinned = true, .worker = 0}).join();  // stays on worker 0
      },
      o);
}
#endif

TEST_P(Fibers, IdsAndNamesAreThoseGivenAtSpawn) {
  Run([] {
    auto h = spawn([] { return std::string(this_fiber::name()); }, {.name = "worker-7"});
    std::uint64_t id = h.id();
    EXPECT_GT(id, 0u);
    EXPECT_EQ(h.join(), "worker-7");
    EXPECT_EQ(this_fiber::name(), "main");
  });
}

// A name is kept to its first 63 bytes (the block holds it: no allocation
// per name), cut before a UTF-8 character it would split: the cut fell
// inside a two-byte "é", and name(), dump() and the deadlock report
// showed a name ending in a stray lead byte (invalid UTF-8).
TEST_P(Fibers, ALongNameIsCutAtACharacterBoundary) {
  Run([] {
    std::string ascii(1000, 'x');
    EXPECT_EQ(spawn([] { return std::string(this_fiber::name()); }, {.name = ascii}).join(),
              std::string(63, 'x'));
    std::string accents;
    for (int i = 0; i < 40; ++i) accents += "\xc3\xa9";  // é, two bytes
    EXPECT_EQ(spawn([] { return std::string(this_fiber::name()); }, {.name = accents}).join(),
              accents.substr(0, 62));
    std::string euro = "x" + std::string(20, 'y');
    for (int i = 0; i < 20; ++i) euro += "\xe2\x82\xac";  // €, three bytes
    // 21 ASCII bytes and 14 whole euros are 63 bytes: nothing to cut.
    EXPECT_EQ(spawn([] { return std::string(this_fiber::name()); }, {.name = euro}).join(),
              euro.substr(0, 63));
    euro = "x" + euro;  // now the 63rd byte is inside a euro: 22 + 13 * 3 = 61
    EXPECT_EQ(spawn([] { return std::string(this_fiber::name()); }, {.name = euro}).join(),
              euro.substr(0, 61));
  });
}

// options::stack_size 0 is the default (64 KiB), as spawn_options'
// stack_size 0 and options::workers 0 are. It was taken as a size, rounded
// up to the smallest class: every fiber, main included, ran on a 1 KiB
// stack without a guard page, and a frame of a few KiB wrote silently into
// the neighbouring stacks.
TEST_P(Fibers, ARunStackSizeOfZeroMeansTheDefault) {
  auto stack_bytes = [] {
    const alloc::stack& s = sched::current_fiber()->stack_;
    return static_cast<std::size_t>(s.hi - s.lo);
  };
  options o;
  o.stack_size = 0;
  Run([&] {
    EXPECT_GE(stack_bytes(), options{}.stack_size);
    EXPECT_GE(spawn(stack_bytes).join(), options{}.stack_size);
  }, o);
}

// Puts a pipe on fd 2 while it lives, so a test reads the SIGQUIT dump
// (written by the dumper's thread) as it comes, instead of sleeping for a
// guess at how long it takes.
struct stderr_pipe {
  int read_end = -1;
  int saved = -1;
  stderr_pipe() {
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return;
    saved = ::dup(2);
    ::dup2(p[1], 2);
    ::close(p[1]);
    read_end = p[0];
  }
  ~stderr_pipe() {
    if (saved >= 0) ::dup2(saved, 2), ::close(saved);
    if (read_end >= 0) ::close(read_end);
  }
};

// From a fiber: sends SIGQUIT until a dump that shows `want` has been read
// (at most 10 s). Again every 100 ms: a fiber just spawned on another
// worker shows as [not started] until that worker runs it (under TSan, on
// a loaded machine, that took longer than the 5 ms this test waited).
std::string dump_until(const stderr_pipe& p, std::string_view want) {
  std::string err;
  const auto until = std::chrono::steady_clock::now() + 10s;
  auto next_kill = std::chrono::steady_clock::now();
  while (err.find(want) == std::string::npos && std::chrono::steady_clock::now() < until) {
    if (std::chrono::steady_clock::now() >= next_kill) {
      ::kill(::getpid(), SIGQUIT);
      next_kill += 100ms;
    }
    char buf[4096];
    ssize_t n = ::read(p.read_end, buf, sizeof buf);
    if (n > 0) err.append(buf, static_cast<std::size_t>(n));
    else (void)this_fiber::sleep_for(1ms);
  }
  return err;
}

// The SIGQUIT dump while a fiber "napper" sleeps, read from a pipe on fd
// 2; run: the test's Run().
template <typename RunFn>
std::string dump_with_a_napper(RunFn run) {
  stderr_pipe p;
  if (p.read_end < 0) return "(no pipe for stderr)";
  std::string err;
  run([&] {
    auto h = spawn([] { (void)this_fiber::sleep_for(10s); }, {.name = "napper"});
    err = dump_until(p, "\"napper\" [sleep] at");
    h.request_stop();
    (void)h.join();
  });
  return err;
}

TEST_P(Fibers, SigquitDumpsEveryFiberAndTheProgramGoesOn) {
  std::string err = dump_with_a_napper([&](auto body) { Run(body); });
  EXPECT_NE(err.find("fiber 1 \"main\""), std::string::npos) << err;
  EXPECT_NE(err.find("\"napper\" [sleep] at"), std::string::npos) << err;
}

// A shell starts a background job (`server &`) with SIGQUIT ignored, and
// the dumper installed itself only over the default action: kill -QUIT of
// such a server printed nothing. Ignored now counts as no handler (as in
// Go's runtime), and is what run() leaves behind.
TEST_P(Fibers, SigquitDumpsInAProgramStartedWithSigquitIgnored) {
  struct sigaction ign {}, before {};
  ign.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGQUIT, &ign, &before), 0);
  std::string err = dump_with_a_napper([&](auto body) { Run(body); });
  struct sigaction after {};
  ASSERT_EQ(::sigaction(SIGQUIT, &before, &after), 0);
  EXPECT_EQ(after.sa_handler, SIG_IGN) << "run() did not put the ignore back";
  EXPECT_NE(err.find("weft: SIGQUIT: every fiber"), std::string::npos) << err;
  EXPECT_NE(err.find("\"napper\" [sleep] at"), std::string::npos) << err;
}

TEST(FiberMonitor, AFiberThatHogsItsWorkerIsReportedOnce) {
  ::testing::internal::CaptureStderr();
  weft::options o;
  o.workers = 1;
  o.hog_warning = 100ms;
  weft::run([] {
    spawn([] {
      (void)this_fiber::sleep_for(1ms);
      auto until = std::chrono::steady_clock::now() + 400ms;
      while (std::chrono::steady_clock::now() < until) {
      }
    }, {.name = "cruncher"}).join();
  }, o);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("\"cruncher\" (last parked at "), std::string::npos) << err;
  EXPECT_NE(err.find("fiber_test.cc:"), std::string::npos) << err;
  auto first = err.find("has run for");
  EXPECT_NE(first, std::string::npos) << err;
  EXPECT_EQ(err.find("has run for", first + 1), std::string::npos) << "reported twice: " << err;
  EXPECT_NE(err.find("without parking or yielding"), std::string::npos) << err;
}

// A fiber that yields with nothing else runnable on its worker continues in
// place: no other fiber runs there, but the worker is not stuck (it reaches
// its loop every 61 yields). The monitor took it for one that never parks
// or yields: it reported it as a hog ("without parking or yielding") and
// treated its worker as stuck.
TEST(FiberMonitor, AFiberThatYieldsAloneOnItsWorkerIsNotAHog) {
  ::testing::internal::CaptureStderr();
  weft::options o;
  o.workers = 1;
  o.hog_warning = 50ms;
  std::uint64_t yields = 0;
  weft::run([&] {
    spawn([&] {
      auto until = std::chrono::steady_clock::now() + 300ms;
      while (std::chrono::steady_clock::now() < until) {
        auto slice = std::chrono::steady_clock::now() + 1ms;
        while (std::chrono::steady_clock::now() < slice) {
        }
        this_fiber::yield();
        ++yields;
      }
    }, {.name = "yielder"}).join();
  }, o);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_GT(yields, 50u);  // it did yield, alone, all along
  EXPECT_EQ(err.find("has run for"), std::string::npos) << err;
}

// --- Fatal reports (death tests run the runtime in a child process) -----

// A signal_set that watched SIGQUIT during run() and goes away after it
// puts back what it found, the dumper's handler, which then acts as the
// disposition the dumper replaced. That was always the default action
// (terminate); with SIGQUIT ignored before run() it must stay ignored.
TEST(FiberDeath, SigquitStaysIgnoredAfterASignalSetOutlivesTheRun) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ::signal(SIGQUIT, SIG_IGN);
        std::optional<signal_set> set;
        weft::run([&] { set.emplace(*signal_set::watch({SIGQUIT})); });
        set.reset();
        ::raise(SIGQUIT);  // delivered to this thread before raise returns
        ::raise(SIGQUIT);
        std::fprintf(stderr, "still here\n");
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "still here");
}


void Recurse(int depth) {
  volatile char pad[512];
  pad[0] = static_cast<char>(depth);
  if (depth > 0) Recurse(depth - 1);
  (void)pad[0];
}

// Stacks are bound when a fiber first runs, but the size is checked at
// spawn: the spawner hears about it, not some worker later.
TEST(FiberDeath, AStackSizeAboveTheLargestClassFailsAtSpawn) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(weft::run([] {
                 std::fprintf(stderr, "spawning\n");
                 (void)spawn([] {}, {.stack_size = std::size_t{1} << 30});
                 std::fprintf(stderr, "spawned\n");
               }),
               // The line after "spawning" is the abort, not "spawned".
               "spawning\n[^\n]*a stack of 1073741824 bytes was requested; the largest "
               "class is 8388608 bytes");
}

// A negative worker index other than -1 (the spawning worker) is a
// mistake said at spawn; it was taken quietly as -1.
TEST(FiberDeath, ANegativeWorkerIndexFailsAtSpawn) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(weft::run([] { (void)spawn([] {}, {.worker = -2}); }),
               "spawn: spawn_options::worker is negative");
}

TEST(FiberDeath, StackOverflowNamesTheFiberAndItsStackSize) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(weft::run([] {
                 spawn([] { Recurse(1'000'000); }, {.name = "deep", .stack_size = 16 * 1024})
                     .join();
               }),
               "stack overflow in fiber [0-9]+ \"deep\" \\(stack size 16384");
}

// Fills a frame larger than a 2 KiB stack has left: it runs past the
// stack's low end, over its canary, into the neighbouring slot.
[[gnu::noinline]] void Scribble() {
  volatile char buf[2304];
  for (auto& c : buf) c = 1;
  (void)buf[0];
}

// Stacks below a page (kSmallStack's 2 KiB; 16 KiB under the sanitizers,
// hence the number here) have no guard page: the canary at their low end
// is checked each time the fiber switches away (here: as it exits).
TEST(FiberDeath, AnOverflowOfAStackWithoutAGuardPageIsCaughtAtItsNextSwitch) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(weft::run([] {
                 spawn([] { Scribble(); }, {.name = "tiny", .stack_size = 2 * 1024}).join();
               }),
               "stack overflow in fiber [0-9]+ \"tiny\" \\(stack size 2048");
}

// this_fiber::sleep_for is for fibers: a plain thread (inside a run or not)
// that calls it is told so by name, not with the internal "park" it goes
// through.
TEST(FiberDeath, SleepingOnAPlainThreadIsRefusedByName) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH((void)this_fiber::sleep_for(1ms),
               "this_fiber::sleep_for/sleep_until: called outside a fiber");
  EXPECT_DEATH(weft::run([] {
                 std::thread t([] { (void)this_fiber::sleep_for(1ms); });
                 blocking([&] { t.join(); });
               }),
               "this_fiber::sleep_for/sleep_until: called outside a fiber");
}

// weft::run inside a running runtime (here: from a fiber) is refused with
// a message, not a second set of workers fighting over the first's state.
TEST(FiberDeath, ARunInsideARunIsRefusedClearly) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(weft::run([] { return weft::run([] { return 0; }); }),
               "only one weft runtime may run at a time");
}

TEST(FiberDeath, AllFibersAsleepIsReportedAsADeadlock) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // Two fibers park where nothing can ever wake them (no timer, no I/O, no
  // waker): the runtime must say so and exit 2 instead of hanging.
  EXPECT_EXIT(weft::run([] {
                auto h = spawn([] { sched::park({.what = "nothing"}); },
                               {.name = "stuck"});
                h.join();
              }),
              ::testing::ExitedWithCode(2),
              "all fibers are asleep - deadlock!(.|\n)*fiber [0-9]+ \"main\" "
              "\\[join\\] at .*fiber_test.cc:[0-9]+(.|\n)*\"stuck\" \\[nothing\\]");
}

// The deadlock report ends the process with _Exit (no atexit handlers, no
// static destructors: other threads still run), which dropped what the
// program had printed to a stdout that is a file or a pipe (fully
// buffered): the lines saying how far it got before it hung, which is what
// one reads first when it did. Go's stdout is unbuffered and loses none.
TEST(FiberDeath, TheDeadlockReportKeepsWhatTheProgramPrintedFirst) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::string path = ::testing::TempDir() + "weft_deadlock_stdout.txt";
  std::remove(path.c_str());
  EXPECT_EXIT(
      {
        // A file: fully buffered, as a pipe to a log collector is.
        if (!std::freopen(path.c_str(), "w", stdout)) std::_Exit(3);
        weft::run([] {
          std::printf("step 1 done\n");
          sched::park({.what = "nothing"});
        });
      },
      ::testing::ExitedWithCode(2), "all fibers are asleep - deadlock!");
  std::FILE* f = std::fopen(path.c_str(), "r");
  ASSERT_NE(f, nullptr);
  char buf[64] = {};
  std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  std::remove(path.c_str());
  EXPECT_EQ(std::string(buf, n), "step 1 done\n");
}

TEST(FiberDeath, NoDeadlockReportWhileATimerIsPending) {
  // A fiber asleep with a deadline is not deadlocked: this run must finish.
  EXPECT_EQ(weft::run([] {
              auto h = spawn([] { (void)this_fiber::sleep_for(50ms); });
              h.join();
              return 3;
            }),
            3);
}

// A plain thread that spawns fibers may spawn again, as one that sends on
// a channel may send again: it counts as a possible waker from its first
// spawn. Here main waits for a value from a fiber the thread spawns 300 ms
// after its first: uncounted, the runtime reported a deadlock (exit 2) as
// soon as main waited for the second value.
TEST(FiberDeath, NoDeadlockReportWhileAPlainThreadThatSpawnedMaySpawnAgain) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        testing::exit_42_after(std::chrono::seconds(30));
        int rc = weft::run([] {
          channel<int> ch(0);
          std::atomic<bool> spawned{false};
          std::thread t([&] {
            go([&] { (void)ch.send(1); });
            spawned = true;
            std::this_thread::sleep_for(300ms);
            go([&] { (void)ch.send(2); });
          });
          // Not parked until the thread has spawned (until then it is a
          // thread that fibers wait for, which only an outside_ref counts).
          while (!spawned) this_fiber::yield();
          int sum = ch.recv().value_or(100);
          sum += ch.recv().value_or(100);
          t.join();
          return sum;
        });
        std::_Exit(rc == 3 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

// A fiber woken by a plain thread goes to the inject queue. Every 61st
// tick a worker looks there before its own queue (Go's schedtick % 61), so
// that fiber runs even while the only worker's own queue never empties (a
// fiber yielding in a loop). The bound, 10000 yields after the wake, is
// far above 61 ticks; without the rule the yields would go on forever.
TEST(FiberFairness, AFiberWokenByAPlainThreadRunsWhileItsWorkerNeverRunsDry) {
  weft::run([] {
    channel<int> ch(0);
    std::atomic<bool> received{false};
    std::uint64_t parks = stats().parks;
    auto receiver = spawn([&] {
      EXPECT_EQ(ch.recv(), 7);
      received = true;
    });
    while (stats().parks == parks) this_fiber::yield();  // it is parked in recv
    std::atomic<bool> sent{false};
    std::thread waker([&, ref = outside_ref()] {
      EXPECT_TRUE(ch.send(7));  // hands 7 over and readies the receiver
      sent = true;
    });
    long yields_after_send = 0;
    while (!received && yields_after_send < 10'000) {
      this_fiber::yield();
      if (sent) ++yields_after_send;
    }
    EXPECT_TRUE(received) << "the woken fiber did not run in " << yields_after_send
                          << " yields of the only other fiber";
    waker.join();
    receiver.join();  // parks: now the worker runs dry and takes it anyway
  }, {.workers = 1});
}

}  // namespace
}  // namespace weft
