// sched/run_queue.h
//
// run_queue holds the runnable fibers of one worker: a bounded lock-free ring
// of Capacity pointers, in the manner of Go's runq (runqput, runqget,
// runqsteal). The owner pushes at the tail and pops at the head; an idle
// worker steals half of it from the head. The owner may also push at the
// head (push_front(): what it wants to run next, see *Depth first* in
// sched/worker.cc). When the ring is full, push() moves the half at the head out
// in one batch, for the global inject queue. See *Scheduler* in DESIGN.md.
//
// Invariants:
//   - head_ packs a tag (high 32 bits) and the head index (low 32 bits).
//     Only the owner writes tail_; any worker may CAS head_ forward, and the
//     owner may CAS it one back (push_front(), which also increments the
//     tag; see *Tags*). head_ changes only by CAS (never by a plain store),
//     so every head_ CAS continues the release sequence of the ones before
//     it. The exception
//     is pop_unshared(), for a queue that no thief can ever reach (a
//     scheduler with one worker): with no other reader of head_ there is no
//     release sequence to keep.
//   - 0 <= tail_ - head_ <= Capacity, in wrapping uint32 arithmetic (head_
//     meaning its index here and below). The elements, from the head, are
//     slots_[i % Capacity] for i in [head_, tail_).
//   - Only the owner writes slots_, and only slots outside [head_, tail_).
//     A thief may still be reading such a slot from a stale head_; slots_ are
//     std::atomic<T*> for that reason, and the thief's CAS on head_ rejects
//     whatever it read (see *Stealing*).
//   - The queue stores T* and never owns the elements; nullptr is not an
//     element (pop() and steal_from() use it for "empty").
//
// Who calls what:
//   push(), push_front(), pop()    the owner worker only
//   pop_unshared()                 the owner worker only, and only if no
//                                  queue of its scheduler is ever stolen from
//   steal_from(victim)             the owner of *this (the thief), with
//                                  victim another worker's queue
//   size_approx(), empty_approx(), position_approx()  any thread (racy snapshot)
//   room()                                           owner (a lower bound)
//
// Stealing
//
// A thief loads head_ and tail_ of the victim, copies ceil(n/2) slots from
// head_ on, and then CASes head_ from the value it loaded. Until that CAS
// succeeds nothing is taken: the owner or another thief may have popped
// those elements meanwhile and the owner may already be overwriting the
// slots, so what the thief read is stale and it starts over. The CAS is what
// validates the copy. The first stolen element (the head's) is returned to run
// right away; the others are appended to the thief's own ring, which the
// thief publishes with its own tail_ store. The copy into the thief's ring
// happens before the CAS; it writes only slots outside the thief's
// [head_, tail_), so nobody can take them before that tail_ store.
//
// Tags
//
// A thief's CAS validates its copy only if head_ cannot come back to the
// value it loaded with other elements in the slots. With head_ only moving
// forward that takes 2^32 pops during one steal. push_front() moves it back:
// the owner pops slot h (head_ h + 1), then push_front() writes a new
// element into slot h (head_ h again), and a thief that copied slot h
// before would take the popped fiber a second time. So push_front() also
// increments the tag, and the thief's CAS, which compares all 64 bits,
// fails. Every other head_ change moves the index forward and keeps the
// tag, so tags never decrease, and a head_ value never comes back (but for
// the wrapping of 32-bit counters, below).
//
// Memory ordering
//
// Two edges make the ring safe; every other access is relaxed.
//   Publish: the owner stores slots_[t], then tail_ = t + 1 with release; a
//     thief loads tail_ with acquire before reading slots below it. A slot
//     push_front() fills is published by its release CAS of head_, which
//     the thief loads with acquire.
//   Reuse: a thief reads slots, then CASes head_ with release; the owner
//     loads head_ with acquire before it overwrites a slot below that head_
//     (push(), push_front(), steal_from() into its own ring). So a thief
//     whose CAS succeeded read the slots before the owner overwrote them. Since all
//     writes to head_ are RMWs, the acquire load synchronizes with every
//     release CAS before it in head_'s modification order, whoever made it.
// The owner's own reads of slots (pop(), the overflow batch) need no edge:
// it is the only writer of slots_. Every head_ CAS is release and every
// thief's head_ load is acquire, so a thief's tail_ load is never older than
// the tail_ seen by whoever stored the head_ it read (tail_ >= head_ in its
// snapshot). head_ may still be stale against tail_ (tail_ - head_ >
// Capacity): the thief retries. Indices are 32 bits: a thief's CAS could
// wrongly succeed only if head_ advanced by exactly 2^32 (and the tag came
// back too) between its load and its CAS, which we accept, as Go and Tokio
// accept 2^32 alone.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "alloc/check.h"

namespace weft::sched {

template <typename T, std::uint32_t Capacity = 256>
class run_queue {
  static_assert(Capacity >= 2 && (Capacity & (Capacity - 1)) == 0,
                "run_queue: Capacity must be a power of two, at least 2");
  static_assert(Capacity <= (std::uint32_t{1} << 30),
                "run_queue: Capacity must leave room for wrapping indices");
  static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
  static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
  static_assert(std::atomic<T*>::is_always_lock_free);

 public:
  run_queue() = default;
  run_queue(const run_queue&) = delete;
  run_queue& operator=(const run_queue&) = delete;

  // Owner only. Appends x. If the ring is full, moves the half at its head
  // plus x out and calls overflow(T** batch, std::uint32_t n) once with them,
  // head first. overflow must not throw: the batch has left the ring.
  template <typename Overflow>
  void push(T* x, Overflow&& overflow) {
    WEFT_DCHECK(x != nullptr, "run_queue::push: nullptr is not an element");
    for (;;) {
      // acquire: pairs with the release CAS in grab_half() (the Reuse edge):
      // thieves' reads of slots below this head_ happen before our store.
      const std::uint64_t hv = head_.load(std::memory_order_acquire);
      const std::uint32_t h = index(hv);
      // relaxed: only the owner (this thread) writes tail_.
      const std::uint32_t t = tail_.load(std::memory_order_relaxed);
      WEFT_DCHECK(t - h <= Capacity, "run_queue::push: tail_ - head_ out of range");
      if (t - h < Capacity) {
        // relaxed: published by the tail_ store just below.
        slots_[t & kMask].store(x, std::memory_order_relaxed);
        // release: publishes slots_[t]; pairs with acquire in grab_half().
        tail_.store(t + 1, std::memory_order_release);
        return;
      }
      if (push_overflow(hv, x, overflow)) return;
      // A thief took elements meanwhile, so there is room now: try again.
    }
  }

  // The full-ring path of push(), out of line. The batch goes through
  // overflow_batch_, a member, not a local array: push() runs on fiber
  // stacks as small as 2 KiB, where a kHalf-pointer array would not fit.
  template <typename Overflow>
  [[gnu::noinline, gnu::cold]] bool push_overflow(std::uint64_t hv, T* x,
                                                  Overflow& overflow) {
    if (!take_older_half(hv, overflow_batch_)) return false;
    overflow_batch_[kHalf] = x;
    overflow(overflow_batch_, kHalf + 1);
    return true;
  }

  // Owner only. Puts x at the head, where pop() and thieves take it next.
  // Returns false, doing nothing, if the ring is full (the caller decides
  // where x goes instead: the back, with push()).
  bool push_front(T* x) {
    WEFT_DCHECK(x != nullptr, "run_queue::push_front: nullptr is not an element");
    for (;;) {
      // acquire: the Reuse edge, as in push(): slot h - 1 may have been read
      // by a thief whose CAS moved head_ past it.
      std::uint64_t hv = head_.load(std::memory_order_acquire);
      const std::uint32_t h = index(hv);
      // relaxed: only the owner (this thread) writes tail_.
      const std::uint32_t t = tail_.load(std::memory_order_relaxed);
      if (t - h >= Capacity) return false;
      // relaxed: published by the head_ CAS below.
      slots_[(h - 1) & kMask].store(x, std::memory_order_relaxed);
      // release: publishes slots_[h - 1] to a thief's acquire of head_ (and
      // keeps its snapshot tail_ >= head_, as in pop()). The tag changes,
      // so a thief that copied slots at an earlier head_ with this index
      // fails its CAS (see *Tags*). relaxed on failure: hv is reloaded
      // with acquire at the top. On failure a thief moved head_ forward:
      // slot h - 1 stays outside the ring, and we write below the new head.
      const std::uint64_t nv = ((hv >> 32) + 1) << 32 | std::uint32_t(h - 1);
      if (head_.compare_exchange_weak(hv, nv, std::memory_order_release,
                                      std::memory_order_relaxed))
        return true;
    }
  }

  // Owner only. Removes and returns the element at the head, or nullptr.
  T* pop() {
    // relaxed: the owner is the only writer of slots_, so reading slots_[h]
    // needs no synchronization; the CAS below validates h.
    std::uint64_t hv = head_.load(std::memory_order_relaxed);
    // relaxed: only the owner (this thread) writes tail_.
    const std::uint32_t t = tail_.load(std::memory_order_relaxed);
    for (;;) {
      const std::uint32_t h = index(hv);
      WEFT_DCHECK(t - h <= Capacity, "run_queue::pop: tail_ - head_ out of range");
      if (t == h) return nullptr;
      T* x = slots_[h & kMask].load(std::memory_order_relaxed);  // relaxed: see above
      // release: a thief that acquires this head_ also sees a tail_ at least
      // as new as t (keeps its snapshot tail_ >= head_); partner: acquire of
      // head_ in grab_half(). relaxed on failure: hv is reloaded, same as above.
      if (head_.compare_exchange_weak(hv, hv + 1, std::memory_order_release,
                                      std::memory_order_relaxed)) {
        return x;
      }
    }
  }

  // Owner only, and only on a queue that no thief ever reaches (a scheduler
  // with one worker, which never steals). pop() without its CAS: a locked
  // instruction that drains the store buffer, a quarter of the cost of a
  // yield (17 ns; bench/README.md), and Tokio's current-thread runtime has
  // none either.
  T* pop_unshared() {
    // relaxed: no other thread writes head_ or tail_ of this queue.
    const std::uint64_t hv = head_.load(std::memory_order_relaxed);
    const std::uint32_t h = index(hv);
    if (tail_.load(std::memory_order_relaxed) == h) return nullptr;
    T* x = slots_[h & kMask].load(std::memory_order_relaxed);
    // relaxed: read only by this thread and by racy snapshots
    // (size_approx(), empty_approx()), which order nothing by it.
    head_.store(hv + 1, std::memory_order_relaxed);
    return x;
  }

  // Owner only. The element pop() would return next, or nullptr. Racy
  // against thieves, which may take it meanwhile: a hint (for a prefetch),
  // never to be dereferenced.
  T* peek_hint() const {
    // relaxed: advisory, as size_approx(); a stale slot is harmless to a
    // prefetch, which never faults.
    const std::uint32_t h = index(head_.load(std::memory_order_relaxed));
    if (tail_.load(std::memory_order_relaxed) == h) return nullptr;  // relaxed: as above
    return slots_[h & kMask].load(std::memory_order_relaxed);         // relaxed: as above
  }

  // Called by the owner of *this (the thief), victim being another worker's
  // queue. Moves ceil(n/2) of victim's n elements: returns the head's
  // to run right away and appends the rest to *this. Returns nullptr if
  // victim was empty. *this must hold at most Capacity/2 elements (a worker
  // steals only when its own queue is empty).
  T* steal_from(run_queue& victim) {
    WEFT_CHECK(&victim != this, "run_queue::steal_from: stealing from itself");
    // relaxed: only the owner (this thread) writes tail_.
    const std::uint32_t t = tail_.load(std::memory_order_relaxed);
    // acquire: the Reuse edge for our own ring, which grab_half() is about to
    // write; pairs with the release CAS in grab_half() of our own thieves.
    const std::uint32_t h = index(head_.load(std::memory_order_acquire));
    WEFT_CHECK(t - h <= Capacity - kHalf,
               "run_queue::steal_from: thief queue too full to receive");
    T* first = nullptr;
    const std::uint32_t n = victim.grab_half(first, *this, t);
    if (n == 0) return nullptr;
    WEFT_CHECK(n <= kHalf, "run_queue::steal_from: grabbed more than half the capacity");
    if (n > 1) {
      // release: publishes slots_[t, t + n - 1) written by grab_half();
      // pairs with acquire in grab_half() of our own thieves.
      tail_.store(t + n - 1, std::memory_order_release);
    }
    return first;
  }

  // Any thread. A racy snapshot, for heuristics and statistics only.
  std::uint32_t size_approx() const {
    // relaxed: the result is advisory; nothing is read through it.
    const std::uint32_t h = index(head_.load(std::memory_order_relaxed));
    const std::uint32_t t = tail_.load(std::memory_order_relaxed);  // relaxed: as above
    const std::uint32_t n = t - h;
    if (static_cast<std::int32_t>(n) < 0) return 0;  // tail_ older than head_
    return n < Capacity ? n : Capacity;              // head_ older than tail_
  }

  bool empty_approx() const { return size_approx() == 0; }

  // Owner only: how many push() calls fit before one overflows, at least
  // (thieves only make more room).
  std::uint32_t room() const { return Capacity - size_approx(); }

  // Any thread: a racy snapshot of head_ and tail_, mixed into one word.
  // Equal snapshots taken at two moments mean nothing was pushed or taken
  // in between (but for a 2^-64 collision).
  std::uint64_t position_approx() const {
    // relaxed: advisory, as size_approx().
    return head_stamp() * 0x9E3779B97F4A7C15ull ^ tail_.load(std::memory_order_relaxed);
  }

  // Any thread: head_ whole (tag and index), a racy snapshot. It changes
  // whenever an element leaves the ring (pop, steal, overflow) or enters
  // it at the head (push_front).
  std::uint64_t head_stamp() const {
    return head_.load(std::memory_order_relaxed);  // relaxed: advisory
  }

 private:
  static constexpr std::uint32_t kMask = Capacity - 1;
  // The index half of a head_ value (see *Tags*). Index arithmetic on the
  // whole value (hv + n) carries into the tag when the index wraps, which
  // keeps the index right and only changes the tag.
  static std::uint32_t index(std::uint64_t hv) { return static_cast<std::uint32_t>(hv); }
  static constexpr std::uint32_t kHalf = Capacity / 2;
  // 64 bytes on x86-64 and on the arm64 cores we target. Not
  // std::hardware_destructive_interference_size: GCC warns when a header
  // uses it, as its value may change between compiler flags.
  static constexpr std::size_t kCacheLine = 64;

  // Owner only, ring full (tail_ - h == Capacity, h loaded with acquire by
  // push()). Moves the kHalf elements at the head into batch[0, kHalf). Returns
  // false, taking nothing, if a thief moved head_ first.
  bool take_older_half(std::uint64_t hv, T** batch) {
    const std::uint32_t h = index(hv);
    for (std::uint32_t i = 0; i < kHalf; ++i) {
      // relaxed: the owner is the only writer of slots_.
      batch[i] = slots_[(h + i) & kMask].load(std::memory_order_relaxed);
    }
    // release: keeps a thief's snapshot tail_ >= head_, as in pop(); partner:
    // acquire of head_ in grab_half(). relaxed on failure: push() reloads.
    return head_.compare_exchange_strong(hv, hv + kHalf, std::memory_order_release,
                                         std::memory_order_relaxed);
  }

  // Runs on the victim (*this) on behalf of the thief owning dst. Takes
  // ceil(n/2) of this ring's n elements: the head's into first, the others
  // into dst.slots_ from index dst_tail on (unpublished: dst_tail is dst's
  // tail_). Returns how many it took, 0 if this ring was empty.
  std::uint32_t grab_half(T*& first, run_queue& dst, std::uint32_t dst_tail) {
    for (;;) {
      // acquire: pairs with the release head_ CAS that stored h, so the tail_
      // loaded next is no older than the one its author saw (t >= h).
      std::uint64_t hv = head_.load(std::memory_order_acquire);
      const std::uint32_t h = index(hv);
      // acquire: pairs with the release tail_ store in push()/steal_from()
      // (the Publish edge): the slots below t are visible.
      const std::uint32_t t = tail_.load(std::memory_order_acquire);
      const std::uint32_t size = t - h;
      if (size == 0) return 0;
      // Not a broken invariant: h is stale (the owner popped and pushed
      // after we loaded it). Take a fresh snapshot.
      if (size > Capacity) continue;
      const std::uint32_t n = size - size / 2;
      // relaxed (these loads and stores): the slots below t were published
      // by the acquire above; whether they are still ours is decided by the
      // CAS below. dst's slots are published by the thief's tail_ store.
      first = slots_[h & kMask].load(std::memory_order_relaxed);
      for (std::uint32_t i = 1; i < n; ++i) {
        T* x = slots_[(h + i) & kMask].load(std::memory_order_relaxed);
        dst.slots_[(dst_tail + i - 1) & kMask].store(x, std::memory_order_relaxed);
      }
      // release: our slot reads happen before the owner's reuse of these
      // slots (the Reuse edge); partner: acquire of head_ in push() and
      // steal_from(). No acquire needed: the slots came with tail_.
      // relaxed on failure: we start over with fresh acquire loads.
      if (head_.compare_exchange_strong(hv, hv + n, std::memory_order_release,
                                        std::memory_order_relaxed)) {
        return n;
      }
    }
  }

  // Tag and index (see *Tags*). Written by any worker (CAS only), read by
  // the owner and thieves.
  alignas(kCacheLine) std::atomic<std::uint64_t> head_{0};
  // Written by the owner only; read by thieves (acquire) and stats.
  alignas(kCacheLine) std::atomic<std::uint32_t> tail_{0};
  // Written by the owner only (outside [head_, tail_)); read by the owner
  // and by thieves, concurrently with those writes.
  alignas(kCacheLine) std::atomic<T*> slots_[Capacity]{};
  T* overflow_batch_[kHalf + 1];  // owner only: scratch for push_overflow()
};

}  // namespace weft::sched
