// alloc/env.h — reading counts from environment variables (WEFT_WORKERS,
// WEFT_BLOCKING_THREADS, WEFT_LINGER_MS).
#pragma once

#include <cstring>

namespace weft::alloc {

// True with `out` set if `s` is decimal digits only (no sign, no spaces:
// strtoul alone takes " 2" and "+2" as 2, and "-18446744073709551615" as 1)
// and its value is at most `max`; false for anything else, which the
// caller reports and ignores.
inline bool parse_decimal(const char* s, unsigned long long max, unsigned long long& out) {
  if (!s || s[0] == '\0') return false;
  const std::size_t n = std::strlen(s);
  if (std::strspn(s, "0123456789") != n || n > 18) return false;  // 18 digits cannot overflow
  unsigned long long v = 0;
  for (std::size_t i = 0; i < n; ++i) v = v * 10 + static_cast<unsigned>(s[i] - '0');
  if (v > max) return false;
  out = v;
  return true;
}

}  // namespace weft::alloc
