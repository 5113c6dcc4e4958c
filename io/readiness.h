// io/readiness.h
//
// Waiting for a descriptor weft does not own to become readable or
// writable (Tokio's AsyncFd, what Go's netpoller does behind os.File): the
// socket or pipe of a C library with an asynchronous interface — libpq,
// hiredis, c-ares, libcurl's multi API — which says "call me again when fd
// is readable". Re-exported by runtime/net.h.
//
//   PQsendQuery(conn, "select 1");
//   while (PQisBusy(conn)) {
//     if (auto r = weft::wait_readable(PQsocket(conn), weft::deadline(5s)); !r) return r.error();
//     PQconsumeInput(conn);
//   }
//
// Semantics, as poll(2) with one event: returns once the descriptor is
// ready, or has an error or hang-up pending (the caller's next call
// reports it); timed_out at the deadline; operation_canceled on the
// fiber's stop request; EBADF if fd is not an open descriptor; on epoll,
// the error of a kernel that will not watch it (ENOSPC once
// fs.epoll.max_user_watches is reached, ENOMEM). The
// descriptor is the caller's: weft neither reads it, nor changes its
// flags, nor closes it. On io_uring a wait is one IORING_OP_POLL_ADD; on
// epoll a poll(2) and, if not ready, a one-shot registration. From a plain
// thread it blocks in poll(2).
//
// Rule (Tokio's AsyncFd has the same): close the descriptor only when no
// fiber waits on it — wake the waiter first (request_stop(), or shutdown()
// on a socket, which makes it readable). A close under a waiter wakes
// nothing: io_uring's pending poll keeps the file open, and epoll drops
// the registration silently, so the waiter stays parked until its
// deadline.
#pragma once

#include "io/driver.h"
#include "io/socket.h"  // deadline_arg

namespace weft::io {

[[nodiscard]] result<void> wait_readable(int fd, deadline_arg d = {},
      std::source_location where = std::source_location::current());
[[nodiscard]] result<void> wait_writable(int fd, deadline_arg d = {},
      std::source_location where = std::source_location::current());

}  // namespace weft::io
