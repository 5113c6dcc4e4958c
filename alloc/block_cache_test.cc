// alloc/block_cache_test.cc — the classes, reuse within a cache, batches
// through the depot, the depot's bound, and blocks that move between
// threads (run under --config=tsan and --config=asan too).
#include "alloc/block_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#if defined(WEFT_ASAN)
#include <sanitizer/asan_interface.h>
#endif

namespace weft::alloc {
namespace {

using bc = block_cache;

TEST(BlockCache, ClassesAreWholeLinesUpTo512BytesAnd64ByteAlignment) {
  EXPECT_EQ(bc::class_of(1, 8), 0);
  EXPECT_EQ(bc::class_of(64, 8), 0);
  EXPECT_EQ(bc::class_of(65, 8), 1);
  EXPECT_EQ(bc::class_of(232, 16), 3);
  EXPECT_EQ(bc::class_of(512, 64), 7);
  EXPECT_EQ(bc::class_of(513, 8), -1);   // too big: the caller uses operator new
  EXPECT_EQ(bc::class_of(100, 128), -1);  // too aligned
  EXPECT_EQ(bc::class_of(0, 8), -1);
  for (std::size_t n = 1; n <= 512; ++n) {
    int c = bc::class_of(n, 8);
    ASSERT_GE(c, 0);
    EXPECT_GE(bc::bytes_of(unsigned(c)), n) << n;       // holds it
    EXPECT_LT(bc::bytes_of(unsigned(c)), n + 64) << n;  // wastes less than a line
  }
}

TEST(BlockCache, BlocksAreAlignedWritableAndReusedNewestFirst) {
  bc cache(1);
  for (unsigned cls = 0; cls < bc::kClasses; ++cls) {
    std::vector<void*> got;
    for (int i = 0; i < 300; ++i) {
      void* p = cache.allocate(cls, 0);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % 64, 0u);
      std::memset(p, 0xab, bc::bytes_of(cls));  // the whole class is ours
      got.push_back(p);
    }
    EXPECT_EQ(std::set<void*>(got.begin(), got.end()).size(), got.size());
    void* last = got.back();
    for (void* p : got) cache.release(p, cls, 0);
    // The last block released is the first handed out again (warm).
    void* again = cache.allocate(cls, 0);
    EXPECT_EQ(again, last);
    cache.release(again, cls, 0);
  }
}

// Blocks released on one cache reach another through the depot, a batch
// at a time, instead of that cache allocating new ones.
TEST(BlockCache, ABatchReleasedOnOneCacheIsTakenByAnother) {
  bc cache(2);
  const unsigned cls = 3;
  std::vector<void*> blocks;
  for (unsigned i = 0; i < 2 * bc::kBatch; ++i) blocks.push_back(cache.allocate(cls, 0));
  std::set<void*> released(blocks.begin(), blocks.end());
  // Cache 1 releases them all: its array fills and half goes to the depot.
  for (void* p : blocks) cache.release(p, cls, 1);
  EXPECT_EQ(cache.cached(), 2u * bc::kBatch);
  // Cache 0 is empty (its first refill was handed out): it takes that half.
  for (unsigned i = 0; i < bc::kBatch; ++i) {
    void* p = cache.allocate(cls, 0);
    EXPECT_TRUE(released.count(p)) << "a new block while the depot had " << bc::kBatch;
    blocks[i] = p;
  }
  for (unsigned i = 0; i < bc::kBatch; ++i) cache.release(blocks[i], cls, 0);
}

// Each NUMA node has its own depot: blocks a node's caches give back are
// reused on that node, not handed to a cache of another node.
TEST(BlockCache, BlocksStayOnTheirNodesDepot) {
  bc cache(3, {0, 1, 1});
  const unsigned cls = 2;
  std::vector<void*> blocks;
  for (unsigned i = 0; i < 2 * bc::kBatch; ++i) blocks.push_back(cache.allocate(cls, 1));
  std::set<void*> node1(blocks.begin(), blocks.end());
  for (void* p : blocks) cache.release(p, cls, 1);  // a batch to node 1's depot
  void* p0 = cache.allocate(cls, 0);                // node 0: a fresh block
  EXPECT_FALSE(node1.count(p0));
  void* p2 = cache.allocate(cls, 2);  // node 1's other cache: the batch
  EXPECT_TRUE(node1.count(p2));
  cache.release(p0, cls, 0);
  cache.release(p2, cls, 2);
}

// The depot keeps at most kDepotMax blocks of a class: a burst's blocks
// beyond that go back to the process allocator.
TEST(BlockCache, TheDepotIsBounded) {
  bc cache(2);
  const unsigned cls = 0;
  const std::size_t n = bc::kDepotMax + 8 * bc::kBatch;
  std::vector<void*> blocks;
  blocks.reserve(n);
  for (std::size_t i = 0; i < n; ++i) blocks.push_back(cache.allocate(cls, 0));
  for (void* p : blocks) cache.release(p, cls, 1);
  // The depot's bound and cache 1's array (under 2 * kBatch): the rest is freed.
  EXPECT_LE(cache.cached(), bc::kDepotMax + 2 * bc::kBatch);
  EXPECT_GE(cache.cached(), bc::kDepotMax);
  EXPECT_EQ(cache.made(), cache.cached());  // the rest went to operator delete
}

// The shared index (plain threads) has no array: it allocates fresh blocks
// and releases to the depot, where a cache takes them.
TEST(BlockCache, TheSharedIndexGoesStraightToTheDepot) {
  bc cache(1);
  const unsigned shared = 1;
  void* p = cache.allocate(2, shared);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % 64, 0u);
  cache.release(p, 2, shared);
  EXPECT_EQ(cache.cached(), 1u);
  EXPECT_EQ(cache.allocate(2, 0), p);
  cache.release(p, 2, 0);
}

// Blocks allocated on one thread and released on another, both ways, as a
// fiber spawned on one worker ends on the other: every block keeps what
// its allocator wrote until its release (TSan checks the hand-overs).
TEST(BlockCache, BlocksMovingBetweenThreadsKeepTheirContents) {
  bc cache(2);
#if defined(WEFT_TSAN)
  constexpr int kRounds = 20'000;
#else
  constexpr int kRounds = 200'000;
#endif
  constexpr unsigned cls = 3;
  // Two single-producer single-consumer rings, one each way.
  struct ring {
    std::atomic<std::uint64_t> head{0}, tail{0};
    void* slot[1024];
  } rings[2];
  std::atomic<long> bad{0};  // words not as their allocator wrote them
  std::set<void*> seen[2];     // every block each thread was handed
  auto run = [&](unsigned me) {
    ring& out = rings[me];
    ring& in = rings[1 - me];
    std::uint64_t sent = 0, got = 0;
    while (sent < kRounds || got < kRounds) {
      // relaxed on our own index; acquire on theirs: pairs with their release.
      if (sent < kRounds &&
          sent - out.head.load(std::memory_order_acquire) < 1024) {
        auto* p = static_cast<std::uint64_t*>(cache.allocate(cls, me));
        seen[me].insert(p);
        for (std::size_t k = 0; k < bc::bytes_of(cls) / 8; ++k) p[k] = sent * 31 + k + me;
        out.slot[sent % 1024] = p;
        out.tail.store(++sent, std::memory_order_release);
      }
      if (got < in.tail.load(std::memory_order_acquire)) {
        auto* p = static_cast<std::uint64_t*>(in.slot[got % 1024]);
        for (std::size_t k = 0; k < bc::bytes_of(cls) / 8; ++k)
          if (p[k] != got * 31 + k + (1 - me)) bad.fetch_add(1, std::memory_order_relaxed);
        cache.release(p, cls, me);
        in.head.store(++got, std::memory_order_release);
      }
    }
  };
  std::thread a(run, 0), b(run, 1);
  a.join();
  b.join();
  EXPECT_EQ(bad.load(), 0);
  // Every block is back in a cache or the depot, once: as many as were
  // made (far fewer than the depot's bound, so none was freed).
  seen[0].insert(seen[1].begin(), seen[1].end());
  EXPECT_LE(seen[0].size(), cache.made());
  EXPECT_EQ(cache.cached(), cache.made());
}

#if defined(WEFT_ASAN)
// A block in a cache is poisoned: a write through a stale pointer is
// reported instead of corrupting the next fiber's control block.
TEST(BlockCacheDeath, AUseAfterReleaseIsReportedUnderAsan) {
  EXPECT_DEATH(
      {
        bc cache(1);
        auto* p = static_cast<char*>(cache.allocate(1, 0));
        cache.release(p, 1, 0);
        p[7] = 1;
      },
      "use-after-poison");
}
#endif

}  // namespace
}  // namespace weft::alloc
