// io/driver.h
//
// The I/O half of a worker's driver, and the one way a fiber does I/O:
// io::perform(op, deadline). An `op` describes a system call (recv, send,
// accept, connect, read_at, ...); the worker's driver carries it out while
// the fiber is parked — io_uring submits it (io/uring_driver.cc), the
// epoll driver waits for readiness and retries the call
// (io/epoll_driver.cc). runtime/driver_select.cc picks one per worker.
//
// *Completion slots*
//   A parked operation's state lives on the fiber's stack, in a
//   `completion`. The driver that owns the operation fills it in when the
//   kernel reports the result and wakes the waiter recorded there. The slot
//   lock orders the three parties that touch it: the driver (complete()),
//   the park's publish step (records the waiter) and the fiber after it
//   woke (forgets the waiter, reads the result).
//   SAFETY: the kernel holds pointers into the fiber's stack (the slot,
//   buffers, addresses) until the operation's completion arrives. perform()
//   therefore never returns before complete() ran, even on a deadline, a
//   stop request or while the runtime unwinds: it cancels, then parks again
//   until the original completion arrives.
//
// Who calls what:
//   perform()                 a fiber only
//   completion::complete()    the driver that owns the operation, on its
//                             worker thread or, while that worker is stuck
//                             in one fiber, the monitor's (driver::rescue());
//                             or a blocking-pool thread (never while
//                             holding the slot lock)
//   io_driver::cancel(), release_buffer(), wake()
//                             any thread (the fiber may have migrated)
//   io_driver::perform(), poll_now(), the sched::driver steps
//                             the driver's own worker thread
//   wait_for()                a fiber, inside a driver's perform()
//   arm_multishot_accept(), arm_multishot_recv()
//                             a fiber, on the driver's own worker thread
//   cancel_multishot()        any thread
//   multishot_sink::on_result()  the driver that armed it, on its thread
//                             or the monitor's (as complete())
#pragma once

#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <expected>
#include <memory>
#include <mutex>
#include <source_location>
#include <string>
#include <vector>
#include <system_error>

#include "sched/driver.h"
#include "sched/park.h"
#include "alloc/spinlock.h"

namespace weft::io {

using clock = std::chrono::steady_clock;
template <typename T>
using result = std::expected<T, std::error_code>;

enum class op_kind : std::uint8_t {
  recv,      // fd, buf, len, flags
  recv_pooled,  // fd, flags; out: buf, len (capacity), buf_id — a receive
                // buffer the driver takes only when data arrives (see
                // *Pooled receive buffers*); release it with release_buffer()
  send,      // fd, buf, len, flags (MSG_NOSIGNAL is always added)
  recvmsg,   // fd, msg, flags
  sendmsg,   // fd, msg, flags (MSG_NOSIGNAL is always added)
  accept,    // fd, addr, addrlen (out; may be null), flags (SOCK_CLOEXEC added)
  connect,   // fd, addr, *addrlen
  read_at,   // fd, buf, len, offset
  write_at,  // fd, buf, len, offset
  fsync,     // fd, flags (nonzero: data only, as fdatasync)
  openat,    // buf (a NUL-terminated path), flags, offset (the mode); AT_FDCWD
  close,     // fd
  read,      // fd, buf, len: read(2) on a pollable fd left in blocking mode
             // with a single reader (weft's signal eventfds): io_uring polls
             // it on every kernel; epoll reads only once poll(2) says ready
  poll,      // fd, flags (POLLIN or POLLOUT): waits until ready, as poll(2)
             // (an error or hang-up counts); the result is the revents mask
};

class io_driver;
class completion;
class fd_state;  // io/fd_state.h

// One operation in flight on a socket, on the calling fiber's stack: how a
// close() from another fiber finds the operation's completion slot to
// cancel it (io/fd_state.h). The socket's call enters it before the
// operation and leaves it after; the driver's perform() attaches the slot
// once the operation is started, before it parks, and detaches it once the
// slot has completed. attach() cancels at once if the socket was closed in
// between.
struct fd_use {
  fd_state* st = nullptr;
  io_driver* owner = nullptr;  // guarded by st's lock: the driver holding slot
  completion* slot = nullptr;  // guarded by st's lock: null while not attached
  fd_use* prev = nullptr;      // st's list of attached uses (guarded by its lock)
  fd_use* next = nullptr;
  void attach(io_driver& d, completion& c) noexcept;
  void detach() noexcept;
};

struct op {
  op_kind kind;
  int fd = -1;
  void* buf = nullptr;
  std::size_t len = 0;
  msghdr* msg = nullptr;
  sockaddr* addr = nullptr;
  socklen_t* addrlen = nullptr;
  std::uint64_t offset = 0;
  int flags = 0;
  std::uint32_t buf_id = 0;  // out, recv_pooled only
  fd_use* use = nullptr;     // a socket's operation: attach the slot to it
  // recv, recv_pooled: no data can be there yet (this socket's own request
  // has not gone out): wait for readiness before the first try (io_uring's
  // IORING_RECVSEND_POLL_FIRST). A hint; epoll ignores it.
  bool poll_first = false;
};

// *Pooled receive buffers*: recv_pooled takes a buffer from the driver's
// pool (io_uring: a provided buffer ring; epoll: a free list of heap
// buffers, lent only for the receive that found data) only once data has
// arrived, so an idle connection parked in a read holds none. The buffer
// belongs to the driver that performed the receive, which may no longer be
// the fiber's worker when it is released. At end of stream none is lent.
inline constexpr std::size_t kPooledBufferSize = 4096;
inline constexpr std::uint32_t kHeapBufferId = ~0u;  // buf_id of a heap buffer
// Which stream sockets send small writes behind the fiber (see
// io_driver::sends_behind()); WEFT_WRITE_BEHIND picks it.
enum class write_behind_mode : std::uint8_t { none, tcp, any_stream };
// The largest write sent behind the fiber (see io_driver::sends_behind()):
// copying more costs more than the park it saves.
inline constexpr std::size_t kWriteBehindMax = 4096;

// See *Completion slots*. Lives on the parked fiber's stack.
class completion {
 public:
  // The driver: the result arrived. Wakes the recorded waiter, if any.
  // After it returns, *this may no longer exist.
  void complete(int res, std::uint32_t flags = 0) noexcept;
  // The fiber: parks until complete() ran or the park is woken otherwise
  // (stop request, unwinding). Returns whether the result is in.
  bool park_until_done(bool cancellable, clock::time_point deadline, const char* what,
                       std::source_location where, sched::wake_reason* why = nullptr);
  int res() const noexcept { return res_; }  // valid once done
  std::uint32_t flags() const noexcept { return flags_; }  // valid once done
  // The key the driver filed the operation under (io_uring: its
  // user_data), set by the driver when it starts it; only the fiber that
  // owns the slot reads it, to cancel.
  std::uint64_t key() const noexcept { return key_; }
  void set_key(std::uint64_t k) noexcept { key_ = k; }
  bool is_done() noexcept {
    lock_.lock();
    bool d = done_;
    lock_.unlock();
    return d;
  }

 private:
  static void publish(void* self, sched::wake_token t);
  weft::spinlock lock_;
  bool done_ = false;         // guarded by lock_
  int res_ = 0;               // written before done_ under lock_
  std::uint32_t flags_ = 0;   // the CQE flags (io_uring), as res_
  sched::wake_token waiter_;  // guarded by lock_
  std::uint64_t key_ = 0;     // the owning fiber's (see key())
};

// Per-driver counters: each has a single writer at a time — the owner
// thread, or for `rescued` the monitor, and `completions` under the
// driver's reap lock (relaxed: statistics) — summed by io::stats() from
// any thread.
struct io_counters {
  // io_uring: operations submitted, all parked for, plus accepts taken at
  // once before arming the multishot (io/accept.cc). epoll: calls that
  // succeeded at once plus readiness waits (parked).
  std::atomic<std::uint64_t> ops{0};
  std::atomic<std::uint64_t> parked{0};
  std::atomic<std::uint64_t> submits{0};    // io_uring_submit/enter calls that submitted
  std::atomic<std::uint64_t> completions{0};  // CQEs or readiness events handled
  std::atomic<std::uint64_t> multishot_accepts{0};  // multishot accept SQEs armed (io_uring)
  std::atomic<std::uint64_t> multishot_recvs{0};    // multishot receive SQEs armed (io_uring)
  std::atomic<std::uint64_t> written_behind{0};  // writes sent behind the fiber (*Write-behind*)
  // Completions (or cancels) handed to other workers while the owner was
  // stuck in one fiber; written by the monitor's rescue() only.
  std::atomic<std::uint64_t> rescued{0};
  // Receive buffers recv_pooled took from the heap: epoll's when its free
  // list was empty, io_uring's when its ring was (or it has none). The
  // exception to "single writer": a fiber that moved to another worker
  // while its receive waited takes its buffer from the driver it started
  // on, so any thread may add to it, with add() (relaxed: statistic).
  std::atomic<std::uint64_t> heap_buffers{0};
  // A gauge: timed cancels of lingering write-behinds armed whose timeout
  // CQE has not been reaped (io_uring). The owner arms; the owner or the
  // monitor's rescue reaps: add() and sub().
  std::atomic<std::uint64_t> linger_timers{0};
  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
    c.store(c.load(std::memory_order_relaxed) + n,
            std::memory_order_relaxed);  // relaxed: statistic, single writer
  }
  // For a counter with several writers (heap_buffers).
  static void add(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
    c.fetch_add(n, std::memory_order_relaxed);  // relaxed: statistic
  }
  static void sub(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
    c.fetch_sub(n, std::memory_order_relaxed);  // relaxed: statistic
  }
};

// A snapshot of every worker's counters (io::stats()).
struct io_stats {
  std::uint64_t ops = 0, parked = 0, submits = 0, completions = 0, multishot_accepts = 0,
                multishot_recvs = 0,
                rescued = 0, heap_buffers = 0, written_behind = 0;
  // Timers bounding write-behinds that outlive their socket's close (see
  // *Lingering* in io/fd_state.h) now armed: each ends with its send.
  std::uint64_t linger_timers = 0;
  // Pooled buffers holding bytes a multishot receive brought before any
  // read asked for them (io/recv.cc; bounded per socket by its
  // back-pressure): a gauge, process-wide.
  std::uint64_t recv_queued = 0;
  // Connections a multishot accept took from the kernel that no accept()
  // took yet (io/accept.cc; at most 64 per listener): a gauge, process-wide.
  std::uint64_t accept_queued = 0;
  std::string driver;  // the first worker's driver name ("io_uring", "epoll")
  // The first worker's receive-buffer backing: "hugetlb", "thp",
  // "small_pages" (alloc/arena.h) or "heap".
  std::string buffer_backing;
};
io_stats stats();

// *Multishot operations*: one armed SQE that completes many times
// (io_uring's multishot accept, io/accept.cc, and multishot receive into
// pooled buffers, io/recv.cc). Its target is a sink
// on the heap, never on a fiber's stack: the CQEs arrive on the ring that
// armed it, whichever worker the fiber that armed it runs on by then.
class multishot_sink {
 public:
  // One completion, on the arming driver's thread. `more` false: the
  // kernel ended the multishot and this is the last call for this arming.
  // `flags`: the CQE's (a receive's buffer id: IORING_CQE_F_BUFFER).
  virtual void on_result(int res, std::uint32_t flags, bool more) noexcept = 0;
  // The arming driver is destroyed (after every worker joined) while the
  // multishot is still armed: no on_result() will follow.
  virtual void on_driver_gone() noexcept = 0;

 protected:
  ~multishot_sink() = default;
};

// Which io_driver a driver is: how a driver finds out whether the current
// worker's driver is one of its own kind with a load, not a dynamic_cast
// (as sched::driver::is_io()). Workers may mix kinds (WEFT_IO=auto falls
// back per worker).
enum class io_driver_kind : std::uint8_t { uring, epoll };

// A worker's driver that can perform operations.
class io_driver : public sched::driver {
 public:
  explicit io_driver(io_driver_kind k) noexcept : sched::driver(/*io=*/true), kind_(k) {}
  io_driver_kind kind() const noexcept { return kind_; }
  io_counters& counters() noexcept { return counters_; }

  // Carries out `o` for the calling fiber, which runs on this driver's
  // worker; see io::perform() for the results.
  virtual result<int> perform(op& o, clock::time_point deadline, const char* what,
                              std::source_location where) = 0;
  // Asks the driver to cancel the wait whose slot is `c`. Any thread (the
  // fiber may have migrated). The slot still completes, perhaps with
  // -ECANCELED.
  virtual void cancel(completion& c) noexcept = 0;
  // Reaps completions on the calling thread without blocking (at least one
  // if any is there; see sched::wake_budget); only the owning worker
  // thread calls it (see *Waiting while unwinding* in io/perform.cc).
  void poll_now() { poll(); }
  // Whether arm_multishot_accept() can succeed on this driver.
  virtual bool has_multishot_accept() const noexcept { return false; }
  // Arms a multishot accept on listening socket `fd` whose results go to
  // `s` until its on_result(.., more=false) or on_driver_gone(). The
  // caller runs on this driver's worker. It does not count in pending():
  // the fibers parked for its results count instead (see *Deadlock* in
  // io/accept.cc). False if the kernel would not take it (see *Arming
  // reaches the kernel* in io/uring_driver.cc): nothing is armed, and no
  // result comes to `s`.
  virtual bool arm_multishot_accept(int fd, multishot_sink& s) {
    (void)fd, (void)s;
    return false;
  }
  // Whether arm_multishot_recv() can succeed on this driver.
  virtual bool has_multishot_recv() const noexcept { return false; }
  // Arms a multishot receive on stream socket `fd` into this driver's
  // pooled buffers (see *Pooled receive buffers*), whose results go to `s`
  // as arm_multishot_accept()'s: a result > 0 holds buffer `flags >>
  // IORING_CQE_BUFFER_SHIFT` (pooled_buffer_at() finds it; the sink gives
  // it back with release_buffer()). Submitted at once: the kernel holds
  // the socket's file from then on, whatever becomes of the number. False
  // as arm_multishot_accept()'s.
  virtual bool arm_multishot_recv(int fd, multishot_sink& s) {
    (void)fd, (void)s;
    return false;
  }
  // The kernel refused a multishot receive (an old kernel): none is armed
  // on this driver again. Any thread.
  virtual void multishot_recv_refused() noexcept {}
  // The address of pooled buffer `id` of this driver.
  virtual char* pooled_buffer_at(std::uint32_t id) noexcept { (void)id; return nullptr; }
  // Asks the kernel to end the multishot armed for `s` (it then delivers
  // its last on_result). Any thread; harmless if it already ended.
  virtual void cancel_multishot(multishot_sink& s) noexcept { (void)s; }
  // *Write-behind* (io/fd_state.h): a write of at most kWriteBehindMax
  // bytes on a stream socket is copied and queued, and the fiber goes on
  // without parking for its completion; the socket's next send, shutdown or
  // close waits for it and reports its failure. Saves a park, a wake and a
  // switch per response of a request/response server. Only where the
  // kernel sends a stream's buffer whole (MSG_WAITALL), so that a
  // completion is all or an error. On TCP streams by default, where a
  // write's failure is already asynchronous (the kernel's send buffer);
  // not on Unix streams, whose writes fail at once when the peer is gone,
  // unless asked for (see write_behind_mode).
  virtual write_behind_mode sends_behind() const noexcept { return write_behind_mode::none; }
  // Queues the send of `copy` (len bytes, malloc'd; freed by
  // st.on_write_behind_done()) on descriptor fd, whose completion goes to
  // st.on_write_behind_done(). This driver's worker thread only.
  // `seq` numbers st's write-behinds, so that a late cancel names this one.
  virtual void send_behind(fd_state& st, std::uint64_t seq, int fd, char* copy,
                           std::size_t len) noexcept {
    (void)st, (void)seq, (void)fd, (void)copy, (void)len;
  }
  // Asks the kernel to end st's write-behind number `seq` now (-ECANCELED
  // if it had not sent yet). Any thread; the completion still arrives.
  virtual void cancel_send_behind(fd_state& st, std::uint64_t seq) noexcept { (void)st, (void)seq; }
  // The same at `deadline` (absolute, clock's), unless it ended by then:
  // what bounds a write-behind that outlives its socket's close(). Any
  // thread; a cancel that comes after the send ended finds nothing.
  virtual void cancel_send_behind_at(fd_state& st, std::uint64_t seq,
                                     clock::time_point deadline) noexcept {
    (void)st, (void)seq, (void)deadline;
  }
  // How long a write-behind may outlive its socket's close() or shutdown()
  // by another fiber when its write had no deadline (*Lingering* in
  // io/fd_state.h): WEFT_LINGER_MS, read when the driver is made; 60 s
  // unless set, about as long as the kernel keeps an orphaned socket whose
  // peer does not read.
  virtual clock::duration linger_cap() const noexcept { return clock::duration::max(); }
  // Gives back a buffer recv_pooled returned (id, p = its buf_id and buf).
  // Any thread.
  virtual void release_buffer(std::uint32_t id, void* p) noexcept {
    (void)id;
    delete[] static_cast<char*>(p);
  }
  // How the receive-buffer pool's memory is backed (alloc/arena.h): a
  // page_backing name, or "heap" (buffers from the heap).
  virtual const char* buffer_backing() const noexcept { return "heap"; }

 protected:
  io_counters counters_;

 private:
  const io_driver_kind kind_;
};

// The shared wait of perform(): parks on `c` (cancellable, until
// `deadline` if not max), and if the park ends without a result, cancels
// through `owner` and waits, not cancellable, for the slot to complete.
// Returns why the first park ended (notified: the result came first).
// A non-cancellable wait (an operation that must run to its end once
// started: a close, whose cancel would leave the descriptor open with its
// number forgotten) neither wakes on a stop request nor cancels when the
// runtime unwinds the fiber.
sched::wake_reason wait_for(io_driver& owner, completion& c, clock::time_point deadline,
                            const char* what, std::source_location where,
                            bool cancellable = true);

// Performs `o` on the calling fiber's worker, parking the fiber until it
// completes. Returns the system call's non-negative result, or:
//   std::errc::timed_out           the deadline passed first
//   std::errc::operation_canceled  the fiber's stop was requested
//   std::errc::not_supported       the runtime has no I/O driver
//   the system error otherwise (e.g. EPIPE, ECONNRESET, EMFILE).
result<int> perform(op& o, clock::time_point deadline, const char* what,
                    std::source_location where = std::source_location::current());

// The driver of the calling fiber's worker, or nullptr.
io_driver* current_driver() noexcept;

// Driver factories (io/uring_driver.cc, io/epoll_driver.cc). Each returns
// nullptr and sets `why` when its facility is unavailable.
// node_os: the NUMA node the worker runs on, for its buffer pool (-1: no
// preference).
std::unique_ptr<io_driver> make_uring_driver(unsigned worker, int node_os, std::error_code& why);
std::unique_ptr<io_driver> make_epoll_driver(unsigned worker, std::error_code& why);

// Called once per process by the driver factory: SIGPIPE and SIGXFSZ get
// an empty handler (not SIG_IGN, which child processes would inherit), so
// a write to a closed peer is an EPIPE value and a write past the file
// size limit an EFBIG value, never a signal that ends the process.
void ignore_write_signals_once() noexcept;

// weft's own SIGURG, sent by the monitor to a worker stuck in one fiber
// (see *Rescue* in io/uring_driver.cc): flushes that worker's ring and
// returns true. Returns false and does nothing for any other signal.
// Async-signal-safe. A handler that replaces weft's SIGURG handler
// (io/signal.cc's, while a signal_set watches SIGURG) calls it first.
bool handle_rescue_signal(int sig, const siginfo_t* info) noexcept;
// Whether a SIGURG sent to a worker reaches handle_rescue_signal(): weft's
// handler or a signal_set's is installed. Installs weft's where SIGURG has
// its default disposition (or is ignored); false where the program
// handles SIGURG itself, which weft then leaves alone (io/signal.cc).
bool sigurg_reaches_rescue() noexcept;

// Requests other threads hand to a driver's owner thread (cancel an
// operation submitted on its ring or waiting in its epoll set). Any
// thread push()es; take() moves everything in one swap under the lock, so
// several takers (the epoll driver's owner and its rescue()) each get a
// disjoint share.
template <typename T>
class handoff_list {
 public:
  void push(T v) {
    {
      std::lock_guard g(lock_);
      items_.push_back(v);
    }
    // release: publishes the push; pairs with the acquire in take(). (A
    // hint: the list itself is read under the lock.)
    nonempty_.store(true, std::memory_order_release);
  }
  // Whether something was pushed and not yet taken (relaxed: a hint).
  bool nonempty() const noexcept { return nonempty_.load(std::memory_order_relaxed); }
  // Moves everything pushed so far into `out`, which must be empty, by a
  // swap (no allocation: `out`'s buffer becomes the list's); false if
  // nothing.
  bool take(std::vector<T>& out) {
    if (!nonempty_.load(std::memory_order_acquire)) return false;  // pairs with push()
    std::lock_guard g(lock_);
    out.swap(items_);
    nonempty_.store(false, std::memory_order_relaxed);  // relaxed: under the lock
    return !out.empty();
  }

 private:
  weft::spinlock lock_;
  std::vector<T> items_;  // guarded by lock_
  std::atomic<bool> nonempty_{false};
};

}  // namespace weft::io
