// io/epoll_ctl_refused_test.cc — the epoll driver when the kernel refuses
// to watch a descriptor (epoll_ctl: ENOSPC once fs.epoll.max_user_watches
// is reached, ENOMEM, ELOOP): the wait fails with that error at once, as
// Go's netpoll and Tokio's registration report it, instead of the fiber
// trying its call again and again until its deadline (forever without
// one) at a full core. This binary defines epoll_ctl (it binds before
// libc's): an EPOLL_CTL_ADD of the descriptor in `refuse_fd` fails with
// `refuse_errno`; every other call goes to libc's.
#include <dlfcn.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>

#include "gtest/gtest.h"
#include "io/socket_test_util.h"
#include "runtime/net.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace {

using epoll_ctl_fn = int (*)(int, int, int, epoll_event*);

std::atomic<int> refuse_fd{-1};
std::atomic<int> refuse_errno{ENOSPC};
std::atomic<int> refused{0};  // ADDs refused so far

}  // namespace

extern "C" int epoll_ctl(int epfd, int op, int fd, epoll_event* ev) {
  static const auto real = reinterpret_cast<epoll_ctl_fn>(::dlsym(RTLD_NEXT, "epoll_ctl"));
  if (op == EPOLL_CTL_ADD && fd >= 0 && fd == refuse_fd.load()) {
    refused.fetch_add(1);
    errno = refuse_errno.load();
    return -1;
  }
  return real(epfd, op, fd, ev);
}

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class EpollCtlRefused : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(EpollCtlRefused);

// Unwatches whatever the test refused, at scope exit.
struct refusing {
  refusing(int fd, int err) {
    refused.store(0);
    refuse_errno.store(err);
    refuse_fd.store(fd);
  }
  ~refusing() { refuse_fd.store(-1); }
};

TEST_P(EpollCtlRefused, AWaitForADescriptorTheKernelWillNotWatchFailsWithItsError) {
  Run([&] {
    ASSERT_EQ(io::stats().driver, "epoll");
    for (int err : {ENOSPC, ENOMEM, ELOOP}) {
      testing::pipe_fds p;
      refusing r(p.r, err);
      const auto t0 = clock::now();
      auto w = wait_readable(p.r, deadline(2s));
      ASSERT_FALSE(w);
      EXPECT_EQ(w.error(), std::error_code(err, std::system_category()))
          << w.error().message();
      EXPECT_LT(clock::now() - t0, 1s);  // not at its deadline
      EXPECT_EQ(refused.load(), 1);      // asked once, not again and again
    }
  });
}

TEST_P(EpollCtlRefused, AReadOnAStreamTheKernelWillNotWatchFailsWithItsError) {
  Run([&] {
    // The accepted end: no wait has registered it with any worker's epoll.
    auto [c, s] = testing::connected_pair();
    refusing r(s.native_handle(), ENOSPC);
    char buf[8];
    const auto t0 = clock::now();
    auto n = s.read(buf, deadline(2s));
    ASSERT_FALSE(n);
    EXPECT_EQ(n.error(), std::errc::no_space_on_device) << n.error().message();
    EXPECT_LT(clock::now() - t0, 1s);
    // The stream itself is fine: once the kernel watches it, reads work.
    refuse_fd.store(-1);
    auto echo = spawn([&c] { return c.write_all({"x", 1}); });
    auto m = s.read(buf, deadline(5s));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(*m, 1u);
    EXPECT_TRUE(echo.join());
  });
}

}  // namespace
}  // namespace weft
