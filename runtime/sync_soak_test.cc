// runtime/sync_soak_test.cc — a randomized soak of channels, select and the
// fiber-aware synchronization of runtime/sync.h, used by fibers and plain
// OS threads at once, with deadlines, stop requests and closes at random
// moments.
//
// Each scenario (its plan drawn from its own seed) is one of two kinds.
//
// A channel scenario: one to three channels of capacity 0, 1 or 2..5;
// one to four producers and one to three consumers, each a fiber or
// (sometimes) a plain thread. Producers send values that name them and
// their attempt (every attempt a fresh value) by send (with and without a
// deadline), try_send, or a select over several channels' on_send with
// weft::after, a stop token and sometimes select_default. Consumers take
// them by recv (both forms), try_recv or a select over on_recv likewise.
// A random party closes a random channel at a random time (a producer after
// its k-th attempt, a consumer after its k-th value, the scenario's fiber,
// or a plain thread); random fibers are asked to stop; a "quit" fiber's
// token, selected on by everyone, is stopped at a random time. At the end
// the scenario closes every channel and drains what is left (recv after
// close drains the buffer: channel.h).
//
// What must hold (channel.h's and select.h's semantics):
//   - Every value is received at most once, and only if its send reported
//     success, on the channel it was sent to; a send that reported
//     failure (timed_out, closed, would_block, canceled, a select case
//     that did not fire) is never received.
//   - Every value whose send reported success is received exactly once:
//     by a consumer or by the final drain (a receiver that gives up,
//     times out or is cancelled takes nothing).
//   - Each consumer (and the drain) sees each producer's values on a
//     channel in the order they were sent.
//   - A blocking call with a deadline returns no later than the deadline
//     plus kSlack, and timed_out only once it has passed; an `after` case
//     fires only once its time has passed. operation_canceled (a
//     cancelled select, an own stop case) only on a fiber whose stop was
//     requested, never on a thread; the quit case only once quit was
//     requested. A fiber asked to stop finishes within kSlack (its parked
//     call returns operation_canceled). Nothing else fails.
//
// A sync scenario: two to six workers (fibers, some threads) increment a
// counter under a weft::mutex (lock or try_lock), each increment inside a
// semaphore permit taken with or without a deadline; condition_variable
// waiters wait for a threshold (some unreachable) with deadlines; wait_group
// waiters wait for the workers with or without deadlines; random fibers
// are asked to stop. What must hold: the counter equals the number of
// increments the workers made; no more holders of the semaphore than its
// permits at once, and every permit is back at the end; a cv wait returns
// ok only with its predicate true, timed_out only past its deadline; a
// wait_group wait returns ok only when every worker is done; deadlines,
// cancellation and the finish of stopped fibers as above.
//
// Every fiber and thread finishes: counts are bounded and everything
// blocked is ended by the final close, a deadline or a stop. A watchdog
// aborts the process (printing the seed) if the test still runs after
// kWatchdog. WEFT_SOAK_SEED picks the base seed (printed at the start, and
// with every failure), WEFT_SOAK_SCENARIOS the count per worker count;
// scenario i's seed is base + i * 1000003, so a failing scenario (its seed
// is in the message) replays alone with WEFT_SOAK_SEED=<its seed>
// WEFT_SOAK_SCENARIOS=1. Plain threads are joined only once they say they
// are done: std::thread::join on a fiber would block its worker, which
// may be the one that must run the fibers the thread waits for.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/select.h"
#include "runtime/sync.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class SyncSoak : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(SyncSoak);

#if defined(WEFT_TSAN) || defined(WEFT_ASAN)
constexpr int kScenarios = 36;
constexpr clock::duration kSlack = 5s;
constexpr auto kWatchdog = 240s;
#else
constexpr int kScenarios = 72;
constexpr clock::duration kSlack = 2s;
constexpr auto kWatchdog = 120s;
#endif
constexpr int kLanes = 4;  // scenarios running at once
constexpr clock::time_point kNever = clock::time_point::max();

std::uint64_t env_u64(const char* name, std::uint64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : dflt;
}

std::string ms_of(clock::duration d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}

std::string err_name(std::error_code e) {
  return e.message() + " (" + e.category().name() + " " + std::to_string(e.value()) + ")";
}

// A producer, consumer, worker or waiter: a fiber (handle) or a thread.
struct party {
  std::string name;
  bool thread = false;
  std::atomic<bool> stop_requested{false};  // set before request_stop()
  std::atomic<bool> finished{false};
  join_handle<void> fiber;
  std::thread t;
  // On a fiber. A thread's join waits on the fiber's terms first: a
  // std::thread::join would block the worker, which may be running (or be
  // the only one to run) the fibers the thread waits for.
  void join() {
    if (!thread) return fiber.join();
    while (!finished.load()) (void)this_fiber::sleep_for(1ms);
    t.join();
  }
};

// The failures of one scenario, from any fiber or thread.
struct problems {
  std::string ctx;
  std::mutex m;
  std::vector<std::string> list;
  void add(std::string s) {
    std::lock_guard g(m);
    if (list.size() < 20) list.push_back(std::move(s));
  }
  void report() {
    for (auto& s : list) ADD_FAILURE() << ctx << s;
  }
};

// Outcomes over every scenario, for a line at the end (is the mix real?).
struct tally {
  std::atomic<long> sent{0}, unsent{0}, received{0}, drained{0}, timed_out{0}, cancelled{0},
      closed{0}, increments{0}, cv_ok{0};
  void reset() {
    for (auto* a : {&sent, &unsent, &received, &drained, &timed_out, &cancelled, &closed,
                    &increments, &cv_ok})
      a->store(0);
  }
  std::string line() const {
    return "sent " + std::to_string(sent) + ", unsent " + std::to_string(unsent) +
           ", received " + std::to_string(received) + ", drained " + std::to_string(drained) +
           "; timed out " + std::to_string(timed_out) + ", cancelled " +
           std::to_string(cancelled) + ", closed " + std::to_string(closed) + "; increments " +
           std::to_string(increments) + ", cv waits ok " + std::to_string(cv_ok);
  }
};
tally g_tally;

// Judges how a blocking call ended. err: its error (none: success);
// dl: its deadline (kNever: none); allowed: the errors it may return
// besides timed_out and operation_canceled, which are judged here.
void judge(problems& pr, const party& me, const char* what, clock::time_point dl,
           std::optional<std::error_code> err, std::initializer_list<std::error_code> allowed) {
  const auto now = clock::now();
  if (dl != kNever && now > dl + kSlack)
    pr.add(me.name + ": " + what + " returned " + ms_of(now - dl) + " after its deadline");
  if (!err) return;
  if (*err == chan_errc::closed) ++g_tally.closed;
  if (*err == std::errc::operation_canceled) ++g_tally.cancelled;
  if (*err == std::errc::timed_out) {
    ++g_tally.timed_out;
    if (dl == kNever) pr.add(me.name + ": " + what + " timed out without a deadline");
    else if (now < dl)
      pr.add(me.name + ": " + what + " timed out " + ms_of(dl - now) + " before its deadline");
    return;
  }
  if (*err == std::errc::operation_canceled) {
    if (me.thread) pr.add(me.name + ": " + what + " on a plain thread returned operation_canceled");
    else if (!me.stop_requested.load())
      pr.add(me.name + ": " + what + " returned operation_canceled, but no stop was requested");
    return;
  }
  for (auto& a : allowed)
    if (*err == a) return;
  pr.add(me.name + ": " + what + " failed with an unexpected error: " + err_name(*err));
}

template <typename T>
std::optional<std::error_code> error_of(const result<T>& r) {
  if (r) return std::nullopt;
  return r.error();
}

// Lets others run, on a fiber or a thread.
void relax(bool thread) {
  if (thread) std::this_thread::sleep_for(50us);
  else this_fiber::yield();
}

// A plain thread that runs fn, unpinned, counted as a thread that may wake
// fibers (outside_ref) for its whole life.
template <typename F>
std::thread plain_thread(F fn) {
  return std::thread([fn = std::move(fn), ref = outside_ref()]() mutable {
    (void)unpin_this_thread();
    fn();
  });
}

// --- channel scenarios -------------------------------------------------------

using value = std::uint64_t;  // producer << 32 | attempt
constexpr value make_value(int producer, std::uint32_t attempt) {
  return (static_cast<value>(producer) << 32) | attempt;
}

enum class closer { nobody, producer, consumer, scenario, thread, kCount };
const char* name_of(closer c) {
  static const char* const names[] = {"nobody", "a producer", "a consumer", "the scenario",
                                      "a plain thread"};
  return names[static_cast<int>(c)];
}

struct chan_plan {
  std::uint64_t seed;
  int nchan, nprod, ncons;
  std::size_t cap[3];
  bool prod_thread[4], cons_thread[3];
  std::uint32_t attempts[4];  // per producer
  closer close_by;
  int close_which;              // the channel
  std::uint32_t close_after;    // a producer's attempts, a consumer's values
  clock::duration close_at;     // the scenario's or thread's close, from the start
  clock::duration stop_at[7];   // per party (producers, then consumers); max: never
  clock::duration quit_at;      // max: never
  clock::duration end_at;       // every channel closed

  explicit chan_plan(std::uint64_t s) : seed(s) {
    std::mt19937_64 r(s);
    nchan = 1 + r() % 3;
    for (auto& c : cap) {
      const unsigned k = r() % 3;
      c = k == 0 ? 0 : k == 1 ? 1 : 2 + r() % 4;
    }
    nprod = 1 + r() % 4;
    ncons = 1 + r() % 3;
    for (auto& t : prod_thread) t = r() % 4 == 0;
    for (auto& t : cons_thread) t = r() % 4 == 0;
    for (auto& a : attempts) a = 20 + r() % 300;
    close_by = static_cast<closer>(r() % static_cast<int>(closer::kCount));
    close_which = r() % nchan;
    close_after = r() % 200;
    close_at = std::chrono::milliseconds(r() % 150);
    for (auto& st : stop_at)
      st = r() % 4 == 0 ? clock::duration(std::chrono::milliseconds(r() % 150))
                        : clock::duration::max();
    quit_at = r() % 5 == 0 ? clock::duration(std::chrono::milliseconds(r() % 150))
                           : clock::duration::max();
    end_at = std::chrono::milliseconds(60 + r() % 140);
  }
  std::string describe() const {
    std::ostringstream o;
    o << "[channel scenario seed " << seed << ": " << nchan << " channel(s) of capacity";
    for (int c = 0; c < nchan; ++c) o << " " << cap[c];
    o << ", " << nprod << " producer(s) (";
    for (int p = 0; p < nprod; ++p) o << (prod_thread[p] ? "T" : "F");
    o << "), " << ncons << " consumer(s) (";
    for (int c = 0; c < ncons; ++c) o << (cons_thread[c] ? "T" : "F");
    o << "), closed by " << name_of(close_by) << ", end at " << ms_of(end_at) << "] ";
    return o.str();
  }
};

struct attempt {
  bool ok = false;
  int chan = -1;  // the channel it went to, if ok
};

struct chan_world {
  const chan_plan& p;
  problems& pr;
  std::vector<std::unique_ptr<channel<value>>> chans;
  channel<value> never_sent{0};  // select slots of dead channels: a recv that never fires
  channel<value> never_taken{0};  //  ... and a send that never fires
  stop_token quit;
  std::atomic<bool> quit_requested{false};
  std::vector<std::unique_ptr<party>> parties;  // producers, then consumers
  std::vector<std::vector<attempt>> sent;       // per producer, per attempt
  // per consumer (and the drain last): (value, channel) in the order received
  std::vector<std::vector<std::pair<value, int>>> got;
  std::atomic<bool> closed_by_party{false};

  chan_world(const chan_plan& plan, problems& probs) : p(plan), pr(probs) {
    for (int c = 0; c < p.nchan; ++c) chans.push_back(std::make_unique<channel<value>>(p.cap[c]));
    sent.resize(p.nprod);
    got.resize(p.ncons + 1);
  }
};

// Which case of a select fired, judged; returns -1 for "stop now" (own
// stop, cancelled, quit), -2 for after/default, else the channel slot.
int judge_select(chan_world& w, const party& me, int i, clock::time_point start,
                 clock::time_point after_at, bool own_stop, bool quit_case) {
  const auto now = clock::now();
  if (after_at != kNever && now > std::max(after_at, start) + kSlack)
    w.pr.add(me.name + ": select returned " + ms_of(now - after_at) + " after its after case");
  switch (i) {
    case 0: case 1: case 2: return i;
    case 3:
      if (after_at == kNever) w.pr.add(me.name + ": a never after case fired");
      else if (now < after_at)
        w.pr.add(me.name + ": an after case fired " + ms_of(after_at - now) + " early");
      return -2;
    case 4:
      if (!own_stop || me.thread) w.pr.add(me.name + ": a null own stop case fired");
      else if (!me.stop_requested.load())
        w.pr.add(me.name + ": its own stop case fired, but no stop was requested");
      return -1;
    case 5:
      if (!quit_case) w.pr.add(me.name + ": a null quit case fired");
      else if (!w.quit_requested.load())
        w.pr.add(me.name + ": the quit case fired before quit was requested");
      return -1;
    case 6: return -2;  // default
    case kSelectCancelled:
      if (me.thread) w.pr.add(me.name + ": a select on a plain thread was cancelled");
      else if (!me.stop_requested.load())
        w.pr.add(me.name + ": select was cancelled, but no stop was requested");
      return -1;
    default: w.pr.add(me.name + ": select returned " + std::to_string(i)); return -1;
  }
}

// The optional cases of a select, drawn per call.
struct select_extras {
  clock::time_point after_at = kNever;
  bool own = false, quit = false, dflt = false;
  template <typename R>
  explicit select_extras(R& r) {
    if (r() % 3 != 0) after_at = clock::now() + std::chrono::microseconds(r() % 20000);
    own = r() % 2 == 0;
    quit = r() % 2 == 0;
    dflt = r() % 6 == 0;
  }
  template <typename... C>
  int run(const stop_token& quit_tok, C&&... cs) const {
    stop_token own_tok = own ? this_fiber::stop_token() : stop_token();
    stop_token q = quit ? quit_tok : stop_token();
    if (dflt)
      return select(std::forward<C>(cs)..., after(deadline(after_at)), own_tok, q,
                    select_default);
    return select(std::forward<C>(cs)..., after(deadline(after_at)), own_tok, q);
  }
};

void run_producer(chan_world& w, int id) {
  party& me = *w.parties[id];
  std::mt19937_64 r(w.p.seed * 0x9e3779b97f4a7c15ull + 11 + id);
  std::vector<bool> dead(w.p.nchan, false);
  auto& log = w.sent[id];
  auto live_one = [&]() -> int {
    int n = 0;
    for (int c = 0; c < w.p.nchan; ++c) n += !dead[c];
    if (n == 0) return -1;
    int k = r() % n;
    for (int c = 0; c < w.p.nchan; ++c)
      if (!dead[c] && k-- == 0) return c;
    return -1;
  };
  const std::error_code closed = chan_errc::closed;
  for (std::uint32_t a = 0; a < w.p.attempts[id]; ++a) {
    if (w.p.close_by == closer::producer && id == 0 && a == w.p.close_after) {
      w.chans[w.p.close_which]->close();
      w.closed_by_party = true;
    }
    const int c = live_one();
    if (c < 0) return;  // every channel closed
    const value v = make_value(id, a);
    log.push_back({});
    attempt& at = log.back();
    const unsigned how = r() % 10;
    std::optional<std::error_code> err;
    if (how < 3) {
      const auto dl = how == 0 ? kNever : clock::now() + std::chrono::microseconds(r() % 20000);
      err = error_of(w.chans[c]->send(v, deadline(dl)));
      judge(w.pr, me, "send", dl, err, {closed});
    } else if (how < 5) {
      err = error_of(w.chans[c]->try_send(value(v)));
      if (err && *err != closed && *err != std::errc::operation_would_block)
        w.pr.add(me.name + ": try_send failed with " + err_name(*err));
      if (err && *err == std::errc::operation_would_block) relax(me.thread);
    } else {
      value vs[3] = {v, v, v};
      bool sent[3] = {false, false, false};
      value junk = ~value(0);
      bool junk_sent = false;
      auto slot = [&](int k) {
        return k < w.p.nchan && !dead[k] ? w.chans[k]->on_send(vs[k], sent[k])
                                         : w.never_taken.on_send(junk, junk_sent);
      };
      const select_extras x(r);
      const auto start = clock::now();
      const int i = x.run(w.quit, slot(0), slot(1), slot(2));
      const int k = judge_select(w, me, i, start, x.after_at, x.own, x.quit);
      if (junk_sent) w.pr.add(me.name + ": a send on a channel nobody receives from fired");
      for (int s = 0; s < 3; ++s)
        if (sent[s] && s != i) w.pr.add(me.name + ": a send case that did not fire sent");
      if (k >= 0) {
        if (k >= w.p.nchan || dead[k]) {
          w.pr.add(me.name + ": a select case of a dead slot fired");
          return;
        }
        if (sent[k]) {
          at = {true, k};
        } else {
          dead[k] = true;  // fired because closed
          if (!w.chans[k]->closed()) w.pr.add(me.name + ": a send case fired unsent, not closed");
        }
      }
      if (k == -1) return;
      continue;
    }
    if (!err) {
      at = {true, c};
    } else if (*err == closed) {
      dead[c] = true;
    } else if (*err == std::errc::operation_canceled) {
      return;
    }
    if (r() % 8 == 0) relax(me.thread);
  }
}

void run_consumer(chan_world& w, int id) {
  party& me = *w.parties[w.p.nprod + id];
  std::mt19937_64 r(w.p.seed * 0xbf58476d1ce4e5b9ull + 23 + id);
  std::vector<bool> dead(w.p.nchan, false);
  auto& log = w.got[id];
  const std::error_code closed = chan_errc::closed;
  auto take = [&](value v, int c) {
    log.emplace_back(v, c);
    if (w.p.close_by == closer::consumer && id == 0 && log.size() == w.p.close_after) {
      w.chans[w.p.close_which]->close();
      w.closed_by_party = true;
    }
  };
  for (;;) {
    if (!me.thread && this_fiber::stop_requested()) return;
    int n = 0, c = -1;
    for (int k = 0; k < w.p.nchan; ++k) n += !dead[k];
    if (n == 0) return;  // every channel closed and drained
    for (int k = 0, pick = r() % n; k < w.p.nchan; ++k)
      if (!dead[k] && pick-- == 0) c = k;
    const unsigned how = r() % 10;
    if (how < 2) {
      std::optional<value> v = w.chans[c]->recv();
      if (v) {
        take(*v, c);
      } else if (!me.thread && me.stop_requested.load()) {
        return;  // cancelled (or closed: either way done)
      } else {
        if (!w.chans[c]->closed()) w.pr.add(me.name + ": recv() returned nothing, not closed");
        dead[c] = true;
      }
    } else if (how < 5) {
      const auto dl = how == 2 ? kNever : clock::now() + std::chrono::microseconds(r() % 20000);
      result<value> v = w.chans[c]->recv(deadline(dl));
      judge(w.pr, me, "recv", dl, error_of(v), {closed});
      if (v) take(*v, c);
      else if (v.error() == closed) dead[c] = true;
      else if (v.error() == std::errc::operation_canceled) return;
    } else if (how < 7) {
      result<value> v = w.chans[c]->try_recv();
      if (v) take(*v, c);
      else if (v.error() == closed) dead[c] = true;
      else if (v.error() == std::errc::operation_would_block) relax(me.thread);
      else w.pr.add(me.name + ": try_recv failed with " + err_name(v.error()));
    } else {
      std::optional<value> outs[3];
      std::optional<value> junk;
      auto slot = [&](int k) {
        return k < w.p.nchan && !dead[k] ? w.chans[k]->on_recv(outs[k])
                                         : w.never_sent.on_recv(junk);
      };
      const select_extras x(r);
      const auto start = clock::now();
      const int i = x.run(w.quit, slot(0), slot(1), slot(2));
      const int k = judge_select(w, me, i, start, x.after_at, x.own, x.quit);
      if (junk) w.pr.add(me.name + ": a recv on a channel nobody sends to fired");
      for (int s = 0; s < 3; ++s)
        if (outs[s] && s != i) w.pr.add(me.name + ": a recv case that did not fire received");
      if (k == -1) return;
      if (k >= 0) {
        if (k >= w.p.nchan || dead[k]) {
          w.pr.add(me.name + ": a select case of a dead slot fired");
          return;
        }
        if (outs[k]) {
          take(*outs[k], k);
        } else {
          dead[k] = true;
          if (!w.chans[k]->closed()) w.pr.add(me.name + ": a recv case fired empty, not closed");
        }
      }
    }
  }
}

void check_channel_outcome(chan_world& w) {
  // Every value received: how often, and is it one whose send succeeded,
  // on that channel? Per receiver, each producer's values on a channel in
  // order.
  std::map<value, int> times;
  for (std::size_t rcv = 0; rcv < w.got.size(); ++rcv) {
    const std::string who = rcv < w.got.size() - 1 ? "consumer " + std::to_string(rcv)
                                                   : std::string("the final drain");
    std::map<std::pair<int, int>, std::uint32_t> last;  // (producer, channel) -> attempt + 1
    for (auto [v, c] : w.got[rcv]) {
      const int prod = static_cast<int>(v >> 32);
      const std::uint32_t a = static_cast<std::uint32_t>(v);
      ++times[v];
      if (prod >= w.p.nprod || a >= w.sent[prod].size()) {
        w.pr.add(who + " received " + std::to_string(v) + ", never sent");
        continue;
      }
      const attempt& at = w.sent[prod][a];
      if (!at.ok)
        w.pr.add(who + " received producer " + std::to_string(prod) + "'s attempt " +
                 std::to_string(a) + ", whose send reported failure");
      else if (at.chan != c)
        w.pr.add(who + " received producer " + std::to_string(prod) + "'s attempt " +
                 std::to_string(a) + " on channel " + std::to_string(c) + ", sent on " +
                 std::to_string(at.chan));
      auto& l = last[{prod, c}];
      if (a + 1 <= l)
        w.pr.add(who + " received producer " + std::to_string(prod) + "'s attempt " +
                 std::to_string(a) + " after its attempt " + std::to_string(l - 1) +
                 " on channel " + std::to_string(c) + ": out of order");
      l = std::max(l, a + 1);
    }
  }
  long ok = 0, all = 0;
  for (int prod = 0; prod < w.p.nprod; ++prod)
    for (std::uint32_t a = 0; a < w.sent[prod].size(); ++a) {
      const int n = times.count(make_value(prod, a)) ? times[make_value(prod, a)] : 0;
      if (w.sent[prod][a].ok) ++ok;
      ++all;
      if (n > 1)
        w.pr.add("producer " + std::to_string(prod) + "'s attempt " + std::to_string(a) +
                 " was received " + std::to_string(n) + " times");
      else if (w.sent[prod][a].ok && n == 0)
        w.pr.add("producer " + std::to_string(prod) + "'s attempt " + std::to_string(a) +
                 " was sent (on channel " + std::to_string(w.sent[prod][a].chan) +
                 ") but never received");
    }
  g_tally.sent += ok;
  g_tally.unsent += all - ok;
  for (std::size_t rcv = 0; rcv + 1 < w.got.size(); ++rcv) g_tally.received += w.got[rcv].size();
  g_tally.drained += w.got.back().size();
}

// After the stops: a fiber asked to stop at `when` must finish by when + kSlack.
void expect_stopped_finish(problems& pr, party& pt, clock::time_point when) {
  while (!pt.finished.load() && clock::now() < when + kSlack) (void)this_fiber::sleep_for(1ms);
  if (!pt.finished.load())
    pr.add(pt.name + " was asked to stop " + ms_of(clock::now() - when) + " ago and still runs");
}

void run_channel_scenario(const chan_plan& p) {
  problems pr;
  pr.ctx = p.describe();
  chan_world w(p, pr);
  // The quit fiber: its token is a case of many selects; stopped at quit_at.
  channel<stop_token> toks(1);
  auto quitter = spawn([&] {
    (void)toks.send(this_fiber::stop_token());
    (void)this_fiber::sleep_for(1h);  // until asked to stop
  }, {.name = "soak quit"});
  w.quit = *toks.recv();
  const clock::time_point t0 = clock::now();
  for (int i = 0; i < p.nprod + p.ncons; ++i) {
    auto pt = std::make_unique<party>();
    const bool prod = i < p.nprod;
    pt->thread = prod ? p.prod_thread[i] : p.cons_thread[i - p.nprod];
    pt->name = (prod ? "producer " + std::to_string(i) : "consumer " + std::to_string(i - p.nprod)) +
               (pt->thread ? " (thread)" : " (fiber)");
    w.parties.push_back(std::move(pt));
  }
  for (int i = 0; i < p.nprod + p.ncons; ++i) {
    party& pt = *w.parties[i];
    auto body = [&w, &pt, i, nprod = p.nprod] {
      if (i < nprod) run_producer(w, i);
      else run_consumer(w, i - nprod);
      pt.finished = true;
    };
    if (pt.thread) pt.t = plain_thread(body);
    else pt.fiber = spawn(body, {.name = "soak party"});
  }
  std::thread closer_thread;
  std::atomic<bool> closer_done{false};
  if (p.close_by == closer::thread)
    closer_thread = plain_thread([&] {
      std::this_thread::sleep_until(t0 + p.close_at);
      w.chans[p.close_which]->close();
      closer_done = true;
    });
  // The scenario's own timeline: stops, quit, its close, then the end.
  struct event {
    clock::duration at;
    int what;  // party index; -1 quit; -2 close
  };
  std::vector<event> evs;
  for (int i = 0; i < p.nprod + p.ncons; ++i)
    if (p.stop_at[i] != clock::duration::max() && !w.parties[i]->thread)
      evs.push_back({p.stop_at[i], i});
  if (p.quit_at != clock::duration::max()) evs.push_back({p.quit_at, -1});
  if (p.close_by == closer::scenario) evs.push_back({p.close_at, -2});
  std::sort(evs.begin(), evs.end(), [](const event& a, const event& b) { return a.at < b.at; });
  std::vector<std::pair<int, clock::time_point>> stopped;
  for (const event& e : evs) {
    (void)this_fiber::sleep_until(t0 + e.at);
    if (e.what >= 0) {
      party& pt = *w.parties[e.what];
      pt.stop_requested = true;
      pt.fiber.request_stop();
      stopped.emplace_back(e.what, clock::now());
    } else if (e.what == -1) {
      w.quit_requested = true;
      quitter.request_stop();
    } else {
      w.chans[p.close_which]->close();
    }
  }
  (void)this_fiber::sleep_until(t0 + p.end_at);
  for (auto [i, when] : stopped) expect_stopped_finish(pr, *w.parties[i], when);
  for (auto& c : w.chans) c->close();
  for (auto& pt : w.parties) pt->join();
  if (closer_thread.joinable()) {
    while (!closer_done.load()) (void)this_fiber::sleep_for(1ms);
    closer_thread.join();
  }
  w.quit_requested = true;
  quitter.request_stop();
  quitter.join();
  // Drain: recv after close gives the buffered values, then closed.
  for (int c = 0; c < p.nchan; ++c) {
    for (;;) {
      result<value> v = w.chans[c]->try_recv();
      if (!v) {
        if (v.error() != chan_errc::closed)
          pr.add("the final drain's try_recv failed with " + err_name(v.error()));
        break;
      }
      w.got[p.ncons].emplace_back(*v, c);
    }
  }
  check_channel_outcome(w);
  pr.report();
}

// --- sync scenarios ----------------------------------------------------------

struct sync_plan {
  std::uint64_t seed;
  int nworkers, ncv, nwg;
  int permits;
  bool thread[12];
  std::uint32_t increments[6];
  long thresholds[3];           // cv waiters'
  clock::duration cv_wait[3];   // max: no deadline
  clock::duration wg_wait[3];   // max: no deadline
  clock::duration stop_at[12];  // workers, cv waiters, wg waiters; max: never

  explicit sync_plan(std::uint64_t s) : seed(s) {
    std::mt19937_64 r(s);
    nworkers = 2 + r() % 5;
    ncv = 1 + r() % 3;
    nwg = r() % 3;
    permits = 1 + r() % 3;
    for (auto& t : thread) t = r() % 5 == 0;
    long total = 0;
    for (auto& n : increments) n = 10 + r() % 200;
    for (int i = 0; i < nworkers; ++i) total += increments[i];
    for (auto& t : thresholds) t = r() % 4 == 0 ? total + 1 : static_cast<long>(r() % (total + 1));
    for (auto& d : cv_wait)
      d = r() % 3 == 0 ? clock::duration::max()
                       : clock::duration(std::chrono::microseconds(r() % 100000));
    for (auto& d : wg_wait)
      d = r() % 3 == 0 ? clock::duration::max()
                       : clock::duration(std::chrono::microseconds(r() % 100000));
    for (auto& st : stop_at)
      st = r() % 4 == 0 ? clock::duration(std::chrono::milliseconds(r() % 100))
                        : clock::duration::max();
  }
  std::string describe() const {
    std::ostringstream o;
    o << "[sync scenario seed " << seed << ": " << nworkers << " worker(s) (";
    for (int i = 0; i < nworkers; ++i) o << (thread[i] ? "T" : "F");
    o << "), " << permits << " permit(s), " << ncv << " cv waiter(s), " << nwg
      << " wait_group waiter(s)] ";
    return o.str();
  }
};

void run_sync_scenario(const sync_plan& p) {
  problems pr;
  pr.ctx = p.describe();
  mutex mu;
  condition_variable cv;
  semaphore sem(p.permits);
  wait_group wg;
  long counter = 0;        // guarded by mu
  bool workers_done = false;  // guarded by mu
  std::atomic<int> holders{0}, dones{0};
  std::vector<long> made(p.nworkers, 0);  // per worker, increments made
  std::vector<std::unique_ptr<party>> parties;
  const int n = p.nworkers + p.ncv + p.nwg;
  for (int i = 0; i < n; ++i) {
    auto pt = std::make_unique<party>();
    pt->thread = p.thread[i];
    pt->name = (i < p.nworkers ? "worker " + std::to_string(i)
                : i < p.nworkers + p.ncv ? "cv waiter " + std::to_string(i - p.nworkers)
                                         : "wg waiter " + std::to_string(i - p.nworkers - p.ncv)) +
               (pt->thread ? " (thread)" : " (fiber)");
    parties.push_back(std::move(pt));
  }
  wg.add(p.nworkers);
  auto worker = [&](int id) {
    party& me = *parties[id];
    std::mt19937_64 r(p.seed * 0x9e3779b97f4a7c15ull + 31 + id);
    for (std::uint32_t k = 0; k < p.increments[id]; ++k) {
      const auto dl = r() % 2 ? kNever : clock::now() + std::chrono::microseconds(r() % 3000);
      auto a = sem.acquire(deadline(dl));
      judge(pr, me, "semaphore acquire", dl, error_of(a), {});
      if (!a) {
        if (a.error() == std::errc::operation_canceled) break;
        continue;
      }
      if (int h = holders.fetch_add(1) + 1; h > p.permits)
        pr.add(me.name + ": " + std::to_string(h) + " holders of a semaphore of " +
               std::to_string(p.permits) + " permits");
      if (r() % 3 == 0) {
        while (!mu.try_lock()) relax(me.thread);
      } else {
        mu.lock();
      }
      ++counter;
      ++made[id];
      if (r() % 4 == 0) cv.notify_all();
      else cv.notify_one();
      mu.unlock();
      if (r() % 5 == 0) relax(me.thread);
      holders.fetch_sub(1);
      sem.release();
    }
    dones.fetch_add(1);
    wg.done();
  };
  auto cv_waiter = [&](int id) {
    party& me = *parties[p.nworkers + id];
    const auto dl = p.cv_wait[id] == clock::duration::max() ? kNever : clock::now() + p.cv_wait[id];
    std::unique_lock lk(mu);
    auto r = cv.wait(lk, [&] { return counter >= p.thresholds[id] || workers_done; }, deadline(dl));
    judge(pr, me, "condition_variable wait", dl, error_of(r), {});
    const bool pred = counter >= p.thresholds[id] || workers_done;
    if (r) ++g_tally.cv_ok;
    if (r && !pred) pr.add(me.name + ": a cv wait returned ok with its predicate false");
    if (!r && pred) pr.add(me.name + ": a cv wait failed with its predicate true");
  };
  auto wg_waiter = [&](int id) {
    party& me = *parties[p.nworkers + p.ncv + id];
    const auto dl = p.wg_wait[id] == clock::duration::max() ? kNever : clock::now() + p.wg_wait[id];
    auto r = wg.wait(deadline(dl));
    judge(pr, me, "wait_group wait", dl, error_of(r), {});
    if (r && dones.load() != p.nworkers)
      pr.add(me.name + ": a wait_group wait returned ok with " + std::to_string(dones.load()) +
             " of " + std::to_string(p.nworkers) + " workers done");
  };
  const clock::time_point t0 = clock::now();
  for (int i = 0; i < n; ++i) {
    party& pt = *parties[i];
    auto body = [&, i] {
      if (i < p.nworkers) worker(i);
      else if (i < p.nworkers + p.ncv) cv_waiter(i - p.nworkers);
      else wg_waiter(i - p.nworkers - p.ncv);
      pt.finished = true;
    };
    if (pt.thread) pt.t = plain_thread(body);
    else pt.fiber = spawn(body, {.name = "soak sync party"});
  }
  std::vector<std::pair<clock::duration, int>> evs;
  for (int i = 0; i < n; ++i)
    if (p.stop_at[i] != clock::duration::max() && !parties[i]->thread)
      evs.emplace_back(p.stop_at[i], i);
  std::sort(evs.begin(), evs.end());
  std::vector<std::pair<int, clock::time_point>> stopped;
  for (auto [at, i] : evs) {
    (void)this_fiber::sleep_until(t0 + at);
    parties[i]->stop_requested = true;
    parties[i]->fiber.request_stop();
    stopped.emplace_back(i, clock::now());
  }
  // A stopped worker may be inside mu or hold a permit (lock acquisition
  // does not honour stops): it still ends within the slack.
  for (auto [i, when] : stopped) expect_stopped_finish(pr, *parties[i], when);
  for (int i = 0; i < p.nworkers; ++i) parties[i]->join();
  {
    std::lock_guard g(mu);
    workers_done = true;
  }
  cv.notify_all();
  for (int i = p.nworkers; i < n; ++i) parties[i]->join();
  long sum = 0;
  for (long m : made) sum += m;
  g_tally.increments += sum;
  {
    std::lock_guard g(mu);
    if (counter != sum)
      pr.add("the counter is " + std::to_string(counter) + " after " + std::to_string(sum) +
             " increments");
  }
  if (holders.load() != 0) pr.add("semaphore holders left: " + std::to_string(holders.load()));
  int back = 0;
  while (sem.try_acquire()) ++back;
  if (back != p.permits)
    pr.add(std::to_string(back) + " permits back of " + std::to_string(p.permits));
  if (auto r = wg.wait(deadline(clock::now() + kSlack)); !r)
    pr.add("the wait_group is not at zero after every worker: " + err_name(r.error()));
  pr.report();
}

void run_scenario(std::uint64_t seed) {
  if (seed % 3 == 0) run_sync_scenario(sync_plan(seed));
  else run_channel_scenario(chan_plan(seed));
}

// Aborts the process, saying the seed, if the test outlives kWatchdog.
class watchdog {
 public:
  explicit watchdog(std::uint64_t seed) {
    t_ = std::thread([this, seed] {
      std::unique_lock lk(m_);
      if (!cv_.wait_for(lk, kWatchdog, [&] { return done_; })) {
        std::fprintf(stderr, "sync_soak_test: still running after %lld s: a hang (WEFT_SOAK_SEED=%llu)\n",
                     static_cast<long long>(kWatchdog.count()), static_cast<unsigned long long>(seed));
        std::abort();
      }
    });
  }
  ~watchdog() {
    {
      std::lock_guard g(m_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

TEST_P(SyncSoak, ChannelsSelectAndSyncLoseNothingAndHonourDeadlinesAndStops) {
  const std::uint64_t base = env_u64("WEFT_SOAK_SEED", std::random_device{}());
  const int count = static_cast<int>(env_u64("WEFT_SOAK_SCENARIOS", kScenarios));
  SCOPED_TRACE("WEFT_SOAK_SEED=" + std::to_string(base));
  std::printf("sync_soak_test: WEFT_SOAK_SEED=%llu, %d scenarios on %u workers\n",
              static_cast<unsigned long long>(base), count, workers());
  std::fflush(stdout);
  watchdog dog(base);
  g_tally.reset();
  Run([&] {
    std::atomic<int> next{0};
    std::vector<join_handle<void>> lanes;
    for (int l = 0; l < kLanes; ++l)
      lanes.push_back(spawn([&] {
        for (int i; (i = next.fetch_add(1)) < count;) run_scenario(base + i * 1000003ull);
      }, {.name = "soak lane"}));
    for (auto& l : lanes) l.join();
    std::printf("sync_soak_test: %s\n", g_tally.line().c_str());
    return 0;
  });
}

}  // namespace
}  // namespace weft
