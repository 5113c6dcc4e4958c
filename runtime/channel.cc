// runtime/channel.cc — the type-erased core of weft::channel<T>.
//
// Invariants (all under lk_):
//   - count_ > 0 implies recvq_ is empty: a receiver parks only on an empty
//     buffer, and a sender hands directly to a parked receiver.
//   - count_ < cap_ implies sendq_ holds no plain send records: a sender
//     parks only on a full buffer (or capacity 0), and a receiver that frees
//     a slot moves the first parked sender's value into it.
//   - Once closed_, nothing is added to either queue.
//   - A waiter's payload (its value slot, closed flag, select case) is
//     touched only after its parker was claimed (see runtime/waiter.h).
//
// Per-producer FIFO: a producer's values enter the buffer, or a receiver,
// in the order its sends completed; parked senders are served in FIFO
// order, and a freed slot is filled from the head of sendq_.
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#include "alloc/check.h"
#include "runtime/channel.h"
#include "runtime/waiter.h"

namespace weft {
namespace {

class chan_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "weft.channel"; }
  std::string message(int c) const override {
    return c == static_cast<int>(chan_errc::closed) ? "channel closed"
                                                    : "unknown channel error";
  }
};

}  // namespace

const std::error_category& chan_category() noexcept {
  static const chan_category_impl c;
  return c;
}

namespace detail {

std::unexpected<std::error_code> chan_error(chan_status s) noexcept {
  switch (s) {
    case chan_status::closed: return std::unexpected(make_error_code(chan_errc::closed));
    case chan_status::timed_out: return make_error(std::errc::timed_out);
    case chan_status::cancelled: return make_error(std::errc::operation_canceled);
    case chan_status::would_block: return make_error(std::errc::operation_would_block);
    case chan_status::ok: break;
  }
  WEFT_CHECK(false, "chan_error: ok is not an error");
  std::abort();
}

chan_core::chan_core(std::size_t capacity, const elem_ops& ops) : cap_(capacity), ops_(ops) {
  // cap_ * size must not wrap: a wrapped product is a small allocation that
  // slot() would then index far past. std::vector's answer to a size it
  // cannot represent is length_error; so is ours.
  if (cap_ > std::numeric_limits<std::size_t>::max() / ops_.size)
    throw std::length_error("weft::channel: capacity * sizeof(T) does not fit in size_t");
  if (cap_ > 0)
    buf_ = static_cast<unsigned char*>(
        ::operator new(cap_ * ops_.size, std::align_val_t{ops_.align}));
}

chan_core::~chan_core() {
  // Under lk_: a fiber still retracting its record (woken by a deadline or
  // a stop request) is done with the channel once we hold it. One still
  // linked is a fiber parked on a channel that is going away: a bug in the
  // program (a channel on a frame that the runtime unwinds before the
  // fibers using it), said here instead of a hang or a corrupted heap.
  lk_.lock();
  bool idle = recvq_.empty() && sendq_.empty();
  lk_.unlock();
  WEFT_CHECK(idle, "channel destroyed while fibers wait on it (keep it alive until they are "
                   "done: own it by a shared_ptr, or join them first)");
  for (std::size_t i = 0; i < count_; ++i) ops_.destroy(slot(i));
  if (buf_) ::operator delete(buf_, std::align_val_t{ops_.align});
}

chan_status chan_core::try_send_locked(void* v, wake_ticket& t) noexcept {
  if (closed_) return chan_status::closed;
  if (waiter* r = recvq_.empty() ? nullptr : pop_claimed(recvq_, t)) {
    // SAFETY: r->slot is on the stack of a receiver that is parked (or a
    // thread that is blocked) and cannot leave before ready(t): we won its
    // claim under lk_ (the rule in runtime/waiter.h).
    r->deliver(r->slot, v);
    r->p->chosen = r->case_index;
    return chan_status::ok;
  }
  if (count_ < cap_) {
    ops_.move_construct(slot(count_), v);
    ++count_;
    return chan_status::ok;
  }
  return chan_status::would_block;
}

chan_status chan_core::try_recv_locked(void* out, void (*deliver)(void*, void*),
                                       wake_ticket& t) noexcept {
  if (count_ > 0) {
    void* s = slot(0);
    deliver(out, s);
    ops_.destroy(s);
    if (++head_ == cap_) head_ = 0;
    --count_;
    // A slot is free: the first parked sender's value goes to the tail.
    if (waiter* w = sendq_.empty() ? nullptr : pop_claimed(sendq_, t)) {
      // SAFETY: as in try_send_locked; w->slot is the parked sender's value.
      ops_.move_construct(slot(count_), w->slot);
      ++count_;
      w->p->chosen = w->case_index;
    }
    return chan_status::ok;
  }
  if (waiter* w = sendq_.empty() ? nullptr : pop_claimed(sendq_, t)) {  // rendezvous
    deliver(out, w->slot);
    w->p->chosen = w->case_index;
    return chan_status::ok;
  }
  return closed_ ? chan_status::closed : chan_status::would_block;
}

namespace {

chan_status finish_wait(wake_reason r, const waiter& w) {
  switch (r) {
    case wake_reason::notified: return w.closed ? chan_status::closed : chan_status::ok;
    case wake_reason::timed_out: return chan_status::timed_out;
    case wake_reason::cancelled: break;
  }
  sched::unwind_point();  // the record is already retracted (wait_on)
  return chan_status::cancelled;
}

}  // namespace

chan_status chan_core::finish_at_once(chan_status s, const wake_ticket& t, bool may_block) noexcept {
  lk_.unlock();
  if (t) ready(t);
  if (may_block) sched::spend_budget();  // completed without parking
  return s;
}

chan_status chan_core::send_locked(void* v, clock::time_point dl, bool may_block,
                                   const std::source_location& where) {
  wake_ticket t;
  chan_status s = try_send_locked(v, t);
  if (s != chan_status::would_block || !may_block) return finish_at_once(s, t, may_block);
  parker p;
  waiter w{.slot = v};
  wake_reason r = wait_on(lk_, sendq_, w, p, {.deadline = dl, .what = "chan send", .where = where});
  return finish_wait(r, w);
}

chan_status chan_core::recv_locked(void* out, void (*deliver)(void*, void*),
                                   clock::time_point dl, bool may_block,
                                   const std::source_location& where) {
  wake_ticket t;
  chan_status s = try_recv_locked(out, deliver, t);
  if (s != chan_status::would_block || !may_block) return finish_at_once(s, t, may_block);
  parker p;
  waiter w{.slot = out, .deliver = deliver};
  wake_reason r =
      wait_on(lk_, recvq_, w, p, {.deadline = dl, .what = "chan receive", .where = where});
  return finish_wait(r, w);
}

void chan_core::close() noexcept {
  note_plain_user();  // as send and receive do (runtime/wait_list.h)
  wake_batch woken;
  lk_.lock();
  if (!closed_) {
    closed_ = true;
    for (wait_list* q : {&recvq_, &sendq_}) {
      wake_ticket t;
      while (waiter* w = pop_claimed(*q, t)) {
        w->closed = true;
        w->p->chosen = w->case_index;
        woken.add(w, t);
      }
    }
  }
  lk_.unlock();
  woken.ready_all();
}

bool chan_core::closed() const noexcept {
  lk_.lock();
  bool c = closed_;
  lk_.unlock();
  return c;
}

std::size_t chan_core::size() const noexcept {
  lk_.lock();
  std::size_t n = count_;
  lk_.unlock();
  return n;
}

}  // namespace detail
}  // namespace weft
