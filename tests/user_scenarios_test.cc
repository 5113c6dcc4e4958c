// tests/user_scenarios_test.cc
//
// Small programs written the way README.md tells a new user to write
// them: a worker pool, a plain thread serving fibers, timeouts, a TCP
// server with per-connection fibers, fiber_local and stop tokens, and
// weft::run itself. Each case checks what the README promises.
//
// Runs on both I/O drivers (tests/BUILD.bazel).
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/select.h"
#include "runtime/sync.h"
#include "runtime/task_group.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;

class UserScenarios : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(UserScenarios);

// ---------------------------------------------------------------------------
// Worker pool

TEST_P(UserScenarios, WorkerPoolDrainsJobsAndCollectsResults) {
  constexpr int kWorkers = 8, kJobs = 2000;
  int rc = Run([&] {
    channel<int> jobs(16);
    channel<long> results(16);
    std::vector<join_handle<int>> pool;
    for (int w = 0; w < kWorkers; ++w)
      pool.push_back(spawn([&] {
        int handled = 0;
        while (auto j = jobs.recv()) {
          if (!results.send(long{*j} * *j)) return -1;
          ++handled;
        }
        return handled;
      }));
    auto feeder = spawn([&] {
      for (int i = 0; i < kJobs; ++i)
        if (!jobs.send(i)) return false;
      jobs.close();
      return true;
    });
    long sum = 0;
    for (int i = 0; i < kJobs; ++i) {
      auto r = results.recv(deadline(5s));
      if (!r) return 10;
      sum += *r;
    }
    if (!feeder.join()) return 11;
    int handled = 0;
    for (auto& h : pool) handled += h.join();
    if (handled != kJobs) return 12;
    long want = 0;
    for (long i = 0; i < kJobs; ++i) want += i * i;
    if (sum != want) return 13;
    // Nothing more: the job channel is closed and drained.
    if (jobs.try_recv().error() != make_error_code(chan_errc::closed)) return 14;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// A task_group whose one child throws: the others, parked in a sleep, a
// channel receive and a select, are asked to stop, and wait() rethrows.
TEST_P(UserScenarios, TaskGroupFailureStopsSiblingsAndWaitRethrows) {
  int rc = Run([&] {
    channel<int> never;
    std::atomic<int> cancelled{0};
    auto t0 = clock::now();
    {
      task_group g;
      g.spawn([&] {
        auto r = this_fiber::sleep_for(10s);
        if (!r && r.error() == std::errc::operation_canceled) cancelled.fetch_add(1);
      });
      g.spawn([&] {
        auto r = never.recv(deadline(10s));
        if (!r && r.error() == std::errc::operation_canceled) cancelled.fetch_add(1);
      });
      g.spawn([&] {
        std::optional<int> v;
        int i = select(never.on_recv(v), after(10s), this_fiber::stop_token());
        if (i == 2) cancelled.fetch_add(1);
      });
      g.spawn([&]() -> result<void> {
        // An error result is a failure too; it comes second here.
        auto r = this_fiber::sleep_for(10s);
        if (!r) return std::unexpected(r.error());
        return {};
      });
      g.spawn([] {
        (void)this_fiber::sleep_for(20ms);
        throw std::runtime_error("child failed");
      });
      try {
        (void)g.wait();
        return 1;  // wait() must rethrow
      } catch (const std::runtime_error& e) {
        if (std::string(e.what()) != "child failed") return 2;
      }
    }
    if (cancelled.load() != 3) return 3;
    if (clock::now() - t0 > 5s) return 4;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// A child that returns an error: wait() returns that error (not
// operation_canceled, which the stopped siblings return).
TEST_P(UserScenarios, TaskGroupErrorResultIsReportedNotTheSiblingsCancel) {
  int rc = Run([&] {
    task_group g;
    for (int i = 0; i < 4; ++i)
      g.spawn([]() -> result<void> {
        auto r = this_fiber::sleep_for(10s);
        if (!r) return std::unexpected(r.error());
        return {};
      });
    g.spawn([]() -> result<int> {
      (void)this_fiber::sleep_for(5ms);
      return make_error(std::errc::connection_refused);
    });
    auto r = g.wait();
    if (r) return 1;
    if (r.error() != std::errc::connection_refused) return 2;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// ---------------------------------------------------------------------------
// A plain thread owning a "database", serving fibers through a channel of
// requests that carry their reply channel.

struct db_request {
  int key;
  std::shared_ptr<channel<int>> reply;
};

TEST_P(UserScenarios, PlainThreadServesFibersThroughRequestChannel) {
  int rc = Run([&] {
    channel<db_request> requests(8);
    std::thread db([&requests] {
      std::vector<int> table(100);
      std::iota(table.begin(), table.end(), 1000);
      while (auto r = requests.recv()) (void)r->reply->send(table[r->key % 100]);
    });
    constexpr int kClients = 16, kEach = 50;
    std::atomic<int> wrong{0};
    {
      task_group g;
      for (int c = 0; c < kClients; ++c)
        g.spawn([&, c] {
          auto reply = std::make_shared<channel<int>>(1);
          for (int i = 0; i < kEach; ++i) {
            int key = c * kEach + i;
            if (!requests.send({key, reply})) return wrong.fetch_add(1), void();
            auto v = reply->recv(deadline(5s));
            if (!v || *v != 1000 + key % 100) wrong.fetch_add(1);
          }
        });
      if (!g.wait()) return 1;
    }
    requests.close();
    db.join();
    return wrong.load();
  });
  EXPECT_EQ(rc, 0);
}

// The database thread shuts down while fibers still send: it closes the
// request channel and fails the requests it had queued by closing their
// reply channels. Every fiber learns of it (closed), none hangs.
TEST_P(UserScenarios, PlainThreadShutsDownWhileFibersStillSend) {
  int rc = Run([&] {
    channel<db_request> requests(4);
    std::atomic<int> served{0};
    std::thread db([&] {
      for (int i = 0; i < 40; ++i) {
        auto r = requests.recv();
        if (!r) break;
        (void)r->reply->send(r->key);
        served.fetch_add(1);
      }
      requests.close();
      while (auto r = requests.try_recv()) r->reply->close();  // queued, unanswered
    });
    std::atomic<int> closed_send{0}, closed_reply{0}, ok{0}, bad{0};
    {
      task_group g;
      for (int c = 0; c < 8; ++c)
        g.spawn([&, c] {
          auto reply = std::make_shared<channel<int>>(1);
          for (int i = 0;; ++i) {
            if (!requests.send({c * 1000 + i, reply})) {
              closed_send.fetch_add(1);
              return;
            }
            auto v = reply->recv(deadline(5s));
            if (v) {
              ok.fetch_add(1);
              continue;
            }
            if (v.error() == make_error_code(chan_errc::closed))
              closed_reply.fetch_add(1);
            else
              bad.fetch_add(1);
            return;
          }
        });
      if (!g.wait()) return 1;
    }
    db.join();
    if (bad.load() != 0) return 2;
    if (ok.load() != 40 || served.load() != 40) return 3;
    if (closed_send.load() + closed_reply.load() != 8) return 4;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// ---------------------------------------------------------------------------
// Timeouts

TEST_P(UserScenarios, SelectWithAfterTimesOut) {
  int rc = Run([&] {
    channel<int> ch;
    std::optional<int> v;
    auto t0 = clock::now();
    int i = select(ch.on_recv(v), after(30ms));
    auto took = clock::now() - t0;
    if (i != 1) return 1;
    if (took < 30ms) return 2;
    if (took > 3s) return 3;
    if (v) return 4;
    // after(0) with nothing else ready fires at once.
    if (select(ch.on_recv(v), after(0ms)) != 1) return 5;
    // A negative duration too.
    if (select(ch.on_recv(v), after(-5s)) != 1) return 6;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

TEST_P(UserScenarios, RecvWithDeadline) {
  int rc = Run([&] {
    channel<int> ch(1);
    auto t0 = clock::now();
    auto r = ch.recv(deadline(20ms));
    if (r || r.error() != std::errc::timed_out) return 1;
    if (clock::now() - t0 < 20ms) return 2;
    // A deadline of zero: a ready value is still received.
    if (!ch.try_send(7)) return 3;
    r = ch.recv(deadline(0s));
    if (!r || *r != 7) return 4;
    // ... and with nothing there, timed_out at once.
    r = ch.recv(deadline(0s));
    if (r || r.error() != std::errc::timed_out) return 5;
    // A deadline in the past, as a time point.
    r = ch.recv(deadline(clock::now() - 1h));
    if (r || r.error() != std::errc::timed_out) return 6;
    // send with a deadline of zero on a full channel.
    if (!ch.try_send(1)) return 7;
    auto s = ch.send(2, deadline(0s));
    if (s || s.error() != std::errc::timed_out) return 8;
    // on a rendezvous channel with a receiver parked, a zero deadline sends.
    channel<int> rv;
    auto h = spawn([&] { return rv.recv(deadline(5s)).value_or(-1); });
    // wait until the receiver is parked
    for (int i = 0; i < 1000; ++i) {
      (void)this_fiber::sleep_for(1ms);
      auto s2 = rv.send(9, deadline(0s));
      if (s2) break;
      if (s2.error() != std::errc::timed_out) return 9;
    }
    if (h.join() != 9) return 10;
    // closed beats timed_out
    channel<int> c2;
    c2.close();
    r = c2.recv(deadline(0s));
    if (r || r.error() != make_error_code(chan_errc::closed)) return 11;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

TEST_P(UserScenarios, ConditionVariablePredicateAndDeadline) {
  int rc = Run([&] {
    mutex mu;
    condition_variable cv;
    bool ready = false;
    // times out while the predicate stays false
    {
      std::unique_lock lk(mu);
      auto t0 = clock::now();
      auto r = cv.wait(lk, [&] { return ready; }, deadline(20ms));
      if (r || r.error() != std::errc::timed_out) return 1;
      if (clock::now() - t0 < 20ms) return 2;
      if (!lk.owns_lock()) return 3;
    }
    // predicate already true with a deadline in the past: ok, no wait
    {
      std::unique_lock lk(mu);
      ready = true;
      auto r = cv.wait(lk, [&] { return ready; }, deadline(clock::now() - 1s));
      if (!r) return 4;
      ready = false;
    }
    // notified before the deadline
    auto h = spawn([&] {
      (void)this_fiber::sleep_for(5ms);
      std::lock_guard g(mu);
      ready = true;
      cv.notify_all();
    });
    {
      std::unique_lock lk(mu);
      auto r = cv.wait(lk, [&] { return ready; }, deadline(5s));
      if (!r) return 5;
    }
    h.join();
    // a plain thread notifies
    ready = false;
    std::thread t([&] {
      std::this_thread::sleep_for(5ms);
      std::lock_guard g(mu);
      ready = true;
      cv.notify_one();
    });
    {
      std::unique_lock lk(mu);
      auto r = cv.wait(lk, [&] { return ready; }, deadline(5s));
      if (!r) return 6;
    }
    t.join();
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

TEST_P(UserScenarios, SleepUntilPastAndZero) {
  int rc = Run([&] {
    auto t0 = clock::now();
    for (int i = 0; i < 1000; ++i) {
      if (!this_fiber::sleep_until(clock::now() - 1s)) return 1;
      if (!this_fiber::sleep_for(0s)) return 2;
      if (!this_fiber::sleep_for(-1ms)) return 3;
      if (!this_fiber::sleep_until(clock::time_point::min())) return 4;
    }
    if (clock::now() - t0 > 2s) return 5;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

TEST_P(UserScenarios, SemaphoreAndLatchDeadlines) {
  int rc = Run([&] {
    semaphore s(0);
    auto r = s.acquire(deadline(0s));
    if (r || r.error() != std::errc::timed_out) return 1;
    s.release();
    r = s.acquire(deadline(0s));
    if (!r) return 2;
    latch l(1);
    r = l.wait(deadline(10ms));
    if (r || r.error() != std::errc::timed_out) return 3;
    l.count_down();
    r = l.wait(deadline(0s));
    if (!r) return 4;
    wait_group wg;
    r = wg.wait(deadline(0s));
    if (!r) return 5;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// ---------------------------------------------------------------------------
// Fibers: fiber_local, stop tokens, join of a fiber that threw, detach

struct counted {
  static inline std::atomic<int> live{0};
  int v = 0;
  counted() { live.fetch_add(1); }
  ~counted() { live.fetch_sub(1); }
};

TEST_P(UserScenarios, FiberLocalIsPerFiberAndDestroyedBeforeJoinReturns) {
  int rc = Run([&] {
    fiber_local<counted> fl;
    fl->v = -1;
    std::vector<join_handle<int>> hs;
    for (int i = 0; i < 50; ++i)
      hs.push_back(spawn([&, i] {
        fl->v = i;
        for (int k = 0; k < 5; ++k) this_fiber::yield();
        (void)this_fiber::sleep_for(1ms);
        return fl->v == i ? 0 : 1;
      }));
    int bad = 0;
    for (auto& h : hs) bad += h.join();
    if (bad) return 1;
    if (fl->v != -1) return 2;
    if (counted::live.load() != 1) return 3;  // main's only
    return 0;
  });
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(counted::live.load(), 0);
}

// A child selects on its parent's token. The stopped parent cannot join
// (its own parked calls are cancelled, join included), so it waits for the
// child with a task_group, which waits for children also when stopped.
TEST_P(UserScenarios, ChildWatchesParentsStopToken) {
  int rc = Run([&] {
    channel<int> started(2);
    std::atomic<int> child_case{-2};
    auto parent = spawn([&] {
      auto tok = this_fiber::stop_token();
      task_group g;
      g.spawn([tok, &started, &child_case] {
        (void)started.send(1);
        channel<int> never;
        std::optional<int> v;
        child_case = select(never.on_recv(v), tok, after(5s)).index();
        // Some clean-up that does not park, so that the parent's wait()
        // finds it still running.
        for (auto until = clock::now() + 100ms; clock::now() < until;) this_fiber::yield();
      });
      (void)started.send(1);
      auto r = this_fiber::sleep_for(5s);
      auto w = g.wait();
      if (r || r.error() != std::errc::operation_canceled) return 10;
      if (w) return 11;
      if (w.error() != std::errc::operation_canceled) return 12;
      return 0;
    });
    (void)started.recv();
    (void)started.recv();
    (void)this_fiber::sleep_for(5ms);
    parent.request_stop();
    if (int p = parent.join(); p != 0) return p;
    return child_case.load() == 1 ? 0 : 2;
  });
  EXPECT_EQ(rc, 0);
}

TEST_P(UserScenarios, JoinRethrowsAndDetachRunsOn) {
  int rc = Run([&] {
    auto h = spawn([]() -> int { throw std::logic_error("boom"); });
    try {
      (void)h.join();
      return 1;
    } catch (const std::logic_error& e) {
      if (std::string(e.what()) != "boom") return 2;
    }
    if (h.joinable()) return 3;
    try {
      (void)h.join();
      return 4;
    } catch (const std::system_error& e) {
      if (e.code() != std::errc::invalid_argument) return 5;
    }
    // detach: runs on and delivers
    channel<int> out(1);
    spawn([&] {
      (void)this_fiber::sleep_for(2ms);
      (void)out.send(42);
    }).detach();
    if (out.recv(deadline(5s)).value_or(0) != 42) return 6;
    // request_stop on a handle, then join: the sleep was cancelled
    auto s = spawn([] {
      auto r = this_fiber::sleep_for(10s);
      return !r && r.error() == std::errc::operation_canceled;
    });
    s.request_stop();
    if (!s.join()) return 7;
    // request_stop before the fiber even parks: "now and later"
    auto s2 = spawn([] {
      for (int i = 0; i < 3; ++i) this_fiber::yield();
      auto r = this_fiber::sleep_for(10s);
      return !r && this_fiber::stop_requested();
    });
    s2.request_stop();
    if (!s2.join()) return 8;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}


// ---------------------------------------------------------------------------
// A line-based TCP server: per connection a reader, a writer fed by a
// channel, and an idle-timeout fiber (as examples/chat_server). Every line
// "x" is answered "X!" (upper-cased).

struct server_stats {
  std::atomic<int> accepted{0}, started{0}, finished{0}, idle_closed{0}, eof{0}, read_errors{0};
};

void serve_connection(tcp_stream c, server_stats& st, std::chrono::milliseconds idle) {
  st.started.fetch_add(1);
  channel<std::string> out(16);
  channel<int> activity(1);
  channel<int> reader_done;
  struct count_finish {
    server_stats& st;
    ~count_finish() { st.finished.fetch_add(1); }
  } fin{st};
  task_group g;
  g.spawn([&] {  // writer
    while (auto m = out.recv())
      if (!c.write_all({m->data(), m->size()})) {
        out.close();
        return;
      }
    (void)c.shutdown(SHUT_WR);  // all answered: the client sees the end
  });
  g.spawn([&] {  // idle timeout
    for (;;) {
      std::optional<int> a, d;
      switch (select(activity.on_recv(a), reader_done.on_recv(d), after(idle),
                     this_fiber::stop_token())) {
        case 0: continue;
        case 2:
          st.idle_closed.fetch_add(1);
          (void)c.close();
          return;
        default: return;
      }
    }
  });
  // reader (this fiber)
  std::string pending;
  char buf[512];
  for (;;) {
    auto n = c.read(buf);
    if (!n) {
      st.read_errors.fetch_add(1);
      break;
    }
    if (*n == 0) {
      st.eof.fetch_add(1);
      break;
    }
    (void)activity.try_send(1);
    pending.append(buf, *n);
    std::size_t at;
    bool stop = false;
    while ((at = pending.find('\n')) != std::string::npos) {
      std::string line = pending.substr(0, at);
      pending.erase(0, at + 1);
      for (auto& ch : line) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      if (!out.send(line + "!\n")) {
        stop = true;
        break;
      }
    }
    if (stop) break;
  }
  out.close();
  reader_done.close();
  (void)g.wait();
}

// Accepts until the listener is closed or the fiber is stopped.
void accept_loop(tcp_listener& ln, server_stats& st, std::chrono::milliseconds idle) {
  for (int next = 0;; ++next) {
    auto c = ln.accept();
    if (!c) {
      if (c.error() == std::errc::bad_file_descriptor ||
          c.error() == std::errc::operation_canceled)
        return;
      continue;
    }
    st.accepted.fetch_add(1);
    go([c = std::move(*c), &st, idle]() mutable { serve_connection(std::move(c), st, idle); },
       {.worker = next});
  }
}

// Reads until end of stream (or error/timeout); returns what came.
std::string read_all(tcp_stream& c, std::chrono::milliseconds limit = 5000ms) {
  std::string got;
  char buf[256];
  deadline d(limit);
  for (;;) {
    auto n = c.read(buf, d);
    if (!n || *n == 0) return got;
    got.append(buf, *n);
  }
}

TEST_P(UserScenarios, TcpRequestResponseHalfCloseResetAndIdle) {
  server_stats st;
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    auto addr = ln->local_address();
    if (!addr) return 2;
    auto acceptor = spawn([&] { accept_loop(*ln, st, 100ms); });

    // request / response on one connection, several round trips
    {
      auto c = tcp_stream::connect(*addr, deadline(5s));
      if (!c) return 3;
      for (int i = 0; i < 20; ++i) {
        std::string q = "ping" + std::to_string(i) + "\n";
        if (!c->write_all({q.data(), q.size()})) return 4;
        std::string want = "PING" + std::to_string(i) + "!\n", got(want.size(), 0);
        auto n = c->read_exact({got.data(), got.size()}, deadline(5s));
        if (!n || got != want) return 5;
      }
    }
    // half-close: everything sent before the FIN is answered, then EOF
    {
      auto c = tcp_stream::connect(*addr, deadline(5s));
      if (!c) return 6;
      std::string q = "a\nb\nc";  // "c" has no newline: never answered
      if (!c->write_all({q.data(), q.size()})) return 7;
      if (!c->shutdown(SHUT_WR)) return 8;
      if (read_all(*c) != "A!\nB!\n") return 9;
    }
    // reset: the client aborts the connection; the server's fibers end
    {
      auto c = tcp_stream::connect(*addr, deadline(5s));
      if (!c) return 10;
      std::string q = "x\n";
      if (!c->write_all({q.data(), q.size()})) return 11;
      char got[3];
      if (!c->read_exact(got, deadline(5s))) return 12;
      linger lg{1, 0};
      if (setsockopt(c->native_handle(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg) != 0) return 13;
      if (!c->close()) return 14;
    }
    // idle: a silent client is dropped after 100 ms and sees the end
    {
      auto c = tcp_stream::connect(*addr, deadline(5s));
      if (!c) return 15;
      auto t0 = clock::now();
      char b[8];
      auto n = c->read(b, deadline(5s));
      if (!n || *n != 0) return 16;
      if (clock::now() - t0 < 90ms) return 17;
    }
    // every connection ended and counted
    for (int i = 0; i < 500 && st.finished.load() < 4; ++i) (void)this_fiber::sleep_for(10ms);
    if (st.accepted.load() != 4 || st.finished.load() != 4) return 18;
    if (st.idle_closed.load() < 1) return 19;
    if (!ln->close()) return 20;
    acceptor.join();
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// Graceful shutdown: main returns with connections open (their fibers parked
// in read, in write to a peer that does not read, and in accept); run()
// unwinds them, closes their sockets and returns main's value. The clients
// are plain threads with ordinary sockets.
TEST_P(UserScenarios, TcpMainReturnsWithConnectionsOpen) {
  server_stats st;
  int port = 0;
  std::atomic<int> connected{0};
  std::vector<std::thread> clients;
  std::atomic<int> saw_eof{0}, saw_other{0};
  auto t0 = clock::now();
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    port = ln->local_address()->port();
    go([&] { accept_loop(*ln, st, 10s); });
    for (int i = 0; i < 4; ++i)
      clients.emplace_back([&, i] {
        int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in sa{};
        sa.sin_family = AF_INET;
        sa.sin_port = htons(static_cast<uint16_t>(port));
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        timeval tv{5, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
          saw_other.fetch_add(1);
          ::close(fd);
          connected.fetch_add(1);
          return;
        }
        if (i == 0) {
          // a client that floods requests and never reads: the server's
          // writer fills the socket buffers and parks in write
          int flags = fcntl(fd, F_GETFL);
          fcntl(fd, F_SETFL, flags | O_NONBLOCK);
          std::string many(1 << 20, 'q');
          for (std::size_t k = 63; k < many.size(); k += 64) many[k] = '\n';
          std::size_t off = 0;
          auto until = clock::now() + 300ms;
          while (off < many.size() && clock::now() < until) {
            ssize_t w = ::write(fd, many.data() + off, many.size() - off);
            if (w > 0) off += static_cast<std::size_t>(w);
            else std::this_thread::sleep_for(1ms);
          }
          fcntl(fd, F_SETFL, flags);
        }
        connected.fetch_add(1);
        // Wait for the server to go away: end of stream (or a reset, for the
        // flooding one, whose unread data the server drops).
        char b[4096];
        for (;;) {
          ssize_t n = ::read(fd, b, sizeof b);
          if (n > 0) continue;
          if (n == 0 || (n < 0 && errno == ECONNRESET)) saw_eof.fetch_add(1);
          else saw_other.fetch_add(1);
          break;
        }
        ::close(fd);
      });
    while (connected.load() < 4 || st.started.load() < 4) (void)this_fiber::sleep_for(1ms);
    (void)this_fiber::sleep_for(20ms);
    return 7;  // with everything still open
  });
  EXPECT_EQ(rc, 7);
  for (auto& t : clients) t.join();
  EXPECT_EQ(saw_other.load(), 0);
  EXPECT_EQ(saw_eof.load(), 4);
  EXPECT_EQ(st.finished.load(), 4);  // every connection's frame unwound
  EXPECT_LT(clock::now() - t0, 4s);
}

// ---------------------------------------------------------------------------
// weft::run itself

TEST(UserScenariosRun, RunTwiceInSequenceAndReturnsMainsValue) {
  for (int round = 0; round < 3; ++round) {
    int rc = weft::run(
        [round] {
          auto h = spawn([round] { return 40 + round; });
          channel<int> c(1);
          (void)c.send(h.join());
          return *c.recv();
        },
        {.workers = 2});
    EXPECT_EQ(rc, 40 + round);
  }
  EXPECT_EQ(weft::run([] {}, {.workers = 1}), 0);
  // Fibers left parked when main returns are unwound, their destructors run.
  static std::atomic<int> dtors;
  dtors = 0;
  struct guard {
    ~guard() { dtors.fetch_add(1); }
  };
  int rc = weft::run(
      [] {
        latch started(10);  // every count_down is done with it once wait() returns
        for (int i = 0; i < 10; ++i)
          go([&started] {
            guard g;
            started.count_down();
            (void)this_fiber::sleep_for(1h);
          });
        (void)started.wait(deadline(5s));
        return 3;
      },
      {.workers = 2});
  EXPECT_EQ(rc, 3);
  EXPECT_EQ(dtors.load(), 10);
  // An exception from main is rethrown by run.
  EXPECT_THROW(weft::run([]() -> int { throw std::out_of_range("x"); }, {.workers = 2}),
               std::out_of_range);
  // and the next run works
  EXPECT_EQ(weft::run([] { return 5; }, {.workers = 2}), 5);
}


// ---------------------------------------------------------------------------
// More edges

// A fiber parked on a channel that outlives the run is unwound when main
// returns: afterwards the channel has no receiver (a plain thread's
// try_send finds none), and a plain thread parked on it before still works
// with it after the run.
TEST(UserScenariosRun, ChannelOutlivingTheRunForgetsUnwoundFibers) {
  channel<int> rv;       // rendezvous: a send needs a receiver waiting
  channel<int> full(1);  // a fiber parks sending into it
  channel<int> tq;       // a plain thread parks receiving from it
  std::atomic<int> thread_got{0};
  std::thread t;
  int rc = weft::run(
      [&] {
        latch started(5);
        for (int i = 0; i < 4; ++i)
          go([&] {
            started.count_down();
            (void)rv.recv();
          });
        go([&] {
          (void)full.send(1);
          started.count_down();
          (void)full.send(2);
        });
        t = std::thread([&] { thread_got = tq.recv().value_or(-1); });
        (void)started.wait(deadline(5s));
        (void)this_fiber::sleep_for(10ms);  // they park
        return 0;
      },
      {.workers = 2});
  EXPECT_EQ(rc, 0);
  // The unwound receivers left rv: nobody takes a value.
  auto r = rv.try_send(5);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), std::errc::operation_would_block);
  // The unwound sender's 2 was never sent.
  EXPECT_EQ(full.try_recv().value_or(-1), 1);
  auto r2 = full.try_recv();
  ASSERT_FALSE(r2);
  EXPECT_EQ(r2.error(), std::errc::operation_would_block);
  // The plain thread still waits on tq, and gets a value sent now.
  ASSERT_TRUE(tq.send(7, deadline(5s)));
  t.join();
  EXPECT_EQ(thread_got.load(), 7);
}

// fiber_local values of fibers unwound at main's return are destroyed too,
// and a value whose destructor parks (returns a resource through a
// channel) may do so at its fiber's exit.
struct returns_on_exit {
  channel<int>* back = nullptr;
  ~returns_on_exit() {
    if (back) (void)back->send(1, deadline(1s));
  }
};

TEST_P(UserScenarios, FiberLocalDestructorsRunAtExitAndUnwind) {
  counted::live = 0;
  int rc = Run([&] {
    fiber_local<counted> fl;
    fiber_local<returns_on_exit> res;
    channel<int> back;  // rendezvous: the destructor parks until main takes it
    latch started(5);
    for (int i = 0; i < 5; ++i)
      go([&] {
        fl->v = 1;
        started.count_down();
        (void)this_fiber::sleep_for(1h);
      });
    if (!started.wait(deadline(5s))) return 3;
    auto h = spawn([&] { res->back = &back; });
    if (!back.recv(deadline(5s))) return 1;
    h.join();
    if (counted::live.load() != 5) return 2;
    return 0;
  });
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(counted::live.load(), 0);
}

// A blocking() call in flight when main returns is waited for; run then
// returns main's value.
TEST_P(UserScenarios, MainReturnsWithBlockingCallInFlight) {
  std::atomic<bool> finished{false}, began{false};
  int rc = Run([&] {
    go([&] {
      (void)blocking([&] {
        began = true;
        std::this_thread::sleep_for(100ms);
        finished = true;
        return 0;
      });
    });
    while (!began.load()) (void)this_fiber::sleep_for(1ms);
    return 4;
  });
  EXPECT_EQ(rc, 4);
  EXPECT_TRUE(finished.load());
}

// A task_group child spawns more children into the group while the owner
// waits; after a failure, a child spawned later starts stopped.
TEST_P(UserScenarios, TaskGroupGrowsWhileWaitingAndStopsLateChildren) {
  int rc = Run([&] {
    std::atomic<int> ran{0};
    {
      task_group g;
      g.spawn([&] {
        for (int i = 0; i < 10; ++i)
          g.spawn([&] {
            (void)this_fiber::sleep_for(2ms);
            ran.fetch_add(1);
          });
      });
      if (!g.wait()) return 1;
      if (ran.load() != 10) return 2;
    }
    {
      task_group g;
      g.spawn([]() -> result<void> { return make_error(std::errc::io_error); });
      (void)this_fiber::sleep_for(5ms);
      std::atomic<bool> late_cancelled{false};
      g.spawn([&] {
        auto r = this_fiber::sleep_for(10s);
        late_cancelled = !r && r.error() == std::errc::operation_canceled;
      });
      auto r = g.wait();
      if (r || r.error() != std::errc::io_error) return 3;
      if (!late_cancelled.load()) return 4;
    }
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

// A plain thread selects on a fiber's stop token and a channel.
TEST_P(UserScenarios, PlainThreadSelectsOnFibersToken) {
  int rc = Run([&] {
    channel<int> never;
    std::atomic<int> fired{-2};
    channel<int> ready(1);
    auto h = spawn([&] {
      auto tok = this_fiber::stop_token();
      std::thread t([&, tok] {
        std::optional<int> v;
        (void)ready.try_send(1);
        fired = select(never.on_recv(v), tok, after(5s)).index();
      });
      auto r = this_fiber::sleep_for(5s);
      // stopped: joining a plain thread blocks the worker briefly; it ends
      // at once since the token fired
      t.join();
      return !r ? 0 : 1;
    });
    (void)ready.recv();
    (void)this_fiber::sleep_for(2ms);
    h.request_stop();
    if (h.join() != 0) return 1;
    return fired.load() == 1 ? 0 : 2;
  });
  EXPECT_EQ(rc, 0);
}

// The server's writer is parked in write to a peer that does not read;
// the peer resets. The writer's call fails (not hangs), so the connection
// ends.
TEST_P(UserScenarios, TcpWriterParkedWhenPeerResets) {
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    auto addr = ln->local_address();
    std::atomic<long> written{0};
    auto server = spawn([&]() -> int {
      auto c = ln->accept(deadline(5s));
      if (!c) return 10;
      std::string chunk(16 * 1024, 'z');
      for (;;) {
        auto r = c->write(chunk, deadline(5s));
        if (!r) return r.error() == std::errc::timed_out ? 11 : 0;  // EPIPE / ECONNRESET
        written.fetch_add(static_cast<long>(*r));
      }
    });
    auto c = tcp_stream::connect(*addr, deadline(5s));
    if (!c) return 2;
    // Wait until the writer stopped making progress: parked on full buffers.
    long last = -1;
    for (int i = 0; i < 500; ++i) {
      (void)this_fiber::sleep_for(10ms);
      long now = written.load();
      if (now > 0 && now == last) break;
      last = now;
    }
    linger lg{1, 0};
    if (setsockopt(c->native_handle(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg) != 0) return 4;
    if (!c->close()) return 5;
    return server.join();
  });
  EXPECT_EQ(rc, 0);
}

// The idle fiber closes a stream whose reader is parked in read_pooled.
TEST_P(UserScenarios, TcpCloseWakesReadPooled) {
  int rc = Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    if (!ln) return 1;
    auto addr = ln->local_address();
    auto client = tcp_stream::connect(*addr, deadline(5s));
    if (!client) return 2;
    auto c = ln->accept(deadline(5s));
    if (!c) return 3;
    auto reader = spawn([&] {
      auto r = c->read_pooled();
      return !r && r.error() == std::errc::bad_file_descriptor;
    });
    (void)this_fiber::sleep_for(20ms);
    if (!c->close()) return 4;
    if (!reader.join()) return 5;
    // the client sees the end
    char b[4];
    auto n = client->read(b, deadline(5s));
    if (!n || *n != 0) return 6;
    return 0;
  });
  EXPECT_EQ(rc, 0);
}

}  // namespace
}  // namespace weft
