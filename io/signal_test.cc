// io/signal_test.cc — weft::signal_set: fibers and plain threads waiting
// for signals sent to the process, every watcher seeing each delivery,
// deadlines and stop requests, refused signals, and the previous
// disposition restored. Runs on both drivers (see io/BUILD.bazel) over
// worker counts {1, 2, 4}.
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/select.h"
#include "runtime/sync.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class Signals : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Signals);

// Sends `sig` to the process from a plain thread that never touched the
// runtime, after `delay`: the waiting fiber is all the runtime has, and it
// must count as I/O in flight (no deadlock report).
std::thread send_later(int sig, std::chrono::milliseconds delay) {
  return std::thread([=] {
    std::this_thread::sleep_for(delay);
    ::kill(::getpid(), sig);
  });
}

struct sigaction disposition_of(int sig) {
  struct sigaction sa {};
  ::sigaction(sig, nullptr, &sa);
  return sa;
}

TEST_P(Signals, AFiberWaitsForASignalSentByAnotherThread) {
  Run([&] {
    auto set = signal_set::watch({SIGUSR1, SIGUSR2});
    ASSERT_TRUE(set) << set.error().message();
    std::thread t = send_later(SIGUSR2, 50ms);
    auto s = set->wait();
    t.join();
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_EQ(*s, SIGUSR2);
  });
}

TEST_P(Signals, EachDeliveryIsReturnedOnceAndThenWaitTimesOut) {
  Run([&] {
    auto set = signal_set::watch({SIGUSR1, SIGUSR2});
    ASSERT_TRUE(set);
    // raise() sends to the calling thread, which does not block the
    // signal: each is handled before raise returns, so none is merged.
    ASSERT_EQ(::raise(SIGUSR1), 0);
    ASSERT_EQ(::raise(SIGUSR2), 0);
    ASSERT_EQ(::raise(SIGUSR1), 0);
    int usr1 = 0, usr2 = 0;
    for (int i = 0; i < 3; ++i) {
      auto s = set->wait(deadline(5s));
      ASSERT_TRUE(s) << s.error().message();
      (*s == SIGUSR1 ? usr1 : usr2) += 1;
    }
    EXPECT_EQ(usr1, 2);
    EXPECT_EQ(usr2, 1);
    auto t0 = std::chrono::steady_clock::now();
    auto none = set->wait(deadline(30ms));
    ASSERT_FALSE(none);
    EXPECT_EQ(none.error(), std::errc::timed_out);
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 30ms);
    auto again = set->try_wait();
    ASSERT_FALSE(again);
    EXPECT_EQ(again.error(), std::errc::resource_unavailable_try_again);
  });
}

TEST_P(Signals, EveryWatcherSeesEachDelivery) {
  Run([&] {
    constexpr int kWatchers = 8;
    std::vector<join_handle<int>> hs;
    weft::latch watching(kWatchers);
    for (int i = 0; i < kWatchers; ++i)
      hs.push_back(spawn([&] {
        auto set = signal_set::watch({SIGUSR1});
        watching.count_down();
        if (!set) return -1;
        auto s = set->wait(deadline(10s));
        return s ? *s : -2;
      }));
    watching.wait();
    std::thread t = send_later(SIGUSR1, 20ms);
    for (auto& h : hs) EXPECT_EQ(h.join(), SIGUSR1);
    t.join();
  });
}

// A signal that lands on a worker while a fiber with a 2 KiB stack runs:
// its frame (~3 KiB with AVX-512 state) must go on the worker's
// sigaltstack (SA_ONSTACK), not over the fiber's stack and its
// neighbour's; the canary check at the fiber's next switch would abort.
TEST_P(Signals, TheHandlerNeverRunsOnAFibersStack) {
  Run([&] {
    auto set = signal_set::watch({SIGUSR1});
    ASSERT_TRUE(set);
    auto small = spawn([] {
      // tgkill: delivered to this thread before it returns; a raw system
      // call, so the fiber's own frames stay small.
      ::syscall(SYS_tgkill, ::getpid(), ::gettid(), SIGUSR1);
    }, {.stack_size = kSmallStack});
    small.join();
    auto s = set->wait(deadline(5s));
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_EQ(*s, SIGUSR1);
  });
}

TEST_P(Signals, AStopRequestWakesAWaitingFiber) {
  Run([&] {
    auto waiter = spawn([] {
      auto set = signal_set::watch({SIGUSR1});
      if (!set) return std::error_code();
      auto s = set->wait();
      return s ? std::error_code() : s.error();
    });
    (void)this_fiber::sleep_for(20ms);
    waiter.request_stop();
    EXPECT_EQ(waiter.join(), std::errc::operation_canceled);
  });
}

// The README's way to select on a signal: a fiber forwards it to a channel.
TEST_P(Signals, ASignalCanBeSelectedThroughAForwardingFiber) {
  Run([&] {
    auto stop = signal_set::watch({SIGUSR1});
    ASSERT_TRUE(stop);
    channel<int> sigs(1), jobs(0);
    weft::go([&] {
      if (auto s = stop->wait()) (void)sigs.try_send(*s);
    });
    std::thread t = send_later(SIGUSR1, 20ms);
    std::optional<int> sig, job;
    int fired = weft::select(sigs.on_recv(sig), jobs.on_recv(job), weft::after(10s));
    t.join();
    EXPECT_EQ(fired, 0);
    EXPECT_EQ(sig, SIGUSR1);
  });
}

TEST_P(Signals, APlainThreadCanWaitToo) {
  Run([&] {
    auto set = signal_set::watch({SIGUSR1});
    ASSERT_TRUE(set);
    int got = 0;
    std::thread waiter([&] {
      auto s = set->wait(deadline(10s));
      got = s ? *s : -1;
    });
    std::thread t = send_later(SIGUSR1, 30ms);
    t.join();
    waiter.join();
    EXPECT_EQ(got, SIGUSR1);
  });
}

// A deadline long past (time_point::min()) times out at once on a plain
// thread: min() - now() overflowed to a huge span, and the thread waited
// ~25 days in poll(2). A signal after 5 s ends a regression's wait.
TEST_P(Signals, APlainThreadsDeadlineLongPastTimesOutAtOnce) {
  Run([&] {
    auto set = signal_set::watch({SIGUSR1});
    ASSERT_TRUE(set);
    std::atomic<int> got{0};  // 0: waiting, -2: timed out, -3: other error
    std::thread waiter([&] {
      auto s = set->wait(clock::time_point::min());
      got = s ? *s : s.error() == std::errc::timed_out ? -2 : -3;
    });
    auto give_up = clock::now() + 5s;
    while (got.load() == 0 && clock::now() < give_up) (void)this_fiber::sleep_for(5ms);
    if (got.load() == 0) ::kill(::getpid(), SIGUSR1);  // releases a thread still waiting
    waiter.join();
    EXPECT_EQ(got.load(), -2) << "the plain thread did not time out";
  });
}

TEST_P(Signals, SignalsThatCannotBeWaitedForAreRefused) {
  Run([&] {
    for (int sig : {0, -1, 65, SIGKILL, SIGSTOP, SIGSEGV, SIGBUS, SIGILL, SIGFPE}) {
      auto set = signal_set::watch({SIGUSR1, sig});
      ASSERT_FALSE(set) << sig;
      EXPECT_EQ(set.error(), std::errc::invalid_argument) << sig;
    }
    auto empty = signal_set::watch({});
    ASSERT_FALSE(empty);
    EXPECT_EQ(empty.error(), std::errc::invalid_argument);
    // A refusal changed no disposition.
    EXPECT_EQ(disposition_of(SIGUSR1).sa_handler, SIG_DFL);
  });
}

TEST_P(Signals, TheLastSetGoneRestoresThePreviousDisposition) {
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  struct sigaction before {};
  ASSERT_EQ(::sigaction(SIGUSR2, &ignore, &before), 0);
  Run([&] {
    {
      auto a = signal_set::watch({SIGUSR2});
      auto b = signal_set::watch({SIGUSR2});
      ASSERT_TRUE(a && b);
      EXPECT_NE(disposition_of(SIGUSR2).sa_handler, SIG_IGN);
      a = std::move(*b);  // a's old set goes; b's lives on in a
      EXPECT_NE(disposition_of(SIGUSR2).sa_handler, SIG_IGN);
    }
    EXPECT_EQ(disposition_of(SIGUSR2).sa_handler, SIG_IGN);
  });
  ::sigaction(SIGUSR2, &before, nullptr);
}

// A handler the program installs while a set watches is the program's
// decision: the last set going put back the disposition it had found
// before it, over the program's handler (for SIGUSR2 by default: death
// at the next one). It restores only while weft's handler is installed,
// as the SIGQUIT dumper does.
std::atomic<int> g_program_handler_ran{0};
void program_handler(int) { g_program_handler_ran.fetch_add(1, std::memory_order_relaxed); }

TEST_P(Signals, AHandlerTheProgramInstalledMeanwhileIsNotReplacedWhenTheLastSetGoes) {
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  struct sigaction before {};
  ASSERT_EQ(::sigaction(SIGUSR2, &ignore, &before), 0);
  g_program_handler_ran.store(0, std::memory_order_relaxed);
  Run([&] {
    {
      auto a = signal_set::watch({SIGUSR2});
      ASSERT_TRUE(a);
      struct sigaction mine {};
      mine.sa_handler = &program_handler;
      sigemptyset(&mine.sa_mask);
      ASSERT_EQ(::sigaction(SIGUSR2, &mine, nullptr), 0);
    }
    EXPECT_EQ(disposition_of(SIGUSR2).sa_handler, &program_handler);
    ::raise(SIGUSR2);  // delivered to this thread before raise returns
    EXPECT_EQ(g_program_handler_ran.load(std::memory_order_relaxed), 1);
  });
  ::sigaction(SIGUSR2, &before, nullptr);
}

TEST_P(Signals, SixtyFiveSetsAtOnceFailWithENOSPC) {
  Run([&] {
    std::vector<signal_set> sets;
    std::error_code last;
    for (int i = 0; i < 65; ++i) {
      auto s = signal_set::watch({SIGUSR1});
      if (!s) {
        last = s.error();
        break;
      }
      sets.push_back(std::move(*s));
    }
    EXPECT_EQ(sets.size(), 64u);
    EXPECT_EQ(last, std::errc::no_space_on_device);
    sets.clear();
    EXPECT_TRUE(signal_set::watch({SIGUSR1}));  // slots are reused
  });
}

}  // namespace
}  // namespace weft
