// runtime/driver_select.h
//
// Which driver each worker gets. Until io/ lands, the futex driver of
// sched/ (no I/O); io/ replaces the body of runtime_driver_factory() with
// its io_uring/epoll choice (WEFT_IO).
#pragma once

#include "sched/driver.h"

namespace weft {
sched::driver_factory runtime_driver_factory();
}  // namespace weft
