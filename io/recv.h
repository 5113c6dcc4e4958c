// io/recv.h — internal: a stream socket's multishot receive (io/recv.cc),
// as socket.cc and fd_state use it. Not a public header.
#pragma once

#include <cstdint>
#include <source_location>

#include "io/driver.h"

namespace weft::io {

class recv_state;

// What one receive brought: res > 0 bytes, of which those from `off` on
// are still unread, in pooled buffer `id` of `owner`; 0, the end of the
// stream; < 0, -errno. Only a chunk with res > 0 holds a buffer.
struct recv_chunk {
  int res = 0;
  std::uint32_t id = 0;
  std::uint32_t off = 0;
  io_driver* owner = nullptr;
  // recv_drivers_destroyed() when it was queued: a driver destroyed since
  // may be `owner`, whose buffers went with it (see recv_driver_destroyed()).
  std::uint32_t epoch = 0;
  char* data() const noexcept { return owner->pooled_buffer_at(id) + off; }
  std::size_t size() const noexcept { return static_cast<std::size_t>(res) - off; }
};

// Pooled buffers now queued in every socket's state, unread (io_stats).
std::uint64_t recv_queued_buffers() noexcept;

// An I/O driver is being destroyed (its first step, before its buffers
// go): chunks queued and pooled_buffers lent before then name a driver
// that may be gone, so they are forgotten, not given back. Drivers go only
// when a runtime ends, after every worker joined, all of them together.
void recv_driver_destroyed() noexcept;
// How many drivers have been destroyed so far (acquire: one that sees the
// count a buffer was lent under saw no destructor begin since).
std::uint32_t drivers_destroyed() noexcept;

// A new state holding one share, its socket's (fd_state's).
recv_state* new_recv_state();
// The socket closes: parked readers wake with EBADF, the multishot is
// cancelled, and what arrives later is dropped. Idempotent.
void shut_recv_state(recv_state* s) noexcept;
// shut_recv_state(), then gives back the socket's share.
void close_recv_state(recv_state* s) noexcept;
// The next chunk received on descriptor fd, arming the multishot on the
// calling fiber's worker if none is armed, and parking until one arrives
// or `deadline`. std::errc::not_supported: receive once the old way (this
// worker's driver arms none, or the pool ran dry: see *Back-pressure* in
// io/recv.cc; or a plain thread found nothing queued: it cannot park).
// The caller holds an fd_guard on the socket.
result<recv_chunk> recv_take(recv_state* s, int fd, clock::time_point deadline, const char* what,
                             std::source_location where);
// Gives a chunk the caller took and read only part of back, to be the
// next one taken.
void recv_put_back(recv_state* s, const recv_chunk& c) noexcept;

}  // namespace weft::io
