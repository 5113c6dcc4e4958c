// io/old_uring_test.cc
//
// weft's io_uring driver needs Linux 5.19 (IORING_SETUP_COOP_TASKRUN, the
// multishot accept, IORING_RECVSEND_POLL_FIRST; see kFlagChoices in
// io/uring_driver.cc). On an older kernel io_uring_setup refuses those
// flags, and the worker must take the epoll driver, with its log line,
// rather than set a ring up with fewer flags and then fail every accept.
//
// How an old kernel is made on a new one: this binary defines
// io_uring_queue_init_params (liburing is a shared library, so the
// driver's call binds to this one), which refuses with -EINVAL, as a 5.15
// kernel does, any flag newer than 5.18's.
#include <dlfcn.h>
#include <liburing.h>

#include <cerrno>
#include <string>

#include <gtest/gtest.h>

#include "io/uring_interpose.h"
#include "runtime/net.h"
#include "runtime/weft.h"

extern "C" int io_uring_queue_init_params(unsigned entries, struct io_uring* ring,
                                          struct io_uring_params* p) {
  constexpr unsigned kNewer = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG |
                              IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER |
                              IORING_SETUP_DEFER_TASKRUN;
  if (p->flags & kNewer) return -EINVAL;
  return weft::testing::real_io_uring_queue_init_params(entries, ring, p);
}

namespace weft {
namespace {

using namespace std::chrono_literals;

TEST(OldUring, AKernelBefore519GetsTheEpollDriverAndItsSocketsWork) {
  ::unsetenv("WEFT_IO");  // auto: io_uring if it will do, else epoll
  weft::run([] {
    EXPECT_EQ(io::stats().driver, "epoll");
    auto ln = tcp_listener::bind("127.0.0.1:0");
    ASSERT_TRUE(ln) << ln.error().message();
    auto server = spawn([&] {
      auto c = ln->accept(deadline(5s));
      if (!c) return false;
      char buf[8];
      auto n = c->read(buf, deadline(5s));
      return n && *n > 0 && c->write_all({buf, *n}, deadline(5s)).has_value();
    });
    auto c = tcp_stream::connect(ln->local_address().value(), deadline(5s));
    ASSERT_TRUE(c) << c.error().message();
    ASSERT_TRUE(c->write_all(std::string_view("ping"), deadline(5s)));
    char back[4];
    ASSERT_TRUE(c->read_exact(back, deadline(5s)));
    EXPECT_EQ(std::string(back, 4), "ping");
    EXPECT_TRUE(server.join());
  }, {.workers = 2});
}

}  // namespace
}  // namespace weft
