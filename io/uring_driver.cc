// io/uring_driver.cc
//
// The io_uring driver: one ring per worker, created on the worker's thread.
// The only file that includes liburing.h.
//
// Invariants:
//   - Only the owning worker's thread submits to ring_ (SINGLE_ISSUER
//     where the kernel has it), on its loop or in its SIGURG handler. A
//     fiber prepares SQEs only while it runs on the owner, between
//     io::perform()'s start() and its park; other threads reach the ring
//     only through wake() and cancel(), which queue work and write the
//     eventfd, and the monitor's rescue() reaps its CQ ring under
//     reap_lock_ (see *Rescue*).
//   - Every CQE's user_data is either a completion* with a generation in
//     its top 16 bits (an operation started by start(), counted in
//     inflight_ until its CQE; see *Cancel keys*), kWakeTag (the
//     eventfd read, always armed), kRingWakeTag (a wake-up sent by another
//     worker's ring), kIgnoreTag (linked timeouts, cancels), a
//     uring_driver* with kWakeSentMark (the sender's own CQE of a
//     MSG_RING to that driver; see *Waking*), an fd_state* with kSendBehindBit set (a
//     write-behind: counted in inflight_ and behind_ until its CQE; see
//     send_behind()) or a multishot_sink* with kMultishotBit set
//     (see *Multishot operations* in io/driver.h), listed in armed_ from
//     arming until its CQE without IORING_CQE_F_MORE. A multishot is not
//     counted in inflight_: armed with nobody waiting for its results, it
//     can wake no fiber (see *Deadlock* in io/accept.cc).
//   - SQEs are submitted in one io_uring_submit per scheduler turn (flush(),
//     poll(), wait()); start() submits early only when the SQ ring is full,
//     and waits for the kernel if it takes none (see *A full SQ ring*).
//
// *Cancel keys*: a cancel from another thread names the operation by its
// user_data, and may be drained after the operation completed and its
// fiber's stack was reused by a new operation with a slot at the same
// address (rescue() makes that likely: it completes operations while the
// cancels wait for the owner). A 16-bit generation per driver in the
// user_data's top bits (user addresses fit in 48) tells the two apart.
//
// *Deadlines*: an operation whose deadline is near (kKernelDeadline) is
// linked to an IORING_OP_LINK_TIMEOUT; the kernel cancels the operation at
// the deadline and it completes with -ECANCELED (-EINTR if it was running
// in io-wq), which perform maps to timed_out. The timeout's timespec is
// read by the kernel when the SQE is submitted, so it lives in ts_[] at the
// SQE's index until the next submit.
// A far deadline (an idle timeout: it rarely fires) is the scheduler's
// timer instead, which costs no kernel timer and no second SQE and CQE per
// operation (a 30 s read deadline cost 11% of the echo server's CPU); when
// it fires, wait_for() cancels the operation and waits for its CQE.
//
// *Waking*: a worker wakes another with IORING_OP_MSG_RING from its own
// ring: one CQE lands in the sleeper's ring, and nothing needs re-arming.
// Threads without a ring (the blocking pool, plain threads, and a worker
// whose SQ ring is full) write an eventfd that has a read armed on the ring
// at all times. Either way a sleeping wait() returns; wake_pending_ keeps
// repeated wakes down to one until the owner has seen it.
// A kernel may refuse the MSG_RING (a restricted ring; a remote post
// short of memory; kFlagChoices keeps kernels without the opcode away):
// only the sender's own CQE says so, and the sleeper, whose wake_pending_
// is set, would never wake again, whoever woke it. So that CQE names the
// sleeper (kWakeSentMark); on a failure its reaper writes the sleeper's
// eventfd instead, says so once on stderr, and from then on every worker
// wakes through eventfds (msg_ring_refused).
//
// *Rescue* (a worker stuck in one fiber that computes without parking):
// with DEFER_TASKRUN or COOP_TASKRUN the kernel posts completions only
// when the owner enters it, and SQEs a fiber prepared just before the
// stuck fiber started (a hand-off runs it without a loop turn) are not
// even submitted. The monitor (sched/scheduler.cc) calls rescue() on its
// own thread, which
//   1. if the ring holds deferred completions or unsubmitted SQEs, and the
//      owner's thread is computing (not in a blocking system call, which
//      the signal would cut short with EINTR; see owner_computing()),
//      interrupts it with SIGURG (as
//      Go preempts a goroutine). The handler (io/signal.cc installs it
//      where SIGURG has its default disposition, which ignores it; a
//      program's own SIGURG handler turns this step off), on the owner's
//      thread, submits the prepared SQEs and the cancels other threads
//      asked for (a far deadline that another worker's timer fired, a stop
//      request) — unless the signal landed inside this driver's SQ code
//      (sq_busy_), where it only enters the kernel for the deferred
//      completions, which never touches the SQ;
//   2. reaps the CQ ring itself and makes the fibers runnable from its
//      thread: they go to the inject queue and other workers run them.
//      It takes every CQE (*Fairness* bounds the owner's reap, whose
//      fibers go to its local queue; these all go to the global queue).
// reap_lock_ keeps the owner and rescue() from reaping at once: the owner
// holds it in poll() and wait() — through its kernel wait, unlike other
// spinlocks (a waiting owner is not stuck, and the only other taker,
// rescue(), just tries) — in idle() for a look, and in
// arm_multishot_accept() for armed_. It guards
// the CQ ring's head, woken_, rearm_wake_ and armed_. inflight_ stays the
// owner's; rescue() counts what it reaped in rescued_, which the owner
// subtracts. What reap() calls (completion::complete(),
// multishot_sink::on_result()) must not reap or wait on this driver; it
// may ask it to cancel (accept's back-pressure does), which only prepares
// an SQE on the owner's thread or queues the cancel from another. Not
// rescued: what the kernel defers while the stuck fiber sleeps in a
// system call, and whatever the handler cannot do because SIGURG has a
// handler of the program's own.
//
// Who calls what:
//   perform(), poll(), poll_now(), flush(), wait(), pending()  owner thread
//   wake(), cancel(), release_buffer()                         any thread
//   rescue()                                                   the monitor
//   flush_from_signal()                                        the owner's SIGURG handler
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "alloc/arena.h"
#include "alloc/check.h"
#include "alloc/env.h"
#include "io/driver.h"
#include "io/fd_state.h"
#include "io/recv.h"
#include "sched/worker.h"

namespace weft::io {
namespace {

constexpr std::uint64_t kIgnoreTag = 0;
constexpr std::uint64_t kWakeTag = 1;
constexpr std::uint64_t kRingWakeTag = 2;  // an IORING_OP_MSG_RING from another worker
// Marks a multishot_sink* in user_data; completion* and multishot_sink*
// are at least 8-aligned, and the small tags above are checked first.
constexpr std::uint64_t kMultishotBit = 1;
// Marks an fd_state* whose write-behind this is (see *Write-behind* in
// io/driver.h), with the write's sequence number in the top 16 bits.
constexpr std::uint64_t kSendBehindBit = 2;
// Marks a write-behind's cancel key (the two above) on a timeout SQE whose
// expiry cancels that send: cancel_send_behind_at().
constexpr std::uint64_t kLingerBit = 4;
// Marks a uring_driver* (with neither bit above: tag & 7 is exactly this):
// the sender's CQE of a MSG_RING wake-up sent to that driver (*Waking*).
constexpr std::uint64_t kWakeSentMark = 4;
static_assert(alignof(completion) >= 8, "a completion* must leave the tag bits clear");
// Set once a MSG_RING wake-up failed (see *Waking*): every worker wakes
// through the eventfd from then on. relaxed: a hint; a MSG_RING sent after
// it is set fails the same way and is made good the same way.
std::atomic<bool> msg_ring_refused{false};
// See *Cancel keys*.
constexpr int kGenShift = 48;
constexpr std::uint64_t kAddressMask = (std::uint64_t{1} << kGenShift) - 1;
// The kernel's restart codes (include/linux/errno.h: ERESTARTSYS,
// ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK), internal to it:
// see perform_one().
constexpr bool is_restart_code(int err) noexcept {
  return err == 512 || err == 513 || err == 514 || err == 516;
}
// SQ ring entries: a turn rarely queues more; start() submits early when full.
constexpr unsigned kSqEntries = 256;
// See *Deadlines*: nearer than this, the kernel times the operation out.
constexpr auto kKernelDeadline = std::chrono::seconds(1);
// CQ ring entries: room for a burst of completions between two reaps; the
// kernel keeps overflowed CQEs (IORING_FEAT_NODROP) if a burst is larger.
constexpr unsigned kCqEntries = 4096;
// *Fairness*: the owner's reap takes CQEs while a sched::wake_budget
// allows (sched/driver.h): reaping every CQE at once overflowed the
// worker's local queue to the inject queue (a p999 of 80 ms with 1000 echo
// connections), and so did 64 per periodic poll (p99 three times Go's).
// The CQ ring keeps the rest in order for the next poll; wait() returns at
// once while it holds any.
// *Pooled receive buffers* (io/driver.h): a provided buffer ring of
// kBufCount buffers of kPooledBufferSize bytes, group kBufGroup, in an
// arena (alloc/arena.h; see setup_buffer_ring()). Mapped, not touched: on
// small pages only buffers that held data cost RSS; on huge pages the
// first receive into a 2 MiB half commits it whole (4 MiB per worker at
// most), and hugetlb takes both halves from the reserve at start.
constexpr unsigned kBufCount = 1024;  // a power of two, as the kernel requires
constexpr int kBufGroup = 0;

// Ring flags, best first; the first the kernel accepts wins. Nothing older
// than the second: COOP_TASKRUN is kernel 5.19, and so are the multishot
// accept and the receive's IORING_RECVSEND_POLL_FIRST this driver uses
// unconditionally (MSG_RING is 5.18). A kernel that refuses both (older,
// or an emulation without them) has too little io_uring for weft: the
// worker takes the epoll driver, whose log line says why. (A CQSIZE-only
// choice set older kernels' rings up, and their accepts then failed.)
constexpr unsigned kCq = IORING_SETUP_CQSIZE;
constexpr unsigned kFlagChoices[] = {
    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
        IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL | kCq,
    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL | kCq,
};

// si_value of weft's own SIGURG (see *Rescue*), so that a program's own
// SIGURG (out-of-band data, another library) is told apart.
constexpr int kRescueMagic = 0x77656674;  // "weft"

// A switch of the environment: unset or empty, the default; "0" or "1";
// anything else ("off", "true") is the default too, with one line on
// stderr, so that a value the program did not mean is not taken quietly.
int env_switch(const char* name, const char* meaning_of_default) noexcept {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  if (std::strcmp(v, "0") == 0) return 0;
  if (std::strcmp(v, "1") == 0) return 1;
  static std::atomic<unsigned> said{0};  // one line per variable (relaxed: a flag set)
  const unsigned bit = std::strcmp(name, "WEFT_WRITE_BEHIND") == 0 ? 1u : 2u;
  if (!(said.fetch_or(bit, std::memory_order_relaxed) & bit))
    std::fprintf(stderr, "weft: ignoring %s=%s (want 0 or 1); %s\n", name, v, meaning_of_default);
  return -1;
}

// WEFT_WRITE_BEHIND: unset, TCP streams only; "1", every stream (Unix
// too); "0", none. See *Write-behind* in README.md for why TCP is the
// default.
write_behind_mode write_behind_wanted() noexcept {
  switch (env_switch("WEFT_WRITE_BEHIND", "small writes go behind on TCP streams")) {
    case 0: return write_behind_mode::none;
    case 1: return write_behind_mode::any_stream;
    default: return write_behind_mode::tcp;
  }
}

// WEFT_MULTISHOT_RECV: "0" turns multishot receives off (read_pooled() then
// arms one receive per call, as before; for A/B runs and as an escape
// hatch); unset or "1" leaves them on.
bool multishot_recv_wanted() noexcept {
  return env_switch("WEFT_MULTISHOT_RECV", "multishot receives stay on") != 0;
}

// WEFT_TEST_FAIL_ARM_SUBMITS: for tests, the count of submits of a
// multishot's arming (see arm_multishot()) that fail as -EBUSY would,
// leaving the SQE queued; 0 (none) otherwise.
int fail_arm_submits_wanted() noexcept {
  const char* v = std::getenv("WEFT_TEST_FAIL_ARM_SUBMITS");
  return v ? std::atoi(v) : 0;
}

// WEFT_LINGER_MS: see io_driver::linger_cap(). A count of milliseconds (0:
// another fiber's close() ends the send at once); anything else, or more
// than a day, is the default, with a line on stderr.
clock::duration linger_cap_wanted() noexcept {
  constexpr clock::duration kDefault = std::chrono::seconds(60);
  const char* v = std::getenv("WEFT_LINGER_MS");
  if (!v) return kDefault;
  unsigned long long ms = 0;
  if (!alloc::parse_decimal(v, 24ull * 3600 * 1000, ms)) {
    static std::atomic<bool> said{false};  // one line, not one per worker (relaxed: a flag)
    if (!said.exchange(true, std::memory_order_relaxed))
      std::fprintf(stderr, "weft: WEFT_LINGER_MS=\"%s\" is not a count of milliseconds "
                   "up to a day; lingering sends end after 60 s\n", v);
    return kDefault;
  }
  return std::chrono::milliseconds(ms);
}

// IORING_ASYNC_CANCEL_OP (kernel 6.6; liburing 2.3's header predates it):
// a cancel of every request whose opcode is sqe->len.
constexpr unsigned kCancelOp = 1u << 5;

// Whether the kernel takes kCancelOp, on a fresh ring (its creator's
// thread, before anything else is in flight). quiesce() needs it to end
// the write-behinds of streams that outlive the runtime: without it they
// would stay in flight past the ring, their fd_state never freed and a
// later close() calling cancel_send_behind() on the deleted driver. A
// 6.1-6.5 kernel (DEFER_TASKRUN but not this) then sends every write at
// once instead.
bool cancel_op_works(io_uring& ring) noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (!sqe) return false;
  io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ALL | kCancelOp);
  sqe->len = IORING_OP_SEND;
  io_uring_sqe_set_data64(sqe, kIgnoreTag);
  if (io_uring_submit_and_wait(&ring, 1) < 0) return false;
  io_uring_cqe* cqe = nullptr;
  if (io_uring_peek_cqe(&ring, &cqe) != 0 || !cqe) return false;
  const bool ok = cqe->res >= 0;  // the number cancelled (0); -EINVAL if unknown
  io_uring_cqe_seen(&ring, cqe);
  return ok;
}

class uring_driver;
// The driver of the worker running on this thread, for the SIGURG
// handler. initial-exec: reading it in a handler must not allocate.
[[gnu::tls_model("initial-exec")]] thread_local uring_driver* tls_driver = nullptr;

class uring_driver final : public io_driver {
 public:
  uring_driver(io_uring& ring, unsigned flags, int efd, int node_os,
               write_behind_mode sends_behind, clock::duration linger_cap)
      : io_driver(io_driver_kind::uring), ring_(ring), flags_(flags), efd_(efd),
        ts_(ring.sq.ring_entries), sends_behind_(sends_behind), linger_cap_(linger_cap),
        owner_(::pthread_self()), tid_(::gettid()) {
    (void)io_uring_register_ring_fd(&ring_);  // optional: saves an fd lookup per enter
    setup_buffer_ring(node_os);
    arm_wake_read();
    io_uring_submit(&ring_);
    unsubmitted_.store(false, std::memory_order_relaxed);
    // Room for a whole CQ ring's worth without allocating: the SIGURG
    // handler may stash (see *A full SQ ring*).
    stash_.reserve(kCqEntries);
    // A program that blocks signals before weft::run() blocks them in its
    // workers too: the rescue signal must get through.
    sigset_t urg;
    sigemptyset(&urg);
    sigaddset(&urg, SIGURG);
    ::pthread_sigmask(SIG_UNBLOCK, &urg, nullptr);
    tls_driver = this;
  }
  ~uring_driver() override {
    // First, while its provided buffers are still there: what the ring
    // delivered to multishots and the last turns of the loop left unreaped.
    deliver_leftover_multishots();
    // Then: chunks its multishot receives queued stop naming it, also in
    // states no longer armed here (a stream that outlives the runtime).
    recv_driver_destroyed();
    // After every worker joined: nothing runs on the ring any more.
    io_uring_queue_exit(&ring_);
    // Multishots still armed (a listener that outlives the runtime) will
    // never see their last CQE: tell their sinks, which drop the ring's
    // share of their state and stop naming this driver.
    for (multishot_sink* s : armed_) s->on_driver_gone();
    ::close(efd_);
    if (br_) ::munmap(br_, kBufCount * sizeof(io_uring_buf));
    alloc::unmap_arena(bufs_arena_);
  }
  const char* buffer_backing() const noexcept override {
    return br_ ? alloc::to_string(bufs_arena_.backing) : "heap";
  }

  result<int> perform(op& o, clock::time_point deadline, const char* what,
                      std::source_location where) override;
  void cancel(completion& c) noexcept override;
  void release_buffer(std::uint32_t id, void* p) noexcept override;
  void wait(sched::clock::time_point deadline) override;
  void poll() override;
  void flush() override {
    sq_section busy(*this);  // drain_cancels() uses cancel_scratch_
    drain_cancels();
    drain_released();
    if (io_uring_sq_ready(&ring_) > 0) submit();
  }
  void wake() noexcept override;
  bool idle() noexcept override;
  std::size_t pending() const noexcept override {
    return inflight_ - rescued_.load(std::memory_order_relaxed);  // relaxed: see rescued_
  }
  void rescue() noexcept override;
  void flush_from_signal() noexcept;
  bool owner_computing() noexcept;
  bool has_multishot_accept() const noexcept override { return true; }
  // A provided buffer ring (kernel 5.19) and the kernel's multishot
  // receive (6.0; DEFER_TASKRUN, 6.1, says it is there) unless refused
  // once or turned off (WEFT_MULTISHOT_RECV=0: multishot_recv_wanted()).
  bool has_multishot_recv() const noexcept override {
    return br_ && multishot_recv_ok_.load(std::memory_order_relaxed);  // relaxed: a hint
  }
  bool arm_multishot_recv(int fd, multishot_sink& s) override;
  void multishot_recv_refused() noexcept override {
    multishot_recv_ok_.store(false, std::memory_order_relaxed);  // relaxed: a hint
  }
  char* pooled_buffer_at(std::uint32_t id) noexcept override {
    return bufs_ + std::size_t{id} * kPooledBufferSize;
  }
  // MSG_WAITALL sends: kernel 5.18; DEFER_TASKRUN (6.1) says it is newer.
  // On TCP by default; WEFT_WRITE_BEHIND chooses (see write_behind_wanted()).
  write_behind_mode sends_behind() const noexcept override { return sends_behind_; }
  clock::duration linger_cap() const noexcept override { return linger_cap_; }
  void send_behind(fd_state& st, std::uint64_t seq, int fd, char* copy,
                   std::size_t len) noexcept override;
  void cancel_send_behind(fd_state& st, std::uint64_t seq) noexcept override {
    cancel_tag(behind_key(st, seq));
  }
  void cancel_send_behind_at(fd_state& st, std::uint64_t seq,
                             clock::time_point deadline) noexcept override;
  void quiesce() override;
  bool arm_multishot_accept(int fd, multishot_sink& s) override;
  bool arm_multishot(io_uring_sqe* sqe, multishot_sink& s);
  bool sq_taken(unsigned pos) const noexcept;
  void cancel_multishot(multishot_sink& s) noexcept override;
  const char* name() const noexcept override { return "io_uring"; }

 private:
  void start(op& o, completion& c, clock::time_point deadline);
  result<int> perform_one(op& o, clock::time_point deadline, const char* what,
                          std::source_location where, std::uint32_t* cqe_flags);
  result<int> recv_pooled(op& o, clock::time_point deadline, const char* what,
                          std::source_location where);
  void setup_buffer_ring(int node_os);
  void recycle(std::uint32_t bid);
  void drain_released();
  io_uring_sqe* get_sqe(unsigned need);
  void make_sq_room(unsigned need);
  bool stash_cqes();
  int submit();
  void prep(io_uring_sqe* sqe, const op& o);
  void prep_cancel(std::uint64_t tag);
  void cancel_tag(std::uint64_t tag) noexcept;
  void on_multishot_cqe(std::uint64_t tag, int res, std::uint32_t flags);
  void deliver_leftover_multishots() noexcept;
  void arm_wake_read();
  bool send_ring_wake() noexcept;
  void ring_wake_refused(int res) noexcept;
  void drain_cancels();
  void prep_timed_cancel(std::uint64_t key, std::int64_t ns);
  void reap(bool owner);
  void completions_dropped() noexcept;
  // Owner thread, just before an enter that submits.
  void note_submit() noexcept {
    unsubmitted_.store(false, std::memory_order_relaxed);  // relaxed: see unsubmitted_
    // Single writer, so a store, not a locked add: the owner calls this
    // inside an sq_section, its signal handler only outside any.
    submits_.store(submits_.load(std::memory_order_relaxed) + 1,
                   std::memory_order_release);  // see submits_
  }
  // Marks the owner thread's SQ code for its own signal handler (see
  // *Rescue*). Nests.
  class sq_section {
   public:
    explicit sq_section(uring_driver& d) : d_(d) {
      // relaxed + signal fences: only this thread's handler reads it.
      d_.sq_busy_.store(d_.sq_busy_.load(std::memory_order_relaxed) + 1,
                        std::memory_order_relaxed);
      std::atomic_signal_fence(std::memory_order_seq_cst);
    }
    ~sq_section() {
      std::atomic_signal_fence(std::memory_order_seq_cst);
      d_.sq_busy_.store(d_.sq_busy_.load(std::memory_order_relaxed) - 1,
                        std::memory_order_relaxed);
    }
    sq_section(const sq_section&) = delete;
    sq_section& operator=(const sq_section&) = delete;

   private:
    uring_driver& d_;
  };
  bool on_owner_thread() const noexcept {
    sched::worker* w = sched::current_worker();
    return w && w->io() == this;
  }

  io_uring ring_;
  const unsigned flags_;
  const int efd_;
  std::uint64_t wake_buf_ = 0;  // the armed eventfd read's target (owner, kernel)
  std::vector<__kernel_timespec> ts_;  // link timeouts by SQE index (see *Deadlines*)
  std::size_t inflight_ = 0;  // owner only: operations started, CQE not yet seen
  // Write-behinds in flight (counted in inflight_ too): added by the owner,
  // subtracted by whoever reaps their CQE (under reap_lock_). relaxed: only
  // quiesce() reads it, on the owner after its own reap.
  std::atomic<std::size_t> behind_{0};
  const write_behind_mode sends_behind_;  // see make_uring_driver()
  const clock::duration linger_cap_;      // see make_uring_driver()
  static std::uint64_t behind_key(fd_state& st, std::uint64_t seq) noexcept {
    return reinterpret_cast<std::uintptr_t>(&st) | kSendBehindBit | (seq << kGenShift);
  }
  std::uint16_t gen_ = 0;     // owner only: see *Cancel keys*
  // Guarded by reap_lock_: a wake() was reaped and no wait() has returned
  // since. wake() is sticky (sched/driver.h): the next wait() returns at once.
  bool woken_ = false;

  // *Rescue*. reap_lock_: see there.
  weft::spinlock reap_lock_;
  // Guarded by reap_lock_: CQEs moved out of the CQ ring, not yet handled,
  // older than any still in the ring; reap() takes them first from
  // stash_next_ on (see *A full SQ ring*).
  std::vector<io_uring_cqe> stash_;
  std::size_t stash_next_ = 0;
  // Owner thread only: it holds reap_lock_ (poll(), wait(), arm_multishot()),
  // so make_sq_room() may stash under it rather than take it.
  bool owner_reaps_ = false;
  // Guarded by reap_lock_: the eventfd read completed; the owner re-arms
  // it (an SQE) at its next poll() or wait().
  bool rearm_wake_ = false;
  // CQEs of counted operations that rescue() reaped, not yet subtracted
  // from inflight_. relaxed: a count; pending() may read it late, which
  // only overstates what is in flight (the deadlock check stays safe).
  std::atomic<std::size_t> rescued_{0};
  // SQEs prepared since the last submit. Owner stores, the monitor reads a
  // hint (relaxed: the signal it sends is what orders the submit).
  std::atomic<bool> unsubmitted_{false};
  // Bumped by the owner just before each submitting enter (release); loaded
  // by rescue() before it completes a CQE (acquire). What a fiber wrote
  // before its SQE went in (its completion slot, a multishot's sink) then
  // happens-before the monitor's use of it. The kernel orders this already
  // (the SQ and CQ rings' barriers); the pair states it, also to TSan,
  // which cannot see the kernel.
  std::atomic<std::uint64_t> submits_{0};
  // Owner thread only, and its signal handler: inside SQ code (sq_section).
  std::atomic<int> sq_busy_{0};
  bool in_handler_ = false;  // owner thread: flush_from_signal() is running
  // Bumped by the owner's SIGURG handler after it flushed (release);
  // rescue() waits for a change (acquire) before it reaps.
  std::atomic<std::uint64_t> flushes_{0};
  const pthread_t owner_;
  const pid_t tid_;  // the owner's thread id, for owner_computing()
  // owner_computing()'s reading at the monitor's previous look: the
  // owner's thread was in state R, after `nvcsw` voluntary context
  // switches. The monitor's thread only (rescue()'s caller): plain fields.
  bool owner_was_running_ = false;
  std::uint64_t owner_nvcsw_ = 0;

  // release in wake() publishes the waker's work; pairs with the acq_rel
  // exchange in reap() that clears it (see *Waking*).
  std::atomic<bool> wake_pending_{false};

  // Pooled receive buffers: the ring and the memory (owner and kernel).
  io_uring_buf_ring* br_ = nullptr;
  char* bufs_ = nullptr;          // bufs_arena_'s memory
  alloc::arena_block bufs_arena_;
  // Buffers released on other threads, recycled by the owner at its next
  // flush/poll/wait.
  weft::spinlock release_lock_;
  std::vector<std::uint32_t> released_;  // guarded by release_lock_
  // release after the push publishes released_; pairs with the acquire in
  // drain_released() (a hint: the list itself is read under the lock).
  std::atomic<bool> has_released_{false};

  // Cancels asked for by fibers that have moved to another worker, and of
  // multishots by any thread: the user_data to cancel.
  handoff_list<std::uint64_t> cancels_;  // from other threads (cancel_tag())
  // Timed cancels of write-behinds, from other threads
  // (cancel_send_behind_at()): the key and the deadline's count.
  struct timed_cancel {
    std::uint64_t key;
    std::int64_t ns;
  };
  handoff_list<timed_cancel> timed_cancels_;
  std::vector<timed_cancel> timed_scratch_;  // as cancel_scratch_
  // Owner thread, inside an sq_section, or its signal handler outside any:
  // drain_cancels() swaps the list into it, so that draining allocates and
  // frees nothing (the handler may not).
  std::vector<std::uint64_t> cancel_scratch_;
  // Guarded by reap_lock_: the sinks of the multishots armed on this ring.
  std::vector<multishot_sink*> armed_;
  std::atomic<bool> multishot_recv_ok_{multishot_recv_wanted()};
  // Owner only: arming submits that fail on purpose, as -EBUSY would
  // (WEFT_TEST_FAIL_ARM_SUBMITS; tests of *Arming reaches the kernel*).
  int fail_arm_submits_ = fail_arm_submits_wanted();
  // Guarded by reap_lock_: the keys of timed cancels (cancel_send_behind_at())
  // of which one CQE of two has been reaped, the send's or the timeout's.
  // A timeout that expires after its send ended must not cancel by key: by
  // then the fd_state may be freed and its address reused by a socket whose
  // send has the same 16-bit number (65536 write-behinds later on this
  // thread, well within a write's deadline). linger_met() pairs the two.
  std::vector<std::uint64_t> linger_halves_;
  // True if `key`'s other CQE was reaped already (it is forgotten now);
  // else remembers this one.
  bool linger_met(std::uint64_t key) {
    auto it = std::find(linger_halves_.begin(), linger_halves_.end(), key);
    if (it == linger_halves_.end()) {
      linger_halves_.push_back(key);
      return false;
    }
    *it = linger_halves_.back();
    linger_halves_.pop_back();
    return true;
  }
};

// The callers hold an sq_section until the SQE is filled in.
io_uring_sqe* uring_driver::get_sqe(unsigned need) {
  if (io_uring_sq_space_left(&ring_) < need) make_sq_room(need);
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  WEFT_CHECK(sqe, "uring_driver: no SQE after make_sq_room()");
  unsubmitted_.store(true, std::memory_order_relaxed);  // relaxed: see unsubmitted_
  return sqe;
}

// *A full SQ ring*: the SQEs of this turn filled it, and the kernel may
// take none now: -EBUSY (completions it could not post wait for room in
// the CQ ring; it takes no more requests until they are in) or -EAGAIN
// (short of memory). Go and Tokio wait and retry, and so does this: each
// try first moves the CQEs posted so far out of the CQ ring into stash_
// (reap() handles them first, in order), which makes the room -EBUSY
// waits for, then backs off (up to kSqBackoffMax per try) for memory to
// come back. It does not reap: its callers may hold locks that the
// completions' handlers take (an fd_state's, prepare a cancel under it;
// reap() itself, whose multishot sinks cancel), or be the SIGURG handler.
// After kSqPatience without a taken SQE it aborts, saying why: the fiber
// holds pointers the kernel must see, and there is no error to return them.
void uring_driver::make_sq_room(unsigned need) {
  constexpr auto kSqPatience = std::chrono::seconds(30);
  constexpr auto kSqBackoffMax = std::chrono::milliseconds(10);
  const auto give_up = clock::now() + kSqPatience;
  auto backoff = std::chrono::microseconds(50);
  for (;;) {
    const int r = submit();
    if (io_uring_sq_space_left(&ring_) >= need) return;
    if (r < 0 && r != -EBUSY && r != -EAGAIN && r != -EINTR) {
      std::fprintf(stderr, "weft: io_uring: the SQ ring is full and the kernel refuses "
                   "submissions (%s); cannot go on\n", std::strerror(-r));
      WEFT_CHECK(false, "uring_driver: io_uring_submit failed with a full SQ ring");
    }
    const bool moved = stash_cqes();  // CQ room made: the kernel may take the SQEs now
    if (clock::now() >= give_up) {
      std::fprintf(stderr, "weft: io_uring: the kernel took no submission for %llds (%s); "
                   "the SQ ring is full and the process cannot go on. %s\n",
                   static_cast<long long>(kSqPatience.count()), std::strerror(r < 0 ? -r : EBUSY),
                   r == -EAGAIN ? "The system is out of memory for io_uring requests: "
                                  "free memory or lower the load."
                                : "Its completion backlog did not drain.");
      WEFT_CHECK(false, "uring_driver: no SQE after waiting for the kernel");
    }
    if (moved) continue;
    std::this_thread::sleep_for(backoff);  // blocks the worker: nothing can run without an SQE
    backoff = std::min<std::chrono::microseconds>(backoff * 2, kSqBackoffMax);
  }
}

// Moves the CQ ring's CQEs into stash_, handling none (see *A full SQ
// ring*). Owner thread. Whether it moved any. In the SIGURG handler only
// where it takes reap_lock_ itself: with owner_reaps_ set, the signal may
// have landed inside reap() between its read of a CQE and the advance past
// it, and that CQE would be stashed as well as handled.
bool uring_driver::stash_cqes() {
  if (in_handler_ && owner_reaps_) return false;
  const bool locked_here = !owner_reaps_;
  if (locked_here && !reap_lock_.try_lock()) return false;  // rescue() reaps: room all the same
  unsigned head, n = 0;
  io_uring_cqe* cqe;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    // The SIGURG handler may not allocate: up to the reserved capacity.
    if (in_handler_ && stash_.size() == stash_.capacity()) break;
    stash_.push_back(*cqe);
    ++n;
  }
  io_uring_cq_advance(&ring_, n);
  if (locked_here) reap_lock_.unlock();
  return n > 0;
}

int uring_driver::submit() {
  sq_section busy(*this);
  note_submit();
  int r = io_uring_submit(&ring_);
  if (r > 0) io_counters::bump(counters_.submits);
  if (r < 0) unsubmitted_.store(true, std::memory_order_relaxed);  // still queued
  // -EBUSY/-EAGAIN: CQ overflow backlog or memory pressure; the SQEs stay
  // queued and the next turn submits them again.
  // Not from the signal handler, where stdio is not safe.
  if (r == -EBADR && !in_handler_) completions_dropped();
  else if (r < 0 && r != -EBUSY && r != -EAGAIN && r != -EINTR && !in_handler_)
    std::fprintf(stderr, "weft: io_uring_submit: %s\n", std::strerror(-r));
  return r;
}

void uring_driver::prep(io_uring_sqe* sqe, const op& o) {
  // The kernel takes u32 lengths; a larger buffer is simply read or
  // written partially, as a short read/write.
  unsigned len = o.len > (1u << 30) ? (1u << 30) : static_cast<unsigned>(o.len);
  switch (o.kind) {
    case op_kind::recv:
      io_uring_prep_recv(sqe, o.fd, o.buf, len, o.flags);
      break;
    case op_kind::recv_pooled:
      io_uring_prep_recv(sqe, o.fd, nullptr, kPooledBufferSize, o.flags);
      if (o.poll_first) sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
      sqe->flags |= IOSQE_BUFFER_SELECT;
      sqe->buf_group = kBufGroup;
      break;
    case op_kind::send:
      io_uring_prep_send(sqe, o.fd, o.buf, len, o.flags | MSG_NOSIGNAL);
      break;
    case op_kind::recvmsg:
      io_uring_prep_recvmsg(sqe, o.fd, o.msg, o.flags);
      break;
    case op_kind::sendmsg:
      io_uring_prep_sendmsg(sqe, o.fd, o.msg, o.flags | MSG_NOSIGNAL);
      break;
    case op_kind::accept:
      io_uring_prep_accept(sqe, o.fd, o.addr, o.addrlen, o.flags | SOCK_CLOEXEC);
      break;
    case op_kind::connect:
      io_uring_prep_connect(sqe, o.fd, o.addr, *o.addrlen);
      // A Unix listener with a full accept queue refuses a non-blocking
      // try with EAGAIN while the socket polls writable, so the kernel's
      // own try, then its poll (ready at once), then task work (run at
      // the owner's next entry: DEFER_TASKRUN) hand the connect to io-wq.
      // A cancel or a linked timeout that comes in that gap finds nothing
      // (-ENOENT), and the blocking connect then waits for room for ever,
      // past its deadline and its fiber's stop. Straight to io-wq, a
      // cancel always finds it (-ECANCELED queued, -EINTR running). The
      // cost: a thread hop on every Unix connect.
      if (o.addr->sa_family == AF_UNIX) sqe->flags |= IOSQE_ASYNC;
      break;
    case op_kind::read_at:
      io_uring_prep_read(sqe, o.fd, o.buf, len, o.offset);
      break;
    case op_kind::write_at:
      io_uring_prep_write(sqe, o.fd, o.buf, len, o.offset);
      break;
    case op_kind::fsync:
      io_uring_prep_fsync(sqe, o.fd, o.flags ? IORING_FSYNC_DATASYNC : 0);
      break;
    case op_kind::openat:
      io_uring_prep_openat(sqe, AT_FDCWD, static_cast<const char*>(o.buf), o.flags | O_CLOEXEC,
                           static_cast<mode_t>(o.offset));
      // The kernel's first try of an open (at submit) forces O_NONBLOCK on
      // and takes what it gives: a FIFO's write end fails at once with
      // ENXIO while no reader is there, its read end returns before any
      // writer came, and a terminal does not wait for its carrier, where
      // open(2) waits (it clears O_NONBLOCK after, so nothing else shows).
      // Straight to io-wq, the open blocks as open(2) does, and a cancel
      // interrupts it (-EINTR). Opens that may create or truncate go there
      // anyway; the cost for the others is a thread hop. A caller that
      // asked for O_NONBLOCK gets the same either way: tried at once.
      if ((o.flags & O_NONBLOCK) == 0) sqe->flags |= IOSQE_ASYNC;
      break;
    case op_kind::close:
      io_uring_prep_close(sqe, o.fd);
      break;
    case op_kind::read:
      io_uring_prep_read(sqe, o.fd, o.buf, len, ~std::uint64_t{0});  // -1: no offset
      break;
    case op_kind::poll:
      io_uring_prep_poll_add(sqe, o.fd, static_cast<unsigned>(o.flags));
      break;
  }
}

void uring_driver::start(op& o, completion& c, clock::time_point deadline) {
  sq_section busy(*this);
  const bool timed = deadline != clock::time_point::max();
  io_uring_sqe* sqe = get_sqe(timed ? 2 : 1);
  prep(sqe, o);
  // SAFETY: &c lives on the parked fiber's stack until its CQE arrived
  // (see *Completion slots* in io/driver.h).
  std::uint64_t key = reinterpret_cast<std::uintptr_t>(&c);
  WEFT_CHECK((key & ~kAddressMask) == 0,
             "uring_driver: a completion slot above 2^48 (see *Cancel keys*)");
  key |= std::uint64_t{++gen_} << kGenShift;  // see *Cancel keys*
  c.set_key(key);
  io_uring_sqe_set_data64(sqe, key);
  ++inflight_;
  io_counters::bump(counters_.ops);
  io_counters::bump(counters_.parked);  // every io_uring operation parks
  if (timed) {
    sqe->flags |= IOSQE_IO_LINK;
    io_uring_sqe* t = io_uring_get_sqe(&ring_);  // get_sqe(2) left room for it
    __kernel_timespec& ts = ts_[t - ring_.sq.sqes];
    // Absolute, on CLOCK_MONOTONIC (steady_clock's): the kernel counts a
    // relative timeout from the submission, which may come later (the
    // next turn, or a rescue). One already past: the kernel still tries
    // the operation once.
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count();
    ts.tv_sec = ns / 1'000'000'000;
    ts.tv_nsec = ns % 1'000'000'000;
    io_uring_prep_link_timeout(t, &ts, IORING_TIMEOUT_ABS);
    io_uring_sqe_set_data64(t, kIgnoreTag);
  }
}

result<int> uring_driver::perform(op& o, clock::time_point deadline, const char* what,
                                  std::source_location where) {
  if (o.kind == op_kind::recv_pooled) return recv_pooled(o, deadline, what, where);
  return perform_one(o, deadline, what, where, nullptr);
}

result<int> uring_driver::perform_one(op& o, clock::time_point deadline, const char* what,
                                      std::source_location where, std::uint32_t* cqe_flags) {
  completion c;
  constexpr clock::time_point never = clock::time_point::max();
  // A deadline before the clock's epoch (time_point::min()) is long past:
  // as the epoch, so neither the subtraction nor the kernel's timespec
  // sees a negative count.
  deadline = std::max(deadline, clock::time_point{});
  // The idle timeout of a server (seconds away) is told far without the
  // precise clock (see *The coarse clock* in sched/park.h).
  const bool in_kernel = deadline != never && !sched::surely_later(deadline, kKernelDeadline) &&
                         deadline < clock::now() + kKernelDeadline;
  // SAFETY: from start() on, the kernel holds &c and o's buffers:
  // wait_for() returns only once the CQE arrived (see *Completion slots*).
  start(o, c, in_kernel ? deadline : never);
  if (o.use) o.use->attach(*this, c);  // a close() of the socket cancels it now
  // A close runs to its end (see wait_for()).
  sched::wake_reason why = wait_for(*this, c, in_kernel ? never : deadline, what, where,
                                    /*cancellable=*/o.kind != op_kind::close);
  if (o.use) o.use->detach();
  int r = c.res();
  // An operation io-wq ran that a signal (a cancel's) interrupted may end
  // with one of the kernel's restart codes, which never reach user space
  // from a system call (a FIFO open: ERESTARTSYS): they mean EINTR.
  if (r < 0 && is_restart_code(-r)) r = -EINTR;
  if (cqe_flags) *cqe_flags = c.flags();
  if (r >= 0) return r;
  if (why == sched::wake_reason::timed_out && (r == -ECANCELED || r == -EINTR))
    return std::unexpected(std::make_error_code(std::errc::timed_out));
  if (why == sched::wake_reason::cancelled && (r == -ECANCELED || r == -EINTR)) {
    sched::unwind_point();
    return std::unexpected(std::make_error_code(std::errc::operation_canceled));
  }
  // The linked timeout fired (see *Deadlines*). It cancels an operation
  // the kernel is still polling for with -ECANCELED, and one running in
  // io-wq (a blocking connect to a Unix listener with a full queue) by
  // interrupting that worker: -EINTR.
  if (r == -ETIME || ((r == -ECANCELED || r == -EINTR) && in_kernel))
    return std::unexpected(std::make_error_code(std::errc::timed_out));
  return std::unexpected(std::error_code(-r, std::system_category()));
}

// ---- Pooled receive buffers --------------------------------------------------

// The buffers are an arena (alloc/arena.h): huge pages where the machine
// gives them, on the worker's NUMA node; every connection's receives land
// there, so its TLB reach matters.
void uring_driver::setup_buffer_ring(int node_os) {
  void* ring = ::mmap(nullptr, kBufCount * sizeof(io_uring_buf), PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const int map_err = ring == MAP_FAILED ? errno : 0;
  auto mem = alloc::map_arena(kBufCount * kPooledBufferSize, node_os);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<std::uintptr_t>(ring);
  reg.ring_entries = kBufCount;
  reg.bgid = kBufGroup;
  const int reg_err = ring == MAP_FAILED ? map_err
                      : !mem              ? mem.error().value()
                                          : -io_uring_register_buf_ring(&ring_, &reg, 0);
  static std::atomic<bool> told_ring{false};  // relaxed: only deduplicates a log line
  if (reg_err != 0) {
    // No memory for the ring or its buffers, or a kernel that will not
    // register it: recv_pooled falls back to a heap buffer per receive, and
    // an idle connection's pooled read holds one. Said once, as every
    // degradation of the driver is.
    if (ring != MAP_FAILED) ::munmap(ring, kBufCount * sizeof(io_uring_buf));
    if (mem) alloc::unmap_arena(*mem);
    if (!told_ring.exchange(true, std::memory_order_relaxed))
      std::fprintf(stderr, "weft: io_uring buffers: cannot set up the provided-buffer ring (%s); "
                           "pooled reads use a heap buffer each\n",
                   std::strerror(reg_err));
    return;
  }
  static std::atomic<bool> told{false};  // relaxed: only deduplicates a log line
  if (mem->bind_error && !told.exchange(true, std::memory_order_relaxed))
    std::fprintf(stderr, "weft: io_uring buffers: cannot prefer NUMA node %d (%s); "
                         "they use the default placement\n",
                 node_os, mem->bind_error.message().c_str());
  bufs_arena_ = *mem;
  br_ = static_cast<io_uring_buf_ring*>(ring);
  bufs_ = reinterpret_cast<char*>(bufs_arena_.base);
  io_uring_buf_ring_init(br_);
  for (unsigned i = 0; i < kBufCount; ++i)
    io_uring_buf_ring_add(br_, bufs_ + i * kPooledBufferSize, kPooledBufferSize, i,
                          io_uring_buf_ring_mask(kBufCount), i);
  io_uring_buf_ring_advance(br_, kBufCount);
}

void uring_driver::recycle(std::uint32_t bid) {
  io_uring_buf_ring_add(br_, bufs_ + bid * kPooledBufferSize, kPooledBufferSize, bid,
                        io_uring_buf_ring_mask(kBufCount), 0);
  io_uring_buf_ring_advance(br_, 1);  // a release store: the kernel sees the entry
}

void uring_driver::release_buffer(std::uint32_t id, void* p) noexcept {
  if (id == kHeapBufferId) {
    delete[] static_cast<char*>(p);
  } else if (on_owner_thread()) {
    recycle(id);
  } else {
    {
      std::lock_guard g(release_lock_);
      released_.push_back(id);
    }
    has_released_.store(true, std::memory_order_release);  // pairs with drain_released()
  }
}

void uring_driver::drain_released() {
  if (!has_released_.load(std::memory_order_acquire)) return;  // pairs with release_buffer()
  std::vector<std::uint32_t> ids;
  {
    std::lock_guard g(release_lock_);
    ids.swap(released_);
    has_released_.store(false, std::memory_order_relaxed);  // relaxed: under the lock
  }
  for (std::uint32_t id : ids) recycle(id);
}

result<int> uring_driver::recv_pooled(op& o, clock::time_point deadline, const char* what,
                                      std::source_location where) {
  o.buf = nullptr;
  o.len = 0;
  o.buf_id = kHeapBufferId;
  if (br_) {
    std::uint32_t flags = 0;
    auto r = perform_one(o, deadline, what, where, &flags);
    if (flags & IORING_CQE_F_BUFFER) {
      std::uint32_t bid = flags >> IORING_CQE_BUFFER_SHIFT;
      if (!r) {
        release_buffer(bid, nullptr);  // a failed receive may still have taken one
        return r;
      }
      o.buf_id = bid;
      o.buf = bufs_ + bid * kPooledBufferSize;
      o.len = kPooledBufferSize;
    }
    if (r || r.error() != std::errc::no_buffer_space) return r;
  }
  // No ring, or every buffer is out: a heap buffer for this receive. The
  // fiber may have moved since the park above: perform on its worker now.
  auto* buf = new char[kPooledBufferSize];
  io_counters::add(counters_.heap_buffers);  // perhaps not on this driver's thread: add()
  op plain{.kind = op_kind::recv, .fd = o.fd, .buf = buf, .len = kPooledBufferSize, .flags = o.flags,
           .use = o.use};
  auto r = io::perform(plain, deadline, what, where);
  if (!r) {
    delete[] buf;
    return r;
  }
  o.buf = buf;
  o.len = kPooledBufferSize;
  return r;
}

// ---- Write-behind ------------------------------------------------------------

void uring_driver::send_behind(fd_state& st, std::uint64_t seq, int fd, char* copy,
                               std::size_t len) noexcept {
  WEFT_CHECK(on_owner_thread(), "send_behind: not on the owner's thread");
  WEFT_CHECK((reinterpret_cast<std::uintptr_t>(&st) & ~kAddressMask & ~kSendBehindBit) == 0 &&
                 (reinterpret_cast<std::uintptr_t>(&st) & 7) == 0,
             "uring_driver: an fd_state above 2^48 or misaligned (see *Cancel keys*)");
  sq_section busy(*this);
  io_uring_sqe* sqe = get_sqe(1);
  // MSG_WAITALL: the kernel sends the whole copy, polling for room as
  // needed, so the completion is all of it or an error.
  io_uring_prep_send(sqe, fd, copy, static_cast<unsigned>(len), MSG_NOSIGNAL | MSG_WAITALL);
  io_uring_sqe_set_data64(sqe, behind_key(st, seq));
  ++inflight_;
  behind_.fetch_add(1, std::memory_order_relaxed);  // relaxed: see behind_
  io_counters::bump(counters_.ops);
  io_counters::bump(counters_.written_behind);
}

// The worker's loop has ended and its fibers are gone; a write-behind still
// in flight belongs to a socket closed without waiting (a plain thread's
// close, a stop request) or one that outlives the runtime. The kernel's
// ring teardown would cancel them without a CQE, so their copies and
// descriptors would leak: cancel every send and reap until they are back.
void uring_driver::quiesce() {
  flush();
  if (behind_.load(std::memory_order_relaxed) == 0) return;
  {
    // Every send (kCancelOp; sends_behind_ only where the kernel takes it).
    sq_section busy(*this);
    io_uring_sqe* sqe = get_sqe(1);
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ALL | kCancelOp);
    sqe->len = IORING_OP_SEND;
    io_uring_sqe_set_data64(sqe, kIgnoreTag);
  }
  const auto give_up = clock::now() + std::chrono::seconds(2);
  while (behind_.load(std::memory_order_relaxed) > 0 && clock::now() < give_up)
    wait(std::min(give_up, clock::now() + std::chrono::milliseconds(50)));
}

// ---- Cancelling --------------------------------------------------------------

void uring_driver::prep_cancel(std::uint64_t tag) {
  sq_section busy(*this);
  io_uring_sqe* sqe = get_sqe(1);
  io_uring_prep_cancel64(sqe, tag, 0);
  io_uring_sqe_set_data64(sqe, kIgnoreTag);
}

void uring_driver::cancel_tag(std::uint64_t tag) noexcept {
  if (on_owner_thread()) {
    prep_cancel(tag);  // submitted at this worker's next flush
    return;
  }
  cancels_.push(tag);
  wake();
}

void uring_driver::cancel(completion& c) noexcept {
  cancel_tag(c.key());  // the caller owns c (see *Cancel keys*)
}

void uring_driver::drain_cancels() {
  if (timed_cancels_.take(timed_scratch_)) {
    for (const timed_cancel& t : timed_scratch_) prep_timed_cancel(t.key, t.ns);
    timed_scratch_.clear();
  }
  if (!cancels_.take(cancel_scratch_)) return;
  for (std::uint64_t tag : cancel_scratch_) prep_cancel(tag);
  cancel_scratch_.clear();  // keeps the capacity: the next take() swaps it back
}

// A timeout SQE that, when it expires, cancels the write-behind `key`
// (reap() sees kLingerBit; linger_met() keeps it from cancelling a later
// send with the same key). Not counted in inflight_: it wakes no fiber.
// Its send is counted, so a worker with nothing else to do waits in the
// ring, and the timeout's CQE ends that wait at the deadline.
void uring_driver::prep_timed_cancel(std::uint64_t key, std::int64_t ns) {
  sq_section busy(*this);
  io_uring_sqe* sqe = get_sqe(1);
  __kernel_timespec& ts = ts_[sqe - ring_.sq.sqes];  // read by the kernel at submission
  ts.tv_sec = ns / 1'000'000'000;
  ts.tv_nsec = ns % 1'000'000'000;
  io_uring_prep_timeout(sqe, &ts, 0, IORING_TIMEOUT_ABS);
  io_uring_sqe_set_data64(sqe, key | kLingerBit);
  io_counters::add(counters_.linger_timers);
}

void uring_driver::cancel_send_behind_at(fd_state& st, std::uint64_t seq,
                                         clock::time_point deadline) noexcept {
  const std::int64_t ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::max(deadline, clock::time_point{}).time_since_epoch())
          .count();
  if (on_owner_thread()) {
    prep_timed_cancel(behind_key(st, seq), ns);
    return;
  }
  timed_cancels_.push({behind_key(st, seq), ns});
  wake();
}

// ---- Multishot operations ----------------------------------------------------

bool uring_driver::arm_multishot_accept(int fd, multishot_sink& s) {
  WEFT_CHECK(on_owner_thread(), "arm_multishot_accept: not on the owner's thread");
  sq_section busy(*this);
  io_uring_sqe* sqe = get_sqe(1);
  io_uring_prep_multishot_accept(sqe, fd, nullptr, nullptr, SOCK_CLOEXEC);
  if (!arm_multishot(sqe, s)) return false;
  io_counters::bump(counters_.multishot_accepts);
  return true;
}

bool uring_driver::arm_multishot_recv(int fd, multishot_sink& s) {
  WEFT_CHECK(on_owner_thread(), "arm_multishot_recv: not on the owner's thread");
  sq_section busy(*this);
  io_uring_sqe* sqe = get_sqe(1);
  io_uring_prep_recv_multishot(sqe, fd, nullptr, 0, 0);
  sqe->flags |= IOSQE_BUFFER_SELECT;
  sqe->buf_group = kBufGroup;
  if (!arm_multishot(sqe, s)) return false;
  io_counters::bump(counters_.multishot_recvs);
  return true;
}

// Whether the kernel has taken the SQE at SQ ring position `pos`: its head
// has moved past it. acquire: the kernel's store of the head.
bool uring_driver::sq_taken(unsigned pos) const noexcept {
  return static_cast<int>(io_uring_smp_load_acquire(ring_.sq.khead) - pos) > 0;
}

// Under sq_section: files s as the target of the multishot prepared in sqe
// (the last SQE got) and submits it. False if the kernel would not take it:
// s is unfiled again, the SQE is a no-op, and nothing is armed.
//
// *Arming reaches the kernel*: submitted now, not at the loop's next turn,
// because nothing else holds the socket for it: the call that armed it
// may return first (a deadline already past), its socket be closed and
// the number reused, and an SQE still queued then would receive (or
// accept) on whatever the number names by the next submit, taking
// another connection's bytes. A submit can fail with the SQE still queued
// (-EBUSY while the kernel holds overflowed completions it has no room
// for in the CQ ring; -EAGAIN short of memory). So the arming reaps, which
// makes that room, and submits again, a few times; if the kernel still
// has not taken the SQE, it becomes a no-op (the kernel has not read it:
// this thread alone submits) and the caller arms nothing (see
// recv_state::take(), accept_state::take()).
bool uring_driver::arm_multishot(io_uring_sqe* sqe, multishot_sink& s) {
  constexpr int kTries = 4;
  const unsigned pos = ring_.sq.sqe_tail - 1;  // the last SQE got: get_sqe() for this one
  WEFT_DCHECK(sqe == &ring_.sq.sqes[pos & ring_.sq.ring_mask], "arm_multishot: not the last SQE");
  // SAFETY: s is on the heap and stays alive until its last on_result()
  // (or on_driver_gone()); see *Multishot operations* in io/driver.h.
  io_uring_sqe_set_data64(sqe, reinterpret_cast<std::uintptr_t>(&s) | kMultishotBit);
  {
    std::lock_guard g(reap_lock_);  // armed_ (see *Rescue*); held briefly by rescue()
    armed_.push_back(&s);
  }
  for (int i = 0; i < kTries; ++i) {
    if (i > 0 && reap_lock_.try_lock()) {  // else rescue() is reaping: room all the same
      owner_reaps_ = true;
      reap(/*owner=*/true);
      owner_reaps_ = false;
      reap_lock_.unlock();
    }
    if (fail_arm_submits_ > 0) {
      --fail_arm_submits_;  // a test's -EBUSY: the SQE stays queued
    } else {
      submit();
    }
    if (sq_taken(pos)) {
      // Not ++inflight_: see the invariants at the top.
      io_counters::bump(counters_.ops);
      return true;
    }
  }
  io_uring_prep_nop(sqe);
  io_uring_sqe_set_data64(sqe, kIgnoreTag);
  std::lock_guard g(reap_lock_);
  armed_.erase(std::find(armed_.begin(), armed_.end(), &s));
  return false;
}

void uring_driver::cancel_multishot(multishot_sink& s) noexcept {
  // The sink's address is only the key of the cancel: it is never read
  // from the cancel's side, so a sink already freed is harmless here.
  cancel_tag(reinterpret_cast<std::uintptr_t>(&s) | kMultishotBit);
}

// Under reap_lock_.
void uring_driver::on_multishot_cqe(std::uint64_t tag, int res, std::uint32_t flags) {
  auto* s = reinterpret_cast<multishot_sink*>(tag & ~kMultishotBit);
  const bool more = flags & IORING_CQE_F_MORE;
  if (!more) {
    auto it = std::find(armed_.begin(), armed_.end(), s);
    WEFT_CHECK(it != armed_.end(), "uring_driver: last CQE of a multishot not armed here");
    *it = armed_.back();
    armed_.pop_back();
  }
  // SAFETY: the sink holds a share of its own state for the armed SQE and
  // drops it only in this last call (more == false); see io/accept.cc.
  // Thread-safe: rescue() calls it from the monitor.
  s->on_result(res, flags, more);
}

// The destructor's, after every worker joined: the multishot CQEs still in
// stash_ or the CQ ring go to their sinks. The owner reaps within a
// wake_budget and its loop stops at the runtime's exit whatever the ring
// holds, so a burst that came in its last turns stayed there; and a
// multishot accept's descriptor is the process's from the moment its CQE
// is posted: only its sink (io/accept.cc) queues it for an accept() or
// closes it, so one never delivered leaked. The other CQEs need nobody:
// every fiber has exited, so no completion slot waits for its CQE. The
// kernel posts nothing more: under DEFER_TASKRUN only the owner thread's
// enter runs the multishot's work, and the ring's exit cancels it.
void uring_driver::deliver_leftover_multishots() noexcept {
  std::lock_guard g(reap_lock_);
  auto deliver = [this](const io_uring_cqe& c) {
    // A multishot_sink*: kMultishotBit alone among the low bits (the wake
    // tags below 8 are not addresses).
    if (c.user_data > kRingWakeTag && (c.user_data & 7) == kMultishotBit)
      on_multishot_cqe(c.user_data, c.res, c.flags);
  };
  for (; stash_next_ < stash_.size(); ++stash_next_) deliver(stash_[stash_next_]);
  stash_.clear();
  stash_next_ = 0;
  while (io_uring_cq_ready(&ring_) > 0) {
    // Copied and consumed first, as in reap(): a sink may cancel, which
    // may stash.
    io_uring_cqe copy = ring_.cq.cqes[*ring_.cq.khead & ring_.cq.ring_mask];
    io_uring_cq_advance(&ring_, 1);
    deliver(copy);
  }
}

void uring_driver::arm_wake_read() {
  sq_section busy(*this);
  io_uring_sqe* sqe = get_sqe(1);
  io_uring_prep_read(sqe, efd_, &wake_buf_, sizeof wake_buf_, 0);
  io_uring_sqe_set_data64(sqe, kWakeTag);
}

void uring_driver::wake() noexcept {
  // acq_rel: the release publishes the caller's queued work to the owner
  // (pairs with the exchange in reap()); only the first waker writes.
  if (wake_pending_.exchange(true, std::memory_order_acq_rel)) return;
  if (send_ring_wake()) return;
  std::uint64_t one = 1;
  ssize_t n = ::write(efd_, &one, sizeof one);
  (void)n;  // cannot fail short of a bad fd: the counter never nears its max
}

// From a worker with an io_uring driver of its own: a MSG_RING on that
// (the caller's) ring, submitted at once — a wake-up must not wait for the
// caller's next turn. Runs on the caller's owner thread, which is the only
// one that touches its ring.
bool uring_driver::send_ring_wake() noexcept {
  sched::worker* w = sched::current_worker();
  sched::driver* d = w ? w->io() : nullptr;
  // SAFETY: only uring_driver constructs an io_driver of kind uring.
  auto* from = d && d->is_io() && static_cast<io_driver*>(d)->kind() == io_driver_kind::uring
                   ? static_cast<uring_driver*>(d)
                   : nullptr;
  if (!from || from == this) return false;
  if (msg_ring_refused.load(std::memory_order_relaxed)) return false;  // see *Waking*
  sq_section busy(*from);  // from's owner is this thread
  io_uring_sqe* sqe = io_uring_get_sqe(&from->ring_);
  if (!sqe) return false;  // its SQ ring is full: the eventfd serves
  io_uring_prep_msg_ring(sqe, ring_.ring_fd, 0, kRingWakeTag, 0);
  // The sender's own CQE names this driver, for a refusal (*Waking*).
  // SAFETY: drivers live until every worker joined; no CQE is reaped after.
  io_uring_sqe_set_data64(sqe, reinterpret_cast<std::uintptr_t>(this) | kWakeSentMark);
  from->submit();
  return true;
}

// The kernel refused a MSG_RING wake-up sent to this driver (res: its
// error), whose wake_pending_ is still set: the eventfd wakes it instead.
// Any thread (the sender's reaper: its owner or the monitor).
void uring_driver::ring_wake_refused(int res) noexcept {
  if (!msg_ring_refused.exchange(true, std::memory_order_relaxed))  // relaxed: see there
    std::fprintf(stderr, "weft: io_uring: the kernel refused IORING_OP_MSG_RING (%s); "
                 "workers wake each other through an eventfd\n", std::strerror(-res));
  std::uint64_t one = 1;
  ssize_t n = ::write(efd_, &one, sizeof one);
  (void)n;  // as wake()'s
}

// Under reap_lock_. The owner (poll(), wait()) takes what its wake_budget
// allows (see *Fairness*); rescue() takes everything, into the inject
// queue.
void uring_driver::reap(bool owner) {
  unsigned head, n = 0;
  std::size_t done = 0;    // counted operations that completed
  std::uint64_t handed = 0;  // completions and multishot results delivered
  sched::wake_budget budget;
  // One CQE at a time, copied and consumed before it is handled: what a
  // handler calls may stash the rest (a cancel that finds the SQ ring
  // full; see *A full SQ ring*), and stash_ holds the older ones.
  for (;;) {
    io_uring_cqe copy;
    if (stash_next_ < stash_.size()) {
      if (owner && !budget.more(handed)) break;
      copy = stash_[stash_next_++];
    } else {
      if (io_uring_cq_ready(&ring_) == 0) break;
      if (owner && !budget.more(handed)) break;
      head = *ring_.cq.khead;  // ours: only the reaper (under reap_lock_) moves it
      copy = ring_.cq.cqes[head & ring_.cq.ring_mask];
      io_uring_cq_advance(&ring_, 1);
    }
    io_uring_cqe* cqe = &copy;
    ++n;
    std::uint64_t tag = cqe->user_data;
    if (tag == kIgnoreTag) continue;
    if (!owner) (void)submits_.load(std::memory_order_acquire);  // see submits_
    if (tag == kWakeTag || tag == kRingWakeTag) {
      // acq_rel: pairs with wake()'s exchange; wakes after this one write again.
      wake_pending_.exchange(false, std::memory_order_acq_rel);
      woken_ = true;
      if (tag == kWakeTag) rearm_wake_ = true;  // a MSG_RING consumed nothing
      continue;
    }
    if ((tag & 7) == kWakeSentMark) {  // a MSG_RING this ring sent (*Waking*)
      if (cqe->res < 0)
        reinterpret_cast<uring_driver*>(tag & ~std::uint64_t{7})->ring_wake_refused(cqe->res);
      continue;
    }
    if (tag & kLingerBit) {  // a timed cancel's timeout expired (or was cancelled)
      io_counters::sub(counters_.linger_timers);
      // Its send ended already: the key may be another send's by now.
      if (!linger_met(tag & ~kLingerBit) && cqe->res == -ETIME) cancel_tag(tag & ~kLingerBit);
      continue;
    }
    if (tag & kSendBehindBit) {
      ++done;
      ++handed;
      behind_.fetch_sub(1, std::memory_order_relaxed);  // relaxed: see behind_
      // SAFETY: the write-behind holds a user of its fd_state until this call.
      // Its timed cancel, if reaped later, cancels nothing; and it is
      // cancelled now rather than left in the ring until its deadline
      // (the linger cap: 60 s), so that a server dropping many peers keeps
      // neither timeouts nor linger_halves_ entries for them. By key, as
      // any cancel: a later send with the same key would need 65,536
      // write-behinds at the same fd_state address before this cancel is
      // submitted, at this worker's next flush (*Cancel keys*).
      if (reinterpret_cast<fd_state*>(tag & kAddressMask & ~kSendBehindBit)
              ->on_write_behind_done(cqe->res) &&
          !linger_met(tag))
        cancel_tag(tag | kLingerBit);
      continue;
    }
    if (tag & kMultishotBit) {
      on_multishot_cqe(tag, cqe->res, cqe->flags);
      ++handed;
      continue;
    }
    ++done;
    ++handed;
    // SAFETY: the fiber that owns this slot is parked (or about to park)
    // until complete() ran; see *Completion slots* in io/driver.h.
    reinterpret_cast<completion*>(tag & kAddressMask)->complete(cqe->res, cqe->flags);
  }
  if (stash_next_ == stash_.size() && stash_next_ != 0) {
    stash_.clear();  // keeps the capacity reserved for the SIGURG handler
    stash_next_ = 0;
  }
  if (n) io_counters::bump(counters_.completions, n);  // single writer: under reap_lock_
  if (!owner) {
    if (done) rescued_.fetch_add(done, std::memory_order_relaxed);  // relaxed: see rescued_
    io_counters::bump(counters_.rescued, handed);  // single writer: the monitor
    return;
  }
  inflight_ -= done;
  if (rescued_.load(std::memory_order_relaxed) != 0)
    inflight_ -= rescued_.exchange(0, std::memory_order_relaxed);  // relaxed: see rescued_
  if (std::exchange(rearm_wake_, false)) arm_wake_read();
}

void uring_driver::poll() {
  sq_section busy(*this);
  drain_cancels();
  drain_released();
  if (!reap_lock_.try_lock()) {  // rescue() is reaping for us (see *Rescue*)
    if (io_uring_sq_ready(&ring_) > 0) submit();
    return;
  }
  owner_reaps_ = true;
  if (std::exchange(rearm_wake_, false)) arm_wake_read();
  bool enter = io_uring_sq_ready(&ring_) > 0;
  if (!enter) {
    // relaxed: a hint the kernel sets when deferred completions wait for
    // us (IORING_SQ_TASKRUN) or CQEs overflowed; the enter orders the rest.
    unsigned sqf = __atomic_load_n(ring_.sq.kflags, __ATOMIC_RELAXED);
    enter = (sqf & IORING_SQ_CQ_OVERFLOW) ||
            ((flags_ & IORING_SETUP_TASKRUN_FLAG) && (sqf & IORING_SQ_TASKRUN));
  }
  if (enter) {
    note_submit();
    const int r = io_uring_submit_and_get_events(&ring_);
    if (r > 0) io_counters::bump(counters_.submits);
    if (r == -EBADR) completions_dropped();
  }
  reap(/*owner=*/true);
  owner_reaps_ = false;
  reap_lock_.unlock();
}

// Everything flush() and poll() would act on, looked at without acting
// (sched/driver.h): ~10 loads and the reap lock's try, against a poll's
// section, drains, lock and reap (and the loop pass around it: ~100 ns a
// periodic tick, bench/micro yield). The kernel's flags and the CQ tail
// are read as poll() and reap() read them; the other threads' lists and
// counts are hints (relaxed), as rescue() reads them.
bool uring_driver::idle() noexcept {
  // Inside an SQ section as poll() is: a SIGURG while we hold reap_lock_
  // below must not flush (its make_sq_room() may need that lock).
  sq_section busy(*this);
  if (unsubmitted_.load(std::memory_order_relaxed) || io_uring_sq_ready(&ring_) > 0 ||
      cancels_.nonempty() || timed_cancels_.nonempty() ||
      has_released_.load(std::memory_order_relaxed) ||
      rescued_.load(std::memory_order_relaxed) != 0)
    return false;
  // relaxed: as in poll(); the enter orders the rest.
  const unsigned sqf = __atomic_load_n(ring_.sq.kflags, __ATOMIC_RELAXED);
  if (sqf & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) return false;
  // The CQ ring's head, the stash and a wake read to re-arm are guarded by
  // reap_lock_ (rescue() may be reaping on the monitor's thread: then a
  // poll is due anyway).
  if (!reap_lock_.try_lock()) return false;
  const bool quiet =
      io_uring_cq_ready(&ring_) == 0 && stash_next_ == stash_.size() && !rearm_wake_;
  reap_lock_.unlock();
  return quiet;
}

void uring_driver::wait(sched::clock::time_point deadline) {
  sq_section busy(*this);
  drain_cancels();
  drain_released();
  if (!reap_lock_.try_lock()) {  // rescue() is reaping: a spurious return
    if (io_uring_sq_ready(&ring_) > 0) submit();
    return;
  }
  owner_reaps_ = true;
  if (std::exchange(rearm_wake_, false)) arm_wake_read();
  if (!std::exchange(woken_, false) && io_uring_cq_ready(&ring_) == 0 &&
      stash_next_ == stash_.size()) {
    __kernel_timespec ts{};
    __kernel_timespec* tsp = sched::relative_timeout(deadline, ts);
    io_uring_cqe* cqe = nullptr;
    // -ETIME at the deadline, -EINTR on a signal: both are a plain return.
    // reap_lock_ stays held: a worker waiting here is not stuck.
    bool submitting = io_uring_sq_ready(&ring_) > 0;
    note_submit();
    if (io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, tsp, nullptr) == -EBADR)
      completions_dropped();
    if (submitting) io_counters::bump(counters_.submits);
  } else if (io_uring_sq_ready(&ring_) > 0) {
    submit();
  }
  reap(/*owner=*/true);
  woken_ = false;  // this wait returns: any wake reaped so far is delivered
  owner_reaps_ = false;
  reap_lock_.unlock();
}

// -EBADR from an enter: the kernel had no memory for its CQ overflow list
// and dropped completions (IORING_FEAT_NODROP's last resort). Their fibers
// stay parked for good and nothing can tell which they are; the process
// goes on, so the line says what happened and what to do about it. Once
// per process. Owner thread, not the signal handler.
void uring_driver::completions_dropped() noexcept {
  static std::atomic<bool> said{false};  // relaxed: only deduplicates a log line
  if (!said.exchange(true, std::memory_order_relaxed))
    std::fprintf(stderr, "weft: io_uring: the kernel dropped completions (out of memory "
                 "for its CQ overflow list); the fibers waiting for them will never wake, "
                 "not even at a deadline. Free memory, or lower the number of "
                 "operations in flight per worker\n");
}

// ---- Rescue --------------------------------------------------------------------

void uring_driver::rescue() noexcept {
  // acquire: the kernel's flags word.
  unsigned sqf = __atomic_load_n(ring_.sq.kflags, __ATOMIC_ACQUIRE);
  const bool wanted = ((sqf & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) ||
                       unsubmitted_.load(std::memory_order_relaxed) || cancels_.nonempty() ||
                       timed_cancels_.nonempty()) &&
                      sigurg_reaches_rescue();
  // owner_computing() at every look (the next one compares with it), and
  // last, right before the signal: the window in which the thread may
  // enter a blocking system call (and see EINTR) stays a few
  // microseconds, as Go's.
  if (owner_computing() && wanted) {
    // acquire: pairs with the handler's release increment, so the CQEs it
    // made the kernel post are visible to the reap below.
    std::uint64_t before = flushes_.load(std::memory_order_acquire);
    sigval v{};
    v.sival_int = kRescueMagic;
    if (::pthread_sigqueue(owner_, SIGURG, v) == 0) {
      // A thread on a CPU takes a signal within microseconds; give up on
      // this look after 2 ms (the next look tries again).
      auto give_up = clock::now() + std::chrono::milliseconds(2);
      while (flushes_.load(std::memory_order_acquire) == before && clock::now() < give_up)
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  if (!reap_lock_.try_lock()) return;  // the owner is reaping: not stuck after all
  reap(/*owner=*/false);
  reap_lock_.unlock();
}

// Whether the owner's thread is computing, not in a blocking system call:
// a stuck fiber blocked in poll(2), sleep(3) or a database client's read
// would see EINTR from the signal (SA_RESTART does not restart those).
// Then only what the kernel has posted is rescued.
//
// State R in /proc is not enough: a thread that its call's timeout (or
// event) has just woken is R too, in the kernel on its way out of the
// call, and a signal then may still fail the call with EINTR (poll(2)
// checks for a signal before it reports its timeout). And the monitor
// tends to look just then: the kernel expires a timer anywhere within its
// slack (0.1% of a poll(2) timeout: 300 us of 300 ms), so the interrupt
// that ends the monitor's period also ends a call whose timeout falls in
// that slack, and both threads wake together. A 300 ms poll(2) in a stuck
// fiber got EINTR in 1 to 3 runs of 30 that way (io/rescue_test.cc; more
// often beside a CPU hog: the woken thread stays R, waiting for a CPU).
//
// So the thread counts as computing when it is R at this look and was R
// at the previous one (a monitor period earlier), with no voluntary
// context switch between: every sleep in a system call (or a page fault)
// counts one; preemption counts as involuntary. A call woken now slept
// since the previous look, or that look would have seen it asleep. What
// is left: a call entered after this reading that has not yet slept (a
// few microseconds before the signal, as Go's preemption signal has), and
// a thread woken before the previous look that waited a whole period for
// a CPU. The price: a thread that just came out of a call is signalled
// a period later.
bool uring_driver::owner_computing() noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/status", static_cast<int>(tid_));
  bool running = false;
  std::uint64_t nvcsw = 0;
  bool known = false;
  if (int fd = ::open(path, O_RDONLY | O_CLOEXEC); fd >= 0) {
    char buf[4096];  // about 1.5 KB
    ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n > 0) {
      buf[n] = '\0';
      // "State:\tR (running)" and "voluntary_ctxt_switches:\t12", each at
      // a line's start (which "nonvoluntary_ctxt_switches:" is not).
      const char* st = std::strstr(buf, "\nState:\t");
      const char* vc = std::strstr(buf, "\nvoluntary_ctxt_switches:\t");
      if (st && vc) {
        running = st[8] == 'R';
        nvcsw = std::strtoull(vc + 26, nullptr, 10);
        known = true;
      }
    }
  }
  const bool computing =
      known && running && owner_was_running_ && nvcsw == owner_nvcsw_;
  owner_was_running_ = known && running;
  owner_nvcsw_ = nvcsw;
  return computing;
}

// On the owner's thread, between any two of its instructions (the SIGURG
// handler). Async-signal-safe: liburing's submit is memory operations and
// one system call, and it runs only when the thread was not in SQ code.
void uring_driver::flush_from_signal() noexcept {
  if (sq_busy_.load(std::memory_order_relaxed) == 0) {  // relaxed: our own thread's
    std::atomic_signal_fence(std::memory_order_seq_cst);
    in_handler_ = true;
    drain_cancels();  // a far deadline or a stop request of a fiber parked here
    note_submit();
    (void)io_uring_submit_and_get_events(&ring_);  // prepared SQEs in, deferred CQEs out
    std::atomic_signal_fence(std::memory_order_seq_cst);
    in_handler_ = false;
  } else {
    // Deferred completions only: to_submit 0 never reads the SQ ring.
    (void)::syscall(__NR_io_uring_enter, ring_.ring_fd, 0, 0, IORING_ENTER_GETEVENTS,
                    nullptr, 0);
  }
  flushes_.fetch_add(1, std::memory_order_release);  // pairs with rescue()
}

}  // namespace

bool handle_rescue_signal(int sig, const siginfo_t* info) noexcept {
  if (sig != SIGURG || !info || info->si_code != SI_QUEUE || info->si_pid != ::getpid() ||
      info->si_value.sival_int != kRescueMagic)
    return false;
  const int saved = errno;
  if (uring_driver* d = tls_driver) d->flush_from_signal();
  errno = saved;
  return true;
}

std::unique_ptr<io_driver> make_uring_driver(unsigned worker, int node_os,
                                             std::error_code& why) {
  (void)worker;
  io_uring ring;
  int r = -EINVAL;
  unsigned used = 0;
  for (unsigned flags : kFlagChoices) {
    io_uring_params p{};
    p.flags = flags;
    p.cq_entries = kCqEntries;
    r = io_uring_queue_init_params(kSqEntries, &ring, &p);
    if (r == 0) {
      used = flags;
      break;
    }
    if (r != -EINVAL) break;  // not a flag problem (ENOSYS, EPERM, ENOMEM): give up
  }
  if (r == -EINVAL) {  // every choice refused: see kFlagChoices
    why = std::make_error_code(std::errc::not_supported);
    return nullptr;
  }
  if (r < 0) {
    why = std::error_code(-r, std::system_category());
    return nullptr;
  }
  int efd = ::eventfd(0, EFD_CLOEXEC);  // blocking: the ring arms a poll for it
  if (efd < 0) {
    why = std::error_code(errno, std::system_category());  // read right after the call
    io_uring_queue_exit(&ring);
    return nullptr;
  }
  // MSG_WAITALL sends: kernel 5.18; DEFER_TASKRUN (6.1) says it is newer.
  write_behind_mode behind = write_behind_wanted();
  if (!(used & IORING_SETUP_DEFER_TASKRUN) || !cancel_op_works(ring))
    behind = write_behind_mode::none;
  const clock::duration linger = behind == write_behind_mode::none ? clock::duration::max()
                                                                     : linger_cap_wanted();
  return std::make_unique<uring_driver>(ring, used, efd, node_os, behind, linger);
}

}  // namespace weft::io
