// io/parked.h — internal: the fibers parked on an I/O state for what its
// multishot delivers (io/accept.cc's acceptors, io/recv.cc's readers).
// Not a public header.
//
// Guarded by the owning state's spinlock: a fiber adds its token in its
// park's publish step (which then unlocks), a waker claims under the lock
// (the rule on sched::claim) and makes the claimed fibers ready after the
// unlock, and a fiber whose park ended otherwise (deadline, stop) forgets
// its token under the lock.
#pragma once

#include <algorithm>
#include <vector>

#include "sched/park.h"

namespace weft::io {

class parked_fibers {
 public:
  void add(sched::wake_token t) { tokens_.push_back(t); }
  bool empty() const noexcept { return tokens_.empty(); }
  // Forgets the calling fiber's token if no waker took it: a fiber parks
  // once at a time, so its token is the one naming it.
  void forget_current() noexcept {
    sched::fiber* me = sched::current_fiber();
    std::erase_if(tokens_, [me](const sched::wake_token& t) { return t.f == me; });
  }
  // Claims the first parked fiber (or all) into `out`, oldest first,
  // skipping tokens whose park already ended otherwise (their claim fails).
  void claim(std::vector<sched::fiber*>& out, bool all) noexcept {
    std::size_t i = 0;
    for (; i < tokens_.size(); ++i) {
      if (sched::fiber* f = sched::claim(tokens_[i], sched::wake_reason::notified)) {
        out.push_back(f);
        if (!all) {
          ++i;
          break;
        }
      }
    }
    tokens_.erase(tokens_.begin(), tokens_.begin() + static_cast<std::ptrdiff_t>(i));
  }

  // *Promises*: what an arrival brought is the fiber it woke (the first it
  // claimed), even if the state closes before that fiber runs (the
  // README's rule: a call's result, if it came first, is returned). The
  // waker records it with promise(); the woken fiber, back in its call,
  // takes it with take_promise() the next time it looks at the queue.
  void promise(sched::fiber* f) { promised_.push_back(f); }
  bool take_promise() noexcept {
    if (promised_.empty()) return false;
    auto it = std::find(promised_.begin(), promised_.end(), sched::current_fiber());
    if (it == promised_.end()) return false;
    promised_.erase(it);
    return true;
  }
  std::size_t promises() const noexcept { return promised_.size(); }

 private:
  std::vector<sched::wake_token> tokens_;
  std::vector<sched::fiber*> promised_;  // see *Promises*
};

}  // namespace weft::io
