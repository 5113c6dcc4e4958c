// io/blocking_test.cc — weft::blocking: results and exceptions come back to
// the fiber, calls run in parallel on the pool, the worker keeps
// running other fibers meanwhile. Over worker counts {1, 2, 4}.
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/sync.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class Blocking : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Blocking);

TEST_P(Blocking, ReturnsTheCallsValueToTheFiber) {
  Run([&] {
    std::vector<join_handle<int>> hs;
    for (int i = 0; i < 100; ++i) hs.push_back(spawn([i] { return blocking([i] { return i * i; }); }));
    for (int i = 0; i < 100; ++i) EXPECT_EQ(hs[i].join(), i * i);
    std::string s = blocking([] { return std::string("from the pool"); });
    EXPECT_EQ(s, "from the pool");
    blocking([] {});  // void works too
  });
}

// A call that returns an lvalue reference gives the caller that reference
// (as std::async's future<T&> does), not a copy.
TEST_P(Blocking, ReturnsAReferenceAsAReference) {
  Run([&] {
    std::vector<int> table{1, 2, 3};
    int& slot = blocking([&]() -> int& { return table[1]; });
    EXPECT_EQ(&slot, &table[1]);
    slot = 20;
    EXPECT_EQ(table[1], 20);
    const std::vector<int>& whole = blocking([&]() -> const std::vector<int>& { return table; });
    EXPECT_EQ(&whole, &table);
  });
}

TEST_P(Blocking, RethrowsTheCallsExceptionInTheFiber) {
  Run([&] {
    EXPECT_THROW(blocking([]() -> int { throw std::runtime_error("no"); }), std::runtime_error);
  });
}

TEST_P(Blocking, CallsRunInParallel) {
  constexpr int kCalls = 8;
  std::atomic<int> arrived{0};
  std::atomic<int> saw_all{0};
  Run([&] {
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < kCalls; ++i)
      hs.push_back(spawn([&] {
        blocking([&] {
          // Every call waits until all have started: only parallel calls pass.
          arrived.fetch_add(1);
          auto until = std::chrono::steady_clock::now() + 10s;
          while (arrived.load() < kCalls && std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(1ms);
          if (arrived.load() == kCalls) saw_all.fetch_add(1);
        });
      }));
    for (auto& h : hs) h.join();
  });
  EXPECT_EQ(saw_all.load(), kCalls);
}

int cpus_of_this_thread() {
  cpu_set_t s;
  CPU_ZERO(&s);
  if (sched_getaffinity(0, sizeof s, &s) != 0) return -1;
  return CPU_COUNT(&s);
}

// A pool thread is started by a worker, pinned to one CPU, and inherited
// that: every blocking() call of a program whose fibers ran on worker 0
// queued on CPU 0, beside the worker, while the other CPUs idled. Pool
// threads run on every CPU the runtime started with.
TEST_P(Blocking, PoolThreadsRunOnEveryCpuTheRuntimeStartedWith) {
  const int all = cpus_of_this_thread();
  int worker = 0;
  std::vector<int> pool;
  Run([&] {
    worker = cpus_of_this_thread();
    // Several at once, so the pool starts threads from this worker now.
    std::vector<join_handle<int>> hs;
    for (int i = 0; i < 4; ++i)
      hs.push_back(spawn([] {
        return blocking([] {
          std::this_thread::sleep_for(20ms);
          return cpus_of_this_thread();
        });
      }, {.worker = 0}));
    for (auto& h : hs) pool.push_back(h.join());
  });
  // Workers are pinned to one CPU each where there are enough CPUs (with
  // more workers than CPUs they are not pinned).
  if (static_cast<int>(workers()) <= all) {
    EXPECT_EQ(worker, 1);
  }
  for (int n : pool) EXPECT_EQ(n, all) << "a pool thread kept its worker's CPU";
}

// A std::thread started from a fiber inherits its worker's CPU too;
// unpin_this_thread() lets it run on all of them.
TEST_P(Blocking, AThreadStartedFromAFiberCanUnpinItself) {
  const int all = cpus_of_this_thread();
  int worker = 0, before = 0, after = 0;
  bool ok = false;
  Run([&] {
    worker = cpus_of_this_thread();
    std::thread t([&] {
      before = cpus_of_this_thread();
      ok = unpin_this_thread().has_value();
      after = cpus_of_this_thread();
    });
    t.join();
  });
  EXPECT_EQ(before, worker) << "a thread inherits its creator's affinity";
  EXPECT_TRUE(ok);
  EXPECT_EQ(after, all);
}

// unpin_this_thread() is for a plain thread. Called from a fiber, it would
// unpin the worker the fiber runs on, for good: a program that called it
// "before starting a thread" (thinking the thread would inherit it) lost
// its worker's pinning without a word. It is an error there and changes
// nothing.
TEST_P(Blocking, UnpinThisThreadOnAWorkerIsAnErrorAndKeepsItsCpus) {
  int before = 0, after = 0;
  result<void> r;
  Run([&] {
    before = cpus_of_this_thread();
    r = unpin_this_thread();
    after = cpus_of_this_thread();  // the same worker: nothing parked between
  });
  EXPECT_EQ(after, before) << "the worker's CPUs changed";
  ASSERT_FALSE(r) << "unpin_this_thread() on a worker said it succeeded";
  EXPECT_EQ(r.error(), std::errc::operation_not_permitted) << r.error().message();
}

// A blocking() call that takes a weft lock makes its pool thread a
// possible waker while it runs (a plain thread holding a lock fibers may
// park on), and only then: idle in the pool it wakes no one. It used to
// stay one until the thread exited after 10 s idle, and a deadlock after
// such a call was reported only then.
TEST(BlockingDeath, ALockTakenInABlockingCallDoesNotHideALaterDeadlock) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        testing::exit_42_after(5s);  // the pool's idle exit is 10 s
        weft::run([] {
          mutex m;
          blocking([&] {
            m.lock();
            m.unlock();
          });
          channel<int> never(0);
          (void)never.recv();  // nothing sends
        }, {.workers = 1});
      },
      ::testing::ExitedWithCode(2), "all fibers are asleep - deadlock!");
}

// *Stalls* (io/blocking.cc): with every pool thread in a call that waits
// for a call queued behind it, nothing would ever say why the program
// hangs (the waiting fibers keep the deadlock report quiet). A call that
// has waited a second for a thread is reported once, with where it was
// made. Here the pool has one thread; the first call waits (3 s at most)
// for a flag that only the second, queued behind it, sets.
constexpr unsigned kQueuedCallLine = __LINE__ + 12;  // the second blocking() below

void two_calls_on_a_pool_of_one() {
  ::setenv("WEFT_BLOCKING_THREADS", "1", 1);  // before the pool's first use
  weft::run([] {
    std::atomic<bool> flag{false};
    auto first = spawn([&] {
      blocking([&] {
        for (int i = 0; i < 300 && !flag.load(); ++i) std::this_thread::sleep_for(10ms);
      });
    });
    (void)this_fiber::sleep_for(50ms);  // the first call holds the thread
    blocking([&] { flag.store(true); });
    first.join();
  }, {.workers = 1});
}

TEST(BlockingDeath, ACallWaitingForABusyPoolIsReported) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        testing::exit_42_after(20s);
        two_calls_on_a_pool_of_one();
        std::exit(0);
      },
      ::testing::ExitedWithCode(0),
      "weft: blocking pool: a call made at .*blocking_test.cc:" + std::to_string(kQueuedCallLine) +
          " has waited 1\\.[0-9] s for a thread; all 1 are busy and 1 calls wait");
}

TEST_P(Blocking, TheWorkerRunsOtherFibersWhileACallBlocks) {
  Run([&] {
    std::atomic<bool> release{false};
    auto h = spawn([&] {
      blocking([&] {
        while (!release.load()) std::this_thread::sleep_for(1ms);
      });
    });
    // This fiber (maybe on the same worker) still runs and sleeps.
    for (int i = 0; i < 5; ++i) (void)this_fiber::sleep_for(1ms);
    release.store(true);
    h.join();
  });
}

// A blocking fn that itself calls blocking() (a library that wraps its
// own slow calls) runs the inner call on its own pool thread: the pool
// thread may block, and there is no fiber to park. More callers than the
// pool has threads (64): were the inner calls queued for a free pool
// thread, a full pool would wait for itself. Before, the inner call
// parked off a fiber and aborted the process ("park: called outside a
// fiber").
TEST_P(Blocking, ACallMadeInsideABlockingCallRunsOnThatPoolThread) {
  constexpr int kCalls = 100;
  std::atomic<int> same_thread{0};
  Run([&] {
    std::vector<join_handle<int>> hs;
    for (int i = 0; i < kCalls; ++i)
      hs.push_back(spawn([&, i] {
        return blocking([&, i] {
          auto outer = std::this_thread::get_id();
          std::this_thread::sleep_for(2ms);  // the pool fills up
          return blocking([&, i] {
            if (std::this_thread::get_id() == outer) same_thread.fetch_add(1);
            return i + 1;
          });
        });
      }));
    for (int i = 0; i < kCalls; ++i) EXPECT_EQ(hs[i].join(), i + 1);
  });
  EXPECT_EQ(same_thread.load(), kCalls);
}

// A plain thread (not a worker) may call blocking() too, while the runtime
// runs and outside it: fn runs on that thread. Before, it aborted the same
// way (or crashed on the missing scheduler outside a runtime).
TEST_P(Blocking, APlainThreadCanCallIt) {
  int in_run = 0;
  Run([&] {
    std::thread t([&] { in_run = blocking([] { return 41; }) + 1; });
    t.join();
  });
  EXPECT_EQ(in_run, 42);
  int outside = 0;
  std::thread([&] { outside = blocking([] { return 7; }); }).join();
  EXPECT_EQ(outside, 7);
}


// A process that used the pool and then forks (a pre-fork server, a test
// harness's child) has in the child none of the pool's threads, only its
// counts of them: calls queued for threads that idled in the parent, and
// the child's blocking() calls (and epoll's file I/O) waited for ever.
TEST_P(Blocking, AForkedChildHasAWorkingPool) {
#if defined(WEFT_TSAN)
  GTEST_SKIP() << "TSan does not support starting threads after a multi-threaded fork";
#endif
  Run([&] { EXPECT_EQ(blocking([] { return 1; }), 1); });  // the pool now has an idle thread
  std::fflush(nullptr);
  pid_t p = ::fork();
  ASSERT_GE(p, 0);
  if (p == 0) {
    ::alarm(10);
    int got = 0;
    weft::run([&] {
      std::vector<join_handle<int>> hs;
      for (int i = 0; i < 4; ++i) hs.push_back(spawn([i] { return blocking([i] { return i; }); }));
      for (auto& h : hs) got += h.join();
    }, {.workers = GetParam()});
    ::_exit(got == 6 ? 0 : 1);
  }
  int st = 0;
  ASSERT_EQ(::waitpid(p, &st, 0), p);
  ASSERT_FALSE(WIFSIGNALED(st)) << "child killed by signal " << WTERMSIG(st)
                                << (WTERMSIG(st) == SIGALRM ? " (it hung)" : "");
  EXPECT_EQ(WEXITSTATUS(st), 0);
}

}  // namespace
}  // namespace weft
