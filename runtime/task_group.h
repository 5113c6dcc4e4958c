// runtime/task_group.h — structured concurrency: a group of child fibers
// that is waited for as a whole.
//
//   weft::task_group g;
//   for (auto& url : urls)
//     g.spawn([&] -> weft::result<void> { return fetch(url); });
//   weft::result<void> r = g.wait();   // all children have finished
//
// Rules:
//   - A child fails by returning an error result<...> or by throwing. The
//     first failure requests stop on every other child (their parked
//     operations return operation_canceled), and wait() reports it: it
//     rethrows the first exception, or returns the first error (again at
//     every later wait(), as Go's errgroup).
//   - A child that returns operation_canceled once the group is stopping
//     (after a failure, request_stop(), or the owner's own stop), or throws
//     it as std::system_error (join() does), was stopped: that is no
//     failure, so it never takes the place of a real one that comes
//     later, and a group stopped by request_stop() with no failure waits
//     ok (as a Trio nursery whose scope is cancelled).
//   - wait() from one of the group's own children (it would wait for
//     itself) returns resource_deadlock_would_occur at once, as join()
//     of a fiber by itself throws it.
//   - wait() waits for every child. If the waiting fiber is itself asked to
//     stop, it requests stop on the children, still waits for all of them,
//     and returns operation_canceled (unless a child failed). wait(deadline)
//     returns timed_out at the deadline if children still run, and leaves
//     them running (also when the waiting fiber was asked to stop: the
//     deadline bounds the wait for children that do not heed the stop).
//   - The destructor requests stop on the children still running and waits
//     for them: no child outlives its group. It never throws, also when the
//     runtime unwinds the owner (the children are unwound too). A child's
//     exception that no wait() rethrew is reported on stderr then, as one
//     nobody joined is for a detached fiber.
//   - A child's callable (and what it captured), then its fiber_local
//     values, are destroyed before the child counts as finished: when
//     wait() returns, they are gone.
//
// Who calls what: spawn(), request_stop() from any fiber; wait() and the
// destructor from a fiber (the owner).
#pragma once

#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <source_location>
#include <system_error>
#include <type_traits>
#include <utility>

#include "alloc/spinlock.h"
#include "runtime/sync.h"
#include "runtime/weft.h"

namespace weft {

class task_group {
 public:
  // `where` (the group's declaration) is the site that dump() and the
  // deadlock report give for a fiber whose group's destructor waits for
  // its children: a destructor takes no argument, and this stands for the
  // end of the scope better than the runtime's own file does. Not
  // explicit: an aggregate with a task_group member, initialized with
  // `{}`, copy-list-initializes it, which an explicit constructor refuses.
  task_group(std::source_location where = std::source_location::current()) noexcept
      : where_(where) {}
  task_group(const task_group&) = delete;
  task_group& operator=(const task_group&) = delete;
  ~task_group();

  template <typename F>
  void spawn(F&& fn, spawn_options opts = {}) {
    pending_.add(1, "weft::task_group::spawn");
    // The count-up is undone by whoever owns it: this guard until the
    // child exists (a callable whose copy throws leaves none), then the
    // child (its destructor counts down if weft::spawn throws).
    struct undo {
      task_group* g;
      ~undo() {
        if (g) g->pending_.add(-1, "weft::task_group::spawn");
      }
    } guard{this};
    child<std::decay_t<F>> c(this, std::forward<F>(fn));
    guard.g = nullptr;
    // No join handle: the group keeps only its running children (members_),
    // so a long-lived group (one child per connection) does not grow with
    // every child it ever had.
    (void)weft::go(std::move(c), opts);
  }

  // Waits for every child; the first failure, operation_canceled (the
  // caller's own stop), or ok; resource_deadlock_would_occur, at once,
  // if the caller is one of the children.
  result<void> wait(std::source_location where = std::source_location::current());
  // The same until `d`: timed_out if children still run then. They run on
  // (nothing is stopped: a graceful drain is wait(deadline(2s)), then on
  // timed_out request_stop() and wait()); the destructor still waits.
  result<void> wait(deadline d, std::source_location where = std::source_location::current());
  // Asks every child (current and future) to stop. Not a failure: wait()
  // reports ok unless a child fails.
  void request_stop();

 private:
  // What a child fiber runs: the user's callable, then the count-down.
  // Either the body ran (operator()) or the runtime discarded the child
  // unrun while unwinding (spawned::discard destroys it): both count down,
  // once. The callable is destroyed first, so that its captures are gone
  // when wait() or the destructor returns, and the count-down is the last
  // touch of the group (see *Counting to zero* in runtime/sync.cc).
  template <typename F>
  class child {
   public:
    template <typename G>
    child(task_group* g, G&& fn) : g_(g), fn_(std::in_place, std::forward<G>(fn)) {}
    // The count-down moves only once the callable has: if its move throws,
    // the source still owns it.
    child(child&& o) noexcept(std::is_nothrow_move_constructible_v<F>)
        : g_(nullptr), fn_(std::move(o.fn_)) {
      g_ = std::exchange(o.g_, nullptr);
    }
    child& operator=(child&&) = delete;
    ~child() { finish(); }
    void operator()() {
      member m;
      g_->enter(m);
      struct at_exit {
        child* c;
        member* m;
        ~at_exit() {  // also when the runtime unwinds the child
          detail::end_body();  // the callable's destructor may park
          c->g_->leave(*m);
          c->finish(/*on_child=*/true);
        }
      } end{this, &m};
      g_->run_child(*fn_);
    }

   private:
    // on_child: called by the child fiber as its body ends, so its
    // fiber_local values (which the callable's destructor may still use)
    // are destroyed too before it counts down, as a spawned fiber's are
    // before its join() returns: the owner may free what they use once
    // wait() returns. Otherwise (a spawn that failed, or a child discarded
    // unrun) this may be another fiber, whose locals are not ours.
    void finish(bool on_child = false) noexcept {
      if (!g_) return;  // moved from, or already counted down
      fn_.reset();
      if (on_child) detail::destroy_fiber_locals();
      std::exchange(g_, nullptr)->pending_.add(-1, "weft::task_group: child");
    }
    task_group* g_;
    std::optional<F> fn_;
  };

  template <typename F>
  void run_child(F& fn) {
    try {
      if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
        fn();
      } else {
        auto r = fn();
        if (!r.has_value()) fail(r.error(), nullptr);
      }
    } catch (...) {
      if (detail::handling_fiber_unwind()) throw;  // the runtime unwinds it
      fail({}, std::current_exception());
    }
  }
  // A child whose body is running, linked in members_ (on its own stack).
  struct member {
    void* fiber = nullptr;
    member* prev = nullptr;
    member* next = nullptr;
  };
  bool is_member(const void* fiber);  // fiber is a running child
  void enter(member& m) noexcept;  // the child, as its body starts
  void leave(member& m) noexcept;  // the child, as its body ends
  void fail(std::error_code ec, std::exception_ptr e);

  detail::zero_waiter pending_{0};  // children not yet finished
  // Guards the fields below. A spinlock, not a weft::mutex: nothing under
  // it parks, so the destructor (which must not throw) cannot be caught in
  // a park when the runtime starts unwinding its fiber.
  weft::spinlock mu_;
  member* members_ = nullptr;  // running children
  std::error_code error_;
  std::exception_ptr exception_;
  std::uint64_t failed_child_ = 0;  // the fiber id of the first failure's child
  bool reported_ = false;  // a wait() returned the failure (or rethrew it)
  bool stopping_ = false;
  bool failed_ = false;
  const std::source_location where_;  // see the constructor
};

}  // namespace weft
