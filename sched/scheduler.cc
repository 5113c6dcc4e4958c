// sched/scheduler.cc — spawning, the idle list, the fiber registry, the
// deadlock report and shutdown. The loop is in worker.cc.
#include "sched/scheduler.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <new>

#include "alloc/check.h"
#include "sched/fls.h"
#include "sched/worker.h"

namespace weft::sched {
namespace {

// acquire/release: publishes the constructed scheduler to plain threads
// that call instance() (pairs with the store in the constructor).
std::atomic<scheduler*> g_instance{nullptr};

// The overflow handler asks us who owned a stack. Async-signal context:
// only reads the control block and formats into buf.
void describe_stack(const alloc::stack& s, char* buf, std::size_t len) {
  fiber* f = fiber_at_top(s);
  std::snprintf(buf, len, "fiber %llu \"%s\"",
                static_cast<unsigned long long>(f->id_), f->name_);
}

[[noreturn]] void fiber_main(void* arg) {
  auto* f = static_cast<fiber*>(arg);
  f->started_ = true;
  // seq_cst: pairs with force_unwind(); a fiber unwound before it started
  // never runs its body, only destroys its callable.
  if (f->unwinding_.load(std::memory_order_seq_cst)) {
    f->discard_(f->callable_);
  } else {
    try {
      f->body_(f->callable_);  // runs and destroys the callable
    } catch (const fiber_unwind&) {
      // The unwinder stopped it: its frames' destructors have run.
    }
  }
  fls_destroy_all(f);
  current_worker()->switch_to_scheduler(after_switch::exit, nullptr);
  __builtin_unreachable();
}

}  // namespace

scheduler* scheduler::instance() noexcept {
  return g_instance.load(std::memory_order_acquire);
}

scheduler::scheduler(scheduler_options opts)
    : opts_(std::move(opts)),
      stacks_([&] {
        alloc::stack_pool_options o;
        unsigned n = opts_.workers ? opts_.workers
                                   : unsigned(opts_.topology.pus().size());
        o.caches = n;
        return o;
      }()) {
  unsigned n = stacks_.stats().regions, count = opts_.workers;
  (void)n;
  if (count == 0) count = unsigned(opts_.topology.pus().size());
  WEFT_CHECK(count >= 1, "scheduler: zero workers");
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
  }
  opts_.topology = std::move(topo);
  registry_ = std::make_unique<registry_shard[]>(count + 1);
  alloc::install_overflow_handler(&describe_stack);
  scheduler* expect = nullptr;
  WEFT_CHECK(g_instance.compare_exchange_strong(expect, this,
                                                std::memory_order_acq_rel),
             "scheduler: only one weft runtime may run at a time");
}

scheduler::~scheduler() {
  join();
  WEFT_CHECK(live() == 0, "scheduler: destroyed with live fibers");
  g_instance.store(nullptr, std::memory_order_release);
}

void scheduler::start() {
  const alloc::topology* pin = opts_.pin ? &opts_.topology : nullptr;
  std::latch ready(worker_count());
  for (auto& w : workers_)
    w->thread() = std::thread([this, pin, wp = w.get(), &ready] {
      wp->run(pin, opts_.make_driver, ready);
    });
  ready.wait();  // every driver exists before anyone may wake a worker
}

void scheduler::join() {
  for (auto& w : workers_)
    if (w->thread().joinable()) w->thread().join();
}

fiber* scheduler::create(const fiber_attrs& a, std::size_t callable_size,
                         std::size_t callable_align) {
  worker* w = current_worker();
  unsigned cache = w ? w->index() : alloc::stack_pool::kSharedCache;
  std::size_t size = a.stack_size ? a.stack_size : opts_.default_stack;
  alloc::stack s = stacks_.allocate(size, cache);
  prepare_stack(s.lo, s.hi);
  fiber* f = fiber_at_top(s);
  // SAFETY: the top of a fresh (or recycled, exited) stack is ours; the
  // block is constructed in place and destroyed in exited().
  new (f) fiber;
  f->stack_ = s;
  f->id_ = next_id_.fetch_add(1, std::memory_order_relaxed);  // relaxed: unique ids only
  std::size_t n = std::min(a.name.size(), sizeof f->name_ - 1);
  std::memcpy(f->name_, a.name.data(), n);
  f->name_[n] = '\0';
  if (a.pinned) {
    WEFT_CHECK(w, "spawn: a pinned fiber must be spawned from a fiber");
    f->home_ = w;
  }
  auto top = reinterpret_cast<std::uintptr_t>(f) - callable_size;
  top &= ~(std::uintptr_t{callable_align} - 1);
  f->callable_ = reinterpret_cast<void*>(top);
  auto* sp = reinterpret_cast<std::byte*>(top & ~std::uintptr_t{63});
  WEFT_CHECK(sp - s.lo >= 1024, "spawn: the callable does not fit on the fiber's stack");
  make_fiber_context(f->ctx_, s.lo, sp, &fiber_main, f);
  return f;
}

void scheduler::start_fiber(fiber* f) {
  worker* w = current_worker();
  live_.fetch_add(1, std::memory_order_relaxed);  // relaxed: ordered by the queue push
  register_fiber(f, w ? w->index() : worker_count());
  if (w) {
    worker_counters::bump(w->counters().spawned);
    w->schedule_local(f, /*hot=*/false);
  } else {
    submit(f);
  }
}

void scheduler::submit(fiber* f) noexcept {
  inject_.push(f);
  wake_idle_worker();
}

void scheduler::wake_idle_worker() noexcept {
  // seq_cst fence: the publisher's StoreLoad (see *Spinning* in worker.cc):
  // the work pushed before this call is ordered before these loads.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (nspinning_.load(std::memory_order_relaxed) != 0 ||
      nidle_.load(std::memory_order_relaxed) == 0)
    return;
  unsigned zero = 0;
  // seq_cst: we become the spinner on behalf of the worker we wake.
  if (!nspinning_.compare_exchange_strong(zero, 1, std::memory_order_seq_cst))
    return;
  if (worker* w = pop_idle())
    w->driver_->wake();
  else
    nspinning_.fetch_sub(1, std::memory_order_seq_cst);
}

worker* scheduler::pop_idle() noexcept {
  std::lock_guard g(idle_mu_);
  if (idle_.empty()) return nullptr;
  worker* w = idle_.back();
  idle_.pop_back();
  w->in_idle_ = false;
  nidle_.fetch_sub(1, std::memory_order_seq_cst);
  return w;
}

void scheduler::register_fiber(fiber* f, unsigned shard) {
  registry_shard& r = registry_[shard];
  f->reg_shard_ = shard;
  std::lock_guard g(r.lock);
  f->reg_prev_ = nullptr;
  f->reg_next_ = r.head;
  if (r.head) r.head->reg_prev_ = f;
  r.head = f;
}

void scheduler::unregister_fiber(fiber* f) noexcept {
  registry_shard& r = registry_[f->reg_shard_];
  std::lock_guard g(r.lock);
  if (f->reg_prev_)
    f->reg_prev_->reg_next_ = f->reg_next_;
  else
    r.head = f->reg_next_;
  if (f->reg_next_) f->reg_next_->reg_prev_ = f->reg_prev_;
}

void scheduler::exited(fiber* f, unsigned cache) noexcept {
  unregister_fiber(f);
  release_fiber_context(f->ctx_);
  alloc::stack s = f->stack_;
  f->~fiber();
  // SAFETY: the fiber made its final switch; nothing references its stack.
  stacks_.release(s, cache);
  // acq_rel: the last exit publishes every fiber's effects to the thread
  // that sees zero (pairs with live()).
  if (live_.fetch_sub(1, std::memory_order_acq_rel) == 1 && unwinding())
    request_exit();
}

void scheduler::unwind_all() {
  unwinding_.store(true, std::memory_order_release);  // pairs with unwinding()
  for (unsigned i = 0; i <= worker_count(); ++i) {
    std::lock_guard g(registry_[i].lock);
    for (fiber* f = registry_[i].head; f; f = f->reg_next_)
      if (f != current_fiber()) force_unwind(f);
  }
}

void scheduler::request_exit() noexcept {
  exit_.store(true, std::memory_order_release);  // pairs with worker::run()
  for (auto& w : workers_)
    if (w->driver_) w->driver_->wake();
}

}  // namespace weft::sched
