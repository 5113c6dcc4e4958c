// io/uring_interpose.h — for a test binary that defines its own
// io_uring_queue_init_params (liburing is a shared library, so the
// driver's call binds to the binary's): the real one, to call from it.
#pragma once

#include <dlfcn.h>
#include <liburing.h>

#include <cerrno>

namespace weft::testing {

inline int real_io_uring_queue_init_params(unsigned entries, struct io_uring* ring,
                                           struct io_uring_params* p) {
  using init_fn = int (*)(unsigned, struct io_uring*, struct io_uring_params*);
  static const auto real =
      reinterpret_cast<init_fn>(::dlsym(RTLD_NEXT, "io_uring_queue_init_params"));
  return real ? real(entries, ring, p) : -ENOSYS;
}

}  // namespace weft::testing
