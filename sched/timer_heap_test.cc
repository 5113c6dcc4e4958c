// sched/timer_heap_test.cc — the timer heap on its own (no workers): the
// handshake's cancel side and what becomes of cancelled nodes.
#include "sched/timer_heap.h"

#include <gtest/gtest.h>

#include <chrono>

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

}  // namespace
}  // namespace weft::sched
