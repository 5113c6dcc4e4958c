// alloc/prefetch.h
//
// prefetch_for_write(p): asks for p's cache line in the exclusive state,
// for a line another CPU last wrote that this one is about to write (a
// fiber's control block or registry slot). GCC's __builtin_prefetch(p, 1)
// emits PREFETCHW only when the target enables it (-mprfchw), and a plain
// PREFETCHT0 brings the line shared, so the write that follows still
// waits for a second transfer. On x86 PREFETCHW's encoding is a no-op on
// CPUs without it. Never faults.
#pragma once

namespace weft::alloc {

inline void prefetch_for_write(const void* p) noexcept {
#if defined(__x86_64__)
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

}  // namespace weft::alloc
