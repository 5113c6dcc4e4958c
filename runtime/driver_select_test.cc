// runtime/driver_select_test.cc — which I/O driver a run gets when the
// kernel refuses io_uring (a container's seccomp profile, the
// kernel.io_uring_disabled sysctl): the epoll fallback, said once on
// stderr, with sockets that work; and a clear fatal message when
// WEFT_IO=uring insists. The refusal is a seccomp filter installed in the
// death test's child process (unprivileged, under no_new_privs).
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "runtime/net.h"
#include "runtime/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;

#if defined(__x86_64__)
constexpr std::uint32_t kAuditArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr std::uint32_t kAuditArch = AUDIT_ARCH_AARCH64;
#else
#error "driver_select_test: add this architecture's AUDIT_ARCH"
#endif

// From here on, io_uring_setup fails with EPERM in this process.
void refuse_io_uring() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kAuditArch, 0, 3),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
      ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
    std::perror("seccomp");
    std::_Exit(3);
  }
}

// An echo round trip over loopback; the driver's name on stdout.
int echo_once() {
  return weft::run([] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 10;
    auto server = spawn([&] {
      auto c = ln->accept();
      if (!c) return;
      char buf[16];
      if (auto n = c->read(buf, deadline(5s)); n && *n > 0) (void)c->write_all({buf, *n});
    });
    auto c = tcp_stream::connect(ln->local_address().value().to_string(), deadline(5s));
    if (!c || !c->write_all({"ping", 4})) return 11;
    char back[4];
    if (!c->read_exact(back, deadline(5s))) return 12;
    server.join();
    std::fprintf(stdout, "driver=%s\n", get_io_stats().driver.c_str());
    std::fflush(stdout);
    return std::string(back, 4) == "ping" && get_io_stats().driver == "epoll" ? 0 : 13;
  });
}

// The child counts the fallback's log line in its own stderr (other lines,
// such as a stack-guard fallback on kernels before 6.13, may come too):
// exit 0 only for exactly one, and the echo over epoll working.
TEST(DriverSelectDeathTest, RefusedIoUringFallsBackToEpollWithOneLogLine) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ::setenv("WEFT_IO", "auto", 1);
        refuse_io_uring();
        std::FILE* err = std::tmpfile();
        if (!err) std::_Exit(4);
        const int saved = ::dup(2);
        ::dup2(::fileno(err), 2);
        int rc = echo_once();
        ::dup2(saved, 2);
        std::string text;
        std::rewind(err);
        for (int c; (c = std::fgetc(err)) != EOF;) text.push_back(char(c));
        std::fputs(text.c_str(), stderr);  // for the failure message
        const std::string line = "weft: io_uring unavailable, using epoll: Operation not permitted\n";
        std::size_t first = text.find(line);
        bool once = first != std::string::npos && text.find(line, first + 1) == std::string::npos;
        std::exit(rc != 0 ? rc : once ? 0 : 5);
      },
      ::testing::ExitedWithCode(0), "io_uring unavailable, using epoll: Operation not permitted");
}

TEST(DriverSelectDeathTest, WeftIoUringFailsClearlyWhenTheKernelRefuses) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        ::setenv("WEFT_IO", "uring", 1);
        refuse_io_uring();
        std::exit(echo_once());
      },
      "WEFT_IO=uring but io_uring_setup failed");
}

TEST(DriverSelectDeathTest, AnUnknownWeftIoIsSaidAndIgnored) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ::setenv("WEFT_IO", "iouring", 1);
        refuse_io_uring();  // so the automatic choice is epoll
        std::exit(echo_once());
      },
      ::testing::ExitedWithCode(0),
      "ignoring WEFT_IO=iouring \\(want uring, epoll, auto or none\\)");
}

}  // namespace
}  // namespace weft
