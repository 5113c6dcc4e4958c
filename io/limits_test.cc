// io/limits_test.cc — the runtime where the system says no: the blocking
// pool when no thread can be started (RLIMIT_NPROC, a cgroup's pids.max),
// the epoll driver where epoll_pwait2 is missing (Linux < 5.11) or denied
// (a container's seccomp profile), and name lookup on a host with IPv4
// addresses only; and signals weft handles, where the process's signal
// dispositions matter. Each case runs in a forked child, so the limits, filters
// and namespaces it sets stay there; a hang ends the child by SIGALRM.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netdb.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "runtime/net.h"
#include "runtime/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;

constexpr int kSkip = 77;  // the child could not set up its limits

// Runs fn in a forked child that must exit 0 within 10 s.
template <typename F>
void in_child(F fn) {
  std::fflush(nullptr);
  pid_t p = ::fork();
  ASSERT_GE(p, 0);
  if (p == 0) {
    ::alarm(10);
    ::_exit(fn());
  }
  int st = 0;
  ASSERT_EQ(::waitpid(p, &st, 0), p);
  if (WIFSIGNALED(st)) {
    FAIL() << "child killed by signal " << WTERMSIG(st)
           << (WTERMSIG(st) == SIGALRM ? " (it hung)" : "");
  }
  if (WEXITSTATUS(st) == kSkip) GTEST_SKIP() << "the child could not set up its limits here";
  EXPECT_EQ(WEXITSTATUS(st), 0);
}

int tasks_now() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  return -1;
}

// Lowers the soft RLIMIT_NPROC so that no thread can start; returns the
// old limit. Root is exempt from the limit: the child drops to nobody.
bool forbid_new_threads(rlimit& old) {
  if (::getuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) return false;
  if (::getrlimit(RLIMIT_NPROC, &old) != 0) return false;
  rlimit low = old;
  low.rlim_cur = static_cast<rlim_t>(tasks_now());
  return ::setrlimit(RLIMIT_NPROC, &low) == 0;
}

// The pool has no thread and cannot start one: the call runs on the
// worker instead (with one line on stderr), rather than throwing or
// waiting forever; once threads can start again, the pool works.
void blocking_without_threads(const char* max_threads) {
  in_child([max_threads] {
    ::setenv("WEFT_BLOCKING_THREADS", max_threads, 1);
    int code = 0;
    weft::run([&] {
      rlimit old{};
      if (!forbid_new_threads(old)) {
        code = kSkip;
        return;
      }
      int v = 0;
      try {
        v = blocking([] { return 6; });
      } catch (...) {
        code = 1;  // an exception nobody documented
        return;
      }
      if (v != 6) code = 2;
      ::setrlimit(RLIMIT_NPROC, &old);
      if (blocking([] { return 7; }) != 7) code = 3;  // a pool thread now
    }, {.workers = 1});
    return code;
  });
}

TEST(Limits, BlockingRunsTheCallWhenNoPoolThreadCanStart) { blocking_without_threads("64"); }
TEST(Limits, BlockingRecoversWhenItsOnlyThreadCouldNotStart) { blocking_without_threads("1"); }

// A WEFT_BLOCKING_THREADS that is not a whole number in 1..4096 is
// ignored with a line that says so (strtoul alone read "8x" as 8, and "0"
// or "abc" fell back to the default silently).
TEST(Limits, ABadBlockingThreadsValueIsIgnoredAloud) {
  for (const char* bad : {"8x", "0", "abc", "5000"}) {
    EXPECT_EXIT(
        {
          ::setenv("WEFT_BLOCKING_THREADS", bad, 1);
          int v = 0;
          weft::run([&] { v = blocking([] { return 6; }); }, {.workers = 1});
          std::_Exit(v == 6 ? 0 : 1);
        },
        ::testing::ExitedWithCode(0),
        std::string("ignoring WEFT_BLOCKING_THREADS=") + bad + " \\(want 1..4096\\); using 64")
        << bad;
  }
}

// So is a WEFT_WRITE_BEHIND or WEFT_MULTISHOT_RECV other than 0 or 1
// ("off" meant off, and was read as the default, on). Without io_uring
// there is no such driver to read them: the fall-back line instead.
TEST(Limits, ABadIoSwitchIsIgnoredAloud) {
  for (const char* var : {"WEFT_WRITE_BEHIND", "WEFT_MULTISHOT_RECV"}) {
    EXPECT_EXIT(
        {
          ::setenv(var, "off", 1);
          weft::run([] {}, {.workers = 2});
          std::_Exit(0);
        },
        ::testing::ExitedWithCode(0),
        std::string("ignoring ") + var + "=off \\(want 0 or 1\\)|io_uring unavailable")
        << var;
  }
}

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// epoll_pwait2 answers ENOSYS, as on Linux < 5.11 or under an older
// container profile: idle workers must still sleep, not spin.
TEST(Limits, IdleEpollWorkersSleepWithoutEpollPwait2) {
  in_child([] {
    ::setenv("WEFT_IO", "epoll", 1);
    sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_epoll_pwait2, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{sizeof f / sizeof f[0], f};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
      return 4;
    double used = 1;
    weft::run([&] {
      auto ln = tcp_listener::bind("127.0.0.1:0").value();
      (void)ln.accept(deadline(10ms));  // epoll waits happened
      double t0 = cpu_seconds();
      (void)this_fiber::sleep_for(500ms);  // every worker idle
      used = cpu_seconds() - t0;
    }, {.workers = 2});
    std::fprintf(stderr, "CPU while idle for 0.5 s: %.3f s\n", used);
    return used < 0.1 ? 0 : 5;
  });
}

// weft keeps SIGPIPE from killing the program (a plain write() to a closed
// peer gets EPIPE), but child processes must start with the default:
// `yes | head` in a shell started by the program ends quietly by SIGPIPE.
bool child_dies_of_sigpipe() {
  int st = std::system("kill -PIPE $$");  // the shell system() starts signals itself
  return st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGPIPE;
}

TEST(Limits, ChildProcessesStartWithTheDefaultSigpipe) {
  in_child([] {
    // The test runner may have left SIGPIPE ignored or blocked: a known start.
    std::signal(SIGPIPE, SIG_DFL);
    sigset_t pipe_only;
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    sigprocmask(SIG_UNBLOCK, &pipe_only, nullptr);
    if (!child_dies_of_sigpipe()) return 6;  // the control: before any runtime
    int code = 0;
    weft::run([&] {
      if (!child_dies_of_sigpipe()) code = 7;
    });
    if (code == 0 && !child_dies_of_sigpipe()) code = 8;  // and after
    return code;
  });
}

// weft's SIGPIPE handler runs on the worker's signal stack, not on the
// fiber's: a plain write() to a pipe whose reader is gone, from a fiber on
// a small stack (kSmallStack, 2 KiB, no guard page), gets EPIPE. The
// kernel's signal frame alone (the saved registers, ~3 KiB with AVX-512)
// is larger than that stack; on it, the frame overwrote the memory below
// and the canary check stopped the process ("stack overflow in fiber").
TEST(Limits, APlainWriteToABrokenPipeFromASmallStackFiberIsEpipe) {
  in_child([] {
    std::signal(SIGPIPE, SIG_DFL);  // weft's handler goes in at run()
    sigset_t pipe_only;
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    sigprocmask(SIG_UNBLOCK, &pipe_only, nullptr);
    return weft::run([] {
      int p[2];
      if (::pipe(p) != 0) return 1;
      ::close(p[0]);
      auto h = weft::spawn([w = p[1]] {
        return ::write(w, "x", 1) < 0 ? errno : 0;
      }, {.stack_size = weft::kSmallStack});
      int e = h.join();
      ::close(p[1]);
      return e == EPIPE ? 0 : 2;
    }, {.workers = 1});
  });
}

// A write past the file size limit (RLIMIT_FSIZE: a ulimit -f, a
// systemd LimitFSIZE=) is the error EFBIG, as Go's os.File gives it (Go
// ignores SIGXFSZ), on both drivers: the part that fits is written, the
// rest is file_too_large. The kernel sends SIGXFSZ with the EFBIG to the
// thread that wrote; its default action ended the whole process under the
// epoll driver, whose blocking-pool thread does the pwrite.
TEST(Limits, AWritePastTheFileSizeLimitIsEfbigNotADeadProcess) {
  for (const char* io : {"uring", "epoll"}) {
    SCOPED_TRACE(io);
    in_child([io] {
      std::signal(SIGXFSZ, SIG_DFL);  // a known start
      ::setenv("WEFT_IO", io, 1);
      char path[] = "/tmp/weft-fsize-XXXXXX";
      int fd = ::mkstemp(path);
      if (fd < 0) return kSkip;
      ::close(fd);
      rlimit lim{4096, 4096};
      if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return kSkip;
      int code = 0;
      weft::run([&] {
        auto f = file::open(path, O_RDWR);
        if (!f) {
          code = 20;
          return;
        }
        std::string data(8192, 'x');
        std::size_t written = 0;
        auto w = f->write_at({data.data(), data.size()}, 0, &written);  // 4096 fit, then EFBIG
        if (w || w.error() != std::errc::file_too_large) code = 21;
        if (written != 4096) code = 24;  // the count comes with the error
        w = f->write_at({"y", 1}, 10000);  // past the limit outright
        if (w || w.error() != std::errc::file_too_large) code = 22;
        char b[8];
        auto n = f->read_at(b, 4095);  // what fitted was written
        if (!n || *n != 1 || b[0] != 'x') code = 23;
      }, {.workers = 1});
      ::unlink(path);
      return code;
    });
  }
}

// Makes this (single-threaded, forked) process a host with IPv4 addresses
// only, as a default Docker network is: its own user and network
// namespaces, loopback up, and one veth pair with an IPv4 address and IPv6
// off. false where namespaces or ip(8) are unavailable.
bool become_an_ipv4_only_host() {
  uid_t uid = ::getuid();
  gid_t gid = ::getgid();
  if (::unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0) return false;
  auto put = [](const char* path, const std::string& text) {
    std::ofstream f(path);
    f << text;
    f.close();
    return f.good();
  };
  if (!put("/proc/self/setgroups", "deny") ||
      !put("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1") ||
      !put("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1"))
    return false;
  const char* ip = nullptr;
  for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"})
    if (::access(p, X_OK) == 0) ip = p;
  if (!ip) return false;
  std::string cmd = std::string(ip) + " link set lo up && " + ip +
                    " link add weft4 type veth peer name weft4p && " + ip +
                    " addr add 10.77.0.1/24 dev weft4 && " + ip + " link set weft4 up";
  if (std::system((cmd + " >/dev/null 2>&1").c_str()) != 0) return false;
  for (const char* dev : {"weft4", "weft4p"})  // drops their link-local IPv6 addresses
    if (!put(("/proc/sys/net/ipv6/conf/" + std::string(dev) + "/disable_ipv6").c_str(), "1"))
      return false;
  return true;
}

// The host has IPv4 addresses only (and the IPv6 loopback): resolve()
// still returns a numeric IPv6 address as itself. It asked getaddrinfo
// with AI_ADDRCONFIG for every host, and glibc, which counts no loopback
// address, then failed "::1" with "Address family for hostname not
// supported". Skipped where the child cannot make such a host, or where
// getaddrinfo does not drop "::1" there (so the case would prove nothing).
TEST(Limits, ResolveReturnsANumericIpv6AddressOnAnIpv4OnlyHost) {
  in_child([] {
    if (!become_an_ipv4_only_host()) return kSkip;
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_ADDRCONFIG;
    addrinfo* res = nullptr;
    int rc = ::getaddrinfo("::1", "80", &hints, &res);
    if (rc == 0) {
      ::freeaddrinfo(res);
      return kSkip;
    }
    int code = 0;
    weft::run([&] {
      auto six = resolve("::1", 80);
      if (!six || six->size() != 1 || six->front().to_string() != "[::1]:80") code = 10;
      auto four = resolve("127.0.0.1", 80);  // and IPv4 as before
      if (!four || four->size() != 1 || four->front().to_string() != "127.0.0.1:80") code = 11;
      auto name = resolve("localhost", 80);  // a name is still looked up (/etc/hosts)
      if (!name || name->empty()) code = 12;
    }, {.workers = 1});
    return code;
  });
}

}  // namespace
}  // namespace weft
