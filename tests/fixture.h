// tests/fixture.h
//
// The runtime fixture: every test body runs inside weft::run over worker
// counts {1, 2, 4}. Leaked fibers or stacks at teardown fail the test: when
// run() tears the runtime down, ~scheduler checks that no fiber is alive and
// ~stack_pool that every stack went back to the pool (WEFT_CHECK aborts).
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

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

inline std::string WorkerCountName(const ::testing::TestParamInfo<unsigned>& i) {
  return std::to_string(i.param) + "_workers";
}

#define WEFT_RUNTIME_TEST_SUITE(suite)                                         \
  INSTANTIATE_TEST_SUITE_P(Workers, suite, ::testing::Values(1u, 2u, 4u), \
                           ::weft::testing::WorkerCountName)

}  // namespace weft::testing
