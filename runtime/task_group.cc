// runtime/task_group.cc — see runtime/task_group.h.
//
// Invariants:
//   - pending_ counts children not yet finished: spawn() counts one up
//     before the fiber exists; the child counts itself down after its
//     callable was destroyed, as its last touch of the group, whether its
//     body ran or the runtime discarded it unrun (task_group::child).
//   - mu_ (a spinlock; nothing under it parks) guards children_, error_,
//     exception_, stopping_ and failed_. A
//     child adopted after stopping_ was set is asked to stop at once, so a
//     failure racing with spawn() cannot miss a child.
#include "runtime/task_group.h"

namespace weft {

// Children must not outlive the group, and a destructor must not throw:
// wait_noexcept() waits even while the runtime unwinds this fiber. The
// runtime then unwinds every fiber, the children too, so they finish
// without a stop request from us (request_stop() takes only mu_, a
// spinlock: nothing here parks, so an unwind starting meanwhile cannot
// throw out of this destructor).
task_group::~task_group() {
  if (!pending_.is_zero() && !detail::current_fiber_unwinding()) request_stop();
  pending_.wait_noexcept("task_group", std::source_location::current());
}

void task_group::adopt(join_handle<void> h) {
  std::lock_guard g(mu_);
  if (stopping_) h.request_stop();
  children_.push_back(std::move(h));
}

void task_group::request_stop() {
  std::lock_guard g(mu_);
  stopping_ = true;
  for (auto& h : children_) h.request_stop();
}

void task_group::fail(std::error_code ec, std::exception_ptr e) {
  {
    std::lock_guard g(mu_);
    if (failed_) return;
    failed_ = true;
    error_ = ec;
    exception_ = std::move(e);
  }
  request_stop();
}

result<void> task_group::wait(std::source_location where) {
  result<void> r = pending_.wait({}, "task_group", where);
  if (!r) {  // our own stop: pass it on, then still wait for every child
    request_stop();
    (void)pending_.wait({}, "task_group", where, false);
  }
  std::lock_guard g(mu_);
  children_.clear();  // every body has finished: dropping the handles detaches
  if (exception_) std::rethrow_exception(std::exchange(exception_, nullptr));
  if (failed_) return std::unexpected(error_);
  return r;
}

}  // namespace weft
