// runtime/driver_select.cc — see driver_select.h.
//
// WEFT_IO picks the I/O driver of every worker:
//   uring  io_uring, or a fatal error if the kernel refuses it;
//   auto   (default) io_uring, falling back with one log line when
//          io_uring_setup fails (seccomp, kernel.io_uring_disabled, old
//          kernels);
//   epoll  the readiness driver (io/epoll_driver.cc);
//   (a worker that can get no I/O driver at all under these is a fatal
//   error with the reason, not a worker without I/O beside others with it)
//   none   the futex driver of sched/, without I/O.
#include "runtime/driver_select.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "alloc/check.h"
#include "io/driver.h"

namespace weft {
namespace {

enum class io_choice { automatic, uring, epoll, none };

io_choice choice_from_env() {
  const char* e = std::getenv("WEFT_IO");
  if (!e || !*e || std::strcmp(e, "auto") == 0) return io_choice::automatic;
  if (std::strcmp(e, "uring") == 0) return io_choice::uring;
  if (std::strcmp(e, "epoll") == 0) return io_choice::epoll;
  if (std::strcmp(e, "none") == 0) return io_choice::none;
  std::fprintf(stderr, "weft: ignoring WEFT_IO=%s (want uring, epoll, auto or none)\n", e);
  return io_choice::automatic;
}

// The fall-back line, once per process however many workers fall back.
void log_fallback_once(const std::error_code& ec) {
  static std::atomic<bool> logged{false};
  // relaxed: only deduplicates a log line.
  if (!logged.exchange(true, std::memory_order_relaxed))
    std::fprintf(stderr, "weft: io_uring unavailable, using epoll: %s%s\n", ec.message().c_str(),
                 ec == std::errc::not_supported
                     ? " (weft's io_uring driver needs Linux 5.19 or newer)"
                     : "");
}

[[noreturn]] void no_io(unsigned worker, const char* what, const std::error_code& ec) {
  std::fprintf(stderr,
               "weft: fatal: worker %u has no I/O driver: %s: %s (raise the descriptor limit, "
               "or run with WEFT_IO=none if the program does no I/O)\n",
               worker, what, ec.message().c_str());
  std::abort();
}

std::unique_ptr<sched::driver> make_driver(io_choice c, unsigned worker, int node_os) {
  io::ignore_write_signals_once();
  if (c == io_choice::none) return sched::make_futex_driver();
  std::error_code why;
  if (c != io_choice::epoll) {
    if (auto d = io::make_uring_driver(worker, node_os, why)) return d;
    if (c == io_choice::uring)
      no_io(worker,
            why == std::errc::not_supported
                ? "WEFT_IO=uring but the kernel's io_uring is older than 5.19"
                : "WEFT_IO=uring but io_uring_setup failed",
            why);
    log_fallback_once(why);
  }
  if (auto d = io::make_epoll_driver(worker, why)) return d;
  // Not a silent fall-back to no I/O: the other workers may have it, and
  // a fiber's I/O would then work or fail depending on where it runs.
  no_io(worker, "epoll_create1/eventfd failed", why);
}

}  // namespace

sched::driver_factory runtime_driver_factory(std::vector<int> node_os) {
  io_choice c = choice_from_env();
  return [c, node_os = std::move(node_os)](unsigned worker) {
    return make_driver(c, worker, worker < node_os.size() ? node_os[worker] : -1);
  };
}

}  // namespace weft
