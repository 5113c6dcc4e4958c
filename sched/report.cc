// sched/report.cc — what the scheduler tells people: stats(), dump() and the
// deadlock report.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
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
void describe(int fd, const fiber* f) {
  char line[512];
  // relaxed: a diagnostic snapshot; the registry lock keeps f alive.
  std::uint64_t s = f->state_.load(std::memory_order_relaxed);
  const char* state = "runnable";
  switch (phase_of(s)) {
    case park_phase::running: state = f->started_ ? "running or runnable" : "not started"; break;
    case park_phase::parking:
    case park_phase::parked: state = f->wait_what_; break;
    case park_phase::woken: state = "woken"; break;
  }
  int n;
  if (phase_of(s) == park_phase::parking || phase_of(s) == park_phase::parked)
    n = std::snprintf(line, sizeof line, "fiber %llu \"%s\" [%s] at %s:%u\n",
                      static_cast<unsigned long long>(f->id_), f->name_, state,
                      f->park_site_.file_name(), f->park_site_.line());
  else
    n = std::snprintf(line, sizeof line, "fiber %llu \"%s\" [%s]\n",
                      static_cast<unsigned long long>(f->id_), f->name_, state);
  if (n > 0) write_all(fd, line, std::min<std::size_t>(n, sizeof line - 1));
}

}  // namespace

// In id order, so the oldest fibers (main first) lead. Every shard lock is
// held while printing, so no listed fiber can exit meanwhile.
void scheduler::dump(int fd) const {
  for (unsigned i = 0; i <= worker_count(); ++i) registry_[i].lock.lock();
  std::vector<const fiber*> all;
  for (unsigned i = 0; i <= worker_count(); ++i)
    for (const fiber* f = registry_[i].head; f; f = f->reg_next_) all.push_back(f);
  std::sort(all.begin(), all.end(),
            [](const fiber* a, const fiber* b) { return a->id_ < b->id_; });
  for (const fiber* f : all) describe(fd, f);
  for (unsigned i = 0; i <= worker_count(); ++i) registry_[i].lock.unlock();
}

// Called by the worker that has just registered as idle, under idle_mu_.
// When every worker is idle, no worker has a timer or an operation in
// flight, no plain thread holds an outside reference and no queue holds a
// fiber, then nothing can ever wake the fibers that are still alive: print
// them and exit with status 2, as Go does.
bool scheduler::report_deadlock_if_stuck(worker&) noexcept {
  if (!opts_.deadlock_detection || unwinding()) return false;
  // relaxed loads: every worker published its state before taking
  // idle_mu_, which we hold, and outside references are taken before the
  // reference holder can wake anyone.
  if (nidle_.load(std::memory_order_relaxed) != worker_count()) return false;
  if (outside_refs_.load(std::memory_order_acquire) > 0) return false;
  if (live() == 0 || !inject_.empty_hint()) return false;
  for (const auto& w : workers_) {
    if (w->timers_when_idle_ || w->io_when_idle_) return false;
    if (!w->local_.empty_approx() ||
        w->inbox_nonempty_.load(std::memory_order_seq_cst))
      return false;
  }
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
    st.spawned += get(c.spawned);
    st.parks += get(c.parks);
    st.yields += get(c.yields);
    st.sleeps += get(c.sleeps);
    st.wakeups += get(c.wakeups);
    st.lifo_runs += get(c.lifo_runs);
    st.inject_pops += get(c.inject_pops);
  }
  st.live_fibers = live();
  st.stacks = stacks_.stats();
  return st;
}

}  // namespace weft::sched
