// alloc/region.h — internal to alloc/ (not in the library's hdrs).
//
// A region is one aligned reservation of address space holding the stacks
// of one size class. stack_pool.cc carves regions; overflow.cc looks them up
// from the SIGSEGV handler. See *Memory* in DESIGN.md.
//
// Layout of a region of `span` bytes (a power of two), aligned to `span`:
//
//   [header page][slot 0][slot 1] ... [slot n-1][unused tail]
//   slot = [guard_bytes][stack_bytes]      guard_bytes is 0 or one page
//
// Because a region is aligned to its span, the header of the region that
// holds any stack is found by masking the stack's address (header_of()):
// no lookup table, so check_canary() stays O(1).
//
// Invariants:
//   - A header is written once, before the region is registered or any of
//     its stacks is handed out, and never changes afterwards; readers need
//     no synchronization beyond what gave them the stack (or the acquire
//     load of the registry slot, in the signal handler).
//   - `kind` is uniform over a region. When the pool degrades its guard
//     (madvise -> mprotect -> canary) the region being carved is abandoned
//     and a new one starts with the new kind.
//   - A registered header stays mapped until unregister_region() returns.
//
// Who calls what:
//   register_region(), unregister_region()   stack_pool (any thread)
//   the registry's readers                   the SIGSEGV handler in
//                                            overflow.cc; lock-free
#pragma once

#include <cstddef>
#include <cstdint>

#include "alloc/stack_pool.h"

namespace weft::alloc::detail {

inline constexpr std::size_t kPage = 4096;
// Written at `lo` of every stack without a guard page ("WEFTSTK!").
inline constexpr std::uint64_t kCanaryMagic = 0x214b545354464557ull;

struct region_header {
  std::uintptr_t base = 0;        // == this; spans [base, base + span)
  std::size_t span = 0;           // bytes reserved, a power of two
  std::uintptr_t first_slot = 0;  // base + kPage
  std::size_t slots = 0;          // slots that fit after the header page
  std::uintptr_t slots_end = 0;   // first_slot + slots * slot_bytes
  std::size_t slot_bytes = 0;     // guard_bytes + stack_bytes
  std::size_t guard_bytes = 0;    // 0 (tiny classes) or kPage
  std::size_t stack_bytes = 0;    // the class size
  std::uint32_t size_class = 0;
  std::uint32_t node = 0;         // the pool's NUMA node index (see stack_pool.h)
  guard_kind kind = guard_kind::canary;

  // True if the page below each stack really faults.
  bool has_guard_page() const {
    return guard_bytes != 0 && kind != guard_kind::canary;
  }
};

inline const region_header* header_of(const std::byte* p, std::size_t span) {
  auto base = reinterpret_cast<std::uintptr_t>(p) & ~(span - 1);
  // SAFETY: p lies in a live region aligned to `span`; its first page holds
  // the header, written before p was handed out (see Invariants).
  return reinterpret_cast<const region_header*>(base);
}

// Publishes r to the overflow handler. Aborts if the registry is full.
void register_region(const region_header* r);
// Withdraws r: a handler invocation that starts after this returns does not
// read r. (One already running on another thread might; a fault racing with
// the destruction of its own pool is not supported.)
void unregister_region(const region_header* r);

}  // namespace weft::alloc::detail
