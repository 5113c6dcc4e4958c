// runtime/select_test.cc — weft::select: random choice among ready cases,
// default, timers, stop requests, and exactly-one-case-fires under races.
#include "runtime/select.h"

#include <array>
#include <atomic>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/sync.h"
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

}  // namespace
}  // namespace weft
