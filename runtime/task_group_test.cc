// runtime/task_group_test.cc — weft::task_group: waits for all children,
// and the first failure stops the rest.
#include "runtime/task_group.h"

#include <atomic>
#include <stdexcept>

#include "runtime/channel.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class TaskGroup : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(TaskGroup);

TEST_P(TaskGroup, WaitReturnsAfterEveryChildFinished) {
  Run([] {
    std::atomic<int> done{0};
    task_group g;
    for (int i = 0; i < 100; ++i)
      g.spawn([&, i] {
        (void)this_fiber::sleep_for(std::chrono::microseconds(i * 10));
        done.fetch_add(1);
      });
    EXPECT_TRUE(g.wait());
    EXPECT_EQ(done.load(), 100);
  });
}

TEST_P(TaskGroup, TheFirstErrorStopsTheOtherChildren) {
  Run([] {
    channel<int> never(0);
    std::atomic<int> cancelled{0};
    task_group g;
    for (int i = 0; i < 10; ++i)
      g.spawn([&]() -> result<void> {
        auto r = never.recv(deadline::never());
        if (!r && r.error() == std::errc::operation_canceled) cancelled.fetch_add(1);
        return {};
      });
    g.spawn([]() -> result<void> {
      (void)this_fiber::sleep_for(2ms);
      return make_error(std::errc::connection_refused);
    });
    result<void> r = g.wait();
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error(), std::errc::connection_refused);
    EXPECT_EQ(cancelled.load(), 10);
  });
}

TEST_P(TaskGroup, AChildsExceptionIsRethrownByWaitAfterTheOthersStop) {
  Run([] {
    task_group g;
    g.spawn([] { (void)this_fiber::sleep_for(1h); });
    g.spawn([] { throw std::runtime_error("child failed"); });
    EXPECT_THROW((void)g.wait(), std::runtime_error);
  });
}

TEST_P(TaskGroup, StoppingTheWaiterStopsTheChildren) {
  Run([] {
    auto parent = spawn([] {
      task_group g;
      for (int i = 0; i < 5; ++i) g.spawn([] { (void)this_fiber::sleep_for(1h); });
      return g.wait();
    });
    (void)this_fiber::sleep_for(2ms);
    parent.request_stop();
    EXPECT_EQ(parent.join().error(), std::errc::operation_canceled);
  });
}

}  // namespace
}  // namespace weft
