// sched/report.cc — what the scheduler tells people: stats(), dump() and the
// deadlock report.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "sched/scheduler.h"
#include "sched/worker.h"

namespace weft::sched {
namespace {

void write_all(int fd, const char* p, std::size_t n) {
  while (n > 0) {
    ssize_t k = ::write(fd, p, n);
    if (k <= 0) return;
    p += k;
    n -= static_cast<std::size_t>(k);
  }
}

// One line per fiber: `fiber 12 "consumer" [chan receive] at server.cc:42`.
std::string describe(const fiber* f) {
  char line[512];
  // relaxed: a diagnostic snapshot; the registry's locks keep f alive.
  std::uint64_t s = f->state_.load(std::memory_order_relaxed);
  park_phase p = phase_of(s);
  int n;
  if (p == park_phase::parking || p == park_phase::parked) {
    n = std::snprintf(line, sizeof line, "fiber %llu \"%s\" [%s] at %s:%u\n",
                      static_cast<unsigned long long>(f->id_), f->name_,
                      f->wait_what_.load(std::memory_order_relaxed),  // relaxed: diagnostic
                      f->park_file_.load(std::memory_order_relaxed),
                      unsigned(f->park_line_.load(std::memory_order_relaxed)));
  } else {
    const char* state = p == park_phase::woken ? "woken"
                        : f->started_.load(std::memory_order_relaxed) ? "running or runnable"
                                               : "not started";
    n = std::snprintf(line, sizeof line, "fiber %llu \"%s\" [%s]\n",
                      static_cast<unsigned long long>(f->id_), f->name_, state);
  }
  return std::string(line, n > 0 ? std::min<std::size_t>(n, sizeof line - 1) : 0);
}

// What the program printed before it hung is its own account of how far it
// got. The report ends the process with _Exit() (no atexit handlers, no
// static destructors: other threads still run), which drops what a fully
// buffered stdout (a file, a pipe) still holds; exit() would have flushed
// it, and Go's stdout is unbuffered. So flush the C streams here (std::cout
// writes through stdout unless sync_with_stdio(false)) — but only a stream
// no one holds: a plain thread stuck in a write to a full pipe holds its
// lock, and waiting for it would stop the report from ever being made.
void flush_free_streams() noexcept {
  for (std::FILE* s : {stdout, stderr}) {
    if (ftrylockfile(s) != 0) continue;
    (void)fflush_unlocked(s);
    funlockfile(s);
  }
}

}  // namespace

// In id order, so the oldest fibers (main first) lead. Lines are formatted
// while the registry's locks keep every fiber alive, printed after.
void scheduler::dump(int fd) const {
  std::vector<std::pair<std::uint64_t, std::string>> lines;
  registry_.for_each([&](const fiber* f) { lines.emplace_back(f->id_, describe(f)); });
  std::sort(lines.begin(), lines.end());
  for (const auto& l : lines) write_all(fd, l.second.data(), l.second.size());
}

// Called under idle_mu_ by the worker that has just registered as idle,
// and by the monitor while every worker sleeps (a plain thread that drops
// the last outside reference, or exits, wakes no worker).
// When every worker is idle, no worker has a timer or an operation in
// flight, no plain thread holds an outside reference and no queue holds a
// fiber, then nothing can ever wake the fibers that are still alive: print
// them and exit with status 2, as Go does.
bool scheduler::report_deadlock_if_stuck() noexcept {
  if (!opts_.deadlock_detection || unwinding()) return false;
  // relaxed loads: every worker published its state before taking
  // idle_mu_, which we hold, and outside references are taken before the
  // reference holder can wake anyone.
  if (nidle_.load(std::memory_order_relaxed) != worker_count()) return false;
  if (outside_refs_.load(std::memory_order_acquire) > 0) return false;
  int fiber_refs = 0;  // relaxed: see worker::outside_refs_
  for (const auto& w : workers_) fiber_refs += w->outside_refs_.load(std::memory_order_relaxed);
  if (fiber_refs > 0) return false;
  if (!inject_.empty_hint()) return false;
  for (const auto& w : workers_) {
    if (w->timers_.armed() || w->io_when_idle_) return false;
    if (!w->queues_empty_approx() ||
        w->inbox_nonempty_.load(std::memory_order_seq_cst))
      return false;
  }
  // Every fiber must be parked: one that is still being spawned by a plain
  // thread, or woken and on its way to a queue, is not stuck.
  std::size_t fibers = 0;
  bool all_parked = true;
  if (!registry_.try_for_each([&](const fiber* f) {
        ++fibers;
        // seq_cst: ordered with the parked CAS in after_park().
        if (phase_of(f->state_.load(std::memory_order_seq_cst)) != park_phase::parked)
          all_parked = false;
      }))
    return false;
  if (fibers == 0 || !all_parked) return false;
  flush_free_streams();  // before the report, so that it comes last
  static const char kHead[] = "weft: all fibers are asleep - deadlock!\n\n";
  write_all(2, kHead, sizeof kHead - 1);
  dump(2);
  std::_Exit(2);
}

scheduler_stats scheduler::stats() const {
  scheduler_stats st;
  for (const auto& w : workers_) {
    const worker_counters& c = w->counters();
    auto get = [](const std::atomic<std::uint64_t>& a) {
      return a.load(std::memory_order_relaxed);  // relaxed: statistic
    };
    st.fibers_run.push_back(get(c.fibers_run));
    st.steals.push_back(get(c.steals));
    st.overflowed.push_back(get(c.overflowed));
    st.spawned += get(c.spawned);
    st.parks += get(c.parks);
    st.yields += get(c.yields);
    st.sleeps += get(c.sleeps);
    st.wakeups += get(c.wakeups);
    st.lifo_runs += get(c.lifo_runs);
    st.inject_pops += get(c.inject_pops);
    st.timer_steals += get(c.timer_steals);
  }
  st.live_fibers = live();
  st.stacks = stacks_.stats();
  return st;
}

}  // namespace weft::sched
