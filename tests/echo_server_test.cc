// tests/echo_server_test.cc — examples/echo_server end to end: the real
// binary on 127.0.0.1 (started with --port 0; the port is the one its
// "listening on" line names), driven by plain blocking sockets whose reads
// are bounded by SO_RCVTIMEO, so a broken server fails the test instead of
// hanging it. Runs on both drivers (WEFT_IO reaches the child).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

namespace {

using namespace std::chrono_literals;

// Starts examples/echo_server with `args`, its stderr on a pipe whose read
// end goes to *err; fd_limit: the child's RLIMIT_NOFILE (0: inherited).
// The child's pid, or -1.
pid_t start_echo_server(std::vector<std::string> args, int* err, rlim_t fd_limit = 0) {
  std::string bin = std::string(std::getenv("TEST_SRCDIR")) + "/weft/examples/echo_server";
  args.insert(args.begin(), bin);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {  // only async-signal-safe calls until exec
    if (fd_limit) {
      rlimit r{fd_limit, fd_limit};
      ::setrlimit(RLIMIT_NOFILE, &r);
    }
    ::dup2(p[1], 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(p[1]);
  *err = p[0];
  return pid;
}

// The server as a child process whose stderr the test reads; killed at the
// end of the test.
class server {
 public:
  // fd_limit: the child's RLIMIT_NOFILE (0: inherited).
  explicit server(std::vector<std::string> args, rlim_t fd_limit = 0) {
    pid_ = start_echo_server(std::move(args), &err_, fd_limit);
  }
  ~server() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (err_ >= 0) ::close(err_);
  }
  // Reads the child's stderr until it contains `want` or `limit` passes;
  // everything read so far is kept in stderr_text().
  bool wait_for_stderr(const std::string& want, std::chrono::milliseconds limit = 10s) {
    auto end = std::chrono::steady_clock::now() + limit;
    while (stderr_.find(want) == std::string::npos)
      if (!read_some(end)) return false;
    return true;
  }
  const std::string& stderr_text() const { return stderr_; }
  // The port of the "listening on 127.0.0.1:N" line (-1 if none came).
  int port() {
    const std::string tag = "listening on 127.0.0.1:";
    auto end = std::chrono::steady_clock::now() + 10s;
    for (;;) {
      auto at = stderr_.find(tag);
      if (at != std::string::npos && stderr_.find('\n', at) != std::string::npos)
        return std::atoi(stderr_.c_str() + at + tag.size());
      if (!read_some(end)) return -1;
    }
  }
  // A connected client socket to `port`, reads bounded by 5 s; rcvbuf:
  // its SO_RCVBUF (0: the default).
  static int connect(int port, int rcvbuf = 0) {
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (rcvbuf) ::setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(std::uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(s);
      return -1;
    }
    timeval tv{5, 0};
    ::setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return s;
  }

 private:
  // Appends what the child wrote to stderr; false at `end` or its exit.
  bool read_some(std::chrono::steady_clock::time_point end) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left <= 0ms) return false;
    pollfd pfd{.fd = err_, .events = POLLIN, .revents = 0};
    if (::poll(&pfd, 1, int(left.count()) + 1) <= 0) return true;  // the caller looks again
    char buf[512];
    ssize_t n = ::read(err_, buf, sizeof buf);
    if (n <= 0) return false;
    stderr_.append(buf, std::size_t(n));
    return true;
  }

  pid_t pid_ = -1;
  int err_ = -1;
  std::string stderr_;
};

bool echoes(int s, const std::string& msg) {
  if (::send(s, msg.data(), msg.size(), MSG_NOSIGNAL) != ssize_t(msg.size())) return false;
  std::string got;
  char buf[512];
  while (got.size() < msg.size()) {
    ssize_t n = ::recv(s, buf, sizeof buf, 0);
    if (n <= 0) return false;
    got.append(buf, std::size_t(n));
  }
  return got == msg;
}

// Runs the server with `args` to its exit (it must exit at once): its exit
// status (-1: killed after 10 s) and what it wrote on stderr.
std::pair<int, std::string> run_to_exit(std::vector<std::string> args) {
  int err_fd = -1;
  pid_t pid = start_echo_server(std::move(args), &err_fd);
  if (pid < 0) return {-1, "could not start the server"};
  std::string err;
  char buf[512];
  pollfd pfd{.fd = err_fd, .events = POLLIN, .revents = 0};
  while (::poll(&pfd, 1, 10'000) > 0) {
    ssize_t n = ::read(err_fd, buf, sizeof buf);
    if (n <= 0) break;
    err.append(buf, std::size_t(n));
  }
  ::close(err_fd);
  int status = 0;
  for (int i = 0; i < 1000 && ::waitpid(pid, &status, WNOHANG) == 0; ++i)
    std::this_thread::sleep_for(10ms);
  if (::waitpid(pid, &status, WNOHANG) == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return {-1, err};
  }
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, err};
}

// Anything but a plain decimal number in range is refused with the usage
// line and exit status 2 (before, strtoul took " 5", "+5", and "-1" as a
// huge number that then failed the range check only by luck).
TEST(EchoServer, BadArgumentsAreRefusedWithTheUsage) {
  for (std::vector<std::string> bad : std::vector<std::vector<std::string>>{
           {"--port", " 5"}, {"--port", "+5"}, {"--port", "-1"}, {"--port", "70000"},
           {"--port", "abc"}, {"--port", ""}, {"--port"}, {"--workers", "1x"},
           {"--idle", "0"}, {"--status-port", "65536"}, {"--bogus"}}) {
    auto [status, err] = run_to_exit(bad);
    EXPECT_EQ(status, 2) << bad[0] << " " << (bad.size() > 1 ? bad[1] : "") << ": " << err;
    EXPECT_NE(err.find("usage: "), std::string::npos) << err;
    // And a line that names what was wrong.
    const std::string why = bad[0] == "--bogus"  ? "unknown argument '--bogus'"
                            : bad.size() == 1    ? bad[0] + " wants a value"
                                                 : "bad value '" + bad[1] + "' for " + bad[0];
    EXPECT_NE(err.find(why), std::string::npos) << err;
  }
}

// --port 0 binds a free port, and the "listening on" line says which one.
TEST(EchoServer, PortZeroAnnouncesThePortItGot) {
  server srv({"--port", "0", "--workers", "2"});
  int port = srv.port();
  ASSERT_GT(port, 0) << srv.stderr_text();
  int s = server::connect(port);
  ASSERT_GE(s, 0) << "nothing listens on the announced port " << port;
  EXPECT_TRUE(echoes(s, "hello\n"));
  ::close(s);
}

// Sends `req` on a new connection to `port`: everything the server sends
// back until it closes (or 5 s without a byte).
std::string http_exchange(int port, const std::string& req) {
  int s = server::connect(port);
  if (s < 0) return "connect failed";
  if (::send(s, req.data(), req.size(), MSG_NOSIGNAL) != ssize_t(req.size())) {
    ::close(s);
    return "send failed";
  }
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = ::recv(s, buf, sizeof buf, 0)) > 0;) got.append(buf, std::size_t(n));
  ::close(s);
  return got;
}

// An HTTP GET: everything until the server closes.
std::string http_get(int port, const std::string& path) {
  return http_exchange(port, "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
}

// The port of the "statusz on http://127.0.0.1:N/statusz" line (-1 if none came).
int status_port_of(server& srv) {
  const std::string tag = "statusz on http://127.0.0.1:";
  if (!srv.wait_for_stderr("/statusz\n")) return -1;
  const auto at = srv.stderr_text().find(tag);
  return at == std::string::npos ? -1 : std::atoi(srv.stderr_text().c_str() + at + tag.size());
}

// --status-port serves the runtime's counters at /statusz (DESIGN.md,
// Observability): live fibers (the connection open meanwhile among them),
// the I/O driver and its counters, per-worker figures; any other path 404.
TEST(EchoServer, StatuszServesTheRuntimesCounters) {
  server srv({"--port", "0", "--workers", "2", "--status-port", "0"});
  const int status_port = status_port_of(srv);
  ASSERT_GT(status_port, 0) << srv.stderr_text();
  int port = srv.port();
  ASSERT_GT(port, 0) << srv.stderr_text();
  int conn = server::connect(port);
  ASSERT_GE(conn, 0);
  ASSERT_TRUE(echoes(conn, "ping\n"));
  const std::string page = http_get(status_port, "/statusz");
  EXPECT_TRUE(page.starts_with("HTTP/1.0 200 OK\r\n")) << page;
  EXPECT_NE(page.find("Content-Type: text/plain"), std::string::npos) << page;
  const char* driver = std::getenv("WEFT_IO");
  const std::string want_driver =
      driver && std::string(driver) == "epoll" ? "io_driver epoll\n" : "io_driver io_uring\n";
  EXPECT_NE(page.find(want_driver), std::string::npos) << page;
  EXPECT_NE(page.find("worker1_fibers_run "), std::string::npos) << page;
  // main, the acceptors, the echo connection and this request's fiber
  const auto live = page.find("\nlive_fibers ");
  ASSERT_NE(live, std::string::npos) << page;
  EXPECT_GE(std::atoi(page.c_str() + live + 13), 4) << page;
  const auto ops = page.find("\nio_ops ");
  ASSERT_NE(ops, std::string::npos) << page;
  EXPECT_GE(std::atoi(page.c_str() + ops + 8), 3) << page;  // accept, read, write at least
  EXPECT_TRUE(http_get(status_port, "/").starts_with("HTTP/1.0 404 Not Found\r\n"));
  EXPECT_TRUE(echoes(conn, "still echoing\n"));
  ::close(conn);
}

// A request whose lines end in a bare "\n", as `printf 'GET /statusz
// HTTP/1.0\n\n' | nc 127.0.0.1 N` or a hand-written health check sends it,
// gets the page: HTTP lets a server take a lone LF as a line's end (RFC
// 9112, 2.2), and Go's net/http does. Before, the server waited for
// "\r\n\r\n" until its 5 s deadline and closed the connection without a
// word.
TEST(EchoServer, StatuszTakesARequestWhoseLinesEndInABareLineFeed) {
  server srv({"--port", "0", "--workers", "1", "--status-port", "0"});
  const int status_port = status_port_of(srv);
  ASSERT_GT(status_port, 0) << srv.stderr_text();
  for (const char* req : {"GET /statusz HTTP/1.0\n\n", "GET /statusz HTTP/1.1\nHost: x\n\n",
                          "GET /statusz HTTP/1.0\r\nHost: x\n\r\n"}) {
    const std::string page = http_exchange(status_port, req);
    EXPECT_TRUE(page.starts_with("HTTP/1.0 200 OK\r\n")) << req << " got: " << page;
    EXPECT_NE(page.find("\nlive_fibers "), std::string::npos) << req << " got: " << page;
  }
  EXPECT_TRUE(http_exchange(status_port, "GET / HTTP/1.0\n\n")
                  .starts_with("HTTP/1.0 404 Not Found\r\n"));
}

// A /statusz request whose head is `head_size` bytes: the reply, and how
// the connection ended (0: the server's FIN; else the recv errno).
std::pair<std::string, int> statusz_with_head_of(int status_port, std::size_t head_size) {
  const std::string start = "GET /statusz HTTP/1.0\r\nX-Pad: ", end = "\r\n\r\n";
  const std::string req = start + std::string(head_size - start.size() - end.size(), 'a') + end;
  int s = server::connect(status_port);
  if (s < 0) return {"connect failed", -1};
  if (::send(s, req.data(), req.size(), MSG_NOSIGNAL) != ssize_t(req.size())) {
    ::close(s);
    return {"send failed", -1};
  }
  std::string got;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(s, buf, sizeof buf, 0)) > 0) got.append(buf, std::size_t(n));
  const int how = n == 0 ? 0 : errno;
  ::close(s);
  return {got, how};
}

// The server reads at most 8 KiB of a request head. A longer one is
// refused with 431 and the connection ends with a FIN. Before, the server
// answered 200 from the first 8 KiB and closed with the rest unread, so
// the kernel reset the connection (the client saw ECONNRESET).
TEST(EchoServer, StatuszRefusesARequestHeadOver8KibWithoutAReset) {
  server srv({"--port", "0", "--workers", "1", "--status-port", "0"});
  const int status_port = status_port_of(srv);
  ASSERT_GT(status_port, 0) << srv.stderr_text();
  auto [page, how] = statusz_with_head_of(status_port, 8192);  // the largest taken
  EXPECT_TRUE(page.starts_with("HTTP/1.0 200 OK\r\n")) << page;
  EXPECT_EQ(how, 0) << std::strerror(how);
  for (std::size_t size : {8193, 9000, 64 * 1024}) {
    std::tie(page, how) = statusz_with_head_of(status_port, size);
    EXPECT_TRUE(page.starts_with("HTTP/1.0 431 Request Header Fields Too Large\r\n"))
        << size << " got: " << page;
    EXPECT_EQ(how, 0) << size << ": " << std::strerror(how);
  }
}

// A peer that sends but never reads stalls its echo in write_all once the
// buffers between them are full; after --idle seconds of that the server
// drops it, as it drops a silent one, instead of keeping its fiber and
// descriptor forever. Seen from the peer: its sends fail (the server
// closed with unread data, which resets the connection).
TEST(EchoServer, APeerThatNeverReadsIsDroppedAfterTheIdleTimeout) {
  server srv({"--port", "0", "--workers", "1", "--idle", "1"});
  int port = srv.port();
  ASSERT_GT(port, 0) << srv.stderr_text();
  int s = server::connect(port, 4096);
  ASSERT_GE(s, 0);
  std::string chunk(64 * 1024, 'x');
  // Until the server has stopped taking data (200 ms without room).
  auto last_progress = std::chrono::steady_clock::now();
  std::size_t sent = 0;
  while (std::chrono::steady_clock::now() - last_progress < 200ms) {
    ssize_t n = ::send(s, chunk.data(), chunk.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      sent += std::size_t(n);
      last_progress = std::chrono::steady_clock::now();
    } else {
      ASSERT_EQ(errno, EAGAIN) << "the connection ended while it was still reading";
      std::this_thread::sleep_for(5ms);
    }
    ASSERT_LT(sent, std::size_t(1) << 30) << "the server never stopped taking data";
  }
  bool dropped = false;
  for (auto end = std::chrono::steady_clock::now() + 10s;
       !dropped && std::chrono::steady_clock::now() < end;) {
    std::this_thread::sleep_for(50ms);
    ssize_t n = ::send(s, "y", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    dropped = n < 0 && errno != EAGAIN;
  }
  EXPECT_TRUE(dropped) << "still connected 10 s after the echo stalled (--idle 1)";
  ::close(s);
}

// Out of descriptors (RLIMIT_NOFILE 16: about six connections), the
// server says so on stderr, with what to do, and keeps serving: once the
// clients go, a new connection is echoed.
TEST(EchoServer, RunningOutOfDescriptorsIsReportedAndSurvived) {
  server srv({"--port", "0", "--workers", "2"}, /*fd_limit=*/16);
  int port = srv.port();
  ASSERT_GT(port, 0) << srv.stderr_text();
  std::vector<int> clients;
  for (int i = 0; i < 24; ++i) {
    int s = server::connect(port);  // the kernel completes it; accept may not
    ASSERT_GE(s, 0);
    clients.push_back(s);
  }
  EXPECT_TRUE(srv.wait_for_stderr("Too many open files", 5s)) << srv.stderr_text();
  EXPECT_NE(srv.stderr_text().find("ulimit -n"), std::string::npos) << srv.stderr_text();
  for (int s : clients) ::close(s);
  int s = server::connect(port);
  ASSERT_GE(s, 0);
  EXPECT_TRUE(echoes(s, "after the flood\n"));
  ::close(s);
}

}  // namespace
