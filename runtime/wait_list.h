// runtime/wait_list.h — the part of a wait list that public types embed.
//
// Every weft synchronization type (channel, mutex, condition_variable, ...)
// holds one or two wait lists: a short spinlock and a FIFO of waiter
// records that live on the stacks of blocked fibers or plain threads. Only
// the layout is here, so that the public headers stay free of sched/; every
// operation is out of line in runtime/waiter.h and runtime/waiter.cc.
//
// Invariants:
//   - lock_ guards head_, tail_ and every record linked into them.
//   - Never held across a park or a blocking system call.
#pragma once

#include <atomic>

#include "alloc/spinlock.h"

namespace weft::detail {

struct waiter;       // runtime/waiter.h
struct wake_ticket;  // runtime/waiter.h
class wake_batch;   // runtime/waiter.h

struct wait_list {
  waiter* head_ = nullptr;  // guarded by the owner's spinlock
  waiter* tail_ = nullptr;  // guarded by the owner's spinlock
  bool empty() const noexcept { return head_ == nullptr; }
};

// The spinlock of the public sync types (alloc/spinlock.h, inline).
using short_lock = weft::spinlock;

// Called at the start of an operation on a channel or a lock (mutex,
// shared_mutex): registers a plain thread as a possible waker of fibers
// for the deadlock detector, as blocking in weft does
// (sched::note_plain_thread(), sched/scheduler.h). A plain thread that
// holds a weft lock wakes the fibers parked on it when it unlocks, and one
// that sends on a channel may send again, even if it never blocked (it
// took the lock uncontended; its sends found receivers waiting or room):
// uncounted, the detector would report a deadlock as soon as every fiber
// waited for its next step (a thread serving fibers through channels).
// Before the lock is taken, not after: a thread preempted between the two
// would hold it uncounted while fibers park on it. (A try_lock that fails
// still counts the thread: a report withheld, never a false one.) A thread
// whose first use of weft is to wake a fiber (a wait_group's done())
// must say so earlier: weft::outside_ref. On a worker thread (a fiber)
// only a thread_local load.
void note_plain_user() noexcept;

}  // namespace weft::detail

namespace weft::sched {
// sched/park.h: the coop budget of operations that complete without
// parking (channels, select, semaphore, mutex); declared here for the
// inline fast paths of channel.h and sync.h.
void spend_budget() noexcept;
}  // namespace weft::sched
