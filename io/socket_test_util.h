// io/socket_test_util.h — what the socket test files share: the address
// of a listener, a listener whose accept queue is full, an echo server
// fiber, open descriptors and a pipe, a deterministic byte stream, whether
// small writes go behind the fiber, and a scoped environment variable.
// Test-only.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "runtime/net.h"
#include "runtime/weft.h"

namespace weft::testing {

// How many descriptors this process has open (/proc/self/fd); -1 if it
// cannot tell (no /proc, or no descriptor left to open the directory).
inline int open_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return -1;
  while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
  ::closedir(d);
  return n - 1;  // the directory's own descriptor
}

// A non-blocking pipe (both ends close-on-exec), closed at scope exit.
struct pipe_fds {
  int r = -1, w = -1;
  pipe_fds() {
    int fds[2];
    EXPECT_EQ(::pipe2(fds, O_CLOEXEC | O_NONBLOCK), 0);
    r = fds[0];
    w = fds[1];
  }
  ~pipe_fds() {
    if (r >= 0) ::close(r);
    if (w >= 0) ::close(w);
  }
  pipe_fds(const pipe_fds&) = delete;
  pipe_fds& operator=(const pipe_fds&) = delete;
};

inline std::string addr_of(const tcp_listener& l) { return l.local_address().value().to_string(); }

// Connects to `addr`, a listener that never accepts (bind it with backlog
// 0), until a connect times out: its accept queue is then full (a TCP
// listener's kernel drops new SYNs; a Unix one's connect waits for room),
// so a further connect waits without an answer. The connections that got
// in go to `queued` (keep them: they hold the queue full). False if the
// queue never filled.
inline bool fill_accept_queue(const std::string& addr, std::vector<tcp_stream>& queued) {
  using namespace std::chrono_literals;
  for (int i = 0; i < 16; ++i) {
    auto c = tcp_stream::connect(addr, deadline(50ms));
    if (!c) return c.error() == std::errc::timed_out;
    queued.push_back(std::move(*c));
  }
  return false;
}
inline bool fill_accept_queue(const tcp_listener& ln, std::vector<tcp_stream>& queued) {
  return fill_accept_queue(addr_of(ln), queued);
}

// Echoes every connection until EOF; stops accepting when its fiber is
// asked to. The connection fibers are detached (a stopped fiber cannot
// join): they end at their client's EOF, or the runtime unwinds them.
inline join_handle<void> spawn_echo_server(tcp_listener& ln) {
  return spawn([&ln] {
    for (;;) {
      auto c = ln.accept();
      if (!c) {
        if (c.error() == std::errc::operation_canceled) break;
        continue;
      }
      spawn([c = std::move(*c)]() mutable {
        std::vector<char> buf(16 * 1024);
        while (auto n = c.read(buf)) {
          if (*n == 0 || !c.write_all({buf.data(), *n})) break;
        }
      }, {.name = "echo conn"}).detach();
    }
  }, {.name = "echo server"});
}

// Two ends of one loopback TCP connection: the connecting side and the
// accepted side.
struct tcp_pair {
  tcp_stream client, server;
};
inline tcp_pair connected_pair() {
  auto ln = tcp_listener::bind("127.0.0.1:0").value();
  auto c = tcp_stream::connect(addr_of(ln)).value();
  return {std::move(c), ln.accept().value()};
}

// Connects to an echo server at `addr`, sends `msg`, expects it back.
inline void expect_echo_of(const std::string& addr, std::string_view msg) {
  using namespace std::chrono_literals;
  auto c = tcp_stream::connect(addr, deadline(5s));
  ASSERT_TRUE(c) << c.error().message();
  ASSERT_TRUE(c->write_all({msg.data(), msg.size()}));
  std::string back(msg.size(), '\0');
  ASSERT_TRUE(c->read_exact({back.data(), back.size()}, deadline(5s)));
  EXPECT_EQ(back, msg);
  (void)c->close();
}

// Whether pooled reads arm a multishot receive here (io/recv.cc): io_uring
// with the buffer ring, WEFT_MULTISHOT_RECV not "0". Inside a run.
inline bool multishot_recv_on() {
  const char* v = std::getenv("WEFT_MULTISHOT_RECV");
  const io_stats st = get_io_stats();
  return st.driver == "io_uring" && st.buffer_backing != "heap" && !(v && std::string(v) == "0");
}

// io_uring, and WEFT_WRITE_BEHIND not "0": TCP streams then send small
// writes behind the fiber (the kernel permitting: see io/uring_driver.cc's
// make_uring_driver()). Only inside a run (it asks the running drivers).
inline bool write_behind_on() {
  const char* v = std::getenv("WEFT_WRITE_BEHIND");
  return io::stats().driver == "io_uring" && !(v && std::string(v) == "0");
}

// Byte i of a test's stream, and n of its bytes from `from`: a receiver
// can tell a gap, a repeat or a reordering from the bytes alone.
inline char byte_at(std::size_t i) { return static_cast<char>('a' + (i * 7 + i / 251) % 26); }
inline std::string stream_part(std::size_t from, std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = byte_at(from + i);
  return s;
}

// Sets an environment variable for the scope (for settings the runtime
// reads when it starts: set it before weft::run), restoring it after.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~scoped_env() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace weft::testing
