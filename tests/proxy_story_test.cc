// tests/proxy_story_test.cc
//
// A TCP proxy written against the public API as a user would from
// README.md (*Fibers*, *Sockets, files and blocking calls*) and
// runtime/task_group.h: an accept loop owning a task_group of connection
// fibers; per connection, a connect to the upstream and two child fibers
// of a task_group copying bytes each way with an idle read deadline. One
// direction's end of stream becomes shutdown(SHUT_WR) on the other socket
// (half-close propagates) while the other direction goes on to its own
// end; one direction's error closes both sockets and the group stops the
// sibling. The main fiber stops the whole proxy with request_stop() on the
// accept loop. The upstream is a weft echo server in the same process, and
// the clients are weft fibers too (one reader and one writer per client).
//
// So every connection has, on each of its two sockets, one fiber reading
// and another writing, with shutdown() and close() racing them: the cases
// check what a proxy author relies on there — every byte through, in
// order; an end of stream passed on, not lost; a reset, a refused
// upstream, an idle upstream and a shutdown each end their connection
// (and no descriptor or fiber stays behind).
//
// Every wait is bounded (deadlines on every call, bounded settle loops);
// runs on both I/O drivers (tests/BUILD.bazel).
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/socket_test_util.h"
#include "runtime/net.h"
#include "runtime/sync.h"
#include "runtime/task_group.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;
using testing::addr_of;
using testing::byte_at;
using testing::open_fds;

class ProxyStory : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(ProxyStory);

#if defined(WEFT_TSAN) || defined(WEFT_ASAN)
constexpr int kClients = 50;
constexpr std::size_t kMaxSize = 256 * 1024;
#else
constexpr int kClients = 200;
constexpr std::size_t kMaxSize = 1024 * 1024;
#endif

// Waits (bounded) until f() is true; returns f().
template <typename F>
bool settle(F f, std::chrono::milliseconds bound = 5s) {
  for (auto until = std::chrono::steady_clock::now() + bound;
       !f() && std::chrono::steady_clock::now() < until;)
    (void)this_fiber::sleep_for(5ms);
  return f();
}

// ---------------------------------------------------------------------------
// The upstream: an echo server that counts its live connections. At a
// client's end of stream it closes (its reply is complete).

struct echo_upstream {
  tcp_listener ln = tcp_listener::bind("127.0.0.1:0").value();
  std::atomic<int> live{0};
  join_handle<void> loop;

  echo_upstream() {
    loop = spawn([this] {
      task_group conns;
      for (;;) {
        auto c = ln.accept();
        if (!c) {
          if (c.error() == std::errc::operation_canceled) break;
          (void)this_fiber::sleep_for(1ms);
          continue;
        }
        live.fetch_add(1, std::memory_order_relaxed);  // relaxed: a count read by settle()
        conns.spawn([this, c = std::move(*c)]() mutable {
          std::vector<char> buf(16 * 1024);
          while (auto n = c.read(buf, deadline(10s)))
            if (*n == 0 || !c.write_all({buf.data(), *n}, deadline(10s))) break;
          (void)c.close();
          live.fetch_sub(1, std::memory_order_relaxed);
        }, {.name = "echo conn"});
      }
    }, {.name = "echo accept"});
  }
  ~echo_upstream() {
    loop.request_stop();
    loop.join();
  }
  std::string addr() const { return addr_of(ln); }
};

// ---------------------------------------------------------------------------
// The proxy.

struct proxy {
  std::string upstream;
  std::chrono::milliseconds idle;
  tcp_listener ln = tcp_listener::bind("127.0.0.1:0").value();
  // relaxed: counts, read by the test after settle()
  std::atomic<int> live{0}, accepted{0}, upstream_failed{0}, failed{0}, timed_out{0},
      clean{0};
  join_handle<void> loop;

  proxy(std::string up, std::chrono::milliseconds idle) : upstream(std::move(up)), idle(idle) {
    loop = spawn([this] { accept_loop(); }, {.name = "proxy accept"});
  }
  ~proxy() {
    if (loop.joinable()) stop();
  }
  std::string addr() const { return addr_of(ln); }
  void stop() {
    loop.request_stop();
    loop.join();
  }

  void accept_loop() {
    task_group conns;
    for (int next = 0;;) {
      auto c = ln.accept();
      if (!c) {
        if (c.error() == std::errc::operation_canceled) break;
        (void)this_fiber::sleep_for(1ms);
        continue;
      }
      accepted.fetch_add(1, std::memory_order_relaxed);
      const bool pooled = accepted.load(std::memory_order_relaxed) % 2 == 0;
      conns.spawn([this, pooled, c = std::move(*c)]() mutable { serve(std::move(c), pooled); },
                  {.name = "proxy conn", .worker = next});
      next = (next + 1) % int(worker_count());
    }
    // Stopped: wait() stops the connections too and waits for them all.
    (void)conns.wait();
  }

  // Copies `from` to `to` until from's end of stream, then ends `to`'s
  // sending side. An error closes both sockets (the sibling's calls
  // return at once) and is returned: the group stops the sibling.
  // `pooled`: with read_pooled() (every other connection), else read().
  result<void> pipe(tcp_stream& from, tcp_stream& to, bool pooled,
                    std::atomic<bool>& cause_claimed, std::error_code& cause) {
    std::vector<char> buf(pooled ? 0 : 32 * 1024);
    std::error_code ec;
    for (;;) {
      pooled_buffer pb;
      std::span<const char> got;
      if (pooled) {  // a buffer only once data came
        auto n = from.read_pooled(deadline(idle));
        if (!n) {
          ec = n.error();
          break;
        }
        pb = std::move(*n);
        got = pb.data();
      } else {
        auto n = from.read(buf, deadline(idle));
        if (!n) {
          ec = n.error();
          break;
        }
        got = {buf.data(), *n};
      }
      if (got.empty()) {
        auto s = to.shutdown(SHUT_WR);
        if (s) return {};
        ec = s.error();
        break;
      }
      auto w = to.write_all(got, deadline(idle));
      if (!w) {
        ec = w.error();
        break;
      }
    }
    // What ended the connection: the first direction to fail says, before
    // it closes (the sibling's call then fails with bad_file_descriptor,
    // and may reach the group first).
    if (!cause_claimed.exchange(true, std::memory_order_relaxed))  // relaxed: read after wait()
      cause = ec;
    (void)from.close();
    (void)to.close();
    return std::unexpected(ec);
  }

  void serve(tcp_stream client, bool pooled) {
    live.fetch_add(1, std::memory_order_relaxed);
    struct dec {
      std::atomic<int>& n;
      ~dec() { n.fetch_sub(1, std::memory_order_relaxed); }
    } d{live};
    auto up = tcp_stream::connect(upstream, deadline(2s));
    if (!up) {
      upstream_failed.fetch_add(1, std::memory_order_relaxed);
      (void)client.close();
      return;
    }
    result<void> r;
    std::atomic<bool> claimed{false};
    std::error_code cause;
    {
      task_group g;
      g.spawn([&]() -> result<void> { return pipe(client, *up, pooled, claimed, cause); },
              {.name = "c->u"});
      g.spawn([&]() -> result<void> { return pipe(*up, client, pooled, claimed, cause); },
              {.name = "u->c"});
      r = g.wait();
    }
    if (r)
      clean.fetch_add(1, std::memory_order_relaxed);
    else if (cause == std::errc::timed_out)
      timed_out.fetch_add(1, std::memory_order_relaxed);
    else
      failed.fetch_add(1, std::memory_order_relaxed);
  }
};

// ---------------------------------------------------------------------------
// Clients.

// Sends n bytes of the stream at `seed` through `addr` (a writer fiber,
// then shutdown(SHUT_WR)), reads the echo to its end and checks it byte
// for byte. Empty on success, else what went wrong.
std::string echo_through(const std::string& addr, std::size_t n, std::size_t seed) {
  auto c = tcp_stream::connect(addr, deadline(5s));
  if (!c) return "connect: " + c.error().message();
  std::string werr;
  auto writer = spawn([&] {
    std::size_t off = 0;
    std::string part;
    while (off < n) {
      std::size_t k = std::min<std::size_t>(n - off, 1 + (seed + off) % 70000);
      part.resize(k);
      for (std::size_t i = 0; i < k; ++i) part[i] = byte_at(seed + off + i);
      if (auto w = c->write_all({part.data(), k}, deadline(10s)); !w) {
        werr = "write at " + std::to_string(off) + ": " + w.error().message();
        return;
      }
      off += k;
    }
    if (auto s = c->shutdown(SHUT_WR); !s) werr = "shutdown: " + s.error().message();
  }, {.name = "client writer"});
  std::string rerr;
  std::vector<char> buf(64 * 1024);
  std::size_t got = 0;
  const bool pooled = seed % 2 == 1;
  for (;;) {
    pooled_buffer pb;
    std::span<const char> in;
    if (pooled) {
      auto r = c->read_pooled(deadline(10s));
      if (!r) {
        rerr = "read_pooled at " + std::to_string(got) + ": " + r.error().message();
        break;
      }
      pb = std::move(*r);
      in = pb.data();
    } else {
      auto r = c->read(buf, deadline(10s));
      if (!r) {
        rerr = "read at " + std::to_string(got) + ": " + r.error().message();
        break;
      }
      in = {buf.data(), *r};
    }
    if (in.empty()) break;
    for (std::size_t i = 0; i < in.size(); ++i)
      if (in[i] != byte_at(seed + got + i)) {
        rerr = "byte " + std::to_string(got + i) + " differs (chunk at " + std::to_string(got) +
               " of " + std::to_string(in.size()) + ")";
        break;
      }
    if (!rerr.empty()) break;
    got += in.size();
  }
  if (!rerr.empty()) (void)c->close();  // the writer returns
  writer.join();
  if (rerr.empty() && got != n)
    rerr = "got " + std::to_string(got) + " of " + std::to_string(n) + " bytes";
  if (!werr.empty()) return werr + (rerr.empty() ? "" : "; " + rerr);
  return rerr;
}

std::size_t size_of_client(int i) {
  // 1 byte, then powers of two up to kMaxSize, each nudged by i.
  int shift = i % 22;
  if (shift == 0) return 1;
  return std::min<std::size_t>(kMaxSize, (std::size_t{1} << (shift - 1)) + std::size_t(i));
}

// ---------------------------------------------------------------------------

TEST_P(ProxyStory, ConcurrentClientsGetTheirBytesBackExactly) {
  EXPECT_EQ(Run([] {
    const int fds0 = open_fds();
    {
      echo_upstream up;
      proxy px(up.addr(), 5s);
      std::vector<std::string> errs(kClients);
      {
        task_group clients;
        for (int i = 0; i < kClients; ++i)
          clients.spawn([&, i] { errs[i] = echo_through(px.addr(), size_of_client(i), i * 7919u); },
                        {.name = "client", .worker = i});
        EXPECT_TRUE(clients.wait());
      }
      for (int i = 0; i < kClients; ++i)
        EXPECT_EQ(errs[i], "") << "client " << i << " (" << size_of_client(i) << " bytes)";
      EXPECT_TRUE(settle([&] { return px.live.load(std::memory_order_relaxed) == 0; }));
      EXPECT_EQ(px.accepted.load(), kClients);
      EXPECT_EQ(px.clean.load(), kClients);
      EXPECT_EQ(px.failed.load() + px.timed_out.load() + px.upstream_failed.load(), 0);
      EXPECT_TRUE(settle([&] { return up.live.load(std::memory_order_relaxed) == 0; }));
    }
    EXPECT_TRUE(settle([&] { return open_fds() == fds0; })) << open_fds() << " vs " << fds0;
  }), 0);
}

// The client ends its sending side before reading anything: the proxy
// passes the end on, the echo server answers it all, and the client
// still reads every byte back, then the end.
TEST_P(ProxyStory, HalfClosedClientStillReadsTheRest) {
  EXPECT_EQ(Run([] {
    echo_upstream up;
    proxy px(up.addr(), 5s);
    for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{48 * 1024}}) {
      auto c = tcp_stream::connect(px.addr(), deadline(5s));
      ASSERT_TRUE(c) << c.error().message();
      std::string msg = testing::stream_part(n, n);
      ASSERT_TRUE(c->write_all({msg.data(), msg.size()}, deadline(5s)));
      ASSERT_TRUE(c->shutdown(SHUT_WR));
      std::string back(n, '\0');
      auto r = c->read_exact({back.data(), n}, deadline(5s));
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(back, msg);
      char x;
      auto e = c->read({&x, 1}, deadline(5s));
      ASSERT_TRUE(e) << e.error().message();
      EXPECT_EQ(*e, 0u);
    }
    EXPECT_TRUE(settle([&] { return px.live.load() == 0; }));
    EXPECT_EQ(px.clean.load(), 3);
  }), 0);
}

// A client that resets its connection while data flows both ways: the
// proxy's connection ends with an error, closes its upstream socket (the
// echo server sees the end) and leaves no fiber behind.
TEST_P(ProxyStory, ClientResetMidTransferEndsBothSides) {
  EXPECT_EQ(Run([] {
    const auto fibers0 = stats().live_fibers;
    {
      echo_upstream up;
      proxy px(up.addr(), 5s);
      for (int round = 0; round < 5; ++round) {
        auto c = tcp_stream::connect(px.addr(), deadline(5s));
        ASSERT_TRUE(c) << c.error().message();
        std::string chunk = testing::stream_part(0, 256 * 1024);
        auto w = spawn([&] {
          for (int i = 0; i < 8; ++i)
            if (!c->write_all({chunk.data(), chunk.size()}, deadline(5s))) return;
        });
        std::vector<char> buf(8192);
        std::size_t got = 0;
        while (got < 100'000) {
          auto r = c->read(buf, deadline(5s));
          ASSERT_TRUE(r && *r > 0);
          got += *r;
        }
        linger lg{1, 0};
        ASSERT_EQ(::setsockopt(c->native_handle(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
        (void)c->close();  // a reset: the writer's next call fails
        w.join();
      }
      EXPECT_TRUE(settle([&] { return px.live.load() == 0; })) << px.live.load();
      EXPECT_TRUE(settle([&] { return up.live.load() == 0; })) << up.live.load();
      EXPECT_EQ(px.failed.load(), 5);
    }
    EXPECT_TRUE(settle([&] { return stats().live_fibers == fibers0; }));
  }), 0);
}

// The upstream refuses: the client's connection is closed (it reads the
// end at once) and nothing stays open.
TEST_P(ProxyStory, RefusedUpstreamClosesTheClient) {
  EXPECT_EQ(Run([] {
    const int fds0 = open_fds();
    std::string down;
    {
      auto l = tcp_listener::bind("127.0.0.1:0").value();
      down = addr_of(l);
    }  // closed: connects there are refused
    {
      proxy px(down, 5s);
      for (int i = 0; i < 10; ++i) {
        auto c = tcp_stream::connect(px.addr(), deadline(5s));
        ASSERT_TRUE(c) << c.error().message();
        (void)c->write({"hi", 2}, deadline(5s));
        char x;
        auto r = c->read({&x, 1}, deadline(5s));
        EXPECT_TRUE(!r ? r.error() == std::errc::connection_reset : *r == 0)
            << (r ? "a byte" : r.error().message());
      }
      EXPECT_TRUE(settle([&] { return px.live.load() == 0; }));
      EXPECT_EQ(px.upstream_failed.load(), 10);
    }
    EXPECT_TRUE(settle([&] { return open_fds() == fds0; })) << open_fds() << " vs " << fds0;
  }), 0);
}

// An upstream that accepts and never answers: the proxy's idle deadline
// ends the connection and the client reads its end.
TEST_P(ProxyStory, SilentUpstreamHitsTheProxyDeadline) {
  EXPECT_EQ(Run([] {
    auto silent = tcp_listener::bind("127.0.0.1:0").value();
    auto held = std::make_shared<std::vector<tcp_stream>>();
    auto sink = spawn([&silent, held] {
      while (auto c = silent.accept()) held->push_back(std::move(*c));
    }, {.name = "silent upstream"});
    {
      proxy px(addr_of(silent), 200ms);
      for (int i = 0; i < 4; ++i) {
        auto c = tcp_stream::connect(px.addr(), deadline(5s));
        ASSERT_TRUE(c) << c.error().message();
        ASSERT_TRUE(c->write_all({"ping", 4}, deadline(5s)));
        auto t0 = std::chrono::steady_clock::now();
        char x;
        auto r = c->read({&x, 1}, deadline(5s));
        EXPECT_TRUE(!r ? r.error() == std::errc::connection_reset : *r == 0)
            << (r ? "a byte" : r.error().message());
        EXPECT_GE(std::chrono::steady_clock::now() - t0, 150ms);
      }
      EXPECT_TRUE(settle([&] { return px.live.load() == 0; }));
      EXPECT_EQ(px.timed_out.load(), 4);
    }
    sink.request_stop();
    sink.join();
  }), 0);
}

// Stopping the proxy with connections open (mid-stream, idle): the
// accept loop's stop reaches every connection, the clients read their
// end, and every proxy fiber is gone.
TEST_P(ProxyStory, StoppingTheProxyEndsLiveConnections) {
  EXPECT_EQ(Run([] {
    const auto fibers0 = stats().live_fibers;
    echo_upstream up;
    const auto fibers_up = stats().live_fibers;
    auto px = std::make_unique<proxy>(up.addr(), 30s);
    std::vector<tcp_stream> cs;
    for (int i = 0; i < 20; ++i) {
      auto c = tcp_stream::connect(px->addr(), deadline(5s));
      ASSERT_TRUE(c) << c.error().message();
      ASSERT_TRUE(c->write_all({"hello", 5}, deadline(5s)));
      char b[5];
      ASSERT_TRUE(c->read_exact(b, deadline(5s)));
      cs.push_back(std::move(*c));
    }
    // One more client in the middle of a large send, its echo unread.
    auto busy = tcp_stream::connect(px->addr(), deadline(5s)).value();
    std::string big = testing::stream_part(0, 4 << 20);
    auto bw = spawn([&] { (void)busy.write_all({big.data(), big.size()}, deadline(10s)); });
    (void)this_fiber::sleep_for(20ms);
    auto t0 = std::chrono::steady_clock::now();
    px->stop();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
    EXPECT_EQ(px->live.load(), 0);
    for (auto& c : cs) {
      char x;
      auto r = c.read({&x, 1}, deadline(5s));
      EXPECT_TRUE(!r ? r.error() == std::errc::connection_reset : *r == 0)
          << (r ? "a byte" : r.error().message());
    }
    (void)busy.close();
    bw.join();
    EXPECT_TRUE(settle([&] { return up.live.load() == 0; }));
    px.reset();
    EXPECT_TRUE(settle([&] { return stats().live_fibers == fibers_up; }))
        << stats().live_fibers << " vs " << fibers_up;
    (void)fibers0;
  }), 0);
}

// The upstream speaks first and ends its side (a banner, then
// shutdown(SHUT_WR)) while it goes on reading: the proxy ends the
// client's receiving side as its other fiber still reads the client,
// and what the client sends after that still reaches the upstream.
TEST_P(ProxyStory, UpstreamEndsFirstAndTheClientKeepsSending) {
  EXPECT_EQ(Run([] {
    constexpr std::size_t kBanner = 100'000, kAfter = 300'000;
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    auto heard = std::make_shared<std::atomic<std::size_t>>(0);
    auto srv = spawn([&ln, heard] {
      task_group conns;
      for (;;) {
        auto c = ln.accept();
        if (!c) break;
        conns.spawn([heard, c = std::move(*c)]() mutable {
          std::string b = testing::stream_part(0, kBanner);
          if (!c.write_all({b.data(), b.size()}, deadline(5s)) || !c.shutdown(SHUT_WR)) return;
          std::vector<char> buf(16384);
          std::size_t n = 0;
          for (;;) {
            auto r = c.read(buf, deadline(5s));
            if (!r || *r == 0) break;
            for (std::size_t i = 0; i < *r; ++i)
              if (buf[i] != byte_at(n + i)) return;
            n += *r;
          }
          heard->fetch_add(n, std::memory_order_relaxed);  // relaxed: read after settle()
        }, {.name = "banner conn"});
      }
    }, {.name = "banner upstream"});
    {
      proxy px(addr_of(ln), 5s);
      for (int i = 0; i < 4; ++i) {  // two read(), two read_pooled() proxy connections
        heard->store(0, std::memory_order_relaxed);
        auto c = tcp_stream::connect(px.addr(), deadline(5s));
        ASSERT_TRUE(c) << c.error().message();
        std::string banner(kBanner, '\0');
        auto r = c->read_exact({banner.data(), kBanner}, deadline(5s));
        ASSERT_TRUE(r) << r.error().message();
        EXPECT_EQ(banner, testing::stream_part(0, kBanner));
        char x;
        auto e = c->read({&x, 1}, deadline(5s));
        ASSERT_TRUE(e) << e.error().message();
        EXPECT_EQ(*e, 0u);  // the upstream's end, passed on
        std::string after = testing::stream_part(0, kAfter);
        auto w = c->write_all({after.data(), kAfter}, deadline(5s));
        ASSERT_TRUE(w) << w.error().message();
        ASSERT_TRUE(c->shutdown(SHUT_WR));
        EXPECT_TRUE(settle([&] { return heard->load(std::memory_order_relaxed) == kAfter; }))
            << heard->load() << " of " << kAfter << " bytes, connection " << i;
        EXPECT_TRUE(settle([&] { return px.live.load() == 0; }));
      }
      EXPECT_EQ(px.clean.load(), 4);
    }
    (void)ln.close();
    srv.join();
  }), 0);
}

// The upstream resets in the middle of a transfer: the proxy's
// connection ends with an error and the client sees its end (EOF or a
// reset), within the proxy's own bounds.
TEST_P(ProxyStory, UpstreamResetEndsTheClient) {
  EXPECT_EQ(Run([] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    auto srv = spawn([&ln] {
      task_group conns;
      for (;;) {
        auto c = ln.accept();
        if (!c) break;
        conns.spawn([c = std::move(*c)]() mutable {
          std::vector<char> buf(16384);
          std::size_t n = 0;
          while (n < 50'000) {  // echo some, then reset
            auto r = c.read(buf, deadline(5s));
            if (!r || *r == 0) return;
            if (!c.write_all({buf.data(), *r}, deadline(5s))) return;
            n += *r;
          }
          linger lg{1, 0};
          (void)::setsockopt(c.native_handle(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
          (void)c.close();
        }, {.name = "resetting conn"});
      }
    }, {.name = "resetting upstream"});
    {
      proxy px(addr_of(ln), 5s);
      for (int i = 0; i < 4; ++i) {
        auto c = tcp_stream::connect(px.addr(), deadline(5s));
        ASSERT_TRUE(c) << c.error().message();
        std::string chunk = testing::stream_part(0, 64 * 1024);
        auto w = spawn([&] {
          for (int k = 0; k < 64; ++k)
            if (!c->write_all({chunk.data(), chunk.size()}, deadline(5s))) return;
        });
        std::vector<char> buf(16384);
        std::error_code end;
        for (;;) {
          auto r = c->read(buf, deadline(5s));
          if (!r) {
            end = r.error();
            break;
          }
          if (*r == 0) break;
        }
        EXPECT_TRUE(!end || end == std::errc::connection_reset) << end.message();
        (void)c->close();
        w.join();
      }
      EXPECT_TRUE(settle([&] { return px.live.load() == 0; }));
      EXPECT_EQ(px.failed.load(), 4);
    }
    (void)ln.close();
    srv.join();
  }), 0);
}

}  // namespace
}  // namespace weft
