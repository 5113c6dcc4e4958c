// runtime/channel_test.cc — weft::channel<T>: Go's channel semantics,
// deadlines and cancellation, fibers and plain threads, and the deadlock
// report of a channel cycle.
#include "runtime/channel.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "runtime/sync.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class Channel : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Channel);

TEST_P(Channel, CloseWakesEveryParkedReceiver) {
  Run([] {
    channel<int> ch(0);
    std::atomic<int> empties{0};
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < 16; ++i)
      hs.push_back(spawn([&] {
        if (!ch.recv()) empties.fetch_add(1);
      }));
    (void)this_fiber::sleep_for(5ms);  // let them park
    ch.close();
    for (auto& h : hs) h.join();
    EXPECT_EQ(empties.load(), 16);
  });
}

TEST_P(Channel, BufferedValuesAreDrainedAfterClose) {
  Run([] {
    channel<int> ch(4);
    for (int i = 1; i <= 3; ++i) ASSERT_TRUE(ch.send(i));
    ch.close();
    EXPECT_EQ(ch.recv(), 1);
    EXPECT_EQ(ch.recv(), 2);
    EXPECT_EQ(ch.recv(), 3);
    EXPECT_EQ(ch.recv(), std::nullopt);
    EXPECT_EQ(ch.try_recv().error(), chan_errc::closed);
  });
}

TEST_P(Channel, SendOnAClosedChannelFailsAndCloseWakesParkedSenders) {
  Run([] {
    channel<int> ch(1);
    ASSERT_TRUE(ch.send(1));
    auto parked = spawn([&] { return ch.send(2); });  // the buffer is full: parks
    (void)this_fiber::sleep_for(5ms);
    ch.close();
    EXPECT_EQ(parked.join().error(), chan_errc::closed);
    EXPECT_EQ(ch.send(3).error(), chan_errc::closed);
    EXPECT_EQ(ch.try_send(4).error(), chan_errc::closed);
    EXPECT_EQ(ch.recv(), 1);
    EXPECT_EQ(ch.recv(), std::nullopt);
    EXPECT_EQ(make_error_code(chan_errc::closed).message(), "channel closed");
  });
}

TEST_P(Channel, RendezvousHandsTheValueDirectlyToAParkedReceiver) {
  Run([] {
    channel<int> ch(0);
    EXPECT_EQ(ch.try_send(1).error(), std::errc::operation_would_block);  // no receiver
    std::atomic<bool> received{false};
    auto r = spawn([&] {
      auto v = ch.recv();
      received = true;
      return v;
    });
    while (ch.try_send(7).has_value() == false) this_fiber::yield();  // succeeds once r parks
    EXPECT_EQ(r.join(), 7);
    EXPECT_EQ(ch.size(), 0u);  // nothing was buffered
    // A sender blocks until the value was taken.
    auto s = spawn([&] { return ch.send(8); });
    (void)this_fiber::sleep_for(2ms);
    EXPECT_EQ(ch.recv(), 8);
    EXPECT_TRUE(s.join().has_value());
  });
}

void ExpectPerProducerFifo(std::size_t capacity, int producers, int per_producer,
                           int consumers) {
  channel<std::pair<int, int>> ch(capacity);
  std::vector<join_handle<void>> ps;
  for (int p = 0; p < producers; ++p)
    ps.push_back(spawn([&, p] {
      for (int i = 0; i < per_producer; ++i) ASSERT_TRUE(ch.send({p, i}));
    }));
  std::atomic<long> received{0};
  std::vector<join_handle<bool>> cs;
  for (int c = 0; c < consumers; ++c)
    cs.push_back(spawn([&] {
      std::vector<int> last(producers, -1);
      bool in_order = true;
      while (auto v = ch.recv()) {
        in_order = in_order && v->second > last[v->first];
        last[v->first] = v->second;
        received.fetch_add(1, std::memory_order_relaxed);
      }
      return in_order;
    }));
  for (auto& p : ps) p.join();
  ch.close();
  for (auto& c : cs) EXPECT_TRUE(c.join()) << "capacity " << capacity;
  EXPECT_EQ(received.load(), long{producers} * per_producer);
}

TEST_P(Channel, EachProducersValuesArriveInTheOrderItSentThem) {
  Run([] {
    for (std::size_t cap : {0, 1, 3, 64}) ExpectPerProducerFifo(cap, 4, 5000, 1);
  });
}

TEST_P(Channel, CapacityOneChannelWithManyFibersLosesAndDuplicatesNothing) {
  Run([] {
    channel<int> ch(1);
    std::atomic<long> sum{0};
    std::vector<join_handle<void>> hs;
    for (int p = 0; p < 100; ++p)
      hs.push_back(spawn([&] {
        for (int i = 1; i <= 200; ++i) ASSERT_TRUE(ch.send(i));
      }));
    std::vector<join_handle<void>> cs;
    for (int c = 0; c < 10; ++c)
      cs.push_back(spawn([&] {
        while (auto v = ch.recv()) sum.fetch_add(*v, std::memory_order_relaxed);
      }));
    for (auto& h : hs) h.join();
    ch.close();
    for (auto& c : cs) c.join();
    EXPECT_EQ(sum.load(), 100L * 200 * 201 / 2);
  });
}

TEST_P(Channel, MoveOnlyValuesPassThroughBufferAndRendezvous) {
  Run([] {
    for (std::size_t cap : {0, 2}) {
      channel<std::unique_ptr<int>> ch(cap);
      auto s = spawn([&] {
        for (int i = 0; i < 10; ++i) ASSERT_TRUE(ch.send(std::make_unique<int>(i)));
        ch.close();
      });
      int expect = 0;
      while (auto v = ch.recv()) EXPECT_EQ(**v, expect++);
      EXPECT_EQ(expect, 10);
      s.join();
    }
    channel<std::unique_ptr<int>> full(1);
    ASSERT_TRUE(full.try_send(std::make_unique<int>(1)));
    auto p = std::make_unique<int>(2);
    EXPECT_FALSE(full.try_send(std::move(p)));
    EXPECT_NE(p, nullptr);  // a failed try_send leaves its argument alone
  });
}

// A value type with its own unary operator& (COM-style smart pointers have
// one), which here points elsewhere: the channel must move the value
// itself, whose address std::addressof gives, as std containers do.
struct own_address_of {
  static own_address_of decoy;
  int v;
  explicit own_address_of(int x) : v(x) {}
  own_address_of(const own_address_of&) = default;
  own_address_of(own_address_of&& o) noexcept : v(std::exchange(o.v, -1)) {}
  own_address_of* operator&() noexcept { return std::addressof(decoy); }
  const own_address_of* operator&() const noexcept { return std::addressof(decoy); }
};
own_address_of own_address_of::decoy{-7};

TEST(ChannelValueTypes, AValueWithItsOwnOperatorAddressOfIsSentItself) {
  weft::run([] {
    channel<own_address_of> ch(3);
    ASSERT_TRUE(ch.send(own_address_of(1)));
    ASSERT_TRUE(ch.try_send(own_address_of(2)));
    const own_address_of three(3);
    ASSERT_TRUE(ch.try_send(three));
    for (int i = 1; i <= 3; ++i) EXPECT_EQ(ch.recv()->v, i);
    own_address_of four(4);
    ASSERT_EQ(select(ch.on_send(four)), 0);
    EXPECT_EQ(ch.recv()->v, 4);
    channel<own_address_of> rendezvous(0);  // hand-off to a parked receiver
    auto r = spawn([&] { return rendezvous.recv()->v; });
    ASSERT_TRUE(rendezvous.send(own_address_of(5)));
    EXPECT_EQ(r.join(), 5);
  }, {.workers = 1});
  EXPECT_EQ(own_address_of::decoy.v, -7);  // never moved from
}

// Counts live instances, so a value lost (never destroyed) or duplicated
// (destroyed twice) shows as a nonzero balance; checks its own alignment
// wherever it is built (channel buffer, a receiver's frame, the stack of
// a fiber). Move-only and not default-constructible.
std::atomic<int> g_live{0};
std::atomic<int> g_misaligned{0};
struct alignas(64) counted {
  int v;
  explicit counted(int x) : v(x) { born(); }
  counted(counted&& o) noexcept : v(std::exchange(o.v, -1)) { born(); }
  counted& operator=(counted&&) = delete;
  ~counted() { g_live.fetch_sub(1, std::memory_order_relaxed); }
  void born() {
    g_live.fetch_add(1, std::memory_order_relaxed);
    if (reinterpret_cast<std::uintptr_t>(this) % 64 != 0)
      g_misaligned.fetch_add(1, std::memory_order_relaxed);
  }
};

TEST_P(Channel, OverAlignedMoveOnlyValuesAreNeitherLostNorDuplicated) {
  g_live = 0;
  g_misaligned = 0;
  Run([] {
    for (std::size_t cap : {0, 3}) {
      channel<counted> ch(cap);
      auto s = spawn([&] {
        for (int i = 0; i < 200; ++i) {
          if (i % 2) {
            counted c(i);
            ASSERT_EQ(select(ch.on_send(c)), 0);
          } else {
            ASSERT_TRUE(ch.send(counted(i)));
          }
        }
        ch.close();
      }, {.stack_size = 16 * 1024});  // kSmallStack overflows under TSan
      int expect = 0;
      for (;;) {
        std::optional<counted> v;
        if (expect % 3 == 0) {
          ASSERT_EQ(select(ch.on_recv(v)), 0);
        } else if (auto r = ch.recv(deadline::never())) {
          v.emplace(std::move(*r));
        }
        if (!v) break;
        EXPECT_EQ(v->v, expect++);
      }
      EXPECT_EQ(expect, 200);
      s.join();
    }
    channel<counted> left(4);  // destroyed with values buffered
    ASSERT_TRUE(left.try_send(counted(1)));
    ASSERT_TRUE(left.try_send(counted(2)));
    auto one = left.try_recv();
    ASSERT_TRUE(one);
    EXPECT_EQ(one->v, 1);
  });
  EXPECT_EQ(g_live.load(), 0);
  EXPECT_EQ(g_misaligned.load(), 0);
}

// 4 KiB values through fibers with 16 KiB stacks: the channel keeps no
// hidden copies of a value on the stack beyond the caller's own.
TEST_P(Channel, LargeValuesPassThroughFibersWithSmallStacks) {
  struct page {
    std::array<unsigned char, 4096> bytes;
    explicit page(int i) { bytes.fill(static_cast<unsigned char>(i)); }
  };
  Run([] {
    for (std::size_t cap : {0, 2}) {
      channel<page> ch(cap);
      spawn_options small{.stack_size = 16 * 1024};
      auto s = spawn([&] {
        for (int i = 0; i < 64; ++i) ASSERT_TRUE(ch.send(page(i)));
        ch.close();
      }, small);
      auto r = spawn([&] {
        int n = 0;
        for (; auto v = ch.recv(); ++n)
          EXPECT_EQ(v->bytes[n % 4096], static_cast<unsigned char>(n));
        return n;
      }, small);
      s.join();
      EXPECT_EQ(r.join(), 64);
    }
  });
}

// A copy that throws in try_send(const T&) reaches the caller before the
// channel is touched: nothing is buffered, nothing is locked.
TEST(ChannelValueTypes, AThrowingCopyInTrySendLeavesTheChannelAsItWas) {
  struct copy_throws {
    int v;
    explicit copy_throws(int x) : v(x) {}
    copy_throws(const copy_throws&) { throw std::runtime_error("copy"); }
    copy_throws(copy_throws&&) noexcept = default;
  };
  weft::run([] {
    channel<copy_throws> ch(2);
    const copy_throws c(1);
    EXPECT_THROW((void)ch.try_send(c), std::runtime_error);
    EXPECT_EQ(ch.size(), 0u);
    ASSERT_TRUE(ch.try_send(copy_throws(2)));  // the lock was not left held
    EXPECT_EQ(ch.recv()->v, 2);
  }, {.workers = 1});
}

// A capacity whose buffer size (capacity * sizeof(T)) wraps around size_t
// is refused, as std::vector refuses a size past max_size(): the wrapped
// product would be a tiny buffer that sends then write far past.
TEST(ChannelCapacity, ACapacityWhoseBufferSizeWrapsIsALengthError) {
  using page = std::array<char, 4096>;
  constexpr std::size_t kWraps = std::size_t{1} << 52;  // * 4096 == 2^64, which is 0
  EXPECT_THROW(channel<page> ch(kWraps), std::length_error);
  EXPECT_THROW(channel<page> ch(kWraps + 1), std::length_error);  // wraps to one slot
}

// A receiver whose receives all complete at once (the buffer never runs
// dry) never parks; its coop budget makes it yield now and then, so a
// fiber pinned beside it still runs (see spend_budget() in sched/park.h).
TEST_P(Channel, AReceiverThatNeverParksStillLetsItsNeighboursRun) {
  long during = 0;
  Run([&] {
    constexpr int kValues = 500'000;  // ~10 ms of receives: many slices
    channel<int> ch(kValues);
    for (int i = 0; i < kValues; ++i) ASSERT_TRUE(ch.try_send(i));
    during = testing::neighbour_turns_during([&] {
      long long sum = 0;
      for (int i = 0; i < kValues; ++i) sum += ch.recv().value();
      EXPECT_EQ(sum, 1LL * kValues * (kValues - 1) / 2);
    });
  });
  // One yield per 100 µs slice; the receives take 10 ms or more.
  EXPECT_GT(during, 10) << "the receiver never gave the worker away";
}

TEST_P(Channel, DeadlinesMakeRecvAndSendReturnTimedOut) {
  Run([] {
    channel<int> ch(0);
    auto t0 = clock::now();
    EXPECT_EQ(ch.recv(deadline(10ms)).error(), std::errc::timed_out);
    EXPECT_GE(clock::now() - t0, 10ms);
    EXPECT_EQ(ch.send(1, deadline(5ms)).error(), std::errc::timed_out);
    // The timed-out waiters left no record behind: a later pair still meets.
    auto r = spawn([&] { return ch.recv(deadline(5s)); });
    ASSERT_TRUE(ch.send(2, deadline(5s)));
    EXPECT_EQ(r.join().value(), 2);
  });
}

TEST_P(Channel, RequestStopCancelsParkedSendAndRecv) {
  Run([] {
    channel<int> ch(0);
    auto r = spawn([&] { return ch.recv(deadline::never()); });
    auto plain = spawn([&] { return ch.recv(); });
    channel<int> full(0);
    auto s = spawn([&] { return full.send(1); });
    (void)this_fiber::sleep_for(5ms);
    r.request_stop();
    plain.request_stop();
    s.request_stop();
    EXPECT_EQ(r.join().error(), std::errc::operation_canceled);
    EXPECT_EQ(plain.join(), std::nullopt);
    EXPECT_EQ(s.join().error(), std::errc::operation_canceled);
  });
}

// A background thread owns a resource and serves fibers over channels.
TEST_P(Channel, APlainThreadServesFibersOverChannels) {
  struct request {
    int x;
    channel<int>* reply;
  };
  Run([] {
    channel<request> requests(0);
    std::thread server([&, ref = outside_ref()] {
      while (auto r = requests.recv()) ASSERT_TRUE(r->reply->send(r->x * 2));
    });
    std::vector<join_handle<long>> hs;
    for (int f = 0; f < 20; ++f)
      hs.push_back(spawn([&, f] {
        channel<int> reply(0);
        long sum = 0;
        for (int i = 0; i < 100; ++i) {
          EXPECT_TRUE(requests.send({f * 1000 + i, &reply}));
          sum += reply.recv().value_or(-1);
        }
        return sum;
      }));
    long total = 0;
    for (auto& h : hs) total += h.join();
    requests.close();
    server.join();
    long expect = 0;
    for (int f = 0; f < 20; ++f)
      for (int i = 0; i < 100; ++i) expect += 2L * (f * 1000 + i);
    EXPECT_EQ(total, expect);
  });
}

TEST(ChannelThreads, PlainThreadsUseAChannelWithoutARuntime) {
  channel<int> ch(2);
  std::thread producer([&] {
    for (int i = 0; i < 10000; ++i) ASSERT_TRUE(ch.send(i));
    ch.close();
  });
  long sum = 0;
  int n = 0;
  while (auto v = ch.recv()) {
    EXPECT_EQ(*v, n++);
    sum += *v;
  }
  producer.join();
  EXPECT_EQ(sum, 10000L * 9999 / 2);
  EXPECT_EQ(ch.recv(deadline(1ms)).error(), chan_errc::closed);
  channel<int> empty(0);
  EXPECT_EQ(empty.recv(deadline(2ms)).error(), std::errc::timed_out);
}

// A fiber that a plain thread wakes goes to the inject queue (a plain
// thread has no run queue of its own). A worker busy switching fibers that
// compute between yields looked at that queue only on its periodic tick,
// 61 switches apart, so a fiber served by a background thread (the
// issue's database thread) waited up to 61 slices (1.2 s here) for its
// reply. The monitor now has such a worker do its loop's duties, the
// inject queue among them, once a period: the fiber runs within about a
// period plus a few slices. The bound leaves room for a loaded machine,
// and counts the time the workers ran, as in io/readiness_test.cc's
// AReaderWakesOnTime...
TEST_P(Channel, AFiberWokenByAPlainThreadRunsOnTimeWhileFibersComputeBetweenYields) {
  std::chrono::nanoseconds worst{};
  Run([&] {
    testing::busy_yielders busy(2 * workers(), 20ms);  // no worker left idle
    channel<testing::when> ch(0);
    std::thread t([&, ref = outside_ref()] {
      for (int i = 0; i < 10; ++i) {
        std::this_thread::sleep_for(30ms);  // main parks in recv meanwhile
        (void)ch.send(testing::when::now(workers()));
      }
    });
    for (int i = 0; i < 10; ++i) {
      auto sent = ch.recv();
      ASSERT_TRUE(sent);
      // Late by the smaller of wall and run time (see testing::run_time).
      worst = std::max(worst, testing::when::now(workers()).since(*sent));
    }
    t.join();  // it has sent its last value
  });
  EXPECT_LT(worst, 700ms) << "a fiber ran "
                          << std::chrono::duration_cast<std::chrono::milliseconds>(worst).count()
                          << " ms after a plain thread sent to it";
}

TEST(ChannelDeath, AChannelCycleIsReportedAsADeadlockWithItsWaitReason) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(weft::run([] {
                channel<int> a(0), b(0);
                auto x = spawn([&] { (void)a.recv(); (void)b.send(1); }, {.name = "x"});
                auto y = spawn([&] { (void)b.recv(); (void)a.send(1); }, {.name = "y"});
                x.join();
                y.join();
              }),
              ::testing::ExitedWithCode(2),
              "all fibers are asleep - deadlock!(.|\n)*\"x\" \\[chan receive\\] at "
              ".*channel_test.cc:[0-9]+(.|\n)*\"y\" \\[chan receive\\]");
}

// A plain thread whose channel operations never blocked (a value was
// waiting, the receiver was parked) serves fibers as well as one that
// blocked: main waiting for its next send is not a deadlock. It was
// reported as one (exit status 2): the thread counted as a possible waker
// only once it blocked in weft, so while it worked between its receive and
// its reply, every fiber was parked and nothing seemed able to wake them.
template <typename FirstOp>
void ServedByAPlainThreadThatNeverBlocked(FirstOp first_op) {
  weft::run([&] {
    channel<int> requests(1), replies(0);
    ASSERT_TRUE(requests.send(21));  // buffered: the thread's receive finds it
    std::atomic<bool> received{false};
    std::thread t([&] {  // no outside_ref: it never blocks in weft
      int x = first_op(requests);
      received = true;
      std::this_thread::sleep_for(50ms);  // main parks on replies meanwhile
      (void)replies.send(2 * x);          // main is parked: no block
    });
    while (!received.load()) (void)this_fiber::sleep_for(100us);
    EXPECT_EQ(replies.recv().value_or(-1), 42);
    t.join();
  }, {.workers = 1});
  std::fprintf(stderr, "no deadlock reported\n");
  std::_Exit(0);
}

TEST(ChannelDeath, APlainThreadWhoseChannelCallsNeverBlockedIsAPossibleWaker) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(ServedByAPlainThreadThatNeverBlocked(
                  [](channel<int>& ch) { return ch.recv().value_or(-1); }),
              ::testing::ExitedWithCode(0), "no deadlock reported");
  EXPECT_EXIT(ServedByAPlainThreadThatNeverBlocked(
                  [](channel<int>& ch) { return ch.try_recv().value_or(-1); }),
              ::testing::ExitedWithCode(0), "no deadlock reported");
  EXPECT_EXIT(ServedByAPlainThreadThatNeverBlocked([](channel<int>& ch) {
                std::optional<int> v;
                (void)select(ch.on_recv(v));
                return v.value_or(-1);
              }),
              ::testing::ExitedWithCode(0), "no deadlock reported");
}

// A channel on a frame that goes away while a fiber still waits on it (as
// when the runtime unwinds the owner first): a clear error, not a fiber
// spinning on freed memory.
TEST(ChannelDeath, AChannelDestroyedWhileAFiberWaitsOnItIsReported) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(weft::run([] {
                 auto ch = std::make_unique<channel<int>>(0);
                 const std::uint64_t parks = stats().parks;
                 auto waiter = spawn([&ch] { (void)ch->recv(); });
                 // Until the waiter has begun to park (yields are not
                 // parks), then 20 ms: 20 ms alone was not always enough
                 // under TSan on a loaded machine (as sync_test's
                 // DestroyWhileParked).
                 for (auto limit = clock::now() + 10s;
                      stats().parks == parks && clock::now() < limit;)
                   this_fiber::yield();
                 (void)this_fiber::sleep_for(20ms);  // parked in recv
                 ch.reset();
               }),
               "channel destroyed while fibers wait on it");
}

// With one worker, a fiber that parks has run its whole park step (its
// record is in the channel's queue) before the worker runs anything else;
// so waiting, with yields, until the runtime's park count moves is a
// deterministic "it has parked", with no sleep.
void YieldUntilAnotherFiberParked(std::uint64_t parks_before) {
  while (stats().parks == parks_before) this_fiber::yield();
}

// Parked senders are served first come, first served, as Go's sendq: the
// slot each receive frees goes to the oldest parked sender. (Per-producer
// FIFO does not show this: one producer has one parked send at a time.)
TEST(ChannelOrder, ParkedSendersAreServedInTheOrderTheyParked) {
  weft::run([] {
    channel<int> ch(1);
    ASSERT_TRUE(ch.send(0));  // the buffer is full from here on
    std::vector<join_handle<void>> senders;
    for (int i = 1; i <= 5; ++i) {
      std::uint64_t parks = stats().parks;
      senders.push_back(spawn([&ch, i] { EXPECT_TRUE(ch.send(i)); }));
      YieldUntilAnotherFiberParked(parks);
    }
    for (int i = 0; i <= 5; ++i) EXPECT_EQ(ch.recv(), i);
    for (auto& s : senders) s.join();
  }, {.workers = 1});
}

// The receive that frees a slot moves the first parked sender's value into
// it, and that send is complete then: it does not wait for a second
// receive to take its value (Go's chanrecv does the same).
TEST(ChannelOrder, AReceiveThatFreesASlotCompletesTheFirstParkedSend) {
  weft::run([] {
    channel<int> ch(1);
    ASSERT_TRUE(ch.send(1));
    std::atomic<bool> sent{false};
    std::uint64_t parks = stats().parks;
    auto s = spawn([&] {
      EXPECT_TRUE(ch.send(2));
      sent = true;
    });
    YieldUntilAnotherFiberParked(parks);
    EXPECT_EQ(ch.recv(), 1);
    EXPECT_EQ(ch.size(), 1u) << "the parked sender's value did not move into the freed slot";
    for (int i = 0; i < 100 && !sent; ++i) this_fiber::yield();  // let the sender finish
    EXPECT_TRUE(sent) << "the send still waits, though its value could be buffered";
    auto v = ch.try_recv();
    ASSERT_TRUE(v);
    EXPECT_EQ(*v, 2);
    s.join();
  }, {.workers = 1});
}

}  // namespace
}  // namespace weft
