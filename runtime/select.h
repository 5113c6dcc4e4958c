// runtime/select.h — weft::select: wait for the first of several channel
// operations, a timer, the fiber's own stop request, or none (default).
//
//   std::optional<job> j;
//   result r;
//   switch (weft::select(jobs.on_recv(j), done.on_send(r), weft::after(50ms),
//                        weft::this_fiber::stop_token())) {
//     case 0: ...  // j holds a job, or is empty: jobs was closed
//     case 1: ...  // r was sent (or done is closed: done.closed())
//     case 2: ...  // 50 ms passed
//     case 3: ...  // this fiber was asked to stop
//   }
//
// Rules (Go's):
//   - When several cases are ready, one is chosen uniformly at random, so no
//     case starves.
//   - weft::select_default makes the select non-blocking: it fires only when
//     no other case is ready.
//   - Exactly one case fires; the others leave their arguments untouched.
//   - Without a stop case, a stop request makes select return
//     kSelectCancelled (-1): cancellation never goes unnoticed.
//   - Plain OS threads may select too (stop cases never fire there).
//
// The value converts to int (the index of the fired case), so it can be
// switched on directly.
#pragma once

#include <chrono>
#include <cstddef>
#include <source_location>

#include "runtime/weft.h"

namespace weft {

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
};

inline constexpr int kSelectCancelled = -1;

// A timer case: fires once `d` has passed since the select began waiting.
template <typename Rep, typename Period>
select_case after(std::chrono::duration<Rep, Period> d) {
  return {.kind = detail::case_kind::after,
          .when = clock::now() + std::chrono::duration_cast<clock::duration>(d)};
}
// A timer case that fires at a deadline.
inline select_case after(deadline d) {
  return {.kind = detail::case_kind::after, .when = d.when};
}

// The non-blocking case: fires when nothing else is ready.
inline constexpr select_case select_default{.kind = detail::case_kind::dflt};

// A fiber's stop state, as a value: query it, or select on it.
class stop_token {
 public:
  stop_token() = default;
  explicit stop_token(void* fiber) : fiber_(fiber) {}
  bool stop_requested() const noexcept;
  operator select_case() const { return {.kind = detail::case_kind::stop}; }

 private:
  void* fiber_ = nullptr;  // the fiber it belongs to; null: never stops
};

namespace this_fiber {
// The calling fiber's stop token (one that never stops on a plain thread).
weft::stop_token stop_token() noexcept;
}  // namespace this_fiber

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
