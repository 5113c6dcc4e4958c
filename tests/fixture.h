// tests/fixture.h
//
// The runtime fixture: every test body runs inside weft::run over worker
// counts {1, 2, 4}. Leaked fibers or stacks at teardown fail the test: when
// run() tears the runtime down, ~scheduler checks that no fiber is alive and
// ~stack_pool that every stack went back to the pool (WEFT_CHECK aborts).
#pragma once

#include <gtest/gtest.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "runtime/weft.h"

namespace weft::testing {

// TSan tracks each fiber as a thread and allows 8128 at once; ASan makes
// each far more expensive. Tests that want "a million" use this.
#if defined(WEFT_TSAN)
inline constexpr int kMillion = 4000;
#elif defined(WEFT_ASAN)
inline constexpr int kMillion = 100'000;
#else
inline constexpr int kMillion = 1'000'000;
#endif

class Runtime : public ::testing::TestWithParam<unsigned> {
 protected:
  unsigned workers() const { return GetParam(); }
  // Runs fn as the main fiber; returns main's value.
  template <typename F>
  int Run(F&& fn, options o = {}) {
    o.workers = workers();
    return weft::run(std::forward<F>(fn), o);
  }
};

// For death tests of the deadlock report: a process that must end when
// the report does, whatever went wrong. A hang would make the test time
// out without saying why; this exits 42 after `s`, saying so.
inline void exit_42_after(std::chrono::seconds s) {
  std::thread([s] {
    std::this_thread::sleep_for(s);
    std::fprintf(stderr, "no deadlock report after %lld s\n", static_cast<long long>(s.count()));
    std::_Exit(42);
  }).detach();
}

// Fibers that compute for `slice` between yields, as the hog warning asks
// long loops to do: with two per worker, every worker is busy switching
// fibers, yet none is stuck in one (the monitor's rescue is for those).
// For tests of what such a worker must still do on time (timers, I/O,
// fibers woken by plain threads). Spawned in the constructor, stopped and
// joined in the destructor; a fiber only.
class busy_yielders {
 public:
  busy_yielders(unsigned n, std::chrono::milliseconds slice) {
    for (unsigned i = 0; i < n; ++i)
      fibers_.push_back(spawn([this, slice] {
        while (!stop_.load(std::memory_order_relaxed)) {  // relaxed: a flag, nothing else
          auto until = std::chrono::steady_clock::now() + slice;
          while (std::chrono::steady_clock::now() < until) {
          }
          this_fiber::yield();
        }
      }));
  }
  ~busy_yielders() {
    stop_.store(true, std::memory_order_relaxed);
    for (auto& f : fibers_) f.join();
  }
  busy_yielders(const busy_yielders&) = delete;
  busy_yielders& operator=(const busy_yielders&) = delete;

 private:
  std::atomic<bool> stop_{false};
  std::vector<join_handle<void>> fibers_;
};

// *Run time*: how long `workers` workers have had a CPU, for the tests of
// how late a worker busy with such fibers does something (fire a timer,
// poll its driver, take the inject queue). It is the process's CPU time
// over min(workers, CPUs), which advances at the wall clock's pace while
// the workers run and not while the host or other processes keep them off
// the CPUs. Those tests bound the smaller of the two latenesses: a CI run
// that builds beside them stalled a worker for over a second (a
// 700 ms wall-clock bound failed at 1,413 ms, with the hog warning for a
// fiber that yields every 20 ms), while the regressions they guard against
// are late by that much *running* time (61 slices of 20 ms).
inline std::chrono::nanoseconds run_time(unsigned workers) {
  timespec ts;
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
  const auto cpu = std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
  return cpu / std::min(workers, cpus);
}

// The later moment of an event, on both clocks (see run_time()).
struct when {
  std::chrono::steady_clock::time_point wall;
  std::chrono::nanoseconds run;
  static when now(unsigned workers) { return {std::chrono::steady_clock::now(), run_time(workers)}; }
  // How much later than `before` this is: the smaller of the two spans.
  std::chrono::nanoseconds since(const when& before) const {
    return std::min(std::chrono::duration_cast<std::chrono::nanoseconds>(wall - before.wall),
                    run - before.run);
  }
};

// Inside a run: runs busy() on a fiber pinned to worker 0 beside a
// neighbour pinned there that counts its turns (a yield each), and returns
// how many turns it had while busy() ran. For the tests that an operation
// completing at once still spends the coop budget (sched/park.h): busy()
// never parks, so without the budget the neighbour gets none.
template <typename F>
long neighbour_turns_during(F busy) {
  std::atomic<bool> done{false};
  std::atomic<long> ticks{0};
  long during = 0;
  auto neighbour = spawn([&] {
    while (!done.load()) {
      ticks.fetch_add(1);
      this_fiber::yield();
    }
  }, {.pinned = true, .worker = 0});
  auto busy_fiber = spawn([&] {
    (void)this_fiber::sleep_for(std::chrono::milliseconds(1));  // the neighbour runs by now
    long before = ticks.load();
    busy();
    during = ticks.load() - before;
    done.store(true);
  }, {.pinned = true, .worker = 0});
  busy_fiber.join();
  neighbour.join();
  return during;
}

// Put at the top of a fiber's body: stores, as the body is left, whether
// an exception was leaving it (the runtime's fiber_unwind at exit).
struct unwind_witness {
  std::atomic<bool>& unwound;
  ~unwind_witness() { unwound.store(std::uncaught_exceptions() > 0); }
};

inline std::string WorkerCountName(const ::testing::TestParamInfo<unsigned>& i) {
  return std::to_string(i.param) + "_workers";
}

#define WEFT_RUNTIME_TEST_SUITE(suite)                                         \
  INSTANTIATE_TEST_SUITE_P(Workers, suite, ::testing::Values(1u, 2u, 4u), \
                           ::weft::testing::WorkerCountName)

}  // namespace weft::testing
