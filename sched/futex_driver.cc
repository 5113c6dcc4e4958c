// sched/futex_driver.cc — the I/O-less driver: a worker sleeps on a futex
// word until another thread wakes it or its next timer is due.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <ctime>

#include "sched/driver.h"

namespace weft::sched {
namespace {

class futex_driver final : public driver {
 public:
  void wait(clock::time_point deadline) override {
    // acquire: pairs with the release exchange in wake(); work published
    // before a wake is visible once we consume it.
    if (word_.exchange(0, std::memory_order_acquire) != 0) return;
    timespec ts{};
    timespec* tsp = relative_timeout(deadline, ts);
    if (tsp && tsp->tv_sec == 0 && tsp->tv_nsec == 0) return;  // already due
    // The kernel re-checks word_ == 0 atomically with going to sleep, so a
    // wake() between the exchange above and here is not lost.
    syscall(SYS_futex, &word_, FUTEX_WAIT_PRIVATE, 0, tsp, nullptr, 0);
    word_.exchange(0, std::memory_order_acquire);  // as above
  }
  void poll() override {}
  void wake() noexcept override {
    // release: publishes the caller's queue push to the woken worker.
    if (word_.exchange(1, std::memory_order_release) == 0)
      syscall(SYS_futex, &word_, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }
  const char* name() const noexcept override { return "futex"; }

 private:
  std::atomic<std::uint32_t> word_{0};
};

}  // namespace

std::unique_ptr<driver> make_futex_driver() {
  return std::make_unique<futex_driver>();
}

}  // namespace weft::sched
