// sched/registry.h
//
// Every fiber that exists, for dump(), the deadlock report and the
// unwinder. A table of slots; each fiber remembers its slot. Adding and
// removing touch only the slot and the calling shard's own free list and
// counters — never another fiber's control block — so a fiber spawned on
// one worker and finished on another costs no shared cache line beyond
// its own slot.
//
// Invariants:
//   - A shard is a worker (index i) or the plain threads (index workers).
//     Its lock guards its free list, its id block and its counters.
//   - A slot holds a fiber from add() until remove(); both happen under
//     the lock of the calling shard. for_each() holds every shard's lock,
//     so no fiber can be removed (and its stack freed) while visited.
//   - live() == sum(added) - sum(removed) when read with every lock held.
//   - Once closed_ (set with every lock held, when live() was 0), add()
//     fails: the exit decision and a concurrent add are ordered by the
//     locks.
//
// Who calls what:
//   add(), remove()   any thread, passing its own shard
//   prefetch_slot(f)  the thread running f (a hint: no lock)
//   for_each(), live_exact()   any thread (takes every lock; rare paths)
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "sched/fiber.h"
#include "alloc/spinlock.h"

namespace weft::sched {

class fiber_registry {
 public:
  explicit fiber_registry(unsigned shards);
  ~fiber_registry();
  fiber_registry(const fiber_registry&) = delete;
  fiber_registry& operator=(const fiber_registry&) = delete;

  // Gives f its id and a slot; false (f not added) once closed.
  [[nodiscard]] bool add(fiber* f, unsigned shard);
  // Closes the registry if it is empty: no add() succeeds after. Returns
  // whether it is closed (the runtime's last fiber has exited: a plain
  // thread spawning at that moment must fail, not leave a fiber no worker
  // will run).
  bool close_if_empty();
  void remove(fiber* f, unsigned shard) noexcept;
  // Starts bringing f's slot here for remove()'s write: a fiber that ends
  // on another worker than the one that spawned it finds the slot's line
  // on that one's CPU (see scheduler.cc, fiber_main).
  void prefetch_slot(const fiber* f) const noexcept;

  // fn(fiber*) for every registered fiber, with every shard locked.
  template <typename F>
  void for_each(F&& fn) const;
  // As for_each, but gives up (returning false) if any shard lock is held:
  // for callers that hold other locks and must not wait (the deadlock
  // detector holds the idle lock, which the unwinder may need).
  template <typename F>
  bool try_for_each(F&& fn) const;
  std::uint64_t live_exact() const;
  std::uint64_t live_approx() const noexcept;  // relaxed snapshot (stats)

 private:
  static constexpr std::uint32_t kChunkSlots = 4096;
  static constexpr std::uint32_t kMaxChunks = 1u << 14;  // 64M fibers at once
  static constexpr std::uint32_t kSlotBlock = 64;        // slots taken at a time
  static constexpr std::uint64_t kIdBlock = 1024;        // ids taken at a time

  struct alignas(64) shard {
    mutable spinlock lock;  // never held while allocating (see take_block)
    std::vector<std::uint32_t> free;  // guarded by lock
    std::uint64_t next_id = 0, end_id = 0;  // guarded by lock
    // Written under lock; read relaxed by live_approx().
    std::atomic<std::uint64_t> added{0}, removed{0};
  };

  std::vector<std::uint32_t> take_block();
  std::atomic<fiber*>& slot(std::uint32_t i) const;

  const unsigned nshards_;
  std::unique_ptr<shard[]> shards_;
  // Chunks are allocated on demand and never move or shrink; a chunk
  // pointer is published with release and read with acquire.
  std::unique_ptr<std::atomic<std::atomic<fiber*>*>[]> chunks_;
  std::mutex grow_mu_;                       // serializes chunk allocation
  std::atomic<std::uint32_t> next_slot_{0};  // slots never handed out yet
  std::atomic<std::uint64_t> next_id_{1};
  // Set under every shard lock, read under any one: see close_if_empty().
  bool closed_ = false;
  std::mutex spare_mu_;
  std::vector<std::uint32_t> spare_;         // guarded by spare_mu_
};

template <typename F>
void fiber_registry::for_each(F&& fn) const {
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.lock();
  // acquire: pairs with the release in take_slot(); the slots below it exist.
  std::uint32_t n = next_slot_.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < n; ++i)
    // relaxed: written under a shard lock, which we hold.
    if (fiber* f = slot(i).load(std::memory_order_relaxed)) fn(f);
  for (unsigned i = 0; i < nshards_; ++i) shards_[i].lock.unlock();
}

template <typename F>
bool fiber_registry::try_for_each(F&& fn) const {
  unsigned locked = 0;
  while (locked < nshards_ && shards_[locked].lock.try_lock()) ++locked;
  if (locked == nshards_) {
    std::uint32_t n = next_slot_.load(std::memory_order_acquire);  // as in for_each
    for (std::uint32_t i = 0; i < n; ++i)
      if (fiber* f = slot(i).load(std::memory_order_relaxed)) fn(f);  // as in for_each
  }
  for (unsigned i = 0; i < locked; ++i) shards_[i].lock.unlock();
  return locked == nshards_;
}

}  // namespace weft::sched
