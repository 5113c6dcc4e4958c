// runtime/select.cc — weft::select.
//
// *How a select waits* (Go's selectgo, with the park protocol's claim in
// place of selectDone):
//   1. Lock every channel involved, in address order (each once), so two
//      selects over the same channels cannot deadlock on their locks.
//   2. Poll the cases in a random order; the first ready one fires: it is
//      completed under the locks, exactly as a non-blocking send/recv.
//   3. Nothing ready, with a default case: fire the default.
//   4. Otherwise link one waiter record per channel case and one stop
//      record per stop case with a token (all sharing one parker), and
//      park once; the publish step links them, then unlocks the channels.
//      The earliest after() case is the park's deadline. The first waker
//      to claim the parker wins and records its case in parker::chosen;
//      every later claim fails, so exactly one case fires.
//   5. After waking, lock the channels again and unlink the records that
//      are still linked; take the stop records out of their states. The
//      channel whose waker fired the select is left alone when no record
//      of ours can be left there: that waker may already have destroyed
//      it, as it may after waking a parked recv.
//
// *Stop cases*: a stop case watches the stop_state of its token's fiber
// (see *Stop states* in sched/park.h), not the caller. Its record is a
// sched::stop_waiter whose claim hook claims the parker for the case;
// request_stop() on that fiber runs it under the state's lock. A token
// already stopped when the publish step links the record (the stop came
// between step 2 and the park) is claimed by the publish step itself, so
// no stop goes unseen. The caller's own stop request is separate: it
// cancels the park like any other, and then fires a stop case on the
// caller's own token if there is one, else returns kSelectCancelled.
//
// Invariants:
//   - A record's payload (slot, closed) is written only by the claimer
//     that won, under the lock of the record's channel.
//   - parker::chosen is written only by the claimer that won, under the
//     lock of the list (channel or stop state) that held its record.
//   - A send case's *sent is written only by the selecting caller: in
//     step 2 from the case's status, or after waking from the fired
//     record's closed flag (close() sets it; a receiver that took the
//     value does not).
#include <algorithm>
#include <new>
#include <type_traits>

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
select_case make_send_case(chan_core* c, void* v, bool* sent) {
  return {.kind = case_kind::send, .ch = c, .slot = v, .sent = sent};
}

// A stop case's record in its token's stop state (see *Stop cases*).
// Lives in park_on_cases()'s frame, like the channel records.
struct stop_rec : sched::stop_waiter {
  parker* p = nullptr;
  int case_index = -1;
  wake_ticket won{};  // set by claim_stop() when its claim wins
};

namespace {

// One case's record in park_on_cases()'s frame: a waiter for a channel
// case, a stop_rec for a stop case, neither for the others (a case is
// never both, so they share the room: a parked select's records cost the
// larger of the two per case, not their sum).
union case_rec {
  waiter w;
  stop_rec s;
  case_rec() noexcept {}  // make_records() builds the member the case uses
};
static_assert(std::is_trivially_destructible_v<waiter> &&
              std::is_trivially_destructible_v<stop_rec>,
              "case_rec: records are left without a destructor call");

// Bounds the cases of one select. Its bookkeeping (the lock and order
// arrays, the records) is sized by the cases it has, not by this bound:
// a select of two or three cases must park within what README's
// small-stack option (kSmallStack, 2 KiB) leaves to a timeout fiber.
// With both arrays sized for 32 cases, select_impl's frame was 560 bytes
// (of a parked two-case select's ~1.6 KiB below its caller), and a
// task_group child on kSmallStack selecting on a channel and a timer
// overflowed its stack (ATimeoutFiberOnTheSmallStackFitsInATaskGroup).
constexpr std::size_t kMaxCases = kSelectMaxCases;

bool is_chan(const select_case& c) {
  return c.kind == case_kind::recv || c.kind == case_kind::send;
}
bool watches_stop(const select_case& c) { return c.kind == case_kind::stop && c.stop; }

// The stop_waiter hooks (the claim hook runs under the state's lock).
bool claim_stop(sched::stop_waiter* w) noexcept {
  auto* r = static_cast<stop_rec*>(w);
  r->won = r->p->claim(wake_reason::notified);
  if (!r->won) return false;  // another case, the timer or a cancel won
  r->p->chosen = r->case_index;
  return true;
}
void ready_stop(sched::stop_waiter* w) noexcept {
  ready(static_cast<stop_rec*>(w)->won);  // copies the ticket: the record may go now
}

// The distinct channels of a select, in lock order, in storage the caller
// provides (room for one per case: select_impl's alloca).
struct lock_set {
  chan_core** ch;
  std::size_t n = 0;

  lock_set(chan_core** storage, const select_case* cs, std::size_t ncases) : ch(storage) {
    for (std::size_t i = 0; i < ncases; ++i)
      if (is_chan(cs[i])) ch[n++] = cs[i].ch;
    std::sort(ch, ch + n);
    n = static_cast<std::size_t>(std::unique(ch, ch + n) - ch);
  }
  // Every channel but `skip` (null: every one), in address order.
  void lock(const chan_core* skip = nullptr) const {
    for (std::size_t i = 0; i < n; ++i)
      if (ch[i] != skip) chan_access::lock(ch[i]).lock();
  }
  void unlock(const chan_core* skip = nullptr) const {
    for (std::size_t i = n; i-- > 0;)
      if (ch[i] != skip) chan_access::lock(ch[i]).unlock();
  }
};

// Step 2: with the locks held, fires the first ready case in a random
// order; returns its index or -1. Not inlined: its order array then
// leaves the stack before a select parks, instead of staying in
// select_impl's frame under the park.
[[gnu::noinline]] int poll_cases(const select_case* cs, std::size_t n, wake_ticket& t) {
  // SAFETY: n <= kMaxCases ints (checked by select_impl), freed on return.
  auto* order = static_cast<int*>(__builtin_alloca(n * sizeof(int)));
  for (std::size_t i = 0; i < n; ++i) order[i] = static_cast<int>(i);
  for (std::size_t i = n; i > 1; --i)  // Fisher-Yates
    std::swap(order[i - 1], order[fast_random() % i]);
  clock::time_point now{};
  for (std::size_t k = 0; k < n; ++k) {
    const select_case& c = cs[order[k]];
    bool fired = false;
    switch (c.kind) {
      case case_kind::recv:
      case case_kind::send: {
        chan_status s = chan_access::try_case(c, t);
        fired = s != chan_status::would_block;
        if (fired && c.sent) *c.sent = s == chan_status::ok;  // a send case's outcome
        break;
      }
      case case_kind::after:
        if (now == clock::time_point{}) now = clock::now();
        fired = c.when <= now;
        break;
      case case_kind::stop: fired = c.stop && c.stop->stop_requested(); break;
      case case_kind::dflt: break;
    }
    if (fired) return order[k];
  }
  return -1;
}

struct park_ctx {
  const select_case* cs;
  std::size_t n;
  case_rec* recs;
  const lock_set* locks;
};

// The publish step of step 4: link every record, then drop the locks. A
// stop record whose token is already stopped is not linked: the select
// claims itself for that case (and the claim loses if a channel waker,
// free to act once the records are linked, was faster).
void publish_records(void* a) {
  auto* c = static_cast<park_ctx*>(a);
  wake_ticket self;
  for (std::size_t i = 0; i < c->n; ++i) {
    const select_case& sc = c->cs[i];
    if (is_chan(sc)) push_back(chan_access::queue(sc.ch, sc.kind), &c->recs[i].w);
    if (watches_stop(sc) && !sc.stop->add(&c->recs[i].s) && !self &&
        claim_stop(&c->recs[i].s))
      self = c->recs[i].s.won;
  }
  c->locks->unlock();
  ready(self);  // no-op when empty
}

int find_kind(const select_case* cs, std::size_t n, case_kind k) {
  for (std::size_t i = 0; i < n; ++i)
    if (cs[i].kind == k) return static_cast<int>(i);
  return -1;
}

// After a cancelled park: the stop case that fires instead of
// kSelectCancelled — one on the caller's own token, or one whose token is
// stopped anyway; -1 if none.
int stop_case_after_cancel(const select_case* cs, std::size_t n) {
  sched::stop_state* own = sched::own_stop_state();
  for (std::size_t i = 0; i < n; ++i)
    if (watches_stop(cs[i]) && (cs[i].stop == own || cs[i].stop->stop_requested()))
      return static_cast<int>(i);
  return -1;
}

// Builds the records of step 4 in caller-provided storage; returns the
// index of the earliest after() case, or -1.
int make_records(const select_case* cs, std::size_t n, parker& p, case_rec* recs) {
  int earliest = -1;
  for (std::size_t i = 0; i < n; ++i) {
    if (is_chan(cs[i])) {
      ::new (&recs[i].w) waiter{.p = &p, .slot = cs[i].slot, .deliver = cs[i].deliver,
                                .case_index = static_cast<int>(i)};
    } else if (watches_stop(cs[i])) {
      stop_rec* r = ::new (&recs[i].s) stop_rec{};
      r->claim = &claim_stop;
      r->ready = &ready_stop;
      r->p = &p;
      r->case_index = static_cast<int>(i);
    }
    if (cs[i].kind == case_kind::after && (earliest < 0 || cs[i].when < cs[earliest].when))
      earliest = static_cast<int>(i);
  }
  return earliest;
}

// The channel whose waker woke the select and left no record of it there
// (null if none): the waker unlinked the fired record before claiming it
// (pop_claimed), and close() empties both queues before it wakes anyone;
// a second case on the same channel may still be linked otherwise. The
// select must not touch that channel again: as after a parked recv, its
// waker may destroy it once its own call has returned (a rendezvous send
// that a select took, then a delete of the reply channel).
const chan_core* channel_done_with(const select_case* cs, std::size_t n, wake_reason r,
                                   int chosen, const case_rec* recs) {
  if (r != wake_reason::notified || !is_chan(cs[chosen])) return nullptr;
  const chan_core* c = cs[chosen].ch;
  if (recs[chosen].w.closed) return c;
  for (std::size_t i = 0; i < n; ++i)
    if (static_cast<int>(i) != chosen && is_chan(cs[i]) && cs[i].ch == c) return nullptr;
  return c;
}

// Step 5: unlinks every record that is still linked somewhere, without
// touching `done` (see channel_done_with()).
void retract_records(const select_case* cs, std::size_t n, const lock_set& locks,
                     case_rec* recs, const chan_core* done) {
  locks.lock(done);
  for (std::size_t i = 0; i < n; ++i)
    if (is_chan(cs[i]) && cs[i].ch != done)
      unlink(chan_access::queue(cs[i].ch, cs[i].kind), &recs[i].w);
  locks.unlock(done);
  for (std::size_t i = 0; i < n; ++i)
    if (watches_stop(cs[i])) cs[i].stop->remove(&recs[i].s);
}

// Steps 4 and 5, entered with the locks held.
int park_on_cases(const select_case* cs, std::size_t n, const lock_set& locks,
                  const std::source_location& where) {
  // SAFETY: alloca'd storage for n records (one per case), freed when this
  // frame returns, which is after every record was unlinked (step 5).
  auto* recs = static_cast<case_rec*>(__builtin_alloca(n * sizeof(case_rec)));
  parker p;
  int earliest = make_records(cs, n, p, recs);
  park_ctx ctx{cs, n, recs, &locks};
  wake_reason r = p.block(&publish_records, &ctx,
                          {.deadline = earliest >= 0 ? cs[earliest].when
                                                     : clock::time_point::max(),
                           .what = "select",
                           .where = where});
  retract_records(cs, n, locks, recs, channel_done_with(cs, n, r, p.chosen, recs));
  switch (r) {
    case wake_reason::notified:
      // A stop case that fired while the runtime unwinds this fiber ends
      // in fiber_unwind, as a cancelled park does.
      if (cs[p.chosen].kind == case_kind::stop) sched::unwind_point();
      // A send case's waker either took the value or was close().
      if (cs[p.chosen].sent) *cs[p.chosen].sent = !recs[p.chosen].w.closed;
      return p.chosen;
    case wake_reason::timed_out: return earliest;
    case wake_reason::cancelled: break;
  }
  sched::unwind_point();
  return stop_case_after_cancel(cs, n);  // -1 is kSelectCancelled
}

}  // namespace

int select_impl(select_case* cs, std::size_t n, const std::source_location& where) {
  WEFT_CHECK(n <= kMaxCases, "weft::select: more than 32 cases");
  note_plain_user();  // as a channel operation does (runtime/wait_list.h)
  // SAFETY: room for one channel per case (n <= kMaxCases, checked above),
  // freed when this frame returns, after the last use of `locks`.
  lock_set locks(static_cast<chan_core**>(__builtin_alloca(n * sizeof(chan_core*))), cs, n);
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

stop_token::stop_token(const stop_token& o) noexcept : state_(o.state_) {
  if (state_) state_->acquire();
}

stop_token::~stop_token() {
  if (state_) state_->release();
}

bool stop_token::stop_requested() const noexcept {
  return state_ && state_->stop_requested();  // acquire inside; see park.cc
}

namespace this_fiber {
weft::stop_token stop_token() { return weft::stop_token(sched::stop_state_of_current()); }
}  // namespace this_fiber

}  // namespace weft
