// runtime/driver_select.h
//
// Which driver each worker gets: io_uring, epoll or none, as WEFT_IO says
// (see runtime/driver_select.cc). Called once per weft::run; the factory it
// returns runs on each worker thread.
#pragma once

#include "sched/driver.h"

namespace weft {
sched::driver_factory runtime_driver_factory();
}  // namespace weft
