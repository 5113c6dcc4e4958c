// io/blocking.h
//
// weft::blocking(fn): runs fn on a pool of OS threads while the calling
// fiber parks, and returns fn's value (or rethrows its exception) in the
// fiber. For calls that would block a worker: getaddrinfo, SQLite,
// CPU-heavy work. Re-exported as weft::blocking by runtime/net.h.
//
//   auto n = weft::blocking([&] { return expensive(x); });
//
// The pool (io/blocking.cc) is bounded: it grows to WEFT_BLOCKING_THREADS
// (default 64) threads while calls wait, and a thread idle for 10 s exits.
//
// Called off a fiber — inside another blocking() call's fn (a pool
// thread), or on a plain thread — fn runs on the calling thread, which may
// block: nested calls never wait for a pool thread, so a full pool cannot
// deadlock on them.
//
// The park is not cancellable: fn runs on the caller's data, so the fiber
// waits for it even after request_stop() (a stopped fiber returns from
// blocking() only when fn has returned).
//
// Who calls what:
//   blocking()   any thread; it parks only a fiber (see above)
#pragma once

#include <atomic>
#include <exception>
#include <memory>
#include <optional>
#include <source_location>
#include <type_traits>
#include <utility>

#include "io/driver.h"

namespace weft::io {
namespace detail {

// A call waiting for or running on the pool. Lives on the fiber's stack.
struct blocking_job {
  void (*run)(blocking_job*) = nullptr;  // on a pool thread; must not throw
  completion done;                        // completed by the pool thread
  blocking_job* next = nullptr;           // the pool's queue link
  // Set by the pool thread once it no longer touches the job or the
  // scheduler (after the wake); the fiber returns only then. release: pairs
  // with the acquire in run_on_pool().
  std::atomic<bool> finished{false};
};

// Queues job on the pool and parks the calling fiber until it ran.
void run_on_pool(blocking_job& job, std::source_location where);

}  // namespace detail

template <typename F>
auto blocking(F&& fn, std::source_location where = std::source_location::current())
    -> std::invoke_result_t<F&> {
  using R = std::invoke_result_t<F&>;
  static_assert(!std::is_rvalue_reference_v<R>,
                "weft::blocking: fn returns an rvalue reference; return a value");
  struct empty {};
  // An lvalue reference is returned as one (as std::async does): kept as
  // a pointer meanwhile.
  using stored = std::conditional_t<std::is_void_v<R>, empty,
                                    std::conditional_t<std::is_lvalue_reference_v<R>,
                                                       std::remove_reference_t<R>*, R>>;
  struct job : detail::blocking_job {
    std::remove_reference_t<F>* fn;
    std::optional<stored> value;
    std::exception_ptr error;
  } j;
  j.fn = &fn;
  j.run = [](detail::blocking_job* b) {
    auto* self = static_cast<job*>(b);
    try {  // a pool thread, not a fiber: nothing to rethrow for the unwinder
      if constexpr (std::is_void_v<R>) {
        (*self->fn)();
        self->value.emplace();
      } else if constexpr (std::is_lvalue_reference_v<R>) {
        self->value.emplace(std::addressof((*self->fn)()));
      } else {
        self->value.emplace((*self->fn)());
      }
    } catch (...) {
      self->error = std::current_exception();
    }
  };
  detail::run_on_pool(j, where);
  if (j.error) std::rethrow_exception(j.error);
  if constexpr (std::is_lvalue_reference_v<R>)
    return **j.value;
  else if constexpr (!std::is_void_v<R>)
    return std::move(*j.value);
}

}  // namespace weft::io
