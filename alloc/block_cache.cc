// alloc/block_cache.cc — see alloc/block_cache.h.
#include "alloc/block_cache.h"

#if defined(WEFT_ASAN)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <cstring>
#include <new>

#include "alloc/check.h"
#include "alloc/prefetch.h"

namespace weft::alloc {

namespace {

constexpr std::align_val_t kAlign{block_cache::kGrain};

// How many allocations ahead allocate() prefetches: a spawn takes ~50 ns
// and a line held by another CPU ~100-250 ns to arrive here.
constexpr unsigned kAhead = 4;

void poison(void* p, std::size_t n) noexcept {
#if defined(WEFT_ASAN)
  __asan_poison_memory_region(p, n);
#else
  (void)p, (void)n;
#endif
}
void unpoison(void* p, std::size_t n) noexcept {
#if defined(WEFT_ASAN)
  __asan_unpoison_memory_region(p, n);
#else
  (void)p, (void)n;
#endif
}

// The lines of [p, p + n), for writing (see alloc/prefetch.h).
inline void prefetch_range_for_write(const void* p, std::size_t n) noexcept {
  for (std::size_t off = 0; off < n; off += block_cache::kGrain)
    alloc::prefetch_for_write(static_cast<const char*>(p) + off);
}

}  // namespace

block_cache::block_cache(unsigned caches, const std::vector<unsigned>& cache_nodes)
    : ncaches_(caches), caches_(std::make_unique<per_cache[]>(caches)) {
  WEFT_CHECK(cache_nodes.empty() || cache_nodes.size() == caches,
             "block_cache: cache_nodes must name a node for every cache");
  unsigned nodes = 1;
  for (unsigned i = 0; i < cache_nodes.size(); ++i) {
    caches_[i].node = cache_nodes[i];
    nodes = std::max(nodes, cache_nodes[i] + 1);
  }
  for (unsigned n = 0; n < nodes; ++n) depots_.push_back(std::make_unique<depot>());
}

block_cache::~block_cache() {
  for (unsigned i = 0; i < ncaches_; ++i)
    for (unsigned c = 0; c < kClasses; ++c)
      for (std::uint32_t k = 0; k < caches_[i].n[c]; ++k) {
        unpoison(caches_[i].items[c][k], bytes_of(c));
        ::operator delete(caches_[i].items[c][k], kAlign);
      }
  for (auto& d : depots_)
    for (unsigned c = 0; c < kClasses; ++c)
      for (void* p : d->blocks[c]) {
        unpoison(p, bytes_of(c));
        ::operator delete(p, kAlign);
      }
}

void* block_cache::allocate(unsigned cls, unsigned cache) {
  WEFT_DCHECK(cls < kClasses && cache <= ncaches_, "block_cache: bad class or cache");
  if (cache == ncaches_) {
    void* p = ::operator new(bytes_of(cls), kAlign);
    made_.fetch_add(1, std::memory_order_relaxed);
    return p;
  }
  per_cache& c = caches_[cache];
  if (c.n[cls] == 0) refill(c, cls);
  std::uint32_t n = --c.n[cls];
  void* p = c.items[cls][n];
  if (n >= kAhead) prefetch_range_for_write(c.items[cls][n - kAhead], bytes_of(cls));
  unpoison(p, bytes_of(cls));
  return p;
}

void block_cache::release(void* p, unsigned cls, unsigned cache) noexcept {
  WEFT_DCHECK(cls < kClasses && cache <= ncaches_, "block_cache: bad class or cache");
  poison(p, bytes_of(cls));
  if (cache == ncaches_) {
    to_depot(*depots_[0], &p, 1, cls);
    return;
  }
  per_cache& c = caches_[cache];
  c.items[cls][c.n[cls]++] = p;
  if (c.n[cls] == 2 * kBatch) {
    // The older half goes: the newer blocks are the warmer ones here.
    to_depot(*depots_[c.node], c.items[cls], kBatch, cls);
    std::memmove(c.items[cls], c.items[cls] + kBatch, kBatch * sizeof(void*));
    c.n[cls] = kBatch;
  }
}

// A batch from the node's depot, or fresh blocks if it has none: one lock
// per kBatch allocations either way. Fresh blocks are allocated outside
// the lock.
void block_cache::refill(per_cache& c, unsigned cls) {
  {
    depot& dep = *depots_[c.node];
    std::lock_guard g(dep.mu);
    std::vector<void*>& d = dep.blocks[cls];
    if (!d.empty()) {
      std::uint32_t take = std::uint32_t(std::min<std::size_t>(d.size(), kBatch));
      std::memcpy(c.items[cls], d.data() + d.size() - take, take * sizeof(void*));
      d.resize(d.size() - take);
      c.n[cls] = take;
    }
  }
  if (c.n[cls] != 0) {
    // The first kAhead of them are not prefetched by allocate().
    for (std::uint32_t k = c.n[cls] - std::min(c.n[cls], kAhead); k < c.n[cls]; ++k)
      prefetch_range_for_write(c.items[cls][k], bytes_of(cls));
    return;
  }
  for (std::uint32_t k = 0; k < kBatch; ++k) {
    try {
      void* p = ::operator new(bytes_of(cls), kAlign);
      poison(p, bytes_of(cls));
      c.items[cls][c.n[cls]++] = p;
    } catch (...) {
      if (c.n[cls] == 0) throw;  // not one: the caller gets the bad_alloc
      break;
    }
  }
  made_.fetch_add(c.n[cls], std::memory_order_relaxed);
}

void block_cache::to_depot(depot& dep, void* const* batch, unsigned count,
                           unsigned cls) noexcept {
  {
    std::lock_guard g(dep.mu);
    std::vector<void*>& d = dep.blocks[cls];
    if (d.size() + count <= kDepotMax) {
      try {
        d.insert(d.end(), batch, batch + count);
        return;
      } catch (...) {  // no memory to grow the depot: free the batch instead
      }
    }
  }
  for (unsigned k = 0; k < count; ++k) {
    unpoison(batch[k], bytes_of(cls));
    ::operator delete(batch[k], kAlign);
  }
  made_.fetch_sub(count, std::memory_order_relaxed);
}

std::size_t block_cache::cached() const {
  std::size_t n = 0;
  for (auto& d : depots_) {
    std::lock_guard g(d->mu);
    for (unsigned c = 0; c < kClasses; ++c) n += d->blocks[c].size();
  }
  for (unsigned i = 0; i < ncaches_; ++i)
    for (unsigned c = 0; c < kClasses; ++c) n += caches_[i].n[c];
  return n;
}

}  // namespace weft::alloc
