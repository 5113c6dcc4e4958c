// sched/registry.cc — see sched/registry.h.
#include "sched/registry.h"

#include <sched.h>

#include <algorithm>
#include <array>

#include "alloc/asym_fence.h"
#include "alloc/check.h"
#include "alloc/prefetch.h"

namespace weft::sched {

fiber_registry::fiber_registry(unsigned shards, unsigned biased)
    : nshards_(shards),
      shards_(std::make_unique<shard[]>(shards)),
      chunks_(std::make_unique<std::atomic<std::atomic<fiber*>*>[]>(kMaxChunks)) {
  const bool bias = biased > 0 && asym_fence::available();
  for (unsigned i = 0; i < shards; ++i) {
    // A shard's free list never grows past this (see remove()), so it
    // never reallocates inside the shard.
    shards_[i].free.reserve(5 * kSlotBlock + 1);
    shards_[i].biased = bias && i < biased;
    // relaxed: before any other thread exists.
    shards_[i].revoked.store(shards_[i].biased ? 0 : 1, std::memory_order_relaxed);
  }
}

// ---- Entering a shard (see *Biased shards* in registry.h) ------------------

bool fiber_registry::enter(shard& s) noexcept {
  if (s.biased) {
    // relaxed: ordered before the load below by light() here and a
    // reader's heavy(), which the C++ model does not know of.
    s.owner_in.store(1, std::memory_order_relaxed);
    asym_fence::light();
    // acquire: pairs with the reader's release store of 0 in unlock_all(),
    // so what it wrote holding the shard (closed_) is seen here.
    if (s.revoked.load(std::memory_order_acquire) == 0) [[likely]]
      return true;
    // release: the reader waiting for 0 (revoke_biases()); we touched nothing.
    s.owner_in.store(0, std::memory_order_release);
  }
  s.lock.lock();
  return false;
}

void fiber_registry::leave(shard& s, bool by_bias) noexcept {
  if (by_bias)
    // release: a reader that sees 0 (acquire) sees the section's writes.
    s.owner_in.store(0, std::memory_order_release);
  else
    s.lock.unlock();
}

// With every spinlock held: makes the owners of biased shards take theirs
// from now on, and waits for one already inside by its bias to leave
// (a few stores; the owner never waits inside).
void fiber_registry::revoke_biases() const noexcept {
  if (unbiased_) return;  // revoked for good, and no owner inside since
  bool any = false;
  for (unsigned i = 0; i < nshards_; ++i) {
    if (!shards_[i].biased) continue;
    // relaxed: heavy() below orders it before the owners' later loads.
    shards_[i].revoked.store(1, std::memory_order_relaxed);
    any = true;
  }
  if (!any) return;
  asym_fence::heavy();
  for (unsigned i = 0; i < nshards_; ++i) {
    if (!shards_[i].biased) continue;
    // acquire: pairs with leave()'s release; the section's writes are ours.
    for (int spins = 0; shards_[i].owner_in.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 64)
        __builtin_ia32_pause();
      else
        sched_yield();  // the owner was preempted inside
    }
  }
}

void fiber_registry::lock_all() const noexcept {
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.lock();
  revoke_biases();
}

bool fiber_registry::try_lock_all() const noexcept {
  unsigned locked = 0;
  while (locked < nshards_ && shards_[locked].lock.try_lock()) ++locked;
  if (locked < nshards_) {
    for (unsigned i = 0; i < locked; ++i) shards_[i].lock.unlock();
    return false;
  }
  // Waiting for an owner inside by its bias is not waiting for a lock: it
  // holds none and takes none before it leaves.
  revoke_biases();
  return true;
}

void fiber_registry::unlock_all() const noexcept {
  if (!unbiased_)
    for (unsigned i = 0; i < nshards_; ++i)
      // release: pairs with enter()'s acquire (closed_, and the owners'
      // data we may have read are ours until here).
      if (shards_[i].biased) shards_[i].revoked.store(0, std::memory_order_release);
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.unlock();
}

void fiber_registry::unbias() {
  lock_all();
  unbiased_ = true;  // revoked stays 1: unlock_all() leaves it
  unlock_all();
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
  bool by_bias = enter(s);
  if (s.free.empty()) {  // refill outside the shard (see take_block)
    leave(s, by_bias);
    std::vector<std::uint32_t> block = take_block();
    by_bias = enter(s);
    s.free.insert(s.free.end(), block.begin(), block.end());
  }
  if (closed_.load(std::memory_order_relaxed)) {  // relaxed: inside the shard
    leave(s, by_bias);
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
  slot(f->reg_slot_).store(f, std::memory_order_relaxed);  // relaxed: inside the shard
  s.added.store(s.added.load(std::memory_order_relaxed) + 1,
                std::memory_order_relaxed);  // relaxed: inside the shard
  // The next add() writes this slot. A slot taken from spare_ was freed
  // on another worker, and its line may still be there.
  if (!s.free.empty()) alloc::prefetch_for_write(&slot(s.free.back()));
  leave(s, by_bias);
  return true;
}

void fiber_registry::prefetch_slot(const fiber* f) const noexcept {
  alloc::prefetch_for_write(&slot(f->reg_slot_));
}

bool fiber_registry::close_if_empty() {
  lock_all();
  // relaxed: holding every shard. live_approx() is exact then.
  if (live_approx() == 0) closed_.store(true, std::memory_order_relaxed);
  bool closed = closed_.load(std::memory_order_relaxed);
  unlock_all();
  return closed;
}

void fiber_registry::remove(fiber* f, unsigned shard_index) noexcept {
  shard& s = shards_[shard_index];
  const bool by_bias = enter(s);
  slot(f->reg_slot_).store(nullptr, std::memory_order_relaxed);  // relaxed: inside the shard
  s.free.push_back(f->reg_slot_);
  s.removed.store(s.removed.load(std::memory_order_relaxed) + 1,
                  std::memory_order_relaxed);  // relaxed: inside the shard
  // Slots drift to the shards where fibers exit: past a bound, share them.
  std::array<std::uint32_t, 2 * kSlotBlock> surplus;
  bool share = s.free.size() > 4 * kSlotBlock;
  if (share) {
    std::copy(s.free.end() - surplus.size(), s.free.end(), surplus.begin());
    s.free.resize(s.free.size() - surplus.size());
  }
  leave(s, by_bias);
  if (share) {
    std::lock_guard sg(spare_mu_);
    spare_.insert(spare_.end(), surplus.begin(), surplus.end());
  }
}

std::uint64_t fiber_registry::live_exact() const {
  lock_all();
  std::uint64_t live = live_approx();
  unlock_all();
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
