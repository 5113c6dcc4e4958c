// sched/run_queue_test.cc
//
// Tests of run_queue: the owner's FIFO order, push_front(), steal-half,
// overflow of the older half, index wraparound, a randomized comparison
// with a std::deque model, and a bounded concurrent stress with Capacity 4
// so that overflow, wraparound, pushes at the head and racing steals
// happen every few operations (Tokio shrinks its queue to 4 under loom for
// the same reason).
#include "sched/run_queue.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace weft::sched {
namespace {

struct item {
  std::uint32_t id = 0;
};

using small_queue = run_queue<item, 4>;

std::vector<item> make_items(std::uint32_t n) {
  std::vector<item> items(n);
  for (std::uint32_t i = 0; i < n; ++i) items[i].id = i;
  return items;
}

// An overflow callback for tests that must not overflow.
void no_overflow(item**, std::uint32_t) { ADD_FAILURE() << "unexpected overflow"; }

std::vector<std::uint32_t> drain(small_queue& q) {
  std::vector<std::uint32_t> ids;
  while (item* x = q.pop()) ids.push_back(x->id);
  return ids;
}

TEST(RunQueue, OwnerPopsInFifoOrder) {
  std::vector<item> items = make_items(200);
  run_queue<item> q;
  for (item& x : items) q.push(&x, no_overflow);
  EXPECT_EQ(q.size_approx(), 200u);
  for (std::uint32_t i = 0; i < 200; ++i) {
    item* x = q.pop();
    ASSERT_NE(x, nullptr);
    EXPECT_EQ(x->id, i);
  }
  EXPECT_EQ(q.pop(), nullptr);
  EXPECT_TRUE(q.empty_approx());
}

TEST(RunQueue, PushFrontPutsAnElementAtTheHeadForPopAndForThieves) {
  std::vector<item> items = make_items(6);
  small_queue q, thief;
  q.push(&items[0], no_overflow);
  q.push(&items[1], no_overflow);
  ASSERT_TRUE(q.push_front(&items[2]));
  ASSERT_TRUE(q.push_front(&items[3]));
  EXPECT_EQ(q.size_approx(), 4u);
  EXPECT_FALSE(q.push_front(&items[4])) << "a full ring refuses, taking nothing";
  EXPECT_EQ(q.size_approx(), 4u);
  EXPECT_EQ(thief.steal_from(q)->id, 3u);  // the head, then 2 into the thief
  EXPECT_EQ(drain(thief), (std::vector<std::uint32_t>{2}));
  EXPECT_EQ(drain(q), (std::vector<std::uint32_t>{0, 1}));
  ASSERT_TRUE(q.push_front(&items[5]));  // into an empty ring
  EXPECT_EQ(drain(q), (std::vector<std::uint32_t>{5}));
}

TEST(RunQueue, PopOnAnEmptyQueueReturnsNull) {
  small_queue q;
  EXPECT_EQ(q.pop(), nullptr);
  EXPECT_TRUE(q.empty_approx());
  EXPECT_EQ(q.size_approx(), 0u);
}

TEST(RunQueue, StealTakesHalfRoundedUp) {
  std::vector<item> items = make_items(3);
  small_queue victim, thief;
  for (item& x : items) victim.push(&x, no_overflow);

  item* got = thief.steal_from(victim);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->id, 0u);  // the oldest runs right away
  EXPECT_EQ(drain(thief), std::vector<std::uint32_t>{1});
  EXPECT_EQ(drain(victim), std::vector<std::uint32_t>{2});
}

TEST(RunQueue, StealTakesCeilOfHalfForEverySize) {
  for (std::uint32_t n = 1; n <= 4; ++n) {
    std::vector<item> items = make_items(n);
    small_queue victim, thief;
    for (item& x : items) victim.push(&x, no_overflow);
    item* got = thief.steal_from(victim);
    ASSERT_NE(got, nullptr) << "n=" << n;
    const std::uint32_t taken = 1 + thief.size_approx();
    EXPECT_EQ(taken, (n + 1) / 2) << "n=" << n;
    EXPECT_EQ(victim.size_approx(), n - taken) << "n=" << n;
  }
}

TEST(RunQueue, StealFromAnEmptyVictimReturnsNullAndTakesNothing) {
  small_queue victim, thief;
  EXPECT_EQ(thief.steal_from(victim), nullptr);
  EXPECT_TRUE(thief.empty_approx());
}

TEST(RunQueue, StolenElementsKeepFifoOrderInTheThiefQueue) {
  std::vector<item> items = make_items(256);
  run_queue<item> victim, thief;
  for (item& x : items) victim.push(&x, no_overflow);
  item* got = thief.steal_from(victim);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->id, 0u);
  for (std::uint32_t i = 1; i < 128; ++i) EXPECT_EQ(thief.pop()->id, i);
  EXPECT_EQ(thief.pop(), nullptr);
  for (std::uint32_t i = 128; i < 256; ++i) EXPECT_EQ(victim.pop()->id, i);
}

TEST(RunQueue, PushingIntoAFullQueueOverflowsTheOlderHalfPlusTheNewOneInFifoOrder) {
  std::vector<item> items = make_items(5);
  small_queue q;
  for (std::uint32_t i = 0; i < 4; ++i) q.push(&items[i], no_overflow);

  std::vector<std::uint32_t> overflowed;
  int calls = 0;
  q.push(&items[4], [&](item** batch, std::uint32_t n) {
    ++calls;
    for (std::uint32_t i = 0; i < n; ++i) overflowed.push_back(batch[i]->id);
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(overflowed, (std::vector<std::uint32_t>{0, 1, 4}));
  EXPECT_EQ(drain(q), (std::vector<std::uint32_t>{2, 3}));
}

// Capacity 4: the ring indices wrap every 4 elements; the runs of 1..4
// pushes followed by a partial drain move the head to every offset.
TEST(RunQueue, MillionsOfPushPopCyclesKeepFifoOrderAcrossWraparound) {
  constexpr std::uint32_t kCycles = 1'000'000;
  std::vector<item> items = make_items(4);
  small_queue q;
  std::uint32_t next_in = 0, next_out = 0;
  for (std::uint32_t c = 0; c < kCycles; ++c) {
    const std::uint32_t burst = 1 + c % 4;
    for (std::uint32_t i = 0; i < burst && next_in - next_out < 4; ++i) {
      q.push(&items[next_in % 4], no_overflow);
      ++next_in;
    }
    const std::uint32_t take = 1 + (c / 4) % 3;
    for (std::uint32_t i = 0; i < take && next_out != next_in; ++i) {
      item* x = q.pop();
      ASSERT_NE(x, nullptr);
      ASSERT_EQ(x->id, next_out % 4);
      ++next_out;
    }
  }
  EXPECT_GT(next_in, kCycles);  // millions of elements went through
  while (next_out != next_in) ASSERT_EQ(q.pop()->id, next_out++ % 4);
  EXPECT_EQ(q.pop(), nullptr);
}

// Single-threaded random push/pop/steal/overflow on two queues, checked
// against std::deque models of what each should hold.
TEST(RunQueue, MatchesADequeModelUnderRandomOperations) {
  constexpr std::uint32_t kOps = 200'000;
  std::vector<item> items = make_items(kOps);
  small_queue q[2];
  std::deque<item*> model[2];
  std::mt19937 rng(12345);
  std::uint32_t next = 0;
  for (std::uint32_t op = 0; op < kOps; ++op) {
    const int a = static_cast<int>(rng() % 2), b = 1 - a;
    switch (rng() % 5) {
      case 4: {  // push_front, refused when full
        item* x = &items[next++];
        const bool room = model[a].size() < 4;
        if (room) model[a].push_front(x);
        ASSERT_EQ(q[a].push_front(x), room);
        break;
      }
      case 0:
      case 1: {  // push, overflowing when full
        item* x = &items[next++];
        std::vector<item*> expect;
        if (model[a].size() == 4) {
          expect = {model[a][0], model[a][1], x};
          model[a].erase(model[a].begin(), model[a].begin() + 2);
        } else {
          model[a].push_back(x);
        }
        std::vector<item*> got;
        q[a].push(x, [&](item** batch, std::uint32_t n) { got.assign(batch, batch + n); });
        ASSERT_EQ(got, expect);
        break;
      }
      case 2: {  // pop
        item* want = model[a].empty() ? nullptr : model[a].front();
        if (want) model[a].pop_front();
        ASSERT_EQ(q[a].pop(), want);
        break;
      }
      case 3: {  // a steals from b, if a's ring can receive
        if (model[a].size() > 2) break;
        const std::size_t n = (model[b].size() + 1) / 2;
        item* want = n == 0 ? nullptr : model[b].front();
        for (std::size_t i = 1; i < n; ++i) model[a].push_back(model[b][i]);
        model[b].erase(model[b].begin(), model[b].begin() + static_cast<std::ptrdiff_t>(n));
        ASSERT_EQ(q[a].steal_from(q[b]), want);
        break;
      }
    }
    ASSERT_EQ(q[a].size_approx(), model[a].size());
    ASSERT_EQ(q[b].size_approx(), model[b].size());
  }
}

// pop_unshared() (a scheduler with one worker) is pop() without the CAS:
// the same order through overflow and wraparound, mixed with pop().
TEST(RunQueue, PopUnsharedMatchesADequeModelThroughOverflowAndWraparound) {
  constexpr std::uint32_t kOps = 200'000;
  std::vector<item> items = make_items(kOps);
  small_queue q;
  std::deque<item*> model;
  std::mt19937 rng(777);
  std::uint32_t next = 0, overflows = 0, unshared = 0;
  for (std::uint32_t op = 0; op < kOps; ++op) {
    const unsigned r = rng() % 6;
    if (r == 5) {  // push_front, refused when full
      item* x = &items[next++];
      const bool room = model.size() < 4;
      if (room) model.push_front(x);
      ASSERT_EQ(q.push_front(x), room);
    } else if (r < 3) {  // push, overflowing when full
      item* x = &items[next++];
      std::vector<item*> expect;
      if (model.size() == 4) {
        expect = {model[0], model[1], x};
        model.erase(model.begin(), model.begin() + 2);
        ++overflows;
      } else {
        model.push_back(x);
      }
      std::vector<item*> got;
      q.push(x, [&](item** batch, std::uint32_t n) { got.assign(batch, batch + n); });
      ASSERT_EQ(got, expect);
    } else {
      item* want = model.empty() ? nullptr : model.front();
      if (want) model.pop_front();
      if (r == 3) {
        ASSERT_EQ(q.pop_unshared(), want);
        unshared += want != nullptr;
      } else {
        ASSERT_EQ(q.pop(), want);
      }
    }
    ASSERT_EQ(q.size_approx(), model.size());
  }
  EXPECT_GT(overflows, 1000u);
  EXPECT_GT(unshared, 10'000u);
}

TEST(RunQueueDeathTest, StealingIntoAQueueMoreThanHalfFullAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::vector<item> items = make_items(5);
  small_queue victim, thief;
  for (int i = 0; i < 3; ++i) thief.push(&items[i], no_overflow);
  victim.push(&items[3], no_overflow);
  EXPECT_DEATH(thief.steal_from(victim), "thief queue too full");
}

// *Stress*. One owner pushes kItems unique items, a third of them at the
// head (push_front(), at the back if the ring is full), popping some of
// them, with overflow going to a mutex-protected vector; kThieves thieves, each with a
// run_queue of its own, steal from the owner or from each other and pop
// their own queue. At the end each item was seen exactly once.
//
// Termination: the owner stores done_ after its own queue is empty for good
// (only the owner pushes into it). A thief that saw done_ and then found the
// owner's queue empty exits once its own queue is empty; an item a thief
// holds is only ever run by that thief, so none is left behind.
class RunQueueStress : public ::testing::Test {
 protected:
  static constexpr std::uint32_t kItems = 600'000;
  static constexpr int kThieves = 3;

  void see(item* x) {
    // relaxed: a counter, read after join() (which orders it).
    seen_[x->id].fetch_add(1, std::memory_order_relaxed);
  }

  void run_owner() {
    std::mt19937 rng(1);
    auto overflow = [this](item** batch, std::uint32_t n) {
      std::lock_guard lock(overflow_mu_);
      overflowed_.insert(overflowed_.end(), batch, batch + n);
    };
    for (item& x : items_) {
      // A pop just before a push_front puts head_'s index back where it
      // was: the pattern the tag exists for (see *Tags* in run_queue.h).
      if (rng() % 3 != 0 || !owner_.push_front(&x)) owner_.push(&x, overflow);
      if (rng() % 3 == 0) {
        if (item* y = owner_.pop()) see(y);
      }
      if (x.id % 64 == 0) std::this_thread::yield();  // let thieves in on 2 cores
    }
    while (item* y = owner_.pop()) see(y);
    // release: publishes that owner_ is empty for good; pairs with the
    // acquire in run_thief().
    done_.store(true, std::memory_order_release);
  }

  void run_thief(int k) {
    std::mt19937 rng(100 + static_cast<unsigned>(k));
    small_queue& own = *thieves_[k];
    for (;;) {
      if (item* x = own.pop()) {
        see(x);
        continue;
      }
      // acquire: pairs with the release in run_owner(): owner_ is empty now.
      const bool owner_done = done_.load(std::memory_order_acquire);
      small_queue* victim = &owner_;
      if (!owner_done && rng() % 2 == 0) {
        const int other = (k + 1 + static_cast<int>(rng() % (kThieves - 1))) % kThieves;
        victim = thieves_[other].get();
      }
      if (item* x = own.steal_from(*victim)) {
        // relaxed: a statistic.
        stolen_.fetch_add(1, std::memory_order_relaxed);
        see(x);
        continue;
      }
      if (owner_done) return;  // victim was owner_, empty for good
      std::this_thread::yield();
    }
  }

  std::vector<item> items_ = make_items(kItems);
  std::unique_ptr<std::atomic<std::uint8_t>[]> seen_{
      new std::atomic<std::uint8_t>[kItems]()};
  small_queue owner_;
  std::vector<std::unique_ptr<small_queue>> thieves_;
  std::mutex overflow_mu_;
  std::vector<item*> overflowed_;  // guarded by overflow_mu_
  std::atomic<bool> done_{false};
  std::atomic<std::uint64_t> stolen_{0};
};

TEST_F(RunQueueStress, EveryItemIsSeenExactlyOnceUnderConcurrentPushPopStealAndOverflow) {
  for (int k = 0; k < kThieves; ++k) thieves_.push_back(std::make_unique<small_queue>());
  std::vector<std::thread> threads;
  for (int k = 0; k < kThieves; ++k) threads.emplace_back([this, k] { run_thief(k); });
  threads.emplace_back([this] { run_owner(); });
  for (std::thread& t : threads) t.join();

  for (item* x : overflowed_) see(x);
  std::uint32_t bad = 0;
  for (std::uint32_t i = 0; i < kItems; ++i) {
    // relaxed: all writers have been joined.
    const int n = seen_[i].load(std::memory_order_relaxed);
    if (n != 1 && bad++ < 10) ADD_FAILURE() << "item " << i << " seen " << n << " times";
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_TRUE(owner_.empty_approx());
  for (auto& q : thieves_) EXPECT_TRUE(q->empty_approx());
  // relaxed: the thieves have been joined.
  std::printf("stress: %zu overflowed, %llu steals\n", overflowed_.size(),
              static_cast<unsigned long long>(stolen_.load(std::memory_order_relaxed)));
}

// *Symmetric stress*, as workers use the queues: every thread owns a queue,
// pushes its share of the items into it (overflowing to a shared list),
// pops from it, and steals from the others' whenever its own holds no more
// than Capacity - Capacity/2 (the most steal_from() accepts). So a queue
// is pushed into, popped from, stolen from and stolen into by its owner,
// all while others steal from it. Each item is seen exactly once; a thread
// stops once every item is accounted for (seen or overflowed).
TEST(RunQueueSymmetricStress, EveryItemIsSeenOnceWhenEveryThreadPushesPopsAndSteals) {
  constexpr std::uint32_t kPerThread = 200'000;
  constexpr int kThreads = 4;
  constexpr std::uint32_t kTotal = kPerThread * kThreads;
  std::vector<item> items = make_items(kTotal);
  std::unique_ptr<std::atomic<std::uint8_t>[]> seen{new std::atomic<std::uint8_t>[kTotal]()};
  std::vector<std::unique_ptr<small_queue>> queues;
  for (int k = 0; k < kThreads; ++k) queues.push_back(std::make_unique<small_queue>());
  std::mutex overflow_mu;
  std::vector<item*> overflowed;  // guarded by overflow_mu
  // relaxed (both): counters; the exit test needs only to see the total
  // eventually, and join() orders the final reads.
  std::atomic<std::uint32_t> accounted{0};
  std::atomic<std::uint64_t> steals{0};
  auto see = [&](item* x) {
    seen[x->id].fetch_add(1, std::memory_order_relaxed);
    accounted.fetch_add(1, std::memory_order_relaxed);
  };
  auto body = [&](int k) {
    std::mt19937 rng(7 + static_cast<unsigned>(k));
    small_queue& own = *queues[k];
    auto overflow = [&](item** batch, std::uint32_t n) {
      {
        std::lock_guard lock(overflow_mu);
        overflowed.insert(overflowed.end(), batch, batch + n);
      }
      accounted.fetch_add(n, std::memory_order_relaxed);
    };
    std::uint32_t next = 0;
    while (accounted.load(std::memory_order_relaxed) != kTotal) {
      const unsigned r = rng() % 8;
      if (next < kPerThread && r < 4) {
        item* x = &items[k * kPerThread + next++];
        if (r != 0 || !own.push_front(x)) own.push(x, overflow);
      } else if (r < 6 || own.size_approx() > 2) {
        if (item* x = own.pop()) see(x);
      } else {
        small_queue& victim = *queues[(k + 1 + rng() % (kThreads - 1)) % kThreads];
        if (item* x = own.steal_from(victim)) {
          steals.fetch_add(1, std::memory_order_relaxed);
          see(x);
        }
      }
      if (rng() % 256 == 0) std::this_thread::yield();  // let others in on 2 cores
    }
  };
  std::vector<std::thread> threads;
  for (int k = 0; k < kThreads; ++k) threads.emplace_back(body, k);
  for (std::thread& t : threads) t.join();
  for (item* x : overflowed) seen[x->id].fetch_add(1, std::memory_order_relaxed);
  std::uint32_t bad = 0;
  for (std::uint32_t i = 0; i < kTotal; ++i) {
    const int n = seen[i].load(std::memory_order_relaxed);
    if (n != 1 && bad++ < 10) ADD_FAILURE() << "item " << i << " seen " << n << " times";
  }
  EXPECT_EQ(bad, 0u);
  for (auto& q : queues) EXPECT_TRUE(q->empty_approx());
  EXPECT_GT(steals.load(std::memory_order_relaxed), 0u);
  std::printf("symmetric stress: %zu overflowed, %llu steals\n", overflowed.size(),
              static_cast<unsigned long long>(steals.load(std::memory_order_relaxed)));
}

}  // namespace
}  // namespace weft::sched
