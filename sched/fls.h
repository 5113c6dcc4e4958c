// sched/fls.h
//
// Fiber-local storage. A value belongs to the fiber, not to the worker that
// happens to run it, so it stays with the fiber when it migrates (which
// thread_local cannot do; see *Migration* in DESIGN.md). Each fiber_local
// instance owns a key; each fiber has a table of (value, destructor) slots
// allocated on first use and destroyed, with every value, when it exits.
//
// Who calls what: every function, only from the fiber whose storage it is.
#pragma once

#include <cstddef>

#include "sched/fiber.h"

namespace weft::sched {

std::size_t fls_new_key() noexcept;
// The slot of `key` in the calling fiber's table (created on demand). A
// fresh slot holds {nullptr, nullptr}.
struct fls_slot {
  void* value = nullptr;
  void (*destroy)(void*) = nullptr;
};
// The reference is good until the fiber's next fls_get() of a key beyond
// the table's end (which grows it).
fls_slot& fls_get(std::size_t key);
void fls_destroy_all(fiber* f) noexcept;

}  // namespace weft::sched
