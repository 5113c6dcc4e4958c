// alloc/asym_fence.cc — membarrier(2) behind asym_fence (see the header).
#include "alloc/asym_fence.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "alloc/check.h"
#include "alloc/env.h"

namespace weft::asym_fence {

namespace {

long membarrier(int cmd) noexcept { return ::syscall(SYS_membarrier, cmd, 0, 0); }

// WEFT_ASYM_FENCE=0 turns the fast side off (to measure what it is worth,
// or to rule it out); 1 or unset leaves it on where the kernel has it.
bool wanted() noexcept {
  const char* e = std::getenv("WEFT_ASYM_FENCE");
  if (!e || !*e) return true;
  unsigned long long v = 0;
  if (!alloc::parse_decimal(e, 1, v)) {
    std::fprintf(stderr, "weft: ignoring WEFT_ASYM_FENCE=%s (want 0 or 1)\n", e);
    return true;
  }
  return v == 1;
}

bool register_process() noexcept {
  if (!wanted()) return false;
  long cmds = membarrier(MEMBARRIER_CMD_QUERY);
  if (cmds < 0 || !(cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED)) return false;
  return membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
}

}  // namespace

bool available() noexcept {
  static const bool ok = register_process();
  return ok;
}

void heavy() noexcept {
  // Registered (available() returned true), so the only failure left is a
  // bad command, a bug: going on would break the callers' ordering.
  WEFT_CHECK(membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0,
             "membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) failed after registration");
}

}  // namespace weft::asym_fence
