// alloc/stack_pool.cc
//
// The stack pool: size classes, regions, guard pages, caches. The contract
// is in stack_pool.h, the region layout in region.h, and the SIGSEGV handler
// that reports overflows in overflow.cc. Sections below: *Size classes*,
// *Guards*, *Regions and carving*, *Caches*, *The shared lists*, *Stats*.
//
// Invariants:
//   - cache c's free lists are touched only by the thread that owns index c.
//     Its counters are atomics that only that thread writes (load + store,
//     no read-modify-write); stats() reads them relaxed.
//   - A class_state's lists and carving cursor are guarded by its mu_;
//     listed_ is written under mu_ and read by stats() without it.
//   - Each NUMA node has its own class_states and regions. A stack belongs
//     to the node of its region (region_header::node) and returns to that
//     node's shared lists (drain, put, trim) whichever cache released it.
//   - mode_ only ever degrades: madvise_guard -> mprotect -> canary.
//   - A guard is installed once, when its slot is carved; every stack in a
//     free list keeps its guard (MADV_DONTNEED leaves guards in place).
//   - The canary is written at each hand-out of a stack whose region has no
//     working guard page (tiny classes, and regions carved after the pool
//     degraded to canaries).
//
// Who calls what: see stack_pool.h.
#include "alloc/stack_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#if defined(WEFT_ASAN)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <vector>

#include "alloc/arena.h"
#include "alloc/check.h"
#include "alloc/region.h"

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102  // Linux 6.13, <asm-generic/mman-common.h>
#endif

namespace weft::alloc {

using detail::kPage;
using detail::region_header;

namespace {

// --- Size classes -------------------------------------------------------
//
// Class c holds stacks of (1 KiB << c) bytes: 1 KiB and 2 KiB are "tiny"
// (packed, no guard page, canary only), then 4 KiB .. 8 MiB, each with one
// guard page below it.

constexpr unsigned kClasses = 14;
constexpr unsigned kTinyClasses = 2;
// Stacks moved between a worker cache and the shared lists at once.
constexpr unsigned kTransferBatch = 32;
constexpr unsigned kMinShift = 10;
constexpr std::size_t kMinStack = std::size_t{1} << kMinShift;
constexpr std::size_t kMaxStack = kMinStack << (kClasses - 1);
static_assert(kMaxStack == std::size_t{8} << 20);

constexpr std::size_t class_bytes(unsigned c) { return kMinStack << c; }
constexpr std::size_t guard_bytes(unsigned c) {
  return c < kTinyClasses ? 0 : kPage;
}

unsigned class_of(std::size_t size) {
  if (size > kMaxStack) [[unlikely]] {
    char msg[160];
    std::snprintf(msg, sizeof msg,
                  "stack_pool: a stack of %zu bytes was requested; the "
                  "largest class is %zu bytes",
                  size, kMaxStack);
    WEFT_CHECK(size <= kMaxStack, msg);
  }
  if (size <= kMinStack) return 0;
  return static_cast<unsigned>(std::bit_width(size - 1)) - kMinShift;
}

std::string errno_text(int err) { return std::system_category().message(err); }

// Single-writer counter update: the owner is the only writer, so a load and
// a store suffice (no locked read-modify-write on the hot path).
void bump(std::atomic<std::uint64_t>& a, std::int64_t delta) {
  // relaxed: statistic only; stats() tolerates a stale value.
  a.store(a.load(std::memory_order_relaxed) + static_cast<std::uint64_t>(delta),
          std::memory_order_relaxed);
}

// --- Guards -------------------------------------------------------------
//
// The pool probes MADV_GUARD_INSTALL once at construction. Each fallback
// (to mprotect, then to canaries) prints one line per process.

void warn_fallback(guard_kind to, const std::string& why, unsigned budget) {
  static std::atomic<bool> warned[3];
  // relaxed: only deduplicates a log line; nothing is published.
  if (warned[static_cast<unsigned>(to)].exchange(true,
                                                 std::memory_order_relaxed))
    return;
  if (to == guard_kind::mprotect) {
    std::fprintf(stderr,
                 "weft: stack guards: MADV_GUARD_INSTALL unavailable (%s); "
                 "using mprotect(PROT_NONE) guard pages, at most %u, then "
                 "canary words\n",
                 why.c_str(), budget);
  } else {
    std::fprintf(stderr,
                 "weft: stack guards: %s; stacks carved from now on get a "
                 "canary word checked at each switch instead of a guard page\n",
                 why.c_str());
  }
}

// True if this kernel installs MADV_GUARD_INSTALL guards; else *why says why.
bool probe_madvise_guard(std::string* why) {
  void* p = mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    *why = errno_text(errno);
    return false;
  }
  const int rc = madvise(p, kPage, MADV_GUARD_INSTALL);
  const int err = errno;
  munmap(p, 2 * kPage);
  if (rc != 0) *why = errno_text(err);
  return rc == 0;
}

// --- Regions and carving ------------------------------------------------

// Reserves `span` bytes (a power of two) aligned to `span`, by reserving
// twice that and trimming both ends. nullptr with *err set on failure.
std::byte* reserve_aligned(std::size_t span, int* err) {
  const std::size_t len = 2 * span;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    *err = errno;
    return nullptr;
  }
  const auto raw = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t base = (raw + span - 1) & ~(span - 1);
  if (base != raw) munmap(p, base - raw);
  const std::uintptr_t tail = raw + len - (base + span);
  if (tail != 0) munmap(reinterpret_cast<void*>(base + span), tail);
  // Stacks are committed a page at a time by touch; a transparent huge page
  // would commit 2 MiB for one idle fiber.
  madvise(reinterpret_cast<void*>(base), span, MADV_NOHUGEPAGE);
  return reinterpret_cast<std::byte*>(base);
}

// Aborts saying how much address space was asked for and why it failed.
void check_reserved(const std::byte* base, std::size_t span, unsigned cls,
                    int err) {
  if (base != nullptr) [[likely]]
    return;
  char msg[256];
  std::snprintf(msg, sizeof msg,
                "stack_pool: cannot reserve %zu bytes of address space for "
                "%zu-byte stacks: %s",
                2 * span, class_bytes(cls), errno_text(err).c_str());
  WEFT_CHECK(base != nullptr, msg);
}

// --- Caches ---------------------------------------------------------------

// One per worker: LIFO lists of stack `lo`s, one per class.
struct alignas(64) cache {
  std::array<std::vector<std::byte*>, kClasses> free_;  // owner only
  unsigned node = 0;  // its NUMA node (set at construction)
  // Written only by the owner thread (bump()), read by stats().
  std::atomic<std::uint64_t> count_{0};  // entries over all of free_
  std::size_t bytes_ = 0;  // owner only: class bytes over all of free_
  std::atomic<std::uint64_t> allocs_{0};
  std::atomic<std::uint64_t> releases_{0};
};

// --- The shared lists -----------------------------------------------------

struct alignas(64) class_state {
  std::mutex mu_;
  std::vector<std::byte*> warm_;          // mu_: pages still committed; LIFO
  std::vector<std::byte*> cold_;          // mu_: pages returned to the OS
  region_header* carving_ = nullptr;      // mu_: region slots are cut from
  std::size_t next_slot_ = 0;             // mu_: next uncarved slot in it
  std::vector<region_header*> regions_;   // mu_: all, for the destructor
  std::atomic<std::uint64_t> listed_{0};  // warm_ + cold_; see Invariants
};

}  // namespace

struct stack_pool::impl {
  explicit impl(const stack_pool_options& o);
  ~impl();
  void choose_initial_mode();
  stack hand_out(std::byte* lo, unsigned cls) const;
  bool has_canary(const std::byte* lo, unsigned cls) const;
  stack allocate_slow(unsigned cls);
  stack refill(cache& c, unsigned cls);
  void drain(cache& c, unsigned cls);
  std::byte* take_listed(class_state& k, unsigned cls);
  std::byte* carve(class_state& k, unsigned node, unsigned cls);
  void open_region(class_state& k, unsigned node, unsigned cls);
  void bind_to_node(std::byte* base, std::size_t span, unsigned node);
  class_state& state(unsigned node, unsigned cls) { return nodes_[node][cls]; }
  unsigned node_of(const std::byte* lo, unsigned cls) const {
    return detail::header_of(lo, span_[cls])->node;
  }
  bool install_guard(const region_header& r, std::byte* slot);
  bool take_mprotect_budget();
  void degrade(guard_kind to, const std::string& why);
  void release_shared(const stack& s);
  std::size_t trim(std::size_t budget);
  bool return_pages(const stack& s);
  void put(const stack& s, bool returned);

  const stack_pool_options opts_;
  std::array<std::size_t, kClasses> span_{};  // region bytes per class
  std::unique_ptr<cache[]> caches_;
  unsigned node_count_ = 1;
  // Per NUMA node, per class: the shared lists and the regions.
  std::unique_ptr<std::array<class_state, kClasses>[]> nodes_;
  // Read and degraded by carving threads under their class's mu_ (different
  // classes, different mutexes). relaxed everywhere: it is a policy, not a
  // publication; a stale read costs one abandoned region (see carve()).
  std::atomic<guard_kind> mode_{guard_kind::madvise_guard};
  std::atomic<unsigned> mprotect_left_{0};  // relaxed: a counter
  // Statistics (relaxed: statistic only).
  std::atomic<std::uint64_t> regions_{0};
  std::atomic<std::uint64_t> reserved_{0};
  std::atomic<std::uint64_t> returned_{0};
  std::atomic<std::uint64_t> bind_failures_{0};
  std::atomic<std::uint64_t> shared_allocs_{0};
  std::atomic<std::uint64_t> shared_releases_{0};
  // Committed stacks of guarded classes in the warm_ lists, and their
  // class bytes; bound what the shared lists keep warm (relaxed: an
  // approximate bound, changed under the class locks).
  std::atomic<std::uint64_t> shared_warm_{0};
  std::atomic<std::uint64_t> shared_warm_bytes_{0};
  // How many warm stacks of class cls are beyond both limits (to trim).
  std::uint64_t warm_excess(unsigned cls) const noexcept;
  bool over_warm_limits() const noexcept;
  void count_warm(unsigned cls, std::int64_t n) noexcept;
  // MADV_DONTNEED was refused (locked memory): trim() gives nothing back.
  std::atomic<bool> trim_off_{false};
};

stack_pool::impl::impl(const stack_pool_options& o)
    : opts_(o), caches_(new cache[o.caches]) {
  WEFT_CHECK(o.region_bytes > 0 && o.region_bytes <= (std::size_t{1} << 40),
             "stack_pool: region_bytes must be in (0, 1 TiB]");
  WEFT_CHECK(o.cache_nodes.empty() || o.cache_nodes.size() == o.caches,
             "stack_pool: cache_nodes must name a node for every cache");
  for (unsigned c = 0; c < o.caches; ++c) {
    caches_[c].node = o.cache_nodes.empty() ? 0 : o.cache_nodes[c];
    node_count_ = std::max(node_count_, caches_[c].node + 1);
  }
  node_count_ = std::max<unsigned>(node_count_, static_cast<unsigned>(o.node_os.size()));
  nodes_.reset(new std::array<class_state, kClasses>[node_count_]);
  for (unsigned c = 0; c < kClasses; ++c) {
    const std::size_t need = kPage + guard_bytes(c) + class_bytes(c);
    span_[c] = std::bit_ceil(std::max(o.region_bytes, need));
  }
  // relaxed: no other thread can see the pool yet.
  mprotect_left_.store(o.mprotect_budget, std::memory_order_relaxed);
  choose_initial_mode();
}

void stack_pool::impl::choose_initial_mode() {
  std::string why;
  if (opts_.force_no_madvise_guard)
    why = "disabled by stack_pool_options::force_no_madvise_guard";
  else if (probe_madvise_guard(&why))
    return;
  degrade(guard_kind::mprotect, why);
  if (opts_.mprotect_budget == 0)
    degrade(guard_kind::canary, "the mprotect guard budget is 0");
}

stack_pool::impl::~impl() {
  for (unsigned n = 0; n < node_count_; ++n) {
    for (class_state& k : nodes_[n]) {
      for (region_header* r : k.regions_) {
      detail::unregister_region(r);
      const std::size_t span = r->span;  // r lives in the mapping
      // SAFETY: ~stack_pool checked that every stack was released, so no
      // fiber runs on this memory any more.
#if defined(WEFT_ASAN)
      // The frames that ran here left their redzone markings in ASan's
      // shadow, which outlives the mapping: the next mapping at these
      // addresses (another run's buffer arena, which the kernel fills with
      // received data ASan never sees written) would read as a stack
      // underflow.
      __asan_unpoison_memory_region(r, span);
#endif
      munmap(r, span);
      }
    }
  }
}

bool stack_pool::impl::has_canary(const std::byte* lo, unsigned cls) const {
  return cls < kTinyClasses ||
         !detail::header_of(lo, span_[cls])->has_guard_page();
}

stack stack_pool::impl::hand_out(std::byte* lo, unsigned cls) const {
  // SAFETY: lo is the lowest word of a stack nobody runs on yet.
  if (has_canary(lo, cls))
    std::memcpy(lo, &detail::kCanaryMagic, sizeof detail::kCanaryMagic);
  return stack{lo, lo + class_bytes(cls), cls};
}

stack stack_pool::impl::allocate_slow(unsigned cls) {
  class_state& k = state(0, cls);  // kSharedCache: node 0
  std::byte* lo = nullptr;
  {
    std::lock_guard lock(k.mu_);
    lo = take_listed(k, cls);
    if (lo == nullptr) lo = carve(k, 0, cls);
  }
  return hand_out(lo, cls);
}

// A worker's cache is empty for `cls`: take a batch from the shared lists
// (warm first), carving new slots for the rest, under one lock — so a
// worker that only spawns (its fibers exit on other workers) pays one lock
// per kTransferBatch stacks, and gets stacks that other workers released
// warm rather than fresh pages that fault on first touch.
stack stack_pool::impl::refill(cache& c, unsigned cls) {
  std::vector<std::byte*>& list = c.free_[cls];
  class_state& k = state(c.node, cls);
  // A batch of a big class would hold more than the cache may keep.
  const unsigned batch = static_cast<unsigned>(std::clamp<std::size_t>(
      opts_.cache_bytes / 2 / class_bytes(cls), 1, kTransferBatch));
  {
    std::lock_guard lock(k.mu_);
    for (unsigned i = 0; i < batch; ++i) {
      std::byte* lo = take_listed(k, cls);
      if (lo == nullptr) lo = carve(k, c.node, cls);
      list.push_back(lo);
    }
  }
  bump(c.count_, batch - 1);
  c.bytes_ += (batch - 1) * class_bytes(cls);
  std::byte* lo = list.back();
  list.pop_back();
  return hand_out(lo, cls);
}

// A worker's cache is over its watermark: half of its stacks of `cls` go to
// the shared warm lists in one lock per node (still committed: the next
// refill, on any worker of that node, reuses them warm). Each stack goes to
// the list of the node its region belongs to, whichever worker released
// it (fibers migrate). trim() returns pages beyond the limit.
void stack_pool::impl::drain(cache& c, unsigned cls) {
  std::vector<std::byte*>& list = c.free_[cls];
  std::size_t n = std::max<std::size_t>(1, list.size() / 2);
  // The oldest (coldest) half: the front of the LIFO list.
  std::vector<std::byte*> moving(list.begin(), list.begin() + n);
  list.erase(list.begin(), list.begin() + n);
  bump(c.count_, -static_cast<std::int64_t>(n));
  c.bytes_ -= n * class_bytes(cls);
  for (unsigned node = 0; node < node_count_ && !moving.empty(); ++node) {
    auto mine = std::stable_partition(moving.begin(), moving.end(),
                                      [&](std::byte* lo) { return node_of(lo, cls) == node; });
    std::size_t m = static_cast<std::size_t>(mine - moving.begin());
    if (m == 0) continue;
    class_state& k = state(node, cls);
    {
      std::lock_guard lock(k.mu_);
      k.warm_.insert(k.warm_.end(), moving.begin(), mine);
      // relaxed: an approximate bound (see trim()) and a statistic, under k.mu_.
      count_warm(cls, static_cast<std::int64_t>(m));
      k.listed_.store(k.listed_.load(std::memory_order_relaxed) + m,
                      std::memory_order_relaxed);
    }
    moving.erase(moving.begin(), mine);
  }
}

// k.mu_ held. Warm stacks first (committed pages), newest first.
std::byte* stack_pool::impl::take_listed(class_state& k, unsigned cls) {
  std::vector<std::byte*>* from = !k.warm_.empty()   ? &k.warm_
                                  : !k.cold_.empty() ? &k.cold_
                                                     : nullptr;
  if (from == nullptr) return nullptr;
  if (from == &k.warm_) count_warm(cls, -1);
  std::byte* lo = from->back();
  from->pop_back();
  // relaxed: statistic; the only writers hold k.mu_.
  k.listed_.store(k.listed_.load(std::memory_order_relaxed) - 1,
                  std::memory_order_relaxed);
  return lo;
}

// k.mu_ held. Cuts the next slot, installing its guard; opens a new region
// when the current one is full or was abandoned because the pool degraded.
std::byte* stack_pool::impl::carve(class_state& k, unsigned node, unsigned cls) {
  for (;;) {
    region_header* r = k.carving_;
    if (r == nullptr || k.next_slot_ == r->slots) {
      open_region(k, node, cls);
      continue;
    }
    auto* slot = reinterpret_cast<std::byte*>(r->first_slot +
                                              k.next_slot_ * r->slot_bytes);
    if (!install_guard(*r, slot)) {
      k.carving_ = nullptr;  // the rest of r keeps its old kind: abandon it
      continue;
    }
    ++k.next_slot_;
    return slot + r->guard_bytes;
  }
}

// k.mu_ held.
void stack_pool::impl::open_region(class_state& k, unsigned node, unsigned cls) {
  const std::size_t span = span_[cls];
  int err = 0;
  std::byte* base = reserve_aligned(span, &err);
  check_reserved(base, span, cls, err);
  bind_to_node(base, span, node);  // before the header page is touched
  // SAFETY: base starts a fresh private read-write mapping aligned to span
  // (>= one page); nothing else refers to it until register_region().
  auto* r = new (base) region_header{};
  r->base = reinterpret_cast<std::uintptr_t>(base);
  r->span = span;
  r->first_slot = r->base + kPage;
  r->guard_bytes = guard_bytes(cls);
  r->stack_bytes = class_bytes(cls);
  r->slot_bytes = r->guard_bytes + r->stack_bytes;
  r->slots = (span - kPage) / r->slot_bytes;
  r->slots_end = r->first_slot + r->slots * r->slot_bytes;
  r->size_class = cls;
  r->node = node;
  r->kind = cls < kTinyClasses ? guard_kind::canary
                               : mode_.load(std::memory_order_relaxed);
  // Stacks below a page are packed densely and used whole, so transparent
  // huge pages waste nothing there and save a page fault per two stacks
  // (one per 2 MiB instead). Advice only: without THP nothing changes.
  if (cls < kTinyClasses) madvise(base, span, MADV_HUGEPAGE);
  detail::register_region(r);
  k.regions_.push_back(r);
  k.carving_ = r;
  k.next_slot_ = 0;
  regions_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
  reserved_.fetch_add(span, std::memory_order_relaxed);
}

// Pages of the region, when first touched, come from the node's memory if
// it has any free (MPOL_PREFERRED, not BIND: a full node falls back
// rather than failing the touch with SIGBUS). The binding is advice; a
// failure (no such node, a seccomp filter) is counted and reported once.
void stack_pool::impl::bind_to_node(std::byte* base, std::size_t span, unsigned node) {
  if (node >= opts_.node_os.size() || opts_.node_os[node] < 0) return;
  const unsigned os = static_cast<unsigned>(opts_.node_os[node]);
  const std::error_code ec = prefer_node(base, span, os);  // alloc/arena.h
  if (!ec) return;
  // relaxed: statistic; the first failure also says so on stderr.
  if (bind_failures_.fetch_add(1, std::memory_order_relaxed) == 0)
    std::fprintf(stderr, "weft: stacks: cannot prefer NUMA node %u for stack memory (%s); "
                         "stacks use the default placement\n",
                 os, ec.message().c_str());
}

bool stack_pool::impl::install_guard(const region_header& r, std::byte* slot) {
  switch (r.kind) {
    case guard_kind::canary:
      return true;
    case guard_kind::madvise_guard:
      if (madvise(slot, kPage, MADV_GUARD_INSTALL) == 0) return true;
      degrade(guard_kind::mprotect, errno_text(errno));
      return false;
    case guard_kind::mprotect:
      if (!take_mprotect_budget()) {
        degrade(guard_kind::canary, "the budget of " +
                                        std::to_string(opts_.mprotect_budget) +
                                        " mprotect guard pages is used up");
        return false;
      }
      if (mprotect(slot, kPage, PROT_NONE) == 0) return true;
      degrade(guard_kind::canary, "mprotect failed: " + errno_text(errno));
      return false;
  }
  return true;
}

bool stack_pool::impl::take_mprotect_budget() {
  unsigned left = mprotect_left_.load(std::memory_order_relaxed);
  while (left > 0) {
    // relaxed: a counter; no data is published with it.
    if (mprotect_left_.compare_exchange_weak(left, left - 1,
                                             std::memory_order_relaxed,
                                             std::memory_order_relaxed))
      return true;
  }
  return false;
}

void stack_pool::impl::degrade(guard_kind to, const std::string& why) {
  guard_kind cur = mode_.load(std::memory_order_relaxed);
  while (cur < to) {
    // relaxed: see mode_. Only the thread that moves the mode warns.
    if (mode_.compare_exchange_weak(cur, to, std::memory_order_relaxed,
                                    std::memory_order_relaxed)) {
      warn_fallback(to, why, opts_.mprotect_budget);
      return;
    }
  }
}

// kSharedCache release: the stack stays warm; trim() returns pages later.
void stack_pool::impl::release_shared(const stack& s) { put(s, /*returned=*/false); }

// Keeps shared_warm_ and shared_warm_bytes_ (guarded classes only: a tiny
// stack's pages are never returned). Called under the class's lock.
void stack_pool::impl::count_warm(unsigned cls, std::int64_t n) noexcept {
  if (cls < kTinyClasses) return;
  // relaxed: an approximate bound (see trim()) kept under the class locks.
  shared_warm_.fetch_add(static_cast<std::uint64_t>(n), std::memory_order_relaxed);
  shared_warm_bytes_.fetch_add(static_cast<std::uint64_t>(n * std::int64_t(class_bytes(cls))),
                               std::memory_order_relaxed);
}

bool stack_pool::impl::over_warm_limits() const noexcept {
  // relaxed: a hint; trim() re-checks under the class locks.
  return shared_warm_.load(std::memory_order_relaxed) > opts_.shared_warm_limit ||
         shared_warm_bytes_.load(std::memory_order_relaxed) > opts_.shared_warm_bytes;
}

std::uint64_t stack_pool::impl::warm_excess(unsigned cls) const noexcept {
  // relaxed: as in over_warm_limits().
  const std::uint64_t have = shared_warm_.load(std::memory_order_relaxed);
  const std::uint64_t bytes = shared_warm_bytes_.load(std::memory_order_relaxed);
  const std::uint64_t by_count = have > opts_.shared_warm_limit ? have - opts_.shared_warm_limit : 0;
  const std::uint64_t cb = class_bytes(cls);
  const std::uint64_t by_bytes =
      bytes > opts_.shared_warm_bytes ? (bytes - opts_.shared_warm_bytes + cb - 1) / cb : 0;
  return std::max(by_count, by_bytes);
}

// Returns the pages of the oldest warm stacks beyond shared_warm_limit or
// shared_warm_bytes, at most `budget` of them. MADV_DONTNEED makes the kernel shoot down TLB
// entries on every CPU the process runs on (an IPI each), which is why it
// never runs on the spawn/exit path: workers call trim() when they are
// about to sleep.
std::size_t stack_pool::impl::trim(std::size_t budget) {
  std::size_t done = 0;
  for (unsigned i = 0; i < node_count_ * (kClasses - kTinyClasses) && done < budget; ++i) {
    const unsigned node = i / (kClasses - kTinyClasses);
    const unsigned cls = kTinyClasses + i % (kClasses - kTinyClasses);
    class_state& k = state(node, cls);
    std::vector<std::byte*> batch;
    {
      std::lock_guard lock(k.mu_);
      if (!over_warm_limits()) return done;
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(
          {k.warm_.size(), warm_excess(cls), budget - done}));
      batch.assign(k.warm_.begin(), k.warm_.begin() + n);  // the oldest
      k.warm_.erase(k.warm_.begin(), k.warm_.begin() + n);
      count_warm(cls, -static_cast<std::int64_t>(n));
      k.listed_.store(k.listed_.load(std::memory_order_relaxed) - n,
                      std::memory_order_relaxed);  // relaxed: statistic under k.mu_
    }
    for (std::byte* lo : batch) {
      const stack st{lo, lo + class_bytes(cls), cls};
      const bool returned = return_pages(st);
      put(st, returned);
      done += returned;
    }
    // relaxed: a policy flag (see return_pages()).
    if (trim_off_.load(std::memory_order_relaxed)) return done;
  }
  return done;
}

// MADV_DONTNEED on the usable part; the guard page below stays installed.
bool stack_pool::impl::return_pages(const stack& s) {
  if (s.size_class < kTinyClasses) return false;  // less than a page: keep
  // SAFETY: the stack was released, so its contents are dead; the pages read
  // back as zeros when it is next used. The guard below is not in the range.
  if (madvise(s.lo, s.size(), MADV_DONTNEED) != 0) {
    // EINVAL on locked memory (mlockall): giving pages back is advice, so
    // the stack stays committed and trimming stops, said once.
    const int e = errno;  // read right after the call
    if (!trim_off_.exchange(true, std::memory_order_relaxed))  // relaxed: a policy flag
      std::fprintf(stderr, "weft: stack_pool: madvise(MADV_DONTNEED): %s; idle stacks stay committed\n",
                   std::strerror(e));
    return false;
  }
  returned_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
  return true;
}

void stack_pool::impl::put(const stack& s, bool returned) {
  class_state& k = state(node_of(s.lo, s.size_class), s.size_class);
  std::lock_guard lock(k.mu_);
  (returned ? k.cold_ : k.warm_).push_back(s.lo);
  if (!returned) count_warm(s.size_class, 1);
  // relaxed: statistic; the only writers hold k.mu_.
  k.listed_.store(k.listed_.load(std::memory_order_relaxed) + 1,
                  std::memory_order_relaxed);
}

// --- The public face ------------------------------------------------------

stack_pool::stack_pool(const stack_pool_options& opts)
    : impl_(new impl(opts)) {}

stack_pool::~stack_pool() {
  WEFT_CHECK(stats().live == 0,
             "stack_pool destroyed while some of its stacks are not released");
  delete impl_;
}

std::size_t stack_pool::class_size(std::size_t size) {
  return class_bytes(class_of(size));
}

// The hot path: a hit in the caller's cache is a vector pop.
stack stack_pool::allocate(std::size_t size, unsigned cache_index) {
  const unsigned cls = class_of(size);
  if (cache_index == kSharedCache) {
    // relaxed: statistic only.
    impl_->shared_allocs_.fetch_add(1, std::memory_order_relaxed);
    return impl_->allocate_slow(cls);
  }
  WEFT_DCHECK(cache_index < impl_->opts_.caches, "stack_pool: no such cache");
  cache& c = impl_->caches_[cache_index];
  bump(c.allocs_, 1);
  std::vector<std::byte*>& list = c.free_[cls];
  if (list.empty()) return impl_->refill(c, cls);
  std::byte* lo = list.back();
  list.pop_back();
  bump(c.count_, -1);
  c.bytes_ -= class_bytes(cls);
  return impl_->hand_out(lo, cls);
}

void stack_pool::release(stack s, unsigned cache_index) {
  WEFT_DCHECK(
      s && s.size_class < kClasses && s.size() == class_bytes(s.size_class),
      "stack_pool::release: not a stack from a stack_pool");
  if (cache_index == kSharedCache) {
    // relaxed: statistic only.
    impl_->shared_releases_.fetch_add(1, std::memory_order_relaxed);
    impl_->release_shared(s);
    return;
  }
  WEFT_DCHECK(cache_index < impl_->opts_.caches, "stack_pool: no such cache");
  cache& c = impl_->caches_[cache_index];
  bump(c.releases_, 1);
  // relaxed: the owner reads its own counter.
  c.free_[s.size_class].push_back(s.lo);
  bump(c.count_, 1);
  c.bytes_ += s.size();
  // relaxed: the owner reads its own counter.
  if (c.count_.load(std::memory_order_relaxed) > impl_->opts_.cache_watermark ||
      c.bytes_ > impl_->opts_.cache_bytes)
    impl_->drain(c, s.size_class);
}

std::size_t stack_pool::trim(std::size_t budget) { return impl_->trim(budget); }

bool stack_pool::needs_trim() const noexcept {
  // relaxed: a hint for an idle worker; trim() re-checks under the locks.
  return !impl_->trim_off_.load(std::memory_order_relaxed) &&  // relaxed: a policy flag
         impl_->over_warm_limits();
}

unsigned stack_pool::node_of(const stack& s) const {
  return impl_->node_of(s.lo, s.size_class);
}

bool stack_pool::has_canary(const stack& s) const {
  return impl_->has_canary(s.lo, s.size_class);
}

bool stack_pool::check_canary(const stack& s) const {
  WEFT_DCHECK(s, "stack_pool::check_canary: empty stack");
  return !impl_->has_canary(s.lo, s.size_class) || canary_intact(s);
}

bool stack_pool::canary_intact(const stack& s) noexcept {
  std::uint64_t word;
  std::memcpy(&word, s.lo, sizeof word);
  return word == detail::kCanaryMagic;
}

// --- Stats ----------------------------------------------------------------

stack_pool_stats stack_pool::stats() const {
  constexpr auto relaxed = std::memory_order_relaxed;  // a relaxed snapshot
  std::uint64_t allocs = impl_->shared_allocs_.load(relaxed);
  std::uint64_t releases = impl_->shared_releases_.load(relaxed);
  stack_pool_stats st;
  for (unsigned i = 0; i < impl_->opts_.caches; ++i) {
    const cache& c = impl_->caches_[i];
    allocs += c.allocs_.load(relaxed);
    releases += c.releases_.load(relaxed);
    st.cached += c.count_.load(relaxed);
  }
  for (unsigned n = 0; n < impl_->node_count_; ++n)
    for (const class_state& k : impl_->nodes_[n]) st.cached += k.listed_.load(relaxed);
  st.live = allocs > releases ? allocs - releases : 0;
  st.regions = impl_->regions_.load(relaxed);
  st.reserved_bytes = impl_->reserved_.load(relaxed);
  st.returned_to_os = impl_->returned_.load(relaxed);
  st.bind_failures = impl_->bind_failures_.load(relaxed);
  st.guard = impl_->mode_.load(relaxed);
  return st;
}

const char* to_string(guard_kind k) {
  switch (k) {
    case guard_kind::madvise_guard:
      return "madvise_guard";
    case guard_kind::mprotect:
      return "mprotect";
    case guard_kind::canary:
      return "canary";
  }
  return "unknown";
}

}  // namespace weft::alloc
