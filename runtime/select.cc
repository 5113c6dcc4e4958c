// runtime/select.cc — weft::select.
//
// *How a select waits* (Go's selectgo, with the park protocol's claim in
// place of selectDone):
//   1. Lock every channel involved, in address order (each once), so two
//      selects over the same channels cannot deadlock on their locks.
//   2. Poll the cases in a random order; the first ready one fires: it is
//      completed under the locks, exactly as a non-blocking send/recv.
//   3. Nothing ready, with a default case: fire the default.
//   4. Otherwise link one waiter record per channel case (all sharing one
//      parker), and park once; the publish step unlocks the channels. The
//      earliest after() case is the park's deadline. The first waker to
//      claim the parker wins and records its case in parker::chosen; every
//      later claim fails, so exactly one case fires.
//   5. After waking, lock the channels again and unlink the records that
//      are still linked.
//
// Invariant: a record's payload (slot, closed) is written only by the
// claimer that won, under the lock of the record's channel.
#include <algorithm>
#include <array>
#include <new>

#include "alloc/check.h"
#include "runtime/channel.h"
#include "runtime/waiter.h"

namespace weft {
namespace detail {

struct chan_access {
  static short_lock& lock(chan_core* c) { return c->lk_; }
  static wait_list& queue(chan_core* c, case_kind k) {
    return k == case_kind::recv ? c->recvq_ : c->sendq_;
  }
  static chan_status try_case(const select_case& sc, wake_ticket& t) {
    if (sc.kind == case_kind::recv) return sc.ch->try_recv_locked(sc.slot, sc.deliver, t);
    return sc.ch->try_send_locked(sc.slot, t);
  }
};

select_case make_recv_case(chan_core* c, void* out, void (*deliver)(void*, void*)) {
  return {.kind = case_kind::recv, .ch = c, .slot = out, .deliver = deliver};
}
select_case make_send_case(chan_core* c, void* v) {
  return {.kind = case_kind::send, .ch = c, .slot = v};
}

namespace {

// Bounds the stack a select uses for its bookkeeping (order and lock
// arrays); the waiter records take n * sizeof(waiter) more.
constexpr std::size_t kMaxCases = 32;

bool is_chan(const select_case& c) {
  return c.kind == case_kind::recv || c.kind == case_kind::send;
}

// The distinct channels of a select, in lock order.
struct lock_set {
  std::array<chan_core*, kMaxCases> ch{};
  std::size_t n = 0;

  lock_set(const select_case* cs, std::size_t ncases) {
    for (std::size_t i = 0; i < ncases; ++i)
      if (is_chan(cs[i])) ch[n++] = cs[i].ch;
    std::sort(ch.begin(), ch.begin() + n);
    n = static_cast<std::size_t>(std::unique(ch.begin(), ch.begin() + n) - ch.begin());
  }
  void lock() const {
    for (std::size_t i = 0; i < n; ++i) chan_access::lock(ch[i]).lock();
  }
  void unlock() const {
    for (std::size_t i = n; i-- > 0;) chan_access::lock(ch[i]).unlock();
  }
};

// Step 2: with the locks held, fires the first ready case in a random
// order; returns its index or -1.
int poll_cases(const select_case* cs, std::size_t n, wake_ticket& t) {
  std::array<int, kMaxCases> order;
  for (std::size_t i = 0; i < n; ++i) order[i] = static_cast<int>(i);
  for (std::size_t i = n; i > 1; --i)  // Fisher-Yates
    std::swap(order[i - 1], order[fast_random() % i]);
  clock::time_point now{};
  for (std::size_t k = 0; k < n; ++k) {
    const select_case& c = cs[order[k]];
    bool fired = false;
    switch (c.kind) {
      case case_kind::recv:
      case case_kind::send:
        fired = chan_access::try_case(c, t) != chan_status::would_block;
        break;
      case case_kind::after:
        if (now == clock::time_point{}) now = clock::now();
        fired = c.when <= now;
        break;
      case case_kind::stop: fired = this_fiber::stop_requested(); break;
      case case_kind::dflt: break;
    }
    if (fired) return order[k];
  }
  return -1;
}

struct park_ctx {
  const select_case* cs;
  std::size_t n;
  waiter* recs;
  const lock_set* locks;
};

// The publish step of step 4: link every record, then drop the locks.
void publish_records(void* a) {
  auto* c = static_cast<park_ctx*>(a);
  for (std::size_t i = 0; i < c->n; ++i)
    if (is_chan(c->cs[i]))
      push_back(chan_access::queue(c->cs[i].ch, c->cs[i].kind), &c->recs[i]);
  c->locks->unlock();
}

int find_kind(const select_case* cs, std::size_t n, case_kind k) {
  for (std::size_t i = 0; i < n; ++i)
    if (cs[i].kind == k) return static_cast<int>(i);
  return -1;
}

// Steps 4 and 5, entered with the locks held.
int park_on_cases(const select_case* cs, std::size_t n, const lock_set& locks,
                  const std::source_location& where) {
  // SAFETY: alloca'd storage for n records, freed when this frame returns,
  // which is after every record was unlinked (step 5).
  auto* recs = static_cast<waiter*>(__builtin_alloca(n * sizeof(waiter)));
  parker p;
  int earliest = -1;
  for (std::size_t i = 0; i < n; ++i) {
    ::new (&recs[i]) waiter{.p = &p, .slot = cs[i].slot, .deliver = cs[i].deliver,
                     .case_index = static_cast<int>(i)};
    if (cs[i].kind == case_kind::after && (earliest < 0 || cs[i].when < cs[earliest].when))
      earliest = static_cast<int>(i);
  }
  park_ctx ctx{cs, n, recs, &locks};
  wake_reason r = p.block(&publish_records, &ctx,
                          {.deadline = earliest >= 0 ? cs[earliest].when
                                                     : clock::time_point::max(),
                           .what = "select",
                           .where = where});
  locks.lock();
  for (std::size_t i = 0; i < n; ++i)
    if (is_chan(cs[i])) unlink(chan_access::queue(cs[i].ch, cs[i].kind), &recs[i]);
  locks.unlock();
  switch (r) {
    case wake_reason::notified: return p.chosen;
    case wake_reason::timed_out: return earliest;
    case wake_reason::cancelled: break;
  }
  sched::unwind_point();
  return find_kind(cs, n, case_kind::stop);  // -1 (kSelectCancelled) if none
}

}  // namespace

int select_impl(select_case* cs, std::size_t n, const std::source_location& where) {
  WEFT_CHECK(n <= kMaxCases, "weft::select: more than 32 cases");
  lock_set locks(cs, n);
  locks.lock();
  wake_ticket t;
  int fired = poll_cases(cs, n, t);
  if (fired >= 0) {
    locks.unlock();
    ready(t);
    sched::spend_budget();  // a ready case: completed without parking
    return fired;
  }
  fired = find_kind(cs, n, case_kind::dflt);
  if (fired >= 0) {
    locks.unlock();
    return fired;  // t is empty: no case fired
  }
  return park_on_cases(cs, n, locks, where);
}

}  // namespace detail

bool stop_token::stop_requested() const noexcept {
  auto* f = static_cast<sched::fiber*>(fiber_);
  // seq_cst: pairs with request_stop()'s store (see park.cc).
  return f && f->stop_requested_.load(std::memory_order_seq_cst);
}

namespace this_fiber {
weft::stop_token stop_token() noexcept { return weft::stop_token(sched::current_fiber()); }
}  // namespace this_fiber

}  // namespace weft
