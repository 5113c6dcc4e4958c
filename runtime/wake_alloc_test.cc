// runtime/wake_alloc_test.cc — a waker that wakes many blockers at once
// (channel close, notify_all, semaphore release, shared_mutex unlock,
// wait_group done) allocates nothing: those calls are noexcept, so an
// allocation there would turn memory pressure into std::terminate, and it
// would cost a malloc on every broadcast. And a long-lived task_group
// keeps nothing per child that has finished. A separate binary, because it
// replaces the global operator new and delete to count.
#include <malloc.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <new>
#include <vector>

#include "runtime/channel.h"
#include "runtime/sync.h"
#include "runtime/task_group.h"
#include "tests/fixture.h"

namespace {
thread_local bool counting = false;
std::atomic<long> counted{0};
// Heap bytes held through operator new, by every thread (malloc's usable
// size of each block).
std::atomic<long> live_bytes{0};

void* counted_alloc(std::size_t n, std::size_t align) {
  // relaxed: a plain tally, read after the counting thread cleared its flag.
  if (counting) counted.fetch_add(1, std::memory_order_relaxed);
  void* p = align > alignof(std::max_align_t)
                ? std::aligned_alloc(align, (n + align - 1) / align * align)
                : std::malloc(n ? n : 1);
  // relaxed: a tally, read once the work it measures has been waited for.
  if (p) live_bytes.fetch_add(static_cast<long>(malloc_usable_size(p)), std::memory_order_relaxed);
  return p;
}

void counted_free(void* p) noexcept {
  if (!p) return;
  live_bytes.fetch_sub(static_cast<long>(malloc_usable_size(p)), std::memory_order_relaxed);
  std::free(p);
}
}  // namespace

void* operator new(std::size_t n) {
  if (void* p = counted_alloc(n, 0)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = counted_alloc(n, static_cast<std::size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
// Every form of operator delete is replaced too, with free(), so that the
// pairs match for sanitizers that check them (ASan's own operator delete
// would see a malloc). GCC's -Wmismatched-new-delete cannot see that these
// replacements belong together and warns at inlined library call sites.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_free(p); }

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class WakeAlloc : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(WakeAlloc);

constexpr int kBlockers = 64;

// Spawns kBlockers fibers running `block`, waits until each has announced
// itself and then long enough to be parked, runs `wake` with allocations
// counted, joins them, and returns how many allocations `wake` made.
long allocations_of_wake(const std::function<void()>& block, const std::function<void()>& wake) {
  std::atomic<int> started{0};
  std::vector<join_handle<void>> hs;
  for (int i = 0; i < kBlockers; ++i)
    hs.push_back(spawn([&] {
      started.fetch_add(1);
      block();
    }));
  while (started.load() < kBlockers) this_fiber::sleep_for(1ms);
  this_fiber::sleep_for(50ms);  // from announced to parked: a few instructions
  counted.store(0);
  counting = true;  // no park between here and the reset: same thread
  wake();
  counting = false;
  long n = counted.load();
  for (auto& h : hs) h.join();
  return n;
}

TEST_P(WakeAlloc, ChannelCloseWakesEveryReceiverWithoutAllocating) {
  Run([] {
    channel<int> ch(0);
    std::atomic<int> empty{0};
    long n = allocations_of_wake([&] { if (!ch.recv()) empty.fetch_add(1); },
                                 [&] { ch.close(); });
    EXPECT_EQ(n, 0);
    EXPECT_EQ(empty.load(), kBlockers);
  });
}

TEST_P(WakeAlloc, NotifyAllWithoutAllocating) {
  Run([] {
    mutex mu;
    condition_variable cv;
    bool go = false;
    long n = allocations_of_wake(
        [&] {
          std::unique_lock lk(mu);
          while (!go) (void)cv.wait(lk);
        },
        [&] {
          {
            std::lock_guard g(mu);
            go = true;
          }
          cv.notify_all();
        });
    EXPECT_EQ(n, 0);
  });
}

TEST_P(WakeAlloc, SemaphoreReleaseOfManyWithoutAllocating) {
  Run([] {
    semaphore sem(0);
    long n = allocations_of_wake([&] { EXPECT_TRUE(sem.acquire()); },
                                 [&] { sem.release(kBlockers); });
    EXPECT_EQ(n, 0);
  });
}

TEST_P(WakeAlloc, SharedMutexUnlockGrantsEveryReaderWithoutAllocating) {
  Run([] {
    shared_mutex mu;
    mu.lock();
    long n = allocations_of_wake(
        [&] {
          mu.lock_shared();
          mu.unlock_shared();
        },
        [&] { mu.unlock(); });
    EXPECT_EQ(n, 0);
  });
}

TEST_P(WakeAlloc, WaitGroupDoneWakesEveryWaiterWithoutAllocating) {
  Run([] {
    wait_group wg;
    wg.add(1);
    long n = allocations_of_wake([&] { EXPECT_TRUE(wg.wait()); }, [&] { wg.done(); });
    EXPECT_EQ(n, 0);
  });
}

// A task_group that lives as long as a server (one child per connection)
// must not hold anything for the children that have finished: 20,000
// children, in waves of 100 that each finish before the next starts, leave
// the heap where the first 1,000 left it (when the group kept a join
// handle per child until wait(), this grew by 1.85 MB: ~93 bytes a child).
// Under TSan, where making a fiber's context costs ~3 ms (it clears a large
// per-thread state), 4,000 children: the old growth would be ~370 KB.
TEST_P(WakeAlloc, ATaskGroupKeepsNothingForFinishedChildren) {
#if defined(WEFT_TSAN)
  constexpr int kWaves = 40;
#else
  constexpr int kWaves = 200;
#endif
  Run([] {
    task_group g;
    auto wave = [&] {
      wait_group wg;
      wg.add(100);
      for (int i = 0; i < 100; ++i)
        g.spawn([&wg] { wg.done(); });
      (void)wg.wait();
    };
    for (int w = 0; w < 10; ++w) wave();
    // Let the last children get past their count-down: their blocks go back.
    (void)this_fiber::sleep_for(20ms);
    long before = live_bytes.load(std::memory_order_relaxed);
    for (int w = 0; w < kWaves; ++w) wave();
    (void)this_fiber::sleep_for(20ms);
    long grown = live_bytes.load(std::memory_order_relaxed) - before;
    EXPECT_LT(grown, 200 * 1024) << "bytes still held after " << kWaves * 100
                                 << " finished children";
    ASSERT_TRUE(g.wait());
  });
}

// fiber_locals made and dropped one after another (say, one inside each
// request object) reuse their keys: a fiber's table stays as long as the
// most that existed at once. Before keys were reused it grew by a slot
// (16 bytes) for every fiber_local ever made.
TEST_P(WakeAlloc, FiberLocalsMadeAndDroppedDoNotGrowAFibersTable) {
  Run([] {
    spawn([] {
      auto one = [] {
        fiber_local<int> l;
        *l = 1;
      };
      for (int i = 0; i < 1000; ++i) one();
      long before = live_bytes.load(std::memory_order_relaxed);
      for (int i = 0; i < 100'000; ++i) one();
      long grown = live_bytes.load(std::memory_order_relaxed) - before;
      EXPECT_LT(grown, 64 * 1024) << "bytes held after 100,000 fiber_locals came and went";
    }).join();
  });
}

}  // namespace
}  // namespace weft
