// tests/server_scenarios_test.cc
//
// A production-style TCP server written against the public API as
// README.md (*Using it*, *Sockets, files and blocking calls*) and
// examples/chat_server describe it: per connection a reader fiber, a writer
// fiber fed by a bounded channel, and a timeout fiber that drops idle
// peers; a signal_set for graceful shutdown. Each case drives it the way
// real clients do (plain threads with ordinary sockets) and checks what a
// server author relies on: shutdown ends every connection fiber, idle
// peers are dropped and leave no descriptor or fiber behind, a half-closed
// peer still gets its answer, a peer that leaves in the middle of a large
// response does not hold its fiber, and thousands of short connections
// leave the descriptor count and live fiber count where they started.
//
// Every client read is bounded (SO_RCVTIMEO), every loop bounded in count
// and time; the server listens on 127.0.0.1 only. Runs on both I/O drivers
// (tests/BUILD.bazel).
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/select.h"
#include "runtime/sync.h"
#include "runtime/weft.h"
#include "io/socket_test_util.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;
using testing::open_fds;

class ServerScenarios : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(ServerScenarios);

// Waits (bounded) until the live fiber count is back to `want`.
std::uint64_t settle_live_fibers(std::uint64_t want) {
  std::uint64_t live = stats().live_fibers;
  for (int i = 0; i < 500 && live != want; ++i) {
    (void)this_fiber::sleep_for(10ms);
    live = stats().live_fibers;
  }
  return live;
}

// Waits (bounded) until the descriptor count is back to `want` or below
// (callers expect <= want): a count taken at the start may include a
// descriptor only briefly open, such as the monitor's read of a worker's
// /proc status (io/uring_driver.cc), which a TSan run on a loaded machine
// caught (10 at the start, 9 at the end).
int settle_fds(int want) {
  int n = open_fds();
  for (int i = 0; i < 500 && n > want; ++i) {
    (void)this_fiber::sleep_for(10ms);
    n = open_fds();
  }
  return n;
}

// Joins client threads from a fiber without blocking its worker (with one
// worker, the server's fibers would otherwise wait for the joins).
void join_off_worker(std::vector<std::thread>& ts) {
  blocking([&] {
    for (auto& t : ts) t.join();
  });
}
void join_off_worker(std::thread& t) {
  blocking([&] { t.join(); });
}

// A blocking client socket connected to 127.0.0.1:port, reads bounded by
// `rcvtimeo`; rcvbuf: its SO_RCVBUF (0: the default). -1 on failure.
int client_connect(int port, int rcvbuf = 0, std::chrono::seconds rcvtimeo = 5s) {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return -1;
  if (rcvbuf) ::setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  timeval tv{static_cast<time_t>(rcvtimeo.count()), 0};
  ::setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(s);
    return -1;
  }
  return s;
}

// Reads until end of stream (0), a reset (ECONNRESET: also an end), the
// receive timeout (-1) or another error (-errno). `got` counts the bytes.
int client_drain(int s, std::size_t* got = nullptr) {
  char buf[16384];
  std::size_t total = 0;
  for (;;) {
    ssize_t n = ::recv(s, buf, sizeof buf, 0);
    if (n > 0) {
      total += static_cast<std::size_t>(n);
      continue;
    }
    if (got) *got = total;
    if (n == 0 || errno == ECONNRESET) return 0;
    return errno == EAGAIN ? -1 : -errno;  // -1: the receive timeout
  }
}

// The timeout fiber parks with a shallow call chain: README's small-stack
// option (16 KiB under the sanitizers, whose instrumented frames overflow
// 2 KiB: see runtime/weft.h).
inline constexpr std::size_t kTimeoutStack = kSmallStack;

// ---------------------------------------------------------------------------
// The server: a line server (each line "x" is answered "x\n" by the
// writer), with the three fibers per connection of examples/chat_server.
// It keeps its open connections in a table, so a shutdown can close them.

struct line_server {
  explicit line_server(std::chrono::milliseconds idle) : idle(idle) {}

  std::chrono::milliseconds idle;
  mutex mu;
  std::map<std::uint64_t, std::shared_ptr<tcp_stream>> open;  // under mu
  std::uint64_t next_id = 0;                                    // under mu
  bool closing = false;  // under mu: close_all() ran; later arrivals close at once
  wait_group conns;  // one per connection fiber set still running
  std::atomic<int> accepted{0}, idle_drops{0}, finished{0};

  void serve(tcp_stream s) {
    auto c = std::make_shared<tcp_stream>(std::move(s));
    std::uint64_t id;
    {
      // A connection accepted before close_all() may start after it.
      std::lock_guard g(mu);
      id = next_id++;
      open.emplace(id, c);
      if (closing) (void)c->close();
    }
    auto out = std::make_shared<channel<std::string>>(8);
    auto alive = std::make_shared<channel<bool>>(1);
    auto w = spawn([c, out] {
      while (auto l = out->recv())
        if (!c->write_all({l->data(), l->size()})) break;
      out->close();  // the reader's next send fails: it stops too
      (void)c->shutdown(SHUT_RDWR);
    }, {.name = "writer"});
    auto t = spawn([this, c, alive] {
      for (;;) {
        auto a = alive->recv(deadline(idle));
        if (a) continue;
        if (a.error() == std::errc::timed_out) {
          idle_drops.fetch_add(1);
          (void)c->close();  // the reader and writer return at once
        }
        return;
      }
    }, {.name = "timeout", .stack_size = kTimeoutStack});
    std::string pending;
    char buf[1024];
    for (;;) {
      auto n = c->read(buf);
      if (!n || *n == 0) break;
      (void)alive->try_send(true);
      pending.append(buf, *n);
      bool ok = true;
      for (std::size_t nl; ok && (nl = pending.find('\n')) != std::string::npos;) {
        ok = out->send(pending.substr(0, nl + 1)).has_value();
        pending.erase(0, nl + 1);
      }
      if (!ok) break;
    }
    out->close();  // the writer sends what is queued, then ends
    alive->close();
    w.join();
    t.join();
    {
      std::lock_guard g(mu);
      open.erase(id);
    }
    finished.fetch_add(1);
    conns.done();
  }

  // Accepts until the listener is closed or the fiber is stopped.
  void accept_loop(tcp_listener& ln) {
    for (int next = 0;;) {
      auto c = ln.accept();
      if (!c) {
        if (c.error() == std::errc::bad_file_descriptor ||
            c.error() == std::errc::operation_canceled)
          return;
        (void)this_fiber::sleep_for(1ms);
        continue;
      }
      accepted.fetch_add(1);
      conns.add(1);
      go([this, c = std::move(*c)]() mutable { serve(std::move(c)); },
         {.name = "conn", .worker = next});
      next = (next + 1) % int(worker_count());
    }
  }

  // Closes every open connection: their readers and writers return.
  void close_all() {
    std::lock_guard g(mu);
    closing = true;
    for (auto& [id, c] : open) (void)c->close();
  }
};

// ---------------------------------------------------------------------------
// Graceful shutdown on SIGTERM with connections in every state: idle, in
// the middle of a request stream, and one whose writer is parked because
// the client stopped reading. main waits for SIGTERM on a signal_set,
// closes the listener and every connection, waits for the connection
// fibers, and finds the live fiber count and the descriptor count where
// they were before the server started.
TEST_P(ServerScenarios, SigtermShutsDownWithConnectionsActive) {
  std::atomic<int> port{0};
  std::atomic<int> clients_ready{0};
  std::atomic<bool> stop_clients{false};
  std::vector<std::thread> clients;
  std::vector<int> client_ends(6, -2);
  int rc = Run([&] {
    const int fds0 = open_fds();
    const std::uint64_t live0 = stats().live_fibers;
    auto term = signal_set::watch({SIGTERM});
    if (!term) return 1;
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 2;
    port = ln->local_address()->port();
    line_server srv(60s);
    auto acceptor = spawn([&] { srv.accept_loop(*ln); }, {.name = "acceptor"});
    // The clients and the signal are plain threads: they count as wakers.
    for (int i = 0; i < 6; ++i)
      clients.emplace_back([&, i, waker = outside_ref{}] {
        int s = client_connect(port.load(), i == 5 ? 4096 : 0);
        if (s < 0) {
          client_ends[i] = -1000;
          clients_ready.fetch_add(1);
          return;
        }
        if (i == 5) {  // sends a flood of lines and never reads
          std::string many(256 * 1024, 'q');
          for (std::size_t k = 63; k < many.size(); k += 64) many[k] = '\n';
          std::size_t off = 0;
          auto until = std::chrono::steady_clock::now() + 2s;
          while (off < many.size() && std::chrono::steady_clock::now() < until) {
            ssize_t w = ::send(s, many.data() + off, many.size() - off,
                               MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) off += static_cast<std::size_t>(w);
            else std::this_thread::sleep_for(1ms);
          }
          clients_ready.fetch_add(1);
        } else if (i >= 3) {  // request / response, until the server goes
          clients_ready.fetch_add(1);
          for (int k = 0; k < 100000 && !stop_clients.load(); ++k) {
            if (::send(s, "ping\n", 5, MSG_NOSIGNAL) != 5) break;
            char b[5];
            if (::recv(s, b, 5, MSG_WAITALL) != 5) break;
          }
        } else {  // idle
          clients_ready.fetch_add(1);
        }
        client_ends[i] = client_drain(s);
        ::close(s);
      });
    for (int i = 0; i < 1000 && (clients_ready.load() < 6 || srv.accepted.load() < 6); ++i)
      (void)this_fiber::sleep_for(5ms);
    if (srv.accepted.load() != 6) return 3;
    std::thread raiser([waker = outside_ref{}] { ::kill(::getpid(), SIGTERM); });
    auto sig = term->wait(deadline(10s));
    raiser.join();
    if (!sig || *sig != SIGTERM) return 4;
    // Shut down: stop accepting, end every connection, wait for them.
    (void)ln->close();
    acceptor.join();
    srv.close_all();
    if (!srv.conns.wait(deadline(10s))) {
      dump();
      return 5;
    }
    stop_clients = true;
    if (srv.finished.load() != 6) return 6;
    if (std::uint64_t live = settle_live_fibers(live0); live != live0) {
      ADD_FAILURE() << "live fibers " << live << ", were " << live0;
      return 7;
    }
    { signal_set gone = std::move(*term); }  // its eventfd goes with it
    if (int n = settle_fds(fds0); n > fds0) {
      ADD_FAILURE() << "descriptors " << n << ", were " << fds0;
      return 8;
    }
    if (pooled_buffer::in_use() != 0) return 9;
    return 0;
  });
  stop_clients = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(rc, 0);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(client_ends[i], 0) << "client " << i;
}

// A client that connects and sends nothing is dropped by the timeout fiber
// (it sees the end of the stream); its three fibers end and its descriptor
// is closed, as are those of clients that sent something and then went
// silent.
TEST_P(ServerScenarios, IdlePeersAreDroppedAndLeaveNothingBehind) {
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    const int port = ln->local_address()->port();
    line_server srv(200ms);
    auto acceptor = spawn([&] { srv.accept_loop(*ln); }, {.name = "acceptor"});
    (void)this_fiber::sleep_for(1ms);
    const int fds0 = open_fds();
    const std::uint64_t live0 = stats().live_fibers;
    std::vector<int> ends(4, -2);
    std::vector<std::chrono::steady_clock::duration> took(4);
    std::vector<std::thread> clients;
    for (int i = 0; i < 4; ++i)
      clients.emplace_back([&, i, waker = outside_ref{}] {
        int s = client_connect(port);
        if (s < 0) return;
        auto t0 = std::chrono::steady_clock::now();
        if (i % 2 == 1) {  // says something first, then goes silent
          if (::send(s, "hi\n", 3, MSG_NOSIGNAL) != 3) return;
          char b[3];
          if (::recv(s, b, 3, MSG_WAITALL) != 3) return;
        }
        ends[i] = client_drain(s);
        took[i] = std::chrono::steady_clock::now() - t0;
        ::close(s);
      });
    join_off_worker(clients);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(ends[i], 0) << "client " << i << " was not dropped";
      EXPECT_GE(took[i], 150ms) << "client " << i << " dropped before its idle time";
    }
    if (srv.conns.wait(deadline(10s)) != result<void>{}) return 2;
    EXPECT_EQ(srv.idle_drops.load(), 4);
    EXPECT_EQ(settle_live_fibers(live0), live0);
    EXPECT_LE(settle_fds(fds0), fds0);
    (void)ln->close();
    acceptor.join();
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// Half-close: the client sends its request and shuts its side down
// (SHUT_WR); the server reads to the end of the stream and only then
// writes a large answer (several times what the socket buffers hold),
// which the client receives whole before the server closes.
TEST_P(ServerScenarios, HalfClosedPeerGetsTheWholeAnswerAfterItsEof) {
  constexpr std::size_t kAnswer = 8 << 20;
  std::size_t got = 0;
  int end = -2;
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    const int port = ln->local_address()->port();
    std::thread client([&, waker = outside_ref{}] {
      int s = client_connect(port);
      if (s < 0) return;
      std::string req(100000, 'r');
      if (::send(s, req.data(), req.size(), MSG_NOSIGNAL) != ssize_t(req.size())) return;
      ::shutdown(s, SHUT_WR);
      end = client_drain(s, &got);
      ::close(s);
    });
    auto c = ln->accept(deadline(10s));
    if (!c) return 2;
    std::size_t request = 0;
    char buf[4096];
    for (;;) {
      auto n = c->read(buf, deadline(10s));
      if (!n) return 3;
      if (*n == 0) break;
      request += *n;
    }
    if (request != 100000) return 4;
    std::string answer(kAnswer, 'a');
    if (!c->write_all({answer.data(), answer.size()}, deadline(20s))) return 5;
    if (!c->close()) return 6;
    join_off_worker(client);
    return 0;
  });
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(end, 0);
  EXPECT_EQ(got, kAnswer);
}

// A client asks for a large answer, reads a little of it and goes away
// (close with unread data: a reset). The server's write_all, parked on a
// full socket buffer, fails at once with the connection's error, not at its
// (distant) deadline, and the fiber, its descriptor and its receive
// buffers are released. Both a plain close and a reset.
TEST_P(ServerScenarios, PeerLeavingInTheMiddleOfALargeWriteFreesTheWriter) {
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    const int port = ln->local_address()->port();
    const int fds0 = open_fds();
    const std::uint64_t live0 = stats().live_fibers;
    for (int round = 0; round < 2; ++round) {
      std::thread client([&, waker = outside_ref{}] {
        int s = client_connect(port, 4096);
        if (s < 0) return;
        if (::send(s, "GET\n", 4, MSG_NOSIGNAL) != 4) return;
        char b[1000];
        (void)::recv(s, b, sizeof b, MSG_WAITALL);
        std::this_thread::sleep_for(50ms);  // the server is parked in write by now
        if (round == 1) {
          linger lg{1, 0};
          ::setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        ::close(s);
      });
      auto c = ln->accept(deadline(10s));
      if (!c) return 2;
      auto w = spawn([&c] {
        char req[4];
        if (!c->read_exact(req, deadline(10s))) return std::error_code{};
        std::string big(64 << 20, 'b');
        auto r = c->write_all({big.data(), big.size()}, deadline(60s));
        return r ? std::error_code{} : r.error();
      });
      auto t0 = clock::now();
      std::error_code e = w.join();
      auto took = clock::now() - t0;
      join_off_worker(client);
      EXPECT_TRUE(e == std::errc::broken_pipe || e == std::errc::connection_reset)
          << "round " << round << ": " << e.message();
      EXPECT_LT(took, 20s) << "write_all waited for its deadline";
      if (!c->close()) return 3;
    }
    EXPECT_EQ(settle_live_fibers(live0), live0);
    EXPECT_LE(settle_fds(fds0), fds0);
    EXPECT_EQ(pooled_buffer::in_use(), 0u);
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// Thousands of short connections, each a request and its answer, a
// connect-and-close, or a reset: afterwards the process has the
// descriptors and live fibers it had before.
TEST_P(ServerScenarios, ThousandsOfShortConnectionsLeaveNoDescriptorsOrFibers) {
#if defined(WEFT_TSAN) || defined(WEFT_ASAN)
  constexpr int kConns = 300;
#else
  constexpr int kConns = 3000;
#endif
  std::atomic<int> failed{0};
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    const int port = ln->local_address()->port();
    line_server srv(5s);
    auto acceptor = spawn([&] { srv.accept_loop(*ln); }, {.name = "acceptor"});
    (void)this_fiber::sleep_for(1ms);
    const int fds0 = open_fds();
    const std::uint64_t live0 = stats().live_fibers;
    std::vector<std::thread> clients;
    for (int t = 0; t < 2; ++t)
      clients.emplace_back([&, t, waker = outside_ref{}] {
        for (int i = t; i < kConns; i += 2) {
          int s = client_connect(port);
          if (s < 0) {
            failed.fetch_add(1);
            continue;
          }
          switch (i % 3) {
            case 0: {
              char b[5];
              if (::send(s, "ping\n", 5, MSG_NOSIGNAL) != 5 ||
                  ::recv(s, b, 5, MSG_WAITALL) != 5)
                failed.fetch_add(1);
              break;
            }
            case 1:
              break;
            case 2: {
              linger lg{1, 0};
              ::setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
              break;
            }
          }
          ::close(s);
        }
      });
    join_off_worker(clients);
    // The clients are done once their connects completed (the kernel's
    // backlog), which may be before the server accepted the last ones;
    // Linux still hands out the ones reset meanwhile.
    for (int i = 0; i < 3000 && srv.accepted.load() < kConns; ++i)
      (void)this_fiber::sleep_for(10ms);
    if (srv.conns.wait(deadline(30s)) != result<void>{}) {
      dump();
      return 2;
    }
    EXPECT_EQ(srv.accepted.load(), kConns);
    EXPECT_EQ(srv.idle_drops.load(), 0);
    EXPECT_EQ(settle_live_fibers(live0), live0);
    EXPECT_LE(settle_fds(fds0), fds0);
    EXPECT_EQ(pooled_buffer::in_use(), 0u);
    (void)ln->close();
    acceptor.join();
    return 0;
  });
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(failed.load(), 0);
}

}  // namespace
}  // namespace weft
