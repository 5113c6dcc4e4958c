// io/rescue_test.cc — I/O parked on a worker that is stuck in one fiber
// (a computation that never parks) completes on another worker: the
// monitor's driver::rescue() (io/uring_driver.cc *Rescue*, and the epoll
// driver's). Runs once per driver (BUILD.bazel).
//
// Each test parks an operation on worker W and then runs, on W, a fiber
// pinned there that computes until the operation has completed (or 5 s
// pass). Without the rescue the operation completes only when the
// computation ends, after 5 s.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <time.h>

#include <atomic>
#include <cerrno>
#include <optional>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "io/socket_test_util.h"
#include "runtime/net.h"
#include "runtime/weft.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;
using testing::addr_of;
using testing::connected_pair;

constexpr auto kHogFor = 5s;  // the computation's bound
constexpr auto kPromptly = 2s;  // what the rescued operation must beat

options two_workers() {
  options o;
  o.workers = 2;
  return o;
}

// Spawns, pinned to the caller's worker, a fiber that computes until
// `done` or kHogFor. It runs when the caller parks next.
join_handle<unsigned> spawn_hog(const std::atomic<bool>& done) {
  return spawn([&done] {
    auto until = steady::now() + kHogFor;
    while (!done.load(std::memory_order_acquire) && steady::now() < until) {
    }
    return this_fiber::worker_index();
  }, {.name = "hog", .pinned = true});
}

TEST(Rescue, AReadParkedOnAStuckWorkerCompletesOnAnother) {
  steady::duration waited{};
  unsigned read_on = ~0u, hogged = ~1u, resumed_on = ~0u;
  std::string got;
  std::uint64_t rescued = 0;
  run([&] {
    auto [client, server] = connected_pair();
    auto reader = spawn([&, &server = server] {
      std::atomic<bool> done{false};
      read_on = this_fiber::worker_index();
      auto hog = spawn_hog(done);
      char buf[16];
      auto t0 = steady::now();
      auto n = server.read(buf);  // parks; the hog runs next on this worker
      waited = steady::now() - t0;
      resumed_on = this_fiber::worker_index();
      done.store(true, std::memory_order_release);
      if (n) got.assign(buf, *n);
      hogged = hog.join();
    });
    (void)this_fiber::sleep_for(50ms);
    ASSERT_TRUE(client.write_all({"hello", 5}));
    reader.join();
    // The monitor counts after it handed the fibers over: allow it a moment.
    for (int i = 0; i < 100 && (rescued = get_io_stats().rescued) == 0; ++i)
      (void)this_fiber::sleep_for(10ms);
  }, two_workers());
  ASSERT_EQ(read_on, hogged) << "the scenario needs the read parked on the hog's worker";
  EXPECT_EQ(got, "hello");
  EXPECT_GE(rescued, 1u);
  EXPECT_LT(waited, kPromptly) << "the read waited for the computation to end";
  EXPECT_NE(resumed_on, hogged);
}

TEST(Rescue, AnAcceptParkedOnAStuckWorkerCompletesOnAnother) {
  steady::duration waited{};
  unsigned accepted_on = ~0u, hogged = ~1u;
  bool accepted = false;
  run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    auto acceptor = spawn([&] {
      std::atomic<bool> done{false};
      accepted_on = this_fiber::worker_index();
      auto hog = spawn_hog(done);
      auto t0 = steady::now();
      auto c = ln.accept();
      waited = steady::now() - t0;
      done.store(true, std::memory_order_release);
      accepted = c.has_value();
      hogged = hog.join();
    });
    (void)this_fiber::sleep_for(50ms);
    auto c = tcp_stream::connect(addr_of(ln), deadline(5s));
    ASSERT_TRUE(c) << c.error().message();
    acceptor.join();
  }, two_workers());
  ASSERT_EQ(accepted_on, hogged) << "the scenario needs the accept parked on the hog's worker";
  EXPECT_TRUE(accepted);
  EXPECT_LT(waited, kPromptly) << "the accept waited for the computation to end";
}

// A read deadline on the stuck worker: under io_uring a linked timeout in
// the kernel (whose completion is rescued), under epoll the scheduler's
// timer (fired by another worker) and a cancel the rescue carries out.
TEST(Rescue, AReadDeadlineOnAStuckWorkerFiresOnTime) {
  steady::duration waited{};
  unsigned read_on = ~0u, hogged = ~1u;
  std::error_code err;
  run([&] {
    auto [client, server] = connected_pair();
    auto reader = spawn([&, &server = server] {
      std::atomic<bool> done{false};
      read_on = this_fiber::worker_index();
      auto hog = spawn_hog(done);
      char buf[16];
      auto t0 = steady::now();
      auto n = server.read(buf, deadline(100ms));
      waited = steady::now() - t0;
      done.store(true, std::memory_order_release);
      if (!n) err = n.error();
      hogged = hog.join();
    });
    reader.join();
  }, two_workers());
  ASSERT_EQ(read_on, hogged) << "the scenario needs the read parked on the hog's worker";
  EXPECT_EQ(err, std::errc::timed_out);
  EXPECT_GE(waited, 100ms);
  EXPECT_LT(waited, kPromptly) << "the deadline waited for the computation to end";
}

// A deadline beyond the kernel's range (io/uring_driver.cc *Deadlines*)
// is the scheduler's timer: another worker fires it, and the operation's
// cancel, an SQE only the stuck worker's thread may submit, goes in
// through the rescue signal (io_uring) or the rescue's drain (epoll).
TEST(Rescue, AFarReadDeadlineOnAStuckWorkerFiresOnTime) {
  steady::duration waited{};
  unsigned read_on = ~0u, hogged = ~1u;
  std::error_code err;
  run([&] {
    auto [client, server] = connected_pair();
    auto reader = spawn([&, &server = server] {
      std::atomic<bool> done{false};
      read_on = this_fiber::worker_index();
      auto hog = spawn_hog(done);
      char buf[16];
      auto t0 = steady::now();
      auto n = server.read(buf, deadline(1200ms));
      waited = steady::now() - t0;
      done.store(true, std::memory_order_release);
      if (!n) err = n.error();
      hogged = hog.join();
    });
    reader.join();
  }, two_workers());
  ASSERT_EQ(read_on, hogged) << "the scenario needs the read parked on the hog's worker";
  EXPECT_EQ(err, std::errc::timed_out);
  EXPECT_GE(waited, 1200ms);
  EXPECT_LT(waited, 1200ms + kPromptly) << "the deadline waited for the computation to end";
}

// A stop request to a fiber whose read is parked on a stuck worker.
TEST(Rescue, AStopRequestToAReadOnAStuckWorkerIsPrompt) {
  steady::duration took{};
  unsigned read_on = ~0u, hogged = ~1u;
  std::error_code err;
  std::atomic<bool> done{false};
  run([&] {
    auto [client, server] = connected_pair();
    join_handle<unsigned> hog;
    auto reader = spawn([&, &server = server] {
      read_on = this_fiber::worker_index();
      hog = spawn_hog(done);
      char buf[16];
      auto n = server.read(buf);
      if (!n) err = n.error();
    });
    (void)this_fiber::sleep_for(50ms);
    auto t0 = steady::now();
    reader.request_stop();
    reader.join();
    took = steady::now() - t0;
    done.store(true, std::memory_order_release);
    hogged = hog.join();
  }, two_workers());
  ASSERT_EQ(read_on, hogged);
  EXPECT_EQ(err, std::errc::operation_canceled);
  EXPECT_LT(took, kPromptly) << "the stop waited for the computation to end";
}

// The rescued fibers keep working on their new worker: an echo server
// whose connections all started on the stuck worker still serves them.
TEST(Rescue, ConnectionsOfAStuckWorkerKeepBeingServed) {
  steady::duration took{};
  unsigned served_on = ~0u, hogged = ~1u;
  run([&] {
    auto [client, server] = connected_pair();
    auto echo = spawn([&, &server = server] {
      std::atomic<bool> done{false};
      served_on = this_fiber::worker_index();
      auto hog = spawn_hog(done);
      char buf[64];
      while (auto n = server.read(buf)) {
        if (*n == 0 || !server.write_all({buf, *n})) break;
      }
      done.store(true, std::memory_order_release);
      hogged = hog.join();
    });
    (void)this_fiber::sleep_for(20ms);
    auto t0 = steady::now();
    for (int i = 0; i < 100; ++i) {
      std::string msg = "ping " + std::to_string(i);
      ASSERT_TRUE(client.write_all({msg.data(), msg.size()}));
      std::string back(msg.size(), '\0');
      auto r = client.read_exact({back.data(), back.size()}, deadline(5s));
      ASSERT_TRUE(r) << r.error().message();
      ASSERT_EQ(back, msg);
    }
    took = steady::now() - t0;
    (void)client.shutdown();
    echo.join();
  }, two_workers());
  ASSERT_EQ(served_on, hogged) << "the scenario needs the server parked on the hog's worker";
  EXPECT_LT(took, kPromptly) << "the round trips waited for the computation to end";
}

// Reads "hello" on a fiber parked on the worker that `stuck_body` then
// holds: the common scenario of the tests below. Returns how long the read
// waited.
template <typename Stuck>
steady::duration read_behind(Stuck stuck_body) {
  steady::duration waited{};
  run([&] {
    auto [client, server] = connected_pair();
    auto reader = spawn([&, &server = server] {
      std::atomic<bool> done{false};
      auto stuck = spawn([&] { stuck_body(done); }, {.name = "stuck", .pinned = true});
      char buf[16];
      auto t0 = steady::now();
      auto n = server.read(buf);
      waited = steady::now() - t0;
      done.store(true, std::memory_order_release);
      EXPECT_TRUE(n && *n == 5);
      stuck.join();
    });
    (void)this_fiber::sleep_for(50ms);
    EXPECT_TRUE(client.write_all({"hello", 5}));
    reader.join();
  }, two_workers());
  return waited;
}

// A stuck fiber asleep in blocking system calls is never interrupted by
// the rescue: SA_RESTART does not restart poll(2) or nanosleep(2), so a
// signal would cut them short with EINTR.
TEST(Rescue, ABlockingCallInTheStuckFiberIsNotInterrupted) {
  int poll_rc = 0, poll_errno = 0, sleep_rc = 0, sleep_errno = 0;
  (void)read_behind([&](const std::atomic<bool>&) {
    poll_rc = ::poll(nullptr, 0, 300);
    poll_errno = errno;
    timespec ts{0, 300'000'000};
    sleep_rc = ::nanosleep(&ts, nullptr);
    sleep_errno = errno;
  });
  EXPECT_EQ(poll_rc, 0) << "poll: " << std::strerror(poll_errno);
  EXPECT_EQ(sleep_rc, 0) << "nanosleep: " << std::strerror(sleep_errno);
}

void compute(const std::atomic<bool>& done) {
  auto until = steady::now() + kHogFor;
  while (!done.load(std::memory_order_acquire) && steady::now() < until) {
  }
}

// A signal_set that watched SIGURG before the runtime started and is
// dropped while it runs restores the default disposition it found, over
// weft's handler: the next rescue installs weft's again.
TEST(Rescue, ASignalSetDroppedDuringTheRunLeavesTheRescueWorking) {
  auto set = signal_set::watch({SIGURG});
  ASSERT_TRUE(set) << set.error().message();
  std::optional<signal_set> held(std::move(*set));
  steady::duration waited{};
  {
    // Dropped from inside the run, once the drivers exist.
    auto drop_then_stuck = [&](const std::atomic<bool>& done) {
      held.reset();
      compute(done);
    };
    waited = read_behind(drop_then_stuck);
  }
  EXPECT_LT(waited, kPromptly) << "the read waited for the computation to end";
}

// While a signal_set watches SIGURG, weft's own SIGURGs reach the rescue
// through its handler and are not counted as deliveries.
TEST(Rescue, ASignalSetWatchingSigurgSeesNoneOfWeftsOwn) {
  std::optional<signal_set> set;
  steady::duration waited{};
  bool saw_one = true;
  run([&] {
    auto s = signal_set::watch({SIGURG});
    ASSERT_TRUE(s) << s.error().message();
    set.emplace(std::move(*s));
  }, two_workers());
  waited = read_behind(compute);
  saw_one = set->try_wait().has_value();
  set.reset();
  EXPECT_LT(waited, kPromptly) << "the read waited for the computation to end";
  EXPECT_FALSE(saw_one) << "weft's rescue signal was counted as a delivery";
}

// Worker 0 keeps getting stuck (30 ms computations between short
// sleeps) while its fibers serve echo connections, some with deadlines in
// the kernel's range, some with far ones (the scheduler's timers and
// cancels), some with none; clients on the other workers check every
// echo. Under --config=tsan this is the race hunt for the rescue paths.
TEST(Rescue, AWorkerThatKeepsGettingStuckServesItsConnections) {
  constexpr int kConns = 12, kMessages = 40;
  std::atomic<int> echoes{0};
  options o;
  o.workers = 3;
  run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    std::string addr = addr_of(ln);
    std::atomic<bool> stop{false};
    auto hog = spawn([&] {
      while (!stop.load(std::memory_order_acquire)) {
        auto until = steady::now() + 30ms;
        while (steady::now() < until) {
        }
        (void)this_fiber::sleep_for(1ms);
      }
    }, {.name = "hog", .pinned = true, .worker = 0});
    auto server = spawn([&] {
      std::vector<join_handle<void>> conns;
      for (int i = 0; i < kConns; ++i) {
        auto c = ln.accept(deadline(10s));
        ASSERT_TRUE(c) << c.error().message();
        conns.push_back(spawn([c = std::move(*c), &echoes, i]() mutable {
          char buf[256];
          for (;;) {
            auto d = i % 3 == 0 ? deadline(20ms) : i % 3 == 1 ? deadline(1500ms) : io::deadline_arg{};
            auto n = c.read(buf, d);
            if (!n && n.error() == std::errc::timed_out) continue;
            if (!n || *n == 0 || !c.write_all({buf, *n})) break;
            echoes.fetch_add(1, std::memory_order_relaxed);
          }
        }, {.name = "conn", .worker = 0}));
      }
      for (auto& h : conns) h.join();
    }, {.name = "server", .worker = 0});
    std::vector<join_handle<void>> clients;
    for (int i = 0; i < kConns; ++i)
      clients.push_back(spawn([&, i] {
        auto c = tcp_stream::connect(addr, deadline(10s));
        ASSERT_TRUE(c) << c.error().message();
        for (int k = 0; k < kMessages; ++k) {
          std::string m = "m" + std::to_string(i) + "-" + std::to_string(k);
          ASSERT_TRUE(c->write_all({m.data(), m.size()}));
          std::string back(m.size(), '\0');
          auto r = c->read_exact({back.data(), back.size()}, deadline(10s));
          ASSERT_TRUE(r) << r.error().message();
          ASSERT_EQ(back, m);
          (void)this_fiber::sleep_for(std::chrono::milliseconds(k % 5));
        }
        (void)c->close();
      }, {.name = "client", .worker = 1 + i % 2}));
    for (auto& c : clients) c.join();
    server.join();
    stop.store(true, std::memory_order_release);
    hog.join();
  }, o);
  EXPECT_GE(echoes.load(), kConns * kMessages);
}

}  // namespace
}  // namespace weft
