// io/sq_full_test.cc
//
// A kernel that takes no submission for a while: io_uring_enter fails
// with -EBUSY (kernels that refuse submits while overflowed completions
// wait for room in the CQ ring) or -EAGAIN (short of memory for requests),
// and the SQEs stay queued. Once the SQ ring is full, the next operation
// needs an SQE that is not there. The driver must wait for the kernel (make
// CQ room, back off) and go on — as Go and Tokio do — not abort the process
// (see *A full SQ ring* in io/uring_driver.cc).
//
// How the refusal is made: this binary defines io_uring_submit and
// io_uring_submit_and_get_events (liburing is a shared library, so the
// driver's calls bind to these), which, once a test arms them, fail
// without submitting anything for kRefuseFor after their first failure.
#include <dlfcn.h>
#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/net.h"
#include "runtime/weft.h"

namespace {

using steady = std::chrono::steady_clock;
constexpr auto kRefuseFor = std::chrono::milliseconds(300);

std::atomic<int> refuse_with{0};          // the error to fail with; 0: pass through
std::atomic<std::int64_t> refuse_until{0};  // steady ns; 0: not started
std::atomic<int> refused{0};              // how many calls were failed

// Whether this call fails (returns the error) or goes to liburing.
int refusal() {
  const int err = refuse_with.load(std::memory_order_relaxed);
  if (err == 0) return 0;
  const std::int64_t now = steady::now().time_since_epoch().count();
  std::int64_t until = refuse_until.load(std::memory_order_relaxed);
  if (until == 0) {
    std::int64_t want = now + std::chrono::nanoseconds(kRefuseFor).count();
    refuse_until.compare_exchange_strong(until, want, std::memory_order_relaxed);
    until = refuse_until.load(std::memory_order_relaxed);
  }
  if (now >= until) return 0;
  refused.fetch_add(1, std::memory_order_relaxed);
  return err;
}

template <typename F>
F real(const char* name) {
  return reinterpret_cast<F>(::dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" int io_uring_submit(struct io_uring* ring) {
  if (int e = refusal()) return e;
  static const auto fn = real<int (*)(struct io_uring*)>("io_uring_submit");
  return fn(ring);
}

extern "C" int io_uring_submit_and_get_events(struct io_uring* ring) {
  if (int e = refusal()) return e;
  static const auto fn = real<int (*)(struct io_uring*)>("io_uring_submit_and_get_events");
  return fn(ring);
}

// One wait answers -EBADR: the kernel dropped completions (no memory for
// its CQ overflow list).
std::atomic<int> drop_next_wait{0};

extern "C" int io_uring_submit_and_wait_timeout(struct io_uring* ring, struct io_uring_cqe** cqe,
                                                unsigned wait_nr, struct __kernel_timespec* ts,
                                                sigset_t* sigmask) {
  static const auto fn =
      real<int (*)(struct io_uring*, struct io_uring_cqe**, unsigned, struct __kernel_timespec*,
                   sigset_t*)>("io_uring_submit_and_wait_timeout");
  int r = fn(ring, cqe, wait_nr, ts, sigmask);
  if (drop_next_wait.exchange(0, std::memory_order_relaxed)) return -EBADR;
  return r;
}

// Registering the provided-buffer ring fails with this (0: passes through).
std::atomic<int> refuse_buf_ring{0};

extern "C" int io_uring_register_buf_ring(struct io_uring* ring, struct io_uring_buf_reg* reg,
                                          unsigned int flags) {
  if (int e = refuse_buf_ring.load(std::memory_order_relaxed)) return e;
  static const auto fn = real<int (*)(struct io_uring*, struct io_uring_buf_reg*, unsigned int)>(
      "io_uring_register_buf_ring");
  return fn(ring, reg, flags);
}

namespace weft {
namespace {

using namespace std::chrono_literals;

// 600 reads of a file, each its own fiber on one worker, started while
// the kernel takes nothing: more SQEs than the SQ ring holds (256).
void reads_while_refused(int err) {
  char path[] = "/tmp/weft_sq_full_XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string data = "0123456789abcdef";
  ASSERT_EQ(::write(fd, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  ::close(fd);
  int good = 0;
  weft::run([&] {
    auto f = file::open(path, O_RDONLY);
    ASSERT_TRUE(f) << f.error().message();
    refuse_with.store(err, std::memory_order_relaxed);
    std::vector<join_handle<bool>> readers;
    for (int i = 0; i < 600; ++i)
      readers.push_back(spawn([&f, &data, i] {
        char buf[1];
        auto n = f->read_at({buf, 1}, i % data.size());
        return n && *n == 1 && buf[0] == data[i % data.size()];
      }));
    for (auto& r : readers) good += r.join();
    refuse_with.store(0, std::memory_order_relaxed);
    (void)f->close();
  }, {.workers = 1});
  ::unlink(path);
  EXPECT_GT(refused.load(), 0) << "the kernel's refusal was never made";
  EXPECT_EQ(good, 600);
}

TEST(SqFull, SubmitsRefusedWithEbusyWhileTheSqRingFillsAreRetried) {
  reads_while_refused(-EBUSY);
}

TEST(SqFull, SubmitsRefusedWithEagainWhileTheSqRingFillsAreRetried) {
  refuse_until.store(0);
  reads_while_refused(-EAGAIN);
}

// A completion the kernel dropped never wakes its fiber: that cannot be
// made good, but it must not pass in silence (a hang with no word).
TEST(SqFull, CompletionsTheKernelDroppedAreReported) {
  ::testing::internal::CaptureStderr();
  weft::run([] {
    drop_next_wait.store(1, std::memory_order_relaxed);
    this_fiber::sleep_for(50ms);  // the worker waits in its ring
    this_fiber::sleep_for(50ms);
  }, {.workers = 1});
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(drop_next_wait.load(), 0) << "no wait was made";
  EXPECT_NE(err.find("dropped"), std::string::npos) << "stderr: " << err;
}

// A ring set up without its provided-buffer ring (no memory for it) has
// pooled reads use a heap buffer each: they still work, and stderr says
// why once, as every degradation of the driver does.
TEST(SqFull, AProvidedBufferRingTheKernelRefusesIsReportedAndReadsStillWork) {
  refuse_buf_ring.store(-ENOMEM, std::memory_order_relaxed);
  ::testing::internal::CaptureStderr();
  std::string backing, got;
  weft::run([&] {
    backing = get_io_stats().buffer_backing;
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    auto c = tcp_stream::connect(ln.local_address().value().to_string()).value();
    auto s = ln.accept().value();
    ASSERT_TRUE(c.write_all(std::string_view("pooled")));
    auto b = s.read_pooled(deadline(5s));
    ASSERT_TRUE(b) << b.error().message();
    got.assign(b->data().data(), b->size());
  }, {.workers = 1});
  refuse_buf_ring.store(0, std::memory_order_relaxed);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(backing, "heap");
  EXPECT_EQ(got, "pooled");
  EXPECT_NE(err.find("cannot set up the provided-buffer ring (Cannot allocate memory)"),
            std::string::npos)
      << "stderr: " << err;
}

}  // namespace
}  // namespace weft
