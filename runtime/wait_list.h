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

}  // namespace weft::detail
