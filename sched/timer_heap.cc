// sched/timer_heap.cc — see sched/timer_heap.h for the handshake.
#include "sched/timer_heap.h"

#include <sched.h>

#include <algorithm>

#include "alloc/check.h"

namespace weft::sched {

timer_heap::~timer_heap() {
  for (entry& e : heap_) {
    // relaxed: the owner is being destroyed; every fiber is gone.
    WEFT_CHECK(e.node->state.load(std::memory_order_relaxed) ==
                   timer_node::cancelled,
               "timer_heap: destroyed with an armed timer");
    delete e.node;
  }
}

timer_node* timer_heap::arm(clock::time_point deadline, wake_token t) {
  auto* n = new timer_node;  // outside the lock
  n->token = t;
  n->owner = this;
  lock_.lock();
  // Here too, not only in fire_expired(): nothing may come due for as long
  // as the deadlines are, while cancelled nodes pile up (see the header).
  // Amortized O(1): a compaction of n nodes drops more than n/2, each
  // dropped once after its one arm.
  if (mostly_cancelled()) compact();
  push({deadline, n});
  publish_snapshot();
  lock_.unlock();
  return n;
}

void timer_heap::publish_snapshot() noexcept {
  // relaxed: snapshots (see next_deadline()); the heap itself is read only
  // under lock_.
  next_due_.store((heap_.empty() ? clock::time_point::max() : heap_.front().when)
                      .time_since_epoch()
                      .count(),
                  std::memory_order_relaxed);
  size_.store(heap_.size(), std::memory_order_relaxed);
}

fiber* timer_heap::fire(timer_node* n) noexcept {
  std::uint8_t expect = timer_node::armed;
  // acquire on success: nothing to read; acquire on failure: pairs with the
  // fiber's release CAS to `cancelled`, after which we own the node.
  if (!n->state.compare_exchange_strong(expect, timer_node::firing,
                                        std::memory_order_acquire,
                                        std::memory_order_acquire)) {
    cancelled_.fetch_sub(1, std::memory_order_relaxed);  // relaxed: heuristic
    delete n;  // cancelled: the fiber handed it to us
    return nullptr;
  }
  fiber* f = claim(n->token, wake_reason::timed_out);
  // release: the fiber may free the node once it sees `fired`; pairs with
  // the acquire load in finish().
  n->state.store(timer_node::fired, std::memory_order_release);
  return f;
}

void timer_heap::finish(timer_node* n) noexcept {
  // Read before the CAS: once it succeeds the node is the heap's, which
  // may free it at once. The heap lives as long as its worker.
  timer_heap* owner = n->owner;
  std::uint8_t expect = timer_node::armed;
  // release: hands the node to the heap (pairs with fire()'s acquire).
  if (n->state.compare_exchange_strong(expect, timer_node::cancelled,
                                       std::memory_order_release,
                                       std::memory_order_acquire)) {
    owner->cancelled_.fetch_add(1, std::memory_order_relaxed);  // relaxed: heuristic, may dip below 0
    return;
  }
  // The worker is firing it; it touches the node for a few instructions.
  // acquire: pairs with the release store of `fired`.
  for (int i = 0; n->state.load(std::memory_order_acquire) != timer_node::fired; ++i)
    if (i > 64) sched_yield();
  delete n;
}

void timer_heap::push(entry e) {
  heap_.push_back(e);
  std::size_t i = heap_.size() - 1;
  while (i > 0) {
    std::size_t parent = (i - 1) / kArity;
    if (heap_[parent].when <= e.when) break;
    heap_[i] = heap_[parent];
    i = parent;
  }
  heap_[i] = e;
}

timer_heap::entry timer_heap::pop() {
  entry top = heap_.front();
  heap_.front() = heap_.back();
  heap_.pop_back();
  if (!heap_.empty()) sift_down(0);
  return top;
}

void timer_heap::sift_down(std::size_t i) {
  entry e = heap_[i];
  const std::size_t n = heap_.size();
  for (;;) {
    std::size_t first = i * kArity + 1;
    if (first >= n) break;
    std::size_t best = first;
    for (std::size_t c = first + 1; c < std::min(first + kArity, n); ++c)
      if (heap_[c].when < heap_[best].when) best = c;
    if (e.when <= heap_[best].when) break;
    heap_[i] = heap_[best];
    i = best;
  }
  heap_[i] = e;
}

bool timer_heap::mostly_cancelled() const noexcept {
  // relaxed: a heuristic; a stale count only moves the compaction.
  std::ptrdiff_t dead = cancelled_.load(std::memory_order_relaxed);
  return dead > 64 && static_cast<std::size_t>(dead) * 2 > heap_.size();
}

// Drops every cancelled node at once: O(n), run when they are the majority,
// so a server whose reads finish long before their deadlines keeps a small
// heap.
void timer_heap::compact() {
  std::size_t kept = 0;
  std::ptrdiff_t dropped = 0;
  for (entry& e : heap_) {
    // acquire: pairs with the fiber's release CAS to `cancelled`.
    if (e.node->state.load(std::memory_order_acquire) == timer_node::cancelled) {
      delete e.node;
      ++dropped;
    } else {
      heap_[kept++] = e;
    }
  }
  heap_.resize(kept);
  for (std::size_t i = heap_.size() / kArity + 1; i-- > 0;)
    if (i < heap_.size()) sift_down(i);
  cancelled_.fetch_sub(dropped, std::memory_order_relaxed);  // relaxed: heuristic
}

}  // namespace weft::sched
