// runtime/quit_dump.cc — see quit_dump.h.
#include "runtime/quit_dump.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>

#include "sched/scheduler.h"

namespace weft::detail {
namespace {

// The handler's state: the dumper's eventfd (-1: none), and how many
// handlers run now. ~quit_dumper clears the fd and then waits for
// g_inside to reach zero before closing it; the handler counts itself in
// and then loads the fd. All seq_cst (store, then load, on both sides), so
// a handler never writes to a closed, perhaps reused, descriptor.
std::atomic<int> g_quit_fd{-1};
std::atomic<int> g_inside{0};
// What SIGQUIT did before the first dumper installed on_sigquit: true if
// ignored, false for the default action. Written by quit_dumper() before
// it installs the handler (sigaction orders it before any delivery) and
// only while no handler of ours is installed; relaxed: read by the handler
// alone, after sigaction.
std::atomic<bool> g_was_ignored{false};

void on_sigquit(int sig) {
  int saved = errno;  // async-signal-safe: write(2), signal(2), raise(3) only
  g_inside.fetch_add(1, std::memory_order_seq_cst);
  int fd = g_quit_fd.load(std::memory_order_seq_cst);
  if (fd >= 0) {
    std::uint64_t one = 1;
    ssize_t ignored = ::write(fd, &one, sizeof one);
    (void)ignored;
  }
  g_inside.fetch_sub(1, std::memory_order_seq_cst);
  if (fd < 0) {
    // No dumper any more, yet this handler is still installed: a
    // weft::signal_set that watched SIGQUIT put it back when it went away
    // after run() returned. Act as the disposition it replaced would.
    if (g_was_ignored.load(std::memory_order_relaxed)) {
      ::signal(sig, SIG_IGN);
    } else {
      ::signal(sig, SIG_DFL);
      ::raise(sig);
    }
  }
  errno = saved;
}

}  // namespace

quit_dumper::quit_dumper() {
  if (sigaction(SIGQUIT, nullptr, &old_) != 0) return;
  // Our own handler, left by a weft::signal_set that outlived an earlier
  // run (see on_sigquit), stands for the disposition it replaced.
  if (old_.sa_handler == &on_sigquit) {
    old_ = {};
    old_.sa_handler = g_was_ignored.load(std::memory_order_relaxed) ? SIG_IGN : SIG_DFL;
  }
  // SIG_IGN too: see quit_dump.h (a background job inherits it ignored).
  if (old_.sa_handler != SIG_DFL && old_.sa_handler != SIG_IGN) return;
  g_was_ignored.store(old_.sa_handler == SIG_IGN, std::memory_order_relaxed);
  efd_ = ::eventfd(0, EFD_CLOEXEC);
  if (efd_ < 0) return;
  g_quit_fd.store(efd_, std::memory_order_seq_cst);  // see g_quit_fd
  thread_ = std::thread([this] {
    for (;;) {
      std::uint64_t n = 0;
      if (::read(efd_, &n, sizeof n) != sizeof n) continue;  // EINTR
      if (stopping_.load(std::memory_order_acquire)) return;  // pairs with ~quit_dumper
      static const char kHead[] = "weft: SIGQUIT: every fiber\n";
      ssize_t ignored = ::write(2, kHead, sizeof kHead - 1);
      (void)ignored;
      if (auto* s = sched::scheduler::instance()) s->dump(2);
    }
  });
  struct sigaction sa {};
  sa.sa_handler = &on_sigquit;
  sigemptyset(&sa.sa_mask);
  // SA_ONSTACK: a worker's signal frame goes on its sigaltstack, never on
  // a fiber's stack, which may be 1 KiB.
  sa.sa_flags = SA_RESTART | SA_ONSTACK;
  sigaction(SIGQUIT, &sa, nullptr);
}

quit_dumper::~quit_dumper() {
  if (efd_ < 0) return;
  // Put the default back unless someone replaced our handler meanwhile (a
  // weft::signal_set watching SIGQUIT restores it later; see on_sigquit).
  struct sigaction now {};
  if (sigaction(SIGQUIT, nullptr, &now) == 0 && now.sa_handler == &on_sigquit)
    sigaction(SIGQUIT, &old_, nullptr);
  g_quit_fd.store(-1, std::memory_order_seq_cst);  // see g_quit_fd
  while (g_inside.load(std::memory_order_seq_cst) != 0) sched_yield();
  stopping_.store(true, std::memory_order_release);  // pairs with the thread's acquire
  std::uint64_t one = 1;
  ssize_t ignored = ::write(efd_, &one, sizeof one);
  (void)ignored;
  thread_.join();
  ::close(efd_);
}

}  // namespace weft::detail
