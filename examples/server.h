// examples/server.h — what the example servers share: their command line
//
//   --port N     (127.0.0.1 only; 0: any free port, named on stderr)
//   --workers N  (0 or absent: one per processing unit)
//   --idle S     (servers that drop silent peers: after S seconds)
//   --status-port N   serve the runtime's counters over HTTP at
//                     http://127.0.0.1:N/statusz (0: any free port, named
//                     on stderr; absent: not served)
// and how they stop: SIGINT or SIGTERM shuts them down gracefully.
#pragma once

#include <signal.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "runtime/net.h"
#include "runtime/weft.h"

namespace examples {

struct flags {
  int port = 7000;
  unsigned workers = 0;
  unsigned idle_seconds = 60;
  int status_port = -1;  // -1: no /statusz
};

// Decimal digits only (strtoul alone would take " 5", "+5" and "-1", the
// last as a huge number), at most `max`.
inline bool parse_uint(const char* s, unsigned long max, unsigned long& out) {
  if (s[0] == '\0' || std::strspn(s, "0123456789") != std::strlen(s) || std::strlen(s) > 9)
    return false;
  out = std::strtoul(s, nullptr, 10);
  return out <= max;
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
    } else if (std::strcmp(argv[i], "--status-port") == 0 && i + 1 < argc &&
               parse_uint(argv[i + 1], 65535, v)) {
      f.status_port = static_cast<int>(v);
      ++i;
    } else if (std::strcmp(argv[i], "--idle") == 0 && i + 1 < argc &&
               parse_uint(argv[i + 1], 86400, v) && v > 0) {
      f.idle_seconds = static_cast<unsigned>(v);
      ++i;
    } else {
      // Which argument, and why: a flag this program does not have, one
      // missing its value, or a value out of range.
      const bool known = std::strcmp(argv[i], "--port") == 0 ||
                         std::strcmp(argv[i], "--workers") == 0 ||
                         std::strcmp(argv[i], "--status-port") == 0 ||
                         std::strcmp(argv[i], "--idle") == 0;
      if (!known)
        std::fprintf(stderr, "%s: unknown argument '%s'\n", argv[0], argv[i]);
      else if (i + 1 >= argc)
        std::fprintf(stderr, "%s: %s wants a value\n", argv[0], argv[i]);
      else
        std::fprintf(stderr, "%s: bad value '%s' for %s (%s)\n", argv[0], argv[i + 1], argv[i],
                     std::strcmp(argv[i], "--workers") == 0 ? "0 to 4096; 0: one per CPU"
                     : std::strcmp(argv[i], "--idle") == 0  ? "1 to 86400 seconds"
                                                            : "a port, 0 to 65535");
      std::fprintf(stderr,
                   "usage: %s [--port N] [--workers N] [--idle SECONDS] [--status-port N]\n",
                   argv[0]);
      return false;
    }
  }
  return true;
}

// The runtime's counters as text: what /statusz serves.
inline std::string statusz_text() {
  weft::runtime_stats st = weft::stats();
  weft::io_stats io = weft::get_io_stats();
  std::string out;
  auto line = [&out](const char* name, unsigned long long v) {
    out += name;
    out += ' ';
    out += std::to_string(v);
    out += '\n';
  };
  line("live_fibers", st.live_fibers);
  line("spawned", st.spawned);
  line("parks", st.parks);
  line("wakeups", st.wakeups);
  line("yields", st.yields);
  line("sleeps", st.sleeps);
  line("timer_steals", st.timer_steals);
  line("inject_pops", st.inject_pops);
  line("stacks_live", st.stacks_live);
  line("stacks_cached", st.stacks_cached);
  line("stack_bytes_reserved", st.stack_bytes_reserved);
  out += "stack_guard " + st.stack_guard + "\n";
  out += "io_driver " + io.driver + "\n";
  out += "io_buffer_backing " + io.buffer_backing + "\n";
  line("io_ops", io.ops);
  line("io_parked", io.parked);
  line("io_submits", io.submits);
  line("io_completions", io.completions);
  line("io_multishot_accepts", io.multishot_accepts);
  line("io_multishot_recvs", io.multishot_recvs);
  line("io_rescued", io.rescued);
  line("io_heap_buffers", io.heap_buffers);
  line("io_written_behind", io.written_behind);
  line("io_linger_timers", io.linger_timers);
  line("pooled_buffers_in_use", weft::pooled_buffer::in_use());
  line("pooled_buffers_queued", io.recv_queued);
  line("accepts_queued", io.accept_queued);
  for (std::size_t w = 0; w < st.workers.size(); ++w) {
    std::string k = "worker" + std::to_string(w) + "_";
    line((k + "fibers_run").c_str(), st.workers[w].fibers_run);
    line((k + "steals").c_str(), st.workers[w].steals);
    line((k + "overflowed").c_str(), st.workers[w].overflowed);
  }
  return out;
}

// The largest request head /statusz reads (as Go's DefaultMaxHeaderBytes
// bounds it, at 1 MiB): a longer one is refused with 431.
constexpr std::size_t kMaxRequestHead = 8192;

// The length of the request head at the start of `req`, through the blank
// line that ends it; 0 while that has not come. A line ends in "\r\n" or a
// bare "\n" (HTTP lets a server take either, RFC 9112 2.2, and Go's
// net/http does), so a head typed by hand or sent by
// `printf 'GET /statusz HTTP/1.0\n\n' | nc` is complete too.
inline std::size_t request_head_size(const std::string& req) {
  const std::size_t lf = req.find("\n\n"), crlf = req.find("\n\r\n");
  if (lf == std::string::npos && crlf == std::string::npos) return 0;
  return lf < crlf ? lf + 2 : crlf + 3;  // the first blank line ends it
}

// Ends a /statusz connection after the reply without resetting it: a
// socket closed with input unread (the rest of an over-long head, say)
// sends RST, not FIN, and a peer that gets the RST may lose the reply it
// has not read yet. So the reply is followed by our FIN, and what the peer
// still sends is read and dropped until it closes its end: at most
// kMaxDrain bytes for at most 1 s, after which the close resets it.
inline void close_after_reply(weft::tcp_stream& c) {
  using namespace std::chrono_literals;
  constexpr std::size_t kMaxDrain = 256 * 1024;
  if (!c.shutdown(SHUT_WR)) return;
  char buf[4096];
  const auto until = weft::deadline(1s);
  for (std::size_t drained = 0; drained < kMaxDrain;) {
    auto n = c.read(buf, until);
    if (!n || *n == 0) return;
    drained += *n;
  }
}

// One HTTP/1.0 exchange on a /statusz connection: GET /statusz gets the
// counters, anything else 404, a head longer than kMaxRequestHead 431;
// then the connection closes. A peer that sends no full request head
// within 5 s is dropped.
inline void serve_statusz(weft::tcp_stream c) {
  using namespace std::chrono_literals;
  std::string req;
  char buf[1024];
  const auto until = weft::deadline(5s);
  while (request_head_size(req) == 0 && req.size() <= kMaxRequestHead) {
    auto n = c.read(buf, until);
    if (!n || *n == 0) return;
    req.append(buf, *n);
  }
  const std::size_t head = request_head_size(req);
  const bool too_large = head == 0 || head > kMaxRequestHead;
  const bool ok = !too_large && (req.starts_with("GET /statusz ") || req.starts_with("GET /statusz?"));
  const char* status = too_large ? "HTTP/1.0 431 Request Header Fields Too Large"
                       : ok      ? "HTTP/1.0 200 OK"
                                 : "HTTP/1.0 404 Not Found";
  const std::string body = too_large ? "request head longer than " +
                                           std::to_string(kMaxRequestHead) + " bytes\n"
                           : ok      ? statusz_text()
                                     : "not found: try /statusz\n";
  const std::string reply = std::string(status) +
                            "\r\nContent-Type: text/plain\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  if (c.write_all(reply, until)) close_after_reply(c);
}

// Serves /statusz on 127.0.0.1:port until stopped; a connection at a time
// gets a fiber. The bind error (said on stderr) if it cannot bind.
inline weft::result<weft::join_handle<void>> start_statusz(const char* who, int port) {
  auto ln = weft::tcp_listener::bind("127.0.0.1:" + std::to_string(port));
  if (!ln) {
    std::fprintf(stderr, "%s: bind 127.0.0.1:%d for /statusz: %s\n", who, port,
                 ln.error().message().c_str());
    return std::unexpected(ln.error());
  }
  auto local = ln->local_address();
  std::fprintf(stderr, "%s: statusz on http://127.0.0.1:%d/statusz\n", who,
               local ? local->port() : port);
  return weft::spawn([ln = std::move(*ln)]() mutable {
    for (;;) {
      auto c = ln.accept();
      if (!c) {
        if (c.error() == std::errc::operation_canceled) return;
        (void)weft::this_fiber::sleep_for(std::chrono::milliseconds(1));  // EMFILE: try again
        continue;
      }
      weft::go([c = std::move(*c)]() mutable { serve_statusz(std::move(c)); },
               {.name = "statusz"});
    }
  }, {.name = "statusz acceptor"});
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
  std::optional<weft::join_handle<void>> statusz;
  if (f.status_port >= 0) {
    auto s = start_statusz(who, f.status_port);
    if (!s) return 1;
    statusz = std::move(*s);
  }
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
    if (statusz) statusz->request_stop();
  }
  acceptor.join();
  if (statusz) statusz->join();
  return 0;
}

}  // namespace examples
