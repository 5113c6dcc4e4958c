// io/msg_ring_refused_test.cc
//
// Workers wake each other with IORING_OP_MSG_RING (see *Waking* in
// io/uring_driver.cc). A kernel can refuse it: a restricted ring refuses
// it (-EACCES), and a remote post can fail (-ENOMEM, -EOWNERDEAD). (A
// kernel before 5.18, which has no such opcode, gets the epoll driver:
// io/old_uring_test.cc.) The refusal is the sender's own CQE;
// the sleeper gets nothing. This guards that the wake-up still arrives
// (through the sleeper's eventfd) and that the sleeper's wake_pending_
// does not stay set, which silenced every later wake() of that worker.
//
// How the refusal is made on a kernel that has the opcode: this binary
// defines io_uring_queue_init_params (liburing is a shared library, so the
// driver's call binds to this one), which sets every ring up disabled,
// registers restrictions that allow every opcode but MSG_RING, and enables
// it: a MSG_RING then completes with -EACCES.
#include <dlfcn.h>
#include <liburing.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "io/uring_interpose.h"
#include "runtime/channel.h"
#include "runtime/weft.h"

extern "C" int io_uring_queue_init_params(unsigned entries, struct io_uring* ring,
                                          struct io_uring_params* p) {
  p->flags |= IORING_SETUP_R_DISABLED;
  int r = weft::testing::real_io_uring_queue_init_params(entries, ring, p);
  if (r < 0) return r;
  std::vector<io_uring_restriction> res;
  for (unsigned op = 0; op < IORING_OP_LAST; ++op) {
    if (op == IORING_OP_MSG_RING) continue;
    io_uring_restriction x{};
    x.opcode = IORING_RESTRICTION_SQE_OP;
    x.sqe_op = static_cast<__u8>(op);
    res.push_back(x);
  }
  for (unsigned op = 0; op < IORING_REGISTER_LAST; ++op) {
    io_uring_restriction x{};
    x.opcode = IORING_RESTRICTION_REGISTER_OP;
    x.register_op = static_cast<__u8>(op);
    res.push_back(x);
  }
  io_uring_restriction flags{};
  flags.opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
  flags.sqe_flags = 0xff;
  res.push_back(flags);
  if (::syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_RESTRICTIONS, res.data(),
                res.size()) < 0 ||
      ::syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_ENABLE_RINGS, nullptr, 0) < 0) {
    r = -errno;
    io_uring_queue_exit(ring);
    return r;
  }
  return 0;
}

namespace weft {
namespace {

using namespace std::chrono_literals;

// A fiber pinned to worker 1 waits on a channel while worker 1 sleeps in
// its ring; the main fiber, on worker 0, hands it values (each send wakes
// worker 1 from worker 0's ring) and waits for each reply. Several rounds:
// after the first lost wake-up, wake_pending_ stayed set and no later wake
// of worker 1 was sent at all.
TEST(MsgRingRefused, AWorkerStillWakesAnother) {
  // Without the fix the run never ends (both workers asleep, each waiting
  // for the other's wake-up): say so rather than hang until the timeout.
  std::thread([] {
    std::this_thread::sleep_for(20s);
    std::fprintf(stderr, "the run did not end within 20 s: a wake-up was lost\n");
    std::_Exit(1);
  }).detach();
  int lost = -1;
  weft::run([&] {
    channel<int> to(0), back(0);
    auto f = spawn([&] {
      while (auto v = to.recv()) (void)back.send(*v);
    }, {.name = "sleeper", .pinned = true, .worker = 1});
    spawn([&] {
      for (int i = 0; i < 5 && lost < 0; ++i) {
        this_fiber::sleep_for(20ms);  // worker 1 goes to sleep in its ring
        if (!to.send(i, deadline(2s)) || !back.recv(deadline(2s))) lost = i;
      }
      to.close();
    }, {.name = "waker", .pinned = true, .worker = 0}).join();
    f.join();
  }, {.workers = 2});
  EXPECT_EQ(lost, -1) << "round " << lost << ": worker 1 was not woken within 2 s";
}

}  // namespace
}  // namespace weft
