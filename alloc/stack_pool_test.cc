// alloc/stack_pool_test.cc
//
// Behaviour of stack_pool (see *Memory* in DESIGN.md): size classes, lazily
// committed pages, guard pages that do not split mappings, overflow reports
// that name the fiber, canaries, the mprotect fallback, and the caches.
// Assertions are about behaviour, never about speed.
#include "alloc/stack_pool.h"

#include <gtest/gtest.h>
#include <linux/mempolicy.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <set>
#include <vector>

namespace weft::alloc {
namespace {

constexpr std::size_t kKiB = 1024;
constexpr std::size_t kMiB = 1024 * kKiB;
constexpr std::size_t kPage = 4096;

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

// TSan keeps a shadow of every touched page resident as well.
#ifdef WEFT_TSAN
constexpr std::size_t kResidentPagesPerTouchedPage = 2;
#else
constexpr std::size_t kResidentPagesPerTouchedPage = 1;
#endif

// Mappings (lines of /proc/self/maps) that overlap [lo, hi); all of them
// when hi is 0. Sanitizers map shadow memory elsewhere: counting only the
// span of our stacks measures the pool, not them.
std::size_t mapping_count(std::uintptr_t lo = 0, std::uintptr_t hi = 0) {
  std::ifstream maps("/proc/self/maps");
  std::size_t n = 0;
  for (std::string line; std::getline(maps, line);) {
    const std::uintptr_t start = std::stoull(line, nullptr, 16);
    const std::uintptr_t end =
        std::stoull(line.substr(line.find('-') + 1), nullptr, 16);
    if (hi == 0 || (start < hi && end > lo)) ++n;
  }
  return n;
}

std::pair<std::uintptr_t, std::uintptr_t> span_of(
    const std::vector<stack>& stacks) {
  std::uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (const stack& s : stacks) {
    lo = std::min(lo, reinterpret_cast<std::uintptr_t>(s.lo));
    hi = std::max(hi, reinterpret_cast<std::uintptr_t>(s.hi));
  }
  return {lo, hi};
}

// An overflow_describer: async-signal-safe (no stdio), as the contract asks.
void describe_reader(const stack&, char* buf, std::size_t len) {
  const char text[] = "fiber 7 \"reader\"";
  std::size_t i = 0;
  for (; i + 1 < len && text[i] != '\0'; ++i) buf[i] = text[i];
  buf[i] = '\0';
}

void write_canary_over(const stack& s) { std::memset(s.lo, 0xAB, 8); }

TEST(StackPool, SizesRoundUpToTheirClass) {
  EXPECT_EQ(stack_pool::class_size(0), 1 * kKiB);
  EXPECT_EQ(stack_pool::class_size(1), 1 * kKiB);
  EXPECT_EQ(stack_pool::class_size(1 * kKiB), 1 * kKiB);
  EXPECT_EQ(stack_pool::class_size(1 * kKiB + 1), 2 * kKiB);
  EXPECT_EQ(stack_pool::class_size(2 * kKiB + 1), 4 * kKiB);
  EXPECT_EQ(stack_pool::class_size(4 * kKiB + 1), 8 * kKiB);
  EXPECT_EQ(stack_pool::class_size(64 * kKiB), 64 * kKiB);
  EXPECT_EQ(stack_pool::class_size(64 * kKiB + 1), 128 * kKiB);
  EXPECT_EQ(stack_pool::class_size(8 * kMiB), 8 * kMiB);

  stack_pool pool;
  for (std::size_t size :
       {std::size_t{1}, 1000 * std::size_t{1}, 3 * kKiB, 5000 * std::size_t{1},
        64 * kKiB, 3 * kMiB, 8 * kMiB}) {
    stack s = pool.allocate(size, 0);
    ASSERT_TRUE(s);
    EXPECT_EQ(s.size(), stack_pool::class_size(size)) << "size " << size;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(s.hi) % 16, 0u);
    pool.release(s, 0);
  }
}

TEST(StackPoolDeathTest, AStackAboveTheLargestClassAbortsSayingHowMuch) {
  stack_pool pool;
  EXPECT_DEATH((void)pool.allocate(8 * kMiB + 1, 0),
               "stack of 8388609 bytes was requested");
}

// Lowers RLIMIT_AS to what is mapped now plus 64 MiB, then asks for a region.
void allocate_without_address_space() {
  stack_pool pool;
  std::ifstream statm("/proc/self/statm");
  std::size_t mapped_pages = 0;
  statm >> mapped_pages;
  const rlim_t limit = mapped_pages * kPage + 64 * kMiB;
  const rlimit lim{limit, limit};
  setrlimit(RLIMIT_AS, &lim);
  (void)pool.allocate(stack_pool::kDefaultStackSize, 0);
}

TEST(StackPoolDeathTest, AnAddressSpaceShortageAbortsSayingHowMuchAndWhy) {
  EXPECT_DEATH(allocate_without_address_space(),
               "cannot reserve 536870912 bytes of address space for "
               "65536-byte stacks: Cannot allocate memory");
}

TEST(StackPool, AStackIsWritableEndToEnd) {
  stack_pool pool;
  stack s = pool.allocate(64 * kKiB, 0);
  for (std::byte* p = s.lo; p < s.hi; p += kPage) *p = std::byte{0x5A};
  std::memset(s.lo, 0x33, s.size());
  for (std::byte* p = s.lo; p < s.hi; p += 512) ASSERT_EQ(*p, std::byte{0x33});
  EXPECT_EQ(*(s.hi - 1), std::byte{0x33});
  pool.release(s, 0);
}

TEST(StackPool, PagesAreCommittedLazilyByTouch) {
  constexpr std::size_t kStacks = 10'000;
  stack_pool pool;
  std::vector<stack> stacks;
  stacks.reserve(kStacks);
  const std::size_t before = resident_bytes();
  for (std::size_t i = 0; i < kStacks; ++i) {
    stacks.push_back(pool.allocate(stack_pool::kDefaultStackSize, 0));
    *(stacks.back().hi - 64) = std::byte{1};  // a fiber's first touch, at the top
  }
  const std::size_t grown = resident_bytes() - before;
  const std::size_t one_page_each = kStacks * kPage;  // ~40 MB, not 640 MB
  EXPECT_GT(grown, one_page_each / 2);
  EXPECT_LT(grown, 2 * one_page_each * kResidentPagesPerTouchedPage);
  for (const stack& s : stacks) pool.release(s, 0);
}

TEST(StackPool, AMillionGuardedStacksDoNotMultiplyMappings) {
  constexpr std::size_t kStacks = 1'000'000;
  stack_pool_options opts;
  opts.cache_watermark = 2 * kStacks;  // keep releases cheap: no madvise
  stack_pool pool(opts);
  std::vector<stack> stacks;
  stacks.reserve(kStacks);
  for (std::size_t i = 0; i < kStacks; ++i)
    stacks.push_back(pool.allocate(stack_pool::kDefaultStackSize, 0));
  const stack_pool_stats st = pool.stats();
  EXPECT_EQ(st.guard, guard_kind::madvise_guard) << to_string(st.guard);
  EXPECT_EQ(st.live, kStacks);
  // At most one mapping per region, where mprotect guards would need two per
  // stack; vm.max_map_count is 65530.
  const auto [lo, hi] = span_of(stacks);
  EXPECT_LE(mapping_count(lo, hi), st.regions);
  EXPECT_LT(mapping_count(), std::size_t{65530} / 4);
  for (const stack& s : stacks) pool.release(s, 0);
  EXPECT_EQ(pool.stats().live, 0u);
}

// Allocates a default stack and writes one byte just below it.
void touch_the_guard_page(const stack_pool_options& opts) {
  install_overflow_handler(&describe_reader);
  enable_altstack();
  stack_pool pool(opts);
  stack s = pool.allocate(stack_pool::kDefaultStackSize, 0);
  volatile std::byte* below = s.lo - 1;
  *below = std::byte{1};
}

// A write into the guard page from code whose stack pointer is elsewhere
// (here the test's own stack; in a program, a buffer overrun upward from
// the stack below, or a stray pointer) is not that stack's overflow: it
// must not be blamed on the fiber owning the stack (which may be gone).
TEST(StackPoolDeathTest, AStrayWriteIntoAGuardPageIsNotBlamedOnItsStack) {
  EXPECT_DEATH(touch_the_guard_page({}),
               "weft: SIGSEGV in the guard page below a fiber's stack, with the stack pointer "
               "elsewhere: a buffer overrun or a stray pointer, not a stack overflow");
}

// --- A real overflow: recursion on a pool stack, reported from the altstack.

ucontext_t test_main_context;
ucontext_t test_fiber_context;

[[gnu::noinline]] int recurse(int depth) {
  volatile char frame[256];
  frame[0] = static_cast<char>(depth);
  if (depth > (1 << 20)) return 0;       // 256 MiB deep: never reached
  return recurse(depth + 1) + frame[0];  // not a tail call
}

void overflow_entry() { recurse(0); }

void overflow_a_16k_stack(const stack_pool_options& opts = {}) {
  install_overflow_handler(&describe_reader);
  enable_altstack();
  stack_pool pool(opts);
  stack s = pool.allocate(16 * kKiB, 0);
  getcontext(&test_fiber_context);
  test_fiber_context.uc_stack.ss_sp = s.lo;
  test_fiber_context.uc_stack.ss_size = s.size();
  test_fiber_context.uc_link = &test_main_context;
  makecontext(&test_fiber_context, overflow_entry, 0);
  swapcontext(&test_main_context, &test_fiber_context);
}

TEST(StackPoolDeathTest, ARecursingFiberIsReportedFromTheSignalStack) {
  EXPECT_DEATH(
      overflow_a_16k_stack(),
      "stack overflow in fiber 7 \"reader\" \\(stack size 16384 bytes\\)");
}

// --- A SIGSEGV that is no fault at an address: the kernel could not push
// another signal's frame (a handler without SA_ONSTACK) onto a fiber stack
// near its bottom, and sends SIGSEGV with si_code SI_KERNEL instead. The
// interrupted code does not fault again when the handler returns, so the
// handler must die of it as the default action would have: it once reset
// the default and returned, the other signal was lost, the program ran on,
// and later overflows went unreported.

void ignore_signal(int) {}
void signal_self_entry() { syscall(SYS_tgkill, getpid(), gettid(), SIGUSR1); }

void signal_at_the_bottom_of_a_stack() {
  install_overflow_handler(&describe_reader);
  enable_altstack();
  struct sigaction sa {};
  sa.sa_handler = ignore_signal;  // no SA_ONSTACK: its frame goes on the fiber's stack
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR1, &sa, nullptr);
  stack_pool pool;
  stack s = pool.allocate(16 * kKiB, 0);
  getcontext(&test_fiber_context);
  // The bottom 512 bytes only: a signal frame (the xsave area alone is
  // larger) reaches the guard page.
  test_fiber_context.uc_stack.ss_sp = s.lo;
  test_fiber_context.uc_stack.ss_size = 512;
  test_fiber_context.uc_link = &test_main_context;
  makecontext(&test_fiber_context, signal_self_entry, 0);
  swapcontext(&test_main_context, &test_fiber_context);
  pool.release(s, 0);  // ran on: the death test fails ("failed to die")
}

// Killed by SIGSEGV. Under a sanitizer the handler before ours is the
// sanitizer's, which reports the SIGSEGV and exits non-zero instead.
bool died_of_sigsegv(int status) {
#if defined(WEFT_ASAN) || defined(WEFT_TSAN)
  if (WIFEXITED(status)) return WEXITSTATUS(status) != 0;
#endif
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV;
}

TEST(StackPoolDeathTest, AKernelSentSigsegvKillsAsTheDefaultActionWould) {
  EXPECT_EXIT(signal_at_the_bottom_of_a_stack(), died_of_sigsegv, "");
}

TEST(StackPool, TinyStacksDetectAnOverwrittenCanary) {
  stack_pool pool;
  stack tiny = pool.allocate(1000, 0);
  EXPECT_EQ(tiny.size(), 1 * kKiB);
  EXPECT_TRUE(pool.check_canary(tiny));
  write_canary_over(tiny);
  EXPECT_FALSE(pool.check_canary(tiny));
  pool.release(tiny, 0);
  stack again = pool.allocate(1000, 0);  // the canary is rewritten at hand-out
  EXPECT_EQ(again.lo, tiny.lo);
  EXPECT_TRUE(pool.check_canary(again));
  pool.release(again, 0);

  stack guarded = pool.allocate(stack_pool::kDefaultStackSize, 0);
  write_canary_over(guarded);
  EXPECT_TRUE(pool.check_canary(guarded)) << "a guarded stack has no canary";
  pool.release(guarded, 0);
}

TEST(StackPool, WithoutMadviseGuardsStacksGetMprotectGuardPages) {
  stack_pool_options opts;
  opts.force_no_madvise_guard = true;
  stack_pool pool(opts);
  EXPECT_EQ(pool.stats().guard, guard_kind::mprotect);
  std::vector<stack> stacks;
  for (int i = 0; i < 10; ++i) stacks.push_back(pool.allocate(32 * kKiB, 0));
  const auto [lo, hi] = span_of(stacks);
  EXPECT_GE(mapping_count(lo, hi), 19u) << "each guard splits the mapping";
  for (const stack& s : stacks) {
    write_canary_over(s);
    EXPECT_TRUE(pool.check_canary(s));
    pool.release(s, 0);
  }
}

TEST(StackPoolDeathTest, AnMprotectGuardPageAlsoNamesTheFiber) {
  stack_pool_options opts;
  opts.force_no_madvise_guard = true;
  EXPECT_DEATH(
      overflow_a_16k_stack(opts),
      "stack overflow in fiber 7 \"reader\" \\(stack size 16384 bytes\\)");
}

TEST(StackPool, PastTheMprotectBudgetStacksGetACanary) {
  stack_pool_options opts;
  opts.force_no_madvise_guard = true;
  opts.mprotect_budget = 2;
  stack_pool pool(opts);
  // The shared cache carves one slot at a time (a worker cache carves a
  // batch), so each of the three meets the budget in turn.
  constexpr unsigned kShared = stack_pool::kSharedCache;
  stack a = pool.allocate(stack_pool::kDefaultStackSize, kShared);
  stack b = pool.allocate(stack_pool::kDefaultStackSize, kShared);
  stack c = pool.allocate(stack_pool::kDefaultStackSize, kShared);
  EXPECT_EQ(pool.stats().guard, guard_kind::canary);
  EXPECT_TRUE(pool.check_canary(c));
  for (const stack& s : {a, b, c}) write_canary_over(s);
  EXPECT_TRUE(pool.check_canary(a));
  EXPECT_TRUE(pool.check_canary(b));
  EXPECT_FALSE(pool.check_canary(c));
  for (const stack& s : {a, b, c}) pool.release(s, kShared);
}

TEST(StackPool, TheCacheHandsBackTheMostRecentlyReleasedStack) {
  stack_pool pool;
  stack a = pool.allocate(stack_pool::kDefaultStackSize, 0);
  stack b = pool.allocate(stack_pool::kDefaultStackSize, 0);
  const std::uint64_t cached = pool.stats().cached;  // the rest of the refill batch
  pool.release(a, 0);
  pool.release(b, 0);
  EXPECT_EQ(pool.stats().cached, cached + 2);
  stack first = pool.allocate(stack_pool::kDefaultStackSize, 0);
  stack second = pool.allocate(stack_pool::kDefaultStackSize, 0);
  EXPECT_EQ(first.lo, b.lo);
  EXPECT_EQ(second.lo, a.lo);
  EXPECT_EQ(pool.stats().live, 2u);
  pool.release(first, 0);
  pool.release(second, 0);
}

// A pool that keeps one warm stack in its shared lists, holding two: a, then
// b, each with a byte written at its top (so each has a committed page).
struct two_warm_stacks {
  static constexpr unsigned kShared = stack_pool::kSharedCache;
  stack_pool pool{[] {
    stack_pool_options o;
    o.shared_warm_limit = 1;
    return o;
  }()};
  stack a, b;
  two_warm_stacks() {
    a = pool.allocate(stack_pool::kDefaultStackSize, kShared);
    b = pool.allocate(stack_pool::kDefaultStackSize, kShared);
    *(a.hi - 1) = std::byte{0x77};
    *(b.hi - 1) = std::byte{0x77};
    pool.release(a, kShared);
    pool.release(b, kShared);
  }
};

// Under mlockall the kernel refuses MADV_DONTNEED (EINVAL). Giving pages
// back is advice: trimming stops (one stderr line), the stacks stay usable,
// and the process goes on (it used to abort from an idle worker).
void trim_under_mlockall() {
  // Needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK: without them there
  // is nothing to show; exit as the test expects, saying so.
  if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0) {
    std::fprintf(stderr, "mlockall refused here: nothing to test\n");
    std::exit(0);
  }
  two_warm_stacks w;
  auto& pool = w.pool;
  constexpr unsigned kShared = two_warm_stacks::kShared;
  if (pool.trim(100) != 0) {  // nothing was locked: ASan and TSan make mlockall() a no-op
    std::fprintf(stderr, "MADV_DONTNEED was not refused here: nothing to test\n");
    std::exit(0);
  }
  if (pool.needs_trim() || pool.stats().returned_to_os != 0) std::exit(3);
  stack again = pool.allocate(stack_pool::kDefaultStackSize, kShared);
  if (*(again.hi - 1) != std::byte{0x77}) std::exit(4);  // still committed, still usable
  pool.release(again, kShared);
  std::fprintf(stderr, "trimmed nothing, went on\n");
  std::exit(0);
}

TEST(StackPoolDeathTest, TrimUnderLockedMemoryKeepsTheStacksAndGoesOn) {
  EXPECT_EXIT(trim_under_mlockall(), ::testing::ExitedWithCode(0),
              "MADV_DONTNEED.*idle stacks stay committed|mlockall refused|not refused here");
}

TEST(StackPool, TrimReturnsThePagesOfTheOldestStacksPastTheLimit) {
  two_warm_stacks w;
  auto& pool = w.pool;
  constexpr unsigned kShared = two_warm_stacks::kShared;
  EXPECT_EQ(pool.stats().returned_to_os, 0u) << "release never calls madvise";
  EXPECT_TRUE(pool.needs_trim());
  EXPECT_EQ(pool.trim(100), 1u);  // down to the limit: the oldest (a) goes
  EXPECT_FALSE(pool.needs_trim());
  EXPECT_EQ(pool.stats().returned_to_os, 1u);
  stack first = pool.allocate(stack_pool::kDefaultStackSize, kShared);
  stack second = pool.allocate(stack_pool::kDefaultStackSize, kShared);
  EXPECT_EQ(first.lo, w.b.lo) << "warm stacks are handed out first";
  EXPECT_EQ(*(first.hi - 1), std::byte{0x77});
  EXPECT_EQ(second.lo, w.a.lo);
  EXPECT_EQ(*(second.hi - 1), std::byte{0}) << "its pages went back to the OS";
  pool.release(first, kShared);
  pool.release(second, kShared);
}

TEST(StackPool, AnOverfullWorkerCacheSpillsHalfToTheSharedList) {
  stack_pool_options opts;
  opts.cache_watermark = 40;
  stack_pool pool(opts);
  std::vector<stack> held;
  for (int i = 0; i < 80; ++i) held.push_back(pool.allocate(stack_pool::kDefaultStackSize, 0));
  for (const stack& s : held) pool.release(s, 0);
  // Every stack is cached somewhere, warm (nothing went back to the OS).
  EXPECT_EQ(pool.stats().live, 0u);
  EXPECT_GE(pool.stats().cached, 80u);
  EXPECT_EQ(pool.stats().returned_to_os, 0u);
}

// The limits count bytes as well as stacks: with the default counts (256
// per cache, 4096 warm), 64 big stacks whose pages were all touched stay
// within cache_bytes in the worker's cache and shared_warm_bytes warm; the
// rest go back to the OS at the next trim().
TEST(StackPool, BigStacksAreKeptWarmByBytesNotByCount) {
  constexpr std::size_t kBig = std::size_t{1} << 20;  // a 1 MiB class
  constexpr int kStacks = 64;
  stack_pool_options opts;
  opts.cache_bytes = 8 * kBig;
  opts.shared_warm_bytes = 16 * kBig;
  stack_pool pool(opts);
  std::vector<stack> held;
  for (int i = 0; i < kStacks; ++i) {
    held.push_back(pool.allocate(kBig, 0));
    ASSERT_EQ(held.back().size(), kBig);
    std::memset(held.back().lo, 0x5a, kBig);  // every page committed
  }
  const std::size_t before = resident_bytes();
  for (const stack& s : held) pool.release(s, 0);
  EXPECT_EQ(pool.stats().returned_to_os, 0u) << "release never calls madvise";
  EXPECT_TRUE(pool.needs_trim()) << "56 MiB warm in the shared lists, over 16 MiB";
  std::size_t trimmed = 0;
  while (pool.needs_trim() && trimmed < kStacks) trimmed += pool.trim(4);
  EXPECT_FALSE(pool.needs_trim());
  // 64 stacks: at most 8 in the cache, at most 16 warm in the shared lists.
  EXPECT_GE(trimmed, std::size_t{kStacks - 8 - 16});
  EXPECT_EQ(pool.stats().returned_to_os, trimmed);
  EXPECT_EQ(pool.stats().cached, std::size_t{kStacks});  // every stack is still listed
  const std::size_t freed = before - std::min(before, resident_bytes());
  EXPECT_GE(freed, (trimmed * kBig) / 2) << "the trimmed stacks' pages went back";
}

// A cache that runs dry takes a batch from the shared lists, but no more
// of a big class than half of cache_bytes: 4 stacks of 1 MiB, not 32.
TEST(StackPool, ARefillOfABigClassIsBoundedByBytes) {
  constexpr std::size_t kBig = std::size_t{1} << 20;
  stack_pool_options opts;
  opts.cache_bytes = 8 * kBig;
  stack_pool pool(opts);
  stack s = pool.allocate(kBig, 0);
  EXPECT_EQ(pool.stats().cached, 3u);  // the batch of 4, less the one handed out
  stack small = pool.allocate(stack_pool::kDefaultStackSize, 0);
  EXPECT_EQ(pool.stats().cached, 3u + 31u);  // a small class still takes 32
  pool.release(small, 0);
  pool.release(s, 0);
}

TEST(StackPool, StacksReleasedOnOneWorkerComeBackWarmToAnother) {
  stack_pool_options opts;
  opts.caches = 2;
  opts.cache_watermark = 4;
  stack_pool pool(opts);
  std::vector<stack> spawned;
  for (int i = 0; i < 64; ++i) {  // worker 0 spawns...
    spawned.push_back(pool.allocate(stack_pool::kDefaultStackSize, 0));
    *(spawned.back().hi - 1) = std::byte{0x55};
  }
  for (const stack& s : spawned) pool.release(s, 1);  // ...the fibers exit on worker 1
  std::set<std::byte*> released;
  for (const stack& s : spawned) released.insert(s.lo);
  std::vector<stack> again;
  int reused = 0;
  for (int i = 0; i < 32; ++i) {
    again.push_back(pool.allocate(stack_pool::kDefaultStackSize, 0));
    if (released.count(again.back().lo)) {
      ++reused;
      EXPECT_EQ(*(again.back().hi - 1), std::byte{0x55}) << "still committed";
    }
  }
  EXPECT_GT(reused, 16);
  EXPECT_EQ(pool.stats().returned_to_os, 0u);
  for (const stack& s : again) pool.release(s, 0);
}

TEST(StackPool, WorkerCachesAndTheSharedCacheWorkSideBySide) {
  stack_pool_options opts;
  opts.caches = 2;
  opts.cache_watermark = 8;
  stack_pool pool(opts);
  auto churn = [&pool](unsigned cache) {
    std::vector<stack> held;
    for (int round = 0; round < 2000; ++round) {
      held.push_back(pool.allocate((round % 3 + 1) * 8 * kKiB, cache));
      *(held.back().hi - 1) = std::byte{1};
      if (held.size() > 12) {
        for (const stack& s : held) pool.release(s, cache);
        held.clear();
      }
    }
    for (const stack& s : held) pool.release(s, cache);
  };
  std::thread w0(churn, 0u);
  std::thread w1(churn, 1u);
  churn(stack_pool::kSharedCache);
  w0.join();
  w1.join();
  EXPECT_EQ(pool.stats().live, 0u);
}

// --- NUMA nodes ------------------------------------------------------------

TEST(StackPoolNuma, EachCacheGetsStacksFromItsOwnNode) {
  stack_pool_options opts;
  opts.caches = 4;
  opts.cache_nodes = {0, 1, 0, 1};
  stack_pool pool(opts);
  std::vector<std::pair<stack, unsigned>> held;
  for (unsigned c = 0; c < 4; ++c)
    for (int i = 0; i < 40; ++i)  // past one refill batch
      held.emplace_back(pool.allocate(stack_pool::kDefaultStackSize, c), c);
  for (auto& [s, c] : held) EXPECT_EQ(pool.node_of(s), opts.cache_nodes[c]);
  for (auto& [s, c] : held) pool.release(s, c);
  EXPECT_EQ(pool.stats().live, 0u);
}

TEST(StackPoolNuma, WarmStacksGoBackToTheirNodeWhereverTheyAreReleased) {
  stack_pool_options opts;
  opts.caches = 4;
  opts.cache_nodes = {0, 1, 0, 1};
  opts.cache_watermark = 4;
  stack_pool pool(opts);
  std::vector<stack> node1;
  std::set<std::byte*> node1_lo;
  for (int i = 0; i < 32; ++i) {
    node1.push_back(pool.allocate(stack_pool::kDefaultStackSize, 1));
    node1_lo.insert(node1.back().lo);
  }
  // Their fibers exit on a worker of node 0: its cache spills them.
  for (const stack& s : node1) pool.release(s, 0);
  std::vector<std::pair<stack, unsigned>> again;
  int node1_reused = 0;
  for (int i = 0; i < 32; ++i) {
    again.emplace_back(pool.allocate(stack_pool::kDefaultStackSize, 2), 2u);  // node 0
    EXPECT_EQ(pool.node_of(again.back().first), 0u);
    EXPECT_EQ(node1_lo.count(again.back().first.lo), 0u) << "a node-1 stack reached node 0";
    again.emplace_back(pool.allocate(stack_pool::kDefaultStackSize, 3), 3u);  // node 1
    EXPECT_EQ(pool.node_of(again.back().first), 1u);
    node1_reused += static_cast<int>(node1_lo.count(again.back().first.lo));
  }
  EXPECT_GT(node1_reused, 0) << "node 1's spilled stacks were not reused on node 1";
  for (auto& [s, c] : again) pool.release(s, c);
}

// mbind(MPOL_PREFERRED) on node 0, which every Linux machine has.
TEST(StackPoolNuma, RegionsPreferTheirNodesMemory) {
  stack_pool_options opts;
  opts.node_os = {0};
  stack_pool pool(opts);
  stack s = pool.allocate(stack_pool::kDefaultStackSize, 0);
  *(s.hi - 1) = std::byte{1};
  if (pool.stats().bind_failures != 0) GTEST_SKIP() << "mbind refused here (no NUMA support?)";
  int mode = -1;
  unsigned long mask[16] = {};
  ASSERT_EQ(syscall(SYS_get_mempolicy, &mode, mask, 16 * 8 * sizeof(unsigned long),
                    static_cast<void*>(s.hi - 1), MPOL_F_ADDR),
            0)
      << std::strerror(errno);
  EXPECT_EQ(mode, MPOL_PREFERRED);
  EXPECT_EQ(mask[0] & 1UL, 1UL);
  pool.release(s, 0);
}

TEST(StackPoolNuma, ANodeTheKernelDoesNotHaveIsReportedAndStacksStillWork) {
  ::testing::internal::CaptureStderr();
  stack_pool_options opts;
  opts.node_os = {1000};  // no machine here has it
  stack_pool pool(opts);
  stack s = pool.allocate(stack_pool::kDefaultStackSize, 0);
  *(s.hi - 1) = std::byte{7};
  EXPECT_EQ(*(s.hi - 1), std::byte{7});
  pool.release(s, 0);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_GE(pool.stats().bind_failures, 1u);
  EXPECT_NE(err.find("cannot prefer NUMA node 1000"), std::string::npos) << err;
}

}  // namespace
}  // namespace weft::alloc
