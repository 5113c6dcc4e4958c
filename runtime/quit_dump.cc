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

// The handler's only state: written before the handler is installed and
// cleared after it is removed (relaxed: sigaction orders both).
std::atomic<int> g_quit_fd{-1};

void on_sigquit(int) {
  int saved = errno;  // async-signal-safe: write(2) only
  std::uint64_t one = 1;
  int fd = g_quit_fd.load(std::memory_order_relaxed);
  if (fd >= 0) {
    ssize_t ignored = ::write(fd, &one, sizeof one);
    (void)ignored;
  }
  errno = saved;
}

}  // namespace

quit_dumper::quit_dumper() {
  if (sigaction(SIGQUIT, nullptr, &old_) != 0 || old_.sa_handler != SIG_DFL) return;
  efd_ = ::eventfd(0, EFD_CLOEXEC);
  if (efd_ < 0) return;
  g_quit_fd.store(efd_, std::memory_order_relaxed);  // see g_quit_fd
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
  sa.sa_flags = SA_RESTART;
  sigaction(SIGQUIT, &sa, nullptr);
}

quit_dumper::~quit_dumper() {
  if (efd_ < 0) return;
  sigaction(SIGQUIT, &old_, nullptr);
  g_quit_fd.store(-1, std::memory_order_relaxed);  // see g_quit_fd
  stopping_.store(true, std::memory_order_release);  // pairs with the thread's acquire
  std::uint64_t one = 1;
  ssize_t ignored = ::write(efd_, &one, sizeof one);
  (void)ignored;
  thread_.join();
  ::close(efd_);
}

}  // namespace weft::detail
