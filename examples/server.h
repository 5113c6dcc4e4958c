// examples/server.h — what the example servers share: their command line
//
//   --port N     (127.0.0.1 only; 0: any free port, named on stderr)
//   --workers N  (0 or absent: one per processing unit)
//   --idle S     (servers that drop silent peers: after S seconds)
// and how they stop: SIGINT or SIGTERM shuts them down gracefully.
#pragma once

#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime/net.h"
#include "runtime/weft.h"

namespace examples {

struct flags {
  int port = 7000;
  unsigned workers = 0;
  unsigned idle_seconds = 60;
};

inline bool parse_uint(const char* s, unsigned long max, unsigned long& out) {
  char* end = nullptr;
  out = std::strtoul(s, &end, 10);
  return s[0] != '\0' && *end == '\0' && out <= max;
}

// False (after printing the usage) on anything it does not understand.
inline bool parse_flags(int argc, char** argv, flags& f) {
  for (int i = 1; i < argc; ++i) {
    unsigned long v = 0;
    if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc && parse_uint(argv[i + 1], 65535, v)) {
      f.port = static_cast<int>(v);
      ++i;
    } else if (std::strcmp(argv[i], "--workers") == 0 && i + 1 < argc &&
               parse_uint(argv[i + 1], 4096, v)) {
      f.workers = static_cast<unsigned>(v);
      ++i;
    } else if (std::strcmp(argv[i], "--idle") == 0 && i + 1 < argc &&
               parse_uint(argv[i + 1], 86400, v) && v > 0) {
      f.idle_seconds = static_cast<unsigned>(v);
      ++i;
    } else {
      std::fprintf(stderr, "usage: %s [--port N] [--workers N] [--idle SECONDS]\n", argv[0]);
      return false;
    }
  }
  return true;
}

// Inside weft::run: listens on 127.0.0.1:f.port and starts a copy of
// on_conn(stream) on a fiber of its own for every connection, each on the
// next worker in turn (connections spread evenly; only one fiber waits in
// accept, so no thundering herd). On SIGINT or SIGTERM it stops accepting
// and returns 0; weft::run then unwinds the connections' fibers, whose
// destructors close their sockets (a graceful shutdown). Returns 1 if bind
// fails.
template <typename F>
int listen_and_serve(const char* who, const flags& f, F on_conn) {
  using namespace std::chrono_literals;
  auto ln = weft::tcp_listener::bind("127.0.0.1:" + std::to_string(f.port));
  if (!ln) {
    std::fprintf(stderr, "%s: bind 127.0.0.1:%d: %s\n", who, f.port, ln.error().message().c_str());
    return 1;
  }
  // Watched before the first connection, so a signal never finds the
  // default disposition (which would kill the process mid-write).
  auto stop = weft::signal_set::watch({SIGINT, SIGTERM});
  if (!stop)
    std::fprintf(stderr, "%s: SIGINT/SIGTERM not handled: %s\n", who,
                 stop.error().message().c_str());
  // The port we got: --port 0 asks for any free one.
  auto local = ln->local_address();
  std::fprintf(stderr, "%s: listening on 127.0.0.1:%d\n", who, local ? local->port() : f.port);
  auto acceptor = weft::spawn([&] {
    weft::clock::time_point reported{};  // the last accept error said on stderr
    unsigned long failed = 0;            // accept errors since then
    for (int next = 0;;) {
      auto c = ln->accept();
      if (!c) {
        if (c.error() == std::errc::operation_canceled) return;
        // EMFILE and friends: the listener keeps working, and the
        // connection waits in the backlog. Say so (at most once a second,
        // so a flood of them is one line a second), and give the other
        // fibers a moment to close descriptors instead of spinning.
        ++failed;
        if (auto now = weft::clock::now(); now - reported >= 1s) {
          const bool fds = c.error() == std::errc::too_many_files_open ||
                           c.error() == std::errc::too_many_files_open_in_system;
          std::string times = failed > 1 ? " (" + std::to_string(failed) + " times)" : "";
          std::fprintf(stderr, "%s: accept: %s%s; still accepting%s\n", who,
                       c.error().message().c_str(), times.c_str(),
                       fds ? ": raise the open-files limit (ulimit -n)" : "");
          reported = now;
          failed = 0;
        }
        (void)weft::this_fiber::sleep_for(1ms);
        continue;
      }
      // weft::go: nobody joins a connection's fiber, so it needs no join
      // state (a goroutine per connection, as in bench/peers/go/echo).
      weft::go([c = std::move(*c), on_conn]() mutable { on_conn(std::move(c)); },
               {.name = who, .worker = next});
      next = (next + 1) % int(weft::worker_count());
    }
  }, {.name = "acceptor"});
  if (stop) {
    auto sig = stop->wait();
    if (sig)
      std::fprintf(stderr, "%s: SIG%s, shutting down\n", who, sigabbrev_np(*sig));
    acceptor.request_stop();
  }
  acceptor.join();
  return 0;
}

}  // namespace examples
