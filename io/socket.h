// io/socket.h
//
// TCP and UDP sockets whose blocking-looking calls park only the calling
// fiber, and name lookup. Users include runtime/net.h, where these are
// re-exported as weft::tcp_listener, weft::tcp_stream, weft::udp_socket,
// weft::socket_address, weft::resolve.
//
//   auto ln = weft::tcp_listener::bind("127.0.0.1:7000");   // result<tcp_listener>
//   auto c = ln->accept();                                  // parks; result<tcp_stream>
//   auto n = c->read(buf, weft::deadline(30s));             // 0 = EOF
//
// Errors are values (io::result<T> is weft::result<T>): timed_out at the
// deadline, operation_canceled after the fiber's request_stop(), the system
// error otherwise (EPIPE for a write to a closed peer — never SIGPIPE;
// EMFILE from accept, after which the listener keeps working). A malformed
// address, or a default socket_address given to connect() or bind(), is
// std::errc::invalid_argument.
//
// Every call that may park takes a trailing std::source_location, defaulted
// to the caller's: dump() and the deadlock report show where the program
// made the call, not a line in io/.
//
// Invariants:
//   - A socket object owns its descriptor through a heap fd_state
//     (io/fd_state.h) that the calls in flight share; moving transfers it;
//     the destructor closes it.
//   - One fiber uses a socket object at a time, except that one reader and
//     one writer fiber may use the same tcp_stream concurrently, any number
//     of fibers may accept() on one tcp_listener, and any fiber may close()
//     a socket others are using (not destroy or move it).
//   - A listener made by bind() has a heap accept state (io/accept.cc),
//     released with its fd_state; io_uring's multishot accept feeds it.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <source_location>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "io/driver.h"

namespace weft::io {

// weft's own socket errors (category "weft.io"), where no errno says it.
//   end_of_stream    read_exact: the peer ended the stream before sending
//                    any of the bytes asked for (a clean end between
//                    messages; Go's io.EOF from io.ReadFull)
//   unexpected_eof   read_exact: the stream ended part-way through (Go's
//                    io.ErrUnexpectedEOF, Tokio's UnexpectedEof)
enum class io_errc { end_of_stream = 1, unexpected_eof = 2 };
const std::error_category& io_category() noexcept;
inline std::error_code make_error_code(io_errc e) noexcept {
  return {static_cast<int>(e), io_category()};
}

// A deadline as the socket calls take it: anything with a `when` member
// holding a steady_clock time point (weft::deadline), or a time point.
// Defaults to "never". io/ sits below runtime/, so it names no runtime type.
struct deadline_arg {
  clock::time_point when = clock::time_point::max();
  deadline_arg() = default;
  deadline_arg(clock::time_point t) : when(t) {}  // NOLINT: implicit on purpose
  template <typename D>
    requires requires(const D& d) { clock::time_point{d.when}; }
  deadline_arg(const D& d) : when(d.when) {}  // NOLINT: implicit on purpose
};

// An IPv4 or IPv6 address and port, or a Unix socket path.
class socket_address {
 public:
  socket_address() = default;
  // "127.0.0.1:7000", "[::1]:7000", "[fe80::1%eth0]:7000" (a zone: an
  // interface name or index), "unix:/run/app.sock", "unix:@name" (Linux's
  // abstract namespace: '@' stands for the leading NUL; the name may hold
  // NULs, a path may not). Numeric only: no
  // name lookup (bind() and connect() look up "name:port"). A Unix path longer than sun_path holds (107 bytes, 108
  // for an abstract name) is invalid_argument, never truncated.
  // tcp_listener and tcp_stream take a "unix:" address for a Unix stream
  // socket (set_nodelay then fails: it is a TCP option).
  static result<socket_address> parse(std::string_view text);
  static socket_address from(const sockaddr* sa, socklen_t len);

  int family() const noexcept { return storage_.ss_family; }
  int port() const noexcept;
  // "127.0.0.1:7000" / "[fe80::1%lo]:7000" / "unix:/path" / "unix:@name":
  // what parse() reads back (an unnamed Unix socket prints as "unix:").
  std::string to_string() const;
  const sockaddr* get() const noexcept { return reinterpret_cast<const sockaddr*>(&storage_); }
  socklen_t size() const noexcept { return len_; }

 private:
  sockaddr_storage storage_{};
  socklen_t len_ = 0;
};

// A received chunk in a buffer lent by the I/O driver (see *Pooled receive
// buffers* in io/driver.h): taken only when data arrived, given back by the
// destructor or release(), from any fiber or thread. Must be released
// before weft::run returns: its bytes go with the runtime's buffers (one
// released later only frees what it can, and says so on stderr).
// Move-only.
class pooled_buffer {
 public:
  pooled_buffer() = default;
  pooled_buffer(pooled_buffer&& o) noexcept
      : owner_(std::exchange(o.owner_, nullptr)), id_(o.id_), epoch_(o.epoch_),
        p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  pooled_buffer& operator=(pooled_buffer&& o) noexcept {
    if (this != &o) {
      release();
      owner_ = std::exchange(o.owner_, nullptr);
      id_ = o.id_;
      epoch_ = o.epoch_;
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~pooled_buffer() { release(); }

  std::span<const char> data() const noexcept { return {p_, n_}; }
  std::size_t size() const noexcept { return n_; }
  bool empty() const noexcept { return n_ == 0; }
  void release() noexcept;

  // Buffers lent and not yet released, process-wide.
  static std::size_t in_use() noexcept;

 private:
  friend class tcp_stream;
  pooled_buffer(io_driver* owner, std::uint32_t id, char* p, std::size_t n) noexcept;
  io_driver* owner_ = nullptr;  // null: nothing held
  std::uint32_t id_ = 0;
  // Drivers destroyed when it was lent (io/recv.h's drivers_destroyed()):
  // if that moved, owner_ is gone (see release()).
  std::uint32_t epoch_ = 0;
  char* p_ = nullptr;
  std::size_t n_ = 0;
};

class accept_state;  // io/accept.cc
class fd_state;      // io/fd_state.h

// What every socket type shares: the descriptor, held through a state that
// the operations in flight share (io/fd_state.h), and close().
class socket_base {
 public:
  socket_base() = default;
  // Adopts fd (-1: an empty socket), a socket made elsewhere (inherited,
  // passed over a Unix socket, activated by systemd).
  explicit socket_base(int fd);
  socket_base(socket_base&& o) noexcept : st_(std::exchange(o.st_, nullptr)) {}
  socket_base& operator=(socket_base&& o) noexcept {
    if (this != &o) {
      drop();
      st_ = std::exchange(o.st_, nullptr);
    }
    return *this;
  }
  ~socket_base() { drop(); }

  bool is_open() const noexcept;
  int native_handle() const noexcept;  // -1 when empty or closed
  // Closes the socket; another fiber may call it while fibers are parked
  // in this socket's calls (a timeout fiber dropping an idle peer). Those
  // calls, and any made after, fail with std::errc::bad_file_descriptor —
  // unless their result came first, which they return. The descriptor is
  // closed once the last of them has left (the peer sees the end of the
  // stream then), so none of them can touch a file that reuses its number.
  // A listener stops accepting at once.
  [[nodiscard]] result<void> close() noexcept;
  [[nodiscard]] result<socket_address> local_address() const;

 protected:
  socket_base(int fd, accept_state* accept);  // listeners (bind())
  void drop() noexcept;
  fd_state* st_ = nullptr;  // null when empty
};

class tcp_stream : public socket_base {
 public:
  using socket_base::socket_base;

  // Connects to `addr`, parking until connected. A deadline already past
  // is timed_out without a try. `addr` is an address ("127.0.0.1:7000",
  // "[::1]:7000", "unix:/run/app.sock") or, as Go's Dial, a host name and
  // port ("db.internal:5432"): the name is looked up with resolve() (on
  // the blocking pool, within the same deadline, as Go's Dial) and its
  // addresses are tried in turn as by the list overload. A Unix
  // listener whose accept queue is full is waited on, as by a blocking
  // connect(2), until it makes room (see *Full Unix listeners* in
  // io/epoll_driver.cc).
  [[nodiscard]] static result<tcp_stream> connect(std::string_view addr, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  [[nodiscard]] static result<tcp_stream> connect(const socket_address& addr, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // Tries each address in order until one connects (Go's dialSerial):
  // each try gets an equal share of the time left before the deadline, but
  // at least 2 s (or all that is left), so one silent address does not use
  // up the whole deadline. A stop request or the deadline ends the tries at
  // once; otherwise, when every address failed, the first address's error.
  // An empty list is invalid_argument.
  [[nodiscard]] static result<tcp_stream> connect(std::span<const socket_address> addrs,
                                                  deadline_arg d = {},
      std::source_location where = std::source_location::current());

  // One receive: up to buf.size() bytes; 0 at end of stream. An empty buf
  // returns 0 at once (as Go's and Tokio's: it neither waits nor takes
  // data); so do write, readv and writev with nothing to move.
  [[nodiscard]] result<std::size_t> read(std::span<char> buf, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // One receive into a pooled buffer taken only once data has arrived, so
  // a connection idle in this call holds no receive buffer. Empty at end of
  // stream.
  [[nodiscard]] result<pooled_buffer> read_pooled(deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // Fills buf entirely. A stream that ends first is an error:
  // io_errc::end_of_stream if it ended before the first byte (the peer
  // closed between messages), io_errc::unexpected_eof if part-way (a
  // truncated message). On any error, what arrived is at the start of buf,
  // and *got (if given) says how much (Go's io.ReadFull returns it too).
  [[nodiscard]] result<std::size_t> read_exact(std::span<char> buf, deadline_arg d = {},
      std::size_t* got = nullptr,
      std::source_location where = std::source_location::current());
  // One send: returns how many bytes went out. On io_uring a write of at
  // most kWriteBehindMax (4 KiB) on a TCP stream returns once the bytes are
  // copied, and the send goes on behind the fiber; the next write, writev,
  // shutdown or close waits for it and returns its failure (see
  // *Write-behind* in io/fd_state.h and README.md).
  [[nodiscard]] result<std::size_t> write(std::span<const char> buf, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // Waits until every byte a write returned for has gone to the kernel (a
  // write-behind in flight has been sent) and returns its failure, if any.
  // For a program that also sends on native_handle() itself, which would
  // otherwise overtake a small write's bytes. Returns at once when nothing
  // is in flight (as Tokio's flush on a TCP stream).
  [[nodiscard]] result<void> flush(deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // Sends all of buf (several sends if needed). *sent (if given) says how
  // many bytes went, on an error too (a deadline part-way; Go's Write
  // returns that count with its error), so a caller can go on from there.
  [[nodiscard]] result<void> write_all(std::span<const char> buf, deadline_arg d = {},
      std::size_t* sent = nullptr,
      std::source_location where = std::source_location::current());
  // One scatter receive / gather send, over at most IOV_MAX (1024)
  // buffers from the first that is not empty; the count says how far it
  // got. 0 only at end of stream (readv) or when no buffer has room.
  [[nodiscard]] result<std::size_t> readv(std::span<const iovec> bufs, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  [[nodiscard]] result<std::size_t> writev(std::span<const iovec> bufs, deadline_arg d = {},
      std::source_location where = std::source_location::current());

  [[nodiscard]] result<void> shutdown(int how = SHUT_WR) noexcept;
  [[nodiscard]] result<void> set_nodelay(bool on) noexcept;
  [[nodiscard]] result<socket_address> peer_address() const;
};

class tcp_listener : public socket_base {
 public:
  using socket_base::socket_base;

  // Binds and listens on `addr` ("127.0.0.1:0" picks a free port), with
  // SO_REUSEADDR. "name:port" ("localhost:7000") is looked up with
  // resolve() and its addresses tried in turn until one binds; the error
  // is then the lookup's or the first address's. (":7000", every
  // interface, is not taken: say "0.0.0.0:7000" or "[::]:7000".)
  // (A lookup parks the fiber: `where` is for dump(), as in the calls below.)
  [[nodiscard]] static result<tcp_listener> bind(std::string_view addr, int backlog = SOMAXCONN,
      std::source_location where = std::source_location::current());
  [[nodiscard]] static result<tcp_listener> bind(const socket_address& addr, int backlog = SOMAXCONN);

  // Parks until a connection arrives. EMFILE/ENFILE/ECONNABORTED are
  // returned as errors; the listener stays usable.
  [[nodiscard]] result<tcp_stream> accept(deadline_arg d = {},
      std::source_location where = std::source_location::current());
};

class udp_socket : public socket_base {
 public:
  using socket_base::socket_base;

  // A UDP socket bound to `addr` ("127.0.0.1:0" picks a free port; a
  // "name:port" is looked up as tcp_listener::bind does).
  [[nodiscard]] static result<udp_socket> bind(std::string_view addr,
      std::source_location where = std::source_location::current());
  [[nodiscard]] static result<udp_socket> bind(const socket_address& addr);

  // One datagram each. A datagram longer than buf is not silently cut:
  // recv_from returns std::errc::message_size ("Message too long"), with
  // its first buf.size() bytes in buf and its sender in *from; the rest of
  // it is gone (Go's ReadFrom and Tokio's recv_from return the cut length
  // instead, and the program cannot tell).
  // A datagram of exactly buf.size() bytes is received whole. send_to an
  // empty socket_address is invalid_argument (send() is the call for a
  // connected socket's peer).
  [[nodiscard]] result<std::size_t> send_to(std::span<const char> buf, const socket_address& to,
                                            deadline_arg d = {},
      std::source_location where = std::source_location::current());
  [[nodiscard]] result<std::size_t> recv_from(std::span<char> buf, socket_address* from,
                                              deadline_arg d = {},
      std::source_location where = std::source_location::current());

  // *Connected*, as Go's DialUDP and Tokio's UdpSocket::connect: `peer`
  // becomes where send() sends and the only sender recv() hears from (the
  // kernel drops other datagrams; an ICMP "port unreachable" comes back as
  // connection_refused on a later call). connect(2) on a datagram socket:
  // at once, nothing is sent; called again, it changes the peer. A
  // "name:port" is looked up within the deadline (resolve()) and its
  // addresses tried in turn, as Tokio does: the first the socket's family
  // can reach is used. An empty socket_address is invalid_argument.
  [[nodiscard]] result<void> connect(const socket_address& peer);
  [[nodiscard]] result<void> connect(std::string_view peer, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  // One datagram to, or from, the connected peer; as send_to and
  // recv_from otherwise. send() before connect() is
  // destination_address_required.
  [[nodiscard]] result<std::size_t> send(std::span<const char> buf, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  [[nodiscard]] result<std::size_t> recv(std::span<char> buf, deadline_arg d = {},
      std::source_location where = std::source_location::current());
  [[nodiscard]] result<socket_address> peer_address() const;  // not_connected before connect()
  // SO_BROADCAST: lets send_to() reach a broadcast address (else
  // permission_denied). Go turns it on for every UDP socket; here it is
  // asked for, as in Tokio.
  [[nodiscard]] result<void> set_broadcast(bool on) noexcept;
};

// Name lookup (getaddrinfo) on the blocking pool, so only the fiber waits.
// TCP addresses for `host` ("localhost", "::1", "example.com") and `port`.
// A failed lookup is an error of resolve_category() with getaddrinfo's
// message. The fiber parks meanwhile; dump() shows it at `where`. As every
// other call that parks, it returns timed_out at the deadline and
// operation_canceled once the fiber's stop is requested, while the lookup,
// which getaddrinfo cannot cut short, ends on its own on the pool and its
// answer is dropped (Go's resolver does the same); one still queued for a
// pool thread then is not made. On a plain thread the
// lookup runs on that thread, to its end.
[[nodiscard]] result<std::vector<socket_address>> resolve(const std::string& host, int port,
    deadline_arg d = {}, std::source_location where = std::source_location::current());
const std::error_category& resolve_category() noexcept;

}  // namespace weft::io

template <>
struct std::is_error_code_enum<weft::io::io_errc> : std::true_type {};
