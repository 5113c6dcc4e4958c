// io/accept_test.cc — accepting under pressure (io/accept.cc and the
// epoll driver's accept): acceptors on several workers that give up while
// connections arrive, a listener closed under them, a runtime that ends
// with connections taken ahead, and a burst spread over the workers.
// Every connection the kernel completed is served exactly once or closed:
// none is lost, none left hanging, no descriptor leaks. Every test runs
// over worker counts {1, 2, 4} (tests/fixture.h), on both drivers
// (io/BUILD.bazel), on 127.0.0.1 only. Bounded in time and count; they
// assert behaviour, never speed.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <set>
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
using testing::open_fds;

class Accept : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Accept);

// A plain blocking connect from any thread: the handshake is done (the
// connection waits in the listener's queue) when it returns. -1 on error.
int connect_plain(const socket_address& a) {
  int fd = ::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, a.get(), a.size()) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// What a plain client sees within `within`: 1 if a byte came, 0 at the end
// of the stream (or a reset), -1 if nothing happened (left hanging).
int client_outcome(int fd, std::chrono::milliseconds within, char* got = nullptr) {
  pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
  if (::poll(&p, 1, static_cast<int>(within.count())) <= 0) return -1;
  char b = 0;
  ssize_t n = ::recv(fd, &b, 1, MSG_DONTWAIT);
  if (n == 1) {
    if (got) *got = b;
    return 1;
  }
  return 0;
}

// Connections a multishot accept took ahead of accept() (io_uring) are not
// kept open by a closed listener: their clients see the end at the close,
// as the clients still in the kernel's queue do (and as with epoll, or Go).
// The listener object stays alive (a server that closed it to stop
// accepting while its connections drain).
TEST_P(Accept, ConnectionsTakenAheadEndWhenTheListenerCloses) {
  Run([&] {
    constexpr int kClients = 8;
    auto ln = tcp_listener::bind("127.0.0.1:0").value();
    const socket_address a = ln.local_address().value();
    auto acceptor = spawn([&] { return ln.accept(deadline(10s)); });
    (void)this_fiber::sleep_for(20ms);  // parked: on io_uring the multishot is armed
    std::vector<int> clients(kClients, -1);
    (void)blocking([&] {
      for (int& c : clients) c = connect_plain(a);
      return 0;
    });
    auto first = acceptor.join();
    ASSERT_TRUE(first) << first.error().message();
    // The multishot (still armed: nobody gave up) takes the others ahead.
    for (int i = 0; i < 200 && io::stats().accept_queued < kClients - 1; ++i)
      (void)this_fiber::sleep_for(1ms);
    ASSERT_TRUE(ln.close());
    int hanging = 0;
    (void)blocking([&] {
      for (int c : clients) {
        if (c < 0) continue;
        // The accepted one sees nothing yet; every other one its end.
        if (client_outcome(c, 2000ms) < 0) ++hanging;
      }
      return 0;
    });
    EXPECT_EQ(hanging, 1) << "clients left hanging by a closed listener (1: the one accepted)";
    EXPECT_EQ(io::stats().accept_queued, 0u);
    for (int c : clients)
      if (c >= 0) ::close(c);
  });
}

// The runtime ends right after a burst of connections reached a listener
// whose multishot accept is armed: whatever was taken ahead of accept() is
// closed, whether the listener dies inside the run or outlives it.
TEST_P(Accept, ARuntimeEndingWithConnectionsTakenAheadLeaksNoDescriptor) {
  for (bool outlives : {false, true}) {
    for (int round = 0; round < 5; ++round) {
      const int before = open_fds();
      std::vector<int> clients;
      {
        std::optional<tcp_listener> outer;
        Run([&] {
          auto ln = tcp_listener::bind("127.0.0.1:0").value();
          const socket_address a = ln.local_address().value();
          auto acceptor = spawn([&] { return ln.accept(deadline(10s)); });
          (void)this_fiber::sleep_for(10ms);  // parked: the multishot is armed
          int first = connect_plain(a);
          ASSERT_GE(first, 0);
          clients.push_back(first);
          ASSERT_TRUE(acceptor.join());  // accepted and closed at once
          // A burst, and main returns without a park in between.
          for (int i = 0; i < 40; ++i)
            if (int c = connect_plain(a); c >= 0) clients.push_back(c);
          if (outlives) outer.emplace(std::move(ln));
        });
      }
      for (int c : clients) ::close(c);
      EXPECT_EQ(open_fds(), before) << (outlives ? "outliving" : "in-run") << " listener, round "
                                    << round;
    }
  }
}

}  // namespace
}  // namespace weft
