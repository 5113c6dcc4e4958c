// sched/worker.cc
//
// The scheduler loop of one worker. run() calls find_runnable() and
// run_fiber() until the runtime exits; every step has a name and a short
// body. The park protocol's post-switch step is after_park(), specified in
// sched/park.cc.
//
// Where a worker looks for work (find_runnable):
//   1. every 61st tick the inject queue, so fibers woken by plain threads
//      or overflowed cannot be starved by a busy local queue (Go's
//      schedtick%61), and then a non-blocking poll of the driver, which
//      takes what still fits the local queue (sched/driver.h): direct
//      yields and hand-offs never take such a tick (unless it would find
//      nothing to do: periodic_duties_idle()), so a busy worker
//      reaches its driver (and its due timers, next) at least this often,
//      and all three at its next switch once its loop has not polled for
//      a monitor period (duties_due_ in worker.h), however long its fibers
//      compute between switches;
//   2. expired timers; then the LIFO slot (at most kMaxLifoStreak times in
//      a row for fibers that ran before, so a ping-pong pair cannot starve
//      the queue, and kMaxLifoChain for first runs and what an exiting
//      fiber woke, see *Depth first*; a hand-off between such a pair goes
//      on past that while nothing else waits: take_handoff()), then the
//      pinned queue and the local and displaced queues (pop_queued()),
//      alternating;
//   3. the inject queue; a non-blocking poll of the driver;
//   4. stealing half of one of another worker's queues, nearest victims
//      first (a lone queued fiber only after kLoneStealDelay), or the
//      fiber in the LIFO slot of a worker stuck in one fiber (steal_lifo()), or the
//      overdue timers of such a worker (steal_timers());
//   5. sleeping in the driver until the next timer or a wake (a spinning
//      worker timing a steal candidate first waits for it:
//      wait_for_steal_candidate()).
//
// *Spinning* (no lost wake-up, no thundering herd)
//   A worker that steals is "spinning"; at most half of the non-idle workers
//   spin at once. Whoever publishes work (a push to the inject queue or to a
//   local queue) then calls scheduler::wake_idle_worker(), which wakes one
//   idle worker only if nobody spins: a spinner will find the work. When a
//   spinner finds work it stops spinning and, if it was the last one, wakes
//   another idle worker (chained wake-ups).
//   The delicate part: a publisher stores the work and then loads nspinning_
//   and nidle_; a worker going to sleep stores nidle_ (or decrements
//   nspinning_) and then loads the queues. Both sides separate the store
//   from the load with a seq_cst operation (StoreLoad), so at least one of
//   them sees the other: either the publisher wakes a worker, or the
//   sleeper finds the work. Only work that nobody else would run needs
//   this (the inject queue, fed by plain threads): a worker publishing into
//   its own queue skips the fence, because a missed wake-up there costs
//   parallelism, not progress — the owner runs the work itself once its
//   current fiber parks or yields (as in Go and Tokio, a fiber that never
//   does holds up its worker's queue and timers). Whoever takes a spinner
//   slot on behalf of a worker it then fails to find gives the slot back
//   under idle_mu_ (see scheduler::pop_idle).
//
// *Sleeping and waking*
//   A worker sleeps in driver::wait() until its earliest timer. Another
//   thread wakes it with driver::wake(), which is sticky, so a wake that
//   lands before the wait is not lost.
//
// *Depth first*
//   A fiber that makes several others runnable before it switches away (a
//   parent spawning its children, then joining them) puts the newest in
//   the LIFO slot, and each one that displaces goes to the head of the
//   displaced queue (push_displaced()), a stack: they run newest first,
//   and a fork-join tree runs depth first, as in Cilk's work-first order.
//   Few fibers are alive at once, and their stacks and control blocks stay
//   warm. At the local queue's tail (Go's and Tokio's order) each displaced
//   child waited behind all the others, the tree ran breadth first, and
//   skynet's million leaves on one worker went through the inject queue,
//   with a parked parent (and its stack) for every ten of them: 1,150 ms
//   against 255 (bench/README.md). Thieves take from it as from the local
//   queue, the newest half.
//   Four rules keep this fair:
//   - the local queue keeps its FIFO order for everything else (I/O and
//     timer wakes, yields, the inbox, the inject queue's batches), and
//     pop_queued() alternates between the two, so a fiber at the local
//     queue's tail does not wait for a whole tree, however long it runs;
//   - a fiber that yields hands what it displaced to the local queue's
//     tail (requeue_own_displaced()): a loop that spawns and yields does
//     not bury the stack's bottom;
//   - a stack that has not drained for kDisplacedPatience ticks goes to
//     the local queue's tail (move_displaced_to_local());
//   - the LIFO chains a tree makes (a parent parks and its newest child
//     runs; a child exits and its parent runs) are no ping-pong pair: such
//     a hand-off counts toward kMaxLifoChain, not kMaxLifoStreak, which
//     sent a parent behind the whole queue every third level and stalled
//     its subtree. A fiber spawning one child and exiting, forever, still
//     lets the queues in after kMaxLifoChain of them.
#include "sched/worker.h"

#include <ctime>
#include <latch>

#include "alloc/asym_fence.h"
#include "alloc/check.h"
#include "alloc/prefetch.h"
#include "sched/scheduler.h"

namespace weft::sched {

extern thread_local worker* tls_worker;  // defined in park.cc

namespace {

// Go checks its global queue every 61 ticks: a prime, so the check does
// not fall into step with periodic workloads.
constexpr std::uint32_t kInjectInterval = 61;
// Tokio's MAX_LIFO_POLLS_PER_TICK: a message and its receiver stay hot,
// but three hand-offs in a row are enough.
constexpr unsigned kMaxLifoStreak = 3;
// LIFO runs in a row that are first runs, or follow an exit (see *Depth
// first*): deeper than any fork-join tree worth running depth first.
constexpr unsigned kMaxLifoChain = 64;
// Fibers one run of a fiber may put into the displaced queue; past that
// it is a spawn loop, not a parent about to join its children, and what
// it displaces goes to the local queue, as its yield would move it
// (requeue_own_displaced()): two more atomic operations each, on a line
// thieves take from, cost spawn_join 14% on two workers.
constexpr std::uint32_t kMaxDisplacedPerRun = 16;
// Ticks the displaced queue may go without draining before its fibers
// go to the local queue (see move_displaced_to_local()): a tick is a fiber
// run, so a tenth of a second or more.
constexpr std::uint32_t kDisplacedPatience = std::uint32_t{1} << 20;
// A hand-off target runs the pending step on its own stack (see
// *Hand-off*); below this, its stack may be too small for that.
constexpr std::size_t kHandoffMinStack = 8 * 1024;
// See worth_stealing().
constexpr auto kLoneStealDelay = std::chrono::microseconds(100);
// See steal_lifo(). As long as kLoneStealDelay, for the same reason: at
// 20 µs a producer woken into the slot by a consumer that then drained a
// 1,024-slot channel (~25 µs) was taken ~130 times a run, splitting the
// pair (fanin 37-43 Mmsg/s, bimodal, against 45 on one worker).
constexpr auto kLifoStealDelay = std::chrono::microseconds(100);
// See steal_timers().
constexpr auto kTimerStealDelay = std::chrono::microseconds(200);
// A busy worker still polls its driver this often, so I/O completions are
// not held back by a long queue of runnable fibers.
constexpr std::uint32_t kPollInterval = 61;
// Fibers moved from the inject queue to the local queue at once.
constexpr std::uint32_t kInjectBatch = 32;
constexpr int kStealRounds = 2;
// Pause instructions (~40 cycles each on current x86) between the probes of
// wait_for_steal_candidate(), so probing does not hammer the victims'
// cache lines.
constexpr int kPausesPerProbe = 32;
// Stacks whose pages an idle worker returns before it sleeps: ~1 ms of
// madvise calls, so a wake-up right after is not delayed by much more.
constexpr std::size_t kTrimBudget = 256;

std::uint64_t next_random(std::uint64_t& s) noexcept {  // xorshift64*
  s ^= s >> 12;
  s ^= s << 25;
  s ^= s >> 27;
  return s * 0x2545F4914F6CDD1DULL;
}

}  // namespace

worker::worker(scheduler& s, unsigned index,
               std::vector<std::vector<unsigned>> steal_groups)
    : sched_(s),
      index_(index),
      steal_groups_(std::move(steal_groups)),
      rng_(0x9E3779B97F4A7C15ULL * (index + 1)) {}

void worker::init_steal_state(unsigned workers) {
  last_seen_.assign(workers, lone_look{});
  alone_ = workers == 1;
  asym_lifo_ = !alone_ && asym_fence::available();
}

// The LIFO slot's old value, v stored in its place. acquire: the old fiber
// is ours to run or queue; release: publishes v to a thief's CAS
// (steal_lifo). Alone, no thief can empty the slot between a load and a
// store, so those do (the orders cost nothing on x86 and keep the edges).
//
// *Asymmetric LIFO takes*. With several workers a thief may empty the slot
// between our load and our store, and both would run the fiber. An
// exchange rules that out, but a locked instruction here was the most
// expensive one of a message hand-off: 16 % of bench/micro pingpong's
// samples (it waits for the stores before it, the channel's among them),
// to guard against a steal that happens only after the same fiber sat in
// the slot for kLifoStealDelay while this worker ran nothing else. So
// the cost goes to the thief (asym_fence.h):
//
//   owner (here)                         thief (steal_lifo())
//   ------------                         --------------------
//   lifo_taking_ = 1                     lifo_thieves_ += 1 (if it was not
//   asym_fence::light()                    0, another thief is at it: stop)
//   if lifo_thieves_ == 0:               asym_fence::heavy()
//     old = lifo_; lifo_ = v             if lifo_taking_ == 0 (and the
//   else: old = exchange(lifo_, v)         owner still ran nothing else):
//   lifo_taking_ = 0                       CAS lifo_ (l -> 0)
//                                        lifo_thieves_ -= 1
//
// Either the owner sees the thief and exchanges (the two RMWs then decide
// it), or the thief sees lifo_taking_ = 1 and gives up this time, or the
// owner's whole section came before the thief's fence, whose CAS then
// sees the owner's store. Stores become visible in order on x86, and the
// release store of lifo_taking_ = 0 keeps that order on weaker machines.
std::uintptr_t worker::exchange_lifo(std::uintptr_t v) noexcept {
  if (alone_) {
    std::uintptr_t old = lifo_.load(std::memory_order_acquire);
    lifo_.store(v, std::memory_order_release);
    return old;
  }
  if (asym_lifo_) [[likely]] {
    // relaxed: ordered before the load below by light() and a thief's
    // heavy(), which the C++ model does not know of (see above).
    lifo_taking_.store(1, std::memory_order_relaxed);
    asym_fence::light();
    // acquire: pairs with a thief's release decrement, so a CAS it made
    // is seen by the load below.
    if (lifo_thieves_.load(std::memory_order_acquire) == 0) [[likely]] {
      std::uintptr_t old = lifo_.load(std::memory_order_acquire);  // as the exchange's
      lifo_.store(v, std::memory_order_release);                      // as the exchange's
      // release: a thief that reads 0 after its fence sees our store above
      // (its acquire load pairs with this).
      lifo_taking_.store(0, std::memory_order_release);
      return old;
    }
    lifo_taking_.store(0, std::memory_order_relaxed);  // the exchange below decides
  }
  return lifo_.exchange(v, std::memory_order_acq_rel);
}

// ---- The loop -------------------------------------------------------------

fiber* worker::find_runnable() {
  ++tick_;
  // The driver and the timers before the inject queue's early return: on
  // a busy worker (yields and hand-offs switching past the loop) the
  // periodic tick is the only pass that reaches them, and with the inject
  // queue never empty (more runnable fibers than the local queue holds
  // overflow there) returning first would leave them unreached for good.
  // On the periodic tick the inject queue before the driver: what waits
  // there (woken by plain threads, or overflowed) became runnable before
  // what the poll would add, so it takes the room first (see take_inject).
  // The monitor's request (duties_due_) does all of this once more:
  // cleared before the duties run, so a request made after this costs one
  // more pass, never a missed one. relaxed: a hint; loaded first so the
  // common case writes nothing. Such a pass lands anywhere in the 61-tick
  // cycle, perhaps with the local queue nearly full, and a poll takes its
  // first completion whatever the room (sched::wake_budget), which would
  // overflow the queue's older half to the back of the inject queue. So
  // the inject batch of either pass leaves the poll a slot, and the poll
  // is skipped if the queue is full and no fiber has left it since the
  // last poll (the passes between returned the inject queue's fiber, the
  // LIFO slot's or a pinned one): it would only force in one completion
  // for I/O the last poll let in moments ago. The next pass that finds
  // the queue moved polls; the monitor asks again if none does.
  const bool asked = duties_due_.load(std::memory_order_relaxed);
  if (asked) duties_due_.store(false, std::memory_order_relaxed);
  fiber* injected =
      asked || tick_ % kInjectInterval == 0 ? take_inject(/*keep_free=*/1) : nullptr;
  if ((asked || tick_ % kPollInterval == 0) &&
      (local_.room() != 0 || local_.head_stamp() != head_at_poll_))
    poll_driver();
  fire_timers();
  if (injected) return injected;
  if (fiber* f = next_local()) return f;
  if (fiber* f = take_inject()) return f;
  poll_driver();
  if (fiber* f = next_local()) return f;
  if (fiber* f = steal()) return f;
  if (fiber* f = wait_for_steal_candidate()) return f;
  sleep();
  return nullptr;
}

// A spinning worker that found nothing sleeps at once, unless it is timing
// a steal candidate (a lone fiber or a LIFO fiber: see worth_stealing()
// and steal_lifo()). Then it keeps probing until a probe has run with the
// candidate's delay up, within kLoneStealDelay: sleeping first would leave
// the candidate to a victim that may be stuck. Not "until the delay is
// up": the probe before that moment finds the delay not quite up, and one
// after it is what takes the candidate. Stopping at the moment itself
// (4c45ae6; and before it, at the end of a 50 µs spin this thread may be
// descheduled past) lost LIFO candidates now and then, and the last
// spinner's re-check in sleep() looks at run queues, not LIFO slots: a
// spawner's child waited for the monitor while a worker slept
// (runtime/fiber_test.cc, FibersTwoWorkers). candidate_until_ is cleared
// when such a probe starts, so a set one means a candidate seen since, its
// delay perhaps already up.
//
// It used to probe for 50 µs more in any case, since a futex wake-up costs
// 20-30 µs each way here. Measured against that (bench/micro, alternating,
// medians of 3-5): spawn_join 93.8/92.9 ns, skynet 283/282 ms, yield,
// pingpong and fanin the same, skynet_handles 223/232 ms; mutex 23-34 ->
// 12 ns. With two workers serving echo connections beside the load
// generator, the spinning was a fifth of the server's CPU, taken from the
// generator: 112k -> 123k requests/s at C=1000. Go's spinning Ms give up
// after a few rounds of stealing, without a time.
fiber* worker::wait_for_steal_candidate() {
  if (!spinning_) return nullptr;
  const clock::time_point limit = clock::now() + kLoneStealDelay;
  while (candidate_until_ != clock::time_point{}) {
    clock::time_point now = clock::now();
    bool last = now >= candidate_until_ || now >= limit;
    if (last)
      candidate_until_ = {};  // this probe's steal() reads a clock at least `now`
    else
      for (int i = 0; i < kPausesPerProbe; ++i) __builtin_ia32_pause();
    fire_timers();
    if (fiber* f = next_local()) return f;
    if (fiber* f = take_inject()) return f;
    if (fiber* f = steal()) return f;  // may set candidate_until_ again
    if (now >= limit) break;  // a candidate it set is probed at the next wait
  }
  return nullptr;
}

void worker::run_fiber(fiber* f) {
  if (spinning_) stop_spinning();
  current_ = f;
  displaced_by_current_ = 0;
  refill_budget();
  f->last_worker_.store(index_, std::memory_order_relaxed);  // relaxed: observability
  worker_counters::bump(counters_.fibers_run);
  if (!f->stack_) sched_.bind_stack(f, index_);  // its first run
  running_id_.store(f->id_, std::memory_order_relaxed);  // relaxed: for the monitor
  // SAFETY: f is runnable and was taken from a queue only this worker
  // popped, so no other thread runs or resumes it (see sched/park.cc).
  switch_context(sched_ctx_, f->ctx_);
  current_ = nullptr;  // whichever fiber switched back (see *Hand-off*)
  running_id_.store(0, std::memory_order_relaxed);
  finish_switch();
}

// ---- Switching away from a fiber -------------------------------------------
//
// *Hand-off*: a fiber that parks, or exits, while the LIFO slot holds the
// fiber it just woke (a message and its receiver, a child and its joining
// parent) switches straight to that fiber instead of through the scheduler
// loop: one switch instead of two. The step that must run after the switch
// (publishing the parked fiber, or freeing the exited one) is left in
// pending_, and whatever context resumes next on this worker — the loop or
// the hand-off target — runs it first, in finish_switch(). The LIFO streak
// limit applies while other fibers wait (others_waiting()), so the loop
// still gets its turn for them after at most kMaxLifoStreak hand-offs;
// I/O polling, timers and the inject queue also get theirs on the
// periodic ticks, whatever the streak.
//
// *Direct yield*: a yield switches straight to the fiber the loop would
// take next from its queues (pop_queued()), on a tick without periodic
// duties (due timers wait for those) or one whose duties would find
// nothing to do (periodic_duties_idle(): the inject queue empty, no timer
// due, the driver idle), with nothing in the LIFO slot, the pinned queue
// or the inbox (the loop orders those), and no duties the monitor asked
// for (duties_due_). The pending step puts the yielding fiber at the
// tail of the local queue, as the loop would. Two fibers taking turns on a
// worker then cost one switch per yield instead of two plus a loop pass.
// Hand-offs (take_handoff()) go past the loop on the same ticks.

void worker::switch_away(after_switch what, const park_request* req) {
  switch_to(what, req,
            what == after_switch::yield
                ? nullptr
                : take_handoff(current_, /*exiting=*/what == after_switch::exit));
}

void worker::switch_to(after_switch what, const park_request* req, fiber* to) {
  fiber* from = current_;
  pending_ = {what, from, req};
  if (to) {
    if (!to->stack_) sched_.bind_stack(to, index_);  // its first run
    current_ = to;
    displaced_by_current_ = 0;
    refill_budget();
    running_id_.store(to->id_, std::memory_order_relaxed);  // relaxed: for the monitor
    to->last_worker_.store(index_, std::memory_order_relaxed);  // relaxed: observability
    worker_counters::bump(counters_.fibers_run);
    // SAFETY: `to` came out of the LIFO slot by our exchange, or off our
    // local queue by our pop, so no thief has it (see steal_lifo(), and the
    // run queue's invariants).
    switch_context(from->ctx_, to->ctx_, what == after_switch::exit);
    // Resumed, possibly on another worker: `this` may not be ours now.
    current_worker()->finish_switch();
    return;
  }
  switch_context(from->ctx_, sched_ctx_, what == after_switch::exit);
  current_worker()->finish_switch();
}

// Its stack runs the pending step (publish, free, requeue): not on the
// tiniest. Binding a stack to a fiber that never ran calls into the stack
// pool (perhaps mmap) on `from`'s stack: not on the tiniest either.
bool worker::handoff_stack_ok(const fiber* from, const fiber* to) const noexcept {
  return to->stack_want_ >= kHandoffMinStack &&
         (to->stack_ || from->stack_.size() >= kHandoffMinStack);
}

// Where a yielding fiber is, for dump().
static void record_where(fiber* f, const std::source_location& where) noexcept {
  f->park_file_.store(where.file_name(), std::memory_order_relaxed);  // relaxed: diagnostic
  f->park_line_.store(where.line(), std::memory_order_relaxed);
}

// yield(): one pass over what the loop would look at next (see *Direct
// yield*). Nothing else runnable here: the caller continues in place (the
// loop would pick it again at once). The local queue's head is next: a
// direct switch to it. Anything else (a tick with periodic duties to do,
// the LIFO slot, pinned fibers, the inbox, duties the monitor asked for):
// through the loop, which orders and does those. Returns when the
// caller runs again, possibly on another worker.
void worker::yield_current(const std::source_location& where) {
  if (displaced_by_current_) requeue_own_displaced();
  fiber* from = current_;
  std::uint32_t next = tick_ + 1;
  // relaxed: our own slot; the inbox flag is a hint (drain_inbox() orders;
  // a push racing with this check is seen at the next tick). A yield
  // reads no clock (~20 ns here): a due timer, like the driver, waits for
  // the next periodic tick, kPollInterval yields away, or, if the fibers
  // compute between yields so that this is long, for the monitor to set
  // duties_due_ (relaxed: a hint, as the inbox flag).
  bool loop_first = lifo_.load(std::memory_order_relaxed) || pinned_head_ ||
                    inbox_nonempty_.load(std::memory_order_relaxed) ||
                    duties_due_.load(std::memory_order_relaxed) ||
                    ((next % kInjectInterval == 0 || next % kPollInterval == 0) &&
                     !periodic_duties_idle());
  if (!loop_first) {
    if (local_.empty_approx() && (!displaced_used_ || displaced_.empty_approx())) {
      if (sched_.inject_.empty_hint()) {
        // In place. A tick with periodic duties goes through the loop,
        // which counts it itself: only this path advances tick_ here.
        tick_ = next;
        worker_counters::bump(counters_.yields);
        refill_budget();
        return;
      }
    } else if (fiber* to = pop_queued()) {
      if (handoff_stack_ok(from, to)) {
        tick_ = next;
        record_where(from, where);
        switch_to(after_switch::yield, nullptr, to);
        return;
      }
      // The loop runs it next from the LIFO slot: empty (checked above),
      // and only this worker fills it. release: publishes it to a thief's
      // CAS, as in schedule_local(). It was the queue's head, so no LIFO
      // streak may send it to the tail instead.
      lifo_.store(reinterpret_cast<std::uintptr_t>(to), std::memory_order_release);
      lifo_streak_ = lifo_chain_ = 0;
    }
  }
  record_where(from, where);
  switch_to(after_switch::yield, nullptr, nullptr);
}

// *Coop yield* (spend_budget() in park.h): behind the inject queue when it
// holds fibers, as Go's Gosched and preemption put a goroutine on the
// global queue. What waits there is mostly what overflowed this worker's
// local queue, so a fiber whose operations keep making work (a spawn
// loop) would, yielding to the local tail, be back after at most a queue's
// worth of it, and run ahead of the rest without bound: in spawn_join on
// one worker every one of the million fibers was alive at once, their
// memory fresh pages (480 ns a fiber; 130 behind the inject queue). Behind
// it the spawner is back once all it spawned before have run, so their
// stacks and control blocks are reused warm. (Any worker may take it
// there; a pinned fiber keeps to its own queue.) The emptiness check is
// a hint: a queue that only looks empty means the yield stays local.
void worker::coop_yield() {
  if (displaced_by_current_) requeue_own_displaced();
  fiber* from = current_;
  if (from->home_ || sched_.inject_.empty_hint()) {
    yield_current(std::source_location::current());
    return;
  }
  record_where(from, std::source_location::current());
  switch_to(after_switch::yield_behind, nullptr, nullptr);
}

// The hot fiber in the LIFO slot, if a hand-off to it is allowed now.
fiber* worker::take_handoff(const fiber* from, bool exiting) noexcept {
  // The streak limits protect whoever waits behind the pair; with nobody
  // waiting, the loop would only put the fiber back and take it again.
  if (!lifo_allowed() && others_waiting()) return nullptr;
  // relaxed: our own slot; a thief can only empty it, which the exchange
  // below sees.
  if (lifo_.load(std::memory_order_relaxed) == 0) return nullptr;
  // The loop's periodic duties come first on their ticks (unless it would
  // find none: periodic_duties_idle()), and once the monitor asked for
  // them (relaxed: a hint; see duties_due_).
  std::uint32_t next = tick_ + 1;
  if (duties_due_.load(std::memory_order_relaxed) ||
      ((next % kInjectInterval == 0 || next % kPollInterval == 0) && !periodic_duties_idle()))
    return nullptr;
  // Take it before reading it: a thief may take it meanwhile (steal_lifo).
  std::uintptr_t v = exchange_lifo(0);
  fiber* to = reinterpret_cast<fiber*>(v & ~kPinnedTag);
  if (!to) return nullptr;
  if (!handoff_stack_ok(from, to)) {
    lifo_.store(v, std::memory_order_release);  // back; only we fill the slot
    return nullptr;
  }
  tick_ = next;
  count_lifo_run(to, exiting);
  return to;
}

// Any fiber besides the LIFO slot's that waits for this worker's loop: in
// its local, pinned or inbox queue, or the inject queue. Hints (relaxed; a
// push racing with them is seen by the loop's next turn, as in
// yield_current()). Due timers are not looked at, as in yield_current():
// the loop fires them at the next periodic tick, or once the monitor set
// duties_due_, neither of which take_handoff() skips (it goes past a
// periodic tick only when no timer is due: periodic_duties_idle()).
bool worker::others_waiting() const noexcept {
  // relaxed: hints, as above.
  return !queues_empty_approx() || pinned_head_ ||
         inbox_nonempty_.load(std::memory_order_relaxed) || !sched_.inject_.empty_hint();
}

// On a periodic tick, a yield or hand-off that would go through the loop
// for its duties there (the inject queue, the driver, due timers): true
// if the loop would find nothing to do, and the switch may go past it as
// on any other tick. Two switches and the pass cost ~100 ns a periodic
// tick: 1.6 ns of every yield between two fibers (bench/micro yield,
// A/B). Hints, as the loop's own looks: work that arrives just after is
// taken at the next periodic tick, as after a poll. It sets head_at_poll_
// as the skipped poll would have (see find_runnable()), but does not
// count as a poll for the monitor (loop_polls_): a worker that only skips
// still gets a real pass once a monitor period (duties_due_), ~100 ns
// every 10 ms, so a state driver::idle() misjudges waits one period at
// most, not until some fiber parks.
bool worker::periodic_duties_idle() noexcept {
  if (!sched_.inject_.empty_hint()) return false;
  if (timers_.size() != 0 && !surely_later(timers_.next_deadline(), clock::duration::zero()))
    return false;
  if (!driver_->idle()) return false;
  head_at_poll_ = local_.head_stamp();
  return true;
}

// The fiber in the LIFO slot, taken (null if empty or stolen).
fiber* worker::take_lifo() noexcept {
  // relaxed load first: most calls find it empty and need no RMW.
  if (lifo_.load(std::memory_order_relaxed) == 0) return nullptr;
  return reinterpret_cast<fiber*>(exchange_lifo(0) & ~kPinnedTag);
}

void worker::finish_switch() {
  pending_switch p = std::exchange(pending_, pending_switch{});
  // A stack without a guard page (kSmallStack): its canary, checked here,
  // on the next context's stack (the loop's, or a hand-off target's of at
  // least kHandoffMinStack), after the switch's own pushes, and before the
  // fiber is published or its stack freed. Reporting on the overflowed
  // stack itself would write further into its neighbours.
  if (p.from) sched_.check_canary(p.from);
  switch (p.what) {
    case after_switch::none:
      break;
    case after_switch::yield:
      worker_counters::bump(counters_.yields);
      push_local_inline(p.from);
      break;
    case after_switch::yield_behind:
      worker_counters::bump(counters_.yields);
      sched_.inject_.push(p.from);  // never pinned: see coop_yield()
      // Work only a woken worker may find (*Spinning*): as Go's Gosched
      // does wakep() after globrunqput. Once per coop slice at most.
      sched_.wake_idle_worker(/*fenced=*/true);
      break;
    case after_switch::park:
      after_park(p.from, *p.req);
      break;
    case after_switch::exit:
      sched_.exited(p.from, index_);
      break;
  }
}

void worker::run(const alloc::topology* pin_to, const driver_factory& make_driver,
                 std::latch& ready) {
  if (pin_to) {
    if (std::error_code ec = pin_to->pin_current_thread(index_))
      std::fprintf(stderr, "weft: worker %u not pinned: %s\n", index_,
                   ec.message().c_str());
  }
  alloc::enable_altstack();
  thread_context_init(sched_ctx_);
  driver_ = make_driver ? make_driver(index_) : make_futex_driver();
  ready.count_down();  // the driver exists from here on: others may wake() it
  tls_worker = this;
  // acquire: pairs with request_exit(); nothing else is read through it.
  while (!sched_.exit_.load(std::memory_order_acquire))
    if (fiber* f = find_runnable()) run_fiber(f);
  tls_worker = nullptr;
  driver_->quiesce();  // destroyed with the scheduler, after every thread joined
  alloc::disable_altstack();
}

// ---- Local queues -----------------------------------------------------------

fiber* worker::next_local() {
  if (fiber* f = take_lifo()) {
    if (lifo_allowed()) {
      count_lifo_run(f, /*from_exiting=*/false);
      return f;
    }
    push_local(f);  // its turn is over: behind the local queue, not run next
  }
  lifo_streak_ = lifo_chain_ = 0;
  // relaxed: a hint; drain_inbox() takes the lock, which orders the list.
  if (inbox_nonempty_.load(std::memory_order_relaxed)) drain_inbox();
  bool pinned_first = tick_ & 1;  // alternate so neither queue starves
  if (pinned_first && pinned_head_) {
    fiber* f = pinned_head_;
    pinned_head_ = f->next_;
    if (!pinned_head_) pinned_tail_ = nullptr;
    return f;
  }
  if (fiber* f = pop_queued()) {
    // The control block of the fiber behind it is often cold here (written
    // by the worker that spawned or woke it, or stolen in a batch): start
    // loading it while f runs. Its first two lines hold what run_fiber()
    // and bind_stack() read and write first. The next pop_queued() tries
    // the other queue first.
    fiber* next = local_first_ && displaced_used_ ? displaced_.peek_hint() : nullptr;
    if (!next) next = local_.peek_hint();
    if (!next && displaced_used_) next = displaced_.peek_hint();
    if (next) {
      alloc::prefetch_for_write(next);
      alloc::prefetch_for_write(reinterpret_cast<const char*>(next) + 64);
    }
    return f;
  }
  if (pinned_head_) {
    fiber* f = pinned_head_;
    pinned_head_ = f->next_;
    if (!pinned_head_) pinned_tail_ = nullptr;
    return f;
  }
  return nullptr;
}

bool worker::lifo_allowed() const noexcept {
  return lifo_streak_ < kMaxLifoStreak && lifo_chain_ < kMaxLifoChain;
}

// A run from the LIFO slot: a first run, or one after an exit, extends a
// chain; anything else, a ping-pong streak (see *Depth first*).
void worker::count_lifo_run(const fiber* to, bool from_exiting) noexcept {
  if (from_exiting || !to->stack_)
    ++lifo_chain_;
  else
    ++lifo_streak_;
  worker_counters::bump(counters_.lifo_runs);
}

// A fiber the LIFO slot gave up for a newer one: to the head of the
// displaced queue (*Depth first*); pinned, past kMaxDisplacedPerRun, or
// with that queue full, where push_local() puts it.
void worker::push_displaced(fiber* f) noexcept {
  if (f->home_ || displaced_by_current_ >= kMaxDisplacedPerRun || !displaced_.push_front(f)) {
    push_local(f);
    return;
  }
  if (!displaced_used_) displaced_since_ = tick_;  // it was empty
  displaced_used_ = true;
  ++displaced_by_current_;
}

// pop_queued() with fibers perhaps in the displaced queue: taking turns
// between the two queues while both hold fibers (*Depth first*).
fiber* worker::pop_queued_both() noexcept {
  if (tick_ - displaced_since_ >= kDisplacedPatience) {
    move_displaced_to_local(kDisplacedCapacity);  // see *Depth first*
    displaced_since_ = tick_;
  }
  local_first_ = !local_first_;
  if (local_first_) {
    if (fiber* f = pop_local()) return f;
  }
  if (fiber* f = pop_displaced()) return f;
  displaced_used_ = false;  // empty, and only we push into it
  return local_first_ ? nullptr : pop_local();
}

// The displaced queue is a stack: a fiber at its bottom waits until it
// drains. Two ways it is made to:
// - a fiber that yields (or is made to) means to let the others run: what
//   it displaced since it started running goes to the local queue's tail
//   (requeue_own_displaced()), as before there was a displaced queue, so a
//   loop that spawns two helpers and yields does not bury the bottom;
// - a fiber that displaces and parks, woken to do it again, can: once the
//   queue has not drained for kDisplacedPatience ticks, all of it goes to
//   the local queue's tail (pop_queued_both()). Long, because a fork-join
//   tree's oldest displaced fibers are its largest subtrees: starting them
//   early keeps them alive at once (taking the oldest every 4,096 ticks
//   made skynet 3.6 times slower on one worker).
// The `most` newest, moved oldest first (thieves may take some meanwhile).
void worker::move_displaced_to_local(std::uint32_t most) noexcept {
  std::uint32_t n = 0;
  while (n < most)
    if (fiber* f = pop_displaced())
      displaced_scratch_[n++] = f;  // newest first
    else
      break;
  while (n > 0) push_local(displaced_scratch_[--n]);
}

void worker::requeue_own_displaced() noexcept {
  move_displaced_to_local(displaced_by_current_);
  displaced_by_current_ = 0;
}

// Out of line: inlined into schedule_local(), it cost that function more
// registers on its hot path (the LIFO slot) than the call saved.
[[gnu::noinline]] void worker::push_local(fiber* f) noexcept { push_local_inline(f); }

void worker::push_pinned(fiber* f) noexcept {
  f->next_ = nullptr;
  if (pinned_tail_)
    pinned_tail_->next_ = f;
  else
    pinned_head_ = f;
  pinned_tail_ = f;
}

void worker::schedule_local(fiber* f, bool hot, bool share) noexcept {
  if (hot) {
    std::uintptr_t v = reinterpret_cast<std::uintptr_t>(f) | (f->home_ ? kPinnedTag : 0);
    // An empty slot stays empty until we fill it (thieves only empty it),
    // so a store does; a full one may be emptied under us: exchange.
    // release: publishes f to a thief's CAS (steal_lifo); acquire (the
    // exchange): the displaced fiber is ours to queue.
    std::uintptr_t old = 0;
    if (lifo_.load(std::memory_order_relaxed) == 0)
      lifo_.store(v, std::memory_order_release);
    else
      old = exchange_lifo(v);
    if (old) {
      push_displaced(reinterpret_cast<fiber*>(old & ~kPinnedTag));
    } else if (!share) {
      return;  // only the LIFO slot changed: we run it when the caller parks
    }
  } else {
    // The loop's wakes (I/O completions): a peer is woken only for work it
    // could take while we run something else. A fiber that is the only
    // one runnable here we, in our loop, run next; a peer would steal it
    // (after kLoneStealDelay: worth_stealing()) only to find it gone.
    // Waking a peer for it cost a sleep and a wake-up each (~25 µs here)
    // for nothing: with two workers serving echo connections, half of all
    // wake-ups. So: something a peer could take (the local queue, an
    // unpinned LIFO fiber) and something else we run before or after it
    // (the rest of the local queue, the LIFO slot, the pinned queue:
    // Tokio's should_notify_others counts its LIFO slot too). Counting the
    // local queue alone left a lone fiber reaped with a pinned one, or
    // behind a LIFO fiber on a periodic poll, unshared: if the other one
    // then computed, it waited for the monitor (10-20 ms) while a worker
    // slept. f itself is not read after the push: from then on a thief may
    // run it, and it may exit and be freed (62800f4).
    push_local(f);
    if (!has_stealable_work()) return;
    // relaxed: our own slot.
    std::uint32_t here = queues_size_approx() + (lifo_.load(std::memory_order_relaxed) != 0) +
                         (pinned_head_ != nullptr);
    if (here < 2) return;
  }
  sched_.wake_idle_worker();
}

void worker::push_inbox(fiber* f) noexcept {
  f->next_ = nullptr;
  {
    std::lock_guard g(inbox_lock_);
    if (inbox_tail_)
      inbox_tail_->next_ = f;
    else
      inbox_head_ = f;
    inbox_tail_ = f;
  }
  // seq_cst store then seq_cst load of sleeping_: StoreLoad with sleep(),
  // which stores sleeping_ and then loads inbox_nonempty_.
  inbox_nonempty_.store(true, std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_seq_cst)) driver_->wake();
}

void worker::drain_inbox() noexcept {
  fiber* head;
  {
    std::lock_guard g(inbox_lock_);
    head = std::exchange(inbox_head_, nullptr);
    inbox_tail_ = nullptr;
    inbox_nonempty_.store(false, std::memory_order_relaxed);  // relaxed: under the lock
  }
  while (head) {
    fiber* next = head->next_;
    push_local(head);
    head = next;
  }
}

// A full local queue's older half (and the fiber pushed), to the inject
// queue's tail.
void worker::overflow(fiber** batch, std::uint32_t n) noexcept {
  sched_.inject_.push_batch(batch, n);
  worker_counters::bump(counters_.overflowed, n);
}

std::size_t run_queue_room() noexcept {
  worker* w = tls_worker;
  return w ? w->local_room() : SIZE_MAX;
}

// A non-blocking flush and poll of the driver, counted for the monitor
// (see duties_due_ in worker.h); notes where the local queue's head was,
// for the next duties pass (see find_runnable()).
void worker::poll_driver() {
  driver_->flush();
  driver_->poll();
  head_at_poll_ = local_.head_stamp();
  // relaxed: single writer; the monitor compares snapshots.
  loop_polls_.store(loop_polls_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

fiber* worker::take_inject(std::uint32_t keep_free) {
  fiber* batch[kInjectBatch];
  // No more than the local queue takes: an overflow would send its older
  // half back behind the batch (the first fiber runs at once). Less by
  // keep_free while the queue has that much room (see find_runnable()).
  const std::uint32_t room = local_.room();
  const std::uint32_t want = room + 1 - std::min(keep_free, room);
  std::uint32_t n = sched_.inject_.pop_batch(batch, std::min(kInjectBatch, want));
  if (n == 0) return nullptr;
  worker_counters::bump(counters_.inject_pops, n);
  // Never pinned (those go to their worker's inbox), so straight into the
  // stealable queue without touching the fibers' control blocks.
  for (std::uint32_t i = 1; i < n; ++i)
    local_.push(batch[i], [this](fiber** more, std::uint32_t k) { overflow(more, k); });
  if (n > 1) sched_.wake_idle_worker();
  return batch[0];
}

void worker::fire_timers() {
  if (timers_.size() == 0) return;
  // A server's timers are idle timeouts seconds away: nothing is due, and
  // the coarse clock says so without a precise clock read on every turn
  // (0.7% of the echo server's CPU at C=50; the reads of the I/O deadlines
  // took 1.5% more, see io/uring_driver.cc).
  if (surely_later(timers_.next_deadline(), clock::duration::zero())) return;
  unsigned n = timers_.fire_expired(clock::now(), [this](fiber* f) { push_local(f); });
  // More fibers than this worker runs next: as Go's timers wake a P, so
  // sleepers due together run in parallel (stealable from local_).
  if (n > 1) sched_.wake_idle_worker(/*fenced=*/true);
}

bool worker::has_overdue_timers(clock::time_point now) const noexcept {
  return timers_.next_deadline() <= now - kTimerStealDelay;
}

// A worker stuck in one fiber (computing without parking) fires none of
// its timers: a sleep, a deadline or select's weft::after on it would wait
// for that fiber to park, however long. So a thief fires the timers that
// are overdue by kTimerStealDelay — more than a worker that gets back to
// its loop ever leaves them, even one that was asleep and woke late — and
// runs the fibers they wake (pinned ones go home). The monitor wakes an
// idle worker for this when no one spins. The heap's lock is only tried:
// an owner holding it is not stuck.
fiber* worker::steal_timers(worker& victim) noexcept {
  if (victim.timers_.size() == 0) return nullptr;  // the common case: no clock read
  clock::time_point now = clock::now();
  if (!victim.has_overdue_timers(now)) return nullptr;
  fiber* first = nullptr;
  unsigned n = victim.timers_.fire_expired(
      now,
      [&](fiber* f) {
        if (f->home_ && f->home_ != this)
          f->home_->push_inbox(f);
        else if (!first)
          first = f;
        else
          push_local(f);
      },
      /*try_only=*/true);
  if (n == 0) return first;
  worker_counters::bump(counters_.timer_steals, n);
  if (n > 1) sched_.wake_idle_worker();  // more than we run next
  return first;
}

// ---- Stealing and spinning ----------------------------------------------------

bool worker::try_spin() noexcept {
  if (spinning_) return true;
  unsigned n = sched_.worker_count();
  // relaxed: a heuristic bound on spinners; correctness rests on the
  // seq_cst operations and fences in stop_spinning() and sleep().
  unsigned busy = n - sched_.nidle_.load(std::memory_order_relaxed);
  if (2 * sched_.nspinning_.load(std::memory_order_relaxed) >= busy) return false;
  spinning_ = true;
  sched_.nspinning_.fetch_add(1, std::memory_order_seq_cst);  // see *Spinning*
  return true;
}

void worker::stop_spinning() noexcept {
  spinning_ = false;
  // seq_cst: see *Spinning*; the last spinner to find work wakes another.
  // fenced: the decrement and the loads of nidle_ in wake_idle_worker()
  // form a StoreLoad with a worker registering as idle.
  if (sched_.nspinning_.fetch_sub(1, std::memory_order_seq_cst) == 1)
    sched_.wake_idle_worker(/*fenced=*/true);
}

fiber* worker::steal() {
  if (sched_.worker_count() == 1 || !try_spin()) return nullptr;
  for (int round = 0; round < kStealRounds; ++round) {
    for (const auto& group : steal_groups_) {
      std::size_t start = next_random(rng_) % group.size();
      for (std::size_t k = 0; k < group.size(); ++k) {
        unsigned v = group[(start + k) % group.size()];
        worker& victim = sched_.worker_at(v);
        if (worth_stealing(v, victim)) {
          // The local queue first: what waits there has waited longer.
          std::uint32_t before = local_.size_approx();
          fiber* f = local_.steal_from(victim.local_);
          if (!f) f = local_.steal_from(victim.displaced_);
          if (f) {
            worker_counters::bump(counters_.steals, 1 + local_.size_approx() - before);
            return f;
          }
        }
        if (fiber* f = steal_lifo(v, victim)) return f;
        if (fiber* f = steal_timers(victim)) return f;
      }
    }
    if (fiber* f = take_inject()) return f;
  }
  return nullptr;
}

// A victim with a single runnable fiber is often running its partner: a
// consumer that just woke a producer, a message and its receiver. Taking
// that one fiber splits the pair over two cores, and every message then
// moves a cache line between them (fanin: 35-57 Mmsg/s on one worker,
// 6-14 split over two). So a lone fiber is taken only after it has waited
// there, untouched, for kLoneStealDelay: long enough for a worker that
// passes messages to get back to it (bounded by the LIFO streak), short
// against any time slice a user would notice. Go waits ~3 µs before
// stealing a runnext for the same reason; our LIFO slot gets the same
// treatment (steal_lifo()).
bool worker::worth_stealing(unsigned v, const worker& victim) noexcept {
  std::uint32_t n = victim.queues_size_approx();
  if (n != 1) return n > 1;
  std::uint64_t pos =
      victim.local_.position_approx() ^ (victim.displaced_.position_approx() << 1 | 1);
  lone_look& seen = last_seen_[v];
  clock::time_point now = clock::now();
  if (seen.pos != pos) {
    seen.pos = pos;
    seen.since = now;
    candidate_until_ = std::max(candidate_until_, now + kLoneStealDelay);
    return false;
  }
  return now - seen.since >= kLoneStealDelay;
}

// The LIFO slot is never stolen from a worker that is switching fibers:
// it is the next fiber there, and taking it would split a hand-off pair.
// But a fiber left in it by a fiber that then computes without parking (a
// spawner, or a waker, that goes on for milliseconds) would wait for all of
// that while other workers idle. So, as Go steals a runnext that waited
// ~3 µs, a thief takes it once the same fiber has sat there for
// kLifoStealDelay while the victim ran no other fiber (its fibers_run did
// not move). Pinned fibers carry kPinnedTag and are never taken; the fiber
// is not touched before the CAS makes it ours.
fiber* worker::steal_lifo(unsigned v, worker& victim) noexcept {
  lone_look& seen = last_seen_[v];
  // relaxed: a snapshot; the CAS below validates it.
  std::uintptr_t l = victim.lifo_.load(std::memory_order_relaxed);
  if (l == 0 || (l & kPinnedTag)) {
    seen.lifo = 0;
    return nullptr;
  }
  // relaxed: a progress hint, single writer.
  std::uint64_t runs = victim.counters_.fibers_run.load(std::memory_order_relaxed);
  clock::time_point now = clock::now();
  if (seen.lifo != l || seen.runs != runs) {
    seen.lifo = l;
    seen.runs = runs;
    seen.lifo_since = now;
    candidate_until_ = std::max(candidate_until_, now + kLifoStealDelay);
    return nullptr;
  }
  if (now - seen.lifo_since < kLifoStealDelay) return nullptr;
  // The owner takes from its slot without a locked instruction: announce
  // ourselves and fence both sides before the CAS (*Asymmetric LIFO
  // takes* at exchange_lifo()). The fence, ~30-50 µs here, interrupts
  // every CPU that runs one of our threads, so one thief at a time fences
  // a victim: a thief that finds another one announced leaves the fiber to
  // it. So a stuck victim costs one fence a kLifoStealDelay, whatever the
  // number of workers.
  bool give_up = false;
  if (victim.asym_lifo_) {
    // relaxed: heavy() orders it before the owner's later loads.
    if (victim.lifo_thieves_.fetch_add(1, std::memory_order_relaxed) != 0) {
      give_up = true;
    } else {
      asym_fence::heavy();
      // acquire: pairs with the owner's release store of 0, so its store
      // to the slot is visible to the CAS below. An owner in the middle
      // of a take is not stuck; nor is one that ran another fiber while we
      // fenced (relaxed: a progress hint, as above), which may have taken
      // the fiber and put it back, as a hand-off pair does.
      give_up = victim.lifo_taking_.load(std::memory_order_acquire) != 0 ||
                victim.counters_.fibers_run.load(std::memory_order_relaxed) != runs;
    }
  }
  // acquire: pairs with the owner's release stores into the slot
  // (schedule_local(), yield_current(), take_handoff()'s put-back,
  // exchange_lifo()) and its exchange.
  bool took = !give_up &&
              victim.lifo_.compare_exchange_strong(l, 0, std::memory_order_acquire,
                                                   std::memory_order_relaxed);
  // release: the owner, reading 0, then sees our CAS (see exchange_lifo()).
  if (victim.asym_lifo_) victim.lifo_thieves_.fetch_sub(1, std::memory_order_release);
  if (!took) return nullptr;
  seen.lifo = 0;
  worker_counters::bump(counters_.steals);
  return reinterpret_cast<fiber*>(l);
}

// ---- Sleeping -----------------------------------------------------------------

bool worker::has_work_hint() const noexcept {
  // seq_cst loads: the sleeper's side of the StoreLoad pattern.
  if (!sched_.inject_.empty_hint()) return true;
  if (inbox_nonempty_.load(std::memory_order_seq_cst)) return true;
  return false;
}

void worker::sleep() {
  if (spinning_) {
    spinning_ = false;
    // seq_cst: the last spinner re-checks every queue after it stops
    // spinning, because publishers skipped waking anyone while it spun.
    if (sched_.nspinning_.fetch_sub(1, std::memory_order_seq_cst) == 1) {
      for (unsigned i = 0; i < sched_.worker_count(); ++i)
        if (!sched_.worker_at(i).queues_empty_approx()) return;  // loop again
      if (has_work_hint()) return;
    }
  }
  // Idle: the moment to return surplus stack pages (see stack_pool::trim).
  if (sched_.stacks_.needs_trim()) sched_.stacks_.trim(kTrimBudget);
  io_when_idle_ = driver_->pending();
  {
    std::lock_guard g(sched_.idle_mu_);
    sched_.idle_.push_back(this);
    in_idle_ = true;
    sched_.nidle_.fetch_add(1, std::memory_order_seq_cst);  // see *Spinning*
    if (sched_.report_deadlock_if_stuck()) return;
  }
  sleeping_.store(true, std::memory_order_seq_cst);  // see push_inbox()
  if (!has_work_hint()) {
    // sleeps and wakeups pair up: one more sleep than wake-ups exactly
    // while the thread is in (or on its way into) the wait. A pass that
    // saw work here and never waited counts neither: it used to count a
    // wake-up, and a worker asleep after two such passes looked awake to
    // the tests that wait for it to sleep (sleeps 2, wake-ups 3: one hung
    // in ~100 runs under load).
    worker_counters::bump(counters_.sleeps);
    driver_->flush();
    driver_->wait(timers_.next_deadline());
    worker_counters::bump(counters_.wakeups);
  }
  sleeping_.store(false, std::memory_order_relaxed);  // relaxed: only a wake hint
  {
    std::lock_guard g(sched_.idle_mu_);
    if (in_idle_) {  // woke by itself (timer, I/O, work seen): leave the list
      in_idle_ = false;
      std::erase(sched_.idle_, this);
      sched_.nidle_.fetch_sub(1, std::memory_order_seq_cst);
    } else {
      spinning_ = true;  // wake_idle_worker() counted us as spinning
    }
  }
  sched_.wake_dozing_monitor();
}

}  // namespace weft::sched
