// examples/chat_server.cc — a line-based chat room in the style of CPC's
// Hekate: every connection has three fibers,
//
//   reader   reads lines and hands them to the room; each read is also a
//            sign of life for the timeout fiber;
//   writer   takes the lines meant for this peer from its outbox channel and
//            writes them (all that are queued, in one write), so a slow
//            peer never blocks the room;
//   timeout  waits for signs of life; after `idle` without one it shuts the
//            socket down, which ends the reader, which ends the rest;
//
// and one room fiber owns the list of peers: it is the only fiber that
// touches it, so it needs no lock. Every line a peer sends is broadcast to
// all connected peers as "<name>: <line>"; a peer that stops reading is
// dropped (see kSlowPeer), and the others are told it left; a peer that
// floods the room is slowed down (see kFloodRate).
//
//   chat_server --port 7001 --workers 2 --idle 60   (127.0.0.1 only)
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <variant>

#include "examples/server.h"
#include "runtime/channel.h"
#include "runtime/net.h"
#include "runtime/weft.h"

namespace {

using namespace std::chrono_literals;
using line = std::shared_ptr<const std::string>;  // shared by every outbox

// The longest line broadcast whole, in bytes before its '\n'. A longer
// line is cut: its first kMaxLine bytes go out as a line of their own, and
// the rest is read as the start of the next line (so it is cut again if
// still too long).
constexpr std::size_t kMaxLine = 4096;

// A slow peer is one that stops taking what it is sent, not one whose
// writer fiber has not run for a moment: the room can broadcast hundreds of
// lines in one turn, more than any fixed outbox holds. So what the outbox
// has no room for waits, in order, in the peer's backlog (the room's own),
// and the room retries it every kCatchUp; a peer that has taken nothing
// from its backlog for kSlowPeer, or whose backlog passes kMaxBacklog lines
// or kMaxBacklogBytes bytes of text, is dropped (an IRC server's "SendQ
// exceeded"). The room never waits for a peer. (Counting kSlowPeer from
// when the backlog began, as before, dropped peers that read all they were
// sent but took longer than kSlowPeer to read a burst: both peers of a
// 20,000-line burst on a loaded machine.)
//
// The byte bound is what bounds the memory a peer that stops reading
// makes the room hold: lines are up to kMaxLine bytes, and with the line
// bound alone one such peer held ~270 MiB of 4 KiB lines that another
// peer sent. (The lines are shared: peers behind on the same lines hold
// them once.) Flood control counts bytes too, so that one talker cannot
// put a peer that reads all it is sent past it either.
constexpr std::size_t kOutbox = 256;  // lines handed to a peer's writer
constexpr auto kSlowPeer = 2s;
constexpr std::size_t kMaxBacklog = 65536;  // lines: ~1 MiB of line pointers
constexpr std::size_t kMaxBacklogBytes = 16 << 20;  // of text, while behind
constexpr auto kCatchUp = 1ms;
// How long an idle peer's writer has to tell it why it is disconnected.
constexpr auto kSayBye = 2s;
constexpr std::size_t kMaxBatch = 64 * 1024;  // bytes a writer gathers into one write

// Flood control, as IRC servers have it: a peer may send kFloodBurst
// tokens' worth of lines at once and kFloodRate tokens a second after
// that, a line costing a token per kFloodUnit bytes begun (so one for a
// line people type); past it, its reader waits, so TCP slows the talker
// down. Without it one peer sending millions of short lines a second made
// the room outrun every writer, and peers that read all they were sent
// fell kMaxBacklog behind in milliseconds and were dropped for it; when
// it counted lines only, one peer sending 4 KiB lines put a peer that read
// all it was sent 4 MiB behind in 10 ms. The limits are far above what
// people type: 20,000 short lines a second, or 2.5 MB/s of long ones.
constexpr double kFloodRate = 20000;   // tokens a second, per peer
constexpr double kFloodBurst = 32768;  // tokens: 4 MiB of long lines
constexpr std::size_t kFloodUnit = 128;  // bytes of a line per token

class flood_gate {
 public:
  // Waits (parking this fiber) until a line of `bytes` bytes may go to
  // the room. False if the fiber was asked to stop meanwhile.
  bool take(std::size_t bytes) {
    const double cost = double(1 + bytes / kFloodUnit);  // at most kMaxLine's: < kFloodBurst
    for (;;) {
      const auto now = weft::clock::now();
      tokens_ = std::min(kFloodBurst,
                         tokens_ + std::chrono::duration<double>(now - last_).count() * kFloodRate);
      last_ = now;
      if (tokens_ >= cost) {
        tokens_ -= cost;
        return true;
      }
      if (!weft::this_fiber::sleep_for(1ms)) return false;  // ~20 tokens' worth
    }
  }

 private:
  double tokens_ = kFloodBurst;
  weft::clock::time_point last_ = weft::clock::now();
};

struct peer {
  std::string name;
  std::shared_ptr<weft::tcp_stream> conn;  // the room shuts it down to drop the peer
  weft::channel<line> outbox{kOutbox};
  // The room's alone: lines the outbox had no room for, oldest first, and
  // since when the peer has taken none of them (since the backlog began,
  // or since the last line that moved to the outbox).
  std::deque<line> backlog;
  std::size_t backlog_bytes = 0;  // the sum of the backlog's line sizes
  weft::clock::time_point stuck_since;
  // Set before the server ends the connection itself (the idle timeout, a
  // drop, a failed write): the reader then sees the end of the stream too,
  // and must not take it for the peer's own.
  std::atomic<bool> cut{false};
};

// Ends p's connection from our side: its reader sees the end of the stream.
void cut_off(peer& p) {
  // release: pairs with the reader's acquire load, which it makes only
  // after its read saw the end of the stream that the shutdown(2) caused.
  p.cut.store(true, std::memory_order_release);
  (void)p.conn->shutdown(SHUT_RDWR);
}

// What the connections tell the room.
struct joined { std::shared_ptr<peer> who; };
struct left { std::shared_ptr<peer> who; };
struct said { std::string text; };
using event = std::variant<joined, left, said>;

using peer_map = std::map<peer*, std::shared_ptr<peer>>;

// Ends a slow peer's connection: its writer stops, its reader sees the end
// of the stream and tells the room it left (which then says so).
void drop(peer& p) {
  cut_off(p);
  p.outbox.close();
  p.backlog.clear();
  p.backlog_bytes = 0;
}

// Moves what fits of p's backlog to its outbox; drops p if it is too slow.
// Returns whether p is still behind.
bool catch_up(peer& p, weft::clock::time_point now) {
  bool moved = false;
  while (!p.backlog.empty() && p.outbox.try_send(p.backlog.front())) {
    p.backlog_bytes -= p.backlog.front()->size();
    p.backlog.pop_front();
    moved = true;
  }
  if (p.backlog.empty()) return false;
  if (moved) p.stuck_since = now;  // slow, perhaps, but still reading
  if (now - p.stuck_since < kSlowPeer && p.backlog.size() <= kMaxBacklog &&
      p.backlog_bytes <= kMaxBacklogBytes)
    return true;
  drop(p);
  return false;
}

// Returns whether some peer is behind.
bool broadcast(peer_map& peers, const std::string& text) {
  auto l = std::make_shared<const std::string>(text);
  const auto now = weft::clock::now();
  bool behind = false;
  for (auto& [p, keep] : peers) {
    if (p->outbox.closed()) continue;  // dropped; its reader will tell us it left
    if (p->backlog.empty() && p->outbox.try_send(l)) continue;
    if (p->backlog.empty()) p->stuck_since = now;
    p->backlog.push_back(l);
    p->backlog_bytes += l->size();
    behind |= catch_up(*p, now);
  }
  return behind;
}

void room(weft::channel<event>& events) {
  peer_map peers;
  bool behind = false;
  for (;;) {
    auto e = events.recv(behind ? weft::deadline(kCatchUp) : weft::deadline::never());
    if (!e && e.error() == std::errc::timed_out) {
      behind = false;
      const auto now = weft::clock::now();
      for (auto& [p, keep] : peers) behind |= catch_up(*p, now);
      continue;
    }
    if (!e) break;  // closed: we are shutting down
    if (auto* j = std::get_if<joined>(&*e)) {
      peers.emplace(j->who.get(), j->who);
      behind = broadcast(peers, "* " + j->who->name + " joined\n");
    } else if (auto* l = std::get_if<left>(&*e)) {
      l->who->outbox.close();
      if (peers.erase(l->who.get())) behind = broadcast(peers, "* " + l->who->name + " left\n");
    } else {
      behind = broadcast(peers, std::get<said>(*e).text);
    }
  }
  for (auto& [p, keep] : peers) p->outbox.close();
}

std::chrono::seconds g_idle{60};  // --idle; set before any connection

void writer(std::shared_ptr<weft::tcp_stream> c, std::shared_ptr<peer> me) {
  std::string batch;
  while (auto l = me->outbox.recv()) {
    batch.assign(**l);  // and whatever else is queued, in one write
    while (batch.size() < kMaxBatch)
      if (auto more = me->outbox.try_recv()) batch += **more; else break;
    if (!c->write_all(batch, weft::deadline(g_idle))) break;
  }
  cut_off(*me);  // a dead writer ends the reader too
}

// After `idle` without a sign of life, the peer is told why, by its
// writer after what is queued for it, which then cuts it off; or, if the
// writer is stuck (the peer reads nothing either), by us after kSayBye.
void timeout(std::shared_ptr<peer> me, std::shared_ptr<weft::channel<bool>> alive) {
  for (;;) {
    auto a = alive->recv(weft::deadline(g_idle));
    if (a) continue;
    if (a.error() != std::errc::timed_out) return;  // the reader closed `alive`
    (void)me->outbox.try_send(std::make_shared<const std::string>(
        "* idle for " + std::to_string(g_idle.count()) + " s: disconnected\n"));
    me->outbox.close();  // the writer ends after it: cut_off()
    const auto bye = weft::deadline(kSayBye);
    while (alive->recv(bye)) {
    }
    cut_off(*me);
    return;
  }
}

// The reader is the connection's own fiber: it starts the other two and
// cleans up after them.
void serve(weft::tcp_stream s, weft::channel<event>& events) {
  auto c = std::make_shared<weft::tcp_stream>(std::move(s));
  auto me = std::make_shared<peer>();
  me->conn = c;
  auto addr = c->peer_address();
  me->name = addr ? addr->to_string() : "someone";
  // Shared, not on this frame: when the runtime unwinds this fiber, its
  // frame goes before the other two are joined.
  auto alive = std::make_shared<weft::channel<bool>>(1);
  auto w = weft::spawn([c, me] { writer(c, me); }, {.name = "chat writer"});
  auto t = weft::spawn([me, alive] { timeout(me, alive); }, {.name = "chat timeout"});
  if (!events.send(joined{me})) {  // the room is gone: we are shutting down
    me->outbox.close();
    alive->close();
    w.join();
    t.join();
    return;
  }
  std::string pending;
  char buf[1024];
  flood_gate gate;
  bool eof = false;
  while (auto n = c->read(buf)) {
    if (*n == 0) {
      eof = true;
      break;
    }
    (void)alive->try_send(true);  // full means a sign of life is already queued
    pending.append(buf, *n);
    // A read brings up to sizeof buf bytes, so a newline may come past
    // kMaxLine: the line is cut there too, not only when no newline came.
    for (std::size_t nl; (nl = pending.find('\n')) != std::string::npos || pending.size() > kMaxLine;) {
      const bool whole = nl <= kMaxLine;  // npos is not
      const std::size_t end = whole ? nl : kMaxLine;
      if (!gate.take(end)) break;
      (void)events.send(said{me->name + ": " + pending.substr(0, end) + "\n"});
      pending.erase(0, end + (whole ? 1 : 0));
    }
  }
  // A last line the peer closed after without its newline (`printf hi |
  // nc`) is said too, as a line-based server reads a file's last line. Not
  // after an error, nor when the end of the stream is our own doing (the
  // idle timeout, a drop, a failed write: see cut_off): the peer may have
  // been cut off mid-line.
  if (eof && !me->cut.load(std::memory_order_acquire) && !pending.empty() && gate.take(pending.size()))
    (void)events.send(said{me->name + ": " + pending + "\n"});
  alive->close();
  (void)events.send(left{me});  // the room closes our outbox: the writer ends
  w.join();
  t.join();
}

}  // namespace

int main(int argc, char** argv) {
  examples::flags f;
  if (!examples::parse_flags(argc, argv, f)) return 2;
  g_idle = std::chrono::seconds(f.idle_seconds);
  weft::options o;
  o.workers = f.workers;
  // Outlives run(), so connection fibers still unwinding after main
  // returns find it closed, not destroyed.
  weft::channel<event> events(1024);
  return weft::run([&] {
    auto r = weft::spawn([&] { room(events); }, {.name = "chat room"});
    int status = examples::listen_and_serve(
        "chat_server", f, [&events](weft::tcp_stream c) { serve(std::move(c), events); });
    events.close();
    r.join();
    return status;
  }, o);
}
