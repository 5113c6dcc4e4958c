// runtime/driver_select.h
//
// Which driver each worker gets: io_uring, epoll or none, as WEFT_IO says
// (see runtime/driver_select.cc). Called once per weft::run; the factory it
// returns runs on each worker thread.
#pragma once

#include <vector>

#include "sched/driver.h"

namespace weft {
// node_os[i]: the NUMA node worker i runs on, for its I/O buffers (empty,
// or -1: no preference; see sched::worker_node_os()).
sched::driver_factory runtime_driver_factory(std::vector<int> node_os);
}  // namespace weft
