// io/write_behind_test.cc — small writes sent behind the fiber (io_uring;
// *Write-behind* in io/fd_state.h): the bytes arrive whole and in order
// whatever mix of calls sent them, close() and shutdown() send a pending
// write before the end of the stream, its failure comes back from the next
// send, a peer that stops reading makes a later call time out or stop, and
// one left in flight when the runtime ends is cancelled without a leak.
// Every test runs over worker counts {1, 2, 4} (tests/fixture.h), on both
// drivers and on io_uring with write-behind turned on (io/BUILD.bazel:
// //io:write_behind_test_write_behind; it is opt-in, so the other two
// send every write at once and check that nothing here depends on it),
// on 127.0.0.1.
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "io/fd_state.h"
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
using testing::byte_at;
using testing::scoped_env;
using testing::stream_part;
using testing::write_behind_on;

class WriteBehind : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(WriteBehind);

// Reads until end of stream (or 10 s), appending to *out.
void read_to_end(tcp_stream& s, std::string* out) {
  char buf[8192];
  auto until = clock::now() + 10s;
  while (clock::now() < until) {
    auto n = s.read(buf, deadline(until));
    if (!n || *n == 0) return;
    out->append(buf, *n);
  }
}

// Shrinks both ends' buffers so that a peer that does not read fills them
// after a few KiB, not megabytes.
void small_buffers(tcp_stream& writer, tcp_stream& reader) {
  int v = 4096;
  ASSERT_EQ(::setsockopt(writer.native_handle(), SOL_SOCKET, SO_SNDBUF, &v, sizeof v), 0);
  ASSERT_EQ(::setsockopt(reader.native_handle(), SOL_SOCKET, SO_RCVBUF, &v, sizeof v), 0);
}

TEST_P(WriteBehind, SmallWritesLargeWritesAndGatherWritesArriveWholeAndInOrder) {
  Run([&] {
    auto [c, s] = connected_pair();
    const std::uint64_t behind_before = io::stats().written_behind;
    std::string got;
    auto reader = spawn([&, &s = s] { read_to_end(s, &got); });
    std::size_t off = 0;
    for (int i = 0; i < 3000; ++i) {
      if (i % 97 == 0) {  // larger than kWriteBehindMax: sent while the fiber waits
        std::string big = stream_part(off, 20'000);
        ASSERT_TRUE(c.write_all(big, deadline(10s)));
        off += big.size();
      } else if (i % 89 == 0) {  // a gather write after a write-behind
        std::string a = stream_part(off, 100), b = stream_part(off + 100, 57);
        iovec iov[2] = {{a.data(), a.size()}, {b.data(), b.size()}};
        auto n = c.writev(iov, deadline(10s));
        ASSERT_TRUE(n) << n.error().message();
        ASSERT_EQ(*n, 157u);  // loopback has room for 157 bytes
        off += 157;
      } else {
        std::string m = stream_part(off, 1 + (i * 37) % 600);
        ASSERT_TRUE(c.write_all(m, deadline(10s)));
        off += m.size();
      }
      if (i % 500 == 0) this_fiber::yield();  // let the reader in, and maybe move
    }
    ASSERT_TRUE(c.shutdown(SHUT_WR));
    reader.join();
    ASSERT_EQ(got.size(), off);
    EXPECT_TRUE(got == stream_part(0, off)) << "the stream's bytes are out of order";
    const std::uint64_t behind = io::stats().written_behind - behind_before;
    if (write_behind_on())
      EXPECT_GT(behind, 2000u);  // the small writes did not park
    else
      EXPECT_EQ(behind, 0u);
  });
}

TEST_P(WriteBehind, CloseSendsAPendingWriteBeforeTheEndOfTheStream) {
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    for (int i = 0; i < 50; ++i) {
      auto c = tcp_stream::connect(addr_of(ln)).value();
      auto s = ln.accept().value();
      std::string msg = stream_part(i, 100 + i);
      ASSERT_TRUE(c.write_all(msg));
      ASSERT_TRUE(c.close());  // right after: the send may not even be submitted yet
      std::string got;
      read_to_end(s, &got);
      ASSERT_EQ(got, msg) << "round " << i;
    }
  });
}

TEST_P(WriteBehind, ADestroyedStreamSendsAPendingWriteBeforeTheEndOfTheStream) {
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    for (int i = 0; i < 20; ++i) {
      auto s = [&] {
        auto c = tcp_stream::connect(addr_of(ln)).value();
        auto s = ln.accept().value();
        EXPECT_TRUE(c.write_all(stream_part(i, 300)));
        return s;  // c's destructor closes it
      }();
      std::string got;
      read_to_end(s, &got);
      ASSERT_EQ(got, stream_part(i, 300)) << "round " << i;
    }
  });
}

TEST_P(WriteBehind, ShutdownSendsAPendingWriteBeforeTheEndOfTheStream) {
  Run([&] {
    auto [c, s] = connected_pair();
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(c.write_all(stream_part(i * 10, 10)));
    ASSERT_TRUE(c.shutdown(SHUT_WR));
    std::string got;
    read_to_end(s, &got);
    std::string want;
    for (int i = 0; i < 20; ++i) want += stream_part(i * 10, 10);
    EXPECT_EQ(got, want);
  });
}

TEST_P(WriteBehind, APeerThatStopsReadingMakesALaterWriteTimeOut) {
  Run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::string chunk(1000, 'x');
    std::optional<std::error_code> failed;
    auto t0 = clock::now();
    for (int i = 0; i < 100'000 && !failed && clock::now() - t0 < 20s; ++i) {
      auto r = c.write(chunk, deadline(100ms));
      if (!r) failed = r.error();
    }
    ASSERT_TRUE(failed) << "no write ever waited for the full buffers";
    EXPECT_EQ(*failed, std::errc::timed_out) << failed->message();
    // close() waits for the write still pending only until its deadline,
    // which has passed: it cancels it and returns at once.
    auto t1 = clock::now();
    (void)c.close();
    EXPECT_LT(clock::now() - t1, 2s);
    // ... and the descriptor is closed once the cancel completes: the peer
    // reads what got through, then ECONNRESET (the send was cut short after
    // the close, so fd_state::on_write_behind_done() reset the connection),
    // then the end of the stream.
    std::string got;
    read_to_end(s, &got);
    char b;
    auto end = s.read({&b, 1}, deadline(1s));
    ASSERT_TRUE(end) << end.error().message();
    EXPECT_EQ(*end, 0u);
  });
}

TEST_P(WriteBehind, AStopRequestEndsAWriteWaitingForAnEarlierOne) {
  Run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::atomic<bool> started{false};
    auto writer = spawn([&, &c = c] {
      std::string chunk(1000, 'x');
      started = true;
      for (;;) {  // no deadline: only the stop request ends it
        auto r = c.write(chunk);
        if (!r) return r.error();
      }
    });
    while (!started) this_fiber::yield();
    (void)this_fiber::sleep_for(200ms);  // long enough to fill the buffers and park
    auto t0 = clock::now();
    writer.request_stop();
    EXPECT_EQ(writer.join(), std::errc::operation_canceled);
    EXPECT_LT(clock::now() - t0, 2s);
  });
}

// A room dropping a peer that stopped reading (examples/chat_server): the
// shutdown and close of another fiber do not wait for the writer's stuck
// write-behind, and the writer's wait ends with the stream's failure.
TEST_P(WriteBehind, AnotherFibersShutdownAndCloseDoNotWaitForAStuckWrite) {
  Run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::atomic<bool> stuck{false};
    auto writer = spawn([&, &c = c] {
      std::string chunk(1000, 'x');
      for (;;) {
        auto t0 = clock::now();
        auto r = c.write(chunk, deadline(60s));
        if (!r) return r.error();
        if (clock::now() - t0 > 50ms) stuck = true;  // it waited: the buffers are full
      }
    });
    for (int i = 0; i < 400 && !stuck; ++i) (void)this_fiber::sleep_for(5ms);
    (void)this_fiber::sleep_for(50ms);  // parked in its next write by now
    auto t0 = clock::now();
    EXPECT_TRUE(c.shutdown(SHUT_RDWR));
    EXPECT_LT(clock::now() - t0, 1s) << "shutdown waited for another fiber's write";
    auto e = writer.join();
    EXPECT_LT(clock::now() - t0, 5s) << "the writer's wait outlived the shutdown";
    EXPECT_TRUE(e == std::errc::broken_pipe || e == std::errc::connection_reset ||
                e == std::errc::bad_file_descriptor)
        << e.message();
    auto t1 = clock::now();
    (void)c.close();
    EXPECT_LT(clock::now() - t1, 1s);
  });
}

// Sends the stream's first bytes on c, without waiting, until the kernel
// has taken no more for 50 ms (both ends' buffers are full: a later send
// waits for the peer to read); returns how many it took.
std::size_t fill_with_stream(tcp_stream& c) {
  std::size_t off = 0;
  for (auto quiet_since = clock::now(); clock::now() - quiet_since < 50ms;) {
    std::string part = stream_part(off, 512);
    ssize_t n = ::send(c.native_handle(), part.data(), part.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<std::size_t>(n);
      quiet_since = clock::now();
    } else {
      (void)this_fiber::sleep_for(5ms);
    }
  }
  return off;
}

// Reads s to its end (10 s at most). The writer sent the stream's first
// `sent` bytes, perhaps cut short after its side was ended: then the
// connection must be reset (ECONNRESET after what arrived), never ended
// cleanly with bytes missing. Returns whether it was reset.
bool read_whole_or_reset(tcp_stream& s, std::size_t sent) {
  char buf[8192];
  std::string got;
  auto until = clock::now() + 10s;
  for (;;) {
    auto n = s.read(buf, deadline(until));
    if (!n) {
      EXPECT_EQ(n.error(), std::errc::connection_reset) << n.error().message();
      EXPECT_TRUE(got == stream_part(0, got.size())) << "the bytes that arrived are not the stream's";
      return n.error() == std::errc::connection_reset;
    }
    if (*n == 0) {
      EXPECT_EQ(got.size(), sent) << "a clean end of stream with bytes missing";
      EXPECT_TRUE(got == stream_part(0, got.size())) << "the bytes that arrived are not the stream's";
      return false;
    }
    got.append(buf, *n);
  }
}

// What the slow reader got is the stream's first `sent` bytes, whole.
void expect_whole_stream(const std::string& got, std::size_t sent) {
  EXPECT_EQ(got.size(), sent) << "bytes a write returned for never arrived";
  EXPECT_TRUE(got == stream_part(0, got.size()));
}

// Reads s to its end into *got, starting after 200 ms (slow: the writer's
// buffers stay full a while).
join_handle<void> slow_reader(tcp_stream& s, std::string* got) {
  return spawn([&s, got] {
    (void)this_fiber::sleep_for(200ms);
    read_to_end(s, got);
  });
}

// A write that returned is the kernel's to deliver, as in Go and Tokio:
// the stream moved to another fiber, which closes it while the peer is
// still slow to read, must not take the written bytes back.
TEST_P(WriteBehind, AStreamMovedToAnotherFiberAndClosedSendsAWriteThatReturned) {
  Run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::string got;
    auto reader = slow_reader(s, &got);
    std::size_t off = fill_with_stream(c);
    const std::string tail = stream_part(off, 100);
    auto w = c.write(tail, deadline(10s));
    ASSERT_TRUE(w);
    ASSERT_EQ(*w, tail.size());
    off += tail.size();
    auto closer = spawn([c = std::move(c)]() mutable { return c.close(); });
    auto closed = closer.join();
    EXPECT_TRUE(closed) << closed.error().message();
    reader.join();
    expect_whole_stream(got, off);
  });
}

// Another fiber's shutdown(SHUT_WR) while a write-behind waits for room:
// the end of the stream follows the bytes the write returned for, and a
// later write fails with EPIPE.
TEST_P(WriteBehind, AnotherFibersShutdownSendsAWriteThatReturnedBeforeTheEnd) {
  Run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::string got;
    auto reader = slow_reader(s, &got);
    std::size_t off = fill_with_stream(c);
    const std::string tail = stream_part(off, 100);
    ASSERT_TRUE(c.write(tail, deadline(10s)));
    off += tail.size();
    auto other = spawn([&, &c = c] { return c.shutdown(SHUT_WR); });
    auto t0 = clock::now();
    auto shut = other.join();
    EXPECT_TRUE(shut) << shut.error().message();
    EXPECT_LT(clock::now() - t0, 1s) << "shutdown waited for another fiber's write";
    auto later = c.write(tail, deadline(5s));
    ASSERT_FALSE(later) << "a write after shutdown(SHUT_WR) succeeded";
    EXPECT_EQ(later.error(), std::errc::broken_pipe) << later.error().message();
    auto closed = c.close();  // the writer's own: no failure (its bytes still go)
    EXPECT_TRUE(closed) << closed.error().message();
    reader.join();
    expect_whole_stream(got, off);
  });
}

// shutdown() with a `how` that is none of SHUT_RD, SHUT_WR and SHUT_RDWR is
// invalid_argument, as shutdown(2)'s EINVAL, and ends nothing: not while
// another fiber's write-behind is in flight either. Before, that case
// returned success and ended the stream (SHUT_WR) once the write-behind
// had gone, so the next write failed with EPIPE and the peer read an end
// of stream nobody had asked for.
TEST_P(WriteBehind, AShutdownWithABadHowIsInvalidArgumentAndEndsNothing) {
  Run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::string got;
    auto reader = slow_reader(s, &got);
    std::size_t off = fill_with_stream(c);
    const std::string tail = stream_part(off, 100);
    ASSERT_TRUE(c.write(tail, deadline(10s)));
    off += tail.size();
    auto other = spawn([&, &c = c] { return c.shutdown(SHUT_RDWR + 40); });
    auto shut = other.join();
    ASSERT_FALSE(shut) << "shutdown(42) succeeded";
    EXPECT_EQ(shut.error(), std::errc::invalid_argument) << shut.error().message();
    const std::string more = stream_part(off, 100);
    auto later = c.write_all(more, deadline(10s));
    ASSERT_TRUE(later) << "a write after a refused shutdown: " << later.error().message();
    off += more.size();
    auto closed = c.close();
    EXPECT_TRUE(closed) << closed.error().message();
    reader.join();
    expect_whole_stream(got, off);
  });
}

// A write-behind that outlives another fiber's close() goes on only until
// its write's deadline: a peer that never reads does not keep the
// descriptor (or the copy) for ever. (Without write-behind the write
// itself may time out; then there is nothing to outlive the close.)
TEST_P(WriteBehind, AWriteOutlivingAnotherFibersCloseEndsAtItsDeadline) {
  Run([&] {
    const int fds_before = testing::open_fds();
    std::size_t off = 0;
    std::string tail;
    std::optional<tcp_stream> peer;  // open and never read until the end
    {
      auto [c, s] = connected_pair();
      small_buffers(c, s);
      off = fill_with_stream(c);
      tail = stream_part(off, 100);
      auto w = c.write(tail, deadline(1s));
      if (write_behind_on()) {
        ASSERT_TRUE(w) << w.error().message();
      }
      auto closer = spawn([c = std::move(c)]() mutable { return c.close(); });
      auto t0 = clock::now();
      EXPECT_TRUE(closer.join());
      EXPECT_LT(clock::now() - t0, 500ms) << "close() waited for another fiber's write";
      peer = std::move(s);
    }
    if (fds_before >= 0) {
      // The lingering send holds the writer's descriptor until it ends: at
      // its write's deadline, since the peer does not read.
      auto until = clock::now() + 5s;
      while (testing::open_fds() != fds_before + 1 && clock::now() < until)
        (void)this_fiber::sleep_for(20ms);
      EXPECT_EQ(testing::open_fds(), fds_before + 1) << "the lingering send kept its descriptor";
    }
    // Cut short after the close (unless the peer's window let it go), it
    // reset the connection: never a clean end missing the tail.
    if (write_behind_on()) (void)read_whole_or_reset(*peer, off + tail.size());
    peer.reset();
  });
}

// With no deadline on its write, a send that outlives another fiber's
// close() ends at the linger cap (WEFT_LINGER_MS, 60 s by default), not
// when the runtime does: a peer that never reads must not hold the
// descriptor and the copy for ever (a chat room's timeout fiber dropping a
// stalled peer whose writer was stuck).
TEST_P(WriteBehind, AWriteWithNoDeadlineOutlivingAnotherFibersCloseEndsAtTheLingerCap) {
  scoped_env linger("WEFT_LINGER_MS", "300");  // read when the runtime starts
  bool skipped = false;
  Run([&] {
    if (!write_behind_on()) {  // the write itself would wait
      skipped = true;
      return;
    }
    // A peer's window update can let the tail go before the close: then
    // nothing lingers, and the test tries again.
    bool lingered = false;
    for (int attempt = 0; attempt < 3 && !lingered; ++attempt) {
      const int fds_before = testing::open_fds();
      std::optional<tcp_stream> peer;  // open and never read until the send ended
      clock::time_point closing;       // before the close: the cap counts from later
      std::size_t sent = 0;
      {
        auto [c, s] = connected_pair();
        small_buffers(c, s);
        const std::size_t off = fill_with_stream(c);
        const std::string tail = stream_part(off, 2000);
        auto w = c.write(tail);  // no deadline
        ASSERT_TRUE(w) << w.error().message();
        sent = off + tail.size();
        closing = clock::now();
        auto closer = spawn([c = std::move(c)]() mutable { return c.close(); });
        EXPECT_TRUE(closer.join());
        peer = std::move(s);
      }
      // The peer reads only once the send ended: reading earlier opens its
      // window, and the sender's next zero-window probe (its timing is the
      // kernel's backoff, some hundreds of ms on loopback) would let the
      // tail go before the cap, so whether the test saw a linger would be
      // a race with that probe (a loaded machine).
      clock::duration ended_after{};
      if (fds_before >= 0) {
        auto until = clock::now() + 5s;
        while (testing::open_fds() != fds_before + 1 && clock::now() < until)
          (void)this_fiber::sleep_for(5ms);
        ended_after = clock::now() - closing;
      } else {
        (void)this_fiber::sleep_for(1s);  // well past the cap
      }
      // The tail went before the close (the peer's window let it): a clean
      // end with every byte, and nothing lingered; the test tries again.
      lingered = read_whole_or_reset(*peer, sent);
      if (!lingered) continue;
      if (fds_before >= 0) {
        EXPECT_EQ(testing::open_fds(), fds_before + 1)
            << "a send with no deadline kept its descriptor past the linger cap";
        EXPECT_GE(ended_after, 300ms) << "the send did not linger";
      }
    }
    EXPECT_TRUE(lingered) << "the write never stayed in flight past the close: nothing tested";
  });
  if (skipped) GTEST_SKIP() << "no write-behind here";
}

// A lingering send that ends (the peer reads again) takes its timer with
// it: a server that drops many stalled peers keeps no timer per dropped
// peer for the linger cap's 60 s.
TEST_P(WriteBehind, ALingeringSendThatEndsTakesItsTimerWithIt) {
  bool skipped = false;
  Run([&] {
    if (!write_behind_on()) {
      skipped = true;
      return;
    }
    const std::uint64_t timers_before = io::stats().linger_timers;
    bool lingered = false;
    for (int attempt = 0; attempt < 3 && !lingered; ++attempt) {
      auto [c, s] = connected_pair();
      small_buffers(c, s);
      const std::size_t off = fill_with_stream(c);
      const std::string tail = stream_part(off, 2000);
      ASSERT_TRUE(c.write(tail));  // no deadline: the cap (60 s) bounds it
      auto closer = spawn([c = std::move(c)]() mutable { return c.close(); });
      EXPECT_TRUE(closer.join());
      // Armed by the close, unless the tail went first (then try again).
      auto until = clock::now() + 1s;
      while (io::stats().linger_timers == timers_before && clock::now() < until)
        (void)this_fiber::sleep_for(5ms);
      lingered = io::stats().linger_timers > timers_before;
      std::string got;
      read_to_end(s, &got);  // the send ends
      expect_whole_stream(got, off + tail.size());
      if (!lingered) continue;
      until = clock::now() + 5s;
      while (io::stats().linger_timers != timers_before && clock::now() < until)
        (void)this_fiber::sleep_for(5ms);
      EXPECT_EQ(io::stats().linger_timers, timers_before)
          << "the timer of a send that ended stays armed";
    }
    EXPECT_TRUE(lingered) << "the write never stayed in flight past the close: nothing tested";
  });
  if (skipped) GTEST_SKIP() << "no write-behind here";
}

// Another fiber's shutdown(SHUT_WR) defers the end of the stream to the
// send in flight; if that send is then cut short (its write's deadline),
// the connection is reset instead: the peer must not take the stream as
// complete. A later write fails.
TEST_P(WriteBehind, AWriteCutShortAfterAnotherFibersShutdownResetsTheConnection) {
  bool skipped = false;
  Run([&] {
    if (!write_behind_on()) {  // the write itself times out
      skipped = true;
      return;
    }
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    const std::size_t off = fill_with_stream(c);
    ASSERT_TRUE(c.write(stream_part(off, 100), deadline(300ms)));
    auto other = spawn([&, &c = c] { return c.shutdown(SHUT_WR); });
    EXPECT_TRUE(other.join());
    (void)this_fiber::sleep_for(600ms);  // past the write's deadline: cut
    auto later = c.write(std::string(10, 'u'), deadline(1s));
    ASSERT_FALSE(later) << "a write after the shutdown succeeded";
    EXPECT_TRUE(later.error() == std::errc::broken_pipe ||
                later.error() == std::errc::connection_reset)
        << later.error().message();
    (void)read_whole_or_reset(s, off + 100);
    (void)c.close();
  });
  if (skipped) GTEST_SKIP() << "no write-behind here";
}

// Another thread's shutdown(SHUT_WR) racing a writer's small writes (sent
// behind the fiber): a write that returned success either goes before the
// end of the stream or the connection is reset; never a clean end of stream
// without its bytes. (Found writing io/socket_soak_test.cc: shutdown()
// looked for a write-behind in flight, found none, and only then stopped
// new ones from starting, so one that started in between was refused by
// shutdown(2) after its write had returned, and the peer read a clean end
// with it missing; this test caught that in about half of its runs, with
// 4 workers.)
TEST_P(WriteBehind, AShutdownRacingSmallWritesNeverEndsTheStreamCleanlyWithoutThem) {
  Run([&] {
    const auto until = clock::now() + 2s;
    std::mt19937_64 r(std::random_device{}());
    int rounds = 0;
    for (; clock::now() < until; ++rounds) {
      auto [c, s] = connected_pair();
      std::size_t acked = 0, got = 0;
      bool clean = false;
      std::atomic<bool> writing{false};
      auto peer = spawn([&, &s = s] {
        char buf[16384];
        for (;;) {
          auto n = s.read(buf, deadline(10s));
          if (!n) return;
          if (*n == 0) {
            clean = true;
            return;
          }
          got += *n;
        }
      });
      auto writer = spawn([&, &c = c] {
        const std::string part(64, 'w');
        for (int i = 0; i < 20000; ++i) {
          if (i == 8) writing = true;
          if (!c.write(part)) break;
          acked += part.size();
        }
        writing = true;
      });
      const unsigned spin = static_cast<unsigned>(r() % 20000);
      std::thread shut([&, &c = c, spin] {
        while (!writing.load()) std::this_thread::yield();
        for (unsigned i = 0; i < spin; ++i) asm volatile("");
        (void)c.shutdown(SHUT_WR);
      });
      writer.join();
      peer.join();
      shut.join();
      (void)c.close();
      if (clean && got < acked) {
        ADD_FAILURE() << "round " << rounds << ": the peer read a clean end after " << got
                      << " bytes; writes that returned sent " << acked;
        break;
      }
    }
  });
}

TEST_P(WriteBehind, AFailedWriteBehindIsReportedByALaterSend) {
  Run([&] {
    auto [c, s] = connected_pair();
    ASSERT_TRUE(s.close());
    std::string chunk(512, 'x');
    std::optional<std::error_code> failed;
    for (int i = 0; i < 400 && !failed; ++i) {
      auto r = c.write_all(chunk, deadline(5s));
      if (!r) failed = r.error();
      (void)this_fiber::sleep_for(1ms);
    }
    ASSERT_TRUE(failed) << "writes to a closed peer never failed";
    EXPECT_TRUE(*failed == std::errc::broken_pipe || *failed == std::errc::connection_reset)
        << failed->message();
  });
}

// flush() hands a small write's bytes to the kernel, so a send of the
// program's own on native_handle() comes after them; with nothing in flight
// it returns at once.
TEST_P(WriteBehind, FlushLetsARawSendFollowASmallWrite) {
  Run([&] {
    auto [c, s] = connected_pair();
    EXPECT_TRUE(c.flush(deadline(5s)));  // nothing written yet
    const std::string first = "first;", raw = "raw;";
    for (int i = 0; i < 50; ++i) {
      ASSERT_TRUE(c.write(first, deadline(5s)));
      auto f = c.flush(deadline(5s));
      ASSERT_TRUE(f) << f.error().message();
      ASSERT_EQ(::send(c.native_handle(), raw.data(), raw.size(), MSG_NOSIGNAL),
                static_cast<ssize_t>(raw.size()));
    }
    ASSERT_TRUE(c.shutdown(SHUT_WR));
    std::string got, want;
    for (int i = 0; i < 50; ++i) want += first + raw;
    read_to_end(s, &got);
    EXPECT_EQ(got, want);
  });
}

// After shutdown(SHUT_WR) a write fails at once, as the kernel's own
// send does, not one call later.
TEST_P(WriteBehind, AWriteAfterShutdownFailsAtOnce) {
  Run([&] {
    auto [c, s] = connected_pair();
    const std::string before = "before", after = "after";
    ASSERT_TRUE(c.write_all(before, deadline(5s)));
    ASSERT_TRUE(c.shutdown(SHUT_WR));
    auto r = c.write(after, deadline(5s));
    ASSERT_FALSE(r) << "a write after shutdown(SHUT_WR) succeeded";
    EXPECT_EQ(r.error(), std::errc::broken_pipe) << r.error().message();
    std::string got;
    read_to_end(s, &got);
    EXPECT_EQ(got, before);
  });
}

// A Unix stream's write to a peer already gone fails at once (EPIPE) unless
// WEFT_WRITE_BEHIND=1 asked for write-behind on every stream: by default
// only TCP's writes go behind the fiber.
TEST_P(WriteBehind, AUnixStreamSendsBehindOnlyWhenAskedFor) {
  Run([&] {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    tcp_stream a(sv[0]);
    ::close(sv[1]);
    const std::uint64_t behind_before = io::stats().written_behind;
    const std::string x = "x";
    auto r = a.write(x, deadline(5s));
    const char* v = std::getenv("WEFT_WRITE_BEHIND");
    const bool all = io::stats().driver == "io_uring" && v && std::string(v) == "1";
    if (all) {
      EXPECT_TRUE(r);  // queued; its failure comes with the next send
      auto again = a.write(x, deadline(5s));
      ASSERT_FALSE(again);
      EXPECT_EQ(again.error(), std::errc::broken_pipe) << again.error().message();
    } else {
      ASSERT_FALSE(r) << "a first write to a gone Unix peer succeeded";
      EXPECT_EQ(r.error(), std::errc::broken_pipe) << r.error().message();
      EXPECT_EQ(io::stats().written_behind, behind_before);
    }
  });
}

// Another thread's close() or shutdown(SHUT_WR) racing a writer that is
// about to wait for its own stuck write-behind (its next write): the
// writer's call ends at once (EBADF, EPIPE), as a blocked send would, not
// when the lingering send ends (here at its write's deadline, 400 ms; the
// linger cap, 60 s, for a write with no deadline). The stream's end once
// found no writer to wake when it came after the writer had looked (no
// failure yet) and before its park published it as the waiter, which then
// slept until the send ended. A fiber spawned just before the write runs
// first when the writer parks (the hand-off), binding a stack before the
// park is published, which widens that window; random delays move the end
// across it. Skipped without write-behind.
TEST_P(WriteBehind, AWriterAboutToWaitForItsStuckWriteWakesAtAnotherThreadsEnd) {
  bool skipped = false;
  Run([&] {
    if (!write_behind_on()) {
      skipped = true;
      return;
    }
    std::mt19937_64 r(std::random_device{}());
    // One thread ends each round's stream, `spin` iterations after the
    // round starts.
    std::atomic<int> round{-1}, ended{-1};
    std::atomic<tcp_stream*> target{nullptr};
    std::atomic<bool> by_close{true}, quit{false};
    std::atomic<unsigned> spin{0};
    std::thread other([&] {
      for (int seen = -1; !quit.load();) {
        const int n = round.load();
        if (n == seen) continue;
        seen = n;
        for (unsigned i = 0, k = spin.load(); i < k; ++i) asm volatile("");
        if (by_close.load()) (void)target.load()->close();
        else (void)target.load()->shutdown(SHUT_WR);
        ended.store(n);
      }
    });
    const auto until = clock::now() + 3s;
    int rounds = 0;
    for (bool slow = false; clock::now() < until && !slow; ++rounds) {
      auto [c, s] = connected_pair();
      small_buffers(c, s);
      const std::size_t off = fill_with_stream(c);
      ASSERT_TRUE(c.write(stream_part(off, 100), deadline(400ms)));  // behind, stuck
      target = &c;
      by_close = rounds % 2 == 0;
      spin = static_cast<unsigned>(r() % 3000);
      // Runs first when the writer parks (the hand-off), binding a stack
      // of its own before the writer's park is published: that widens the
      // window.
      auto first = spawn([] {}, {.stack_size = 8u << 20});
      round = rounds;
      const auto t0 = clock::now();
      auto w = c.write(std::string(10, 'u'), deadline(5s));
      const auto took = clock::now() - t0;
      while (ended.load() != rounds) {
      }
      first.join();
      if (w) continue;  // the tail went after all: nothing was waited for
      EXPECT_TRUE(w.error() == std::errc::bad_file_descriptor ||
                  w.error() == std::errc::broken_pipe)
          << w.error().message();
      if (took > 250ms) {
        slow = true;
        ADD_FAILURE() << "round " << rounds << " (" << (by_close ? "close" : "shutdown")
                      << "): the writer's call waited "
                      << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                      << " ms for the lingering send after the stream was ended";
      }
    }
    quit = true;
    other.join();
  });
  if (skipped) GTEST_SKIP() << "no write-behind here";
}

// A stream that outlives weft::run() with a write still in flight to a peer
// that does not read: the worker cancels it as the runtime ends, so the
// copy and the descriptor are freed (ASan's leak check) and destroying the
// stream afterwards, off any runtime, is harmless.
TEST(WriteBehindEnd, AWriteInFlightWhenTheRuntimeEndsIsCancelled) {
  const int fds_before = testing::open_fds();
  std::optional<tcp_stream> kept_c, kept_s;
  int rc = weft::run([&] {
    auto [c, s] = connected_pair();
    small_buffers(c, s);
    std::string chunk(1000, 'x');
    for (int i = 0; i < 100'000; ++i) {
      auto r = c.write(chunk, deadline(50ms));
      if (!r) break;  // a write-behind is now waiting for room that never comes
    }
    kept_c = std::move(c);
    kept_s = std::move(s);
    return 0;
  });
  EXPECT_EQ(rc, 0);
  kept_c.reset();
  kept_s.reset();
  if (fds_before >= 0) {
    EXPECT_EQ(testing::open_fds(), fds_before);
  }
}

// A timed cancel outlives the write-behind it was for when that send ends
// first (the peer read): its key (the fd_state's address, the send's
// 16-bit number on its thread) must not then cancel a later send that has
// the same key: a new fd_state at the freed address, 65536 write-behinds
// later on the same thread. (The send's end now also cancels its timer;
// the pairing in the driver, linger_met(), is what covers a timer that
// fires before that cancel goes in.) One worker, so every send is on one
// thread; skipped where the allocator does not hand the address back at
// once (ASan's quarantine), or where the tail went at once.
TEST(WriteBehindLinger, AStaleTimedCancelSparesALaterSendWithTheSameKey) {
  bool skipped = false;
  int rc = weft::run([&] {
    if (!write_behind_on()) {
      skipped = true;
      return 0;
    }
    io::io_driver* drv = io::current_driver();
    auto [c1, s1] = connected_pair();
    auto [c2, s2] = connected_pair();
    auto [c3, s3] = connected_pair();
    small_buffers(c1, s1);
    small_buffers(c3, s3);
    auto drain = [](tcp_stream& s, clock::duration quiet) {
      char buf[8192];
      while (true) {
        auto n = s.read(buf, deadline(quiet));
        if (!n || *n == 0) return;
      }
    };
    // As large as a write-behind goes: a smaller one may still fit the
    // buffers fill_with_stream() left (a window update after its 50 ms).
    const std::string tail(io::kWriteBehindMax, 't');
    // A: a send waiting for room, lingering after another fiber's close(),
    // with a timed cancel at its write's deadline.
    (void)fill_with_stream(c1);
    auto* a = new io::fd_state(::dup(c1.native_handle()));
    const auto a_deadline = clock::now() + 4s;
    EXPECT_TRUE(a->start_write_behind(*drv, tail, a_deadline));
    auto closer = spawn([a] { return a->close(); });
    EXPECT_TRUE(closer.join());
    if (!a->write_behind_unsent()) {  // it went at once: nothing lingers
      a->release();
      skipped = true;
      return 0;
    }
    const auto a_addr = reinterpret_cast<std::uintptr_t>(a);
    a->release();  // freed when its send ends
    // Its send ends (the peer reads): *a is freed, its timed cancel stays.
    const int fds_a = testing::open_fds();
    auto r1 = spawn([&, &s1 = s1] { drain(s1, 2s); });
    for (auto until = clock::now() + 3s; testing::open_fds() == fds_a && clock::now() < until;)
      (void)this_fiber::sleep_for(1ms);
    // C at A's address.
    io::fd_state* c = nullptr;
    std::vector<io::fd_state*> others;
    for (int i = 0; i < 256 && !c; ++i) {
      auto* t = new io::fd_state(::dup(c3.native_handle()));
      if (reinterpret_cast<std::uintptr_t>(t) == a_addr) c = t;
      else others.push_back(t);
    }
    for (io::fd_state* t : others) {
      (void)t->close();
      t->release();
    }
    if (!c) {
      // The drain of s1 uses this frame's s1: end it before leaving (a
      // reader woken by data keeps reading, after s1's destruction too).
      (void)s1.close();
      r1.join();
      skipped = true;
      return 0;
    }
    // 65535 write-behinds on this thread, then C's has A's number mod 2^16.
    auto reader = spawn([&, &s2 = s2] { drain(s2, 1s); });
    auto* b = new io::fd_state(::dup(c2.native_handle()));
    for (int i = 0; i < 65535; ++i) {
      if (clock::now() > a_deadline - 1s) break;  // too slow here (a sanitizer): skipped below
      if (!b->start_write_behind(*drv, "x", clock::time_point::max())) {
        ADD_FAILURE() << "write-behind " << i << " did not start";
        break;
      }
      EXPECT_TRUE(b->settle(clock::now() + 5s, std::source_location::current(), false));
    }
    (void)b->close();
    b->release();
    c2.close().value();
    reader.join();
    (void)s1.close();
    r1.join();
    if (clock::now() > a_deadline - 1s) {
      skipped = true;  // too slow here: A's cancel may have fired already
    } else {
      // C's peer window is shut from its fill until the drain below. Kept
      // short (under a second): the sender learns that the window opened
      // only from its next zero-window probe (TCP's persist timer, which
      // backs off: ~4 s apart after ~4 s shut), not from the drain.
      (void)this_fiber::sleep_until(a_deadline - 500ms);
      (void)fill_with_stream(c3);
      EXPECT_TRUE(c->start_write_behind(*drv, tail, clock::now() + 30s));
      (void)this_fiber::sleep_until(a_deadline + 300ms);  // A's stale cancel fires
      // Still in flight, unless the peer's window let the tail go early
      // (fill_with_stream() is not exact): then nothing was there to spare.
      const bool in_flight = c->write_behind_unsent();
      // To the end of the stream (both of the socket's descriptors close
      // below), not to a quiet spell: the probe may be seconds away.
      auto r = spawn([&, &s3 = s3] { drain(s3, 30s); });
      // A cancel would end it at once with ECANCELED; sent whole, it settles
      // clean, at the sender's next probe at the latest (the long deadline
      // only bounds a hang, it is not waited out).
      auto settled = c->settle(clock::now() + 20s, std::source_location::current(), false);
      EXPECT_TRUE(settled) << "another send's timed cancel ended C's: " << settled.error().message();
      (void)c->close();
      (void)c3.close();
      r.join();
      if (!in_flight) skipped = true;
    }
    if (!c->closed()) (void)c->close();
    c->release();
    return 0;
  }, {.workers = 1});
  EXPECT_EQ(rc, 0);
  if (skipped) GTEST_SKIP() << "no write-behind, the address was not reused, or a tail went at once";
}

}  // namespace
}  // namespace weft
