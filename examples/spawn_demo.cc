// examples/spawn_demo.cc — the quick-start demo: spawns 1,000,000 fibers
// from one fiber over all workers, joins them, and prints what happened.
//
//   bazel run --config=bench //examples:spawn_demo [-- N]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "runtime/weft.h"

namespace {

long rss_bytes() {
  long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
  std::fclose(f);
  return resident * sysconf(_SC_PAGESIZE);
}

}  // namespace

int main(int argc, char** argv) {
  long n = 1'000'000;
  if (argc > 1) {
    char* end = nullptr;
    n = std::strtol(argv[1], &end, 10);
    if (argc > 2 || end == argv[1] || *end != '\0' || n < 1 || n > 100'000'000) {
      std::fprintf(stderr, "usage: %s [N]  (N fibers, 1 to 100000000; default 1000000)\n",
                   argv[0]);
      return 2;
    }
  }
  return weft::run([n] {
    using clk = std::chrono::steady_clock;
    long rss0 = rss_bytes();
    auto t0 = clk::now();
    std::vector<weft::join_handle<long>> hs;
    hs.reserve(n);
    // Fibers are not preempted, but a spawn spends the coop budget: this
    // loop (a second on a slow machine) gives its worker to the fibers it
    // spawned every 100 µs, as Go would preempt it.
    for (long i = 0; i < n; ++i) hs.push_back(weft::spawn([i] { return i % 7; }));
    long rss_peak = rss_bytes();
    long sum = 0;
    for (auto& h : hs) sum += h.join();
    double ms = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
    weft::runtime_stats st = weft::stats();
    std::printf("spawned and joined %ld fibers in %.1f ms (%.0f ns per fiber)\n", n, ms,
                ms * 1e6 / n);
    for (std::size_t w = 0; w < st.workers.size(); ++w)
      std::printf("  worker %zu: %lu fibers run, %lu stolen from others\n", w,
                  static_cast<unsigned long>(st.workers[w].fibers_run),
                  static_cast<unsigned long>(st.workers[w].steals));
    std::printf("  RSS while spawning: %+.0f bytes per fiber alive (%ld MiB)\n",
                double(rss_peak - rss0) / n, rss_peak >> 20);
    std::printf("  stacks: guard=%s, %lu cached, %lu MiB address space reserved\n",
                st.stack_guard.c_str(), static_cast<unsigned long>(st.stacks_cached),
                static_cast<unsigned long>(st.stack_bytes_reserved >> 20));
    std::printf("  sum of i %% 7 = %ld (%s)\n", sum, sum == 2'999'997 || n != 1'000'000
                                                     ? "ok" : "WRONG");
    return sum == 2'999'997 || n != 1'000'000 ? 0 : 1;
  });
}
