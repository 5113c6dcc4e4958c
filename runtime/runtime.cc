// runtime/runtime.cc — weft::run, spawn, this_fiber and stats: the public
// API over sched/ (and, through the driver factory, io/).
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <system_error>

#include "alloc/check.h"
#include "alloc/env.h"
#include "runtime/driver_select.h"
#include "runtime/quit_dump.h"
#include "runtime/weft.h"
#include "sched/fls.h"
#include "sched/park.h"
#include "sched/scheduler.h"
#include "sched/worker.h"

namespace weft {
namespace {

sched::scheduler& the_scheduler() {
  sched::scheduler* s = sched::scheduler::instance();
  WEFT_CHECK(s, "weft: called outside weft::run (no runtime is running)");
  return *s;
}

unsigned workers_from_env(unsigned dflt) {
  const char* e = std::getenv("WEFT_WORKERS");
  if (!e || !*e) return dflt;
  unsigned long long n = 0;
  if (!alloc::parse_decimal(e, 4096, n) || n == 0) {
    std::fprintf(stderr, "weft: ignoring WEFT_WORKERS=%s (want 1..4096)\n", e);
    return dflt;
  }
  return static_cast<unsigned>(n);
}

}  // namespace

namespace detail {

clock::time_point far_time_after(clock::duration d) noexcept {
  const clock::duration lag = sched::coarse_lag();
  if (lag == clock::duration::max() || d < 100 * lag) return clock::time_point::min();
  return sched::coarse_now() + lag + d;
}

int run_main(std::function<int()> main_fn, const options& opts) {
  sched::scheduler_options so;
  so.workers = workers_from_env(opts.workers);
  so.pin = opts.pin;
  // 0 is the default, as spawn_options' 0 and workers' 0 are (not a size:
  // the smallest class, 1 KiB without a guard page).
  so.default_stack = opts.stack_size ? opts.stack_size : options{}.stack_size;
  so.deadlock_detection = opts.deadlock_detection;
  so.hog_warning = opts.hog_warning;
  so.make_driver = runtime_driver_factory(sched::worker_node_os(so));
  sched::scheduler s(std::move(so));
  quit_dumper quit;  // before the workers start, so a SIGQUIT is dumped from their first moment
  s.start();
  int rc = 0;
  std::exception_ptr failure;
  auto h = spawn(
      [&] {
        try {
          rc = main_fn();
        } catch (...) {
          failure = std::current_exception();
        }
        // main's fiber_local values go as main returns, while the other
        // fibers still run (as the main thread's thread_locals do), so
        // their destructors may still use them (flush to a logger fiber,
        // join a fiber). After unwind_all() a park of theirs that another
        // fiber would have ended waited for ever (main itself is not
        // unwound), and a join threw operation_canceled.
        destroy_fiber_locals();
        s.unwind_all();  // main is done: every other fiber unwinds
      },
      {.name = "main"});
  h.detach();
  // This thread only waits for the runtime to end: not a waker (the spawn
  // above counted it as one).
  sched::forget_plain_thread();
  s.join();
  if (failure) std::rethrow_exception(failure);
  return rc;
}

[[noreturn]] void throw_shut_down() {
  throw std::system_error(std::make_error_code(std::errc::operation_canceled),
                          "weft::spawn: no runtime is running (main returned)");
}

// fn(scheduler&). A plain thread brackets its use of the scheduler
// (scheduler::plain_use): the runtime may be ending meanwhile, and its
// destructor waits for the bracket instead of freeing what fn touches. A
// plain thread cannot know when the runtime ends, so finding none is an
// error it can handle, not a crash. Workers need no bracket (and pay for
// none).
// kStop: finding none is the usual "called outside weft::run" stop
// instead (the calls that need a running runtime: stats, dump).
enum class if_none { kThrow, kStop };
template <if_none kNone = if_none::kThrow, typename F>
decltype(auto) with_scheduler(F&& fn) {
  if (sched::current_worker()) return fn(the_scheduler());
  sched::scheduler::plain_use use;
  if constexpr (kNone == if_none::kThrow) {
    if (!use.get()) throw_shut_down();
  } else {
    WEFT_CHECK(use.get(), "weft: called outside weft::run (no runtime is running)");
  }
  return fn(*use.get());
}

std::pair<void*, void*> spawn_create(const spawn_request& r) {
  // A plain thread that spawns may spawn again, so it counts as a possible
  // waker for the deadlock detector from now on, as one that uses a
  // channel does (sched::note_plain_thread()). Before the fiber exists, so
  // that no moment between two spawns goes uncounted. (run_main() drops
  // the one its spawn of main takes.)
  if (!sched::current_worker()) sched::note_plain_thread();
  WEFT_CHECK(r.opts.worker >= -1,
             "spawn: spawn_options::worker is negative (-1: the spawning worker; 0 and up: a "
             "worker index)");
  sched::fiber* f = with_scheduler([&](sched::scheduler& s) {
    return s.create({.name = r.opts.name,
                     .stack_size = r.opts.stack_size,
                     .pinned = r.opts.pinned,
                     .worker = r.opts.worker},
                    r.size, r.align);
  });
  if (!f) throw_shut_down();
  f->body_ = r.body;
  f->discard_ = r.discard;
  return {f, f->callable_};
}

void spawn_abandon(void* fib) noexcept {
  auto* f = static_cast<sched::fiber*>(fib);
  // The runtime is still up: f, created and not yet started, keeps it.
  with_scheduler([f](sched::scheduler& s) { s.abandon(f); });
}

std::uint64_t spawn_start(void* fib) {
  auto* f = static_cast<sched::fiber*>(fib);
  std::uint64_t id = f->id_;  // read before start: f may run and exit at once
  // The runtime is still up: f, created and not yet started, keeps it.
  with_scheduler([f](sched::scheduler& s) { s.start_fiber(f); });
  // A spawn spends the coop budget (sched/park.h), as a channel operation
  // that completed at once does: a fiber spawning in a loop (a million
  // fibers, an acceptor's handlers) lets the ones it spawned run on its
  // worker now and then, where Go would preempt it, instead of holding the
  // worker until it parks (the hog report, at 500 ms).
  sched::spend_budget();
  return id;
}

bool current_fiber_unwinding() noexcept {
  sched::fiber* f = sched::current_fiber();
  // seq_cst: pairs with force_unwind()'s store.
  return f && f->unwinding_.load(std::memory_order_seq_cst);
}

bool current_fiber_unwinding_in_cleanup() noexcept {
  sched::fiber* f = sched::current_fiber();
  // seq_cst: as above. uncaught_exceptions() counts this fiber's own (see
  // *Exception state* in sched/context.cc).
  return f && f->unwinding_.load(std::memory_order_seq_cst) &&
         (std::uncaught_exceptions() > 0 || f->body_ended_);
}

void end_body() noexcept {
  if (sched::fiber* f = sched::current_fiber()) f->body_ended_ = true;  // owner only
}

std::uint64_t current_fiber_id() noexcept {
  sched::fiber* f = sched::current_fiber();
  return f ? f->id_ : 0;
}

void warn_unobserved(std::uint64_t id, std::exception_ptr e) noexcept {
  const char* what = "unknown exception";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    what = ex.what();
    std::fprintf(stderr, "weft: fiber %llu ended with an exception nobody joined: %s\n",
                 static_cast<unsigned long long>(id), what);
    return;
  } catch (...) {
  }
  std::fprintf(stderr, "weft: fiber %llu ended with an exception nobody joined: %s\n",
               static_cast<unsigned long long>(id), what);
}

void destroy_fiber_locals() noexcept {
  if (sched::fiber* f = sched::current_fiber()) sched::fls_destroy_all(f);
}

std::uint64_t fls_key() { return sched::fls_new_key(); }
void fls_drop_key(std::uint64_t key) noexcept { sched::fls_free_key(key); }

void* fls_value(std::uint64_t key) { return sched::fls_get(key).value; }
void fls_store(std::uint64_t key, void* value, void (*destroy)(void*)) {
  sched::fls_put(key, value, destroy);
}

}  // namespace detail

namespace this_fiber {

void yield(std::source_location where) { sched::yield(where); }

result<void> sleep_until(clock::time_point t, std::source_location where) {
  // Said here, by name: park()'s own check would blame "park".
  WEFT_CHECK(sched::current_fiber(),
             "weft::this_fiber::sleep_for/sleep_until: called outside a fiber (a plain "
             "thread sleeps with std::this_thread::sleep_for)");
  // A time already here (sleep_for(0), a deadline computed late): a
  // yield, as Go's Sleep(0) returns at once. Parked on a timer it waited
  // for the worker's next pass over its timers (~1 µs, not ~30 ns).
  if (t <= clock::now()) {
    // An unwind point first, as the park's cancelled return is: the
    // unwinder requests stop too, so the check below alone returned
    // operation_canceled to a fiber the runtime unwinds at exit, and a
    // loop that ignored it spun on while weft::run waited for it.
    sched::unwind_point();
    if (stop_requested()) return make_error(std::errc::operation_canceled);  // as a park's
    sched::yield(where);
    return {};
  }
  sched::wake_reason r = sched::park({.deadline = t, .what = "sleep", .where = where});
  if (r == sched::wake_reason::cancelled) {
    sched::unwind_point();
    return make_error(std::errc::operation_canceled);
  }
  return {};
}

std::uint64_t id() {
  sched::fiber* f = sched::current_fiber();
  return f ? f->id_ : 0;
}

std::string_view name() {
  sched::fiber* f = sched::current_fiber();
  return f ? std::string_view(f->name_) : std::string_view();
}

unsigned worker_index() {
  sched::worker* w = sched::current_worker();
  return w ? w->index() : ~0u;
}

bool stop_requested() {
  sched::fiber* f = sched::current_fiber();
  // seq_cst: pairs with request_stop()'s store.
  return f && f->stop_requested_.load(std::memory_order_seq_cst);
}

}  // namespace this_fiber

// stats(), dump() and worker_count() may come from a plain thread while a
// run ends: held by the bracket, as spawn's (with_scheduler).
runtime_stats stats() {
  sched::scheduler_stats s =
      detail::with_scheduler<detail::if_none::kStop>([](sched::scheduler& sc) { return sc.stats(); });
  runtime_stats r;
  for (std::size_t i = 0; i < s.fibers_run.size(); ++i)
    r.workers.push_back({s.fibers_run[i], s.steals[i], s.overflowed[i]});
  r.spawned = s.spawned;
  r.parks = s.parks;
  r.yields = s.yields;
  r.sleeps = s.sleeps;
  r.wakeups = s.wakeups;
  r.lifo_runs = s.lifo_runs;
  r.inject_pops = s.inject_pops;
  r.timer_steals = s.timer_steals;
  r.live_fibers = s.live_fibers;
  r.stacks_live = s.stacks.live;
  r.stacks_cached = s.stacks.cached;
  r.stack_bytes_reserved = s.stacks.reserved_bytes;
  r.stacks_returned_to_os = s.stacks.returned_to_os;
  r.stack_guard = alloc::to_string(s.stacks.guard);
  return r;
}

void dump() {
  detail::with_scheduler<detail::if_none::kStop>([](sched::scheduler& s) { s.dump(2); });
}

unsigned worker_count() {
  return detail::with_scheduler<detail::if_none::kStop>([](sched::scheduler& s) { return s.worker_count(); });
}

result<void> unpin_this_thread() {
  // On a worker (a fiber called it) this would unpin the worker itself, for
  // good, not a thread the fiber is about to start.
  if (sched::current_worker())
    return std::unexpected(std::make_error_code(std::errc::operation_not_permitted));
  cpu_set_t cpus;
  if (!sched::unpinned_cpus(&cpus))
    return std::unexpected(std::make_error_code(std::errc::operation_not_permitted));
  if (int rc = pthread_setaffinity_np(pthread_self(), sizeof cpus, &cpus); rc != 0)
    return std::unexpected(std::error_code(rc, std::system_category()));
  return {};
}

}  // namespace weft
