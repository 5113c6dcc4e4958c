// alloc/overflow.cc
//
// Stack overflow reporting: the region registry, the SIGSEGV handler and the
// per-thread signal stacks. See *Overflow* in stack_pool.h.
//
// *The registry* is a fixed array of region_header pointers. Registration
// takes registry_mu and publishes a slot with a release store; the handler
// scans the array with acquire loads and takes no lock, so it is
// async-signal-safe.
//
// *The handler* runs on the thread's sigaltstack (SA_ONSTACK): a fiber that
// overflowed faults with its stack pointer already in the guard page, so the
// handler cannot run on the fiber's stack. It calls only the describer,
// write(2) and abort(): no allocation, no locks, no stdio. A fault that is
// not in a guard page goes to the handler installed before ours, or, if
// that was the default action, restores it and returns: the faulting
// instruction runs again and the process dies of SIGSEGV as it would have
// (a SIGSEGV that no instruction raised is sent again: see forward()).
//
// Invariants:
//   - previous_action is written once, before our handler is installed, and
//     only read afterwards.
//   - registry_high is the number of registry slots ever used; slots at or
//     above it are null.
//
// Who calls what:
//   install_overflow_handler()              any thread, any number of times
//   enable_altstack(), disable_altstack()   a worker thread, for itself, from
//                                           its own stack (never from a
//                                           fiber: they use thread_local)
//   register_region(), unregister_region()  stack_pool (any thread)
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "alloc/check.h"
#include "alloc/region.h"
#include "alloc/stack_pool.h"

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102  // Linux 6.13, <asm-generic/mman-common.h>
#endif

namespace weft::alloc {

using detail::kPage;
using detail::region_header;

namespace {

// --- The registry ---------------------------------------------------------

// 16384 regions of the default 256 MiB are 4 TiB of stacks.
constexpr std::size_t kMaxRegions = 16384;

std::atomic<const region_header*> registry[kMaxRegions];
std::atomic<std::size_t> registry_high{0};
std::mutex registry_mu;  // serializes writers; the handler never takes it

// If addr is in the guard page of a registered stack, stores that stack.
bool find_guard_hit(std::uintptr_t addr, stack* out) {
  // acquire: pairs with the release store of registry_high in
  // register_region(), making the slot pointers below it visible.
  const std::size_t high = registry_high.load(std::memory_order_acquire);
  for (std::size_t i = 0; i < high; ++i) {
    // acquire: pairs with the release store in register_region(), which
    // publishes the header's fields.
    const region_header* r = registry[i].load(std::memory_order_acquire);
    // SAFETY: a registered header stays mapped until its pool is destroyed;
    // a fault racing with that destruction is not supported (region.h).
    if (r == nullptr || addr < r->first_slot || addr >= r->slots_end) continue;
    if (!r->has_guard_page()) return false;
    const std::uintptr_t off = addr - r->first_slot;
    if (off % r->slot_bytes >= r->guard_bytes) return false;  // in a stack
    auto* lo = reinterpret_cast<std::byte*>(
        r->first_slot + off / r->slot_bytes * r->slot_bytes + r->guard_bytes);
    *out = stack{lo, lo + r->stack_bytes, r->size_class};
    return true;
  }
  return false;
}

// --- The handler ------------------------------------------------------------

std::atomic<overflow_describer> describer{nullptr};
struct sigaction previous_action;

// Async-signal-safe formatting into a fixed buffer; truncates, never overflows.
struct line_buf {
  char text[384];
  std::size_t len = 0;

  void add(const char* s) {
    while (*s != '\0' && len < sizeof text) text[len++] = *s++;
  }
  void add_number(std::uint64_t v) {
    char digits[24];
    int n = 0;
    do {
      digits[n++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v != 0);
    while (n > 0 && len < sizeof text) text[len++] = digits[--n];
  }
};

}  // namespace

[[noreturn]] void report_stack_overflow(const stack& s) {
  char who[160] = {};
  // acquire: pairs with the release store in install_overflow_handler(),
  // publishing whatever state the describer reads.
  if (overflow_describer d = describer.load(std::memory_order_acquire))
    d(s, who, sizeof who);
  who[sizeof who - 1] = '\0';
  line_buf line;
  line.add("weft: stack overflow in ");
  line.add(who[0] != '\0' ? who : "a fiber");
  line.add(" (stack size ");
  line.add_number(s.size());
  line.add(" bytes) \xe2\x80\x94 raise the stack size with spawn options\n");
  ssize_t ignored = ::write(STDERR_FILENO, line.text, line.len);
  (void)ignored;
  std::abort();
}

namespace {

// Not ours: hand the fault to whoever handled SIGSEGV before us, as the
// kernel would have run it: its flags and mask honoured.
void forward(int sig, siginfo_t* info, void* uctx) {
  const struct sigaction& prev = previous_action;
  const bool siginfo = (prev.sa_flags & SA_SIGINFO) != 0;
  const bool handler = siginfo ? prev.sa_sigaction != nullptr
                               : prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN;
  if (handler) {
    if (prev.sa_flags & SA_RESETHAND) {
      // A one-shot handler (a crash logger): the disposition goes back to
      // the default before it runs, so the re-executed fault kills the
      // process instead of calling it forever.
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      sigemptyset(&dfl.sa_mask);
      sigaction(SIGSEGV, &dfl, nullptr);
    }
    // Its mask on top of ours (ours blocks SIGSEGV, as the kernel would
    // for it unless it asked for SA_NODEFER).
    sigset_t old;
    sigprocmask(SIG_BLOCK, &prev.sa_mask, &old);
    if (prev.sa_flags & SA_NODEFER) {
      sigset_t self;
      sigemptyset(&self);
      sigaddset(&self, sig);
      sigprocmask(SIG_UNBLOCK, &self, nullptr);
    }
    // SAFETY: a handler installed before ours expects exactly these
    // arguments; it may itself return to re-execute the fault, as ours does.
    if (siginfo) prev.sa_sigaction(sig, info, uctx);
    else prev.sa_handler(sig);
    sigprocmask(SIG_SETMASK, &old, nullptr);
    return;
  }
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGSEGV, &dfl, nullptr);
  // A fault re-executes on return and now kills us. A SIGSEGV that no
  // instruction raised would not recur, so send it again (it stays pending
  // until return): one sent with kill() (si_code <= 0), or one the kernel
  // sends itself (SI_KERNEL), as when it cannot push another signal's frame
  // onto the interrupted stack (a handler without SA_ONSTACK, on a fiber
  // near the bottom of its stack). Returning from that one would lose the
  // other signal and run on. (A general-protection fault is SI_KERNEL too;
  // it dies of the pending signal instead of its re-execution: the same.)
  if (info->si_code <= 0 || info->si_code == SI_KERNEL) raise(sig);
}

// The interrupted stack pointer, or 0 where we cannot tell.
std::uintptr_t interrupted_sp(void* uctx) {
  const auto* uc = static_cast<const ucontext_t*>(uctx);
#if defined(__x86_64__)
  return static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RSP]);
#elif defined(__aarch64__)
  return static_cast<std::uintptr_t>(uc->uc_mcontext.sp);
#else
  (void)uc;
  return 0;
#endif
}

void say(const char* text) {
  ssize_t ignored = ::write(STDERR_FILENO, text, std::strlen(text));
  (void)ignored;
}

void on_segv(int sig, siginfo_t* info, void* uctx) {
  const int saved_errno = errno;  // the interrupted code may be reading it
  stack s;
  // si_code > 0: a fault (a kill() carries a pid where si_addr would be).
  if (info->si_code > 0 &&
      find_guard_hit(reinterpret_cast<std::uintptr_t>(info->si_addr), &s)) {
    // An overflow of s moves the stack pointer to the bottom of s or into
    // its guard (by less than a page at a time: -fstack-clash-protection).
    // A fault there with the stack pointer elsewhere is a stray write, for
    // example a buffer overrun upward from the stack below, whose top
    // touches this guard: not s's overflow, and s's fiber may be long gone.
    const std::uintptr_t sp = interrupted_sp(uctx);
    const auto lo = reinterpret_cast<std::uintptr_t>(s.lo);
    if (sp == 0 || (sp >= lo - kPage && sp <= lo + kPage)) report_stack_overflow(s);
    say("weft: SIGSEGV in the guard page below a fiber's stack, with the stack pointer "
        "elsewhere: a buffer overrun or a stray pointer, not a stack overflow\n");
  }
  forward(sig, info, uctx);
  errno = saved_errno;
}

// --- Signal stacks ----------------------------------------------------------

std::size_t altstack_bytes() {
  const long min = sysconf(_SC_SIGSTKSZ);
  const std::size_t want = std::max<std::size_t>(
      std::size_t{64} << 10, min > 0 ? static_cast<std::size_t>(min) : 0);
  return (want + kPage - 1) & ~(kPage - 1);
}

// Owns this thread's signal stack: [guard page][altstack_bytes()].
struct altstack_owner {
  std::byte* mapping_ = nullptr;
  ~altstack_owner() { disable_altstack(); }
};
thread_local altstack_owner this_thread_altstack;

}  // namespace

// --- The public face ----------------------------------------------------

void detail::register_region(const region_header* r) {
  std::lock_guard lock(registry_mu);
  // relaxed: writers are serialized by registry_mu.
  const std::size_t high = registry_high.load(std::memory_order_relaxed);
  std::size_t i = 0;
  while (i < high && registry[i].load(std::memory_order_relaxed) != nullptr)
    ++i;
  WEFT_CHECK(i < kMaxRegions,
             "stack_pool: more than 16384 stack regions; raise region_bytes");
  // release: publishes *r; pairs with the acquire load in find_guard_hit().
  registry[i].store(r, std::memory_order_release);
  // release: publishes registry[i]; pairs with the acquire in find_guard_hit().
  if (i == high) registry_high.store(high + 1, std::memory_order_release);
}

void detail::unregister_region(const region_header* r) {
  std::lock_guard lock(registry_mu);
  const std::size_t high = registry_high.load(std::memory_order_relaxed);
  for (std::size_t i = 0; i < high; ++i) {
    // relaxed: writers are serialized by registry_mu; storing null
    // publishes nothing.
    if (registry[i].load(std::memory_order_relaxed) == r) {
      registry[i].store(nullptr, std::memory_order_relaxed);
      return;
    }
  }
}

void install_overflow_handler(overflow_describer describe) {
  // release: publishes the describer's state; pairs with the acquire in
  // report_stack_overflow().
  describer.store(describe, std::memory_order_release);
  static std::once_flag once;
  std::call_once(once, [] {
    // Read the previous action first, so that a fault racing with the
    // installation never sees previous_action half written.
    WEFT_CHECK(sigaction(SIGSEGV, nullptr, &previous_action) == 0,
               "install_overflow_handler: sigaction(SIGSEGV) query failed");
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    WEFT_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0,
               "install_overflow_handler: sigaction(SIGSEGV) failed");
  });
}

void enable_altstack() {
  altstack_owner& own = this_thread_altstack;
  if (own.mapping_ != nullptr) return;
  stack_t cur{};
  // Someone else's signal stack (a sanitizer's) is kept: it serves as well.
  if (sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE) == 0)
    return;
  const std::size_t bytes = altstack_bytes();
  void* p = mmap(nullptr, kPage + bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  WEFT_CHECK(p != MAP_FAILED, "enable_altstack: cannot map a signal stack");
  // Best effort: if the handler itself overflows, fault instead of corrupting.
  madvise(p, kPage, MADV_GUARD_INSTALL);
  stack_t ss{};
  ss.ss_sp = static_cast<std::byte*>(p) + kPage;
  ss.ss_size = bytes;
  WEFT_CHECK(sigaltstack(&ss, nullptr) == 0,
             "enable_altstack: sigaltstack failed");
  own.mapping_ = static_cast<std::byte*>(p);
}

void disable_altstack() {
  altstack_owner& own = this_thread_altstack;
  if (own.mapping_ == nullptr) return;
  stack_t ss{};
  ss.ss_flags = SS_DISABLE;
  if (sigaltstack(&ss, nullptr) != 0) return;  // EPERM: running on it; keep it
  munmap(own.mapping_, kPage + altstack_bytes());
  own.mapping_ = nullptr;
}

}  // namespace weft::alloc
