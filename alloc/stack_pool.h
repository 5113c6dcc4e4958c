// alloc/stack_pool.h
//
// stack_pool hands out fiber stacks. See *Memory* in DESIGN.md.
//
// Layout. Address space is reserved in large regions (mmap PROT_READ|WRITE,
// MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE) and cut into fixed-size slots of
// one size class each. A slot is [guard page][usable stack]; pages of the
// usable part are committed lazily by the first touch, so an idle fiber that
// touched only the top of its stack costs about one page. The stack grows
// down from `hi`; sched/ keeps a pointer to the owning fiber in its top
// 64 bytes (for the overflow message).
//
// Guards. One guard page below each stack of a guarded class, installed with
// madvise(MADV_GUARD_INSTALL) (Linux 6.13+), which does not split the VMA, so
// a million guarded stacks stay far under vm.max_map_count. If the kernel
// refuses it: mprotect(PROT_NONE) while under a budget of mappings, then a
// canary word at `lo` that sched/ checks after every switch away from the
// fiber (has_canary() once at binding, then canary_intact()), with
// one warning line saying so. Classes below one page (the "tiny" classes for
// fibers that need very little stack) are packed densely without a guard
// page and always rely on the canary.
//
// Overflow. install_overflow_handler() installs a SIGSEGV handler that runs
// on a per-thread sigaltstack (enable_altstack(), called by each worker
// thread). A fault inside a guard page prints which fiber overflowed (through
// the describer callback registered by sched/) and its stack size, then
// aborts. Any other SIGSEGV is re-raised with the default action.
//
// Reuse. release() puts a stack on the per-cache LIFO (warm cache lines and
// committed pages); above cache_watermark stacks or cache_bytes of stack in
// a cache, the older half of that class moves to the shared warm list in
// one batch, and a cache that runs dry refills a batch from it (fewer of a
// big class: at most half of cache_bytes) — stacks flow warm from the
// workers where fibers exit to the workers that spawn. Warm stacks beyond
// shared_warm_limit stacks or shared_warm_bytes get their pages returned to
// the OS with MADV_DONTNEED (keeping the guard) by trim(), which idle
// workers call before sleeping: never on the spawn/exit path. The limits
// count stacks at their class size (what a stack may have committed), so
// a program of big stacks keeps as many bytes warm as one of small stacks,
// not as many stacks.
//
// NUMA. Each node (stack_pool_options::cache_nodes) has its own regions
// and shared lists; a cache carves and refills from its node, and a stack
// goes back to its own region's node whichever cache releases it. A node's
// regions can be bound to the kernel's node (mbind MPOL_PREFERRED, before
// any page is touched); a refusal is counted and said once.
//
// Who calls what:
//   allocate(), release()   cache c: only the one thread that owns cache c
//                           (a worker and its index); kSharedCache: any thread
//   check_canary(), has_canary(), canary_intact()   any thread
//   stats()                 any thread (relaxed snapshot)
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace weft::alloc {

// A usable stack: [lo, hi). `hi` is 16-byte aligned.
struct stack {
  std::byte* lo = nullptr;
  std::byte* hi = nullptr;
  std::uint32_t size_class = 0;  // index into the pool's classes
  std::size_t size() const { return static_cast<std::size_t>(hi - lo); }
  explicit operator bool() const { return lo != nullptr; }
};

enum class guard_kind : std::uint8_t {
  madvise_guard,  // MADV_GUARD_INSTALL: one page, no extra VMA
  mprotect,       // PROT_NONE page: one extra VMA per stack, under a budget
  canary,         // no guard page; canary word checked at each switch
};

const char* to_string(guard_kind k);

struct stack_pool_options {
  // Number of per-thread caches (one per worker). Cache indices are
  // 0..caches-1; kSharedCache is always valid too.
  unsigned caches = 1;
  // Bytes of address space reserved per region.
  std::size_t region_bytes = std::size_t{256} << 20;
  // Stacks, and bytes of stack (at class size), a per-worker cache keeps;
  // above either, release() moves half of a class to the shared warm list
  // in one batch. (256 default stacks are 16 MiB.)
  unsigned cache_watermark = 256;
  std::size_t cache_bytes = std::size_t{16} << 20;
  // Committed stacks, and bytes of them, the shared lists keep warm;
  // trim() returns the pages of the rest to the OS. (4096 default stacks
  // are 256 MiB.)
  unsigned shared_warm_limit = 4096;
  std::size_t shared_warm_bytes = std::size_t{256} << 20;
  // Maximum number of mprotect guards before falling back to canaries.
  unsigned mprotect_budget = 16384;
  // Testing: pretend MADV_GUARD_INSTALL is unavailable.
  bool force_no_madvise_guard = false;
  // NUMA: the node (0..n-1) of each cache; empty: every cache on node 0.
  // Each node has its own regions and shared lists, so stacks carved for a
  // worker come from its node and warm stacks flow only between workers of
  // one node. kSharedCache is node 0.
  std::vector<unsigned> cache_nodes;
  // The kernel's node number to prefer for each node's regions
  // (mbind(MPOL_PREFERRED)); empty, or -1 for a node: no binding.
  std::vector<int> node_os;
};

struct stack_pool_stats {
  std::uint64_t regions = 0;          // regions reserved
  std::uint64_t reserved_bytes = 0;   // address space reserved
  std::uint64_t live = 0;             // stacks handed out, not released
  std::uint64_t cached = 0;           // stacks in caches and free lists
  std::uint64_t returned_to_os = 0;   // MADV_DONTNEED calls on release
  std::uint64_t bind_failures = 0;    // regions whose NUMA binding failed
  guard_kind guard = guard_kind::madvise_guard;  // what default stacks got
};

class stack_pool {
 public:
  static constexpr unsigned kSharedCache = ~0u;
  static constexpr std::size_t kDefaultStackSize = std::size_t{64} << 10;

  explicit stack_pool(const stack_pool_options& opts = {});
  ~stack_pool();  // unmaps every region; all stacks must have been released
  stack_pool(const stack_pool&) = delete;
  stack_pool& operator=(const stack_pool&) = delete;

  // A stack of at least `size` usable bytes (rounded up to its class:
  // 1 KiB, 2 KiB, then powers of two from 4 KiB to 8 MiB). Aborts with a
  // clear message if the size is above the largest class or address space
  // cannot be reserved (the message says which and how much).
  stack allocate(std::size_t size, unsigned cache);
  void release(stack s, unsigned cache);

  // Usable size of the class that `size` rounds up to (what allocate gives).
  static std::size_t class_size(std::size_t size);

  // Returns the pages of up to `budget` warm stacks beyond
  // shared_warm_limit or shared_warm_bytes to the OS (oldest first); how many it returned. Any
  // thread; called by idle workers, since MADV_DONTNEED interrupts every
  // CPU the process runs on.
  std::size_t trim(std::size_t budget);
  bool needs_trim() const noexcept;

  // The NUMA node index (as in stack_pool_options::cache_nodes) whose
  // regions s came from.
  unsigned node_of(const stack& s) const;

  // False if the canary at s.lo was overwritten (stack overflow on a stack
  // without a guard page). Always true for stacks with a guard page.
  bool check_canary(const stack& s) const;
  // As check_canary() for a stack known to have a canary (has_canary()):
  // one word compared, no lookup. For the per-switch check.
  static bool canary_intact(const stack& s) noexcept;
  // True if `s` has no guard page and relies on its canary.
  bool has_canary(const stack& s) const;

  stack_pool_stats stats() const;

 private:
  struct impl;
  impl* impl_;
};

// --- Overflow reporting -------------------------------------------------

// Called from the SIGSEGV handler (async-signal context: no allocation, no
// locks) with the overflowed stack; writes a description of its owner such
// as `fiber 12 "reader"` into buf (NUL-terminated, at most len bytes).
using overflow_describer = void (*)(const stack& s, char* buf, std::size_t len);

// Process-wide; idempotent. The pool registers its regions with the handler
// so a fault address can be mapped to its stack.
void install_overflow_handler(overflow_describer describe);
// Prints the overflow message for `s` (through the describer) and aborts:
// the guard-page handler's report, also used when a canary is found
// overwritten. Async-signal-safe.
[[noreturn]] void report_stack_overflow(const stack& s);
// Per thread that runs fibers: a sigaltstack for the handler. Idempotent.
void enable_altstack();
void disable_altstack();

}  // namespace weft::alloc
