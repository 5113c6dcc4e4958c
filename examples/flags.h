// examples/flags.h — the command line the example servers share:
//   --port N     (127.0.0.1 only)
//   --workers N  (0 or absent: one per processing unit)
//   --idle S     (servers that drop silent peers: after S seconds)
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace examples {

struct flags {
  int port = 7000;
  unsigned workers = 0;
  unsigned idle_seconds = 60;
};

inline bool parse_uint(const char* s, unsigned long max, unsigned long& out) {
  char* end = nullptr;
  out = std::strtoul(s, &end, 10);
  return s[0] != '\0' && *end == '\0' && out <= max;
}

// False (after printing the usage) on anything it does not understand.
inline bool parse_flags(int argc, char** argv, flags& f) {
  for (int i = 1; i < argc; ++i) {
    unsigned long v = 0;
    if (std::strcmp(argv[i], "--port") == 0 && i + 1 < argc && parse_uint(argv[i + 1], 65535, v)) {
      f.port = static_cast<int>(v);
      ++i;
    } else if (std::strcmp(argv[i], "--workers") == 0 && i + 1 < argc &&
               parse_uint(argv[i + 1], 4096, v)) {
      f.workers = static_cast<unsigned>(v);
      ++i;
    } else if (std::strcmp(argv[i], "--idle") == 0 && i + 1 < argc &&
               parse_uint(argv[i + 1], 86400, v) && v > 0) {
      f.idle_seconds = static_cast<unsigned>(v);
      ++i;
    } else {
      std::fprintf(stderr, "usage: %s [--port N] [--workers N] [--idle SECONDS]\n", argv[0]);
      return false;
    }
  }
  return true;
}

}  // namespace examples
