// io/signal.cc — see io/signal.h for the semantics.
//
// The handler runs on whatever thread the kernel picks, interrupting
// anything, so it touches only `g` (constant-initialized atomics, never
// destroyed) and calls only write(2). Everything else — who watches which
// signal, the dispositions weft replaced — lives in `installs()`, under a
// mutex the handler never takes.
//
//   handler                                   unregistering a set
//   -------                                   -------------------
//   delivered[sig] += 1        (release)      efd_plus_1[slot] = 0  (seq_cst)
//   for each slot:                            wait until inside[slot] == 0
//     inside[slot] += 1        (seq_cst)        (seq_cst)
//     f = efd_plus_1[slot]     (seq_cst)      close(efd)
//     if f and mask[slot] has sig: write(f)
//     inside[slot] -= 1
// Both sides store and then load (StoreLoad, seq_cst): either the handler
// sees the slot empty, or the closer sees the handler inside and waits, so
// a handler never writes to a closed (perhaps already reused) descriptor.
#include "io/signal.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <system_error>

#include "sched/park.h"

namespace weft::io {
namespace {

constexpr int kMaxSets = 64;
constexpr int kMaxSignal = 64;

std::uint64_t bit_of(int sig) { return std::uint64_t{1} << (sig - 1); }

struct handler_state {
  // Deliveries per signal (index: the signal) while weft's handler was
  // installed for it.
  std::atomic<std::uint64_t> delivered[kMaxSignal + 1];
  // Per registry slot: the set's eventfd + 1 (0: free), its mask, and how
  // many handlers are using the slot now (per slot, so that a set closing
  // waits only for handlers writing to its own eventfd).
  std::atomic<int> efd_plus_1[kMaxSets];
  std::atomic<std::uint64_t> mask[kMaxSets];
  std::atomic<int> inside[kMaxSets];
};
constinit handler_state g{};

struct install_state {
  std::mutex mu;
  int watchers[kMaxSignal + 1] = {};           // guarded by mu: sets per signal
  struct sigaction previous[kMaxSignal + 1];   // guarded by mu: to restore
  std::uint64_t slots_used = 0;                // guarded by mu: bit i = slot i
};
// Never destroyed: a static signal_set may be destroyed after any other
// static object.
install_state& installs() {
  static install_state* s = new install_state;
  return *s;
}

extern "C" void on_signal(int sig, siginfo_t* info, void*) {
  // weft's own SIGURG (a stuck worker's rescue) is not a delivery.
  if (handle_rescue_signal(sig, info)) return;  // keeps errno itself
  const int saved = errno;
  // release: pairs with take_delivered()'s acquire; the eventfd write
  // below is what wakes the waiter.
  g.delivered[sig].fetch_add(1, std::memory_order_release);
  const std::uint64_t bit = bit_of(sig);
  for (int i = 0; i < kMaxSets; ++i) {
    g.inside[i].fetch_add(1, std::memory_order_seq_cst);  // see the table above
    int f = g.efd_plus_1[i].load(std::memory_order_seq_cst) - 1;
    // relaxed: the mask was stored before the slot's fd was published, and
    // the load above saw that fd.
    if (f >= 0 && (g.mask[i].load(std::memory_order_relaxed) & bit)) {
      std::uint64_t one = 1;
      ssize_t ignored = ::write(f, &one, sizeof one);  // never blocks: the count cannot overflow
      (void)ignored;
    }
    g.inside[i].fetch_sub(1, std::memory_order_seq_cst);
  }
  errno = saved;
}

bool watchable(int sig) {
  if (sig < 1 || sig > kMaxSignal) return false;
  switch (sig) {
    case SIGKILL: case SIGSTOP:  // cannot be caught
    case SIGSEGV: case SIGBUS: case SIGILL: case SIGFPE: case SIGTRAP: case SIGSYS:
      return false;  // faults: synchronous, and SIGSEGV is the overflow report's
    default:
      return true;
  }
}

std::unexpected<std::error_code> error_of(int e) {
  return std::unexpected(std::error_code(e, std::system_category()));
}

// weft's SIGURG handler, installed only where nobody handles SIGURG (its
// default action ignores it): flushes a stuck worker's ring for the
// monitor (handle_rescue_signal()), and ignores any other SIGURG, as the
// disposition it replaced would have.
extern "C" void on_sigurg(int sig, siginfo_t* info, void*) {
  (void)handle_rescue_signal(sig, info);  // keeps errno itself
}

// Puts back the disposition weft's handler replaced for sig, unless the
// program installed one of its own meanwhile (sigaction(2) while a set
// watched): that one is the program's decision, and stays. Under st.mu.
void restore_previous(install_state& st, int sig) noexcept {
  struct sigaction cur {};
  if (::sigaction(sig, nullptr, &cur) != 0) return;
  if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == &on_signal)
    ::sigaction(sig, &st.previous[sig], nullptr);
}

}  // namespace

bool sigurg_reaches_rescue() noexcept {
  install_state& st = installs();
  std::unique_lock lk(st.mu, std::defer_lock);  // against watch() and reset() meanwhile
  try {
    lk.lock();
  } catch (const std::system_error&) {
    return false;  // not expected; no rescue signal this time
  }
  struct sigaction cur {};
  if (::sigaction(SIGURG, nullptr, &cur) != 0) return false;
  if (cur.sa_flags & SA_SIGINFO)
    return cur.sa_sigaction == &on_sigurg || cur.sa_sigaction == &on_signal;
  if (cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN) return false;  // the program's
  // Nobody handles it (at first, or a signal_set restored the default it
  // found before weft's was installed): install weft's.
  struct sigaction sa {};
  sa.sa_sigaction = &on_sigurg;
  sigemptyset(&sa.sa_mask);
  // SA_ONSTACK: the stuck fiber's stack may be small (see watch()).
  sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  return ::sigaction(SIGURG, &sa, nullptr) == 0;
}

result<signal_set> signal_set::watch(std::initializer_list<int> signals) {
  std::uint64_t mask = 0;
  for (int s : signals) {
    if (!watchable(s)) return error_of(EINVAL);
    mask |= bit_of(s);
  }
  if (mask == 0) return error_of(EINVAL);  // would wait forever
  // Blocking mode: see op_kind::read in io/driver.h.
  int efd = ::eventfd(0, EFD_CLOEXEC);
  if (efd < 0) return error_of(errno);
  signal_set set;
  set.efd_ = efd;
  set.mask_ = mask;
  install_state& st = installs();
  std::lock_guard lk(st.mu);
  int slot = 0;
  while (slot < kMaxSets && (st.slots_used & (std::uint64_t{1} << slot))) ++slot;
  if (slot == kMaxSets) return error_of(ENOSPC);  // set's destructor closes efd
  for (int s = 1; s <= kMaxSignal; ++s) {
    if (!(mask & bit_of(s))) continue;
    // acquire: pairs with the handler's release; deliveries so far are not ours.
    set.seen_[s] = g.delivered[s].load(std::memory_order_acquire);
    if (st.watchers[s]++ > 0) continue;
    struct sigaction sa {};
    sa.sa_sigaction = &on_signal;
    sigemptyset(&sa.sa_mask);
    // SA_ONSTACK: on a worker the frame goes on its sigaltstack, not on the
    // running fiber's stack (which may be 1 KiB; the frame is ~3 KiB with
    // AVX-512 state). Other threads have no altstack and use their own.
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    if (::sigaction(s, &sa, &st.previous[s]) != 0) {  // validated above: not expected
      int e = errno;
      --st.watchers[s];
      for (int t = 1; t < s; ++t)
        if ((mask & bit_of(t)) && --st.watchers[t] == 0) restore_previous(st, t);
      return error_of(e);
    }
  }
  st.slots_used |= std::uint64_t{1} << slot;
  set.slot_ = slot;
  g.mask[slot].store(mask, std::memory_order_relaxed);  // published by the store below
  g.efd_plus_1[slot].store(efd + 1, std::memory_order_seq_cst);
  return set;
}

signal_set& signal_set::operator=(signal_set&& o) noexcept {
  if (this != &o) {
    reset();
    slot_ = std::exchange(o.slot_, -1);
    efd_ = std::exchange(o.efd_, -1);
    seen_ = o.seen_;
    mask_ = o.mask_;
    next_ = o.next_;
  }
  return *this;
}

signal_set::~signal_set() { reset(); }

void signal_set::reset() noexcept {
  if (slot_ >= 0) {
    install_state& st = installs();
    std::lock_guard lk(st.mu);
    for (int s = 1; s <= kMaxSignal; ++s)
      if ((mask_ & bit_of(s)) && --st.watchers[s] == 0)
        restore_previous(st, s);  // the last watcher
    g.efd_plus_1[slot_].store(0, std::memory_order_seq_cst);  // see the table
    while (g.inside[slot_].load(std::memory_order_seq_cst) != 0) sched_yield();
    g.mask[slot_].store(0, std::memory_order_relaxed);
    st.slots_used &= ~(std::uint64_t{1} << slot_);
    slot_ = -1;
  }
  if (efd_ >= 0) ::close(std::exchange(efd_, -1));
}

int signal_set::take_delivered() noexcept {
  for (int k = 0; k < kMaxSignal; ++k) {
    int s = (next_ - 1 + k) % kMaxSignal + 1;  // round robin: no signal starves
    if (!(mask_ & bit_of(s))) continue;
    // acquire: pairs with the handler's release.
    if (g.delivered[s].load(std::memory_order_acquire) != seen_[s]) {
      ++seen_[s];
      next_ = s % kMaxSignal + 1;
      return s;
    }
  }
  return 0;
}

result<int> signal_set::try_wait() {
  if (slot_ < 0) return error_of(EBADF);
  if (int s = take_delivered()) return s;
  return std::unexpected(std::make_error_code(std::errc::resource_unavailable_try_again));
}

result<int> signal_set::wait(deadline_arg d, std::source_location where) {
  if (slot_ < 0) return error_of(EBADF);
  for (;;) {
    if (int s = take_delivered()) return s;
    // Sleep until the handler writes to our eventfd. Deliveries already
    // counted leave the eventfd readable; then this loops once more.
    std::uint64_t count = 0;
    if (sched::current_fiber()) {
      op o{.kind = op_kind::read, .fd = efd_, .buf = &count, .len = sizeof count};
      if (auto r = perform(o, d.when, "signal wait", where); !r) return std::unexpected(r.error());
      continue;
    }
    int ms = -1;
    if (d.when != clock::time_point::max()) {
      // Compared before subtracting: min() - now() (a deadline long past)
      // overflows, in practice to a wait of ~25 days.
      const clock::time_point now = clock::now();
      if (d.when <= now) return std::unexpected(std::make_error_code(std::errc::timed_out));
      const auto left = d.when - now;
      // Clamped: beyond INT_MAX ms (~24.8 days) the int would wrap, and a
      // negative timeout means "forever" to poll(2); the loop waits again.
      ms = static_cast<int>(std::min<std::int64_t>(
          std::chrono::ceil<std::chrono::milliseconds>(left).count(), INT32_MAX));
    }
    pollfd p{.fd = efd_, .events = POLLIN, .revents = 0};
    int r = ::poll(&p, 1, ms);
    if (r < 0 && errno != EINTR) return error_of(errno);
    // Readable, and we are its only reader: the read does not block.
    if (r > 0 && ::read(efd_, &count, sizeof count) < 0 && errno != EAGAIN)
      return error_of(errno);
  }
}

}  // namespace weft::io
