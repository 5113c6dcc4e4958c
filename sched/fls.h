// sched/fls.h
//
// Fiber-local storage. A value belongs to the fiber, not to the worker that
// happens to run it, so it stays with the fiber when it migrates (which
// thread_local cannot do; see *Migration* in DESIGN.md). Each fiber_local
// instance owns a key while it exists; each fiber has a table of
// (value, destructor) slots allocated on first use and destroyed, with
// every value, when it exits.
//
// Order. A fiber's values are destroyed in the reverse order of their
// construction, as a thread's thread_locals are ([basic.start.term]): a
// value whose constructor used another fiber_local's value (and may keep
// a reference to it) is destroyed while that value still exists. The
// table order (key indices) says nothing about this: the fiber_local made
// first, whose index is lower, is typically the one the others build on.
// So each stored value gets the fiber's next sequence number (fls_put(),
// called once the value is fully constructed), and fls_destroy_all()
// destroys the highest first.
//
// Keys. A key is a table index and a generation. A fiber_local that goes
// away gives its index back and the next one to be made reuses it with a
// new generation, so a fiber's table is as long as the most fiber_locals
// that ever existed at once, not as the number ever made. A slot remembers
// the generation of its value: a value left by a fiber_local that no
// longer exists (in a fiber that used it) is destroyed when the fiber
// first uses the index's new owner, or at fiber exit, whichever comes
// first; it is never seen through the new key.
//
// Exit. fls_destroy_all() destroys the values newest first; a destructor
// may set values again (of its own fiber_local or another), and those are
// destroyed in turn. Two destructors that each set the other's value would
// go on forever, so, as POSIX does for thread-specific data
// (PTHREAD_DESTRUCTOR_ITERATIONS, 4), there are kDestroyRounds rounds at
// most: the values stored before exit are round 1, a value stored by a
// destructor of a round-r value is round r+1, and a value of a round past
// the last is left, never destroyed (its memory is lost), with one line on
// stderr naming the fiber. Left rather than destroyed once more: its
// destructor would likely set a value again, which would then be the one
// left (or, run with storage shut, find get() unable to return anything),
// while leaving it runs no more code and costs the memory of at most one
// value per fiber_local, in a program that has a bug to fix.
//
// Who calls what: fls_new_key(), fls_free_key() any thread; fls_get() and
// fls_put() and fls_destroy_all() only from (or, at exit, for) the fiber whose
// storage it is.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sched/fiber.h"

namespace weft::sched {

std::uint64_t fls_new_key();
void fls_free_key(std::uint64_t key) noexcept;
// The slot of `key` in the calling fiber's table (created on demand). A
// fresh slot holds {nullptr, nullptr}.
struct fls_slot {
  void* value = nullptr;
  void (*destroy)(void*) = nullptr;
  std::uint32_t gen = 0;  // the generation of the key that value belongs to
  std::uint64_t order = 0;  // the value's sequence number (see *Order*)
  std::uint32_t round = 0;  // the exit round that destroys it (see *Exit*)
};
inline constexpr std::uint32_t kDestroyRounds = 4;  // see *Exit*
// The reference is good until the fiber's next fls_get() of a key beyond
// the table's end (which grows it).
fls_slot& fls_get(std::uint64_t key);
// Stores a fully constructed value, and how to destroy it, into the
// calling fiber's slot of `key`, which holds none; numbers it (*Order*).
void fls_put(std::uint64_t key, void* value, void (*destroy)(void*));
void fls_destroy_all(fiber* f) noexcept;

}  // namespace weft::sched
