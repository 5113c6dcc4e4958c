// alloc/check.cc — the failure path of WEFT_CHECK. Async-signal-safe: it
// formats into a stack buffer and write(2)s, so it may run anywhere.
#include "alloc/check.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace weft::detail {

void check_failed(const char* file, int line, const char* cond,
                  const char* msg) noexcept {
  char buf[512];
  int n = std::snprintf(buf, sizeof buf, "weft: fatal: %s (%s) at %s:%d\n",
                        msg, cond, file, line);
  if (n > 0) {
    ssize_t ignored = ::write(2, buf, static_cast<size_t>(n) < sizeof buf
                                          ? static_cast<size_t>(n)
                                          : sizeof buf - 1);
    (void)ignored;
  }
  std::abort();
}

}  // namespace weft::detail
