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
// A call that has waited a second for a thread, all of them busy, is
// reported on stderr (at most once a minute): calls that wait for each
// other's results never finish in a bounded pool (Tokio's blocking pool
// would hang in silence).
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
  // with the acquire in run_on_pool() and wait_on_pool().
  std::atomic<bool> finished{false};
  bool shared = false;  // a shared_job: the pool thread lets go of it after the wake
  // Set by the pool under its lock when the job is queued: the stall
  // report names the call that has waited longest (*Stalls* in
  // io/blocking.cc).
  clock::time_point queued_at{};
  std::source_location where{};
};

// Queues job on the pool and parks the calling fiber until it ran.
void run_on_pool(blocking_job& job, std::source_location where);

// *A call the fiber may stop waiting for* (its deadline passed, its stop
// was requested, the runtime unwinds it) while the call runs on: a name
// lookup, which getaddrinfo cannot cut short (Go's Dial timeout and
// context cover the lookup too). The job lives on the heap, shared by the
// fiber and the pool thread; the last of the two to let go destroys it. So
// its fn owns everything it touches.
struct shared_job : blocking_job {
  // The fiber's and the pool thread's. acq_rel decrement (let_go()): each
  // side's last touch happens before the other side's delete.
  std::atomic<int> refs{2};
  void (*destroy)(shared_job*) = nullptr;
};
// Drops one reference to j (the fiber's or the pool thread's).
void let_go(shared_job* j) noexcept;
// Queues job and parks the calling fiber until it ran (an empty error
// code: the result is in), until `deadline` (timed_out) or until a stop
// request or the unwinder (operation_canceled): then the job runs on
// without the fiber, unless it had not started yet: then it is dropped
// unrun once the caller lets go. Either way the caller still holds its
// reference. Cancelled while the runtime unwinds the fiber, it throws
// sched::fiber_unwind (sched::unwind_point()) instead of returning.
// Off a fiber (a plain thread, a pool thread) the job runs right here.
std::error_code wait_on_pool(shared_job& job, clock::time_point deadline,
                             std::source_location where);

// fn() returns a result<T>; the value it returns, or timed_out /
// operation_canceled as wait_on_pool() says. fn is moved to the heap and
// may outlive the call: it must own what it touches (capture by value).
// fn's exception is rethrown here, if the fiber was still waiting.
template <typename F, typename T = typename std::invoke_result_t<F&>::value_type>
result<T> blocking_until(F fn, clock::time_point deadline, std::source_location where) {
  struct job : shared_job {
    F fn;
    std::optional<result<T>> value;
    std::exception_ptr error;
    explicit job(F&& f) : fn(std::move(f)) {}
  };
  auto* j = new job(std::move(fn));
  j->destroy = [](shared_job* s) { delete static_cast<job*>(s); };
  j->run = [](blocking_job* b) {
    auto* self = static_cast<job*>(b);
    try {  // a pool thread, not a fiber: nothing to rethrow for the unwinder
      self->value.emplace(self->fn());
    } catch (...) {
      self->error = std::current_exception();
    }
  };
  struct ours {
    job* j;
    ~ours() { let_go(j); }
  } hold{j};
  if (std::error_code ec = wait_on_pool(*j, deadline, where)) return std::unexpected(ec);
  if (j->error) std::rethrow_exception(j->error);
  return std::move(*j->value);
}

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
