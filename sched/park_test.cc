// sched/park_test.cc — the park protocol's claims on their own (no
// workers, no scheduler): which phases each party may claim, played in
// order on one thread with bare control blocks standing for fibers. With
// no runtime running, ready() of a claimed fiber queues it nowhere.
#include "sched/park.h"

#include <gtest/gtest.h>

#include "sched/fiber.h"

namespace weft::sched {
namespace {

std::uint64_t state(const fiber& f) { return f.state_.load(std::memory_order_relaxed); }

// *Stopping a parked fiber* (park.cc): a stop request claims a park only
// in its parked phase. A fiber still parking (switched away, its publish
// step not yet run) is left to after_park(), which sees the flag after its
// CAS to parked and wakes it then; claiming it earlier would let it run
// before its waiter record exists, which the publish step would then add
// for a stack that has moved on. A non-cancellable park is left alone by
// request_stop(), not by the unwinder.
TEST(ParkClaims, AStopRequestClaimsOnlyAParkedCancellablePark) {
  fiber parking;
  parking.state_.store(pack_state(4, park_phase::parking, true), std::memory_order_relaxed);
  request_stop(&parking);
  EXPECT_EQ(state(parking), pack_state(4, park_phase::parking, true));
  EXPECT_TRUE(parking.stop_requested_.load(std::memory_order_relaxed));  // for after_park()

  fiber parked;
  parked.state_.store(pack_state(4, park_phase::parked, true), std::memory_order_relaxed);
  request_stop(&parked);
  EXPECT_EQ(state(parked), pack_state(4, park_phase::woken, true, wake_reason::cancelled));
  request_stop(&parked);  // claimed already: nothing changes
  EXPECT_EQ(state(parked), pack_state(4, park_phase::woken, true, wake_reason::cancelled));
  EXPECT_EQ(claim({&parked, 4}, wake_reason::notified), nullptr);  // its waker loses

  fiber uncancellable;
  uncancellable.state_.store(pack_state(9, park_phase::parked, false), std::memory_order_relaxed);
  request_stop(&uncancellable);
  EXPECT_EQ(state(uncancellable), pack_state(9, park_phase::parked, false));
  force_unwind(&uncancellable);
  EXPECT_EQ(state(uncancellable), pack_state(9, park_phase::woken, false, wake_reason::cancelled));
  EXPECT_TRUE(uncancellable.unwinding_.load(std::memory_order_relaxed));

  fiber running;  // runnable or on a worker: flagged, never claimed
  running.state_.store(pack_state(2, park_phase::running), std::memory_order_relaxed);
  force_unwind(&running);
  EXPECT_EQ(state(running), pack_state(2, park_phase::running));
  EXPECT_TRUE(running.unwinding_.load(std::memory_order_relaxed));
}

// A waker's claim (park.h): the first claim of the park its token names
// wins, in the parking phase too (a waker may find the token as soon as
// the publish step ran, before the CAS to parked); a token of an earlier
// park of the same fiber claims nothing.
TEST(ParkClaims, AWakersClaimWinsOnceAndOnlyForItsOwnGeneration) {
  fiber f;
  f.state_.store(pack_state(6, park_phase::parking, true), std::memory_order_relaxed);
  EXPECT_EQ(claim({&f, 5}, wake_reason::notified), nullptr);
  EXPECT_EQ(state(f), pack_state(6, park_phase::parking, true));
  EXPECT_EQ(claim({&f, 6}, wake_reason::notified), &f);
  EXPECT_EQ(state(f), pack_state(6, park_phase::woken, true, wake_reason::notified));
  EXPECT_EQ(claim({&f, 6}, wake_reason::timed_out), nullptr);
  EXPECT_FALSE(wake({&f, 6}, wake_reason::cancelled));
  EXPECT_EQ(state(f), pack_state(6, park_phase::woken, true, wake_reason::notified));
}

}  // namespace
}  // namespace weft::sched
