// runtime/select.h — weft::select: wait for the first of several channel
// operations, a timer, a fiber's stop request, or none (default).
//
//   std::optional<job> j;
//   result r;
//   bool sent;
//   switch (weft::select(jobs.on_recv(j), done.on_send(r, sent), weft::after(50ms),
//                        weft::this_fiber::stop_token())) {
//     case 0: ...  // j holds a job, or is empty: jobs was closed
//     case 1: ...  // sent: r was sent; !sent: done is closed, r untouched
//     case 2: ...  // 50 ms passed
//     case 3: ...  // this fiber was asked to stop
//   }
//
// Rules (Go's):
//   - When several cases are ready, one is chosen uniformly at random, so no
//     case starves.
//   - weft::select_default makes the select non-blocking: it fires only when
//     no other case is ready.
//   - Exactly one case fires; the others leave their arguments untouched
//     (on_recv resets its optional when the case is built, before select).
//   - A stop case fires when the fiber its token belongs to is asked to
//     stop — the calling fiber's own token, or any other fiber's (a
//     parent's token handed to a child). A null token never fires.
//   - The calling fiber's own stop request always ends a parked select: it
//     fires a stop case on its own token if there is one, or else one on
//     another token that is stopped too (the first in case order), and
//     otherwise makes select return kSelectCancelled (-1), even when other
//     fibers' tokens are among the cases: cancellation never goes
//     unnoticed.
//   - Plain OS threads may select too (their own token is null; another
//     fiber's token fires there as anywhere).
//
// The value converts to int (the index of the fired case), so it can be
// switched on directly.
#pragma once

#include <chrono>
#include <cstddef>
#include <source_location>
#include <utility>

#include "runtime/weft.h"

namespace weft {

namespace sched {
class stop_state;  // sched/park.h: *Stop states*
}  // namespace sched

namespace detail {
class chan_core;
enum class case_kind : unsigned char { recv, send, after, stop, dflt };
}  // namespace detail

// One case of a select. Built by channel::on_recv / on_send, after(),
// this_fiber::stop_token() and select_default; not meant to be filled in by
// hand.
struct select_case {
  detail::case_kind kind = detail::case_kind::dflt;
  detail::chan_core* ch = nullptr;
  void* slot = nullptr;                              // recv: the optional; send: the value
  void (*deliver)(void*, void*) = nullptr;           // recv: builds the value in slot
  clock::time_point when = clock::time_point::max();  // after: the deadline
  sched::stop_state* stop = nullptr;                 // stop: the token's state; null: never
  bool* sent = nullptr;  // send: if set, whether the value was sent (false: closed)
};

inline constexpr int kSelectCancelled = -1;

// A timer case: fires once `d` has passed since the select began waiting;
// never, if `d` is too long for the clock (nanoseconds::max()).
template <typename Rep, typename Period>
select_case after(std::chrono::duration<Rep, Period> d) {
  return {.kind = detail::case_kind::after, .when = detail::time_after(d)};
}
// A timer case that fires at a deadline.
inline select_case after(deadline d) {
  return {.kind = detail::case_kind::after, .when = d.when};
}

// The non-blocking case: fires when nothing else is ready.
inline constexpr select_case select_default{.kind = detail::case_kind::dflt};

class stop_token;
namespace this_fiber {
// The calling fiber's stop token (a null one, which never stops, on a plain
// thread). The first call in a fiber allocates the state the fiber shares
// with its tokens.
weft::stop_token stop_token();
}  // namespace this_fiber

// A fiber's stop state, as a value (std::stop_token's contract): cheap to
// copy, valid after its fiber has exited (it then reports the fiber's last
// state), and usable from any fiber or thread: query it, or select on it.
// A default-constructed token never stops.
class stop_token {
 public:
  stop_token() noexcept = default;
  stop_token(const stop_token& o) noexcept;
  stop_token(stop_token&& o) noexcept : state_(o.state_) { o.state_ = nullptr; }
  stop_token& operator=(stop_token o) noexcept {
    std::swap(state_, o.state_);
    return *this;
  }
  ~stop_token();

  bool stop_requested() const noexcept;
  // Same fiber's state (or both null).
  friend bool operator==(const stop_token& a, const stop_token& b) noexcept {
    return a.state_ == b.state_;
  }
  // The select case borrows the state: the token must outlive the select
  // call, as an argument of it does.
  operator select_case() const noexcept {
    return {.kind = detail::case_kind::stop, .stop = state_};
  }

 private:
  friend weft::stop_token this_fiber::stop_token();
  explicit stop_token(sched::stop_state* adopted) noexcept : state_(adopted) {}

  sched::stop_state* state_ = nullptr;  // one reference held; null: never stops
};

// The most cases one select takes (its bookkeeping lives on the stack).
inline constexpr std::size_t kSelectMaxCases = 32;

namespace detail {
int select_impl(select_case* cases, std::size_t n, const std::source_location& where);
}  // namespace detail

// select(cases...) waits and remembers the index of the fired case. A class
// template (with a deduction guide) only so that it can take the caller's
// source_location after a parameter pack.
template <typename... C>
class select {
 public:
  explicit select(C&&... cs, std::source_location where = std::source_location::current()) {
    static_assert(sizeof...(C) > 0, "weft::select needs at least one case");
    static_assert(sizeof...(C) <= kSelectMaxCases, "weft::select takes at most 32 cases");
    select_case all[] = {static_cast<select_case>(cs)...};
    index_ = detail::select_impl(all, sizeof...(C), where);
  }
  operator int() const noexcept { return index_; }
  int index() const noexcept { return index_; }

 private:
  int index_ = kSelectCancelled;
};
template <typename... C>
select(C&&...) -> select<C...>;

}  // namespace weft
