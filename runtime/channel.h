// runtime/channel.h — weft::channel<T>: Go-style channels for fibers and
// plain OS threads.
//
//   weft::channel<job> jobs(64);        // capacity 0 is a rendezvous
//   weft::spawn([&] { while (auto j = jobs.recv()) run(*j); });
//   if (!jobs.send(job{...})) ...;      // fails once jobs.close() was called
//
// Semantics (Go's):
//   - Multi-producer, multi-consumer. Values from one producer arrive in the
//     order it sent them.
//   - capacity N > 0: a ring buffer of N values; send blocks while it is
//     full. capacity 0: a rendezvous; send hands its value directly to a
//     receiver (moved into the parked receiver's slot) and blocks until one
//     takes it.
//   - close() wakes every waiter. Receivers first drain the buffered values,
//     then get "closed". Senders, waiting or future, get "closed". Closing
//     twice is harmless.
//   - Fibers park; plain OS threads block on a futex (and hold an outside
//     reference, see runtime/sync.h), so a thread can serve fibers.
//
// Errors (weft::result):
//   chan_errc::closed                send on a closed channel; recv on a
//                                    closed, drained channel
//   std::errc::timed_out             the deadline passed first
//   std::errc::operation_canceled    the calling fiber's stop was requested
//   std::errc::operation_would_block try_send / try_recv could not proceed
//
// A value passed to send() by value is consumed even when the send fails;
// try_send() moves from its argument only when it succeeds.
//
// T: any object type whose move constructor cannot throw (a static_assert
// says so at compile time). Values move under the channel's lock, into a
// parked receiver's frame or out of a parked sender's, where a throw would
// leave a hand-off half done on another fiber's behalf. A type whose move
// may throw (libstdc++'s std::deque) travels as a std::unique_ptr<T>. A
// throwing copy in try_send(const T&) happens before the lock and leaves
// the channel as it was.
//
// Who calls what: every member from any fiber or thread, except the
// destructor (nobody may still use the channel).
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <optional>
#include <source_location>
#include <system_error>
#include <type_traits>
#include <utility>

#include "runtime/select.h"
#include "runtime/wait_list.h"
#include "runtime/weft.h"

namespace weft {

enum class chan_errc { closed = 1 };
const std::error_category& chan_category() noexcept;
inline std::error_code make_error_code(chan_errc e) noexcept {
  return {static_cast<int>(e), chan_category()};
}

}  // namespace weft

template <>
struct std::is_error_code_enum<weft::chan_errc> : std::true_type {};

namespace weft {

namespace detail {

// How the type-erased core moves elements of T.
struct elem_ops {
  void (*move_construct)(void* dst, void* src);
  void (*destroy)(void* p);
  std::size_t size;
  std::size_t align;
};

enum class chan_status : unsigned char { ok, closed, timed_out, cancelled, would_block };

std::unexpected<std::error_code> chan_error(chan_status s) noexcept;

// Everything that does not depend on T, out of line in runtime/channel.cc.
class chan_core {
 public:
  chan_core(std::size_t capacity, const elem_ops& ops);
  ~chan_core();
  chan_core(const chan_core&) = delete;
  chan_core& operator=(const chan_core&) = delete;

  // *Fast paths*, for channel<T>, inline with T known: a value into a
  // buffer with room and no parked receiver, or out of a non-empty buffer
  // with no parked sender, is the common case of a buffered channel (fanin:
  // only one message in ~400 parks). There it costs the lock, a move and
  // the unlock. Through the out-of-line path it also cost four calls, two
  // of them through elem_ops, and their frames: fanin took ~280
  // instructions a message that way, ~125 this way (callgrind), and
  // 41.8 -> 73.5 Mmsg/s (bench/README.md). Usage: lock(); then if
  // put_fast_ok(), construct the value at put_slot() and put_done(); else
  // send_locked(), which decides everything else with the lock held (and
  // drops it). Likewise take_fast_ok() / take_slot() / take_done() /
  // recv_locked(). Between lock() and the call that drops it: nothing that
  // may block, throw or switch.
  void lock() const noexcept { lk_.lock(); }
  bool put_fast_ok() const noexcept { return count_ < cap_ && recvq_.empty() && !closed_; }
  void* put_slot() const noexcept { return slot(count_); }
  void put_done(bool may_block) noexcept {
    ++count_;
    lk_.unlock();
    if (may_block) sched::spend_budget();  // completed without parking
  }
  bool take_fast_ok() const noexcept { return count_ > 0 && sendq_.empty(); }
  void* take_slot() const noexcept { return slot(0); }
  void take_done(bool may_block) noexcept {
    if (++head_ == cap_) head_ = 0;
    --count_;
    lk_.unlock();
    if (may_block) sched::spend_budget();  // completed without parking
  }
  // A send or a receive, called with lk_ held (after lock()); they drop
  // it. send: v points at the sender's value, moved from only on ok. recv:
  // deliver(out, src) builds the received value at out, only on ok.
  chan_status send_locked(void* v, clock::time_point dl, bool may_block,
                          const std::source_location& where);
  chan_status recv_locked(void* out, void (*deliver)(void*, void*), clock::time_point dl,
                          bool may_block, const std::source_location& where);
  void close() noexcept;
  bool closed() const noexcept;
  std::size_t size() const noexcept;
  std::size_t capacity() const noexcept { return cap_; }

 private:
  friend struct chan_access;  // runtime/select.cc
  chan_status try_send_locked(void* v, wake_ticket& t) noexcept;
  chan_status try_recv_locked(void* out, void (*deliver)(void*, void*),
                              wake_ticket& t) noexcept;
  // No division: head_ < cap_ and i <= cap_ (this sits inside the lock,
  // where every cycle counts under contention; see the fanin workload).
  void* slot(std::size_t i) const noexcept {
    std::size_t k = head_ + i;
    if (k >= cap_) k -= cap_;
    return buf_ + k * ops_.size;
  }
  // The end of an operation that did not park: drops lk_, wakes the
  // fiber it handed a value to, spends the coop budget (blocking kinds).
  chan_status finish_at_once(chan_status s, const wake_ticket& t, bool may_block) noexcept;

  mutable short_lock lk_;
  wait_list recvq_;  // parked receivers; guarded by lk_
  wait_list sendq_;  // parked senders; guarded by lk_
  unsigned char* buf_ = nullptr;  // cap_ elements; immutable pointer
  const std::size_t cap_;
  std::size_t head_ = 0;   // guarded by lk_
  std::size_t count_ = 0;  // guarded by lk_; invariant: count_ > 0 => recvq_ empty
  bool closed_ = false;    // guarded by lk_
  const elem_ops ops_;
};

template <typename T>
inline constexpr elem_ops elem_ops_of{
    [](void* d, void* s) { ::new (d) T(std::move(*static_cast<T*>(s))); },
    [](void* p) { static_cast<T*>(p)->~T(); },
    sizeof(T),
    alignof(T),
};

// Builds the received value inside a std::optional<T>.
template <typename T>
void deliver_to_optional(void* dst, void* src) {
  static_cast<std::optional<T>*>(dst)->emplace(std::move(*static_cast<T*>(src)));
}

select_case make_recv_case(chan_core* c, void* out, void (*deliver)(void*, void*));
select_case make_send_case(chan_core* c, void* v, bool* sent = nullptr);

}  // namespace detail

template <typename T>
class channel {
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "weft::channel<T>: T's move constructor must not throw "
                "(values are moved under the channel's lock)");
  // Addresses of T are taken with std::addressof: T may overload unary
  // operator& (COM-style smart pointers do), as std containers allow.

 public:
  // Throws std::length_error if capacity * sizeof(T) does not fit in
  // size_t, std::bad_alloc if the buffer cannot be allocated.
  explicit channel(std::size_t capacity = 0) : core_(capacity, detail::elem_ops_of<T>) {}

  // Blocks while the buffer is full (or, capacity 0, until a receiver
  // takes the value). closed, timed_out or operation_canceled.
  result<void> send(T v, deadline d = {},
                    std::source_location where = std::source_location::current()) {
    return put(std::addressof(v), d.when, true, where);
  }
  // The next value; empty once the channel is closed and drained, or when
  // the calling fiber's stop was requested (use recv(deadline) to tell).
  std::optional<T> recv(std::source_location where = std::source_location::current()) {
    std::optional<T> out;
    (void)take(out, clock::time_point::max(), true, where);
    return out;
  }
  // The next value, or closed / timed_out / operation_canceled.
  result<T> recv(deadline d, std::source_location where = std::source_location::current()) {
    std::optional<T> out;
    auto s = take(out, d.when, true, where);
    if (s == detail::chan_status::ok) return std::move(*out);
    return detail::chan_error(s);
  }
  // Never blocks: operation_would_block when full (no receiver waiting),
  // closed when closed. Moves from v only on success.
  result<void> try_send(T&& v) { return try_send_ptr(std::addressof(v)); }
  result<void> try_send(const T& v) {
    T copy(v);
    return try_send_ptr(std::addressof(copy));
  }
  // Never blocks: operation_would_block when empty, closed when closed and
  // drained.
  result<T> try_recv() {
    std::optional<T> out;
    auto s = take(out, clock::time_point::max(), false, std::source_location::current());
    if (s == detail::chan_status::ok) return std::move(*out);
    return detail::chan_error(s);
  }

  void close() noexcept { core_.close(); }
  bool closed() const noexcept { return core_.closed(); }
  std::size_t size() const noexcept { return core_.size(); }
  std::size_t capacity() const noexcept { return core_.capacity(); }

  // select cases (runtime/select.h). on_recv resets `out`, which then holds
  // the value, or stays empty if the case fired because the channel closed.
  // on_send moves from `v` only if the value was sent; it also fires on a
  // closed channel (then v is untouched). The form with `sent` says which:
  // it is true once the case fired with v sent, false if it fired because
  // the channel is closed. closed() afterwards cannot tell them apart when
  // another fiber may close the channel meanwhile (a value sent just
  // before a close is still delivered).
  select_case on_recv(std::optional<T>& out) {
    out.reset();
    return detail::make_recv_case(&core_, &out, &detail::deliver_to_optional<T>);
  }
  select_case on_send(T& v) { return detail::make_send_case(&core_, std::addressof(v)); }
  select_case on_send(T& v, bool& sent) {
    sent = false;
    return detail::make_send_case(&core_, std::addressof(v), &sent);
  }

 private:
  result<void> try_send_ptr(T* v) {
    return put(v, clock::time_point::max(), false, std::source_location::current());
  }
  // send and recv through the core's fast paths (chan_core, *Fast paths*).
  result<void> put(T* v, clock::time_point dl, bool may_block,
                   const std::source_location& where) {
    detail::note_plain_user();  // a plain thread that sends may send again
    core_.lock();
    if (core_.put_fast_ok()) [[likely]] {
      // SAFETY: a free slot of the ring, under the lock; T's move cannot
      // throw (the static_assert above).
      ::new (core_.put_slot()) T(std::move(*v));
      core_.put_done(may_block);
      return {};
    }
    auto s = core_.send_locked(v, dl, may_block, where);
    if (s == detail::chan_status::ok) return {};
    return detail::chan_error(s);
  }
  detail::chan_status take(std::optional<T>& out, clock::time_point dl, bool may_block,
                           const std::source_location& where) {
    detail::note_plain_user();  // a plain thread that receives may send too
    core_.lock();
    if (core_.take_fast_ok()) [[likely]] {
      // SAFETY: the ring's head holds a T, under the lock.
      T* p = static_cast<T*>(core_.take_slot());
      out.emplace(std::move(*p));
      p->~T();
      core_.take_done(may_block);
      return detail::chan_status::ok;
    }
    return core_.recv_locked(&out, &detail::deliver_to_optional<T>, dl, may_block, where);
  }

  detail::chan_core core_;
};

}  // namespace weft
