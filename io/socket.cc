// io/socket.cc — tcp_stream and tcp_listener over io::perform(). Every
// call that can wait goes through perform(), so it parks only the fiber,
// takes a deadline and honours the fiber's stop token. Calls that never
// wait (socket, bind, listen, setsockopt, shutdown, close) are plain system
// calls; errno is read right after each (see CONVENTIONS.md).
#include "io/socket.h"

#include "io/accept.h"
#include "io/blocking.h"
#include "io/fd_state.h"
#include "io/recv.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <sys/un.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <optional>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace weft::io {
namespace {

std::unexpected<std::error_code> sys_error(int e) {
  return std::unexpected(std::error_code(e, std::system_category()));
}

// A socket of `family`, blocking (io_uring arms a poll for it) and
// close-on-exec. -errno on failure.
int new_socket(int family, int type = SOCK_STREAM) {
  int fd = ::socket(family, type | SOCK_CLOEXEC, 0);
  return fd >= 0 ? fd : -errno;  // errno read right after the call
}

// The buffers one readv or writev hands the kernel: at most IOV_MAX (it
// refuses more in one call: EMSGSIZE; readv and writev return a short
// count instead, as any transfer may), starting at the first buffer with
// room. Empty buffers in front are skipped, not counted: had the first
// IOV_MAX all been empty, recvmsg would have returned 0, which reads as the
// end of the stream, and sendmsg 0 with the data still to send, on which a
// write loop spins. Skipping them moves no byte, so the count the caller
// gets still says how far into `bufs` it got. Empty only if bufs has no
// room at all.
std::span<const iovec> iov_window(std::span<const iovec> bufs) {
  std::size_t first = 0;
  while (first < bufs.size() && bufs[first].iov_len == 0) ++first;
  bufs = bufs.subspan(first);
  return bufs.first(std::min<std::size_t>(bufs.size(), IOV_MAX));
}

// An address nobody filled in (socket_address's default): Go's "missing
// address". socket(2) would refuse its family 0 with EAFNOSUPPORT, which
// reads as a host without that protocol rather than a program's slip.
std::optional<std::unexpected<std::error_code>> missing(const socket_address& a) {
  if (a.family() != AF_UNSPEC) return std::nullopt;
  return std::unexpected(std::make_error_code(std::errc::invalid_argument));
}

}  // namespace

namespace {
void on_write_signal(int) {}  // see ignore_write_signals_once()
}  // namespace

void ignore_write_signals_once() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    // SIGPIPE: sends use MSG_NOSIGNAL already; this covers a user's plain
    // write(), which then fails with EPIPE.
    // SIGXFSZ: a write past the file size limit (RLIMIT_FSIZE) fails with
    // EFBIG and raises it in the thread that wrote (the epoll driver's
    // blocking-pool thread), which by default ends the whole process;
    // file::write_at returns the error instead (Go ignores SIGXFSZ for this reason).
    // An empty handler, not SIG_IGN: an ignored signal stays ignored
    // across exec, so every child process (a shell pipeline started with
    // popen()) would inherit it; a handler goes back to the default there
    // (Go does the same). A program that installed its own handler keeps
    // it.
    // SA_ONSTACK: the signal is raised in the thread that wrote, on the
    // stack of the fiber that wrote, which may be a 2 KiB kSmallStack
    // without a guard page; the kernel's signal frame (~3 KiB with AVX-512
    // state) goes on the worker's sigaltstack instead.
    for (int sig : {SIGPIPE, SIGXFSZ}) {
      struct sigaction old {};
      if (sigaction(sig, nullptr, &old) == 0 && !(old.sa_flags & SA_SIGINFO) &&
          old.sa_handler == SIG_DFL) {
        struct sigaction sa {};
        sa.sa_handler = on_write_signal;
        sa.sa_flags = SA_RESTART | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(sig, &sa, nullptr);
      }
    }
  });
}

// ---- pooled_buffer --------------------------------------------------------------

namespace {
// relaxed: a statistic (tests and stats read it; nothing is published by it).
std::atomic<std::int64_t> g_pooled_in_use{0};
}  // namespace

pooled_buffer::pooled_buffer(io_driver* owner, std::uint32_t id, char* p, std::size_t n) noexcept
    : owner_(owner), id_(id), epoch_(drivers_destroyed()), p_(p), n_(n) {
  g_pooled_in_use.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
}

void pooled_buffer::release() noexcept {
  if (!owner_) return;
  io_driver* owner = std::exchange(owner_, nullptr);
  char* p = std::exchange(p_, nullptr);
  n_ = 0;
  g_pooled_in_use.fetch_sub(1, std::memory_order_relaxed);  // relaxed: statistic
  if (epoch_ == drivers_destroyed()) {
    owner->release_buffer(id_, p);
    return;
  }
  // Kept past weft::run's return (against the rule in socket.h): its
  // driver is gone, and calling it crashed the process with no word. A
  // heap buffer is freed; a ring's went with its driver's arena.
  if (id_ == kHeapBufferId) delete[] p;
  static std::atomic<bool> told{false};  // relaxed: only deduplicates a log line
  if (!told.exchange(true, std::memory_order_relaxed))
    std::fprintf(stderr, "weft: a pooled_buffer was released after the weft::run that lent it "
                         "returned; release every pooled_buffer before weft::run returns\n");
}

std::size_t pooled_buffer::in_use() noexcept {
  return static_cast<std::size_t>(g_pooled_in_use.load(std::memory_order_relaxed));  // relaxed: statistic
}

// ---- socket_base --------------------------------------------------------------

socket_base::socket_base(int fd) : st_(fd >= 0 ? new fd_state(fd) : nullptr) {}

socket_base::socket_base(int fd, accept_state* accept) : st_(new fd_state(fd, accept)) {}

bool socket_base::is_open() const noexcept { return st_ && !st_->closed(); }

int socket_base::native_handle() const noexcept { return is_open() ? st_->fd() : -1; }

result<void> socket_base::close() noexcept {
  if (!st_) return {};
  return st_->close();
}

void socket_base::drop() noexcept {
  if (!st_) return;
  (void)st_->close();
  std::exchange(st_, nullptr)->release();
}

result<socket_address> socket_base::local_address() const {
  return on_fd(st_, [](int fd) -> result<socket_address> {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return sys_error(errno);
    return socket_address::from(reinterpret_cast<sockaddr*>(&ss), len);
  });
}

// ---- tcp_stream ---------------------------------------------------------------

namespace {

// Digits and dots only, or anything else inet_aton reads ("1.2.3",
// "0x7f.1", "0x7f000001") that is not a full dotted quad: a malformed IPv4
// literal, not a name. getaddrinfo would read it as inet_aton does ("1.2.3"
// is 1.2.0.3), name lookup or not; Go takes none of these as an address.
bool malformed_ipv4_literal(const std::string& host) {
  in_addr a{};
  if (::inet_pton(AF_INET, host.c_str(), &a) == 1) return false;  // a dotted quad
  return host.find_first_not_of("0123456789.") == std::string::npos ||
         ::inet_aton(host.c_str(), &a) != 0;
}

// "name:port" -> {name, port}: a host that is not an address literal (those
// socket_address::parse() takes) and a decimal port. Anything else: none.
std::optional<std::pair<std::string, int>> split_name_port(std::string_view text) {
  auto colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return std::nullopt;
  std::string_view host = text.substr(0, colon), port = text.substr(colon + 1);
  if (host.find_first_of(":[]/%@") != std::string_view::npos) return std::nullopt;
  // A literal written out in full was parse()'s already.
  if (malformed_ipv4_literal(std::string(host))) return std::nullopt;
  // Unsigned, as parse()'s: a signed int would take "-0" as port 0.
  unsigned p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || ec != std::errc{} || end != port.data() + port.size() || p > 65535)
    return std::nullopt;
  return std::pair{std::string(host), static_cast<int>(p)};
}

// bind(text) for listeners and UDP sockets: an address literal, or
// "name:port" looked up and each address tried in turn until one binds (as
// Tokio's bind; Go's Listen takes the first). The error is the lookup's, or
// the first address's.
template <typename Bind>
auto bind_by_text(std::string_view text, std::source_location where, Bind&& bind)
    -> decltype(bind(socket_address{})) {
  auto a = socket_address::parse(text);
  if (a) return bind(*a);
  auto name = split_name_port(text);
  if (!name) return std::unexpected(a.error());  // neither an address nor "name:port"
  auto addrs = resolve(name->first, name->second, {}, where);
  if (!addrs) return std::unexpected(addrs.error());
  std::error_code first = std::make_error_code(std::errc::address_not_available);
  for (std::size_t i = 0; i < addrs->size(); ++i) {
    auto r = bind((*addrs)[i]);
    if (r) return r;
    if (i == 0) first = r.error();
  }
  return std::unexpected(first);
}

}  // namespace

result<tcp_stream> tcp_stream::connect(std::string_view addr, deadline_arg d,
                                       std::source_location where) {
  auto a = socket_address::parse(addr);
  if (a) return connect(*a, d, where);
  auto name = split_name_port(addr);
  if (!name) return std::unexpected(a.error());  // neither an address nor "name:port"
  if (clock::now() >= d.when) return std::unexpected(std::make_error_code(std::errc::timed_out));
  auto addrs = resolve(name->first, name->second, d, where);
  if (!addrs) return std::unexpected(addrs.error());
  return connect(std::span<const socket_address>(*addrs), d, where);
}

result<tcp_stream> tcp_stream::connect(std::span<const socket_address> addrs, deadline_arg d,
                                       std::source_location where) {
  if (addrs.empty()) return std::unexpected(std::make_error_code(std::errc::invalid_argument));
  constexpr auto kMinTry = std::chrono::seconds(2);  // Go's minimum per address
  std::error_code first;
  for (std::size_t i = 0; i < addrs.size(); ++i) {
    clock::time_point now = clock::now();
    if (now >= d.when) return std::unexpected(std::make_error_code(std::errc::timed_out));
    clock::time_point until = d.when;
    if (d.when != clock::time_point::max()) {
      auto share = (d.when - now) / static_cast<long>(addrs.size() - i);
      until = share < kMinTry ? std::min(d.when, now + kMinTry) : now + share;
    }
    auto s = connect(addrs[i], until, where);
    if (s) return s;
    const std::error_code e = s.error();
    if (e == std::errc::operation_canceled) return std::unexpected(e);
    if (e == std::errc::timed_out && clock::now() >= d.when) return std::unexpected(e);
    if (!first) first = e;
  }
  return std::unexpected(first);
}

result<tcp_stream> tcp_stream::connect(const socket_address& addr, deadline_arg d,
                                       std::source_location where) {
  // A deadline already past: no try, as Go's Dial. A connect is rarely
  // done at once, so what one try did would depend on the driver (io_uring
  // finishes a loopback handshake, epoll reports EINPROGRESS), and a
  // timed-out try may still have reached the peer.
  if (auto e = missing(addr)) return *e;
  if (clock::now() >= d.when) return std::unexpected(std::make_error_code(std::errc::timed_out));
  int fd = new_socket(addr.family());
  if (fd < 0) return sys_error(-fd);
  tcp_stream s(fd);  // closes fd on every error path
  sockaddr_storage sa{};
  std::memcpy(&sa, addr.get(), addr.size());
  socklen_t len = addr.size();
  op o{.kind = op_kind::connect, .addr = reinterpret_cast<sockaddr*>(&sa), .addrlen = &len};
  auto r = perform_on(s.st_, o, d.when, "tcp connect", where);
  if (!r) return std::unexpected(r.error());
  return s;
}

namespace {

// A read into no buffer space, or a write of nothing, returns 0 at once, as
// Go's and Tokio's do: it neither waits for data nor takes any. A closed
// socket is still its error.
result<std::size_t> nothing_to_move(fd_state* st) {
  return on_fd(st, [](int) -> result<std::size_t> { return 0; });
}

}  // namespace

namespace {

// One chunk from the stream's multishot receive (io/recv.cc), or nothing:
// then the caller receives once the old way (no multishot here, or the
// pool ran dry).
std::optional<result<recv_chunk>> take_chunk(fd_state* st, recv_state* rs, clock::time_point deadline,
                                             std::source_location where) {
  fd_guard g(st);
  if (!g) return bad_fd_error();
  auto c = recv_take(rs, g.fd(), deadline, "tcp read", where);
  if (c) return c;
  if (g.closed()) return bad_fd_error();
  if (c.error() == std::errc::not_supported) return std::nullopt;
  return c;
}

// Copies what chunk c holds into `to`; what does not fit goes back to rs,
// to be read next.
result<std::size_t> copy_out(recv_state* rs, recv_chunk c, std::span<const iovec> to) {
  if (c.res < 0) return std::unexpected(std::error_code(-c.res, std::system_category()));
  if (c.res == 0) return 0;  // the end of the stream: no buffer
  std::size_t n = 0;
  for (const iovec& v : to) {
    std::size_t k = std::min(v.iov_len, c.size());
    std::memcpy(v.iov_base, c.data(), k);
    c.off += static_cast<std::uint32_t>(k);
    n += k;
    if (c.size() == 0) break;
  }
  if (c.size() > 0) recv_put_back(rs, c);
  else c.owner->release_buffer(c.id, c.owner->pooled_buffer_at(c.id));
  return n;
}

// read() and readv() on a stream whose pooled reads made a multishot
// receive: they read through it, so that nothing it queued is skipped.
std::optional<result<std::size_t>> read_queued(fd_state* st, std::span<const iovec> to,
                                               clock::time_point deadline,
                                               std::source_location where) {
  recv_state* rs = st ? st->recv_if_made() : nullptr;
  if (!rs) return std::nullopt;
  auto c = take_chunk(st, rs, deadline, where);
  if (!c) return std::nullopt;
  if (!*c) return std::unexpected(c->error());
  return copy_out(rs, **c, to);
}

}  // namespace

result<std::size_t> tcp_stream::read(std::span<char> buf, deadline_arg d,
                                     std::source_location where) {
  if (buf.empty()) return nothing_to_move(st_);
  const iovec one{buf.data(), buf.size()};
  if (auto r = read_queued(st_, {&one, 1}, d.when, where)) return *r;
  op o{.kind = op_kind::recv, .buf = buf.data(), .len = buf.size()};
  auto r = perform_on(st_, o, d.when, "tcp read", where);
  if (!r) return std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}

result<pooled_buffer> tcp_stream::read_pooled(deadline_arg d, std::source_location where) {
  io_driver* here = current_driver();
  // A multishot receive where this worker can arm one, or one armed already
  // (perhaps on another worker's ring): see io/recv.cc.
  if (st_ && ((here && here->has_multishot_recv()) || st_->recv_if_made())) {
    recv_state* rs = st_->recv();
    if (!rs) return bad_fd_error();
    if (auto c = take_chunk(st_, rs, d.when, where)) {
      if (!*c) return std::unexpected(c->error());
      const recv_chunk& k = **c;
      if (k.res < 0) return std::unexpected(std::error_code(-k.res, std::system_category()));
      if (k.res == 0) return pooled_buffer();  // end of stream, nothing lent
      return pooled_buffer(k.owner, k.id, k.data(), k.size());
    }
  }
  // The driver that lends the buffer is the one that performs the receive:
  // the worker the fiber is on now. Read again after take_chunk(), which
  // may have parked and woken on another worker (the multishot's, which
  // ended with its pool dry): the buffer is that worker's, and named as
  // another's it would go back into the wrong ring, which then hands it
  // out twice.
  io_driver* owner = current_driver();
  op o{.kind = op_kind::recv_pooled};
  o.poll_first = st_ && fd_state::write_behind_used() && st_->write_behind_unsent();
  auto r = perform_on(st_, o, d.when, "tcp read", where);
  if (!r) return std::unexpected(r.error());
  if (!o.buf) return pooled_buffer();  // end of stream, nothing lent
  if (*r == 0) {  // end of stream in a lent buffer (io_uring may pick one): give it back
    owner->release_buffer(o.buf_id, o.buf);
    return pooled_buffer();
  }
  // A heap buffer (kHeapBufferId) may come from any driver: each frees it.
  return pooled_buffer(owner, o.buf_id, static_cast<char*>(o.buf), static_cast<std::size_t>(*r));
}

result<std::size_t> tcp_stream::read_exact(std::span<char> buf, deadline_arg d,
                                           std::size_t* got_out, std::source_location where) {
  std::size_t got = 0;
  result<std::size_t> r = 0;
  while (got < buf.size()) {
    auto n = read(buf.subspan(got), d, where);
    if (!n) {
      r = n;
      break;
    }
    if (*n == 0) {
      r = std::unexpected(make_error_code(got == 0 ? io_errc::end_of_stream
                                                   : io_errc::unexpected_eof));
      break;
    }
    got += *n;
  }
  if (got_out) *got_out = got;
  if (!r) return r;
  return got;
}

result<std::size_t> tcp_stream::write(std::span<const char> buf, deadline_arg d,
                                      std::source_location where) {
  if (buf.empty()) return nothing_to_move(st_);
  fd_guard g(st_);
  if (!g) return bad_fd_error();
  // The write-behind before this one, if any, is this write's to wait for
  // and to report (see *Write-behind* in io/fd_state.h).
  if (fd_state::write_behind_used()) {
    if (auto s = st_->settle(d.when, where, /*unwind=*/true); !s) {
      if (g.closed()) return bad_fd_error();
      return std::unexpected(s.error());
    }
  }
  if (buf.size() <= kWriteBehindMax) {
    io_driver* drv = current_driver();
    if (drv && st_->start_write_behind(*drv, buf, d.when)) return buf.size();
  }
  // SAFETY: send only reads the buffer; the const_cast is for op's one
  // buffer field.
  op o{.kind = op_kind::send, .fd = g.fd(), .buf = const_cast<char*>(buf.data()),
       .len = buf.size(), .use = g.use()};
  auto r = perform(o, d.when, "tcp write", where);
  if (!r) return g.closed() ? bad_fd_error() : std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}

result<void> tcp_stream::write_all(std::span<const char> buf, deadline_arg d,
                                   std::size_t* sent, std::source_location where) {
  std::size_t done = 0;
  result<void> r;
  while (done < buf.size()) {
    auto n = write(buf.subspan(done), d, where);
    if (!n) {
      r = std::unexpected(n.error());
      break;
    }
    done += *n;
  }
  if (sent) *sent = done;
  return r;
}

result<std::size_t> tcp_stream::readv(std::span<const iovec> bufs, deadline_arg d,
                                      std::source_location where) {
  const std::span<const iovec> w = iov_window(bufs);
  if (w.empty()) return nothing_to_move(st_);
  if (auto r = read_queued(st_, w, d.when, where)) return *r;
  msghdr m{};
  m.msg_iov = const_cast<iovec*>(w.data());  // the kernel only reads the array
  m.msg_iovlen = w.size();
  op o{.kind = op_kind::recvmsg, .msg = &m};
  auto r = perform_on(st_, o, d.when, "tcp readv", where);
  if (!r) return std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}

result<void> tcp_stream::flush(deadline_arg d, std::source_location where) {
  fd_guard g(st_);
  if (!g) return bad_fd_error();
  if (!fd_state::write_behind_used()) return {};
  if (auto s = st_->settle(d.when, where, /*unwind=*/true); !s) {  // as write()
    if (g.closed()) return bad_fd_error();
    return std::unexpected(s.error());
  }
  return {};
}

result<std::size_t> tcp_stream::writev(std::span<const iovec> bufs, deadline_arg d,
                                       std::source_location where) {
  const std::span<const iovec> w = iov_window(bufs);
  if (w.empty()) return nothing_to_move(st_);
  msghdr m{};
  m.msg_iov = const_cast<iovec*>(w.data());  // the kernel only reads the array
  m.msg_iovlen = w.size();
  fd_guard g(st_);
  if (!g) return bad_fd_error();
  if (fd_state::write_behind_used()) {
    if (auto s = st_->settle(d.when, where, /*unwind=*/true); !s) {  // as write()
      if (g.closed()) return bad_fd_error();
      return std::unexpected(s.error());
    }
  }
  op o{.kind = op_kind::sendmsg, .fd = g.fd(), .msg = &m, .use = g.use()};
  auto r = perform(o, d.when, "tcp writev", where);
  if (!r) return g.closed() ? bad_fd_error() : std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}

result<void> tcp_stream::shutdown(int how) noexcept {
  fd_guard g(st_);
  if (!g) return bad_fd_error();
  // shutdown(2)'s EINVAL, said before anything below acts on `how`: a
  // deferred end of the stream (defer_shutdown) would take any `how` but
  // SHUT_RD for SHUT_WR, and report success for it.
  if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)
    return std::unexpected(std::make_error_code(std::errc::invalid_argument));
  // The end of the stream goes after the last write's bytes: a write-behind
  // this fiber started is waited for (until its write's deadline) and its
  // failure reported. Another fiber's shutdown does not wait, as it would
  // not wait for this fiber's blocked send (a peer being dropped).
  if (how != SHUT_RD && st_->write_behind_is_callers()) {
    if (auto s = st_->settle(st_->write_behind_deadline(), std::source_location::current(),
                             /*unwind=*/false);
        !s)
      return g.closed() ? bad_fd_error() : std::unexpected(s.error());
  }
  // From here no write-behind starts: a write that starts once the call
  // has begun gets its EPIPE from the kernel, at once, not from a later
  // call. Another fiber's write-behind in flight: the end of the stream
  // goes after its bytes (*Lingering* in io/fd_state.h); the reading side
  // ends now.
  if (how != SHUT_RD && st_->defer_shutdown()) {
    if (how == SHUT_RDWR && ::shutdown(g.fd(), SHUT_RD) < 0) return sys_error(errno);
    return {};
  }
  if (::shutdown(g.fd(), how) < 0) return sys_error(errno);
  return {};
}

result<void> tcp_stream::set_nodelay(bool on) noexcept {
  return on_fd(st_, [on](int fd) -> result<void> {
    int v = on ? 1 : 0;
    if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, sizeof v) < 0) return sys_error(errno);
    return {};
  });
}

namespace {

// getpeername(2): a stream's peer, or a connected datagram socket's.
result<socket_address> peer_of(fd_state* st) {
  return on_fd(st, [](int fd) -> result<socket_address> {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return sys_error(errno);
    return socket_address::from(reinterpret_cast<sockaddr*>(&ss), len);
  });
}

}  // namespace

result<socket_address> tcp_stream::peer_address() const { return peer_of(st_); }

// ---- tcp_listener -------------------------------------------------------------

result<tcp_listener> tcp_listener::bind(std::string_view addr, int backlog,
                                       std::source_location where) {
  return bind_by_text(addr, where,
                      [backlog](const socket_address& a) { return bind(a, backlog); });
}

result<tcp_listener> tcp_listener::bind(const socket_address& addr, int backlog) {
  if (auto e = missing(addr)) return *e;
  if (backlog < 0) return std::unexpected(std::make_error_code(std::errc::invalid_argument));
  // Non-blocking: on io_uring, accept() tries accept4 itself before it
  // arms the multishot (io/accept.cc), which must not block the worker
  // when there is no connection or the multishot took it first. (The
  // epoll driver makes it non-blocking at its first accept anyway.)
  int fd = new_socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK);
  if (fd < 0) return sys_error(-fd);
  tcp_listener l(fd, new_accept_state(backlog));  // closes fd on every error path
  int one = 1;
  if (addr.family() != AF_UNIX &&
      ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
    return sys_error(errno);
  if (::bind(fd, addr.get(), addr.size()) < 0) return sys_error(errno);
  if (addr.family() == AF_UNIX) {
    // A path bind() just created (not an abstract name, which starts with
    // a NUL): ours to remove at close, also when listen() below fails.
    const auto* su = reinterpret_cast<const sockaddr_un*>(addr.get());
    if (su->sun_path[0] != '\0')
      unlink_on_close(l.st_->accept(), std::string(su->sun_path, strnlen(su->sun_path, sizeof su->sun_path)));
  }
  if (::listen(fd, backlog) < 0) return sys_error(errno);
  return l;
}

// tcp_listener::accept() is in io/accept.cc.

// ---- udp_socket ---------------------------------------------------------------

result<udp_socket> udp_socket::bind(std::string_view addr, std::source_location where) {
  return bind_by_text(addr, where, [](const socket_address& a) { return bind(a); });
}

result<udp_socket> udp_socket::bind(const socket_address& addr) {
  if (auto e = missing(addr)) return *e;
  int fd = new_socket(addr.family(), SOCK_DGRAM);
  if (fd < 0) return sys_error(-fd);
  udp_socket u(fd);  // closes fd on every error path
  if (::bind(fd, addr.get(), addr.size()) < 0) return sys_error(errno);
  return u;
}

namespace {
// One datagram through sendmsg(2): to `to`, or with an empty `to` to the
// connected peer (udp_socket::send).
result<std::size_t> send_datagram(fd_state* st, std::span<const char> buf,
                                  const socket_address& to, deadline_arg d,
                                  std::source_location where) {
  sockaddr_storage sa{};
  std::memcpy(&sa, to.get(), to.size());
  iovec v{const_cast<char*>(buf.data()), buf.size()};  // read only
  msghdr m{};
  m.msg_name = to.size() ? &sa : nullptr;
  m.msg_namelen = to.size();
  m.msg_iov = &v;
  m.msg_iovlen = 1;
  op o{.kind = op_kind::sendmsg, .msg = &m};
  auto r = perform_on(st, o, d.when, "udp send", where);
  if (!r) return std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}
}  // namespace

result<std::size_t> udp_socket::send_to(std::span<const char> buf, const socket_address& to,
                                         deadline_arg d, std::source_location where) {
  // Not "the peer": sendmsg without a name would send there on a
  // connected socket (send() is for that), or fail with "Destination
  // address required", which hides that the program passed no address.
  if (auto e = missing(to)) return *e;
  return send_datagram(st_, buf, to, d, where);
}

result<std::size_t> udp_socket::recv_from(std::span<char> buf, socket_address* from,
                                          deadline_arg d, std::source_location where) {
  sockaddr_storage sa{};
  iovec v{buf.data(), buf.size()};
  msghdr m{};
  m.msg_name = &sa;
  m.msg_namelen = sizeof sa;
  m.msg_iov = &v;
  m.msg_iovlen = 1;
  // MSG_TRUNC: the datagram's whole length comes back, so one longer than
  // buf is told apart from one that fits exactly.
  op o{.kind = op_kind::recvmsg, .msg = &m, .flags = MSG_TRUNC};
  auto r = perform_on(st_, o, d.when, "udp receive", where);
  if (!r) return std::unexpected(r.error());
  if (from) *from = socket_address::from(reinterpret_cast<sockaddr*>(&sa), m.msg_namelen);
  if (static_cast<std::size_t>(*r) > buf.size())
    return std::unexpected(std::make_error_code(std::errc::message_size));
  return static_cast<std::size_t>(*r);
}

result<void> udp_socket::connect(const socket_address& peer) {
  if (auto e = missing(peer)) return *e;
  // Immediate for a datagram socket (no handshake): on the worker.
  return on_fd(st_, [&peer](int fd) -> result<void> {
    if (::connect(fd, peer.get(), peer.size()) < 0) return sys_error(errno);
    return {};
  });
}

result<void> udp_socket::connect(std::string_view peer, deadline_arg d,
                                 std::source_location where) {
  auto a = socket_address::parse(peer);
  if (a) return connect(*a);
  auto name = split_name_port(peer);
  if (!name) return std::unexpected(a.error());  // neither an address nor "name:port"
  auto addrs = resolve(name->first, name->second, d, where);
  if (!addrs) return std::unexpected(addrs.error());
  // Each address in turn, as Tokio's connect: the name may answer one of
  // a family this socket is not (::1 before 127.0.0.1 for "localhost"),
  // which connect(2) refuses with EAFNOSUPPORT at once, sending nothing.
  // (Go's DialUDP takes the first, but makes its socket for that family.)
  // The error: the first one that is not that refusal.
  const auto other_family = std::make_error_code(std::errc::address_family_not_supported);
  std::error_code err = std::make_error_code(std::errc::address_not_available);  // no address
  bool tried = false;
  for (const socket_address& a : *addrs) {
    auto r = connect(a);
    if (r) return r;
    if (!tried || (err == other_family && r.error() != other_family)) err = r.error();
    tried = true;
  }
  return std::unexpected(err);
}

result<std::size_t> udp_socket::send(std::span<const char> buf, deadline_arg d,
                                     std::source_location where) {
  return send_datagram(st_, buf, socket_address{}, d, where);  // no address: the connected peer
}

result<std::size_t> udp_socket::recv(std::span<char> buf, deadline_arg d,
                                     std::source_location where) {
  return recv_from(buf, nullptr, d, where);
}

result<socket_address> udp_socket::peer_address() const { return peer_of(st_); }

result<void> udp_socket::set_broadcast(bool on) noexcept {
  return on_fd(st_, [on](int fd) -> result<void> {
    int v = on ? 1 : 0;
    if (::setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &v, sizeof v) < 0) return sys_error(errno);
    return {};
  });
}

// ---- resolve --------------------------------------------------------------------

namespace {

class io_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "weft.io"; }
  std::string message(int ev) const override {
    switch (static_cast<io_errc>(ev)) {
      case io_errc::end_of_stream: return "end of stream";
      case io_errc::unexpected_eof: return "end of stream in the middle of a read_exact";
    }
    return "unknown weft.io error";
  }
};

class resolve_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "getaddrinfo"; }
  std::string message(int ev) const override { return ::gai_strerror(ev); }
};

}  // namespace

const std::error_category& io_category() noexcept {
  static const io_category_impl c;
  return c;
}

const std::error_category& resolve_category() noexcept {
  static const resolve_category_impl c;
  return c;
}

result<std::vector<socket_address>> resolve(const std::string& host, int port,
                                            deadline_arg d, std::source_location where) {
  if (port < 0 || port > 65535 || host.find('\0') != std::string::npos ||
      malformed_ipv4_literal(host))
    return std::unexpected(std::make_error_code(std::errc::invalid_argument));
  // The lookup may outlive this call (a deadline, a stop request: see
  // detail::blocking_until()), so it owns its copy of the name.
  return detail::blocking_until([host, port]() -> result<std::vector<socket_address>> {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    // A numeric host ("::1", "10.0.0.1", "fe80::1%eth0") is its own answer.
    // Only a name gets AI_ADDRCONFIG (answers of the families this host has
    // addresses of): glibc counts no loopback address, so on a host with
    // IPv4 addresses only (a default Docker network) it refused "::1" with
    // EAI_ADDRFAMILY, though [::1] is there to connect to.
    hints.ai_flags = AI_NUMERICSERV | AI_NUMERICHOST;
    addrinfo* res = nullptr;
    std::string service = std::to_string(port);
    int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
    if (rc == EAI_NONAME) {  // not a numeric address: a name to look up
      hints.ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG;
      rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
    }
    if (rc == EAI_SYSTEM) return sys_error(errno);  // errno read right after the call
    if (rc != 0) return std::unexpected(std::error_code(rc, resolve_category()));
    std::vector<socket_address> out;
    for (addrinfo* a = res; a; a = a->ai_next)
      out.push_back(socket_address::from(a->ai_addr, a->ai_addrlen));
    ::freeaddrinfo(res);
    return out;
  }, d.when, where);
}

}  // namespace weft::io
