// bench/loop_echo_server.cc
//
// loop_echo_server is the hand-written event loop of the TCP echo comparison
// (bench/compare_echo.sh): one thread, no runtime, no fibers — the server the
// mission says weft's sequential-style echo server must match. Two loops:
//
//   --io uring  io_uring as its designers intend it for this job: one ring
//               (SINGLE_ISSUER | DEFER_TASKRUN), multishot accept, one
//               multishot receive per connection into a provided buffer ring
//               (an idle connection holds no buffer), the echo sent straight
//               from the receive buffer, every submission batched into one
//               io_uring_enter per loop turn.
//   --io epoll  the classic loop: non-blocking sockets, edge-triggered
//               EPOLLIN, read until EAGAIN into one shared buffer and write
//               back at once; only bytes the socket refuses are copied into
//               a per-connection backlog (EPOLLOUT until it drains).
//
// Both drop a peer after --idle seconds (30) without progress, as every other
// server of the comparison does, but the way a hand-written loop would: a
// coarse last-activity second per connection and a sweep once a second, so a
// request pays for no timer at all (weft and Go pay for a deadline per read).
// That makes these loops a floor for the server's CPU per request on this
// kernel, not a peer held to the same rules: what no runtime can beat by
// much, because the kernel's share of a request is the same for all.
//
// Usage: loop_echo_server --port N [--io uring|epoll] [--idle S] [--recv multi|single]
//
// --recv single (uring) arms one receive at a time, as weft's read_pooled
// does, instead of the multishot one: what the multishot saves the kernel.
// (listens on 127.0.0.1 only)
//
// Invariants (uring):
//   - A connection has at most one send in flight; later echoes queue behind
//     it (stream order), each holding its receive buffer until sent.
//   - A connection's descriptor is closed only once its receive is no longer
//     armed and no send is in flight, so no completion names a reused fd;
//     and a dead one is closed as soon as that holds (whatever ended its
//     receive: 0, an error, data, or -ENOBUFS).
//   - A peer's FIN (receive 0) ends its receives; its queued echoes are
//     still sent (as the other servers write all they read) before close.
//   - Every provided buffer is either in the ring, or held by exactly one
//     queued or in-flight send.
// Who calls what: everything runs on the main thread.

#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <string>

#include "bench/bench_net.h"
#include <vector>

namespace {

constexpr unsigned kBufBytes = 4096;  // as the other servers' per-read buffer
constexpr unsigned kBufCount = 2048;  // provided buffers (C=1000 holds one each at most)
constexpr unsigned kGroup = 0;
bool g_single_recv = false;  // --recv single: one receive per completion, re-armed

[[noreturn]] void die(const char* what, int err) {
  std::fprintf(stderr, "loop_echo_server: %s: %s\n", what, std::strerror(err));
  std::exit(1);
}

long now_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return ts.tv_sec;
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// ---------------------------------------------------------------------------
// io_uring
// ---------------------------------------------------------------------------

// user_data: op (4 bits) | offset into the buffer (12) | buffer id (16) | fd (32).
enum op : std::uint64_t { kAccept = 1, kRecv = 2, kSend = 3, kTick = 4 };
std::uint64_t tag(op o, unsigned off, unsigned bid, int fd) {
  return (std::uint64_t(o) << 60) | (std::uint64_t(off) << 48) | (std::uint64_t(bid) << 32) |
         std::uint32_t(fd);
}

struct uring_conn {
  bool open = false;
  bool recv_armed = false;
  bool sending = false;  // a send is in flight
  bool dead = false;     // peer gone or idle: close once nothing is in flight
  bool eof = false;      // the peer's FIN: close once its echoes are sent
  long last = 0;         // coarse second of the last progress
  std::deque<std::uint32_t> backlog;  // (bid << 16 | len) waiting behind the send in flight
};

class uring_loop {
 public:
  uring_loop(int listen_fd, int idle) : lfd_(listen_fd), idle_(idle) {
    io_uring_params p{};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
    p.cq_entries = 16384;
    int r = io_uring_queue_init_params(4096, &ring_, &p);
    if (r < 0) die("io_uring_queue_init_params", -r);
    void* ring = ::mmap(nullptr, kBufCount * sizeof(io_uring_buf), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring == MAP_FAILED) die("mmap", errno);
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<std::uintptr_t>(ring);
    reg.ring_entries = kBufCount;
    reg.bgid = kGroup;
    r = io_uring_register_buf_ring(&ring_, &reg, 0);
    if (r < 0) die("io_uring_register_buf_ring", -r);
    br_ = static_cast<io_uring_buf_ring*>(ring);
    io_uring_buf_ring_init(br_);
    bufs_ = static_cast<char*>(::mmap(nullptr, std::size_t(kBufCount) * kBufBytes,
                                      PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (bufs_ == MAP_FAILED) die("mmap", errno);
    for (unsigned i = 0; i < kBufCount; ++i)
      io_uring_buf_ring_add(br_, bufs_ + std::size_t(i) * kBufBytes, kBufBytes, i,
                            io_uring_buf_ring_mask(kBufCount), int(i));
    io_uring_buf_ring_advance(br_, int(kBufCount));
    free_bufs_ = kBufCount;
    tick_.tv_sec = 1;
  }

  [[noreturn]] void run() {
    arm_accept();
    arm_tick();
    now_ = now_seconds();
    for (;;) {
      int r = io_uring_submit_and_wait(&ring_, 1);
      if (r < 0 && r != -EINTR && r != -ETIME) die("io_uring_submit_and_wait", -r);
      io_uring_cqe* cqe;
      unsigned head, seen = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        ++seen;
        complete(cqe->user_data, cqe->res, cqe->flags);
      }
      io_uring_cq_advance(&ring_, seen);
    }
  }

 private:
  io_uring_sqe* sqe() {
    io_uring_sqe* s = io_uring_get_sqe(&ring_);
    while (!s) {
      io_uring_submit(&ring_);
      s = io_uring_get_sqe(&ring_);
    }
    return s;
  }
  void arm_accept() {
    io_uring_sqe* s = sqe();
    io_uring_prep_multishot_accept(s, lfd_, nullptr, nullptr, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(s, tag(kAccept, 0, 0, lfd_));
  }
  void arm_tick() {
    io_uring_sqe* s = sqe();
    io_uring_prep_timeout(s, &tick_, 0, 0);
    io_uring_sqe_set_data64(s, tag(kTick, 0, 0, 0));
  }
  void arm_recv(int fd) {
    io_uring_sqe* s = sqe();
    if (g_single_recv)
      io_uring_prep_recv(s, fd, nullptr, kBufBytes, 0);
    else
      io_uring_prep_recv_multishot(s, fd, nullptr, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = kGroup;
    io_uring_sqe_set_data64(s, tag(kRecv, 0, 0, fd));
    conns_[fd].recv_armed = true;
  }
  void send(int fd, unsigned bid, unsigned off, unsigned len) {
    io_uring_sqe* s = sqe();
    io_uring_prep_send(s, fd, bufs_ + std::size_t(bid) * kBufBytes + off, len - off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, tag(kSend, off, bid, fd));
    conns_[fd].sending = true;
    len_[bid] = std::uint16_t(len);
  }
  void give_back(unsigned bid) {
    io_uring_buf_ring_add(br_, bufs_ + std::size_t(bid) * kBufBytes, kBufBytes, bid,
                          io_uring_buf_ring_mask(kBufCount), 0);
    io_uring_buf_ring_advance(br_, 1);
    ++free_bufs_;
    // A receive that ran out of buffers ended; one buffer back re-arms one.
    while (!starved_.empty()) {
      int fd = starved_.back();
      starved_.pop_back();
      if (wants_recv(conns_[fd])) {
        arm_recv(fd);
        break;
      }
    }
  }
  static bool wants_recv(const uring_conn& c) {
    return c.open && !c.dead && !c.eof && !c.recv_armed;
  }
  void kill(int fd) {
    uring_conn& c = conns_[fd];
    if (!c.dead) {
      c.dead = true;
      // Ends the multishot receive (it completes with 0 or an error).
      ::shutdown(fd, SHUT_RDWR);
    }
    if (!c.recv_armed && !c.sending) {
      while (!c.backlog.empty()) {
        give_back(c.backlog.front() >> 16);
        c.backlog.pop_front();
      }
      ::close(fd);
      c = uring_conn{};
    }
  }

  void complete(std::uint64_t ud, int res, unsigned flags) {
    const auto o = op(ud >> 60);
    const int fd = int(std::uint32_t(ud));
    switch (o) {
      case kAccept:
        if (res >= 0) {
          if (std::size_t(res) >= conns_.size()) conns_.resize(std::size_t(res) + 1024);
          conns_[res] = uring_conn{};
          conns_[res].open = true;
          conns_[res].last = now_;
          set_nodelay(res);
          arm_recv(res);
        } else if (!accept_reported_) {
          std::fprintf(stderr, "loop_echo_server: accept: %s\n", std::strerror(-res));
          accept_reported_ = true;
        }
        if (!(flags & IORING_CQE_F_MORE)) arm_accept();
        break;
      case kRecv: {
        uring_conn& c = conns_[fd];
        if (!(flags & IORING_CQE_F_MORE)) c.recv_armed = false;
        if (res > 0) {
          unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
          --free_bufs_;
          c.last = now_;
          if (c.dead) {
            give_back(bid);
          } else if (c.sending) {
            c.backlog.push_back(bid << 16 | unsigned(res));
          } else {
            send(fd, bid, 0, unsigned(res));
          }
          if (wants_recv(c)) arm_recv(fd);
        } else if (res == -ENOBUFS && !c.dead) {
          starved_.push_back(fd);  // re-armed when a buffer comes back
        } else if (res == 0 && !c.dead && c.sending) {
          c.eof = true;  // the peer's FIN: its echoes still go out, then close
        } else if (res <= 0) {
          kill(fd);  // 0: the peer closed; < 0: an error
        }
        // A killed connection's receive may end with data or -ENOBUFS (the
        // shutdown's wake-up found no buffer) rather than 0: close it now.
        if (c.dead && !c.recv_armed) kill(fd);
        break;
      }
      case kSend: {
        uring_conn& c = conns_[fd];
        c.sending = false;
        unsigned bid = unsigned(ud >> 32) & 0xffff;
        unsigned off = unsigned(ud >> 48) & 0xfff;
        unsigned len = len_[bid];
        if (res > 0 && !c.dead) {
          c.last = now_;
          if (off + unsigned(res) < len) {  // short send: the rest first
            send(fd, bid, off + unsigned(res), len);
            break;
          }
          give_back(bid);
          if (!c.backlog.empty()) {
            std::uint32_t next = c.backlog.front();
            c.backlog.pop_front();
            send(fd, next >> 16, 0, next & 0xffff);
          } else if (c.eof) {
            kill(fd);  // every echo sent after the peer's FIN
          }
          break;
        }
        give_back(bid);
        kill(fd);
        break;
      }
      case kTick:
        now_ = now_seconds();
        for (std::size_t fd2 = 0; fd2 < conns_.size(); ++fd2) {
          uring_conn& c = conns_[fd2];
          if (c.open && !c.dead && now_ - c.last > idle_) kill(int(fd2));
        }
        if (!starved_.empty() && free_bufs_ > 0) {
          int s = starved_.back();
          starved_.pop_back();
          if (wants_recv(conns_[s])) arm_recv(s);
        }
        arm_tick();
        break;
    }
  }

  io_uring ring_{};
  io_uring_buf_ring* br_ = nullptr;
  char* bufs_ = nullptr;
  std::uint16_t len_[kBufCount] = {};  // a buffer's echo length, while it is sent
  std::vector<uring_conn> conns_;     // by descriptor
  std::vector<int> starved_;          // receives ended by -ENOBUFS
  unsigned free_bufs_ = 0;            // buffers in the ring
  __kernel_timespec tick_{};
  int lfd_;
  long idle_;
  long now_ = 0;
  bool accept_reported_ = false;
};

// ---------------------------------------------------------------------------
// epoll
// ---------------------------------------------------------------------------

struct epoll_conn {
  bool open = false;
  long last = 0;
  std::string backlog;  // bytes the socket refused; EPOLLOUT while non-empty
  bool eof = false;     // the peer's FIN came with a backlog: close once it drains
};

class epoll_loop {
 public:
  epoll_loop(int listen_fd, int idle) : lfd_(listen_fd), idle_(idle) {
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) die("epoll_create1", errno);
    epoll_event ev{.events = EPOLLIN, .data = {.fd = lfd_}};
    if (::epoll_ctl(ep_, EPOLL_CTL_ADD, lfd_, &ev) != 0) die("epoll_ctl", errno);
  }

  [[noreturn]] void run() {
    epoll_event evs[256];
    long next_sweep = now_seconds() + 1;
    for (;;) {
      int n = ::epoll_wait(ep_, evs, 256, 1000);
      if (n < 0 && errno != EINTR) die("epoll_wait", errno);
      now_ = now_seconds();
      for (int i = 0; i < n; ++i) {
        int fd = evs[i].data.fd;
        if (fd == lfd_) {
          accept_all();
          continue;
        }
        if (evs[i].events & EPOLLOUT) flush(fd);
        if (conns_[fd].open && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) serve(fd);
      }
      if (now_ >= next_sweep) {
        next_sweep = now_ + 1;
        for (std::size_t fd = 0; fd < conns_.size(); ++fd)
          if (conns_[fd].open && now_ - conns_[fd].last > idle_) drop(int(fd));
      }
    }
  }

 private:
  void accept_all() {
    for (;;) {
      int fd = ::accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno != EAGAIN && !accept_reported_) {
          std::fprintf(stderr, "loop_echo_server: accept: %s\n", std::strerror(errno));
          accept_reported_ = true;
        }
        return;
      }
      set_nodelay(fd);
      if (std::size_t(fd) >= conns_.size()) conns_.resize(std::size_t(fd) + 1024);
      conns_[fd].open = true;
      conns_[fd].last = now_;
      epoll_event ev{.events = EPOLLIN | EPOLLET, .data = {.fd = fd}};
      if (::epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev) != 0) ::close(fd), conns_[fd] = epoll_conn{};
    }
  }
  void drop(int fd) {
    ::close(fd);  // also leaves the epoll set
    conns_[fd] = epoll_conn{};
  }
  // Writes what it can of [p, p+n); keeps the rest. False: the peer is gone.
  bool write_or_keep(int fd, const char* p, std::size_t n) {
    epoll_conn& c = conns_[fd];
    if (c.backlog.empty()) {
      while (n > 0) {
        ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        if (w <= 0) return false;
        p += w;
        n -= std::size_t(w);
      }
      if (n == 0) return true;
      epoll_event ev{.events = EPOLLIN | EPOLLOUT | EPOLLET, .data = {.fd = fd}};
      ::epoll_ctl(ep_, EPOLL_CTL_MOD, fd, &ev);
    }
    c.backlog.append(p, n);
    return true;
  }
  void flush(int fd) {
    epoll_conn& c = conns_[fd];
    if (!c.open || c.backlog.empty()) return;
    std::string pending;
    pending.swap(c.backlog);
    if (!write_or_keep(fd, pending.data(), pending.size())) return drop(fd);
    if (c.backlog.empty()) {
      if (c.eof) return drop(fd);  // every echo sent after the peer's FIN
      epoll_event ev{.events = EPOLLIN | EPOLLET, .data = {.fd = fd}};
      ::epoll_ctl(ep_, EPOLL_CTL_MOD, fd, &ev);
    }
    c.last = now_;
  }
  void serve(int fd) {
    for (;;) {
      ssize_t n = ::recv(fd, buf_, sizeof buf_, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      if (n == 0 && !conns_[fd].backlog.empty()) {
        conns_[fd].eof = true;  // the peer's FIN: its echoes still go out
        return;
      }
      if (n <= 0 || !write_or_keep(fd, buf_, std::size_t(n))) return drop(fd);
      conns_[fd].last = now_;
      // A backlog this large is a peer that does not read: stop reading it
      // until it drains (edge-triggered: EPOLLOUT's flush resumes nothing,
      // the peer's next bytes do).
      if (conns_[fd].backlog.size() > (1u << 20)) return;
    }
  }

  int ep_ = -1;
  int lfd_;
  long idle_;
  long now_ = 0;
  bool accept_reported_ = false;
  std::vector<epoll_conn> conns_;  // by descriptor
  char buf_[kBufBytes];
};

}  // namespace

int main(int argc, char** argv) {
  int port = 0, idle = 30;
  std::string io = "uring";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--port") port = std::atoi(argv[i + 1]);
    else if (k == "--idle") idle = std::atoi(argv[i + 1]);
    else if (k == "--io") io = argv[i + 1];
    else if (k == "--recv") g_single_recv = std::string(argv[i + 1]) == "single";
    else port = -1;
  }
  if (port <= 0 || port > 65535 || idle <= 0 || (io != "uring" && io != "epoll") || argc % 2 == 0) {
    std::fprintf(stderr, "usage: loop_echo_server --port N [--io uring|epoll] [--idle S]\n");
    return 2;
  }
  std::signal(SIGPIPE, SIG_IGN);
  bench::raise_nofile_limit();
  int lfd = bench::listen_local(port, io == "epoll");
  if (lfd < 0) die("listen on 127.0.0.1", errno);
  if (io == "uring") {
    uring_loop l(lfd, idle);
    l.run();
  }
  epoll_loop l(lfd, idle);
  l.run();
}
