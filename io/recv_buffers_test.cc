// io/recv_buffers_test.cc — the lifecycle of pooled receive buffers under
// stress: readers that move between workers while they hold buffers, read
// kinds mixed on one stream, the pool running dry, closes racing readers,
// buffers released from plain threads and the blocking pool. Every byte is
// checked against its connection's pattern, so a buffer handed to two
// receives shows up as corruption. Runs over worker counts {1, 2, 4}.
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <string>
#include <string_view>
#include <thread>
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
using testing::multishot_recv_on;

class RecvBuffers : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(RecvBuffers);

// Byte i of connection k's stream.
std::string part(int k, std::size_t from, std::size_t n) {
  return testing::stream_part(from + static_cast<std::size_t>(k) * 1000003, n);
}

struct held {
  std::size_t at;
  pooled_buffer b;
};

// Reads `total` bytes of connection k by read_pooled(), read() and readv()
// in turns, holding up to `keep` pooled buffers across yields, and checks
// every byte, also of each held buffer again when it is dropped.
void read_mixed(tcp_stream& s, int k, std::size_t total, std::size_t keep, int& spoiled) {
  std::size_t off = 0;
  std::deque<held> kept;
  auto drop_one = [&] {
    held& h = kept.front();
    spoiled += std::string_view(h.b.data().data(), h.b.size()) != part(k, h.at, h.b.size());
    kept.pop_front();
  };
  for (int turn = 0; off < total; ++turn) {
    if (turn % 4 < 2) {
      auto b = s.read_pooled(deadline(20s));
      ASSERT_TRUE(b) << b.error().message();
      ASSERT_FALSE(b->empty());
      spoiled += std::string_view(b->data().data(), b->size()) != part(k, off, b->size());
      const std::size_t n = b->size();
      kept.push_back({off, std::move(*b)});
      off += n;
      while (kept.size() > keep) drop_one();
    } else if (turn % 4 == 2) {
      char buf[777];
      auto n = s.read(buf, deadline(20s));
      ASSERT_TRUE(n) << n.error().message();
      ASSERT_GT(*n, 0u);
      spoiled += std::string_view(buf, *n) != part(k, off, *n);
      off += *n;
    } else {
      char a[100], b[3000];
      iovec v[2] = {{a, sizeof a}, {b, sizeof b}};
      auto n = s.readv(v, deadline(20s));
      ASSERT_TRUE(n) << n.error().message();
      ASSERT_GT(*n, 0u);
      std::string got(a, std::min(*n, sizeof a));
      if (*n > sizeof a) got.append(b, *n - sizeof a);
      spoiled += got != part(k, off, *n);
      off += *n;
    }
    this_fiber::yield();  // another worker may steal this fiber here
  }
  while (!kept.empty()) drop_one();
}

void write_stream(tcp_stream& c, int k, std::size_t total) {
  std::size_t sent = 0;
  for (std::size_t n = 1; sent < total; n = n * 5 % 12007 + 1) {
    n = std::min(n, total - sent);
    ASSERT_TRUE(c.write_all(part(k, sent, n), deadline(20s)));
    sent += n;
    if (n % 3 == 0) this_fiber::yield();
  }
}

TEST_P(RecvBuffers, MigratingReadersThatHoldBuffersSeeEveryByteOnce) {
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    constexpr int kConns = 8;
    constexpr std::size_t kBytes = 2 * 1024 * 1024;
    std::vector<testing::tcp_pair> pairs;
    for (int k = 0; k < kConns; ++k) {
      auto c = tcp_stream::connect(addr_of(ln)).value();
      pairs.push_back({std::move(c), ln.accept().value()});
    }
    std::atomic<int> spoiled{0};
    std::vector<join_handle<void>> fs;
    for (int k = 0; k < kConns; ++k) {
      fs.push_back(spawn([&, k] { write_stream(pairs[k].client, k, kBytes); }));
      fs.push_back(spawn([&, k] {
        int bad = 0;
        // Half the readers hold many buffers: the rings run dry.
        read_mixed(pairs[k].server, k, kBytes, k % 2 ? 400 : 3, bad);
        spoiled += bad;
      }));
    }
    for (auto& f : fs) f.join();
    EXPECT_EQ(spoiled.load(), 0);
    EXPECT_EQ(pooled_buffer::in_use(), 0u);
    for (auto& p : pairs) (void)p.server.close();
    for (int i = 0; i < 200 && get_io_stats().recv_queued != 0; ++i) (void)this_fiber::sleep_for(5ms);
    EXPECT_EQ(get_io_stats().recv_queued, 0u);
  });
}

// Pooled buffers released on a plain thread and in the blocking pool go
// back to their own rings: every buffer read after is still whole.
TEST_P(RecvBuffers, BuffersReleasedOffTheWorkersGoBackWhole) {
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    auto c = tcp_stream::connect(addr_of(ln)).value();
    auto s = ln.accept().value();
    constexpr std::size_t kBytes = 12 * 1024 * 1024;
    auto w = spawn([&] { write_stream(c, 0, kBytes); });
    std::size_t off = 0;
    int spoiled = 0;
    for (int round = 0; off < kBytes; ++round) {
      std::vector<held> batch;
      for (int i = 0; i < 300 && off < kBytes; ++i) {
        auto b = s.read_pooled(deadline(20s));
        ASSERT_TRUE(b) << b.error().message();
        ASSERT_FALSE(b->empty());
        const std::size_t n = b->size();
        batch.push_back({off, std::move(*b)});
        off += n;
      }
      for (auto& h : batch)
        spoiled += std::string_view(h.b.data().data(), h.b.size()) != part(0, h.at, h.b.size());
      if (round % 2)
        std::thread([&] { batch.clear(); }).join();
      else
        weft::blocking([&] { batch.clear(); });
    }
    w.join();
    EXPECT_EQ(spoiled, 0);
    EXPECT_EQ(pooled_buffer::in_use(), 0u);
  });
}

// close() racing readers that hold chunks and buffers: no buffer is lost
// or given back twice; the counts return to zero.
TEST_P(RecvBuffers, ClosesRacingReadersLeaveNoBufferBehind) {
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    int spoiled = 0;
    for (int round = 0; round < 60; ++round) {
      auto c = tcp_stream::connect(addr_of(ln)).value();
      auto s = ln.accept().value();
      auto w = spawn([&] {
        std::size_t sent = 0;
        for (int i = 0; i < 200; ++i) {
          if (!c.write_all(part(round, sent, 1500), deadline(2s))) break;
          sent += 1500;
        }
      });
      std::vector<held> kept;
      auto r = spawn([&] {
        std::size_t off = 0;
        for (int turn = 0;; ++turn) {
          if (turn % 2) {
            auto b = s.read_pooled(deadline(2s));
            if (!b || b->empty()) break;
            spoiled += std::string_view(b->data().data(), b->size()) != part(round, off, b->size());
            const std::size_t n = b->size();
            kept.push_back({off, std::move(*b)});
            off += n;
          } else {
            char buf[333];
            auto n = s.read(buf, deadline(2s));
            if (!n || *n == 0) break;
            spoiled += std::string_view(buf, *n) != part(round, off, *n);
            off += *n;
          }
          this_fiber::yield();
        }
      });
      (void)this_fiber::sleep_for(std::chrono::microseconds(200 * (round % 7)));
      (void)s.close();
      r.join();
      (void)c.close();
      w.join();
      for (auto& h : kept)
        spoiled += std::string_view(h.b.data().data(), h.b.size()) != part(round, h.at, h.b.size());
    }
    EXPECT_EQ(spoiled, 0);
    EXPECT_EQ(pooled_buffer::in_use(), 0u);
    for (int i = 0; i < 200 && get_io_stats().recv_queued != 0; ++i) (void)this_fiber::sleep_for(5ms);
    EXPECT_EQ(get_io_stats().recv_queued, 0u);
  });
}

}  // namespace
}  // namespace weft

namespace weft {
namespace {

// A pooled buffer kept past weft::run's return (against socket.h's rule):
// its release must not call into the driver that lent it, which is gone.
TEST_P(RecvBuffers, APooledBufferReleasedAfterTheRunTouchesNoDriver) {
  pooled_buffer kept;
  Run([&] {
    auto [c, s] = testing::connected_pair();
    ASSERT_TRUE(s.write_all(std::string_view("kept"), deadline(5s)));
    auto b = c.read_pooled(deadline(5s));
    ASSERT_TRUE(b) << b.error().message();
    kept = std::move(*b);
  });
  // Another runtime, so that the old driver's memory is reused.
  Run([&] {
    auto [c, s] = testing::connected_pair();
    ASSERT_TRUE(s.write_all(std::string_view("x"), deadline(5s)));
    auto b = c.read_pooled(deadline(5s));
    ASSERT_TRUE(b);
  });
  kept.release();
  EXPECT_EQ(pooled_buffer::in_use(), 0u);
}

// Reads n bytes from `off` by read_pooled() into `out`.
void hold_pooled(tcp_stream& s, std::size_t& off, std::size_t n, std::vector<held>& out) {
  for (std::size_t end = off + n; off < end;) {
    auto b = s.read_pooled(deadline(10s));
    ASSERT_TRUE(b) << b.error().message();
    ASSERT_FALSE(b->empty());
    const std::size_t got = b->size();
    out.push_back({off, std::move(*b)});
    off += got;
  }
}

int spoiled_in(const std::vector<held>& v, int k) {
  int bad = 0;
  for (auto& h : v) bad += std::string_view(h.b.data().data(), h.b.size()) != part(k, h.at, h.b.size());
  return bad;
}

// A multishot armed on worker 0's ring, read from worker 1 by every kind
// of read while worker 0's pool runs dry and is refilled by buffers
// released on worker 1 (not the ring's thread). Then every buffer worker
// 0 lends, held at once, keeps its own bytes: none went back twice or to
// the wrong ring.
TEST_P(RecvBuffers, ReadsFromAnotherWorkerWhileTheArmingRingRunsDryLoseNoBuffer) {
  if (workers() < 2) GTEST_SKIP() << "needs two workers";
  Run([&] {
    if (!multishot_recv_on()) return;
    constexpr std::size_t kBlock = 4096;
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    auto connect = [&] {
      auto c = tcp_stream::connect(addr_of(ln)).value();
      return testing::tcp_pair{std::move(c), ln.accept().value()};
    };
    auto p1 = connect(), p2 = connect(), p3 = connect();
    int spoiled = 0;
    std::size_t off1 = 0, off2 = 0, off3 = 0;
    std::vector<held> held0;
    auto w2 = spawn([&] { write_stream(p2.client, 2, 4 * 1024 * 1024); });
    // p2's multishot armed on worker 0; then worker 0's pool nearly all lent.
    spawn([&] {
      hold_pooled(p2.server, off2, 1, held0);
      spoiled += spoiled_in(held0, 2);
      held0.clear();
      auto w1 = spawn([&] { write_stream(p1.client, 1, 1000 * kBlock); });
      hold_pooled(p1.server, off1, 1000 * kBlock, held0);
      w1.join();
    }, {.pinned = true, .worker = 0}).join();
    // Worker 1 reads p2 in turns; half-way, it drops worker 0's buffers.
    spawn([&] {
      const std::size_t total = 4 * 1024 * 1024;
      for (int turn = 0; off2 < total; ++turn) {
        if (turn == 200) {
          spoiled += spoiled_in(held0, 1);
          held0.clear();  // on worker 1: queued for worker 0's ring
        }
        if (turn % 3 == 0) {
          std::vector<held> one;
          hold_pooled(p2.server, off2, 1, one);
          spoiled += spoiled_in(one, 2);
        } else if (turn % 3 == 1) {
          char buf[1500];
          auto n = p2.server.read(buf, deadline(10s));
          ASSERT_TRUE(n) << n.error().message();
          spoiled += std::string_view(buf, *n) != part(2, off2, *n);
          off2 += *n;
        } else {
          char a[10], b[5000];
          iovec v[2] = {{a, sizeof a}, {b, sizeof b}};
          auto n = p2.server.readv(v, deadline(10s));
          ASSERT_TRUE(n) << n.error().message();
          std::string got(a, std::min(*n, sizeof a));
          if (*n > sizeof a) got.append(b, *n - sizeof a);
          spoiled += got != part(2, off2, *n);
          off2 += *n;
        }
      }
    }, {.pinned = true, .worker = 1}).join();
    w2.join();
    // Worker 0's ring: every buffer it lends held at once.
    spawn([&] {
      std::vector<held> all;
      auto w3 = spawn([&] { write_stream(p3.client, 3, 1024 * kBlock); });
      hold_pooled(p3.server, off3, 1024 * kBlock, all);
      w3.join();
      spoiled += spoiled_in(all, 3);
    }, {.pinned = true, .worker = 0}).join();
    EXPECT_EQ(spoiled, 0);
    EXPECT_EQ(pooled_buffer::in_use(), 0u);
  });
}

}  // namespace
}  // namespace weft
