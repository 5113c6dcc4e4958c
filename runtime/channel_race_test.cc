// runtime/channel_race_test.cc — sends, receives, selects, timeouts, try ops, stop requests
// and close racing each other on fibers and plain threads; every value that
// a send reports as sent is received exactly once, and a failed try_send or
// select send leaves its value untouched.
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/select.h"
#include "runtime/sync.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using namespace std::chrono_literals;
using testing::Runtime;
using box = std::unique_ptr<long>;

class ChannelRace : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(ChannelRace);

struct tally {
  std::atomic<long> sent{0}, nsent{0}, got{0}, ngot{0}, bad{0};
};

// One send attempt of value v in one of several ways; true if sent, false
// if not (v must then be intact), or stops the loop (closed).
int send_one(channel<box>& ch, long v, int how, tally& t) {
  box b = std::make_unique<long>(v);
  bool ok = false, closed = false;
  switch (how % 4) {
    case 0: {
      auto r = ch.send(std::move(b), deadline(std::chrono::microseconds(how % 50)));
      ok = r.has_value();
      closed = !ok && r.error() == chan_errc::closed;
      break;
    }
    case 1: {
      auto r = ch.try_send(std::move(b));
      ok = r.has_value();
      closed = !ok && r.error() == chan_errc::closed;
      if (!ok && (!b || *b != v)) t.bad.fetch_add(1);
      break;
    }
    case 2: {
      bool sent = false;
      int k = select(ch.on_send(b, sent), after(std::chrono::microseconds(how % 30)));
      ok = k == 0 && sent;
      closed = k == 0 && !sent;
      if (!ok && (!b || *b != v)) t.bad.fetch_add(1);
      if (ok && b) t.bad.fetch_add(1);
      break;
    }
    default: {
      auto r = ch.send(std::move(b));
      ok = r.has_value();
      closed = !ok;
      break;
    }
  }
  if (ok) {
    t.sent.fetch_add(v);
    t.nsent.fetch_add(1);
  }
  return closed ? -1 : ok;
}

// One receive attempt; -1 when closed (and drained), -2 cancelled.
int recv_one(channel<box>& ch, int how, tally& t) {
  std::optional<box> got;
  int rc = 0;
  switch (how % 4) {
    case 0: {
      auto r = ch.recv(deadline(std::chrono::microseconds(how % 50)));
      if (r) got = std::move(*r);
      else if (r.error() == chan_errc::closed) rc = -1;
      else if (r.error() == std::errc::operation_canceled) rc = -2;
      break;
    }
    case 1: {
      auto r = ch.try_recv();
      if (r) got = std::move(*r);
      else if (r.error() == chan_errc::closed) rc = -1;
      break;
    }
    case 2: {
      std::optional<box> o;
      int k = select(ch.on_recv(o), after(std::chrono::microseconds(how % 30)));
      if (k == 0) {
        if (o) got = std::move(o);
        else rc = -1;
      } else if (k < 0) {
        rc = -2;
      } else if (o) {
        t.bad.fetch_add(1);  // a value in a case that did not fire
      }
      break;
    }
    default: {
      auto r = ch.recv(deadline(5ms));
      if (r) got = std::move(*r);
      else if (r.error() == chan_errc::closed) rc = -1;
      else if (r.error() == std::errc::operation_canceled) rc = -2;
      break;
    }
  }
  if (got) {
    if (!*got) {
      t.bad.fetch_add(1);
    } else {
      t.got.fetch_add(**got);
      t.ngot.fetch_add(1);
    }
  }
  return rc;
}

TEST_P(ChannelRace, EverySentValueIsReceivedOnceUnderRaces) {
  for (std::size_t cap : {0u, 1u, 3u}) {
    Run([cap] {
      channel<box> ch(cap);
      tally t;
      constexpr int kSenders = 6, kPer = testing::kMillion / 500;
      std::vector<join_handle<void>> ss, rs;
      for (int s = 0; s < kSenders; ++s)
        ss.push_back(spawn([&, s] {
          for (int i = 0; i < kPer; ++i) {
            long v = (long{s} << 32) | (i + 1);
            int r, a = 0;
            while ((r = send_one(ch, v, i * 7 + s + a++, t)) == 0) {
            }
            if (r < 0) return;
          }
        }));
      std::thread th_send([&, ref = outside_ref()] {
        for (int i = 0; i < kPer; ++i) {
          long v = (99L << 32) | (i + 1);
          int r, a = 0;
          while ((r = send_one(ch, v, i * 5 + 1 + a++, t)) == 0) {
          }
          if (r < 0) return;
        }
      });
      std::thread th_recv([&, ref = outside_ref()] {
        for (int i = 0;; ++i)
          if (recv_one(ch, i * 3, t) == -1) return;
      });
      for (int r = 0; r < 4; ++r)
        rs.push_back(spawn([&, r] {
          for (int i = 0;; ++i)
            if (recv_one(ch, i * 11 + r, t) < 0) return;
        }));
      // Stop some receivers while they work.
      (void)this_fiber::sleep_for(2ms);
      rs[0].request_stop();
      rs[1].request_stop();
      for (auto& s : ss) s.join();
      th_send.join();
      ch.close();
      for (auto& r : rs) r.join();
      th_recv.join();
      EXPECT_EQ(t.bad.load(), 0);
      EXPECT_EQ(t.nsent.load(), t.ngot.load()) << "cap " << cap;
      EXPECT_EQ(t.sent.load(), t.got.load()) << "cap " << cap;
    });
  }
}

// Close while senders are parked (plain sends and select send cases): they
// fail and keep (select) their value; what was sent is drained.
TEST_P(ChannelRace, CloseRacingParkedSendersLosesNothing) {
  for (int round = 0; round < 200; ++round) {
    for (std::size_t cap : {0u, 2u}) {
      Run([cap, round] {
        channel<box> ch(cap);
        tally t;
        std::vector<join_handle<void>> ss;
        for (int s = 0; s < 6; ++s)
          ss.push_back(spawn([&, s] {
            for (int i = 0; i < 50; ++i)
              if (send_one(ch, (long{s} << 32) | (i + 1), s % 2 ? 2 : 3, t) < 0) return;
          }));
        auto r = spawn([&] {
          for (int i = 0; i < round % 20; ++i) (void)recv_one(ch, 3, t);
        });
        r.join();
        ch.close();
        for (auto& s : ss) s.join();
        while (recv_one(ch, 1, t) != -1) {
        }
        EXPECT_EQ(t.bad.load(), 0);
        EXPECT_EQ(t.nsent.load(), t.ngot.load());
        EXPECT_EQ(t.sent.load(), t.got.load());
      });
    }
  }
}


// Rendezvous: try_send / try_recv meet a parked partner, fiber or thread;
// close fails parked senders without delivering.
TEST_P(ChannelRace, TryOpsOnARendezvousMeetAParkedPartner) {
  Run([] {
    for (int round = 0; round < 50; ++round) {
      channel<box> ch(0);
      std::thread r([&, ref = outside_ref()] {
        auto v = ch.recv();
        EXPECT_TRUE(v && *v && **v == round);
      });
      box b = std::make_unique<long>(round);
      for (;;) {
        auto res = ch.try_send(std::move(b));
        if (res) break;
        EXPECT_EQ(res.error(), std::errc::operation_would_block);
        ASSERT_TRUE(b);
        this_fiber::yield();
      }
      r.join();
      std::thread s([&, ref = outside_ref()] {
        EXPECT_TRUE(ch.send(std::make_unique<long>(round + 1000)));
      });
      for (;;) {
        auto res = ch.try_recv();
        if (res) {
          EXPECT_EQ(**res, round + 1000);
          break;
        }
        EXPECT_EQ(res.error(), std::errc::operation_would_block);
        this_fiber::yield();
      }
      s.join();
      // Parked senders (a thread, a fiber, a select) fail at close.
      std::atomic<int> parked{0};
      std::thread ts([&, ref = outside_ref()] {
        parked.fetch_add(1);
        EXPECT_EQ(ch.send(std::make_unique<long>(1)).error(), chan_errc::closed);
      });
      auto fs = spawn([&] {
        parked.fetch_add(1);
        EXPECT_EQ(ch.send(std::make_unique<long>(2)).error(), chan_errc::closed);
      });
      auto sel = spawn([&] {
        box v = std::make_unique<long>(3);
        bool sent = true;
        parked.fetch_add(1);
        EXPECT_EQ(select(ch.on_send(v, sent)), 0);
        EXPECT_FALSE(sent);
        EXPECT_TRUE(v && *v == 3);
      });
      while (parked.load() < 3) this_fiber::yield();
      (void)this_fiber::sleep_for(1ms);
      ch.close();
      ts.join();
      fs.join();
      sel.join();
      EXPECT_EQ(ch.try_recv().error(), chan_errc::closed);
    }
  });
}


// Plain threads select on a fiber's token and a channel while the fiber is
// asked to stop amid traffic: no lost wake-up, no value lost.
TEST_P(ChannelRace, PlainThreadSelectsOnAFibersTokenRacingItsStop) {
  Run([] {
    for (int round = 0; round < 30; ++round) {
      channel<stop_token> toks(1);
      auto target = spawn([&] {
        ASSERT_TRUE(toks.send(this_fiber::stop_token()));
        (void)this_fiber::sleep_for(1h);
      });
      stop_token tok = *toks.recv();
      channel<box> ch(round % 2);
      std::atomic<long> sent{0}, received{0};
      std::atomic<int> timeouts{0}, bad{0};
      std::vector<std::thread> ths;
      for (int r = 0; r < 2; ++r)
        ths.emplace_back([&, tok, ref = outside_ref()] {
          for (;;) {
            std::optional<box> v;
            int i = select(ch.on_recv(v), tok, after(10s));
            if (i == 2) timeouts.fetch_add(1);
            if (i != 0) {
              if (v) bad.fetch_add(1);
              break;
            }
            received.fetch_add(**v);
          }
        });
      auto s = spawn([&, tok] {
        int i = 0;
        for (long x = 1; x <= 100'000 && i == 0; ++x) {
          box b = std::make_unique<long>(x);
          i = select(ch.on_send(b), tok, after(10s));
          if (i == 0) sent.fetch_add(x);
          else if (!b || *b != x) bad.fetch_add(1);
        }
        if (i == 0) i = 1 + select(tok, after(10s));
        if (i == 2) timeouts.fetch_add(1);
      });
      for (int y = 0; y < round * 3; ++y) this_fiber::yield();
      target.request_stop();
      target.join();
      s.join();
      for (auto& t : ths) t.join();
      while (auto v = ch.try_recv()) received += **v;
      EXPECT_EQ(sent.load(), received.load());
      EXPECT_EQ(timeouts.load(), 0);
      EXPECT_EQ(bad.load(), 0);
    }
  });
}

}  // namespace
}  // namespace weft
