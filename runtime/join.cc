// runtime/join.cc — the join_state shared by a fiber and its join_handle.
//
// Invariants:
//   - refs_ starts at 2 (the fiber and the handle); whoever drops it to 0
//     deletes the state.
//   - lock_ guards done_, fiber_, waiter_ and waiter_gen_. A wake of the
//     parked joiner (claim) happens under lock_, so the joiner, which takes
//     lock_ to retract its record after a cancel, cannot exit while a
//     completer still holds its token (the rule on claim() in park.h).
//   - error_, unwound_ and the value are written by the fiber before
//     complete() and read by the joiner after wait(): lock_ orders them. A
//     fiber that was unwound has no value; join() throws (take()).
//   - fiber_ is non-null until complete(): request_stop() through the
//     handle touches the fiber only then, under lock_.
//   - A plain thread joins by storing thread_word_ = 1 under lock_ (if not
//     done_) and sleeping on it; complete(), seeing 1 under lock_, stores 2
//     after its unlock and wakes the word. The fiber's reference keeps the
//     state alive across that (it is released after complete()).
#include <sched.h>

#include <system_error>

#include "runtime/waiter.h"
#include "runtime/weft.h"
#include "sched/park.h"

namespace weft::detail {

void join_state_base::lock() noexcept {
  // acquire: pairs with unlock(); the guarded fields are visible after it.
  for (int i = 0; lock_.exchange(true, std::memory_order_acquire); ++i)
    if (i > 64) sched_yield();
}
void join_state_base::unlock() noexcept {
  lock_.store(false, std::memory_order_release);  // pairs with lock()
}

void join_state_base::complete() noexcept {
  lock();
  done_ = true;
  fiber_ = nullptr;
  sched::fiber* claimed = nullptr;
  if (waiter_)
    claimed = sched::claim({static_cast<sched::fiber*>(waiter_), waiter_gen_},
                           sched::wake_reason::notified);
  waiter_ = nullptr;
  // relaxed: written under lock_, which we hold.
  bool thread_waits = thread_word_.load(std::memory_order_relaxed) == 1;
  unlock();
  if (claimed) sched::ready(claimed);
  if (thread_waits) {
    // release: the value or exception written before complete() is
    // visible to the thread once it sees 2 (pairs with wait_thread()).
    thread_word_.store(2, std::memory_order_release);
    futex_wake_all(&thread_word_);
  }
}

// join() from a plain thread (not a fiber): no park, a futex. Not
// cancellable (a thread has no stop token). The thread counts as a possible
// waker from now until it exits, as any plain thread that blocks on weft
// (what it does after the join may wake a fiber).
void join_state_base::wait_thread() noexcept {
  note_plain_thread();
  lock();
  bool done = done_;
  if (!done) thread_word_.store(1, std::memory_order_relaxed);  // relaxed: under lock_
  unlock();
  if (done) return;  // lock_ ordered the fiber's writes before done_
  // acquire: pairs with complete()'s release store of 2.
  while (thread_word_.load(std::memory_order_acquire) != 2)
    futex_wait(&thread_word_, 1, wclock::time_point::max());
}

void join_state_base::publish_waiter(void* self, void* f, std::uint64_t gen) {
  auto* s = static_cast<join_state_base*>(self);
  s->waiter_ = f;
  s->waiter_gen_ = gen;
  s->unlock();  // taken in wait(); the parked joiner is now findable
}

bool join_state_base::wait(std::source_location where) {
  if (!sched::current_fiber()) {
    wait_thread();
    return true;
  }
  for (;;) {
    lock();
    if (done_) {
      unlock();
      return true;
    }
    if (fiber_ == sched::current_fiber()) {  // it would wait for itself for ever
      unlock();
      throw std::system_error(std::make_error_code(std::errc::resource_deadlock_would_occur),
                              "weft::join_handle::join: a fiber cannot join itself");
    }
    sched::wake_reason r = sched::park(
        {.publish = [](void* a, sched::wake_token t) { publish_waiter(a, t.f, t.gen); },
         .arg = this,
         .what = "join",
         .where = where});
    if (r == sched::wake_reason::notified) return true;
    lock();
    waiter_ = nullptr;
    bool done = done_;
    unlock();
    if (done) return true;  // completed while we were being cancelled
    // A join in a destructor that the runtime's unwind runs (a scope that
    // joins the fibers it spawned) waits on: the joined fiber is unwound
    // too and ends soon, and returning early would pop the frame it may
    // still use, where join()'s throw is std::terminate besides. Its parks
    // return at once meanwhile: each lets the other fibers run.
    if (!current_fiber_unwinding_in_cleanup()) break;
  }
  sched::unwind_point();
  return false;
}

void join_state_base::request_stop() noexcept {
  lock();
  if (fiber_) sched::request_stop(static_cast<sched::fiber*>(fiber_));
  unlock();
}

void join_state_base::release() noexcept {
  // acq_rel: the last owner sees every write of the other before deleting,
  // error_ included (the fiber sets it before its release; join() clears
  // it before the handle's), so no lock is needed to read it.
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  if (error_) warn_unobserved(id_, error_);
  delete this;
}

// Called from a catch handler, so `throw;` rethrows the exception being
// handled; the handlers here only classify it.
bool handling_fiber_unwind() noexcept {
  try {
    throw;
  } catch (const sched::fiber_unwind&) {
    return true;
  } catch (...) {
    return false;
  }
}

void unwound_joined() {
  sched::unwind_point();  // the joiner is being unwound as well
  throw std::system_error(std::make_error_code(std::errc::operation_canceled),
                          "weft::join_handle::join: the fiber was unwound");
}

}  // namespace weft::detail
