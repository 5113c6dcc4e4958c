// runtime/select_test.cc — weft::select: random choice among ready cases,
// default, timers, stop requests, and exactly-one-case-fires under races.
#include "runtime/select.h"

#include <array>
#include <atomic>
#include <charconv>
#include <cstring>
#include <string_view>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/sync.h"
#include "runtime/task_group.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class Select : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Select);

TEST_P(Select, PicksEveryReadyCaseOverManyRounds) {
  Run([] {
    channel<int> a(1), b(1), c(1);
    std::array<int, 3> picks{};
    for (int round = 0; round < 3000; ++round) {
      for (auto* ch : {&a, &b, &c}) {
        if (ch->size() == 0) {
          ASSERT_TRUE(ch->try_send(round));
        }
      }
      std::optional<int> va, vb, vc;
      int i = select(a.on_recv(va), b.on_recv(vb), c.on_recv(vc));
      ASSERT_GE(i, 0);
      ++picks[i];
      EXPECT_EQ(int{va.has_value()} + vb.has_value() + vc.has_value(), 1);
    }
    for (int p : picks) EXPECT_GT(p, 800) << "a case starved: " << p << " of 3000";
  });
}

TEST_P(Select, DefaultFiresOnlyWhenNothingElseIsReady) {
  Run([] {
    channel<int> ch(1);
    std::optional<int> v;
    EXPECT_EQ(select(ch.on_recv(v), select_default), 1);
    EXPECT_FALSE(v.has_value());
    ASSERT_TRUE(ch.send(5));
    EXPECT_EQ(select(ch.on_recv(v), select_default), 0);
    EXPECT_EQ(v, 5);
    int x = 6;
    EXPECT_EQ(select(ch.on_send(x), select_default), 0);
    EXPECT_EQ(select(ch.on_send(x), select_default), 1);  // full now
  });
}

TEST_P(Select, AfterFiresWhenNoChannelBecomesReady) {
  Run([] {
    channel<int> ch(0);
    std::optional<int> v;
    auto t0 = clock::now();
    EXPECT_EQ(select(ch.on_recv(v), after(50ms), after(10ms)), 2);
    EXPECT_GE(clock::now() - t0, 10ms);
    // The timed-out select left no record in ch: a plain pair still meets.
    auto r = spawn([&] { return ch.recv(); });
    ASSERT_TRUE(ch.send(3));
    EXPECT_EQ(r.join(), 3);
  });
}

// A duration too long for steady_clock's range (nanoseconds::max(),
// seconds::max(): the usual ways to say "forever") is a deadline that never
// comes, as a Go timer's saturating `when` and Tokio's far_future make it.
// now() + duration_cast<nanoseconds>(d) overflowed instead (undefined;
// GCC wraps it into the past), so such an after() fired at once, a wait
// with such a deadline timed out at once and such a sleep returned at once.
TEST_P(Select, AnAfterOrADeadlineTooFarToRepresentNeverComes) {
  Run([] {
    channel<int> ch(0);
    std::optional<int> v;
    EXPECT_EQ(select(ch.on_recv(v), after(std::chrono::nanoseconds::max()), select_default), 2);
    EXPECT_EQ(select(ch.on_recv(v), after(std::chrono::seconds::max()), select_default), 2);
    EXPECT_EQ(select(ch.on_recv(v), after(std::chrono::duration<double>(1e300)), select_default),
              2);
    EXPECT_TRUE(deadline(std::chrono::hours::max()).is_never());
    EXPECT_TRUE(deadline(std::chrono::duration<double>(1e300)).is_never());
    // Ordinary and negative durations keep their meaning.
    EXPECT_FALSE(deadline(1h).is_never());
    EXPECT_EQ(select(ch.on_recv(v), after(-1s), select_default), 1);
    EXPECT_EQ(select(ch.on_recv(v), after(std::chrono::seconds::min()), select_default), 1);
    EXPECT_EQ(select(ch.on_recv(v), after(std::chrono::duration<double>(-1e300)),
                     select_default),
              1);
    // A parked wait and a sleep with such a deadline wait for their event.
    auto sender = spawn([&] {
      (void)this_fiber::sleep_for(2ms);
      return ch.send(7);
    });
    auto r = ch.recv(deadline(std::chrono::seconds::max()));
    ASSERT_TRUE(r.has_value()) << r.error().message();
    EXPECT_EQ(*r, 7);
    EXPECT_TRUE(sender.join());
    auto sleeper = spawn([] { return this_fiber::sleep_for(std::chrono::hours::max()); });
    (void)this_fiber::sleep_for(2ms);
    sleeper.request_stop();
    result<void> slept = sleeper.join();
    ASSERT_FALSE(slept.has_value()) << "the sleep ended before the stop request";
    EXPECT_EQ(slept.error(), std::errc::operation_canceled);
  });
}

TEST_P(Select, AParkedSelectIsWokenByASenderOrAReceiver) {
  Run([] {
    channel<int> in(0), out(0);
    std::optional<int> v;
    int x = 9;
    auto sender = spawn([&] {
      (void)this_fiber::sleep_for(3ms);
      return in.send(4);
    });
    EXPECT_EQ(select(in.on_recv(v), out.on_send(x)), 0);
    EXPECT_EQ(v, 4);
    EXPECT_TRUE(sender.join().has_value());
    auto receiver = spawn([&] {
      (void)this_fiber::sleep_for(3ms);
      return out.recv();
    });
    EXPECT_EQ(select(in.on_recv(v), out.on_send(x)), 1);
    EXPECT_EQ(receiver.join(), 9);
  });
}

TEST_P(Select, ARecvCaseFiresEmptyWhenItsChannelCloses) {
  Run([] {
    channel<int> ch(0), other(0);
    std::optional<int> v = 1, w;
    auto closer = spawn([&] {
      (void)this_fiber::sleep_for(3ms);
      ch.close();
    });
    EXPECT_EQ(select(other.on_recv(w), ch.on_recv(v)), 1);
    EXPECT_FALSE(v.has_value());
    closer.join();
    int x = 1;
    EXPECT_EQ(select(ch.on_send(x)), 0);  // a send case fires on a closed channel
    EXPECT_TRUE(ch.closed());
  });
}

// A select woken by a rendezvous sender is done with that channel, as a
// parked recv is: once its send returns, the sender may destroy the
// channel (a reply channel that the replying fiber owns). The select used
// to lock every one of its channels again to retract its records, the one
// whose sender had just freed it too (ASan: heap-use-after-free in
// retract_records; one worker runs the select after the delete).
TEST_P(Select, TheSenderThatWakesASelectMayDestroyTheChannelOnceItsSendReturns) {
  Run([] {
    for (int round = 0; round < 40; ++round) {
      auto* reply = new channel<int>(0);
      channel<int> other(0);
      std::optional<int> v, w;
      auto replier = spawn([reply] {
        ASSERT_TRUE(reply->send(7));  // taken by the select: it is done with reply
        delete reply;
      });
      EXPECT_EQ(select(other.on_recv(w), reply->on_recv(v), after(10s)), 1);
      EXPECT_EQ(v, 7);
      replier.join();
    }
  });
}

TEST_P(Select, AStopRequestFiresTheStopCaseOrCancelsTheSelect) {
  Run([] {
    channel<int> ch(0);
    auto with_case = spawn([&] {
      std::optional<int> v;
      return int(select(ch.on_recv(v), this_fiber::stop_token()));
    });
    auto without = spawn([&] {
      std::optional<int> v;
      return int(select(ch.on_recv(v), after(1h)));
    });
    (void)this_fiber::sleep_for(5ms);
    with_case.request_stop();
    without.request_stop();
    EXPECT_EQ(with_case.join(), 1);
    EXPECT_EQ(without.join(), kSelectCancelled);
    EXPECT_FALSE(this_fiber::stop_token().stop_requested());
  });
}

// Many selecting receivers race for values sent on two channels: every
// value is received exactly once.
TEST_P(Select, ExactlyOneCaseFiresWhenManyWakersRace) {
  Run([] {
    channel<int> a(0), b(2);
    std::atomic<long> sum{0}, count{0};
    std::vector<join_handle<void>> rs;
    for (int r = 0; r < 20; ++r)
      rs.push_back(spawn([&] {
        bool closed[2] = {false, false};
        while (!closed[0] || !closed[1]) {
          std::optional<int> va, vb;
          int i = select(a.on_recv(va), b.on_recv(vb));
          std::optional<int>& v = i == 0 ? va : vb;
          if (!v) {
            closed[i] = true;
            continue;
          }
          sum.fetch_add(*v, std::memory_order_relaxed);
          count.fetch_add(1, std::memory_order_relaxed);
        }
      }));
    std::vector<join_handle<void>> ss;
    for (auto* ch : {&a, &b})
      for (int s = 0; s < 4; ++s)
        ss.push_back(spawn([ch] {
          for (int i = 1; i <= 1000; ++i) ASSERT_TRUE(ch->send(i));
        }));
    for (auto& s : ss) s.join();
    // A receiver returns once it has seen both closed (and so b drained).
    a.close();
    b.close();
    for (auto& r : rs) r.join();
    EXPECT_EQ(count.load(), 8000);
    EXPECT_EQ(sum.load(), 8L * 1000 * 1001 / 2);
  });
}

// A send case fires both when its value was sent and when its channel is
// closed. closed() afterwards cannot tell which when another fiber closes
// the channel right after the send (the value is still delivered); the
// `sent` flag can, on the ready path and on the parked one.
TEST_P(Select, TheSentFlagTellsASentValueFromAClosedChannel) {
  Run([] {
    channel<int> ch(1);
    int x = 1;
    bool sent = false;
    ASSERT_EQ(select(ch.on_send(x, sent)), 0);  // room in the buffer: sent at once
    spawn([&] { ch.close(); }).join();
    EXPECT_TRUE(ch.closed());  // so closed() would say "not sent" ...
    EXPECT_TRUE(sent);         // ... and it was:
    EXPECT_EQ(ch.recv(), 1);
    int y = 2;
    ASSERT_EQ(select(ch.on_send(y, sent)), 0);  // closed
    EXPECT_FALSE(sent);
    EXPECT_EQ(y, 2);

    channel<int> rv(0);  // parked send cases: a receiver, then close(), wakes it
    auto r = spawn([&] {
      (void)this_fiber::sleep_for(3ms);
      return rv.recv();
    });
    int z = 3;
    ASSERT_EQ(select(rv.on_send(z, sent)), 0);
    EXPECT_TRUE(sent);
    EXPECT_EQ(r.join(), 3);
    auto c = spawn([&] {
      (void)this_fiber::sleep_for(3ms);
      rv.close();
    });
    int w = 4;
    sent = true;
    ASSERT_EQ(select(rv.on_send(w, sent)), 0);
    EXPECT_FALSE(sent);
    EXPECT_EQ(w, 4);
    c.join();
  });
}

// Two cases on one channel: it is locked once, and exactly one of the two
// fires per value, ready or parked.
TEST_P(Select, TwoCasesOnOneChannelFireOnePerValue) {
  Run([] {
    for (std::size_t cap : {0, 1}) {
      channel<int> ch(cap);
      auto s = spawn([&] {
        for (int i = 0; i < 100; ++i) ASSERT_TRUE(ch.send(i));
        ch.close();
      });
      for (int i = 0; i < 100; ++i) {
        std::optional<int> a, b;
        int k = select(ch.on_recv(a), ch.on_recv(b));
        ASSERT_TRUE(k == 0 || k == 1);
        EXPECT_EQ(k == 0 ? a : b, i);
        EXPECT_FALSE(k == 0 ? b : a);
      }
      s.join();
    }
  });
}

// A send and a receive case on one rendezvous channel: the select does
// not meet itself; two such selects meet each other, one sending, one
// receiving.
TEST_P(Select, ASendAndARecvOnOneRendezvousChannelNeverMeetEachOther) {
  Run([] {
    channel<int> ch(0);
    std::optional<int> got;
    int x = 1;
    EXPECT_EQ(select(ch.on_send(x), ch.on_recv(got), after(10ms)), 2);
    EXPECT_FALSE(got);
    EXPECT_EQ(x, 1);
    for (int round = 0; round < 50; ++round) {
      auto peer = [&ch](int mine) {
        std::optional<int> theirs;
        int k = select(ch.on_send(mine), ch.on_recv(theirs));
        return k == 0 ? -1 : *theirs;  // -1: sent; else the value received
      };
      auto a = spawn([&] { return peer(10); });
      auto b = spawn([&] { return peer(20); });
      int ra = a.join(), rb = b.join();
      EXPECT_TRUE((ra == -1 && rb == 10) || (rb == -1 && ra == 20)) << ra << " " << rb;
    }
    EXPECT_EQ(select(select_default), 0);  // a default alone fires at once
  });
}

TEST_P(Select, APlainThreadCanSelect) {
  Run([] {
    channel<int> a(0), b(0);
    std::atomic<int> got{-1};
    std::thread t([&, ref = outside_ref()] {
      std::optional<int> va, vb;
      int i = select(a.on_recv(va), b.on_recv(vb));
      got = i == 1 && vb ? *vb : -2;
    });
    ASSERT_TRUE(b.send(11));
    t.join();
    EXPECT_EQ(got.load(), 11);
  });
}

// *Stop tokens* (see runtime/select.h): a token names one fiber's stop
// state, whoever holds it.

// A token handed from a parent to its child: the child's select fires the
// stop case when the parent (not the child) is asked to stop.
TEST_P(Select, AStopCaseOnAParentsTokenFiresWhenTheParentIsAskedToStop) {
  Run([] {
    channel<int> never(0), fired(1);
    auto parent = spawn([&] {
      stop_token mine = this_fiber::stop_token();
      spawn([&, mine] {
        std::optional<int> v;
        int i = select(never.on_recv(v), mine, after(10s));  // 2: the wake-up was lost
        ASSERT_TRUE(fired.send(i));
        EXPECT_FALSE(this_fiber::stop_requested());
      }).detach();
      (void)this_fiber::sleep_for(1h);  // until asked to stop
    });
    (void)this_fiber::sleep_for(5ms);
    parent.request_stop();
    parent.join();
    EXPECT_EQ(fired.recv(), 1);
  });
}

// A default-constructed token never stops: its case never fires, and the
// caller's own stop request cancels the select instead of firing it.
TEST_P(Select, ANullStopTokenNeverFires) {
  Run([] {
    EXPECT_FALSE(stop_token{}.stop_requested());
    EXPECT_EQ(select(stop_token{}, select_default), 1);
    EXPECT_EQ(select(stop_token{}, after(2ms)), 1);
    auto parked = spawn([] { return int(select(stop_token{}, after(10s))); });
    auto already = spawn([] {
      (void)this_fiber::sleep_for(1h);  // returns once asked to stop
      return int(select(stop_token{}, select_default));
    });
    (void)this_fiber::sleep_for(5ms);
    parked.request_stop();
    already.request_stop();
    EXPECT_EQ(parked.join(), kSelectCancelled);
    EXPECT_EQ(already.join(), 1);
  });
}

// A token is a value: it stays valid after its fiber has exited and its
// control block was freed (and reused), and reports the fiber's last stop
// state. Run under --config=asan: the old token read the freed block.
TEST_P(Select, AStopTokenOutlivesItsFiber) {
  Run([] {
    auto stopped = spawn([] {
      (void)this_fiber::sleep_for(1h);  // returns once asked to stop
      return this_fiber::stop_token();
    });
    auto never = spawn([] { return this_fiber::stop_token(); });
    (void)this_fiber::sleep_for(2ms);
    stopped.request_stop();
    stop_token a = stopped.join();
    stop_token b = never.join();
    for (int i = 0; i < 64; ++i) spawn([] {}).join();  // reuse the freed blocks
    EXPECT_TRUE(a.stop_requested());
    EXPECT_FALSE(b.stop_requested());
    stop_token c = a;
    c = b;
    c = std::move(a);
    EXPECT_TRUE(c.stop_requested());
    EXPECT_EQ(select(b, c, select_default), 1);
    EXPECT_EQ(select(b, after(1ms)), 1);
  });
}

// Many selectors parked on one token, on every worker and on a plain
// thread, are all woken by the one stop request, none through its timer.
TEST_P(Select, AStopRequestWakesEverySelectorParkedOnTheToken) {
  Run([] {
    channel<stop_token> toks(1);
    auto target = spawn([&] {
      ASSERT_TRUE(toks.send(this_fiber::stop_token()));
      (void)this_fiber::sleep_for(1h);  // until asked to stop
    });
    stop_token tok = *toks.recv();
    channel<int> never(0);
    auto wait = [&never, tok] {
      std::optional<int> v;
      return int(select(never.on_recv(v), after(10s), tok));  // 1: the wake-up was lost
    };
    std::vector<join_handle<int>> fibers;
    for (int i = 0; i < 32; ++i) fibers.push_back(spawn(wait));
    std::atomic<int> on_thread{-2};
    std::thread t([&, ref = outside_ref()] { on_thread = wait(); });
    (void)this_fiber::sleep_for(10ms);
    EXPECT_FALSE(tok.stop_requested());
    target.request_stop();
    target.join();
    for (auto& f : fibers) EXPECT_EQ(f.join(), 2);
    t.join();
    EXPECT_EQ(on_thread.load(), 2);
    EXPECT_TRUE(tok.stop_requested());
  });
}

// The stop request races with selectors entering and leaving selects on
// the token while values move through a channel: every value sent is
// received exactly once, every selector sees the stop case fire, none
// times out. Bounded; meant for --config=tsan as well.
TEST_P(Select, AStopRequestRacingSelectsLosesNoWakeUpAndNoValue) {
  Run([] {
    std::atomic<bool> failed{false};
    for (int round = 0; round < 60 && !failed.load(std::memory_order_relaxed); ++round) {
      channel<stop_token> toks(1);
      auto target = spawn([&] {
        ASSERT_TRUE(toks.send(this_fiber::stop_token()));
        (void)this_fiber::sleep_for(1h);  // until asked to stop
      });
      stop_token tok = *toks.recv();
      channel<int> ch(round % 2);
      std::atomic<long> sent{0}, received{0};
      std::vector<join_handle<void>> hs;
      for (int r = 0; r < 4; ++r)
        hs.push_back(spawn([&, tok] {
          for (;;) {
            std::optional<int> v;
            int i = select(ch.on_recv(v), tok, after(10s));
            if (i == 2) failed.store(true, std::memory_order_relaxed);  // relaxed: test flag
            if (i != 0) break;
            received.fetch_add(*v, std::memory_order_relaxed);  // relaxed: read after join
          }
        }));
      hs.push_back(spawn([&, tok] {
        int i = 0;
        for (int x = 1; x <= 100'000 && i == 0; ++x) {
          i = select(ch.on_send(x), tok, after(10s));
          if (i == 0) sent.fetch_add(x, std::memory_order_relaxed);  // relaxed: read after join
        }
        if (i == 0) i = 1 + select(tok, after(10s));  // sent them all: wait for the stop
        if (i == 2) failed.store(true, std::memory_order_relaxed);  // relaxed: test flag
      }));
      switch (round % 3) {  // stop as the selects start, amid traffic, or parked
        case 0: for (int y = 0; y < round % 7; ++y) this_fiber::yield(); break;
        case 1:
          while (sent.load(std::memory_order_relaxed) < round * 25) this_fiber::yield();
          break;
        case 2: (void)this_fiber::sleep_for(1ms); break;
      }
      target.request_stop();
      target.join();
      for (auto& h : hs) h.join();
      while (auto v = ch.try_recv()) received += *v;  // left in the buffer
      EXPECT_EQ(sent.load(), received.load());
      EXPECT_TRUE(tok.stop_requested());
    }
    EXPECT_FALSE(failed.load()) << "a select on the token timed out: a lost wake-up";
  });
}

// README's small-stack option names "a connection's timeout fiber", and
// README's select example waits on a channel, a timer and a stop token: a
// task_group child on kSmallStack doing exactly that must fit in 2 KiB.
// select's bookkeeping once took 560 bytes of that frame whatever the
// case count (two arrays sized for 32 cases), and such a fiber stopped the
// process with "stack overflow in fiber N (stack size 2048 bytes)".
// Optimized builds only: unoptimized frames are several times larger.
// Under the sanitizers (optimized, -O1) it runs too: their frames are
// larger still, and kSmallStack is 16 KiB there (runtime/weft.h).
#if defined(__OPTIMIZE__)
TEST_P(Select, ATimeoutFiberOnTheSmallStackFitsInATaskGroup) {
  Run([] {
    channel<int> activity(1);
    std::atomic<int> timeouts{0}, values{0};
    std::atomic<std::size_t> logged{0};
    task_group g;
    g.spawn([&] {
      for (;;) {
        std::optional<int> a;
        switch (select(activity.on_recv(a), after(2ms), this_fiber::stop_token())) {
          case 0:
            if (!a) return;  // closed: the reader is done
            values.fetch_add(1, std::memory_order_relaxed);  // relaxed: read after wait()
            continue;
          case 1: {
            // What a timeout fiber does at its timeout: says so (a log line
            // built on its own frame), then acts.
            // (No printf: glibc's takes more than 1 KiB of stack by itself.)
            char line[256];
            constexpr std::string_view what = "idle for 2 ms: closing peer ";
            std::memcpy(line, what.data(), what.size());
            auto [end, ec] = std::to_chars(line + what.size(), line + sizeof line,
                                           values.load(std::memory_order_relaxed));
            if (ec == std::errc{})  // relaxed: read after wait()
              logged.fetch_add(static_cast<std::size_t>(end - line), std::memory_order_relaxed);
            timeouts.fetch_add(1, std::memory_order_relaxed);  // relaxed: as above
            continue;
          }
          default:
            return;  // stopped
        }
      }
    }, {.stack_size = kSmallStack});
    g.spawn([&] {  // the same, woken by a stop request while parked
      std::optional<int> a;
      (void)select(activity.on_recv(a), after(10s), this_fiber::stop_token());
    }, {.stack_size = kSmallStack});
    for (int i = 0; i < 20; ++i) {
      ASSERT_TRUE(activity.send(i));
      (void)this_fiber::sleep_for(i % 2 ? 3ms : 100us);
    }
    g.request_stop();
    ASSERT_TRUE(g.wait());
    EXPECT_GT(values.load(), 0);
    EXPECT_GT(timeouts.load(), 0);
    EXPECT_GT(logged.load(), 0u);
  });
}
#endif

}  // namespace
}  // namespace weft
