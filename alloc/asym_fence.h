// alloc/asym_fence.h
//
// Asymmetric fences: a StoreLoad ordering whose cost falls on the rare
// side only. The frequent side (a worker taking from its own LIFO slot,
// every hand-off) orders its store before its load with a compiler
// barrier, nothing more; the rare side (a thief about to take that fiber
// away) calls heavy(), a membarrier(2) that makes every running thread of
// the process execute a full barrier before it returns. Together the two
// give what a pair of full fences gives (Dekker):
//
//   frequent side                 rare side
//   -------------                 ---------
//   store A                       store B
//   asym_fence::light()           asym_fence::heavy()
//   load B                        load A
//
// at least one of the loads sees the other side's store. (Where the
// frequent side's thread was running, heavy() ran a full barrier on its
// CPU at some point of its instruction stream: a load B before that point
// has its store A before it too, and the store is visible once heavy()
// returns; a load B after it sees B. A thread that was not running passed
// through a context switch, itself a full barrier.) Linux's own
// membarrier(2) page states this pattern; liburcu's readers use it.
//
// available() registers the process once (MEMBARRIER_CMD_REGISTER_
// PRIVATE_EXPEDITED, Linux 4.14) and says whether heavy() works. Callers
// fall back to a locked instruction on the frequent side when it does not
// (an older kernel, a seccomp filter that refuses the call, WEFT_ASYM_FENCE=0
// to compare).
//
// Cost here (2 vCPUs, a VM): heavy() ~30-50 µs with the other CPU busy
// (an IPI to each CPU that runs one of our threads); light() nothing.
// So heavy() belongs on paths that run at most every few hundred
// microseconds.
#pragma once

#include <atomic>

namespace weft::asym_fence {

// Any thread; the first call registers the process (thread-safe).
bool available() noexcept;

// The frequent side: orders the surrounding accesses for the compiler only.
inline void light() noexcept { std::atomic_signal_fence(std::memory_order_seq_cst); }

// The rare side. Only after available() returned true.
void heavy() noexcept;

}  // namespace weft::asym_fence
