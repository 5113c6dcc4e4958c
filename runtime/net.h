// runtime/net.h — weft's sockets, files and blocking pool, re-exported from
// io/ (see io/socket.h, io/file.h and io/blocking.h for the contracts):
// weft::tcp_listener, weft::tcp_stream, weft::udp_socket, weft::resolve,
// weft::socket_address, weft::pooled_buffer, weft::file, weft::blocking,
// weft::signal_set (io/signal.h), weft::wait_readable/wait_writable
// (io/readiness.h),
// and weft::get_io_stats() (the I/O drivers' counters, summed).
// Include it beside runtime/weft.h (which does not include it, so programs
// without I/O do not pull in the socket headers).
#pragma once

#include "io/blocking.h"
#include "io/file.h"
#include "io/readiness.h"
#include "io/signal.h"
#include "io/socket.h"

namespace weft {
using io::blocking;
using io::io_stats;
inline io_stats get_io_stats() { return io::stats(); }
using io::file;
using io::pooled_buffer;
using io::socket_address;
using io::tcp_listener;
using io::tcp_stream;
using io::udp_socket;
using io::resolve;
using io::resolve_category;
using io::io_errc;
using io::io_category;
using io::signal_set;
using io::wait_readable;
using io::wait_writable;
}  // namespace weft
