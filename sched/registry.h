// sched/registry.h
//
// Every fiber that exists, for dump(), the deadlock report and the
// unwinder. A table of slots; each fiber remembers its slot. Adding and
// removing touch only the slot and the calling shard's own free list and
// counters — never another fiber's control block — so a fiber spawned on
// one worker and finished on another costs no shared cache line beyond
// its own slot.
//
// *Biased shards*. A worker's shard is used by that worker's thread alone,
// on every spawn and every exit, and by everyone else only on rare paths
// (dump, the deadlock check, the unwinder, the hog report). So, where
// alloc/asym_fence.h works, the owner does not take the shard's spinlock:
// it enters with owner_in = 1 and a compiler barrier, and goes on if no
// reader has revoked the bias; a reader takes the spinlock, sets revoked,
// runs asym_fence::heavy() and waits for owner_in = 0. (Another asymmetric
// Dekker pair: either the owner sees revoked and takes the spinlock, which
// the reader holds, or the reader sees owner_in = 1 and waits for the
// section to end.) The spinlock's xchg on every spawn and exit was the
// one locked instruction of a spawn on one worker, and 16 % of
// spawn_join's samples there. The plain threads' shard, shared by many
// threads, always takes its spinlock. The price is the readers': each
// holds every shard across a membarrier (~10-50 µs here), during which
// every worker's spawns and exits wait.
//
// Invariants:
//   - A shard is a worker (index i) or the plain threads (index workers).
//     It is entered (enter()/leave(): its spinlock, or the bias) to touch
//     its free list, its id block and its counters.
//   - A slot holds a fiber from add() until remove(); both happen inside
//     the calling shard. for_each() holds every shard (lock_all()), so no
//     fiber can be removed (and its stack freed) while visited.
//   - live() == sum(added) - sum(removed) when read holding every shard.
//   - Once closed_ (set holding every shard, when live() was 0), add()
//     fails: the exit decision and a concurrent add are ordered by the
//     shards.
//   - A biased shard's revoked is written only by a reader holding the
//     shard's spinlock; once unbias() ran it stays 1 (the unwinder's many
//     close_if_empty() calls then cost no membarrier each).
//
// Who calls what:
//   add(), remove()   any thread, passing its own shard (a worker: its
//                     index; a plain thread: the last shard)
//   prefetch_slot(f)  the thread running f (a hint: no lock)
//   for_each(), live_exact(), close_if_empty(), unbias()   any thread
//                     (holds every shard; rare paths)
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
  // The first `biased` shards are biased (see above) where asymmetric
  // fences work.
  fiber_registry(unsigned shards, unsigned biased);
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
  // detector holds the idle lock, which the unwinder may need). It does
  // wait for an owner inside its shard by the bias to leave: such an owner
  // holds no lock and takes none before it leaves.
  template <typename F>
  bool try_for_each(F&& fn) const;
  std::uint64_t live_exact() const;
  std::uint64_t live_approx() const noexcept;  // relaxed snapshot (stats)
  // Ends the bias of every shard for good: from now on owners take the
  // spinlocks. For the unwinder, before the exits that each look at every
  // shard (close_if_empty()).
  void unbias();

 private:
  static constexpr std::uint32_t kChunkSlots = 4096;
  static constexpr std::uint32_t kMaxChunks = 1u << 14;  // 64M fibers at once
  static constexpr std::uint32_t kSlotBlock = 64;        // slots taken at a time
  static constexpr std::uint64_t kIdBlock = 1024;        // ids taken at a time

  struct alignas(64) shard {
    // Never held while allocating (see take_block). Readers take it; the
    // owner of a biased shard only once the bias is revoked.
    mutable spinlock lock;
    bool biased = false;  // set at construction
    // Owner: inside the shard by the bias (see *Biased shards*).
    std::atomic<std::uint32_t> owner_in{0};
    // 1: the owner must take the lock. Written by readers holding it.
    mutable std::atomic<std::uint32_t> revoked{1};
    std::vector<std::uint32_t> free;  // inside the shard
    std::uint64_t next_id = 0, end_id = 0;  // inside the shard
    // Written inside the shard; read relaxed by live_approx().
    std::atomic<std::uint64_t> added{0}, removed{0};
  };

  // The owner's way in and out: true if it entered by the bias.
  bool enter(shard& s) noexcept;
  void leave(shard& s, bool by_bias) noexcept;
  // Readers: every shard (lock_all), or none if one's lock is held
  // (try_lock_all). Both revoke the biases.
  void lock_all() const noexcept;
  bool try_lock_all() const noexcept;
  void unlock_all() const noexcept;
  void revoke_biases() const noexcept;

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
  // Set holding every shard, read inside any one: see close_if_empty().
  // An atomic (relaxed) only so that tools need not follow the bias.
  std::atomic<bool> closed_{false};
  // Set by unbias(), holding every shard; read holding every shard.
  mutable bool unbiased_ = false;
  std::mutex spare_mu_;
  std::vector<std::uint32_t> spare_;         // guarded by spare_mu_
};

template <typename F>
void fiber_registry::for_each(F&& fn) const {
  lock_all();
  // acquire: pairs with the release in take_slot(); the slots below it exist.
  std::uint32_t n = next_slot_.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < n; ++i)
    // relaxed: written inside a shard, all of which we hold.
    if (fiber* f = slot(i).load(std::memory_order_relaxed)) fn(f);
  unlock_all();
}

template <typename F>
bool fiber_registry::try_for_each(F&& fn) const {
  if (!try_lock_all()) return false;
  std::uint32_t n = next_slot_.load(std::memory_order_acquire);  // as in for_each
  for (std::uint32_t i = 0; i < n; ++i)
    if (fiber* f = slot(i).load(std::memory_order_relaxed)) fn(f);  // as in for_each
  unlock_all();
  return true;
}

}  // namespace weft::sched
