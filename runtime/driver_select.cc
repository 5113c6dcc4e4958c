// runtime/driver_select.cc — see driver_select.h.
#include "runtime/driver_select.h"

namespace weft {

sched::driver_factory runtime_driver_factory() {
  return [](unsigned) { return sched::make_futex_driver(); };
}

}  // namespace weft
