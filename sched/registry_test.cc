// sched/registry_test.cc — the fiber registry's biased shards (see
// *Biased shards* in registry.h): owner threads add and remove fibers on
// their own shards, without the spinlock while no reader is about, while a
// reader visits every fiber. A reader must see each fiber it visits still
// registered (no remove() completes while it holds the shards), and the
// number it visits must be the exact count it reads at the same time.
#include "sched/registry.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "alloc/asym_fence.h"

namespace weft::sched {
namespace {

using namespace std::chrono_literals;

constexpr unsigned kOwners = 2;
constexpr unsigned kPerOwner = 512;  // fibers each owner cycles through
constexpr unsigned kLive = 64;       // of which at most this many registered
constexpr unsigned kRing = 256;      // fibers in flight from owner 0 to owner 1

struct harness {
  fiber_registry reg{kOwners + 1, kOwners};  // the last shard: "plain threads"
  std::unique_ptr<fiber[]> fibers{new fiber[kOwners * kPerOwner]};
  // 1 from just before add() until just after remove() returned.
  std::unique_ptr<std::atomic<int>[]> registered{new std::atomic<int>[kOwners * kPerOwner]};
  std::atomic<bool> stop{false};
  // Owner 0 to owner 1 (cross()): indices of fibers to remove. Single
  // producer, single consumer; acquire/release on the two counters.
  unsigned ring[kRing] = {};
  std::atomic<std::uint64_t> pushed{0}, popped{0};

  unsigned index_of(const fiber* f) const { return static_cast<unsigned>(f - fibers.get()); }

  // Owner `o`: registers fibers in turn, keeping kLive registered, on its
  // own shard (as a worker does with its spawns and exits).
  void own(unsigned o) {
    const unsigned base = o * kPerOwner;
    for (unsigned i = 0; i < kPerOwner; ++i)
      registered[base + i].store(0, std::memory_order_relaxed);  // before add() publishes any
    for (std::uint64_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
      unsigned in = base + static_cast<unsigned>(n % kPerOwner);
      if (n >= kLive) {
        unsigned out = base + static_cast<unsigned>((n - kLive) % kPerOwner);
        reg.remove(&fibers[out], o);
        registered[out].store(0, std::memory_order_release);
      }
      registered[in].store(1, std::memory_order_release);
      ASSERT_TRUE(reg.add(&fibers[in], o));
    }
  }

  // Fibers spawned on one worker and ending on the other: owner 0 only
  // adds, owner 1 only removes. Shard 0's free list runs dry again and
  // again (add() leaves the shard to refill it and enters again), and shard
  // 1's overflows into the shared spare list.
  void cross(unsigned o) {
    const unsigned n_fibers = kOwners * kPerOwner;
    if (o == 0) {
      for (unsigned i = 0; i < n_fibers; ++i)
        registered[i].store(0, std::memory_order_relaxed);  // before add() publishes any
      for (std::uint64_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
        unsigned in = static_cast<unsigned>(n % n_fibers);
        // acquire: pairs with owner 1's release after its remove().
        while (registered[in].load(std::memory_order_acquire) != 0 ||
               n - popped.load(std::memory_order_acquire) >= kRing)  // acquire: its read of the ring
          if (stop.load(std::memory_order_relaxed)) return;
        registered[in].store(1, std::memory_order_release);
        ASSERT_TRUE(reg.add(&fibers[in], 0));
        ring[n % kRing] = in;
        pushed.store(n + 1, std::memory_order_release);  // release: the ring entry
      }
    } else {
      for (std::uint64_t n = 0;; ++n) {
        while (pushed.load(std::memory_order_acquire) <= n)  // acquire: the ring entry
          if (stop.load(std::memory_order_relaxed)) return;
        unsigned out = ring[n % kRing];
        reg.remove(&fibers[out], 1);
        popped.store(n + 1, std::memory_order_release);  // release: our read of the ring
        registered[out].store(0, std::memory_order_release);
      }
    }
  }
};

void reader_rounds(harness& h, std::chrono::milliseconds budget, int& rounds, int& unregistered,
                   int& miscounted) {
  auto until = std::chrono::steady_clock::now() + budget;
  while (std::chrono::steady_clock::now() < until) {
    std::uint64_t visited = 0, exact = 0;
    bool first = true;
    auto visit = [&](const fiber* f) {
      if (first) {
        exact = h.reg.live_approx();  // exact: every shard is held
        first = false;
      }
      ++visited;
      // acquire: pairs with the owner's release store after remove().
      if (h.registered[h.index_of(f)].load(std::memory_order_acquire) != 1) ++unregistered;
    };
    if (rounds % 4 == 3) {
      if (!h.reg.try_for_each(visit)) continue;
    } else {
      h.reg.for_each(visit);
    }
    if (!first && visited != exact) ++miscounted;
    ++rounds;
  }
}

void run_case(bool unbias_midway, bool crossing = false) {
  harness h;
  std::vector<std::thread> owners;
  for (unsigned o = 0; o < kOwners; ++o)
    owners.emplace_back([&h, o, crossing] { crossing ? h.cross(o) : h.own(o); });
  int rounds = 0, unregistered = 0, miscounted = 0;
  reader_rounds(h, 500ms, rounds, unregistered, miscounted);
  if (unbias_midway) {
    h.reg.unbias();
    reader_rounds(h, 300ms, rounds, unregistered, miscounted);
  }
  h.stop.store(true, std::memory_order_relaxed);  // join() orders the rest
  for (auto& t : owners) t.join();
  EXPECT_EQ(unregistered, 0) << "a reader visited a fiber whose remove() had returned ("
                             << rounds << " rounds)";
  EXPECT_EQ(miscounted, 0) << "a reader visited another number of fibers than were live ("
                           << rounds << " rounds)";
  EXPECT_GT(rounds, 50);
  // Everything the owners left registered is there, and nothing else.
  std::uint64_t left = 0;
  // relaxed here and below: the owners have been joined.
  for (unsigned i = 0; i < kOwners * kPerOwner; ++i)
    left += h.registered[i].load(std::memory_order_relaxed);
  EXPECT_EQ(h.reg.live_exact(), left);
  for (unsigned i = 0; i < kOwners * kPerOwner; ++i)
    if (h.registered[i].load(std::memory_order_relaxed))
      h.reg.remove(&h.fibers[i], kOwners);  // any shard may remove
  EXPECT_EQ(h.reg.live_exact(), 0u);
}

TEST(Registry, AReaderSeesOnlyRegisteredFibersWhileOwnersChurn) {
  if (!asym_fence::available()) std::puts("(no membarrier here: the shards use their spinlocks)");
  run_case(/*unbias_midway=*/false);
}

TEST(Registry, OwnersAndReadersGoOnAfterTheBiasIsGone) { run_case(/*unbias_midway=*/true); }

TEST(Registry, FibersAddedOnOneShardAndRemovedOnAnother) {
  run_case(/*unbias_midway=*/false, /*crossing=*/true);
}

}  // namespace
}  // namespace weft::sched
