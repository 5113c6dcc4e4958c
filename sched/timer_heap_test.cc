// sched/timer_heap_test.cc — the timer heap on its own (no workers): the
// handshake's fire and cancel sides, which park a timer may wake, and what
// becomes of cancelled nodes.
#include "sched/timer_heap.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "sched/fiber.h"

namespace weft::sched {
namespace {

using namespace std::chrono_literals;

// Deadlines far away (an idle timeout) that are all cancelled long before
// they are due, as the reads of a busy server are: nothing ever comes due,
// so only arm() can drop the cancelled nodes. Before it did, every one of
// them stayed until the first deadline passed (here an hour; in a server,
// rate times timeout nodes).
TEST(TimerHeap, CancelledNodesAreDroppedWhileNothingIsDue) {
  timer_heap h;
  const auto far = clock::now() + 1h;
  timer_node* live = h.arm(far, {});  // one that stays armed throughout
  for (int i = 0; i < 10'000; ++i) timer_heap::finish(h.arm(far + 1ms * i, {}));
  EXPECT_LT(h.size(), 200u);  // a compaction leaves the live one and fewer than 130 cancelled
  EXPECT_EQ(h.armed(), 1u);
  EXPECT_EQ(h.next_deadline(), far);  // the heap order survived the compactions
  timer_heap::finish(live);
}

// The timer handshake (timer_heap.h) and the park protocol's claim
// (park.cc), each interleaving played in order on one thread, with bare
// control blocks standing for parked fibers (no worker runs them):
//   - a timer wakes the park it was armed for, with timed_out, once;
//   - it wakes it in the parking phase too: a thief (worker::steal_timers)
//     may fire an overdue timer between after_park()'s arm() and its CAS
//     to parked, and the claim must win then, or the wake is lost (the
//     node is gone from the heap, and after_park() parks the fiber);
//   - it wakes nothing once another party claimed that park (the fiber
//     frees the node: `fired` lets finish() return at once);
//   - it never wakes a later park of the fiber (its generation moved on);
//   - a node the fiber cancelled first is dropped unfired, and freed by
//     the heap (ASan builds see a leak or a double free otherwise).
// The wrong-generation case cannot happen in the runtime (park() finishes
// its timer before it returns), so it guards claim()'s check itself.
TEST(TimerHeap, ATimerWakesOnlyTheParkItWasArmedForAndOnlyOnce) {
  timer_heap h;
  const clock::time_point due = clock::now() - 1ms;
  auto fire = [&] {
    std::vector<fiber*> woken;
    unsigned n = h.fire_expired(clock::now(), [&](fiber* f) { woken.push_back(f); });
    EXPECT_EQ(n, woken.size());
    return woken;
  };
  auto state = [](const fiber& f) { return f.state_.load(std::memory_order_relaxed); };

  fiber parked;
  parked.state_.store(pack_state(1, park_phase::parked, true), std::memory_order_relaxed);
  timer_node* n1 = h.arm(due, {&parked, 1});
  EXPECT_EQ(fire(), std::vector<fiber*>{&parked});
  EXPECT_EQ(phase_of(state(parked)), park_phase::woken);
  EXPECT_EQ(reason_of(state(parked)), wake_reason::timed_out);
  EXPECT_TRUE(fire().empty());  // popped: it fires once
  timer_heap::finish(n1);       // `fired`: the fiber frees it at once

  fiber parking;  // arm() ran, the publish step and the CAS to parked not yet
  parking.state_.store(pack_state(7, park_phase::parking, true), std::memory_order_relaxed);
  timer_node* n2 = h.arm(due, {&parking, 7});
  EXPECT_EQ(fire(), std::vector<fiber*>{&parking});
  EXPECT_EQ(state(parking), pack_state(7, park_phase::woken, true, wake_reason::timed_out));
  timer_heap::finish(n2);

  fiber notified;  // a waker claimed the park before the timer fired
  notified.state_.store(pack_state(3, park_phase::parked, true), std::memory_order_relaxed);
  timer_node* n3 = h.arm(due, {&notified, 3});
  ASSERT_EQ(claim({&notified, 3}, wake_reason::notified), &notified);
  EXPECT_EQ(claim({&notified, 3}, wake_reason::notified), nullptr);  // one claim wins
  EXPECT_TRUE(fire().empty());
  EXPECT_EQ(state(notified), pack_state(3, park_phase::woken, true, wake_reason::notified));
  timer_heap::finish(n3);

  fiber later;  // parked again, one generation on
  later.state_.store(pack_state(5, park_phase::parked, false), std::memory_order_relaxed);
  timer_node* n4 = h.arm(due, {&later, 4});
  EXPECT_TRUE(fire().empty());
  EXPECT_EQ(state(later), pack_state(5, park_phase::parked, false));
  timer_heap::finish(n4);

  fiber cancelled;  // woken otherwise; its park() cancelled the node first
  cancelled.state_.store(pack_state(2, park_phase::running), std::memory_order_relaxed);
  timer_heap::finish(h.arm(due, {&cancelled, 2}));
  EXPECT_EQ(h.armed(), 0u);
  EXPECT_TRUE(fire().empty());
  EXPECT_EQ(h.size(), 0u);  // dropped, and freed, by the heap
  EXPECT_EQ(state(cancelled), pack_state(2, park_phase::running));
  EXPECT_EQ(h.next_deadline(), clock::time_point::max());
}

// *The coarse clock* (park.h): the loop skips its timer check, and the
// I/O driver its precise clock read, when surely_later() says a deadline is
// far. If the coarse clock ever ran ahead of clock::now(), or lagged more
// than coarse_lag(), a due timer could wait, or an I/O
// deadline within a second sent to the wrong timer.
TEST(CoarseClock, BoundsThePreciseClockFromBelow) {
  const clock::duration lag = coarse_lag();
  if (lag == clock::duration::max()) GTEST_SKIP() << "no usable CLOCK_MONOTONIC_COARSE here";
  EXPECT_LE(lag, 301ms);
  // The lag is measured from a precise reading taken before the coarse one
  // (then the lag at that moment is at least before - c): a preemption
  // between the two readings only shrinks it. The other order counted the
  // preemption as lag and failed 28 runs in 30 with both CPUs busy.
  clock::duration worst{};
  for (int i = 0; i < 200'000; ++i) {
    const clock::time_point before = clock::now();
    const clock::time_point c = coarse_now();
    const clock::time_point after = clock::now();
    ASSERT_LE(c, after) << "the coarse clock ran ahead at iteration " << i;
    worst = std::max(worst, before - c);
  }
  EXPECT_LT(worst, lag);
}

TEST(CoarseClock, SurelyLaterIsNeverWrongAboutADueOrNearDeadline) {
  const clock::time_point now = clock::now();
  EXPECT_TRUE(surely_later(clock::time_point::max(), 0s));
  EXPECT_TRUE(surely_later(clock::time_point::max(), 1s));
  EXPECT_FALSE(surely_later(now, 0s));
  EXPECT_FALSE(surely_later(now - 1h, 0s));
  EXPECT_FALSE(surely_later(now + 500ms, 1s));  // within the kernel's second
  EXPECT_FALSE(surely_later(clock::time_point{}, 0s));
  if (coarse_lag() != clock::duration::max()) {
    // Far enough that the coarse clock decides alone.
    EXPECT_TRUE(surely_later(now + 1h, 0s));
    EXPECT_TRUE(surely_later(now + 1h, 1s));
  }
}

}  // namespace
}  // namespace weft::sched
