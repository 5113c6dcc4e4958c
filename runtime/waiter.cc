// runtime/waiter.cc — parker, wait lists, futex and the plain-thread
// outside reference. The protocol is described in runtime/waiter.h.
#include "runtime/waiter.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>
#include <cstdint>
#include <utility>

#include "alloc/check.h"
#include "sched/scheduler.h"

namespace weft::sched {
class worker;
extern thread_local worker* tls_worker;  // defined in sched/park.cc
}  // namespace weft::sched

namespace weft::detail {

// --- short_lock -------------------------------------------------------------

void check_no_waiters(short_lock& lk, const wait_list& q, const char* msg) noexcept {
  lk.lock();
  bool idle = q.empty();
  lk.unlock();
  WEFT_CHECK(idle, msg);
}

// --- futex ------------------------------------------------------------------

void futex_wait(std::atomic<std::uint32_t>* w, std::uint32_t expect,
                wclock::time_point deadline) noexcept {
  timespec ts{};
  timespec* tsp = nullptr;
  if (deadline != wclock::time_point::max()) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                  deadline.time_since_epoch()).count();
    if (ns < 0) ns = 0;
    ts.tv_sec = ns / 1'000'000'000;
    ts.tv_nsec = ns % 1'000'000'000;
    tsp = &ts;
  }
  // steady_clock is CLOCK_MONOTONIC on Linux; FUTEX_WAIT_BITSET takes an
  // absolute timeout on it.
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(w),
            FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, expect, tsp, nullptr,
            FUTEX_BITSET_MATCH_ANY);
}

void futex_wake_all(std::atomic<std::uint32_t>* w) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(w),
            FUTEX_WAKE | FUTEX_PRIVATE_FLAG, INT_MAX, nullptr, nullptr, 0);
}

// --- plain threads ------------------------------------------------------------

void note_plain_thread() noexcept { sched::note_plain_thread(); }

// tls_worker directly (not sched::current_worker(), another call): this
// runs on every lock. Fibers run only on worker threads, whose tls_worker
// is set for their whole life; a plain thread's is null.
void note_plain_user() noexcept {
  if (!sched::tls_worker) note_plain_thread();
}

// [[gnu::noinline]]: fibers migrate; never cache this thread_local's
// address across a park (see *Concurrency comments* in CONVENTIONS.md).
[[gnu::noinline]] std::uint32_t fast_random() noexcept {
  thread_local std::uint64_t x = 0;
  if (x == 0) x = reinterpret_cast<std::uintptr_t>(&x) | 1;
  x ^= x << 13;  // xorshift64
  x ^= x >> 7;
  x ^= x << 17;
  return static_cast<std::uint32_t>(x >> 32);
}

void let_others_run() noexcept {
  if (!sched::current_fiber()) {
    sched_yield();
    return;
  }
  sched::yield_in_cleanup();
}

// --- parker -----------------------------------------------------------------

parker::parker() noexcept : self_(sched::current_fiber()) {
  if (!self_) note_plain_thread();
}

wake_reason parker::block(void (*publish)(void*), void* arg, const block_opts& o) {
  if (!self_) return block_thread(publish, arg, o);
  struct ctx {
    parker* p;
    void (*publish)(void*);
    void* arg;
  } c{this, publish, arg};
  return sched::park(
      {.publish =
           [](void* a, sched::wake_token t) {
             auto* c = static_cast<ctx*>(a);
             c->p->token_ = t;  // before publishing: wakers read it under the list lock
             c->publish(c->arg);
           },
       .arg = &c,
       .deadline = o.deadline,
       .cancellable = o.cancellable,
       .what = o.what,
       .where = o.where});
}

wake_reason parker::block_thread(void (*publish)(void*), void* arg,
                                 const block_opts& o) {
  publish(arg);
  for (;;) {
    // acquire: pairs with the release store in ready(); the payload the
    // waker wrote is visible once the word says done.
    std::uint32_t w = word_.load(std::memory_order_acquire);
    if (w >= 2) return static_cast<wake_reason>(w - 2);
    if (w == 0 && wclock::now() >= o.deadline) {
      // acquire on failure: a waker claimed it meanwhile; wait for done.
      if (word_.compare_exchange_strong(
              w, 2 + static_cast<std::uint32_t>(wake_reason::timed_out),
              std::memory_order_acq_rel, std::memory_order_acquire))
        return wake_reason::timed_out;
      continue;
    }
    futex_wait(&word_, w, w == 0 ? o.deadline : wclock::time_point::max());
  }
}

wake_ticket parker::claim(wake_reason r) noexcept {
  if (self_) return {.f = sched::claim(token_, r)};
  std::uint32_t expect = 0;
  // acq_rel: orders the claim before the payload writes that follow; pairs
  // with the thread's own timed-out CAS (only one of the two succeeds).
  if (!word_.compare_exchange_strong(expect, 1, std::memory_order_acq_rel,
                                     std::memory_order_relaxed))
    return {};
  return {.word = &word_, .final = 2 + static_cast<std::uint32_t>(r)};
}

void ready(const wake_ticket& t) noexcept {
  // Field by field, before anything is woken: `t` may sit in a record the
  // blocker frees once it runs. (By reference: a by-value ticket, 24 bytes,
  // went through memory, and the copy's 16-byte load of what the claim had
  // just stored 8 bytes at a time stalled store forwarding on every wake.)
  sched::fiber* const f = t.f;
  std::atomic<std::uint32_t>* const word = t.word;
  const std::uint32_t final = t.final;
  if (f) {
    sched::ready(f);
    return;
  }
  if (!word) return;
  // release: publishes the payload; pairs with the acquire in block_thread().
  word->store(final, std::memory_order_release);
  // SAFETY: the thread may already have seen `final` (a spurious futex
  // return) and freed the word's stack frame. FUTEX_WAKE only uses the
  // address as a key and never touches the memory; at worst it causes a
  // spurious wake of whatever waits there next, which every futex waiter
  // tolerates.
  futex_wake_all(word);
}

// --- wait lists ---------------------------------------------------------------

void push_back(wait_list& q, waiter* w) noexcept {
  WEFT_DCHECK(!w->linked, "push_back: record already linked");
  w->next = nullptr;
  w->prev = q.tail_;
  if (q.tail_) q.tail_->next = w; else q.head_ = w;
  q.tail_ = w;
  w->linked = true;
}

void push_front(wait_list& q, waiter* w) noexcept {
  WEFT_DCHECK(!w->linked, "push_front: record already linked");
  w->prev = nullptr;
  w->next = q.head_;
  if (q.head_) q.head_->prev = w; else q.tail_ = w;
  q.head_ = w;
  w->linked = true;
}

void unlink(wait_list& q, waiter* w) noexcept {
  if (!w->linked) return;
  if (w->prev) w->prev->next = w->next; else q.head_ = w->next;
  if (w->next) w->next->prev = w->prev; else q.tail_ = w->prev;
  w->prev = w->next = nullptr;
  w->linked = false;
}

waiter* pop_claimed(wait_list& q, wake_ticket& t, wake_reason r) noexcept {
  while (waiter* w = q.head_) {
    unlink(q, w);
    t = w->p->claim(r);
    if (t) return w;
  }
  return nullptr;
}

wake_batch::~wake_batch() {
  WEFT_DCHECK(head_ == nullptr, "wake_batch: claimed blockers never made runnable");
}

void wake_batch::add(waiter* w, const wake_ticket& t) noexcept {
  w->ticket = t;
  w->next = nullptr;
  if (tail_) tail_->next = w; else head_ = w;
  tail_ = w;
}

std::size_t wake_batch::claim_all(wait_list& q, wake_reason r) noexcept {
  wake_ticket t;
  std::size_t n = 0;
  for (; waiter* w = pop_claimed(q, t, r); ++n) add(w, t);
  return n;
}

void wake_batch::ready_all() noexcept {
  waiter* w = std::exchange(head_, nullptr);
  tail_ = nullptr;
  while (w) {
    // SAFETY: read the record before ready(): its blocker may return and
    // pop its frame as soon as it is runnable.
    wake_ticket t = w->ticket;
    w = w->next;
    ready(t);
  }
}

wake_reason wait_on(short_lock& lk, wait_list& q, waiter& w, parker& p,
                    const block_opts& o, bool at_front) {
  struct ctx {
    short_lock* lk;
    wait_list* q;
    waiter* w;
    bool front;
  } c{&lk, &q, &w, at_front};
  w.p = &p;
  wake_reason r = p.block(
      [](void* a) {
        auto* c = static_cast<ctx*>(a);
        if (c->front) push_front(*c->q, c->w); else push_back(*c->q, c->w);
        c->lk->unlock();
      },
      &c, o);
  if (r != wake_reason::notified) {
    lk.lock();
    unlink(q, &w);
    lk.unlock();
  }
  return r;
}

}  // namespace weft::detail
