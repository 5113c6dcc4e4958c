// runtime/task_group.cc — see runtime/task_group.h.
//
// Invariants:
//   - pending_ counts children not yet finished: spawn() counts one up
//     before the fiber exists; the child counts itself down after its
//     callable was destroyed, as its last touch of the group, whether its
//     body ran or the runtime discarded it unrun (task_group::child).
//   - mu_ (a spinlock; nothing under it parks) guards members_, error_,
//     exception_, stopping_ and failed_.
//   - failed_ is set once, by the first failure; a child's
//     operation_canceled after stopping_ was set is no failure (fail()).
//   - members_ lists the children whose body is running: a child links its
//     record (on its own stack) as its body starts and unlinks it as the
//     body ends, before it counts down; so a fiber named in members_ is
//     alive while mu_ is held, and request_stop() may act on it. A child
//     that starts after stopping_ was set asks itself to stop at once, so
//     a failure racing with spawn() cannot miss a child. Children never
//     started hold no record: the runtime discards them only while it
//     unwinds everything.
#include "runtime/task_group.h"

#include <system_error>

#include "sched/park.h"

namespace weft {

// Children must not outlive the group, and a destructor must not throw:
// wait_noexcept() waits even while the runtime unwinds this fiber. The
// runtime then unwinds every fiber, the children too, so they finish
// without a stop request from us (request_stop() takes only mu_, a
// spinlock: nothing here parks, so an unwind starting meanwhile cannot
// throw out of this destructor).
task_group::~task_group() {
  if (!pending_.is_zero() && !detail::current_fiber_unwinding()) request_stop();
  pending_.wait_noexcept("task_group", where_);
  // The children are done: nobody else touches the fields now.
  if (exception_ && !reported_) detail::warn_unobserved(failed_child_, exception_);
}

void task_group::enter(member& m) noexcept {
  auto* self = sched::current_fiber();
  std::lock_guard g(mu_);
  m.fiber = self;
  m.next = members_;
  if (members_) members_->prev = &m;
  members_ = &m;
  if (stopping_) sched::request_stop(self);
}

void task_group::leave(member& m) noexcept {
  std::lock_guard g(mu_);
  if (m.prev) m.prev->next = m.next; else members_ = m.next;
  if (m.next) m.next->prev = m.prev;
}

void task_group::request_stop() {
  std::lock_guard g(mu_);
  stopping_ = true;
  // SAFETY: a linked member's fiber is alive until it unlinks, under mu_.
  for (member* m = members_; m; m = m->next)
    sched::request_stop(static_cast<sched::fiber*>(m->fiber));
}

namespace {
// A child that says it was stopped by throwing: join() throws
// std::system_error(operation_canceled) when the joining fiber is asked to
// stop, as a parked call returns it.
bool is_cancellation(const std::exception_ptr& e) noexcept {
  try {
    std::rethrow_exception(e);
  } catch (const std::system_error& x) {
    return x.code() == std::errc::operation_canceled;
  } catch (...) {
    return false;
  }
}
}  // namespace

void task_group::fail(std::error_code ec, std::exception_ptr e) {
  // Outside mu_ (a spinlock): a rethrow is not a few instructions.
  bool cancelled = e ? is_cancellation(e) : ec == std::errc::operation_canceled;
  {
    std::lock_guard g(mu_);
    if (failed_) return;
    // Once the group is stopping, operation_canceled (returned, or thrown
    // as std::system_error) says a child was stopped, not that it failed:
    // counted, it would hide (or not, as the children happen to end) a real
    // failure coming after it.
    if (stopping_ && cancelled) return;
    failed_ = true;
    failed_child_ = detail::current_fiber_id();
    error_ = ec;
    exception_ = std::move(e);
  }
  request_stop();
}

bool task_group::is_member(const void* fiber) {
  std::lock_guard g(mu_);
  for (member* m = members_; m; m = m->next)
    if (m->fiber == fiber) return true;
  return false;
}

result<void> task_group::wait(std::source_location where) { return wait(deadline{}, where); }

result<void> task_group::wait(deadline d, std::source_location where) {
  // A child waiting for its own group waits for itself: for ever, as a
  // fiber joining itself would. Refused as join() refuses that. Looked for
  // only when there is something to wait for (a scan of the running
  // children under mu_: once per wait, not per child).
  if (!pending_.is_zero() && is_member(sched::current_fiber()))
    return make_error(std::errc::resource_deadlock_would_occur);
  result<void> r = pending_.wait(d, "task_group", where);
  if (!r && r.error() == std::errc::timed_out) return r;  // the children run on
  if (!r) {  // our own stop: pass it on, then still wait for every child
    request_stop();
    // Until the same deadline: a child that does not heed the stop must
    // not hold the owner past it. Then, as above, the children run on.
    result<void> all = pending_.wait(d, "task_group", where, false);
    if (!all) return all;  // timed_out
  }
  std::lock_guard g(mu_);
  // Kept: a later wait() reports the same failure (as Go's errgroup).
  if (exception_) {
    reported_ = true;  // the first failure is final: this is the one
    std::rethrow_exception(exception_);
  }
  if (failed_) return std::unexpected(error_);
  return r;
}

}  // namespace weft
