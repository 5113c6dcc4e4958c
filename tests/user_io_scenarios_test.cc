// tests/user_io_scenarios_test.cc
//
// Small programs written the way README.md tells a new user to write them,
// for the I/O parts of the public API: files (weft::file), the blocking
// pool (weft::blocking), signals (weft::signal_set), readiness waits on
// descriptors weft does not own (wait_readable / wait_writable), UDP, Unix
// stream sockets, weft::resolve, and a server that calls a slow "database"
// on the blocking pool per request. Each case checks what the README (or
// the public header it names) promises.
//
// Runs on both I/O drivers (tests/BUILD.bazel).
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/sync.h"
#include "runtime/weft.h"
#include "io/socket_test_util.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;
using testing::open_fds;

class UserIo : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(UserIo);

// A fresh path under $TEST_TMPDIR (or /tmp), unique per test and worker count.
std::string temp_path(const std::string& leaf) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(dir ? dir : "/tmp") + "/" + info->name() + "_" + leaf;
  std::replace(name.begin() + static_cast<long>(std::string(dir ? dir : "/tmp").size()) + 1,
               name.end(), '/', '_');
  ::unlink(name.c_str());
  return name;
}

// A Unix socket path: under $TEST_TMPDIR when it fits in sun_path (107
// bytes; Bazel's can be longer), else under /tmp.
std::string socket_path(const std::string& leaf) {
  std::string p = temp_path(leaf + ".sock");
  if (p.size() <= 100) return p;
  p = "/tmp/weft_" + std::to_string(::getpid()) + "_" + leaf + ".sock";
  ::unlink(p.c_str());
  return p;
}

// ---------------------------------------------------------------------------
// Files

// Several fibers write disjoint chunks of one file at once, fsync, reopen,
// read everything back; reads at and past the end return 0.
TEST_P(UserIo, FileConcurrentWriteAtFsyncReopenReadBack) {
  constexpr int kFibers = 8, kChunksPerFiber = 16, kChunk = 4096;
  const std::string path = temp_path("data");
  Run([&] {
    int fds0 = open_fds();
    {
      auto f = file::open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
      ASSERT_TRUE(f) << f.error().message();
      std::vector<join_handle<int>> hs;
      for (int w = 0; w < kFibers; ++w)
        hs.push_back(spawn([&, w] {
          std::string chunk(kChunk, '\0');
          int bad = 0;
          for (int c = 0; c < kChunksPerFiber; ++c) {
            int index = c * kFibers + w;  // interleaved: neighbours belong to other fibers
            std::fill(chunk.begin(), chunk.end(), static_cast<char>('A' + index % 26));
            std::snprintf(chunk.data(), 16, "%08d", index);
            if (!f->write_at({chunk.data(), chunk.size()}, std::uint64_t{1} * index * kChunk))
              ++bad;
            if (c % 4 == 0) this_fiber::yield();
          }
          return bad;
        }));
      for (auto& h : hs) EXPECT_EQ(h.join(), 0);
      ASSERT_TRUE(f->fsync());
      ASSERT_TRUE(f->fsync(true));
      ASSERT_TRUE(f->close());
      EXPECT_FALSE(f->is_open());
      EXPECT_EQ(f->native_handle(), -1);
      // A closed file's calls fail, as a closed socket's do.
      char b[4];
      EXPECT_EQ(f->read_at(b, 0).error(), std::errc::bad_file_descriptor);
      EXPECT_EQ(f->write_at({"x", 1}, 0).error(), std::errc::bad_file_descriptor);
      EXPECT_EQ(f->fsync().error(), std::errc::bad_file_descriptor);
    }
    constexpr std::uint64_t kSize = std::uint64_t{kFibers} * kChunksPerFiber * kChunk;
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), kSize);

    auto f = file::open(path, O_RDONLY);
    ASSERT_TRUE(f) << f.error().message();
    std::string buf(kChunk, '\0');
    for (int index = 0; index < kFibers * kChunksPerFiber; ++index) {
      auto n = f->read_at({buf.data(), buf.size()}, std::uint64_t{1} * index * kChunk);
      ASSERT_TRUE(n) << n.error().message();
      ASSERT_EQ(*n, std::size_t{kChunk});
      char want[16];
      std::snprintf(want, sizeof want, "%08d", index);
      ASSERT_EQ(std::string(buf.data(), 8), want);
      ASSERT_EQ(buf[100], static_cast<char>('A' + index % 26));
    }
    // Straddling the end: the bytes that exist. At and past the end: 0.
    auto n = f->read_at({buf.data(), buf.size()}, kSize - 10);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 10u);
    n = f->read_at({buf.data(), buf.size()}, kSize);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 0u);
    n = f->read_at({buf.data(), buf.size()}, kSize * 1000);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 0u);
    // Writing to a read-only file is the system's error.
    EXPECT_EQ(f->write_at({"x", 1}, 0).error(), std::errc::bad_file_descriptor);
    ASSERT_TRUE(f->close());
    EXPECT_EQ(open_fds(), fds0);
  });
}

// Open errors are values with open(2)'s error, and leave no descriptor.
TEST_P(UserIo, FileOpenErrorsAreValuesAndLeakNothing) {
  const std::string dir = temp_path("dir");
  const std::string locked = temp_path("locked");
  const std::string exists = temp_path("exists");
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  Run([&] {
    int fds0 = open_fds();
    auto missing = file::open(dir + "/no/such/file", O_RDONLY);
    ASSERT_FALSE(missing);
    EXPECT_EQ(missing.error(), std::errc::no_such_file_or_directory);

    auto d = file::open(dir, O_RDWR);
    ASSERT_FALSE(d);
    EXPECT_EQ(d.error(), std::errc::is_a_directory);
    // A directory opens read-only (open(2) allows it); reading it is EISDIR.
    auto dr = file::open(dir, O_RDONLY);
    ASSERT_TRUE(dr) << dr.error().message();
    char b[16];
    EXPECT_EQ(dr->read_at(b, 0).error(), std::errc::is_a_directory);
    ASSERT_TRUE(dr->close());

    {
      auto f = file::open(exists, O_WRONLY | O_CREAT | O_EXCL, 0600);
      ASSERT_TRUE(f);
      auto again = file::open(exists, O_WRONLY | O_CREAT | O_EXCL, 0600);
      ASSERT_FALSE(again);
      EXPECT_EQ(again.error(), std::errc::file_exists);
    }  // the destructor closes

    EXPECT_EQ(file::open(std::string("a\0b", 3), O_RDONLY).error(),
              std::errc::invalid_argument);

    {
      auto f = file::open(locked, O_WRONLY | O_CREAT | O_TRUNC, 0000);
      ASSERT_TRUE(f);
    }
    auto denied = file::open(locked, O_RDONLY);
    if (::geteuid() == 0) {
      // root reads a mode-0 file; nothing to check but the descriptor count.
      EXPECT_TRUE(denied);
    } else {
      ASSERT_FALSE(denied);
      EXPECT_EQ(denied.error(), std::errc::permission_denied);
    }
    denied = {};  // closes it, if root opened it
    EXPECT_EQ(open_fds(), fds0);
  });
}

// An empty (default-constructed or moved-from) file fails its calls with
// EBADF, as a closed one does; a plain thread cannot open files.
TEST_P(UserIo, FileEmptyAndMovedFromAndPlainThread) {
  const std::string path = temp_path("f");
  Run([&] {
    file empty;
    char b[4];
    EXPECT_FALSE(empty.is_open());
    EXPECT_EQ(empty.read_at(b, 0).error(), std::errc::bad_file_descriptor);
    EXPECT_EQ(empty.write_at({"x", 1}, 0).error(), std::errc::bad_file_descriptor);
    EXPECT_EQ(empty.fsync().error(), std::errc::bad_file_descriptor);
    EXPECT_TRUE(empty.close());

    auto f = file::open(path, O_RDWR | O_CREAT, 0600);
    ASSERT_TRUE(f);
    file g = std::move(*f);
    EXPECT_EQ(f->read_at(b, 0).error(), std::errc::bad_file_descriptor);
    ASSERT_TRUE(g.write_at({"abcd", 4}, 0));
    auto n = g.read_at(b, 0);
    ASSERT_TRUE(n);
    EXPECT_EQ(std::string(b, *n), "abcd");

    std::error_code from_thread;
    std::thread([&] {
      auto r = file::open(path, O_RDONLY);
      from_thread = r ? std::error_code{} : r.error();
    }).join();
    EXPECT_EQ(from_thread, std::errc::not_supported);
  });
}

// A file closed off a fiber — by a plain thread, inside a blocking() call,
// or by main's thread after the run — is closed: close() succeeds and no
// descriptor is left behind.
TEST(UserIoNoFixture, FileClosedOffAFiberLeavesNoDescriptor) {
  const std::string path = temp_path("f");
  file kept;
  const int fds0 = open_fds();
  weft::run([&] {
    auto a = file::open(path, O_RDWR | O_CREAT, 0600);
    auto b = file::open(path, O_RDONLY);
    auto c = file::open(path, O_RDONLY);
    ASSERT_TRUE(a && b && c);
    const int fds_open = open_fds();
    std::error_code by_thread;
    std::thread([&] {
      auto r = b->close();
      by_thread = r ? std::error_code{} : r.error();
    }).join();
    EXPECT_FALSE(by_thread) << by_thread.message();
    EXPECT_FALSE(b->is_open());
    EXPECT_EQ(open_fds(), fds_open - 1);
    auto in_pool = blocking([&] { return c->close(); });
    EXPECT_TRUE(in_pool) << in_pool.error().message();
    EXPECT_EQ(open_fds(), fds_open - 2);
    kept = std::move(*a);
  }, {.workers = 2});
  EXPECT_TRUE(kept.is_open());
  auto r = kept.close();
  EXPECT_TRUE(r) << r.error().message();
  EXPECT_FALSE(kept.is_open());
  EXPECT_EQ(open_fds(), fds0);
}

// ---------------------------------------------------------------------------
// The blocking pool

// More calls at once than the pool has threads (64): all finish, each with
// its own result.
TEST_P(UserIo, BlockingManyMoreCallsThanThreads) {
  constexpr int kCalls = 200;
  Run([&] {
    std::atomic<int> running{0}, most{0};
    std::vector<join_handle<long>> hs;
    for (int i = 0; i < kCalls; ++i)
      hs.push_back(spawn([&, i] {
        return blocking([&, i] {
          int now = running.fetch_add(1) + 1;
          int m = most.load();
          while (now > m && !most.compare_exchange_weak(m, now)) {
          }
          std::this_thread::sleep_for(5ms);
          running.fetch_sub(1);
          return long{i} * i;
        });
      }));
    for (int i = 0; i < kCalls; ++i) EXPECT_EQ(hs[i].join(), long{i} * i);
    EXPECT_GT(most.load(), 1);   // they ran in parallel ...
    EXPECT_LE(most.load(), 64);  // ... on a bounded pool
  });
}

struct db_error : std::runtime_error {
  int code;
  db_error(const char* what, int c) : std::runtime_error(what), code(c) {}
};

// An exception from fn reaches the caller with its type; a move-only
// result is moved out; a void fn works; a mutable, move-only callable works.
TEST_P(UserIo, BlockingExceptionsMoveOnlyResultsAndCallables) {
  Run([&] {
    try {
      (void)blocking([]() -> int { throw db_error("no such table", 42); });
      ADD_FAILURE() << "no exception";
    } catch (const db_error& e) {
      EXPECT_STREQ(e.what(), "no such table");
      EXPECT_EQ(e.code, 42);
    }
    auto p = blocking([] { return std::make_unique<std::string>("moved"); });
    ASSERT_TRUE(p);
    EXPECT_EQ(*p, "moved");

    struct no_default {
      explicit no_default(int v) : v(v) {}
      no_default(no_default&&) = default;
      int v;
    };
    EXPECT_EQ(blocking([] { return no_default(7); }).v, 7);

    int side = 0;
    blocking([&] { side = 5; });
    EXPECT_EQ(side, 5);

    auto owned = std::make_unique<int>(3);
    int calls = 0;
    auto fn = [o = std::move(owned), &calls]() mutable { return *o + ++calls; };
    EXPECT_EQ(blocking(fn), 4);
    EXPECT_EQ(blocking(std::move(fn)), 5);

    // A worker fiber keeps running while calls block (nothing starves).
    std::atomic<bool> ticked{false};
    auto ticker = spawn([&] { ticked = true; });
    blocking([&] {
      for (int i = 0; i < 500 && !ticked.load(); ++i) std::this_thread::sleep_for(1ms);
    });
    ticker.join();
    EXPECT_TRUE(ticked.load());
  });
}

// A fiber asked to stop while its call runs still gets the call's result
// (fn runs on the fiber's data, so it is waited for); so does a call made
// after the stop request. Nested calls run on the pool thread.
TEST_P(UserIo, BlockingUnderStopRequestAndNested) {
  Run([&] {
    std::atomic<bool> started{false};
    auto h = spawn([&] {
      std::string data = "caller's";
      auto r = blocking([&] {
        started = true;
        std::this_thread::sleep_for(50ms);
        return data + " data";
      });
      bool stop_seen = this_fiber::stop_requested();
      auto again = blocking([] { return 11; });
      return std::make_pair(r + (stop_seen ? " (stopped)" : ""), again);
    });
    while (!started.load()) (void)this_fiber::sleep_for(1ms);
    h.request_stop();
    auto [r, again] = h.join();
    EXPECT_EQ(r, "caller's data (stopped)");
    EXPECT_EQ(again, 11);

    std::thread::id outer, inner;
    int v = blocking([&] {
      outer = std::this_thread::get_id();
      return blocking([&] {
        inner = std::this_thread::get_id();
        return 9;
      });
    });
    EXPECT_EQ(v, 9);
    EXPECT_EQ(outer, inner);
  });
}

// ---------------------------------------------------------------------------
// Signals

struct sigaction disposition_of(int sig) {
  struct sigaction sa {};
  ::sigaction(sig, nullptr, &sa);
  return sa;
}

void custom_handler(int) {}

// A plain thread raises SIGUSR1 several times (each after the previous was
// seen, so none merge); wait() returns each once, try_wait() then has
// nothing. Two sets see every delivery. The last set gone restores the
// program's own handler.
TEST_P(UserIo, SignalsCountedPerSetAndDispositionRestored) {
  constexpr int kTimes = 5;
  struct sigaction mine {};
  mine.sa_handler = &custom_handler;
  mine.sa_flags = SA_RESTART;
  struct sigaction old {};
  ASSERT_EQ(::sigaction(SIGUSR1, &mine, &old), 0);
  Run([&] {
    auto a = signal_set::watch({SIGUSR1});
    ASSERT_TRUE(a) << a.error().message();
    EXPECT_EQ(a->try_wait().error(), std::errc::resource_unavailable_try_again);
    {
      auto b = signal_set::watch({SIGUSR1, SIGUSR2});
      ASSERT_TRUE(b);
      channel<int> seen(0);
      // The raiser counts as a possible waker from the start (README,
      // *Channels*): main may park sending to it before the thread first
      // blocks in seen.recv(), and would otherwise be reported as a
      // deadlock (seen once under TSan).
      std::thread raiser([&, waker = outside_ref{}] {
        for (int i = 0; i < kTimes; ++i) {
          ::kill(::getpid(), SIGUSR1);
          if (!seen.recv()) return;  // a saw it
        }
      });
      int got = 0;
      for (int i = 0; i < kTimes; ++i) {
        auto s = a->wait(deadline(5s));
        if (!s) break;
        EXPECT_EQ(*s, SIGUSR1);
        ++got;
        ASSERT_TRUE(seen.send(1));
      }
      raiser.join();
      EXPECT_EQ(got, kTimes);
      EXPECT_EQ(a->try_wait().error(), std::errc::resource_unavailable_try_again);
      // b saw all of them too, without waiting at the time.
      int got_b = 0;
      while (auto s = b->try_wait()) {
        EXPECT_EQ(*s, SIGUSR1);
        ++got_b;
      }
      EXPECT_EQ(got_b, kTimes);
      EXPECT_EQ(b->wait(deadline(20ms)).error(), std::errc::timed_out);
    }
    // b gone, a still watches; SIGUSR2 (b's alone) is back to its default.
    EXPECT_EQ(disposition_of(SIGUSR2).sa_handler, SIG_DFL);
    ::kill(::getpid(), SIGUSR1);
    auto s = a->wait(deadline(5s));
    ASSERT_TRUE(s);
    EXPECT_EQ(*s, SIGUSR1);
    // Moving keeps watching.
    signal_set moved = std::move(*a);
    ::kill(::getpid(), SIGUSR1);
    s = moved.wait(deadline(5s));
    ASSERT_TRUE(s);
    EXPECT_EQ(*s, SIGUSR1);
  });
  // Every set gone: the program's handler is back.
  struct sigaction now = disposition_of(SIGUSR1);
  EXPECT_EQ(now.sa_handler, &custom_handler);
  EXPECT_TRUE(now.sa_flags & SA_RESTART);
  ASSERT_EQ(::sigaction(SIGUSR1, &old, nullptr), 0);
}

// Watching SIGPIPE (say, to log it) and stopping must not undo weft's own
// SIGPIPE handling: a write to a closed peer is still EPIPE, not death.
TEST_P(UserIo, SignalWatchingSigpipeThenStoppingKeepsEpipe) {
  Run([&] {
    struct sigaction before = disposition_of(SIGPIPE);
    {
      auto s = signal_set::watch({SIGPIPE});
      ASSERT_TRUE(s);
    }
    EXPECT_EQ(disposition_of(SIGPIPE).sa_handler, before.sa_handler);
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    ::close(sv[1]);
    tcp_stream c(sv[0]);
    auto w = c.write_all({"x", 1});
    ASSERT_FALSE(w);
    EXPECT_EQ(w.error(), std::errc::broken_pipe);
  });
}

// ---------------------------------------------------------------------------
// Readiness waits on descriptors weft does not own

using testing::pipe_fds;

// A C library's pipe, written by its own plain thread: the fiber waits,
// reads what came, and waits again, until the writer hangs up.
TEST_P(UserIo, WaitReadableOnAPipeFedByAPlainThread) {
  constexpr int kMessages = 20;
  Run([&] {
    pipe_fds p;
    std::thread writer([&] {
      for (int i = 0; i < kMessages; ++i) {
        std::this_thread::sleep_for(1ms);
        char c = static_cast<char>('a' + i % 26);
        EXPECT_EQ(::write(p.w, &c, 1), 1);
      }
      ::close(std::exchange(p.w, -1));
    });
    std::string got;
    for (;;) {
      auto r = wait_readable(p.r, deadline(5s));
      ASSERT_TRUE(r) << r.error().message();
      char buf[64];
      ssize_t n = ::read(p.r, buf, sizeof buf);
      if (n == 0) break;
      if (n < 0) {
        ASSERT_EQ(errno, EAGAIN);  // a spurious readiness is allowed, an error is not
        continue;
      }
      got.append(buf, static_cast<std::size_t>(n));
    }
    writer.join();
    EXPECT_EQ(got.size(), std::size_t{kMessages});
  });
}

// Deadline, stop request, a descriptor that is not open; and a descriptor
// closed by someone else under the waiter (the documented rule: nothing
// wakes it, its deadline does).
TEST_P(UserIo, WaitReadableDeadlineStopBadDescriptorAndForeignClose) {
  Run([&] {
    pipe_fds p;
    auto t0 = clock::now();
    EXPECT_EQ(wait_readable(p.r, deadline(30ms)).error(), std::errc::timed_out);
    EXPECT_GE(clock::now() - t0, 30ms);
    // Writable at once: a pipe with room.
    EXPECT_TRUE(wait_writable(p.w, deadline(1s)));

    auto h = spawn([&] { return wait_readable(p.r); });
    (void)this_fiber::sleep_for(20ms);
    h.request_stop();
    auto r = h.join();
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error(), std::errc::operation_canceled);

    int closed = ::dup(p.r);
    ASSERT_GE(closed, 0);
    ::close(closed);
    EXPECT_EQ(wait_readable(closed, deadline(1s)).error(), std::errc::bad_file_descriptor);
    EXPECT_EQ(wait_writable(-1, deadline(1s)).error(), std::errc::bad_file_descriptor);

    // Someone else closes the descriptor under the waiter.
    int fds[2];
    ASSERT_EQ(::pipe2(fds, O_CLOEXEC | O_NONBLOCK), 0);
    auto waiter = spawn([&] { return wait_readable(fds[0], deadline(200ms)); });
    (void)this_fiber::sleep_for(20ms);
    ::close(fds[0]);
    auto wr = waiter.join();  // returns: by its deadline at the latest
    ::close(fds[1]);
    if (!wr) {
      EXPECT_TRUE(wr.error() == std::errc::timed_out ||
                  wr.error() == std::errc::bad_file_descriptor)
          << wr.error().message();
    }
  });
}

// Two fibers wait on the same foreign socket at once, one to read and one
// to write (a C client library's socket with a request going out and a
// reply expected): both wake, as two poll(2) callers would.
TEST_P(UserIo, WaitReadableAndWritableOnOneSocketFromTwoFibers) {
  Run([&] {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    int sz = 4096;
    ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    std::string junk(4096, 'j');
    std::size_t filled = 0;
    for (;;) {
      ssize_t n = ::send(sv[0], junk.data(), junk.size(), MSG_DONTWAIT);
      if (n <= 0) break;
      filled += static_cast<std::size_t>(n);
    }
    ASSERT_GT(filled, 0u);
    std::atomic<int> parked{0};
    auto reader = spawn([&] {
      parked.fetch_add(1);
      return wait_readable(sv[0], deadline(5s));
    });
    auto writer = spawn([&] {
      parked.fetch_add(1);
      return wait_writable(sv[0], deadline(5s));
    });
    auto reader2 = spawn([&] {
      parked.fetch_add(1);
      return wait_readable(sv[0], deadline(5s));
    });
    while (parked.load() < 3) (void)this_fiber::sleep_for(1ms);
    (void)this_fiber::sleep_for(20ms);
    // The peer drains what was sent and answers.
    std::thread peer([&] {
      std::string buf(1 << 16, '\0');
      std::size_t got = 0;
      while (got < filled) {
        ssize_t n = ::recv(sv[1], buf.data(), buf.size(), 0);
        if (n > 0) got += static_cast<std::size_t>(n);
        else std::this_thread::sleep_for(1ms);
      }
      EXPECT_EQ(::send(sv[1], "reply", 5, 0), 5);
    });
    auto rr = reader.join(), wr = writer.join(), rr2 = reader2.join();
    peer.join();
    EXPECT_TRUE(rr) << rr.error().message();
    EXPECT_TRUE(wr) << wr.error().message();
    EXPECT_TRUE(rr2) << rr2.error().message();
    ::close(sv[0]);
    ::close(sv[1]);
  });
}

// ---------------------------------------------------------------------------
// UDP, Unix stream sockets, resolve

// Several client fibers, each with its own socket, ping a UDP echo server
// fiber; every reply comes back to its sender with the server's address.
TEST_P(UserIo, UdpEchoServerManyClientFibers) {
  constexpr int kClients = 8, kPings = 50;
  Run([&] {
    auto srv = udp_socket::bind("127.0.0.1:0");
    ASSERT_TRUE(srv) << srv.error().message();
    auto srv_addr = srv->local_address();
    ASSERT_TRUE(srv_addr);
    auto server = spawn([&] {
      int echoed = 0;
      char buf[2048];
      for (;;) {
        socket_address from;
        auto n = srv->recv_from(buf, &from);
        if (!n) break;  // closed
        if (srv->send_to({buf, *n}, from)) ++echoed;
      }
      return echoed;
    });
    std::vector<join_handle<int>> clients;
    for (int c = 0; c < kClients; ++c)
      clients.push_back(spawn([&, c] {
        auto s = udp_socket::bind("127.0.0.1:0");
        if (!s) return -1;
        int ok = 0;
        for (int i = 0; i < kPings; ++i) {
          std::string msg = std::to_string(c) + ":" + std::to_string(i);
          if (!s->send_to({msg.data(), msg.size()}, *srv_addr)) return -2;
          char buf[64];
          socket_address from;
          auto n = s->recv_from(buf, &from, deadline(5s));
          if (!n) return -3;
          if (std::string(buf, *n) != msg) return -4;
          if (from.to_string() != srv_addr->to_string()) return -5;
          ++ok;
        }
        return ok;
      }));
    for (auto& h : clients) EXPECT_EQ(h.join(), kPings);
    ASSERT_TRUE(srv->close());
    EXPECT_EQ(server.join(), kClients * kPings);
  });
}

// Datagram edge cases: an empty datagram is received as 0 bytes; one that
// fills the buffer exactly is whole; a longer one is an error
// (message_size, never a silent cut), with its first bytes and sender; a
// receive with nothing sent times out.
TEST_P(UserIo, UdpEmptyTruncatedAndTimeout) {
  Run([&] {
    auto a = udp_socket::bind("127.0.0.1:0");
    auto b = udp_socket::bind("127.0.0.1:0");
    ASSERT_TRUE(a && b);
    auto b_addr = b->local_address();
    ASSERT_TRUE(b_addr);
    char buf[8];
    socket_address from;
    EXPECT_EQ(b->recv_from(buf, &from, deadline(20ms)).error(), std::errc::timed_out);

    auto s = a->send_to({}, *b_addr);
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_EQ(*s, 0u);
    auto n = b->recv_from(buf, &from, deadline(5s));
    ASSERT_TRUE(n) << n.error().message();
    EXPECT_EQ(*n, 0u);
    EXPECT_EQ(from.to_string(), a->local_address()->to_string());

    ASSERT_TRUE(a->send_to({"12345678", sizeof buf}, *b_addr));
    n = b->recv_from(buf, nullptr, deadline(5s));
    ASSERT_TRUE(n) << n.error().message();
    EXPECT_EQ(std::string(buf, *n), "12345678");

    std::string big(100, 'z');
    ASSERT_TRUE(a->send_to({big.data(), big.size()}, *b_addr));
    ASSERT_TRUE(a->send_to({"next", 4}, *b_addr));
    from = socket_address{};
    n = b->recv_from(buf, &from, deadline(5s));
    ASSERT_FALSE(n) << "a 100-byte datagram was cut to " << *n << " bytes without an error";
    EXPECT_EQ(n.error(), std::errc::message_size) << n.error().message();
    EXPECT_EQ(std::string(buf, sizeof buf), std::string(sizeof buf, 'z'));
    EXPECT_EQ(from.to_string(), a->local_address()->to_string());
    n = b->recv_from(buf, nullptr, deadline(5s));  // the rest of `big` is gone
    ASSERT_TRUE(n);
    EXPECT_EQ(std::string(buf, *n), "next");
  });
}

// A Unix stream echo server: per-connection fibers, several clients; the
// listener's close() removes its socket file, so the path binds again.
TEST_P(UserIo, UnixStreamEchoServer) {
  constexpr int kClients = 8, kRounds = 20;
  const std::string path = socket_path("echo");
  Run([&] {
    auto ln = tcp_listener::bind("unix:" + path);
    ASSERT_TRUE(ln) << ln.error().message();
    EXPECT_EQ(ln->local_address()->to_string(), "unix:" + path);
    auto acceptor = spawn([&] {
      for (;;) {
        auto c = ln->accept();
        if (!c) return;
        go([c = std::move(*c)]() mutable {
          char buf[256];
          while (auto n = c.read(buf, deadline(5s)))
            if (*n == 0 || !c.write_all({buf, *n})) break;
        });
      }
    });
    std::vector<join_handle<int>> cs;
    for (int i = 0; i < kClients; ++i)
      cs.push_back(spawn([&, i] {
        auto c = tcp_stream::connect("unix:" + path, deadline(5s));
        if (!c) return -1;
        for (int r = 0; r < kRounds; ++r) {
          std::string m = "client " + std::to_string(i) + " round " + std::to_string(r);
          if (!c->write_all({m.data(), m.size()})) return -2;
          std::string got(m.size(), '\0');
          if (!c->read_exact({got.data(), got.size()}, deadline(5s))) return -3;
          if (got != m) return -4;
        }
        if (c->set_nodelay(true)) return -5;  // a TCP option
        return kRounds;
      }));
    for (auto& h : cs) EXPECT_EQ(h.join(), kRounds);
    ASSERT_TRUE(ln->close());
    acceptor.join();
    struct stat st {};
    EXPECT_NE(::stat(path.c_str(), &st), 0);
    auto again = tcp_listener::bind("unix:" + path);
    EXPECT_TRUE(again) << again.error().message();
  });
}

// A Unix listener dropped without close() removes its socket file too (the
// destructor closes it), so the program can bind the path again.
TEST_P(UserIo, UnixListenerDestroyedRemovesItsFile) {
  const std::string path = socket_path("drop");
  Run([&] {
    {
      auto ln = tcp_listener::bind("unix:" + path);
      ASSERT_TRUE(ln) << ln.error().message();
      tcp_listener moved = std::move(*ln);
      struct stat st {};
      EXPECT_EQ(::stat(path.c_str(), &st), 0);
    }
    struct stat st {};
    EXPECT_NE(::stat(path.c_str(), &st), 0);
    auto again = tcp_listener::bind("unix:" + path);
    EXPECT_TRUE(again) << again.error().message();
    // Abstract names have no file.
    auto abs = tcp_listener::bind("unix:@weft_user_io_" + std::to_string(::getpid()));
    ASSERT_TRUE(abs) << abs.error().message();
    auto c = tcp_stream::connect(*abs->local_address(), deadline(5s));
    ASSERT_TRUE(c) << c.error().message();
    auto s = abs->accept(deadline(5s));
    ASSERT_TRUE(s);
    ASSERT_TRUE(c->write_all({"abc", 3}));
    char b[3];
    ASSERT_TRUE(s->read_exact(b, deadline(5s)));
    EXPECT_EQ(std::string(b, 3), "abc");
  });
}

// One UDP socket used by several fibers at once (as Go's UDPConn and
// Tokio's UdpSocket allow): two receivers and a sender on the same socket.
TEST_P(UserIo, UdpOneSocketSharedByReceiversAndASender) {
  constexpr int kDatagrams = 200;
  Run([&] {
    auto a = udp_socket::bind("127.0.0.1:0");
    auto b = udp_socket::bind("127.0.0.1:0");
    ASSERT_TRUE(a && b);
    auto b_addr = *b->local_address();
    auto a_addr = *a->local_address();
    std::atomic<int> got{0};
    auto recv_loop = [&] {
      char buf[64];
      while (got.load() < kDatagrams) {
        auto n = b->recv_from(buf, nullptr, deadline(200ms));
        if (n) {
          got.fetch_add(1);
          continue;
        }
        if (n.error() != std::errc::timed_out) return false;
      }
      return true;
    };
    auto r1 = spawn(recv_loop);
    auto r2 = spawn(recv_loop);
    // b also sends (to a) while its receivers are parked on it.
    auto s = spawn([&] {
      for (int i = 0; i < 20; ++i)
        if (!b->send_to({"back", 4}, a_addr)) return false;
      return true;
    });
    // a sends in small bursts, so the receive buffer never overflows.
    for (int i = 0; i < kDatagrams; ++i) {
      ASSERT_TRUE(a->send_to({"ping", 4}, b_addr));
      if (i % 16 == 15)
        for (int k = 0; k < 200 && got.load() <= i - 8; ++k) (void)this_fiber::sleep_for(1ms);
    }
    for (int k = 0; k < 2000 && got.load() < kDatagrams; ++k) (void)this_fiber::sleep_for(1ms);
    EXPECT_TRUE(s.join());
    EXPECT_TRUE(r1.join());
    EXPECT_TRUE(r2.join());
    EXPECT_EQ(got.load(), kDatagrams);
    char buf[8];
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(a->recv_from(buf, nullptr, deadline(5s)));
    // A datagram for another address family is refused, not a crash.
    auto v6 = socket_address::parse("[::1]:9");
    ASSERT_TRUE(v6);
    EXPECT_FALSE(a->send_to({"x", 1}, *v6));
  });
}

// A signal_set made before weft::run, waited for inside it by a fiber, and
// used again after the run by the main thread.
TEST(UserIoNoFixture, SignalSetOutlivesTheRun) {
  auto set = signal_set::watch({SIGUSR2});
  ASSERT_TRUE(set);
  int rc = weft::run([&] {
    std::thread t([] { ::kill(::getpid(), SIGUSR2); });
    auto s = set->wait(deadline(5s));
    t.join();
    return s && *s == SIGUSR2 ? 0 : 1;
  }, {.workers = 2});
  EXPECT_EQ(rc, 0);
  ::kill(::getpid(), SIGUSR2);
  auto s = set->wait(deadline(5s));
  ASSERT_TRUE(s);
  EXPECT_EQ(*s, SIGUSR2);
}

// Nothing listens: connect by name fails with the connection's error.
TEST_P(UserIo, ConnectByNameToAClosedPortIsRefused) {
  Run([&] {
    int port;
    {
      auto ln = tcp_listener::bind("127.0.0.1:0");
      ASSERT_TRUE(ln);
      port = ln->local_address()->port();
    }
    auto c = tcp_stream::connect("localhost:" + std::to_string(port), deadline(5s));
    ASSERT_FALSE(c);
    EXPECT_EQ(c.error(), std::errc::connection_refused) << c.error().message();
    auto r = resolve("127.0.0.1", port);
    ASSERT_TRUE(r);
    ASSERT_EQ(r->size(), 1u);
    EXPECT_EQ((*r)[0].to_string(), "127.0.0.1:" + std::to_string(port));
  });
}

// resolve("localhost", port) then connect to what it returns, as Go's
// Dial does; connect("localhost:port") does the same in one call.
TEST_P(UserIo, ResolveLocalhostThenConnect) {
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    ASSERT_TRUE(ln);
    int port = ln->local_address()->port();
    auto acceptor = spawn([&] {
      int n = 0;
      while (auto c = ln->accept()) {
        ++n;
        (void)c->write_all({"hi", 2});
      }
      return n;
    });
    auto addrs = resolve("localhost", port);
    ASSERT_TRUE(addrs) << addrs.error().message();
    ASSERT_FALSE(addrs->empty());
    bool has_v4 = false;
    for (auto& a : *addrs) {
      EXPECT_EQ(a.port(), port);
      if (a.to_string() == "127.0.0.1:" + std::to_string(port)) has_v4 = true;
    }
    EXPECT_TRUE(has_v4);
    auto c = tcp_stream::connect(std::span<const socket_address>(*addrs), deadline(5s));
    ASSERT_TRUE(c) << c.error().message();
    char b[2];
    ASSERT_TRUE(c->read_exact(b, deadline(5s)));
    auto c2 = tcp_stream::connect("localhost:" + std::to_string(port), deadline(5s));
    ASSERT_TRUE(c2) << c2.error().message();
    ASSERT_TRUE(c2->read_exact(b, deadline(5s)));
    auto bad = resolve("localhost", 70000);
    EXPECT_FALSE(bad);
    ASSERT_TRUE(ln->close());
    EXPECT_EQ(acceptor.join(), 2);
  });
}

// ---------------------------------------------------------------------------
// A server whose requests each call a slow "database" on the blocking pool

TEST_P(UserIo, ServerWithBlockingDatabaseCallPerRequest) {
  constexpr int kClients = 40, kRequests = 10;
  Run([&] {
    auto ln = tcp_listener::bind("127.0.0.1:0");
    ASSERT_TRUE(ln);
    auto addr = *ln->local_address();
    std::mutex db_lock;  // the database: one connection, serialised
    long db_total = 0;
    auto acceptor = spawn([&] {
      for (int next = 0;; next = (next + 1) % static_cast<int>(worker_count())) {
        auto c = ln->accept();
        if (!c) return;
        go([c = std::move(*c), &db_lock, &db_total]() mutable {
          char buf[32];
          for (;;) {
            auto n = c.read_exact({buf, 8}, deadline(5s));
            if (!n) return;
            long v = std::atol(std::string(buf, 8).c_str());
            long answer = blocking([&] {
              std::this_thread::sleep_for(200us);
              std::lock_guard g(db_lock);
              db_total += v;
              return v * 2;
            });
            std::snprintf(buf, sizeof buf, "%08ld", answer);
            if (!c.write_all({buf, 8})) return;
          }
        }, {.worker = next});
      }
    });
    // A fiber that must keep getting the CPU meanwhile.
    std::atomic<bool> done{false};
    auto ticker = spawn([&] {
      int ticks = 0;
      while (!done.load()) {
        (void)this_fiber::sleep_for(1ms);
        ++ticks;
      }
      return ticks;
    });
    std::vector<join_handle<int>> cs;
    for (int i = 0; i < kClients; ++i)
      cs.push_back(spawn([&, i] {
        auto c = tcp_stream::connect(addr, deadline(5s));
        if (!c) return -1;
        for (int r = 0; r < kRequests; ++r) {
          long v = i * 100 + r;
          char buf[16];
          std::snprintf(buf, sizeof buf, "%08ld", v);
          if (!c->write_all({buf, 8})) return -2;
          if (!c->read_exact({buf, 8}, deadline(5s))) return -3;
          if (std::atol(std::string(buf, 8).c_str()) != 2 * v) return -4;
        }
        return kRequests;
      }));
    for (auto& h : cs) EXPECT_EQ(h.join(), kRequests);
    done = true;
    EXPECT_GT(ticker.join(), 0);
    long want = 0;
    for (int i = 0; i < kClients; ++i)
      for (int r = 0; r < kRequests; ++r) want += i * 100 + r;
    EXPECT_EQ(db_total, want);
    ASSERT_TRUE(ln->close());
    acceptor.join();
  });
}

// A FIFO (or a pipe, socket or terminal adopted by file(fd)) has no
// offsets: read_at and write_at fail with ESPIPE, as pread(2) and Go's and
// Tokio's read_at do, whichever driver runs them.
TEST_P(UserIo, FileReadAtOnAFifoIsIllegalSeek) {
  const std::string path = temp_path("fifo");
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  Run([&] {
    auto f = file::open(path, O_RDWR);  // O_RDWR: no wait for a peer
    ASSERT_TRUE(f) << f.error().message();
    ASSERT_EQ(::write(f->native_handle(), "abc", 3), 3);
    char b[8];
    auto n = f->read_at(b, 0);
    ASSERT_FALSE(n) << "read " << *n << " bytes at an offset of a FIFO";
    EXPECT_EQ(n.error(), std::errc::invalid_seek);
    EXPECT_EQ(f->write_at({"x", 1}, 0).error(), std::errc::invalid_seek);
    EXPECT_EQ(::read(f->native_handle(), b, sizeof b), 3);  // the data is still there

    int fds[2];
    ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    file r(fds[0]), w(fds[1]);
    ASSERT_EQ(::write(fds[1], "d", 1), 1);
    EXPECT_EQ(r.read_at(b, 0).error(), std::errc::invalid_seek);
    EXPECT_EQ(w.write_at({"x", 1}, 0).error(), std::errc::invalid_seek);
  });
}

}  // namespace
}  // namespace weft
