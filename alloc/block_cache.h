// alloc/block_cache.h
//
// Small blocks (up to 512 bytes) recycled through per-thread caches and a
// shared depot: what the scheduler allocates a fiber's control block from
// (the fiber, its callable and its name, one block).
//
// Why not the process allocator alone. A fiber spawned on one worker and
// finished on another is freed there. mimalloc frees a block of another
// thread's page with a CAS on that page's header, the line the owner's
// next allocation loads the page's free list from, and the owner then
// follows a list its blocks were linked into on the other CPU: in
// spawn_join on two workers the spawner spent ~40 % of its time on those
// two loads (perf), each a cache-line transfer. Here the freeing thread
// keeps the block in its own cache; a full batch goes to its NUMA node's
// depot, where a cache of that node that runs dry takes one back. The
// spawner pops pointers from an array it owns, takes the depot's lock
// once per kBatch blocks, and prefetches (for writing) the blocks it will
// hand out next, so their transfers overlap instead of each stalling a
// spawn in turn.
//
// Invariants:
//   - A block of class c is bytes_of(c) = 64 * (c + 1) bytes, aligned to
//     64, from ::operator new(bytes_of(c), align_val_t{64}). It is in use,
//     or in exactly one cache's array, or in the depot.
//   - Cache i's arrays are touched only by the one thread that owns cache
//     i (a worker); a node's depot only under its lock.
//   - Free blocks move between caches only through the depot of the
//     caches' node. (A block in use moves freely: allocated from one
//     cache, released to another, perhaps of another node, where it is
//     reused.)
//   - A depot holds at most kDepotMax blocks of each class, and a cache at
//     most 2 * kBatch - 1; a batch given to a full depot goes back to
//     ::operator delete. So after a burst of a million fibers at most
//     ~16 MiB of 256-byte blocks per node stay for the runtime's life
//     (nothing trims the depot below its bound).
//   - Under ASan a cached block is poisoned: a use after release reports.
//
// Who calls what:
//   class_of()               anyone (pure)
//   allocate(), release()    cache c < caches: only the thread owning c;
//                            c == caches (the shared index): any thread,
//                            no cache (allocate: operator new; release:
//                            node 0's depot)
//   the destructor           after every block is released or abandoned
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace weft::alloc {

class block_cache {
 public:
  static constexpr std::size_t kGrain = 64;
  static constexpr unsigned kClasses = 8;  // blocks of 64..512 bytes
  static constexpr unsigned kBatch = 64;   // blocks moved to or from the depot at once
  static constexpr std::size_t kDepotMax = std::size_t{1} << 16;  // blocks per class

  // caches: per-thread caches 0..caches-1; index `caches` is the shared
  // one. cache_nodes: the NUMA node (0..n-1) of each cache, as in
  // stack_pool_options; empty: every cache on node 0.
  explicit block_cache(unsigned caches, const std::vector<unsigned>& cache_nodes = {});
  ~block_cache();
  block_cache(const block_cache&) = delete;
  block_cache& operator=(const block_cache&) = delete;

  // The class for a block of `bytes` aligned to `align`, or -1 if it is too
  // big or too aligned to come from here.
  static constexpr int class_of(std::size_t bytes, std::size_t align) noexcept {
    if (bytes == 0 || bytes > kGrain * kClasses || align > kGrain) return -1;
    return int((bytes + kGrain - 1) / kGrain) - 1;
  }
  static constexpr std::size_t bytes_of(unsigned cls) noexcept { return kGrain * (cls + 1); }

  // A block of class cls (< kClasses). Throws std::bad_alloc as operator
  // new does.
  void* allocate(unsigned cls, unsigned cache);
  // Gives back a block allocate(cls, any cache) returned.
  void release(void* p, unsigned cls, unsigned cache) noexcept;

  // Blocks held in caches and the depots. Only while no thread allocates
  // or releases (tests, after their threads end).
  std::size_t cached() const;
  // Blocks made and not yet given back to operator delete: those cached
  // and those in use (tests).
  std::size_t made() const noexcept { return made_.load(std::memory_order_relaxed); }

 private:
  struct alignas(64) per_cache {
    std::uint32_t n[kClasses] = {};
    unsigned node = 0;
    void* items[kClasses][2 * kBatch];  // items[c][0..n[c]): newest last
  };
  struct alignas(64) depot {
    mutable std::mutex mu;
    std::vector<void*> blocks[kClasses];  // guarded by mu
  };

  void refill(per_cache& c, unsigned cls);
  void to_depot(depot& d, void* const* batch, unsigned count, unsigned cls) noexcept;

  const unsigned ncaches_;
  std::unique_ptr<per_cache[]> caches_;
  std::vector<std::unique_ptr<depot>> depots_;  // one per node
  // relaxed: a count for tests, changed once per fresh batch or freed one.
  std::atomic<std::size_t> made_{0};
};

}  // namespace weft::alloc
