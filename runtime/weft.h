// runtime/weft.h — the public API of weft.
//
//   #include "runtime/weft.h"
//   int main() {
//     return weft::run([] {
//       auto h = weft::spawn([] { return 6 * 7; }, {.name = "answer"});
//       return h.join() == 42 ? 0 : 1;
//     });
//   }
//
// weft::run starts one worker per processing unit and runs its argument as
// the first fiber ("main"). Fibers look like threads: they block in join,
// sleep, channel and I/O calls, but only the fiber waits; its worker runs
// other fibers meanwhile. When main returns, the fibers still alive are
// unwound (their destructors run) and run returns main's value.
//
// Errors: operations that can fail because of the environment return
// weft::result<T>; parked operations return std::errc::operation_canceled
// after request_stop() and std::errc::timed_out at their deadline.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <expected>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <ratio>
#include <source_location>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace weft {

template <typename T>
using result = std::expected<T, std::error_code>;

inline std::unexpected<std::error_code> make_error(std::errc e) {
  return std::unexpected(std::make_error_code(e));
}

using clock = std::chrono::steady_clock;

namespace detail {
// now() + d, saturated: a duration beyond what is left of steady_clock's
// range (nanoseconds::max() or seconds::max() meaning "forever", or a huge
// floating-point count) is time_point::max(), "never", as Go's timers and
// Tokio's far_future treat it; one reaching before the clock's start is
// now (already passed). A plain now() + duration_cast overflows (undefined
// behaviour; in practice a deadline in the past, so "forever" timed out at
// once). The bounds are compared in long double, which holds any integer
// count's magnitude without overflow; a second of margin covers its
// rounding.
//
// A long d (at least a hundred times the coarse clock's lag: 2.5 s here)
// starts from the coarse clock instead (sched/park.h; a memory read, where
// clock::now() reads the TSC), plus that lag, so the deadline is never
// earlier than now() + d and at most 1 % later: a server's idle timeout
// read on every request costs no precise clock read.
clock::time_point far_time_after(clock::duration d) noexcept;  // min(): d too short

// Whether Period divides an hour (nanoseconds to hours, not days, weeks or
// years): comparing such a duration with hours converts the hours to its
// unit, never its count to hours' (which overflows: days::max(), a
// "never", became a deadline a day in the past). Period is reduced, so it
// divides 3600 s exactly when its numerator divides 3600.
template <typename Period>
inline constexpr bool divides_an_hour_v = 3600 % Period::num == 0;

template <typename Rep, typename Period>
clock::time_point time_after(std::chrono::duration<Rep, Period> d) noexcept {
  if constexpr (std::is_integral_v<Rep> && std::ratio_greater_equal_v<Period, std::nano>) {
    if constexpr (divides_an_hour_v<Period>) {
      // Under a century first (compared in d's own unit: no overflow), so
      // the conversions below cannot overflow either. Coarser units take
      // the saturating path below.
      if (d <= std::chrono::hours(24 * 365 * 100) && d >= std::chrono::seconds(1)) {
        clock::time_point t = far_time_after(std::chrono::duration_cast<clock::duration>(d));
        if (t != clock::time_point::min()) return t;
      }
    }
  }
  using ld_ns = std::chrono::duration<long double, std::nano>;
  clock::time_point now = clock::now();
  long double want = ld_ns(d).count();
  long double room = ld_ns(clock::time_point::max() - now - std::chrono::seconds(1)).count();
  if (!(want < room)) return clock::time_point::max();  // also NaN
  long double back = ld_ns(now.time_since_epoch()).count();
  if (want <= -back) return now;
  return now + std::chrono::duration_cast<clock::duration>(d);
}
}  // namespace detail

// A point in time after which a parked operation gives up with timed_out.
// A duration too long for the clock (nanoseconds::max()) means never.
struct deadline {
  clock::time_point when = clock::time_point::max();
  deadline() = default;
  explicit deadline(clock::time_point t) : when(t) {}
  template <typename Rep, typename Period>
  explicit deadline(std::chrono::duration<Rep, Period> d) : when(detail::time_after(d)) {}
  static deadline never() { return {}; }
  bool is_never() const { return when == clock::time_point::max(); }
};

struct options {
  unsigned workers = 0;         // 0: one per processing unit of the cpuset (WEFT_WORKERS overrides)
  bool pin = true;              // pin each worker to its processing unit
  // Default fiber stack (address space; committed lazily); 0: 64 KiB.
  std::size_t stack_size = 64 * 1024;
  bool deadlock_detection = true;
  // A fiber that runs this long without parking or yielding is reported
  // once on stderr (its worker's timers and I/O wait for it); 0: never.
  std::chrono::milliseconds hog_warning{500};
};

struct spawn_options {
  // Shown by this_fiber::name(), dump(), the deadlock report and overflow
  // messages; kept to its first 63 bytes, cut at a UTF-8 character boundary.
  std::string_view name = {};
  std::size_t stack_size = 0;   // 0: the runtime default; rounded up to a size class
  bool pinned = false;          // never leaves the worker it starts on
  // The worker it starts on (taken modulo worker_count()); -1: the
  // spawning one. Without `pinned` it may later be stolen like any other;
  // an acceptor that spreads connections round-robin uses this.
  int worker = -1;
};

// The number of workers of the running runtime.
unsigned worker_count();

// Workers are pinned, one CPU each, and a thread inherits the affinity of
// the thread that creates it: a std::thread started from a fiber would run
// only on that fiber's worker's CPU. Called on such a thread, this lets it
// run on every CPU the runtime was started with (the blocking pool's
// threads do it themselves). The error of pthread_setaffinity_np, or
// operation_not_permitted before any runtime started or on a worker (from
// a fiber: call it first thing on the new thread instead).
result<void> unpin_this_thread();

// Stack size classes below one page (1 KiB, 2 KiB) have no guard page; an
// overflow is caught by a canary at the next switch. kSmallStack is the
// "small-stack option" of the README: enough for fibers that park with a
// shallow call chain, at ~2 KiB of memory per idle fiber. In a translation
// unit built with AddressSanitizer or ThreadSanitizer it is 16 KiB: their
// instrumented frames are several times larger, and a fiber that fits in
// 2 KiB optimized overflowed there. (Not `inline`: a constant of internal
// linkage may differ between sanitized and plain translation units.)
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define WEFT_SANITIZED_FRAMES 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define WEFT_SANITIZED_FRAMES 1
#endif
#endif
#ifdef WEFT_SANITIZED_FRAMES
constexpr std::size_t kSmallStack = 16 * 1024;
#else
constexpr std::size_t kSmallStack = 2 * 1024;
#endif
#undef WEFT_SANITIZED_FRAMES

struct worker_stats {
  std::uint64_t fibers_run = 0;
  std::uint64_t steals = 0;  // fibers this worker took from others
  // Fibers this worker's full run queue moved to the shared queue, where
  // they wait behind everything queued there (Tokio's overflow count).
  std::uint64_t overflowed = 0;
};

struct runtime_stats {
  std::vector<worker_stats> workers;
  // sleeps: times a worker waited in its driver for want of work; wakeups:
  // times such a wait returned (one fewer exactly while a worker sleeps).
  std::uint64_t spawned = 0, parks = 0, yields = 0, sleeps = 0, wakeups = 0,
                lifo_runs = 0, inject_pops = 0, live_fibers = 0;
  // Fibers woken by timers that another worker fired for a worker stuck in
  // one fiber (see "Fibers are not preempted" in README.md).
  std::uint64_t timer_steals = 0;
  std::uint64_t stacks_live = 0, stacks_cached = 0, stack_bytes_reserved = 0,
                stacks_returned_to_os = 0;
  std::string stack_guard;  // "madvise_guard", "mprotect" or "canary"
};

runtime_stats stats();
void dump();  // every fiber to stderr: id, name, state, where it parked

namespace detail {

int run_main(std::function<int()> main_fn, const options& opts);

// Only inside a catch handler: true if the exception being handled is the
// runtime's fiber_unwind (which must be rethrown), false for any other.
bool handling_fiber_unwind() noexcept;
// join() of a fiber that was unwound: throws fiber_unwind if the joiner is
// being unwound too, else std::system_error(operation_canceled).
[[noreturn]] void unwound_joined();

// The shared state between a fiber and its join_handle. Out of line in
// runtime/join.cc; see the invariants there.
class join_state_base {
 public:
  join_state_base() = default;
  join_state_base(const join_state_base&) = delete;
  join_state_base& operator=(const join_state_base&) = delete;

  void bind(void* fiber) noexcept { fiber_ = fiber; }
  void complete() noexcept;  // the fiber: done; wakes a joiner
  // The joiner: parks until done (a plain thread blocks on a futex). False
  // if its own stop was requested, or the runtime unwinds it outside a
  // destructor (in one it waits on: see join.cc).
  bool wait(std::source_location where);
  void request_stop() noexcept;
  void release() noexcept;   // drops one of the two references
  std::uint64_t fiber_id() const noexcept { return id_; }
  void set_id(std::uint64_t id) noexcept { id_ = id; }

 protected:
  virtual ~join_state_base() = default;
  std::exception_ptr error_;
  bool unwound_ = false;

 private:
  friend struct join_access;
  std::atomic<int> refs_{2};
  // A joining plain thread's futex word: 0 none, 1 waiting (stored under
  // lock_), 2 done (stored by complete()). See join.cc.
  std::atomic<std::uint32_t> thread_word_{0};
  std::atomic<bool> lock_{false};  // guards fields below; see join.cc
  bool done_ = false;
  void* fiber_ = nullptr;          // the running fiber, until complete()
  void* waiter_ = nullptr;         // a parked joiner's wake token
  std::uint64_t waiter_gen_ = 0;
  std::uint64_t id_ = 0;
  void lock() noexcept;
  void unlock() noexcept;
  static void publish_waiter(void* self, void* fiber, std::uint64_t gen);
  void wait_thread() noexcept;
};

template <typename T>
class join_state final : public join_state_base {
 public:
  template <typename... A>
  void set_value(A&&... a) {
    if constexpr (std::is_reference_v<T>)
      value_.emplace(std::addressof(a)...);  // a reference result: its referent's address
    else if constexpr (!std::is_void_v<T>)
      value_.emplace(std::forward<A>(a)...);
  }
  void set_exception(std::exception_ptr e) { error_ = std::move(e); }
  void set_unwound() { unwound_ = true; }
  // The joiner, after wait(). A fiber the runtime unwound produced no
  // value: unwound_joined() throws instead of returning one.
  T take() {
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    if (unwound_) unwound_joined();
    if constexpr (std::is_reference_v<T>)
      return static_cast<T>(**value_);
    else if constexpr (!std::is_void_v<T>)
      return std::move(*value_);
  }
  bool failed() const { return error_ != nullptr; }

 private:
  struct empty {};
  // A fiber that returns a reference (T& or T&&, as std::future<T&>) leaves
  // a pointer to the referent: std::optional holds no references.
  using stored = std::conditional_t<
      std::is_void_v<T>, empty,
      std::conditional_t<std::is_reference_v<T>, std::remove_reference_t<T>*, T>>;
  std::optional<stored> value_;
};

struct spawn_request {
  spawn_options opts;
  std::size_t size, align;
  void (*body)(void*);
  void (*discard)(void*);
};
// Creates a fiber with room for the callable; returns (fiber, callable slot).
std::pair<void*, void*> spawn_create(const spawn_request& r);
std::uint64_t spawn_start(void* fiber);
// Frees a fiber created and never started (its callable was not built).
void spawn_abandon(void* fiber) noexcept;
// Builds the callable into a created fiber; if that throws (a capture's
// copy), the fiber goes too and the exception goes on to the spawner.
template <typename Build>
void construct_or_abandon(void* fiber, Build&& build) {
  try {
    build();
  } catch (...) {
    spawn_abandon(fiber);
    throw;
  }
}
bool current_fiber_unwinding() noexcept;
// The runtime unwinds the calling fiber and what runs is a destructor (an
// exception in flight, or its body ended): a throw would be std::terminate.
bool current_fiber_unwinding_in_cleanup() noexcept;
// The calling fiber's body has returned or been unwound: what it runs now
// are destructors (its callable's, its fiber_locals'), which may park
// (their parks are cancelled while the runtime unwinds) but must not have
// fiber_unwind thrown at them, with no exception in flight to excuse them
// (sched::unwind_point()).
void end_body() noexcept;
std::uint64_t current_fiber_id() noexcept;
// Destroys the calling fiber's fiber_local values now (they would be at
// its exit anyway): a spawned fiber does this before it completes its
// join state, so a joiner never runs ahead of their destructors.
void destroy_fiber_locals() noexcept;
void warn_unobserved(std::uint64_t id, std::exception_ptr e) noexcept;

template <typename F, typename R>
struct spawned {
  F fn;
  join_state<R>* st;
  static void body(void* p) {
    auto* self = static_cast<spawned*>(p);
    join_state<R>* st = self->st;
    try {
      if constexpr (std::is_void_v<R>) {
        self->fn();
        st->set_value();
      } else {
        st->set_value(self->fn());
      }
    } catch (...) {
      // fiber_unwind (the runtime unwinds this fiber: its frames are gone
      // now) ends the fiber with no value; any other exception is the
      // fiber's result, also while the runtime unwinds (a destructor or
      // handler may throw one). Either way the rest happens after the
      // handler, since destructors below may park, and a fiber must not
      // park (and perhaps move to another thread) inside a catch handler.
      if (handling_fiber_unwind())
        st->set_unwound();
      else
        st->set_exception(std::current_exception());
    }
    end_body();
    finish(self, st);
  }
  // The callable and then the fiber's locals are destroyed before the
  // joiner is woken: what they use may go once join() returns.
  static void finish(spawned* self, join_state<R>* st) {
    self->~spawned();
    destroy_fiber_locals();
    st->complete();
    st->release();
  }
  static void discard(void* p) {
    auto* self = static_cast<spawned*>(p);
    join_state<R>* st = self->st;
    st->set_unwound();
    finish(self, st);
  }
};

// What weft::go runs: the callable alone, no join state.
template <typename F>
struct detached {
  F fn;
  static void body(void* p) {
    auto* self = static_cast<detached*>(p);
    struct destroyer {
      detached* d;
      ~destroyer() {
        end_body();
        d->~detached();
      }
    } guard{self};
    try {
      self->fn();
    } catch (...) {
      // As in spawned::body: only fiber_unwind goes on up.
      if (handling_fiber_unwind()) throw;  // the runtime unwinds this fiber
      warn_unobserved(current_fiber_id(), std::current_exception());
    }
  }
  static void discard(void* p) { static_cast<detached*>(p)->~detached(); }
};

}  // namespace detail

// The owner of a spawned fiber's result. Move-only. Destroying a joinable
// handle detaches the fiber.
template <typename T>
class join_handle {
 public:
  join_handle() = default;
  explicit join_handle(detail::join_state<T>* st) : st_(st) {}
  join_handle(join_handle&& o) noexcept : st_(std::exchange(o.st_, nullptr)) {}
  join_handle& operator=(join_handle&& o) noexcept {
    if (this != &o) {
      detach();
      st_ = std::exchange(o.st_, nullptr);
    }
    return *this;
  }
  ~join_handle() { detach(); }

  bool joinable() const noexcept { return st_ != nullptr; }
  // The fiber's this_fiber::id(); 0 once the handle is not joinable (after
  // join() or detach(), or default-constructed), as std::thread::get_id().
  // Ids are unique within one weft::run and start again at 1 in the next.
  std::uint64_t id() const noexcept { return st_ ? st_->fiber_id() : 0; }

  // Waits for the fiber and returns its value, or rethrows its exception.
  // If the joining fiber is asked to stop while it waits, throws
  // std::system_error(operation_canceled) and the handle stays joinable.
  // A handle that is not joinable (joined, detached, moved from or
  // default-constructed) throws std::system_error(invalid_argument), and a
  // fiber joining itself std::system_error(resource_deadlock_would_occur),
  // as std::thread::join does.
  T join(std::source_location where = std::source_location::current()) {
    if (!st_)
      throw std::system_error(std::make_error_code(std::errc::invalid_argument),
                              "weft::join_handle::join: not joinable (already joined, "
                              "detached or moved from)");
    if (!st_->wait(where))
      throw std::system_error(std::make_error_code(std::errc::operation_canceled),
                              "weft::join_handle::join");
    auto* st = std::exchange(st_, nullptr);
    struct releaser {
      detail::join_state<T>* s;
      ~releaser() { s->release(); }
    } r{st};
    return st->take();
  }
  // Asks the fiber to stop: its parked operations return operation_canceled.
  void request_stop() noexcept {
    if (st_) st_->request_stop();
  }
  void detach() noexcept {
    if (auto* st = std::exchange(st_, nullptr)) st->release();
  }

 private:
  detail::join_state<T>* st_ = nullptr;
};

// Starts fn() on a new fiber. Any worker may run it (unless pinned).
template <typename F>
auto spawn(F&& fn, spawn_options opts = {})
    -> join_handle<std::invoke_result_t<std::decay_t<F>&>> {
  using R = std::invoke_result_t<std::decay_t<F>&>;
  using S = detail::spawned<std::decay_t<F>, R>;
  auto* st = new detail::join_state<R>;
  struct drop_if_thrown {  // spawn_create() may throw (no runtime any more)
    detail::join_state_base* st;
    ~drop_if_thrown() {
      if (st) st->release(), st->release();  // both references: deleted
    }
  } guard{st};
  auto [fib, slot] = detail::spawn_create(
      {opts, sizeof(S), alignof(S), &S::body, &S::discard});
  // SAFETY: slot is storage reserved for S on the new fiber's stack.
  detail::construct_or_abandon(fib, [&] { new (slot) S{std::forward<F>(fn), st}; });
  guard.st = nullptr;
  st->bind(fib);
  st->set_id(detail::spawn_start(fib));
  return join_handle<R>(st);
}

// Starts fn on a new fiber with no join handle, as Go's `go` statement:
// cheaper than spawn(fn).detach() (no join state is allocated). fn's
// result is discarded; an exception escaping it is reported on stderr, as
// for a detached fiber. Returns the fiber's id.
template <typename F>
std::uint64_t go(F&& fn, spawn_options opts = {}) {
  using S = detail::detached<std::decay_t<F>>;
  auto [fib, slot] = detail::spawn_create(
      {opts, sizeof(S), alignof(S), &S::body, &S::discard});
  // SAFETY: slot is sized and aligned for S (spawn_create).
  detail::construct_or_abandon(fib, [&] { new (slot) S{std::forward<F>(fn)}; });
  return detail::spawn_start(fib);
}

// Runs main_fn as the first fiber and returns its value (0 if void) after
// every fiber has finished. If main_fn throws, run rethrows it.
template <typename F>
int run(F&& main_fn, options opts = {}) {
  return detail::run_main(
      [&]() -> int {
        if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
          main_fn();
          return 0;
        } else {
          return static_cast<int>(main_fn());
        }
      },
      opts);
}

namespace this_fiber {
void yield(std::source_location where = std::source_location::current());
// ok at the deadline; operation_canceled if stop was requested.
result<void> sleep_until(clock::time_point t,
                         std::source_location where = std::source_location::current());
template <typename Rep, typename Period>
result<void> sleep_for(std::chrono::duration<Rep, Period> d,
                       std::source_location where = std::source_location::current()) {
  return sleep_until(detail::time_after(d), where);  // saturated: see detail::time_after
}
std::uint64_t id();          // 0 outside a fiber
std::string_view name();     // "" outside a fiber
unsigned worker_index();     // the worker running the caller now (~0u outside)
bool stop_requested();
}  // namespace this_fiber

namespace detail {
std::uint64_t fls_key();
void fls_drop_key(std::uint64_t key) noexcept;
// The calling fiber's value for key; null if it has none yet.
void* fls_value(std::uint64_t key);
// Stores the calling fiber's value for key (it has none), once constructed:
// the fiber's values are destroyed in the reverse order of these calls.
void fls_store(std::uint64_t key, void* value, void (*destroy)(void*));
}  // namespace detail

// A value per fiber: each fiber sees its own T, created on first get(),
// destroyed when the fiber exits (for a spawned fiber, before its join()
// returns, as a thread's thread_locals are before std::thread::join
// returns; for main, as it returns, before the other fibers are unwound,
// so a destructor may still hand work to them), in the reverse order of their construction, as thread_locals
// are: a value whose constructor used another fiber_local's value may still
// use it in its destructor. It follows the fiber across workers.
// A destructor may set fiber_locals again; what it sets is destroyed in
// turn, for four rounds at most, as POSIX does for pthread keys: a value
// set in the fourth round (two destructors that each set the other's
// value) is left undestroyed, and a line on stderr names the fiber.
// When the fiber_local itself goes away, each fiber's value for it is
// destroyed at that fiber's exit, or earlier, when the fiber first uses a
// fiber_local made later that took over its key (see sched/fls.h).
template <typename T>
class fiber_local {
 public:
  fiber_local() : key_(detail::fls_key()) {}
  ~fiber_local() { detail::fls_drop_key(key_); }
  fiber_local(const fiber_local&) = delete;
  fiber_local& operator=(const fiber_local&) = delete;
  T& get() {
    if (void* v = detail::fls_value(key_)) return *static_cast<T*>(v);
    // Stored once constructed, not before: the values T() makes (of other
    // fiber_locals) are then older, so destroyed after it. (T() may also
    // grow this fiber's table; fls_store() looks the slot up afresh.)
    T* p = new T();
    detail::fls_store(key_, p, &destroy);
    return *p;
  }
  T* operator->() { return &get(); }
  T& operator*() { return get(); }

 private:
  static void destroy(void* p) { delete static_cast<T*>(p); }
  std::uint64_t key_;
};

}  // namespace weft
