// bench/thread_echo_server.cc
//
// thread_echo_server is the no-runtime baseline of the TCP echo comparison
// (bench/compare_echo.sh): one OS thread per connection, blocking sockets. It
// is what weft's echo server must beat in CPU per request at many
// connections and in memory per idle connection; a weft regression shows up
// as the ratio to this server closing.
//
// Usage: thread_echo_server --port N [--idle S]   (listens on 127.0.0.1 only)
//
// A peer that sends nothing, or reads nothing, for --idle seconds (30) is
// dropped, as examples/echo_server and the Go peer do (SO_RCVTIMEO and
// SO_SNDTIMEO: a recv() or send() that waits that long fails with EAGAIN),
// so every server has an idle timeout.
//
// Invariants:
//   - Each accepted socket is owned by exactly one detached thread, which
//     closes it when the peer closes or errs.
//   - Threads get a 64 KiB stack (plus the guard page), so 10,000 idle
//     connections cost ~640 MiB of address space but only the touched stack
//     pages in RSS.
//
// Who calls what: main() accepts; serve() runs on the connection's thread.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench/bench_net.h"

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kBufferBytes = 4096;  // same as the Go peer's per-connection buffer

// Writes all n bytes; false if the peer is gone.
bool send_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= size_t(w);
  }
  return true;
}

void* serve(void* arg) {
  int fd = int(reinterpret_cast<intptr_t>(arg));
  char buf[kBufferBytes];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || !send_all(fd, buf, size_t(n))) break;
  }
  ::close(fd);
  return nullptr;
}

// Accepts forever. Running out of descriptors or threads drops that one
// connection (reported once) rather than the server.
[[noreturn]] void accept_loop(int listen_fd, int idle_seconds) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, kStackBytes);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  bool reported = false;
  for (;;) {
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;  // read right after the call
      if (err == EINTR || err == ECONNABORTED) continue;
      if (!reported) std::fprintf(stderr, "thread_echo_server: accept: %s\n", std::strerror(err));
      reported = true;
      ::usleep(10'000);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    timeval idle{idle_seconds, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &idle, sizeof idle);
    pthread_t t;
    int err = pthread_create(&t, &attr, serve, reinterpret_cast<void*>(intptr_t(fd)));
    if (err != 0) {
      if (!reported) std::fprintf(stderr, "thread_echo_server: pthread_create: %s\n", std::strerror(err));
      reported = true;
      ::close(fd);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  int port = 0, idle_seconds = 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--port") port = std::atoi(argv[i + 1]);
    if (std::string(argv[i]) == "--idle") idle_seconds = std::atoi(argv[i + 1]);
  }
  if (port <= 0 || port > 65535 || idle_seconds <= 0) {
    std::fprintf(stderr, "usage: thread_echo_server --port N [--idle S]\n");
    return 2;
  }
  std::signal(SIGPIPE, SIG_IGN);
  bench::raise_nofile_limit();
  int listen_fd = bench::listen_local(port);
  if (listen_fd < 0) {
    std::fprintf(stderr, "thread_echo_server: listen on 127.0.0.1:%d: %s\n", port, std::strerror(errno));
    return 1;
  }
  accept_loop(listen_fd, idle_seconds);
}
