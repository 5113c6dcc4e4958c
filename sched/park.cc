// sched/park.cc
//
// *The park protocol* — how a fiber waits and how it is woken. Every
// blocking operation in weft goes through park() and claim()/ready().
//
//   fiber (owner)                    its worker, after the switch        a waker (any thread)
//                                    (the loop, or a hand-off target)
//   -------------                    ----------------------------        ---------------------
//   gen += 1
//   state = (gen, parking)
//   switch to the scheduler  ──────> arm the deadline timer
//                                    publish(token)  ──────────────────> finds the token
//                                    CAS parking -> parked               claim: CAS (gen, parking|parked)
//                                    if stop requested: claim                   -> (gen, woken, reason)
//                                                                        ready(f): push to a run queue
//                                    after_park_gen = gen  (last touch of f)
//   <── resumed by some worker
//   wait until after_park_gen == gen
//   reason = state.reason
//   finish the timer handshake
//   state = (gen, running)
//
// Why the switch comes first: the fiber becomes findable (publish) only
// after its stack is no longer in use, so no other worker can resume a
// fiber that is still running on its stack (Go's gopark(unlockf) does the
// same; Boost.Context's resume_with is the other way to say it).
//
// Why claim is a compare-exchange on (generation, phase): a fiber can be
// woken by several parties at once — its waiter record, its timer, a stop
// request, the unwinder. The first CAS wins; the others fail because the
// phase is no longer parking/parked or the generation has moved on. Only
// the winner makes the fiber runnable, exactly once.
//
// *Stopping a parked fiber*: request_stop() stores stop_requested_ and then
// loads state_; the scheduler stores state_ = parked and then loads
// stop_requested_. Both are seq_cst (a StoreLoad pattern): at least one of
// them sees the other and claims the fiber with `cancelled`. A stop request
// may claim only a `parked` fiber, never a `parking` one: before the
// publish step has run, a woken fiber would find no waiter record to
// remove and the publish step would then add a record pointing at a stack
// that has moved on.
//
// *Stop states* (see park.h for the waiter protocol): request_stop() sets
// the fiber's flag first, then its stop_state (if it has one), then claims
// the parked fiber, so the selects parked on its tokens are claimed for
// their stop case before the fiber itself is cancelled. (A fiber may still
// see its own flag before its state: its park's own check can run between
// the two stores. So select recognises a stop case on the caller's own
// token by identity, not by the flag; see *Stop cases* in
// runtime/select.cc.)
// The state is created lazily by the owner, which can race a request on
// another thread: the owner stores stop_state_ and then loads
// stop_requested_; request_stop() stores stop_requested_ and then loads
// stop_state_. Both seq_cst (StoreLoad): at least one sees the other, so
// a request is never lost between the fiber's flag and a new state (both
// may see each other; stop_state::request_stop() is idempotent).
#include "sched/park.h"

#include <sched.h>
#include <time.h>

#include <exception>
#include <utility>

#include "alloc/check.h"
#include "alloc/prefetch.h"
#include "sched/scheduler.h"
#include "sched/timer_heap.h"
#include "sched/worker.h"

namespace weft::sched {

thread_local worker* tls_worker = nullptr;

// SAFETY: fibers migrate between threads and compilers may cache the
// address of a thread_local across a call that switches stacks. These two
// accessors are never inlined, so every call reads the current thread's.
[[gnu::noinline]] worker* current_worker() noexcept { return tls_worker; }
[[gnu::noinline]] fiber* current_fiber() noexcept {
  worker* w = tls_worker;
  return w ? w->current() : nullptr;
}

// *The coarse clock* (park.h). libstdc++'s steady_clock is CLOCK_MONOTONIC,
// which the coarse clock shares its origin with.
clock::time_point coarse_now() noexcept {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return clock::time_point(std::chrono::duration_cast<clock::duration>(
      std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec)));
}

namespace {

clock::duration measure_coarse_lag() noexcept {
  timespec res;
  if (::clock_getres(CLOCK_MONOTONIC_COARSE, &res) != 0) return clock::duration::max();
  auto period = std::chrono::seconds(res.tv_sec) + std::chrono::nanoseconds(res.tv_nsec);
  // A tick longer than 50 ms (or none) is no kernel we know: read the
  // precise clock always.
  if (period <= std::chrono::nanoseconds::zero() || period > std::chrono::milliseconds(50))
    return clock::duration::max();
  // A running CPU's tick refreshes it every period; a vCPU the host
  // descheduled can miss ticks, and the kernel forces a refresh only after
  // about five: six periods and 1 ms (25 ms with the 4 ms tick here).
  return std::chrono::duration_cast<clock::duration>(6 * period + std::chrono::milliseconds(1));
}

}  // namespace

clock::duration coarse_lag() noexcept {
  static const clock::duration lag = measure_coarse_lag();
  return lag;
}

bool others_runnable_here() noexcept {
  worker* w = current_worker();
  return w && w->has_local_work();
}

namespace {

// unwind_point() for the running fiber f, given.
inline void unwind_point(fiber* f) {
  // seq_cst: pairs with the store in force_unwind() / start_fiber(); see
  // *Stopping a parked fiber*. An exception already unwinding this fiber's
  // stack (this is a destructor it runs; the count is the fiber's own, see
  // *Exception state* in sched/context.cc), or a body that has ended (what
  // runs is a destructor of its callable or of a fiber_local, with no
  // exception in flight): a throw would be std::terminate.
  if (f->unwinding_.load(std::memory_order_seq_cst) && std::uncaught_exceptions() == 0 &&
      !f->body_ended_)
    throw fiber_unwind{};
}

}  // namespace

void unwind_point() {
  if (fiber* f = current_fiber()) unwind_point(f);
}

wake_reason park(const park_request& req) {
  worker* w = current_worker();
  WEFT_CHECK(w && w->current(), "park: called outside a fiber");
  fiber* f = w->current();
  // No early return for a pending stop or unwind: the caller may hold a
  // lock that only the publish step releases. after_park() sees the flag
  // and wakes the fiber at once with `cancelled`.
  std::uint64_t gen = ++f->gen_;
  f->wait_what_.store(req.what, std::memory_order_relaxed);  // relaxed: diagnostic
  f->park_file_.store(req.where.file_name(), std::memory_order_relaxed);
  f->park_line_.store(req.where.line(), std::memory_order_relaxed);
  // relaxed: no one can act on this generation before the publish step,
  // which runs after the switch on the worker that stored it.
  f->state_.store(pack_state(gen, park_phase::parking, req.cancellable),
                  std::memory_order_relaxed);
  worker_counters::bump(w->counters().parks);
  w->switch_away(after_switch::park, &req);
  // Resumed, possibly on another worker. acquire: pairs with the winning
  // claim's release (what the waker wrote before its claim). Its hand-off
  // (a value, a result), written after the claim and before ready(), is
  // visible through the run queue, slot or inbox that ready() put us on
  // and the worker that took us off it resumed us from.
  std::uint64_t s = f->state_.load(std::memory_order_acquire);
  // The old worker may still be finishing after_park() on our control
  // block (a waker on another worker can claim and run us within
  // nanoseconds of publish()): wait for its last touch. Almost never spins.
  for (int i = 0; f->after_park_gen_.load(std::memory_order_acquire) != gen; ++i)
    if (i > 64) sched_yield();
  if (f->timer_) timer_heap::finish(std::exchange(f->timer_, nullptr));
  f->wait_what_.store("runnable", std::memory_order_relaxed);  // relaxed: diagnostic
  f->state_.store(pack_state(gen, park_phase::running),
                  std::memory_order_relaxed);  // relaxed: no one CASes `running`
  return reason_of(s);
}

// The post-switch half of park(), run by the next context on the worker:
// the scheduler loop, or the fiber it handed off to (see *Hand-off* in
// worker.cc).
void worker::after_park(fiber* f, const park_request& on_stack) {
  // SAFETY: the request lives on the fiber's stack. Once publish() has run,
  // a waker may resume the fiber, which then reuses that stack: copy it now.
  const park_request req = on_stack;
  std::uint64_t gen = f->gen_;
  wake_token t{f, gen};
  if (req.deadline != clock::time_point::max())
    f->timer_ = timers_.arm(req.deadline, t);
  if (req.publish) req.publish(req.arg, t);
  std::uint64_t expect = pack_state(gen, park_phase::parking, req.cancellable);
  // seq_cst: the store half of *Stopping a parked fiber*. Fails if a waker
  // already claimed it after the publish step: then it is on a run queue,
  // or about to be.
  if (!f->state_.compare_exchange_strong(
          expect, pack_state(gen, park_phase::parked, req.cancellable),
          std::memory_order_seq_cst, std::memory_order_relaxed)) {
    finish_after_park(f, gen);
    return;
  }
  bool stop = (req.cancellable && f->stop_requested_.load(std::memory_order_seq_cst)) ||
              f->unwinding_.load(std::memory_order_seq_cst);
  if (stop) wake(t, wake_reason::cancelled);
  finish_after_park(f, gen);
}

// The last touch of f by its old worker. Once a waker has claimed f (which
// can happen right after publish()), another worker may already run it; f
// must not finish and free its control block while we still read it,
// so park() waits for this store before returning.
void worker::finish_after_park(fiber* f, std::uint64_t gen) noexcept {
  f->after_park_gen_.store(gen, std::memory_order_release);  // pairs with park()'s acquire
}

fiber* claim(wake_token t, wake_reason r) noexcept {
  // relaxed: the CAS below validates the snapshot.
  std::uint64_t s = t.f->state_.load(std::memory_order_relaxed);
  for (;;) {
    park_phase p = phase_of(s);
    if (gen_of(s) != t.gen || (p != park_phase::parking && p != park_phase::parked))
      return nullptr;
    // release: publishes what the waker wrote before this claim (pairs
    // with the acquire load in park()); its hand-off, written after the
    // claim, reaches the fiber through ready() (see park()). No acquire:
    // what the waker needs of the parked fiber (its saved context) reached
    // it through the publish step's unlock and the waker's lock, or, for a
    // timer, through the heap's lock (arm() released it after the switch;
    // the firing worker took it).
    if (t.f->state_.compare_exchange_weak(
            s, pack_state(t.gen, park_phase::woken, cancellable_of(s), r),
            std::memory_order_release, std::memory_order_relaxed))
      return t.f;
  }
}

// Claims `f` only in the `parked` phase (see *Stopping a parked fiber*).
static fiber* claim_parked(fiber* f, bool only_cancellable) noexcept {
  // seq_cst: the load half of *Stopping a parked fiber*.
  std::uint64_t s = f->state_.load(std::memory_order_seq_cst);
  while (phase_of(s) == park_phase::parked &&
         (!only_cancellable || cancellable_of(s))) {
    // seq_cst on failure: the reload is the load half again.
    if (f->state_.compare_exchange_weak(
            s, pack_state(gen_of(s), park_phase::woken, cancellable_of(s),
                          wake_reason::cancelled),
            std::memory_order_seq_cst, std::memory_order_seq_cst))
      return f;
  }
  return nullptr;
}

// The store half of *Stop states* is the flag store before the call.
static void stop_tokens_of(fiber* f) noexcept {
  // seq_cst: the load half of *Stop states* (partner: the store in
  // stop_state_of_current()); also acquires the state's construction.
  if (stop_state* s = f->stop_state_.load(std::memory_order_seq_cst)) s->request_stop();
}

void request_stop(fiber* f) noexcept {
  f->stop_requested_.store(true, std::memory_order_seq_cst);
  stop_tokens_of(f);
  if (fiber* g = claim_parked(f, /*only_cancellable=*/true)) ready(g);
}

void force_unwind(fiber* f) noexcept {
  f->stop_requested_.store(true, std::memory_order_seq_cst);
  f->unwinding_.store(true, std::memory_order_seq_cst);
  stop_tokens_of(f);
  if (fiber* g = claim_parked(f, /*only_cancellable=*/false)) ready(g);
}

// --- stop states (see *Stop states* in park.h and above) ---------------------

stop_state* stop_state_of_current() {
  fiber* f = current_fiber();
  if (!f) return nullptr;
  // relaxed: only the owner (we) ever stores it.
  stop_state* s = f->stop_state_.load(std::memory_order_relaxed);
  if (!s) {
    s = new stop_state;  // refs_ = 1: the fiber's
    // seq_cst: the store half of *Stop states*; also publishes the
    // construction to request_stop()'s load.
    f->stop_state_.store(s, std::memory_order_seq_cst);
    // seq_cst: the load half (partner: request_stop()'s flag store).
    if (f->stop_requested_.load(std::memory_order_seq_cst)) s->request_stop();
  }
  s->acquire();  // the caller's
  return s;
}

stop_state* own_stop_state() noexcept {
  fiber* f = current_fiber();
  // relaxed: only the owner (we) ever stores it.
  return f ? f->stop_state_.load(std::memory_order_relaxed) : nullptr;
}

void release_stop_state(stop_state* s) noexcept { s->release(); }

void stop_state::acquire() noexcept {
  // relaxed: the caller already holds a reference, which keeps the state
  // alive; the count itself orders nothing (as std::shared_ptr).
  refs_.fetch_add(1, std::memory_order_relaxed);
}

void stop_state::release() noexcept {
  // acq_rel: the last holder sees every other holder's use before the
  // delete (release by each, acquire by the last).
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
}

bool stop_state::stop_requested() const noexcept {
  // acquire: pairs with the release store in request_stop(): what the
  // requester did before asking is visible to whoever sees the stop.
  return stopped_.load(std::memory_order_acquire);
}

void stop_state::request_stop() noexcept {
  lk_.lock();
  // relaxed: stopped_ is written only under lk_, which we hold.
  if (stopped_.load(std::memory_order_relaxed)) {
    lk_.unlock();
    return;
  }
  stopped_.store(true, std::memory_order_release);  // pairs with stop_requested()
  stop_waiter* won = nullptr;  // the claimed waiters, chained through next
  while (stop_waiter* w = head_) {
    head_ = w->next;
    if (head_) head_->prev = nullptr;
    w->linked = false;
    if (w->claim(w)) {
      w->next = won;
      won = w;
    }
  }
  lk_.unlock();
  while (won) {
    stop_waiter* next = won->next;  // read before ready(): the blocker may then free won
    won->ready(won);
    won = next;
  }
}

bool stop_state::add(stop_waiter* w) noexcept {
  lk_.lock();
  // relaxed: written only under lk_, which we hold.
  bool stopped = stopped_.load(std::memory_order_relaxed);
  if (!stopped) {
    w->prev = nullptr;
    w->next = head_;
    if (head_) head_->prev = w;
    head_ = w;
    w->linked = true;
  }
  lk_.unlock();
  return !stopped;
}

void stop_state::remove(stop_waiter* w) noexcept {
  lk_.lock();
  if (w->linked) {
    if (w->prev) w->prev->next = w->next; else head_ = w->next;
    if (w->next) w->next->prev = w->prev;
    w->linked = false;
  }
  lk_.unlock();
}

namespace {

// Starts loading the top of a woken fiber's stack: the saved registers
// its switch back pops, the frames its way up (switch_context, park, the
// operation) returns through, and the room below them where its next
// calls will push theirs. A server with thousands of connections finds
// each one's stack cold when its completion arrives, and those loads were
// its costliest stalls (perf: echo_server at C=1000, the first in
// weft_jump_context; bench/micro wake_cold, where they were a third of
// the time of a wake). Its run comes after the rest of the batch the
// worker reaped, time enough for the lines to arrive.
//
// kResumeLines lines from the saved stack pointer up, or, if that would
// pass the stack's top (the next page may be a neighbour's guard, whose
// failed translation a prefetch still pays for), the window just below
// the top. A fixed count, unrolled into that many instructions; on x86-64
// as volatile asm (alloc/prefetch.h), since GCC deleted the loop of
// __builtin_prefetch from the binary in some versions of this function.
// The smallest stack class (1 KiB, alloc/stack_pool.cc) holds the window.
//
// A hint: nothing is read through it, and a stale address only loads the
// wrong lines. fctx was written before the park's publish step, which
// ordered it before the waker's claim (see park()); TSan cannot see that
// order where a waker found the fiber through the kernel (an I/O
// completion), so its builds skip the hint.
constexpr int kResumeLines = 16;

inline void prefetch_resume(const fiber* f) noexcept {
#if !defined(WEFT_TSAN)
  if (!f->stack_hi_) return;  // never ran (not woken through here today)
  const auto* sp = static_cast<const std::byte*>(f->ctx_.fctx);
  const std::byte* top = f->stack_hi_ - 64 * kResumeLines;
  const std::byte* from = sp < top ? sp : top;
#pragma GCC unroll 16
  for (int i = 0; i < kResumeLines; ++i) alloc::prefetch_for_read(from + 64 * i);
#else
  (void)f;
#endif
}

}  // namespace

void ready(fiber* f) noexcept {
  prefetch_resume(f);
  worker* w = current_worker();
  if (!w) {
    // A plain thread, inside a plain_use for the whole hand-over (see
    // scheduler.h): once queued, f may run, exit and let the runtime end
    // while we still wake its worker (push_inbox(), submit()).
    scheduler::plain_use use;
    if (scheduler* s = use.get()) {
      if (f->home_)
        f->home_->push_inbox(f);
      else
        s->submit(f);
    }
  } else if (f->home_ && f->home_ != w) {
    f->home_->push_inbox(f);
  } else {
    // A fiber woke it: run it next (LIFO slot). The scheduler woke it
    // (timers, I/O): behind the others.
    w->schedule_local(f, /*hot=*/w->current() != nullptr);
  }
}

void spend_budget() noexcept {
  // The thread_local directly: this frame reads it once, before any switch
  // (see current_worker()); one call fewer on every channel operation.
  worker* w = tls_worker;
  if (!w || !w->current() || w->take_budget() || !w->coop_slice_over(clock::now())) return;
  // No unwind_point(): see park.h. A yield that stays in place (nothing
  // else runnable here) just starts a new budget.
  w->coop_yield();
}

void yield(std::source_location where) {
  worker* w = current_worker();
  fiber* f = w ? w->current() : nullptr;
  WEFT_CHECK(f, "yield: called outside a fiber");
  unwind_point(f);
  w->yield_current(where);
}

void yield_in_cleanup(std::source_location where) noexcept {
  worker* w = current_worker();
  WEFT_CHECK(w && w->current(), "yield: called outside a fiber");
  w->yield_current(where);
}

}  // namespace weft::sched
