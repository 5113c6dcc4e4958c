// io/accept.h — internal: the listener's accept state (io/accept.cc), as
// socket.cc creates and releases it. Not a public header.
#pragma once

#include <string>

namespace weft::io {

class accept_state;

// A new state holding one share, the listener's; `backlog` as listen(2)
// took it (it bounds the connections accepted ahead of accept() calls).
accept_state* new_accept_state(int backlog);
// The listener closes: wakes its parked acceptors (they fail with EBADF)
// and cancels its multishot accept. Idempotent.
void shut_accept_state(accept_state* s) noexcept;
// The listener is a Unix socket bound to `path`: its close() removes the
// file, so the path can be bound again (as Go's UnixListener does).
void unlink_on_close(accept_state* s, std::string path);
// shut_accept_state(), then gives back the listener's share.
void close_accept_state(accept_state* s) noexcept;
// Descriptors accepted by multishot accepts that no accept() took yet,
// every listener together (io_stats::accept_queued).
std::uint64_t accept_queued_descriptors() noexcept;

}  // namespace weft::io
