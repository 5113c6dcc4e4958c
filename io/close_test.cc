// io/close_test.cc — close() on a socket that other fibers are using (see
// io/fd_state.h): their parked calls wake with EBADF (or their result, if
// it came first), later calls fail with EBADF, the peer sees the end of
// the stream, and no call ever acts on a file that reused the number.
// Every test runs over worker counts {1, 2, 4} (tests/fixture.h), on both
// drivers (io/BUILD.bazel), on 127.0.0.1 only.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "io/socket_test_util.h"
#include "runtime/net.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;
using testing::addr_of;
using testing::connected_pair;

class Close : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Close);

template <typename T>
std::error_code error_of(const result<T>& r) {
  return r ? std::error_code() : r.error();
}

// Parks call() (an error code; its own deadline is 10 s) on a fiber,
// closes `sock` from this one, and expects the call to fail with EBADF
// promptly.
template <typename Socket, typename Call>
void expect_close_wakes(Socket& sock, Call call) {
  auto parked = spawn(call);
  (void)this_fiber::sleep_for(30ms);  // parked by now
  auto t0 = clock::now();
  ASSERT_TRUE(sock.close());
  EXPECT_EQ(parked.join(), std::errc::bad_file_descriptor);
  EXPECT_LT(clock::now() - t0, 2s);  // not from its deadline
}

TEST_P(Close, ClosingAStreamWakesItsParkedReaderAndThePeerSeesTheEnd) {
  Run([&] {
    auto [c, s] = connected_pair();
    expect_close_wakes(c, [&c] {
      char buf[16];
      return error_of(c.read(buf, deadline(10s)));
    });
    char b[4];
    auto end = s.read(b, deadline(1s));
    ASSERT_TRUE(end) << end.error().message();
    EXPECT_EQ(*end, 0u);  // the descriptor was closed once the reader left
  });
}

TEST_P(Close, ClosingAStreamWakesAWriterBlockedOnAFullBuffer) {
  Run([&] {
    auto [c, s] = connected_pair();
    std::atomic<long> sent{0};
    auto writer = spawn([&] {
      std::vector<char> chunk(64 * 1024, 'x');
      for (;;) {  // the peer never reads: the buffers fill, then it parks
        auto n = c.write(chunk, deadline(10s));
        if (!n) return n.error();
        sent += static_cast<long>(*n);
      }
    });
    long seen = -1;
    for (int i = 0; i < 500 && seen != sent.load(); ++i) {  // until it stops making progress
      seen = sent.load();
      (void)this_fiber::sleep_for(10ms);
    }
    auto t0 = clock::now();
    ASSERT_TRUE(c.close());
    EXPECT_EQ(writer.join(), std::errc::bad_file_descriptor);
    EXPECT_LT(clock::now() - t0, 2s);
  });
}

TEST_P(Close, CallsOnAClosedSocketFailWithEbadf) {
  Run([&] {
    auto [c, s] = connected_pair();
    ASSERT_TRUE(c.is_open());
    ASSERT_TRUE(c.close());
    EXPECT_FALSE(c.is_open());
    EXPECT_EQ(c.native_handle(), -1);
    EXPECT_TRUE(c.close());  // closing twice is harmless
    char buf[8];
    EXPECT_EQ(error_of(c.read(buf)), std::errc::bad_file_descriptor);
    EXPECT_EQ(error_of(c.read_pooled()), std::errc::bad_file_descriptor);
    EXPECT_EQ(error_of(c.write_all({buf, sizeof buf})), std::errc::bad_file_descriptor);
    EXPECT_EQ(error_of(c.shutdown()), std::errc::bad_file_descriptor);
    EXPECT_EQ(error_of(c.set_nodelay(true)), std::errc::bad_file_descriptor);
    EXPECT_EQ(error_of(c.peer_address()), std::errc::bad_file_descriptor);
    EXPECT_EQ(error_of(c.local_address()), std::errc::bad_file_descriptor);

    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    ASSERT_TRUE(ln.close());
    EXPECT_EQ(error_of(ln.accept(deadline(1s))), std::errc::bad_file_descriptor);

    tcp_stream empty;
    EXPECT_EQ(error_of(empty.read(buf)), std::errc::bad_file_descriptor);
  });
}

// The closing fiber binds a new listener before the woken acceptor runs:
// the new socket may get the old number. The old acceptor must fail, not
// take (or wait for) the new listener's connection.
TEST_P(Close, AClosedListenersAcceptorNeverTakesTheNextListenersConnection) {
  Run([&] {
    auto ln1 = tcp_listener::bind("127.0.0.1:0").value();
    auto acceptor = spawn([&ln1] { return error_of(ln1.accept(deadline(10s))); });
    (void)this_fiber::sleep_for(30ms);  // parked in accept
    auto t0 = clock::now();
    ASSERT_TRUE(ln1.close());
    auto ln2 = tcp_listener::bind("127.0.0.1:0").value();  // no park in between
    auto c = tcp_stream::connect(addr_of(ln2), deadline(5s));
    ASSERT_TRUE(c) << c.error().message();
    EXPECT_EQ(acceptor.join(), std::errc::bad_file_descriptor);
    EXPECT_LT(clock::now() - t0, 2s);
    auto got = ln2.accept(deadline(5s));  // the connection is still there for ln2
    EXPECT_TRUE(got) << got.error().message();
  });
}

// A connection that arrived before a listener's close() is the parked
// acceptor's even when the close runs first: io_uring's multishot accept
// queued the descriptor and woke the acceptor, and the closing fiber,
// queued ahead of it on the same worker, closes before it runs. The
// acceptor gets the connection (it used to get EBADF, and the connection
// was closed unseen); its next accept gets EBADF. (On epoll, as with Go,
// the acceptor accepts after it runs, when the listener is gone: nothing
// was taken from the kernel for it, and EBADF is its result.)
TEST_P(Close, AnAcceptorWokenByAConnectionGetsItEvenIfACloseRunsFirst) {
  Run([&] {
    if (io::stats().driver != "io_uring") return;
    for (int round = 0; round < 10; ++round) {
      auto ln = tcp_listener::bind("127.0.0.1:0").value();
      // Both on this worker: the close can run between the acceptor's wake
      // and its run only if the two take turns on one worker.
      spawn_options here{.pinned = true, .worker = static_cast<int>(this_fiber::worker_index())};
      auto acceptor = spawn([&ln]() -> std::error_code {
        auto c = ln.accept(deadline(10s));
        if (!c) return c.error();
        if (auto again = ln.accept(deadline(10s)); again)
          return std::make_error_code(std::errc::invalid_argument);
        else if (again.error() != std::errc::bad_file_descriptor)
          return again.error();
        char b;  // the connection is live: the client's byte is there
        auto n = c->read({&b, 1}, deadline(5s));
        if (!n) return n.error();
        return *n == 1 && b == 'x' ? std::error_code() : std::make_error_code(std::errc::io_error);
      }, here);
      int client = -1;
      auto closer = spawn([&ln, &client] {
        (void)this_fiber::sleep_for(20ms);  // the acceptor is parked by now
        const std::uint64_t before = io::stats().accept_queued;
        // A plain blocking connect: queued by the kernel before it returns.
        auto a = ln.local_address().value();
        client = ::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_GE(client, 0);
        ASSERT_EQ(::connect(client, a.get(), a.size()), 0);
        ASSERT_EQ(::write(client, "x", 1), 1);
        // Until the multishot queued it (and woke the acceptor): a yield
        // that goes through the loop reaps it, and this fiber, queued
        // first, runs again before the acceptor.
        for (int i = 0; i < 1'000'000 && io::stats().accept_queued == before; ++i)
          this_fiber::yield();
        EXPECT_GT(io::stats().accept_queued, before);
        EXPECT_TRUE(ln.close());
      }, here);
      closer.join();
      auto got = acceptor.join();
      EXPECT_FALSE(got) << "round " << round << ": " << got.message();
      if (client >= 0) ::close(client);
      EXPECT_EQ(io::stats().accept_queued, 0u);
    }
  });
}

// An accept() that gave up at once (its deadline already past) may have
// armed io_uring's multishot accept on its way; closing the listener and
// binding a new one at the same number right after must not let that
// SQE, if submitted late, take the new listener's connection.
TEST_P(Close, AnAcceptThatGaveUpLeavesNothingBehindForTheNextListener) {
  Run([&] {
    int reused = 0;
    for (int round = 0; round < 10; ++round) {
      auto ln1 = tcp_listener::bind("127.0.0.1:0").value();
      const int number = ln1.native_handle();
      EXPECT_EQ(error_of(ln1.accept(deadline(clock::now() - 1ms))), std::errc::timed_out);
      ASSERT_TRUE(ln1.close());
      auto ln2 = tcp_listener::bind("127.0.0.1:0").value();  // no park in between
      if (ln2.native_handle() != number) continue;
      ++reused;
      // A plain blocking connect: the connection is queued on ln2 before
      // this worker submits anything again (a fiber's connect would let
      // the loop submit first).
      auto a = ln2.local_address().value();
      int c = ::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
      ASSERT_GE(c, 0);
      ASSERT_EQ(::connect(c, a.get(), a.size()), 0);
      auto got = ln2.accept(deadline(2s));
      EXPECT_TRUE(got) << "the connection went elsewhere: " << got.error().message();
      ::close(c);
    }
    EXPECT_GT(reused, 0) << "the number was never reused: nothing was tested";
  });
}

// A listener made elsewhere (inherited, passed, socket-activated) and
// adopted by descriptor.
TEST_P(Close, ClosingAnAdoptedListenerWakesItsAcceptor) {
  Run([&] {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    ASSERT_EQ(::listen(fd, 16), 0);
    tcp_listener ln(fd);
    expect_close_wakes(ln, [&ln] { return error_of(ln.accept(deadline(10s))); });
  });
}

TEST_P(Close, ClosingAUdpSocketWakesItsReceiver) {
  Run([&] {
    auto u = udp_socket::bind("127.0.0.1:0").value();
    expect_close_wakes(u, [&u] {
      char buf[64];
      return error_of(u.recv_from(buf, nullptr, deadline(10s)));
    });
  });
}

// A race hunt (for --config=tsan): a reader and a writer on one stream,
// closed by a third fiber at varying moments. Each call returns data or
// an error at once — nothing hangs — and the reader never gets more bytes
// than the peer sent.
TEST_P(Close, CloseRacingAReaderAndAWriterNeitherHangsNorInventsData) {
  Run([&] {
    for (int round = 0; round < 60; ++round) {
      auto [c, s] = connected_pair();
      std::atomic<long> got{0};
      auto reader = spawn([&] {
        char buf[256];
        for (;;) {
          auto n = c.read(buf, deadline(10s));
          if (!n || *n == 0) return error_of(n);
          got += static_cast<long>(*n);
        }
      });
      long put = 0;
      auto echo = spawn([&] {  // the peer: sends, then waits for the end
        char msg[100] = {};
        for (int i = 0; i < 20; ++i)
          if (s.write_all(msg)) put += sizeof msg;
        char b[8];
        while (auto n = s.read(b, deadline(10s)))
          if (*n == 0) break;
      });
      auto writer = spawn([&] {
        char msg[64] = {};
        for (;;)
          if (auto r = c.write_all(msg, deadline(10s)); !r) return r.error();
      });
      (void)this_fiber::sleep_for(std::chrono::microseconds(100 * (round % 10)));
      auto t0 = clock::now();
      ASSERT_TRUE(c.close());
      auto re = reader.join();
      EXPECT_TRUE(!re || re == std::errc::bad_file_descriptor) << re.message();
      EXPECT_EQ(writer.join(), std::errc::bad_file_descriptor);
      echo.join();
      EXPECT_LE(got.load(), put);
      EXPECT_LT(clock::now() - t0, 5s);
    }
  });
}

// Data that arrived before a close() is the parked reader's even when the
// close runs first: the arrival woke the reader (its chunk queued, the
// reader runnable), and the closing fiber, queued ahead of it on the same
// worker, closes before it runs. The reader gets the bytes; its next call
// gets EBADF. (io_uring's multishot receive queues the chunk; on epoll the
// reader receives after it runs, when the socket is gone: nothing arrived
// for it yet, and EBADF is its result.)
TEST_P(Close, AReaderWokenByDataGetsItEvenIfACloseRunsFirst) {
  Run([&] {
    // See above; WEFT_MULTISHOT_RECV=0 receives once per read, as epoll.
    const char* ms = std::getenv("WEFT_MULTISHOT_RECV");
    if (io::stats().driver != "io_uring" || (ms && std::string(ms) == "0")) return;
    for (int round = 0; round < 20; ++round) {
      auto [c, s] = connected_pair();
      // Both on this worker: the close can run between the reader's wake
      // and its run only if the two take turns on one worker.
      spawn_options here{.pinned = true, .worker = static_cast<int>(this_fiber::worker_index())};
      auto reader = spawn([&c = c]() -> result<std::string> {
        auto b = c.read_pooled(deadline(10s));
        if (!b) return std::unexpected(b.error());
        std::string got(b->data().begin(), b->data().end());
        if (auto again = c.read_pooled(deadline(10s)); again)
          return std::unexpected(std::make_error_code(std::errc::invalid_argument));
        else if (again.error() != std::errc::bad_file_descriptor)
          return std::unexpected(again.error());
        return got;
      }, here);
      auto closer = spawn([&c = c, &s = s] {
        (void)this_fiber::sleep_for(20ms);  // the reader is parked by now
        const std::uint64_t before = io::stats().recv_queued;
        EXPECT_TRUE(s.write_all(std::string_view("hello")));
        // Until the arrival is queued (and the reader woken): a yield that
        // goes through the loop reaps it, and this fiber, queued first,
        // runs again before the reader.
        for (int i = 0; i < 1'000'000 && io::stats().recv_queued == before; ++i)
          this_fiber::yield();
        EXPECT_GT(io::stats().recv_queued, before);
        EXPECT_TRUE(c.close());
      }, here);
      closer.join();
      auto got = reader.join();
      ASSERT_TRUE(got) << "round " << round << ": " << got.error().message();
      EXPECT_EQ(*got, "hello");
    }
  });
}

}  // namespace
}  // namespace weft
