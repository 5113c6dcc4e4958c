// io/readiness.cc — see io/readiness.h.
#include "io/readiness.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>

#include "sched/park.h"

namespace weft::io {
namespace {

std::unexpected<std::error_code> error_of(int e) {
  return std::unexpected(std::error_code(e, std::system_category()));
}

// A plain thread: poll(2) until ready or the deadline. A deadline already
// past still looks once, as the fiber path does.
result<void> wait_plain(int fd, short events, clock::time_point deadline) {
  for (;;) {
    int ms = -1;
    bool last = false;
    if (deadline != clock::time_point::max()) {
      // Compared before subtracting: min() - now() (a deadline long past)
      // overflows, in practice to ~25 days of poll(2).
      const clock::time_point now = clock::now();
      const long long left =
          deadline <= now ? 0
                          : std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
      last = left <= 0;
      ms = static_cast<int>(std::clamp<long long>(left, 0, INT_MAX));
    }
    pollfd p{.fd = fd, .events = events, .revents = 0};
    int n = ::poll(&p, 1, ms);
    if (n < 0 && errno != EINTR) return error_of(errno);  // errno right after the call
    if (n > 0) return (p.revents & POLLNVAL) ? error_of(EBADF) : result<void>{};
    if (last) return std::unexpected(std::make_error_code(std::errc::timed_out));
  }
}

result<void> wait_for_event(int fd, short events, clock::time_point deadline, const char* what,
                            std::source_location where) {
  if (fd < 0) return error_of(EBADF);
  if (!sched::current_fiber()) return wait_plain(fd, events, deadline);
  op o{.kind = op_kind::poll, .fd = fd, .flags = events};
  if (auto r = perform(o, deadline, what, where); !r) return std::unexpected(r.error());
  return {};
}

}  // namespace

result<void> wait_readable(int fd, deadline_arg d, std::source_location where) {
  return wait_for_event(fd, POLLIN, d.when, "fd readable", where);
}

result<void> wait_writable(int fd, deadline_arg d, std::source_location where) {
  return wait_for_event(fd, POLLOUT, d.when, "fd writable", where);
}

}  // namespace weft::io
