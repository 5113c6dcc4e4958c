// alloc/check.h
//
// WEFT_CHECK and WEFT_DCHECK: a broken invariant is a bug, and the process
// stops at once with file:line and a message (Go's throw()). The environment
// failing is not a bug: that is a weft::result, never a CHECK.
//
// This header sits in alloc/, the lowest layer, so every layer may use it.
#pragma once

namespace weft::detail {
[[noreturn]] void check_failed(const char* file, int line, const char* cond,
                               const char* msg) noexcept;
}  // namespace weft::detail

#define WEFT_CHECK(cond, msg)                                          \
  do {                                                                 \
    if (__builtin_expect(!(cond), 0))                                  \
      ::weft::detail::check_failed(__FILE__, __LINE__, #cond, (msg));  \
  } while (0)

#ifdef NDEBUG
#define WEFT_DCHECK(cond, msg) \
  do {                         \
    (void)sizeof(!(cond));     \
  } while (0)
#else
#define WEFT_DCHECK(cond, msg) WEFT_CHECK(cond, msg)
#endif
