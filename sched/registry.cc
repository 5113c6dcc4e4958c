// sched/registry.cc — see sched/registry.h.
#include "sched/registry.h"

#include <algorithm>
#include <array>

#include "alloc/check.h"
#include "alloc/prefetch.h"

namespace weft::sched {

fiber_registry::fiber_registry(unsigned shards)
    : nshards_(shards),
      shards_(std::make_unique<shard[]>(shards)),
      chunks_(std::make_unique<std::atomic<std::atomic<fiber*>*>[]>(kMaxChunks)) {
  // A shard's free list never grows past this (see remove()), so it never
  // reallocates while its spinlock is held.
  for (unsigned i = 0; i < shards; ++i) shards_[i].free.reserve(5 * kSlotBlock + 1);
}

fiber_registry::~fiber_registry() {
  for (std::uint32_t c = 0; c < kMaxChunks; ++c)
    delete[] chunks_[c].load(std::memory_order_relaxed);  // relaxed: no other thread remains
}

std::atomic<fiber*>& fiber_registry::slot(std::uint32_t i) const {
  // acquire: pairs with the release store that published the chunk.
  std::atomic<fiber*>* chunk = chunks_[i / kChunkSlots].load(std::memory_order_acquire);
  return chunk[i % kChunkSlots];
}

// A block of kSlotBlock free slots: spare ones given back by other shards,
// else never-used ones (allocating their chunk). Called without any shard
// lock: it may allocate and it takes mutexes.
std::vector<std::uint32_t> fiber_registry::take_block() {
  std::vector<std::uint32_t> block;
  {
    std::lock_guard g(spare_mu_);
    std::size_t n = std::min<std::size_t>(spare_.size(), kSlotBlock);
    block.assign(spare_.end() - n, spare_.end());
    spare_.resize(spare_.size() - n);
  }
  if (!block.empty()) return block;
  std::lock_guard g(grow_mu_);
  // relaxed: grow_mu_ orders writers; readers acquire in for_each().
  std::uint32_t first = next_slot_.load(std::memory_order_relaxed);
  WEFT_CHECK(first + kSlotBlock <= kChunkSlots * kMaxChunks,
             "registry: more than 64M fibers alive at once");
  for (std::uint32_t c = first / kChunkSlots; c <= (first + kSlotBlock - 1) / kChunkSlots; ++c)
    if (!chunks_[c].load(std::memory_order_relaxed))  // relaxed: under grow_mu_
      chunks_[c].store(new std::atomic<fiber*>[kChunkSlots](),
                       std::memory_order_release);  // pairs with slot()
  for (std::uint32_t i = kSlotBlock; i-- > 0;) block.push_back(first + i);
  // release: the chunks exist before for_each() may scan these slots.
  next_slot_.store(first + kSlotBlock, std::memory_order_release);
  return block;
}

bool fiber_registry::add(fiber* f, unsigned shard_index) {
  shard& s = shards_[shard_index];
  s.lock.lock();
  if (s.free.empty()) {  // refill outside the spinlock (see take_block)
    s.lock.unlock();
    std::vector<std::uint32_t> block = take_block();
    s.lock.lock();
    s.free.insert(s.free.end(), block.begin(), block.end());
  }
  if (closed_) {
    s.lock.unlock();
    return false;
  }
  if (s.next_id == s.end_id) {
    // relaxed: ids need only be unique.
    s.next_id = next_id_.fetch_add(kIdBlock, std::memory_order_relaxed);
    s.end_id = s.next_id + kIdBlock;
  }
  f->id_ = s.next_id++;
  f->reg_slot_ = s.free.back();
  s.free.pop_back();
  slot(f->reg_slot_).store(f, std::memory_order_relaxed);  // relaxed: under s.lock
  s.added.store(s.added.load(std::memory_order_relaxed) + 1,
                std::memory_order_relaxed);  // relaxed: under s.lock
  // The next add() writes this slot. A slot taken from spare_ was freed
  // on another worker, and its line may still be there.
  if (!s.free.empty()) alloc::prefetch_for_write(&slot(s.free.back()));
  s.lock.unlock();
  return true;
}

void fiber_registry::prefetch_slot(const fiber* f) const noexcept {
  alloc::prefetch_for_write(&slot(f->reg_slot_));
}

bool fiber_registry::close_if_empty() {
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.lock();
  if (live_approx() == 0) closed_ = true;  // exact: every lock is held
  bool closed = closed_;
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.unlock();
  return closed;
}

void fiber_registry::remove(fiber* f, unsigned shard_index) noexcept {
  shard& s = shards_[shard_index];
  s.lock.lock();
  slot(f->reg_slot_).store(nullptr, std::memory_order_relaxed);  // relaxed: under s.lock
  s.free.push_back(f->reg_slot_);
  s.removed.store(s.removed.load(std::memory_order_relaxed) + 1,
                  std::memory_order_relaxed);  // relaxed: under s.lock
  // Slots drift to the shards where fibers exit: past a bound, share them.
  std::array<std::uint32_t, 2 * kSlotBlock> surplus;
  bool share = s.free.size() > 4 * kSlotBlock;
  if (share) {
    std::copy(s.free.end() - surplus.size(), s.free.end(), surplus.begin());
    s.free.resize(s.free.size() - surplus.size());
  }
  s.lock.unlock();
  if (share) {
    std::lock_guard sg(spare_mu_);
    spare_.insert(spare_.end(), surplus.begin(), surplus.end());
  }
}

std::uint64_t fiber_registry::live_exact() const {
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.lock();
  std::uint64_t live = live_approx();
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.unlock();
  return live;
}

std::uint64_t fiber_registry::live_approx() const noexcept {
  std::uint64_t added = 0, removed = 0;
  for (unsigned i = 0; i < nshards_; ++i) {
    // relaxed: a snapshot; exact only under every lock (live_exact()).
    removed += shards_[i].removed.load(std::memory_order_relaxed);
    added += shards_[i].added.load(std::memory_order_relaxed);
  }
  return added >= removed ? added - removed : 0;
}

}  // namespace weft::sched
