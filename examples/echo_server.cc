// examples/echo_server.cc — a TCP echo server, one fiber per connection.
//
//   echo_server --port 7000 --workers 1 [--idle 30]
//
// Listens on 127.0.0.1 only. Each connection's fiber reads and writes back
// until EOF, an error, or --idle seconds (30) without a request or without
// the peer taking its reply.
// bench/compare_echo.sh measures it against its peers (WEFT_IO picks the
// I/O driver).
#include <chrono>
#include <cstdio>
#include <string>

#include "examples/server.h"
#include "runtime/net.h"
#include "runtime/weft.h"

namespace {

using namespace std::chrono_literals;

std::chrono::seconds g_idle{30};

// read_pooled() takes a receive buffer only once data has arrived, so an
// idle connection holds none (see *Pooled receive buffers* in io/driver.h).
// The write has the same deadline: a peer that sends but never reads would
// otherwise hold its fiber and descriptor forever.
void serve(weft::tcp_stream c) {
  (void)c.set_nodelay(true);
  while (auto b = c.read_pooled(weft::deadline(g_idle)))
    if (b->empty() || !c.write_all(b->data(), weft::deadline(g_idle))) break;
}

}  // namespace

int main(int argc, char** argv) {
  examples::flags f;
  f.idle_seconds = 30;
  if (!examples::parse_flags(argc, argv, f)) return 2;
  g_idle = std::chrono::seconds(f.idle_seconds);
  weft::options o;
  o.workers = f.workers;
  return weft::run([&] { return examples::listen_and_serve("echo_server", f, serve); }, o);
}
