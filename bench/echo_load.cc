// bench/echo_load.cc
//
// echo_load is the client side of the TCP echo comparison (bench/compare_echo.sh).
// It guards against regressions in what a weft echo server costs per request
// (CPU, tail latency) and per idle connection (memory), measured against the
// same load on the peers: a Go goroutine-per-connection server and a
// thread-per-connection server. It uses no weft code, so a weft bug cannot
// bend the yardstick.
//
// Modes:
//   load  --port N --conns C --seconds S --size B [--warmup S] [--threads T]
//         C connections, each closed-loop: send B bytes, wait for all B echoed
//         bytes, send again. After the warmup, S seconds are measured. Prints
//           conns=C requests=R seconds=S rps=X p50_us=A p99_us=B p999_us=C
//           errors=E total_requests=T client_cpu_pct=P
//         total_requests counts warmup completions too, so that a caller that
//         samples the server's CPU around the whole process can divide by it;
//         client_cpu_pct is this process's CPU over the load phase (100 = one
//         core busy), to tell when the generator, not the server, is the limit.
//   idle  --port N --idle C --hold S
//         Opens C connections, sends nothing, prints "idle_conns=C" once all
//         are connected, holds them S seconds, closes them.
//
// Invariants:
//   - A connection has at most one request in flight (closed loop), so every
//     byte it receives belongs to the echo of its current request.
//   - A connection belongs to one loader thread for its whole life; loader
//     threads share only read-only inputs (payload, deadlines) until they are
//     joined, and their results are merged after the join.
//   - Latency is measured per request from just before send() to just after
//     the recv() that completes the echo (CLOCK_MONOTONIC, vDSO).
//
// The server listens on 127.0.0.1 only; nothing here talks to any other host.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

struct options {
  int port = 0;
  int conns = 50;
  double seconds = 10;
  double warmup = 0;
  int size = 64;
  int threads = 1;
  int idle = 0;  // > 0 selects idle mode
  double hold = 10;
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "echo_load: %s\nusage: echo_load --port N --conns C --seconds S "
               "--size B [--warmup S] [--threads T]\n"
               "       echo_load --port N --idle C --hold S\n",
               msg);
  std::exit(2);
}

options parse_options(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage(("missing value for " + a).c_str());
    const char* v = argv[++i];
    if (a == "--port") o.port = std::atoi(v);
    else if (a == "--conns") o.conns = std::atoi(v);
    else if (a == "--seconds") o.seconds = std::atof(v);
    else if (a == "--warmup") o.warmup = std::atof(v);
    else if (a == "--size") o.size = std::atoi(v);
    else if (a == "--threads") o.threads = std::atoi(v);
    else if (a == "--idle") o.idle = std::atoi(v);
    else if (a == "--hold") o.hold = std::atof(v);
    else usage(("unknown option " + a).c_str());
  }
  if (o.port <= 0 || o.port > 65535) usage("--port is required");
  if (o.idle == 0 && (o.conns <= 0 || o.size <= 0 || o.seconds <= 0))
    usage("--conns, --size and --seconds must be positive");
  if (o.threads <= 0) usage("--threads must be positive");
  o.threads = std::min(o.threads, std::max(o.conns, 1));
  return o;
}

// ---------------------------------------------------------------------------
// Clock and latency histogram
// ---------------------------------------------------------------------------

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000u + uint64_t(ts.tv_nsec);
}

uint64_t cpu_ns_self() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  auto ns = [](const timeval& tv) {
    return uint64_t(tv.tv_sec) * 1'000'000'000u + uint64_t(tv.tv_usec) * 1000u;
  };
  return ns(ru.ru_utime) + ns(ru.ru_stime);
}

// latency_histogram is log-linear over nanoseconds: values below 2^(kSubBits+1)
// have a bucket each; above, every power of two is cut into 2^kSubBits equal
// buckets, so a bucket is at most 1/128 (< 0.8%) of its value wide. Fixed size
// (~58 KiB) whatever the number of samples.
class latency_histogram {
 public:
  void record(uint64_t ns) { ++counts_[index_of(ns)]; ++count_; }
  uint64_t count() const { return count_; }

  void merge(const latency_histogram& other) {
    for (size_t i = 0; i < kBuckets; ++i) counts_[i] += other.counts_[i];
    count_ += other.count_;
  }

  // The value (bucket midpoint, ns) at quantile q in [0, 1]; 0 if empty.
  uint64_t quantile(double q) const {
    if (count_ == 0) return 0;
    uint64_t rank = std::max<uint64_t>(1, uint64_t(q * double(count_) + 0.999999));
    uint64_t seen = 0;
    for (size_t i = 0; i < kBuckets; ++i) {
      seen += counts_[i];
      if (seen >= rank) return value_of(i);
    }
    return value_of(kBuckets - 1);
  }

 private:
  static constexpr unsigned kSubBits = 7;
  static constexpr uint64_t kSub = uint64_t(1) << kSubBits;  // 128
  static constexpr uint64_t kLinear = kSub * 2;               // 256
  static constexpr size_t kBuckets = kLinear + (64 - kSubBits - 1) * kSub;

  static size_t index_of(uint64_t v) {
    if (v < kLinear) return size_t(v);
    unsigned shift = unsigned(std::bit_width(v)) - 1 - kSubBits;  // >= 1
    uint64_t top = v >> shift;                                    // [128, 256)
    return size_t(kLinear + (shift - 1) * kSub + (top - kSub));
  }

  static uint64_t value_of(size_t i) {
    if (i < kLinear) return i;
    uint64_t j = i - kLinear;
    unsigned shift = unsigned(j / kSub) + 1;
    uint64_t low = (j % kSub + kSub) << shift;
    return low + (uint64_t(1) << shift) / 2;
  }

  std::array<uint64_t, kBuckets> counts_{};
  uint64_t count_ = 0;
};

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

// Raises the soft RLIMIT_NOFILE to the hard limit: 1,000 or 10,000
// connections do not fit in the usual soft limit of 1,024.
void raise_nofile_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  rl.rlim_cur = rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
    std::fprintf(stderr, "echo_load: setrlimit(NOFILE): %s\n", std::strerror(errno));
}

// A blocking connect to 127.0.0.1:port; -1 on failure (reported on stderr).
int connect_local(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    std::fprintf(stderr, "echo_load: socket: %s\n", std::strerror(errno));
    return -1;
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    std::fprintf(stderr, "echo_load: connect: %s\n", std::strerror(errno));
    ::close(fd);
    return -1;
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

// Opens n connections; failures are counted in *errors and left out.
std::vector<int> connect_many(int port, int n, uint64_t* errors) {
  std::vector<int> fds;
  fds.reserve(size_t(n));
  for (int i = 0; i < n; ++i) {
    int fd = connect_local(port);
    if (fd < 0) ++*errors;
    else fds.push_back(fd);
  }
  return fds;
}

// ---------------------------------------------------------------------------
// Load mode: one loader per thread, each with its own epoll set
// ---------------------------------------------------------------------------

struct connection {
  int fd = -1;
  uint32_t received = 0;  // bytes of the current echo received so far
  uint32_t unsent = 0;    // bytes of the current request not yet written
  uint64_t sent_at_ns = 0;
  bool watching_out = false;  // EPOLLOUT is in the epoll set (a send blocked)
};

// Inputs shared read-only by all loader threads.
struct load_plan {
  std::vector<char> payload;   // the request bytes; the echo must match them
  uint64_t measure_from_ns = 0;  // end of warmup
  uint64_t measure_until_ns = 0;
};

struct load_result {
  latency_histogram latency;  // measured window only
  uint64_t requests = 0;      // measured window only
  uint64_t total_requests = 0;
  uint64_t errors = 0;
};

class loader {
 public:
  loader(const load_plan& plan, std::vector<int> fds) : plan_(plan) {
    epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
    scratch_.resize(plan_.payload.size());
    conns_.resize(fds.size());
    for (size_t i = 0; i < fds.size(); ++i) {
      conns_[i].fd = fds[i];
      ::fcntl(fds[i], F_SETFL, ::fcntl(fds[i], F_GETFL) | O_NONBLOCK);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.ptr = &conns_[i];
      ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fds[i], &ev);
    }
  }

  ~loader() {
    for (auto& c : conns_)
      if (c.fd >= 0) ::close(c.fd);
    ::close(epoll_fd_);
  }

  // Runs until plan.measure_until_ns; results in result().
  void run() {
    for (auto& c : conns_) start_request(c);
    std::array<epoll_event, 512> events;
    for (;;) {
      int n = ::epoll_wait(epoll_fd_, events.data(), int(events.size()), 10);
      if (now_ns() >= plan_.measure_until_ns) break;
      for (int i = 0; i < n; ++i) {
        const epoll_event& ev = events[size_t(i)];
        on_event(*static_cast<connection*>(ev.data.ptr), ev.events);
      }
    }
  }

  const load_result& result() const { return result_; }

 private:
  void start_request(connection& c) {
    c.received = 0;
    c.unsent = uint32_t(plan_.payload.size());
    c.sent_at_ns = now_ns();
    send_some(c);
  }

  void on_event(connection& c, uint32_t events) {
    if (c.fd < 0) return;
    if (events & EPOLLOUT) send_some(c);
    if (c.fd >= 0 && (events & (EPOLLIN | EPOLLERR | EPOLLHUP))) receive_some(c);
  }

  // Writes what the socket takes; asks for EPOLLOUT only while bytes remain.
  void send_some(connection& c) {
    if (c.unsent > 0) {
      const char* from = plan_.payload.data() + (plan_.payload.size() - c.unsent);
      ssize_t n = ::send(c.fd, from, c.unsent, MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return fail(c);
      if (n > 0) c.unsent -= uint32_t(n);
    }
    bool blocked = c.unsent > 0;
    if (blocked != c.watching_out) watch(c, blocked);
  }

  void receive_some(connection& c) {
    size_t want = plan_.payload.size() - c.received;
    ssize_t n = ::recv(c.fd, scratch_.data(), want, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) return fail(c);
    if (std::memcmp(scratch_.data(), plan_.payload.data() + c.received, size_t(n)) != 0)
      return fail(c);
    c.received += uint32_t(n);
    if (c.received < plan_.payload.size()) return;
    uint64_t done = now_ns();
    ++result_.total_requests;
    // In the window by its completion time alone: a batch that straddles
    // either edge counts exactly the completions inside it.
    if (done >= plan_.measure_from_ns && done < plan_.measure_until_ns) {
      result_.latency.record(done - c.sent_at_ns);
      ++result_.requests;
    }
    start_request(c);
  }

  void watch(connection& c, bool out) {
    c.watching_out = out;
    epoll_event ev{};
    ev.events = out ? EPOLLIN | EPOLLOUT : EPOLLIN;
    ev.data.ptr = &c;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, c.fd, &ev);
  }

  // A broken connection (reset, EOF, wrong bytes) is counted and dropped;
  // the others go on.
  void fail(connection& c) {
    ++result_.errors;
    ::close(c.fd);  // also removes it from the epoll set
    c.fd = -1;
  }

  const load_plan& plan_;
  int epoll_fd_ = -1;
  std::vector<connection> conns_;
  std::vector<char> scratch_;
  load_result result_;
};

load_plan make_plan(const options& o) {
  load_plan plan;
  plan.payload.resize(size_t(o.size));
  for (size_t i = 0; i < plan.payload.size(); ++i) plan.payload[i] = char('a' + i % 26);
  uint64_t start = now_ns();
  plan.measure_from_ns = start + uint64_t(o.warmup * 1e9);
  plan.measure_until_ns = plan.measure_from_ns + uint64_t(o.seconds * 1e9);
  return plan;
}

int run_load(const options& o) {
  uint64_t errors = 0;
  std::vector<int> fds = connect_many(o.port, o.conns, &errors);
  if (fds.empty()) {
    std::fprintf(stderr, "echo_load: no connection to 127.0.0.1:%d\n", o.port);
    return 1;
  }
  load_plan plan = make_plan(o);
  std::vector<std::vector<int>> shares(size_t(o.threads));
  for (size_t i = 0; i < fds.size(); ++i) shares[i % shares.size()].push_back(fds[i]);
  std::vector<load_result> results(shares.size());
  uint64_t cpu0 = cpu_ns_self(), wall0 = now_ns();
  std::vector<std::thread> threads;
  for (size_t t = 0; t < shares.size(); ++t)
    threads.emplace_back([&, t] {
      loader l(plan, std::move(shares[t]));
      l.run();
      results[t] = l.result();
    });
  for (auto& th : threads) th.join();
  double cpu_pct = 100.0 * double(cpu_ns_self() - cpu0) / double(now_ns() - wall0);

  load_result total;
  total.errors = errors;
  for (const auto& r : results) {
    total.latency.merge(r.latency);
    total.requests += r.requests;
    total.total_requests += r.total_requests;
    total.errors += r.errors;
  }
  double secs = double(plan.measure_until_ns - plan.measure_from_ns) / 1e9;
  std::printf("conns=%d requests=%llu seconds=%.3f rps=%.0f p50_us=%.1f p99_us=%.1f "
              "p999_us=%.1f errors=%llu total_requests=%llu client_cpu_pct=%.1f\n",
              o.conns, (unsigned long long)total.requests, secs, double(total.requests) / secs,
              double(total.latency.quantile(0.50)) / 1e3, double(total.latency.quantile(0.99)) / 1e3,
              double(total.latency.quantile(0.999)) / 1e3, (unsigned long long)total.errors,
              (unsigned long long)total.total_requests, cpu_pct);
  return 0;
}

// ---------------------------------------------------------------------------
// Idle mode
// ---------------------------------------------------------------------------

int run_idle(const options& o) {
  uint64_t errors = 0;
  std::vector<int> fds = connect_many(o.port, o.idle, &errors);
  std::printf("idle_conns=%zu\n", fds.size());
  std::fflush(stdout);
  if (errors > 0) std::fprintf(stderr, "echo_load: %llu connects failed\n", (unsigned long long)errors);
  uint64_t until = now_ns() + uint64_t(o.hold * 1e9);
  for (uint64_t now = now_ns(); now < until; now = now_ns()) {
    uint64_t left = until - now;
    timespec ts{time_t(left / 1'000'000'000u), long(left % 1'000'000'000u)};
    ::nanosleep(&ts, nullptr);
  }
  for (int fd : fds) ::close(fd);
  return errors == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  options o = parse_options(argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  raise_nofile_limit();
  return o.idle > 0 ? run_idle(o) : run_load(o);
}
