// alloc/prefetch.h
//
// Cache-line prefetches, as hints: the CPU never faults on one, and
// neither ASan nor TSan looks at the address (inline assembly), so `p` may
// be stale, freed, poisoned or being written by another thread. Nothing
// is read through it.
//
// prefetch_for_write(p): the line in the exclusive state, for a line
// another CPU last wrote that this one is about to write (a fiber's
// control block or registry slot). GCC's __builtin_prefetch(p, 1) emits
// PREFETCHW only when the target enables it (-mprfchw); a plain
// PREFETCHT0 brings the line shared, and the write that follows waits
// for a second transfer. PREFETCHW's encoding is a no-op on x86 CPUs
// without it.
// prefetch_for_read(p): PREFETCHT0 (a stack about to be resumed).
//
// On x86-64 both are volatile asm: GCC has deleted loops of
// __builtin_prefetch from the binary (sched/park.cc). Elsewhere they are
// __builtin_prefetch.
#pragma once

namespace weft::alloc {

inline void prefetch_for_write(const void* p) noexcept {
#if defined(__x86_64__)
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

inline void prefetch_for_read(const void* p) noexcept {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

}  // namespace weft::alloc
