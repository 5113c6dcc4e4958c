// sched/scheduler.cc — spawning, the idle list, the fiber registry, the
// deadlock report and shutdown. The loop is in worker.cc.
#include "sched/scheduler.h"

#include <sched.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <bit>
#include <new>

#include "alloc/check.h"
#include "sched/fls.h"
#include "sched/worker.h"

namespace weft::sched {
namespace {

// acquire/release: publishes the constructed scheduler to plain threads
// that call instance() (pairs with the store in the constructor).
std::atomic<scheduler*> g_instance{nullptr};

// Plain threads inside a plain_use (see scheduler.h), and the source of
// run ids (relaxed: ids need only be unique).
std::atomic<int> g_plain_inside{0};
std::atomic<std::uint64_t> g_next_run_id{1};

// The overflow handler asks us who owned a stack. Async-signal context:
// only reads the control block and formats into buf.
void describe_stack(const alloc::stack& s, char* buf, std::size_t len) {
  fiber* f = fiber_of_stack(s);  // null: no fiber owns it now (see exited())
  if (!f) return;
  std::snprintf(buf, len, "fiber %llu \"%s\"",
                static_cast<unsigned long long>(f->id_), f->name_);
}

[[noreturn]] void fiber_main(void* arg) {
  auto* f = static_cast<fiber*>(arg);
  current_worker()->finish_switch();  // we may be a hand-off target
  if (f->unpin_on_start_) f->home_ = nullptr;  // placed, not pinned: free to move now
  // A fiber stolen from its spawner's worker would end by writing its
  // registry slot, a line that worker wrote at the spawn; the write would
  // then hold up the exit's next atomic operation for a transfer. Short
  // fibers (spawn_join's) run for about as long as one takes. A long one
  // may lose the line again to the spawner's next add() (slots of a fresh
  // block share lines) and pay that transfer at its exit anyway; skynet,
  // whose fibers park, measured no loss (bench/README.md, 27th session).
  scheduler::instance()->prefetch_exit(f);
  f->started_.store(true, std::memory_order_relaxed);  // relaxed: diagnostic
  // seq_cst: pairs with force_unwind(); a fiber unwound before it started
  // never runs its body, only destroys its callable.
  if (f->unwinding_.load(std::memory_order_seq_cst)) {
    f->body_ended_ = true;  // the callable's destructor may park: see unwind_point()
    f->discard_(f->callable_);
  } else {
    try {
      f->body_(f->callable_);  // runs and destroys the callable (body_ended_ set first)
    } catch (const fiber_unwind&) {
      // The unwinder stopped it: its frames' destructors have run.
    }
  }
  f->body_ended_ = true;  // fiber_local destructors may park too
  fls_destroy_all(f);
  current_worker()->switch_away(after_switch::exit, nullptr);
  __builtin_unreachable();
}

// See unpinned_cpus(). Written by start(), read by any thread: rare on
// both sides, so a mutex.
std::mutex g_unpinned_mu;
cpu_set_t g_unpinned;        // guarded by g_unpinned_mu
bool g_has_unpinned = false;  // guarded by g_unpinned_mu

}  // namespace

namespace {

// The run (scheduler::run_id) this thread holds an outside reference on
// (0: none). Plain threads do not migrate: the thread_local is read
// directly.
struct outside_ref_holder {
  std::uint64_t run = 0;
  void drop() noexcept {
    if (!run) return;
    scheduler::plain_use use;
    if (use.get() && use.get()->run_id() == run) use.get()->add_outside_ref(-1);
    run = 0;
  }
  ~outside_ref_holder() { drop(); }
};
thread_local outside_ref_holder tls_outside_ref;

}  // namespace

void note_plain_thread() noexcept {
  scheduler::plain_use use;
  scheduler* s = use.get();
  if (!s || tls_outside_ref.run == s->run_id()) return;
  tls_outside_ref.drop();  // one held on an earlier run that is over
  s->add_outside_ref(+1);
  tls_outside_ref.run = s->run_id();
}

void forget_plain_thread() noexcept { tls_outside_ref.drop(); }

bool unpinned_cpus(cpu_set_t* out) noexcept {
  std::lock_guard g(g_unpinned_mu);
  if (g_has_unpinned) *out = g_unpinned;
  return g_has_unpinned;
}

scheduler* scheduler::instance() noexcept {
  return g_instance.load(std::memory_order_acquire);
}

// seq_cst, both sides: the increment then the load of g_instance here, the
// store of null then the load of g_plain_inside in ~scheduler (a StoreLoad
// pattern). Either the destructor sees us inside and waits, or we see null.
scheduler::plain_use::plain_use() noexcept {
  g_plain_inside.fetch_add(1, std::memory_order_seq_cst);
  s_ = g_instance.load(std::memory_order_seq_cst);
  // acquire: pairs with start()'s release; the workers' drivers are set.
  if (s_ && !s_->started_.load(std::memory_order_acquire)) s_ = nullptr;
}

scheduler::plain_use::~plain_use() {
  // release: our last touch of the scheduler happens before the
  // destructor's acquire load sees the count drop.
  g_plain_inside.fetch_sub(1, std::memory_order_release);
}

// One stack cache per worker, on the NUMA node of the worker's processing
// unit (worker i runs on the topology's PU i): stacks are carved from, and
// flow warm within, the worker's node. One node: no binding at all.
alloc::stack_pool_options stack_pool_options_for(const scheduler_options& o) {
  alloc::stack_pool_options p;
  p.caches = o.workers ? o.workers : unsigned(o.topology.pus().size());
  const alloc::topology t = o.topology.first(p.caches);
  if (t.numa_nodes() > 1 && t.pus().size() == p.caches) {
    for (const alloc::pu& pu : t.pus()) {
      p.cache_nodes.push_back(pu.numa);
      if (p.node_os.size() <= pu.numa) p.node_os.resize(pu.numa + 1, -1);
      p.node_os[pu.numa] = pu.numa_os;
    }
  }
  return p;
}

std::vector<int> worker_node_os(const scheduler_options& o) {
  alloc::stack_pool_options p = stack_pool_options_for(o);
  std::vector<int> r;
  for (unsigned node : p.cache_nodes) r.push_back(p.node_os[node]);
  return r;
}

unsigned scheduler::workers_wanted(const scheduler_options& o) {
  unsigned n = o.workers ? o.workers : unsigned(o.topology.pus().size());
  WEFT_CHECK(n >= 1, "scheduler: zero workers");
  return n;
}

scheduler::scheduler(scheduler_options opts)
    : opts_(std::move(opts)),
      stacks_(stack_pool_options_for(opts_)),
      blocks_(workers_wanted(opts_), stack_pool_options_for(opts_).cache_nodes),
      registry_(workers_wanted(opts_) + 1, workers_wanted(opts_)),
      run_id_(g_next_run_id.fetch_add(1, std::memory_order_relaxed)) {
  const unsigned count = workers_wanted(opts_);
  if (count > opts_.topology.pus().size()) opts_.pin = false;  // oversubscribed: no pinning
  alloc::topology topo = opts_.topology.pus().size() >= count
                             ? opts_.topology.first(count)
                             : opts_.topology;
  for (unsigned i = 0; i < count; ++i) {
    std::vector<std::vector<unsigned>> groups;
    if (topo.pus().size() == count) {
      groups = topo.steal_groups(i);
    } else {
      groups.emplace_back();
      for (unsigned j = 0; j < count; ++j)
        if (j != i) groups.back().push_back(j);
      if (groups.back().empty()) groups.clear();
    }
    workers_.push_back(std::make_unique<worker>(*this, i, std::move(groups)));
    workers_.back()->init_steal_state(count);
  }
  opts_.topology = std::move(topo);
  alloc::install_overflow_handler(&describe_stack);
  scheduler* expect = nullptr;
  WEFT_CHECK(g_instance.compare_exchange_strong(expect, this,
                                                std::memory_order_acq_rel),
             "scheduler: only one weft runtime may run at a time");
}

scheduler::~scheduler() {
  join();
  WEFT_CHECK(registry_.live_exact() == 0, "scheduler: destroyed with live fibers");
  g_instance.store(nullptr, std::memory_order_seq_cst);  // see plain_use
  // acquire: pairs with ~plain_use's release.
  while (g_plain_inside.load(std::memory_order_acquire) != 0) sched_yield();
}

void scheduler::start() {
  const alloc::topology* pin = opts_.pin ? &opts_.topology : nullptr;
  {
    cpu_set_t mine;
    CPU_ZERO(&mine);
    if (sched_getaffinity(0, sizeof mine, &mine) == 0) {
      std::lock_guard g(g_unpinned_mu);
      g_unpinned = mine;
      g_has_unpinned = true;
    }
  }
  std::latch ready(worker_count());
  for (auto& w : workers_)
    w->thread() = std::thread([this, pin, wp = w.get(), &ready] {
      wp->run(pin, opts_.make_driver, ready);
    });
  ready.wait();  // every driver exists before anyone may wake a worker
  // release: the drivers, which the latch ordered before this, are visible
  // to a plain_use that sees it (pairs with the acquire there).
  started_.store(true, std::memory_order_release);
  if (opts_.monitor_period.count() > 0) monitor_ = std::thread([this] { monitor(); });
}

void scheduler::join() {
  // The monitor first: it may be signalling a worker's thread (the I/O
  // rescue, io/uring_driver.cc), which must not be joined meanwhile.
  if (monitor_.joinable()) monitor_.join();
  for (auto& w : workers_)
    if (w->thread().joinable()) w->thread().join();
}

// ---- The monitor ------------------------------------------------------------
//
// A thread that looks at every worker each monitor_period (Go's sysmon,
// in small). A worker that has run the same fiber, without a switch or a
// yield, since the previous look is stuck in it: a fiber computing without
// parking. Then
//   - if fibers wait on that worker that another could take (its queue, an
//     unpinned fiber in its LIFO slot, or overdue timers), or in the inject
//     queue, an idle worker
//     is woken to take them (steal(), steal_lifo(), steal_timers()):
//     without this, with every other worker asleep, they would wait for the
//     stuck fiber to park;
//   - the worker's driver hands the I/O that has completed there to other
//     workers (driver::rescue());
//   - once the same fiber has run for hog_warning, it is reported once on
//     stderr.
// And a worker whose loop has not polled its driver for a period is asked
// for a pass through its loop's periodic duties (duties_due_ in
// worker.h): one busy switching fibers past its loop would otherwise do
// them only on its periodic tick.
// The monitor touches workers only through atomics (counters, LIFO slot,
// queue indices, running_id_) and the stuck worker's driver through
// rescue(), which guards what it shares; the one fiber it reads, a hog it reports,
// it finds under the registry's locks. It costs one wake-up per period;
// with every worker idle it looks ten times less often.

void scheduler::monitor() {
  std::unique_lock lk(monitor_mu_);
  bool woken = false;  // the last doze was cut short
  // acquire: pairs with request_exit().
  while (!exit_.load(std::memory_order_acquire)) {
    // A doze cut short by a worker is followed by a normal period: at most
    // one such wake-up per period (see wake_dozing_monitor()). relaxed
    // (nidle_): a hint for the period only.
    bool doze = !woken && nidle_.load(std::memory_order_relaxed) == worker_count();
    if (doze) {
      // seq_cst store, then seq_cst load of nidle_: the StoreLoad against a
      // waking worker, which leaves nidle_ and then loads the flag (see
      // wake_dozing_monitor()): either it sees the flag and notifies, or we
      // see it busy and do not doze.
      monitor_dozing_.store(true, std::memory_order_seq_cst);
      if (nidle_.load(std::memory_order_seq_cst) != worker_count()) {
        doze = false;
        monitor_dozing_.store(false, std::memory_order_relaxed);
      }
    }
    monitor_cv_.wait_for(lk, doze ? 10 * opts_.monitor_period : opts_.monitor_period);
    woken = doze && !monitor_dozing_.exchange(false, std::memory_order_relaxed);
    if (exit_.load(std::memory_order_acquire)) break;
    lk.unlock();  // the checks take idle_mu_; never both
    for (auto& w : workers_) check_worker(*w);
    if (doze && !woken) {
      // Every worker slept through the doze: what could wake a fiber may
      // have gone meanwhile without waking a worker to notice (the last
      // outside reference dropped), so look for a deadlock again.
      std::lock_guard g(idle_mu_);
      report_deadlock_if_stuck();
    }
    lk.lock();
  }
}

// A worker that wakes while the monitor dozes would otherwise be watched
// only after up to ten periods: a fiber that starts to compute right after
// an idle spell would hold its worker's queue and timers that long. Costs
// a load per wake-up, and one notify per doze. No lost wake-up: the
// worker's seq_cst decrement of nidle_ (its own, or its waker's, which
// happens before this) precedes the seq_cst load of the flag, against the
// monitor's store-then-load (see monitor()); and the monitor sets the flag
// and starts waiting without releasing monitor_mu_, so a notifier that saw
// the flag and then takes the mutex finds it waiting.
void scheduler::wake_dozing_monitor() noexcept {
  if (!monitor_dozing_.load(std::memory_order_seq_cst) ||
      !monitor_dozing_.exchange(false, std::memory_order_relaxed))
    return;
  { std::lock_guard g(monitor_mu_); }
  monitor_cv_.notify_one();
}

void scheduler::check_worker(worker& w) {
  // A worker that switches fibers without reaching its loop (direct
  // yields, hand-offs) fires its timers, polls its driver and looks at
  // the inject queue only on the periodic tick, 61 switches apart (and
  // not even then if they looked idle: periodic_duties_idle()): long, if
  // its fibers compute between switches. If its loop has not polled
  // since the last look and it is not asleep (its wait polls), ask for
  // those duties; its next switch goes through the loop (see duties_due_
  // in worker.h). relaxed: hints and snapshots; the flag is loaded first
  // so that a request not yet taken is not written again. (A stuck worker
  // never switches: its timers and I/O are taken over, below.)
  std::uint64_t polls = w.loop_polls_.load(std::memory_order_relaxed);
  if (polls == w.mon_polls_ && !w.sleeping_.load(std::memory_order_relaxed) &&
      !w.duties_due_.load(std::memory_order_relaxed))
    w.duties_due_.store(true, std::memory_order_relaxed);
  w.mon_polls_ = polls;
  // relaxed: snapshots; "unchanged since the last look" is all we infer.
  // Yields count as progress too: a fiber that yields with nothing else
  // runnable there continues in place (*Direct yield* in worker.cc), which
  // runs no other fiber, yet its worker is not stuck: it reaches its loop
  // every 61 yields (Go's sysmon likewise counts every schedule() call).
  std::uint64_t runs = w.counters_.fibers_run.load(std::memory_order_relaxed) +
                       w.counters_.yields.load(std::memory_order_relaxed);
  std::uint64_t id = w.running_id_.load(std::memory_order_relaxed);
  if (id == 0 || runs != w.mon_runs_ || id != w.mon_id_) {
    w.mon_runs_ = runs;
    w.mon_id_ = id;
    w.mon_periods_ = 0;
    return;
  }
  ++w.mon_periods_;
  // Completed I/O parked on the stuck worker: the driver hands the fibers
  // to the inject queue (ready() from this thread wakes an idle worker).
  w.driver_->rescue();
  // The inject queue too: what was pushed there without a wake (an
  // overflow, a requeue) would otherwise wait for the stuck fiber.
  if (w.has_stealable_work() || w.has_overdue_timers(clock::now()) || !inject_.empty_hint())
    wake_idle_worker(/*fenced=*/true);
  auto ran = w.mon_periods_ * opts_.monitor_period;
  if (opts_.hog_warning.count() > 0 && ran >= opts_.hog_warning && w.mon_warned_id_ != id) {
    w.mon_warned_id_ = id;
    report_hog(id, ran, w.index());
  }
}

// Names the hog and where it last parked. The fiber may exit meanwhile: it
// is looked up by id under the registry's locks, which keep it alive while
// visited (rare: once per hog, so the scan's cost does not matter).
void scheduler::report_hog(std::uint64_t id, std::chrono::milliseconds ran, unsigned worker) {
  char name[64] = "?", site[192] = "never parked";
  registry_.for_each([&](const fiber* f) {
    if (f->id_ != id) return;
    std::snprintf(name, sizeof name, "%s", f->name_);
    // relaxed: a diagnostic snapshot (see fiber.h).
    if (unsigned line = f->park_line_.load(std::memory_order_relaxed))
      std::snprintf(site, sizeof site, "last parked at %s:%u",
                    f->park_file_.load(std::memory_order_relaxed), line);
  });
  char msg[512];
  int n = std::snprintf(
      msg, sizeof msg,
      "weft: fiber %llu \"%s\" (%s) has run for %lld ms on worker %u without "
      "parking or yielding; other workers take over the fibers queued there, "
      "its timers and its completed I/O, at some cost in latency. Yield in long "
      "loops (weft::this_fiber::yield()) or move the work to weft::blocking().\n",
      static_cast<unsigned long long>(id), name, site, static_cast<long long>(ran.count()),
      worker);
  if (n > 0) {
    ssize_t ignored = ::write(2, msg, std::min<std::size_t>(std::size_t(n), sizeof msg - 1));
    (void)ignored;
  }
}

namespace {
// The control block, its callable and its name: one allocation.
std::size_t block_align(std::size_t callable_align) {
  return std::max(callable_align, alignof(fiber));
}
// The plain operator new for what it aligns anyway: mimalloc's aligned
// path cost ~100 instructions per spawn against ~20 (callgrind,
// spawn_join), for the 8 or 16 bytes nearly every callable wants.
void* allocate_block(std::size_t bytes, std::size_t align) {
  if (align <= __STDCPP_DEFAULT_NEW_ALIGNMENT__) return ::operator new(bytes);
  return ::operator new(bytes, std::align_val_t{align});
}
void free_block(void* p, std::size_t align) noexcept {
  if (align <= __STDCPP_DEFAULT_NEW_ALIGNMENT__)
    ::operator delete(p);
  else
    ::operator delete(p, std::align_val_t{align});
}
std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) & ~(a - 1); }
}  // namespace

fiber* scheduler::create(const fiber_attrs& a, std::size_t callable_size,
                         std::size_t callable_align) {
  worker* w = current_worker();
  // Rounded to its class now, so a size the pool cannot give fails here,
  // in the spawner, with the pool's message (not later on a worker).
  std::size_t want = alloc::stack_pool::class_size(a.stack_size ? a.stack_size
                                                                : opts_.default_stack);
  const std::size_t at = round_up(sizeof(fiber), callable_align);
  // The name's first 63 bytes, cut before a UTF-8 character they would
  // split (a continuation byte, 10xxxxxx, does not start one): a name
  // shown by name(), dump() and the reports stays valid UTF-8.
  std::size_t name_len = std::min<std::size_t>(a.name.size(), 63);
  if (name_len < a.name.size())
    while (name_len > 0 && (static_cast<unsigned char>(a.name[name_len]) & 0xC0) == 0x80)
      --name_len;
  const std::size_t bytes = at + callable_size + (name_len ? name_len + 1 : 0);
  const unsigned cache = w ? w->index() : worker_count();
#if defined(WEFT_ASAN)
  // ASan holds freed blocks back before reusing them, which catches a late
  // touch of an exited fiber's block (the park protocol's hazard); the
  // cache hands a block out again at the next spawn. Its own tests run
  // under ASan (alloc/block_cache_test.cc).
  const int cls = -1;
#else
  const int cls = alloc::block_cache::class_of(bytes, block_align(callable_align));
#endif
  auto* mem = static_cast<std::byte*>(cls >= 0 ? blocks_.allocate(unsigned(cls), cache)
                                               : allocate_block(bytes, block_align(callable_align)));
  // SAFETY: fresh storage of `bytes`; destroyed and freed in free_fiber().
  fiber* f = new (mem) fiber;
  f->block_class_ = static_cast<std::uint8_t>(cls + 1);
  f->callable_ = mem + at;
  if (name_len) {
    char* name = reinterpret_cast<char*>(mem + at + callable_size);
    std::memcpy(name, a.name.data(), name_len);
    name[name_len] = '\0';
    f->name_ = name;
  }
  f->callable_align_ = static_cast<std::uint8_t>(std::countr_zero(callable_align));
  f->stack_want_ = static_cast<std::uint32_t>(want);  // at most 8 MiB
  if (a.worker >= 0) {
    f->home_ = workers_[unsigned(a.worker) % worker_count()].get();
    f->unpin_on_start_ = !a.pinned;
  } else if (a.pinned) {
    WEFT_CHECK(w, "spawn: a pinned fiber spawned outside the workers needs a worker index");
    f->home_ = w;
  }
  // A plain thread's spawn after main returned is refused: it would only
  // be unwound at once, and a thread spawning in a loop would keep the
  // runtime from ever ending. (A fiber's, say from a destructor running
  // as it unwinds, goes ahead and is unwound: see start_fiber().)
  if ((!w && unwinding()) || !registry_.add(f, cache)) {
    // Only a plain thread can get here: main returned, or even the last
    // fiber has exited.
    free_fiber(f, cache);
    return nullptr;
  }
  return f;
}

void scheduler::bind_stack(fiber* f, unsigned cache) {
  alloc::stack s = stacks_.allocate(f->stack_want_, cache);
  prepare_stack(s.lo, s.hi);
  f->stack_ = s;
  f->stack_hi_ = s.hi;
  f->canary_ = stacks_.has_canary(s);
  fiber_of_stack(s) = f;
  make_fiber_context(f->ctx_, s.lo, s.hi - kStackTopReserve, &fiber_main, f);
}

// Destroys f's control block and gives back its memory, from the cache
// of the calling thread (`cache`, as for the registry).
void scheduler::free_fiber(fiber* f, unsigned cache) noexcept {
  const unsigned cls = f->block_class_;
  const std::size_t align = block_align(std::size_t{1} << f->callable_align_);
  f->~fiber();
  if (cls != 0)
    blocks_.release(f, cls - 1, cache);
  else
    free_block(f, align);
}

void scheduler::abandon(fiber* f) noexcept {
  worker* w = current_worker();
  const unsigned cache = w ? w->index() : worker_count();
  registry_.remove(f, cache);
  free_fiber(f, cache);
  // As in exited(): it may have been the last fiber after main returned.
  if (unwinding() && registry_.close_if_empty()) request_exit();
}

void scheduler::start_fiber(fiber* f) {
  worker* w = current_worker();
  // A fiber spawned while the runtime unwinds is unwound too.
  if (unwinding()) f->unwinding_.store(true, std::memory_order_seq_cst);
  if (f->home_ && f->home_ != w) {  // placed on (or pinned to) another worker
    f->home_->push_inbox(f);
    return;
  }
  if (w) {
    worker_counters::bump(w->counters().spawned);
    // Into the LIFO slot, as Go's runnext: when the spawner parks (say, to
    // join), its newest child runs next, so fork-join trees run depth
    // first and keep few fibers alive; the child it displaces goes to the
    // local queue, where idle workers can steal it.
    w->schedule_local(f, /*hot=*/true, /*share=*/true);
  } else {
    submit(f);
  }
}

void scheduler::add_fiber_outside_ref(int delta) noexcept {
  worker* w = current_worker();
  WEFT_CHECK(w, "add_fiber_outside_ref: not on a worker");
  w->outside_refs_.store(w->outside_refs_.load(std::memory_order_relaxed) + delta,
                         std::memory_order_relaxed);  // relaxed: see outside_refs_
}

void scheduler::submit(fiber* f) noexcept {
  inject_.push(f);
  wake_idle_worker(/*fenced=*/true);
}

void scheduler::wake_idle_worker(bool fenced) noexcept {
  // seq_cst fence: the publisher's StoreLoad (see *Spinning* in worker.cc):
  // the work pushed before this call is ordered before these loads.
  if (fenced) std::atomic_thread_fence(std::memory_order_seq_cst);
  if (nspinning_.load(std::memory_order_relaxed) != 0 ||
      nidle_.load(std::memory_order_relaxed) == 0)
    return;
  unsigned zero = 0;
  // seq_cst: we become the spinner on behalf of the worker we wake.
  if (!nspinning_.compare_exchange_strong(zero, 1, std::memory_order_seq_cst))
    return;
  if (worker* w = pop_idle()) w->driver_->wake();
}

// Called holding a spinner slot taken on behalf of the worker to wake. If
// there is none, the slot goes back under idle_mu_: between the CAS and
// here, publishers saw nspinning_ != 0 and relied on a spinner that does
// not exist; giving it back under the lock orders the decrement before any
// later idle registration, whose re-check of the queues then sees their
// work.
worker* scheduler::pop_idle() noexcept {
  std::lock_guard g(idle_mu_);
  if (idle_.empty()) {
    nspinning_.fetch_sub(1, std::memory_order_seq_cst);
    return nullptr;
  }
  worker* w = idle_.back();
  idle_.pop_back();
  w->in_idle_ = false;
  nidle_.fetch_sub(1, std::memory_order_seq_cst);
  return w;
}

void scheduler::exited(fiber* f, unsigned cache) noexcept {
  registry_.remove(f, cache);
  release_fiber_context(f->ctx_);
  // The stack no longer names this block, which is about to be freed (the
  // overflow handler reads the name of a stack's fiber).
  fiber_of_stack(f->stack_) = nullptr;
  // SAFETY: the fiber made its final switch; nothing references its stack
  // or (the registry entry gone) its control block.
  stacks_.release(f->stack_, cache);
  free_fiber(f, cache);
  // The last fiber to exit after the main fiber returned stops the workers.
  if (unwinding() && registry_.close_if_empty()) request_exit();
}

void scheduler::unwind_all() {
  // Every exit from now on calls close_if_empty(), which holds every
  // shard: one membarrier here instead of one per exit.
  registry_.unbias();
  unwinding_.store(true, std::memory_order_release);  // pairs with unwinding()
  fiber* self = current_fiber();
  registry_.for_each([self](fiber* f) {
    if (f != self) force_unwind(f);
  });
}

void scheduler::request_exit() noexcept {
  exit_.store(true, std::memory_order_release);  // pairs with worker::run(), monitor()
  for (auto& w : workers_)
    if (w->driver_) w->driver_->wake();
  {
    // Under the lock, so the monitor is either before its exit_ check or
    // waiting: it cannot miss this notification.
    std::lock_guard g(monitor_mu_);
  }
  monitor_cv_.notify_all();
}

}  // namespace weft::sched
