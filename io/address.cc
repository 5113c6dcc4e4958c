// io/address.cc — socket_address: parsing and printing numeric IPv4/IPv6
// addresses with a port (IPv6 with an optional zone), and Unix socket
// paths ("unix:/path", "unix:@abstract"). to_string() prints what parse()
// reads back. No name lookup (that goes through the blocking pool, as
// weft::resolve); a zone names an interface by if_nametoindex().
#include <arpa/inet.h>
#include <net/if.h>
#include <sys/un.h>

#include <cstddef>

#include <charconv>
#include <cstdint>
#include <cstring>
#include <optional>

#include "io/socket.h"

namespace weft::io {
namespace {

std::unexpected<std::error_code> invalid() {
  return std::unexpected(std::make_error_code(std::errc::invalid_argument));
}

// An IPv6 zone: a decimal interface index, or the name of an interface
// this host has. Nothing else (an empty or unknown zone is an error, not
// scope 0, which would silently mean "no interface").
std::optional<std::uint32_t> parse_zone(std::string_view z) {
  if (z.empty() || z.size() >= IF_NAMESIZE) return std::nullopt;
  std::uint32_t idx = 0;
  auto [end, ec] = std::from_chars(z.data(), z.data() + z.size(), idx);
  if (ec == std::errc{} && end == z.data() + z.size()) {
    if (idx == 0) return std::nullopt;
    return idx;
  }
  char name[IF_NAMESIZE] = {};
  std::memcpy(name, z.data(), z.size());
  idx = if_nametoindex(name);
  if (idx == 0) return std::nullopt;
  return idx;
}

}  // namespace

result<socket_address> socket_address::parse(std::string_view text) {
  if (text.starts_with("unix:")) {  // "unix:/run/x.sock", "unix:@name"
    std::string_view path = text.substr(5);
    socket_address a;
    auto* su = reinterpret_cast<sockaddr_un*>(&a.storage_);
    // A path needs room for its NUL; an abstract name (Linux: '@' stands
    // for the leading NUL) has none, and its length is the address's.
    // A NUL would end a path early (the kernel stops there), so a path has
    // none; an abstract name is bytes, NULs included (the kernel compares
    // all of them, and Go's "@a\x00b" is such a name): one the kernel gives
    // (local_address(), a peer's) prints with them, and parses back.
    const bool abstract = path.starts_with('@');
    if (path.size() < (abstract ? 2u : 1u) ||
        path.size() > sizeof su->sun_path - (abstract ? 0 : 1) ||
        (!abstract && path.find('\0') != std::string_view::npos))
      return invalid();
    su->sun_family = AF_UNIX;
    std::memcpy(su->sun_path, path.data(), path.size());
    if (abstract) su->sun_path[0] = '\0';
    a.len_ = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() +
                                    (abstract ? 0 : 1));
    return a;
  }
  // A NUL would end the host (or zone) early for inet_pton and
  // if_nametoindex, which would take "127.0.0.1\0junk" as 127.0.0.1.
  if (text.find('\0') != std::string_view::npos) return invalid();
  std::string_view host, port;
  bool v6 = false;
  if (!text.empty() && text.front() == '[') {  // "[::1]:7000"
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return invalid();
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
    v6 = true;
  } else {  // "127.0.0.1:7000"
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return invalid();
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return invalid();  // bare IPv6: needs []
  }
  unsigned p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || ec != std::errc{} || end != port.data() + port.size() || p > 65535)
    return invalid();
  // "[fe80::1%eth0]:7000": a link-local address's zone, an interface name
  // or index (sin6_scope_id), as Go's and getaddrinfo's.
  std::uint32_t scope = 0;
  if (auto pct = host.find('%'); v6 && pct != std::string_view::npos) {
    auto s = parse_zone(host.substr(pct + 1));
    if (!s) return invalid();
    scope = *s;
    host = host.substr(0, pct);
  }
  if (host.empty() || host.size() >= INET6_ADDRSTRLEN) return invalid();
  char h[INET6_ADDRSTRLEN] = {};
  std::memcpy(h, host.data(), host.size());

  socket_address a;
  if (v6) {
    auto* s6 = reinterpret_cast<sockaddr_in6*>(&a.storage_);
    if (inet_pton(AF_INET6, h, &s6->sin6_addr) != 1) return invalid();
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(static_cast<std::uint16_t>(p));
    s6->sin6_scope_id = scope;
    a.len_ = sizeof(sockaddr_in6);
  } else {
    auto* s4 = reinterpret_cast<sockaddr_in*>(&a.storage_);
    if (inet_pton(AF_INET, h, &s4->sin_addr) != 1) return invalid();
    s4->sin_family = AF_INET;
    s4->sin_port = htons(static_cast<std::uint16_t>(p));
    a.len_ = sizeof(sockaddr_in);
  }
  return a;
}

socket_address socket_address::from(const sockaddr* sa, socklen_t len) {
  socket_address a;
  if (len > sizeof a.storage_) len = sizeof a.storage_;
  std::memcpy(&a.storage_, sa, len);
  a.len_ = len;
  return a;
}

int socket_address::port() const noexcept {
  if (family() == AF_INET)
    return ntohs(reinterpret_cast<const sockaddr_in*>(&storage_)->sin_port);
  if (family() == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage_)->sin6_port);
  return 0;
}

std::string socket_address::to_string() const {
  char h[INET6_ADDRSTRLEN] = {};
  if (family() == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage_)->sin_addr, h, sizeof h);
    return std::string(h) + ":" + std::to_string(port());
  }
  if (family() == AF_INET6) {
    const auto* s6 = reinterpret_cast<const sockaddr_in6*>(&storage_);
    inet_ntop(AF_INET6, &s6->sin6_addr, h, sizeof h);
    std::string zone;  // the scope parse() reads back: a name, else the index
    if (s6->sin6_scope_id != 0) {
      char name[IF_NAMESIZE] = {};
      zone = "%" + (if_indextoname(s6->sin6_scope_id, name) ? std::string(name)
                                                            : std::to_string(s6->sin6_scope_id));
    }
    return "[" + std::string(h) + zone + "]:" + std::to_string(port());
  }
  if (family() == AF_UNIX) {
    const auto* su = reinterpret_cast<const sockaddr_un*>(&storage_);
    std::size_t n = len_ > offsetof(sockaddr_un, sun_path) ? len_ - offsetof(sockaddr_un, sun_path) : 0;
    if (n > 1 && su->sun_path[0] == '\0')  // abstract: the name is all n - 1 bytes
      return "unix:@" + std::string(su->sun_path + 1, n - 1);
    return "unix:" + std::string(su->sun_path, strnlen(su->sun_path, n));
  }
  return "(unspecified)";
}

}  // namespace weft::io
