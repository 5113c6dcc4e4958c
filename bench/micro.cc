// bench/micro.cc — weft's micro benchmarks, one workload per run:
//
//   micro <workload> [N]   prints: workload=<w> n=<N> value=<v> unit=<u>
//
// Guards against regressions in: spawning and joining (spawn_join,
// spawn_join_handles), deep
// fan-out/fan-in (skynet, skynet_handles), the cost of a switch through the scheduler
// (yield, two fibers taking turns on one worker), memory per parked fiber
// (idle_memory, idle_memory_small), channels and locks (pingpong,
// fanin, mutex) and the wake-up of a fiber gone cold (wake_cold); and one that measures the machine, not weft (xcore: how
// long a cache line takes to move between two CPUs).
// bench/compare_micro.sh runs each beside its Go peer (bench/peers/go) and
// prints the ratios. Semantics match bench/peers/go/micro.go exactly.
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "runtime/channel.h"
#include "runtime/sync.h"
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

// WEFT_MICRO_STATS=1: the runtime's counters after the timed part, to
// stderr (where the fibers ran, steals, parks), for reading a result.
void print_stats_if_asked() {
  const char* e = std::getenv("WEFT_MICRO_STATS");
  if (!e || *e == '\0' || *e == '0') return;
  weft::runtime_stats s = weft::stats();
  for (std::size_t i = 0; i < s.workers.size(); ++i)
    std::fprintf(stderr, "stats: worker%zu fibers_run=%llu steals=%llu overflowed=%llu\n", i,
                 static_cast<unsigned long long>(s.workers[i].fibers_run),
                 static_cast<unsigned long long>(s.workers[i].steals),
                 static_cast<unsigned long long>(s.workers[i].overflowed));
  std::fprintf(stderr,
               "stats: spawned=%llu parks=%llu yields=%llu sleeps=%llu wakeups=%llu "
               "lifo_runs=%llu inject_pops=%llu\n",
               static_cast<unsigned long long>(s.spawned),
               static_cast<unsigned long long>(s.parks),
               static_cast<unsigned long long>(s.yields),
               static_cast<unsigned long long>(s.sleeps),
               static_cast<unsigned long long>(s.wakeups),
               static_cast<unsigned long long>(s.lifo_runs),
               static_cast<unsigned long long>(s.inject_pops));
}

// spawn_join: as the Go peer does it, n fibers with no handle (weft::go,
// Go's `go`) that each increment an atomic and count down a wait_group.
int spawn_join(long n) {
  std::atomic<long> count{0};
  double ns = 0;
  weft::run([&] {
    auto t0 = bench_clock::now();
    // On the heap and a line of its own, as the Go peer's WaitGroup is
    // (the closure makes it escape): on the main fiber's stack it shared
    // a line with the frames of the spawn calls below it, so every done()
    // on the other worker fetched that line back from the spawner (perf:
    // zero_waiter::add's first load was 13% of that worker's time).
    struct alignas(64) own_line {
      weft::wait_group wg;
    };
    auto box = std::make_unique<own_line>();
    weft::wait_group& wg = box->wg;
    wg.add(n);
    for (long i = 0; i < n; ++i)
      weft::go([&] {
        count.fetch_add(1, std::memory_order_relaxed);
        wg.done();
      });
    (void)wg.wait();
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  });
  if (count != n) return 1;
  report("spawn_join", n, ns / n, "ns/fiber");
  return 0;
}

// spawn_join_handles: the same with a join_handle per fiber, all kept and
// joined in order (no Go peer: a goroutine has no handle).
int spawn_join_handles(long n) {
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
    print_stats_if_asked();
  });
  if (count != n) return 1;
  report("spawn_join_handles", n, ns / n, "ns/fiber");
  return 0;
}

// skynet: as the Go peer does it, a 10-ary tree of 1,111,111 fibers with
// no handle (weft::go), each parent creating one rendezvous channel that
// its ten children send their sums into; the root is a fiber too, and the
// main fiber receives the total from it.
void skynet_node(weft::channel<long>& out, long num, long size, long div) {
  if (size == 1) {
    (void)out.send(num);
    return;
  }
  weft::channel<long> rc(0);
  long sub = size / div;
  for (long i = 0; i < div; ++i)
    weft::go([&rc, n = num + i * sub, sub, div] { skynet_node(rc, n, sub, div); },
             {.stack_size = 16 * 1024});
  long sum = 0;
  for (long i = 0; i < div; ++i) sum += rc.recv().value_or(0);
  (void)out.send(sum);
}

int skynet() {
  long sum = 0;
  double ns = 0;
  weft::run([&] {
    weft::channel<long> c(0);
    auto t0 = bench_clock::now();
    weft::go([&c] { skynet_node(c, 0, 1'000'000, 10); }, {.stack_size = 16 * 1024});
    sum = c.recv().value_or(0);
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  });
  if (sum != 499'999'500'000L) return 1;
  report("skynet", 1'000'000, ns / 1e6, "ms");
  return 0;
}

// skynet_handles: the same tree the way weft code returns values: each
// parent keeps a join_handle per child and sums what join() returns; the
// root runs on the main fiber (no Go peer: a goroutine has no handle).
long skynet_handles_node(long num, long size, long div) {
  if (size == 1) return num;
  std::vector<weft::join_handle<long>> kids;
  kids.reserve(div);
  long sub = size / div;
  for (long i = 0; i < div; ++i)
    kids.push_back(weft::spawn([=] { return skynet_handles_node(num + i * sub, sub, div); },
                               {.stack_size = 16 * 1024}));
  long sum = 0;
  for (auto& k : kids) sum += k.join();
  return sum;
}

int skynet_handles() {
  long sum = 0;
  double ns = 0;
  weft::run([&] {
    auto t0 = bench_clock::now();
    sum = skynet_handles_node(0, 1'000'000, 10);
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  });
  if (sum != 499'999'500'000L) return 1;
  report("skynet_handles", 1'000'000, ns / 1e6, "ms");
  return 0;
}

// yield: two fibers each yield n times, on one worker (Go: GOMAXPROCS=1),
// so every yield switches to the other fiber through the scheduler. On two
// workers each fiber would have a worker to itself, and a weft yield with
// nothing else runnable continues in place (no switch at all), while Go's
// Gosched always goes through its scheduler: the two would not measure the
// same thing.
int yield_bench(long n) {
  double ns = 0;
  weft::options one_worker;
  one_worker.workers = 1;
  weft::run([&] {
    auto t0 = bench_clock::now();
    auto body = [n] {
      for (long i = 0; i < n; ++i) weft::this_fiber::yield();
    };
    auto a = weft::spawn(body), b = weft::spawn(body);
    a.join();
    b.join();
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  }, one_worker);
  report("yield", 2 * n, ns / (2 * n), "ns/yield");
  return 0;
}


// pingpong: two fibers pass a token over two rendezvous channels, n round
// trips (Go: pingpong in bench/peers/go/micro.go).
int pingpong(long n) {
  long final_token = -1;
  double ns = 0;
  weft::run([&] {
    weft::channel<long> ping(0), pong(0);
    auto t0 = bench_clock::now();
    auto pinger = weft::spawn([&] {
      long token = 0;
      for (long i = 0; i < n; ++i) {
        (void)ping.send(token);
        token = pong.recv().value_or(-1);
      }
      final_token = token;
    });
    auto ponger = weft::spawn([&] {
      for (long i = 0; i < n; ++i) (void)pong.send(ping.recv().value_or(-1) + 1);
    });
    pinger.join();
    ponger.join();
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  });
  if (final_token != n) return 1;
  report("pingpong", n, ns / n, "ns/roundtrip");
  return 0;
}

// fanin: two producers send n ints each into one channel of capacity 1024;
// one consumer receives them all (million messages per second).
int fanin(long n) {
  constexpr int kProducers = 2;
  const long total = kProducers * n;
  long sum = 0;
  double ns = 0;
  weft::run([&] {
    weft::channel<long> ch(1024);
    auto t0 = bench_clock::now();
    std::vector<weft::join_handle<void>> ps;
    for (int p = 0; p < kProducers; ++p)
      ps.push_back(weft::spawn([&] {
        for (long i = 0; i < n; ++i) (void)ch.send(i);
      }));
    auto consumer = weft::spawn([&] {
      long s = 0;
      for (long i = 0; i < total; ++i) s += ch.recv().value_or(0);
      return s;
    });
    sum = consumer.join();
    for (auto& p : ps) p.join();
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  });
  if (sum != kProducers * (n * (n - 1) / 2)) return 1;
  report("fanin", total, total / (ns / 1e9) / 1e6, "Mmsg/s");
  return 0;
}

// mutex: 1,000 fibers each take one weft::mutex n times to increment a
// shared counter (ns per lock/unlock pair).
int mutex_bench(long n) {
  constexpr long kFibers = 1000;
  long counter = 0;
  double ns = 0;
  weft::run([&] {
    weft::mutex mu;
    auto t0 = bench_clock::now();
    std::vector<weft::join_handle<void>> hs;
    hs.reserve(kFibers);
    for (long f = 0; f < kFibers; ++f)
      hs.push_back(weft::spawn([&] {
        for (long i = 0; i < n; ++i) {
          mu.lock();
          ++counter;
          mu.unlock();
        }
      }));
    for (auto& h : hs) h.join();
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  });
  if (counter != kFibers * n) return 1;
  report("mutex", kFibers * n, ns / (kFibers * n), "ns/lock");
  return 0;
}

// wake_cold: the wake-up of a fiber whose stack has gone cold, as a server
// with thousands of connections wakes each connection's fiber for its next
// request. 10,000 fibers park receiving, each on its own rendezvous
// channel; one fiber sends to each in turn, n sends in all, and yields
// after every 32nd, so the woken ones run in batches as a worker runs the
// fibers of one reap of its ring (ns per send, counting the woken fiber's
// run up to its next park). One worker: the wake and the resume, not
// stealing. No Go peer: it guards weft's own resume path
// (prefetch_resume() in sched/park.cc).
int wake_cold(long n) {
  constexpr long kFibers = 10'000;
  const long rounds = std::max(1L, n / kFibers);
  long sum = 0;
  double ns = 0;
  weft::options one_worker;
  one_worker.workers = 1;
  weft::run([&] {
    std::vector<std::unique_ptr<weft::channel<long>>> chans;
    chans.reserve(kFibers);
    for (long i = 0; i < kFibers; ++i) chans.push_back(std::make_unique<weft::channel<long>>(0));
    weft::wait_group wg;
    wg.add(kFibers);
    weft::latch started(kFibers);
    for (long i = 0; i < kFibers; ++i)
      weft::go([&, c = chans[i].get()] {
        started.count_down();
        long mine = 0;
        for (long r = 0; r < rounds; ++r) mine += c->recv().value_or(0);
        sum += mine;  // one worker: no race
        wg.done();
      });
    // One worker: each fiber runs on to its receive and parks before the
    // next one starts, so once all counted down, all are parked.
    (void)started.wait();
    auto t0 = bench_clock::now();
    for (long r = 0; r < rounds; ++r)
      for (long i = 0; i < kFibers; ++i) {
        (void)chans[i]->send(1);
        if (i % 32 == 31) weft::this_fiber::yield();  // the batch runs
      }
    (void)wg.wait();
    ns = elapsed_ns(t0);
    print_stats_if_asked();
  }, one_worker);
  if (sum != rounds * kFibers) return 1;
  report("wake_cold", rounds * kFibers, ns / (rounds * kFibers), "ns/wake");
  return 0;
}

// idle_memory: RSS growth per parked fiber. Each fiber counts down a latch,
// then parks receiving on one shared channel, which is closed once the
// measurement is taken (as the Go peer does with its gate channel).
int idle_memory(const char* name, long n, std::size_t stack_size) {
  long before = 0, after = 0;
  weft::run([&] {
    weft::channel<int> gate(0);
    weft::latch parked(n);
    weft::wait_group exited;
    exited.add(n);
    before = rss_bytes();
    // weft::go, as the Go peer's `go`: a detached spawn() would add a join
    // state per fiber that Go does not have.
    for (long i = 0; i < n; ++i)
      weft::go([&] {
        parked.count_down();
        (void)gate.recv();
        exited.done();
      }, {.stack_size = stack_size});
    (void)parked.wait();
    (void)weft::this_fiber::sleep_for(std::chrono::milliseconds(200));  // settle
    after = rss_bytes();
    gate.close();
    (void)exited.wait();
  });
  report(name, n, double(after - before) / n, "bytes/fiber");
  return 0;
}

}  // namespace

// xcore: not a weft workload but the machine's, for reading the others: the
// time to move one cache line between the first two CPUs of the affinity
// mask. Two threads pinned there take turns writing one atomic, n times
// each way; value = ns per hand-over (the median of five rounds). On this
// VM it has been 40-50 ns in most phases and ~190 ns in some (the vCPUs
// then sit far apart on the host), and whatever moves fibers or their
// control blocks between workers (spawn_join, skynet) slows with it, Go's
// peer as much: compare_micro.sh prints it above each table.
int xcore(long n) {
  cpu_set_t mask;
  int cpus[2], k = 0;
  if (sched_getaffinity(0, sizeof mask, &mask) == 0)
    for (int c = 0; c < CPU_SETSIZE && k < 2; ++c)
      if (CPU_ISSET(c, &mask)) cpus[k++] = c;
  if (k < 2) {
    std::fprintf(stderr, "xcore: needs two CPUs in the affinity mask\n");
    return 1;
  }
  auto pin = [](int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    return pthread_setaffinity_np(pthread_self(), sizeof one, &one) == 0;
  };
  std::vector<double> rounds;
  for (int r = 0; r < 5; ++r) {
    alignas(64) std::atomic<long> turn{0};
    // Whose turn it is: even values are the main thread's, odd the other's.
    // acquire/release: each hand-over publishes the line to the next writer
    // (what is measured is the line's trip, not what it carries).
    auto play = [&](long mine) {
      for (long i = mine; i < 2 * n; i += 2) {
        while (turn.load(std::memory_order_acquire) != i) {
        }
        turn.store(i + 1, std::memory_order_release);
      }
    };
    bool pinned = pin(cpus[0]);
    std::atomic<bool> other_pinned{true};
    auto t0 = bench_clock::now();
    std::thread other([&] {
      other_pinned.store(pin(cpus[1]), std::memory_order_relaxed);  // read after join()
      play(1);
    });
    play(0);
    other.join();
    if (!pinned || !other_pinned.load(std::memory_order_relaxed)) {
      std::fprintf(stderr, "xcore: pthread_setaffinity_np failed\n");
      return 1;
    }
    rounds.push_back(elapsed_ns(t0) / (2.0 * n));
  }
  std::sort(rounds.begin(), rounds.end());
  report("xcore", n, rounds[rounds.size() / 2], "ns/transfer");
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: micro <workload> [N]\n");
    return 2;
  }
  std::string w = argv[1];
  long n = argc > 2 ? std::atol(argv[2]) : 0;
  auto N = [&](long dflt) { return n > 0 ? n : dflt; };
  if (w == "spawn_join") return spawn_join(N(1'000'000));
  if (w == "spawn_join_handles") return spawn_join_handles(N(1'000'000));
  if (w == "skynet") return skynet();
  if (w == "skynet_handles") return skynet_handles();
  if (w == "yield") return yield_bench(N(5'000'000));
  if (w == "pingpong") return pingpong(N(1'000'000));
  if (w == "fanin") return fanin(N(5'000'000));
  if (w == "mutex") return mutex_bench(N(10'000));
  if (w == "wake_cold") return wake_cold(N(2'000'000));
  if (w == "xcore") return xcore(N(200'000));
  if (w == "idle_memory") return idle_memory("idle_memory", N(1'000'000), 0);
  if (w == "idle_memory_small")
    return idle_memory("idle_memory_small", N(1'000'000), weft::kSmallStack);
  std::fprintf(stderr, "micro: unknown workload %s\n", w.c_str());
  return 2;
}
