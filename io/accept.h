// io/accept.h — internal: the listener's accept state (io/accept.cc), as
// socket.cc creates and releases it. Not a public header.
#pragma once

namespace weft::io {

class accept_state;

// A new state holding one share, the listener's.
accept_state* new_accept_state();
// The listener closes: wakes its parked acceptors (they fail with EBADF),
// cancels its multishot accept, and gives back the listener's share.
void close_accept_state(accept_state* s) noexcept;

}  // namespace weft::io
