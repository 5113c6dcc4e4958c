// io/file_test.cc — files through the driver: a write/read round trip at
// offsets, fsync, end of file, open errors. Runs on both drivers (see
// io/BUILD.bazel) over worker counts {1, 2, 4}.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <string_view>
#include <utility>
#include <string>
#include <vector>

#include "runtime/net.h"
#include "runtime/weft.h"
#include "tests/fixture.h"

namespace weft {
namespace {

using testing::Runtime;

class Files : public Runtime {};
WEFT_RUNTIME_TEST_SUITE(Files);

std::string temp_path(const char* name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name + "." + std::to_string(::getpid());
}

TEST_P(Files, WriteAtThenReadAtRoundTripsManyFibersAtOnce) {
  const std::string path = temp_path("roundtrip");
  Run([&] {
    auto f = file::open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_TRUE(f) << f.error().message();
    constexpr int kChunks = 64;
    constexpr std::size_t kChunk = 16 * 1024;
    std::vector<join_handle<void>> hs;
    for (int i = 0; i < kChunks; ++i)
      hs.push_back(spawn([&, i] {
        std::vector<char> out(kChunk, char('a' + i % 26));
        ASSERT_TRUE(f->write_at(out, std::uint64_t(i) * kChunk));
      }));
    for (auto& h : hs) h.join();
    ASSERT_TRUE(f->fsync());
    ASSERT_TRUE(f->fsync(/*data_only=*/true));
    hs.clear();
    for (int i = 0; i < kChunks; ++i)
      hs.push_back(spawn([&, i] {
        std::vector<char> in(kChunk);
        std::size_t got = 0;
        while (got < kChunk) {
          auto n = f->read_at(std::span(in).subspan(got), std::uint64_t(i) * kChunk + got);
          ASSERT_TRUE(n && *n > 0);
          got += *n;
        }
        ASSERT_EQ(in, std::vector<char>(kChunk, char('a' + i % 26))) << "chunk " << i;
      }));
    for (auto& h : hs) h.join();
    char b;
    EXPECT_EQ(f->read_at({&b, 1}, std::uint64_t(kChunks) * kChunk).value(), 0u);  // EOF
    EXPECT_TRUE(f->close());
    EXPECT_FALSE(f->is_open());
  });
  ::unlink(path.c_str());
}

// close() while fibers on every worker read the file, then the descriptor
// number is reused at once by new opens: no read may ever return the new
// files' bytes (a read that raced close() returns the old file's data or
// bad_file_descriptor), as Go's os.File and weft's sockets promise.
TEST_P(Files, CloseWhileOthersReadNeverTouchesAFileThatReusesTheNumber) {
  const std::string old_path = temp_path("reuse-old"), new_path = temp_path("reuse-new");
  for (auto [path, c] : {std::pair{&old_path, 'o'}, std::pair{&new_path, 'n'}}) {
    int fd = ::open(path->c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    std::string bytes(4096, c);
    ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), ssize_t(bytes.size()));
    ::close(fd);
  }
  Run([&] {
    std::atomic<int> wrong_reads{0}, unexpected{0};
    for (int round = 0; round < 200; ++round) {
      auto f = file::open(old_path, O_RDONLY).value();
      std::atomic<int> reading{0};
      std::vector<join_handle<void>> readers;
      for (unsigned w = 0; w < 2 * worker_count(); ++w)
        readers.push_back(spawn([&] {
          char buf[256];
          reading.fetch_add(1);
          for (;;) {
            auto n = f.read_at(buf, 0);
            if (!n) {
              if (n.error() != std::errc::bad_file_descriptor) unexpected.fetch_add(1);
              return;
            }
            if (std::string_view(buf, *n).find('n') != std::string_view::npos)
              wrong_reads.fetch_add(1);
            this_fiber::yield();
          }
        }, {.worker = static_cast<int>(w)}));
      while (reading.load() < static_cast<int>(readers.size())) this_fiber::yield();
      ASSERT_TRUE(f.close());
      std::vector<file> reuse;  // likely to get the closed number
      for (int i = 0; i < 4; ++i) reuse.push_back(file::open(new_path, O_RDONLY).value());
      for (auto& h : readers) h.join();
    }
    EXPECT_EQ(wrong_reads.load(), 0) << "reads returned the bytes of a file opened after close()";
    EXPECT_EQ(unexpected.load(), 0);
  });
  ::unlink(old_path.c_str());
  ::unlink(new_path.c_str());
}

// An offset past what off_t holds is invalid_argument on both drivers, as
// pread(2) says (Go's ReadAt: "negative offset"). io_uring reads an offset
// of -1 (~0 as the u64 here) as "at the file position": read_at(buf, ~0)
// returned the file's first bytes and write_at(data, ~0) wrote them at the
// position, moving it, where the epoll driver's pread failed.
TEST_P(Files, AnOffsetPastOffTIsInvalidOnBothDrivers) {
  const std::string path = temp_path("huge-offset");
  Run([&] {
    auto f = file::open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_TRUE(f) << f.error().message();
    ASSERT_TRUE(f->write_at({"hello", 5}, 0));
    for (std::uint64_t off : {~std::uint64_t{0}, std::uint64_t{1} << 63}) {
      char buf[8] = {};
      auto n = f->read_at(buf, off);
      ASSERT_FALSE(n) << "read_at(" << off << ") read " << *n << " bytes";
      EXPECT_EQ(n.error(), std::errc::invalid_argument);
      auto w = f->write_at({"XY", 2}, off);
      ASSERT_FALSE(w) << "write_at(" << off << ") wrote";
      EXPECT_EQ(w.error(), std::errc::invalid_argument);
    }
    char buf[8] = {};
    EXPECT_EQ(f->read_at(buf, 0).value(), 5u);
    EXPECT_EQ(std::string_view(buf, 5), "hello");
    EXPECT_EQ(::lseek(f->native_handle(), 0, SEEK_CUR), 0) << "the file position moved";
    EXPECT_EQ(f->read_at(buf, 5).value(), 0u);     // at the end
    EXPECT_EQ(f->read_at(buf, 4096).value(), 0u);  // past it
  });
  ::unlink(path.c_str());
}

// pwrite(2) on a file opened with O_APPEND ignores the offset and appends
// (io_uring's write too): write_at(buf, 0) put the bytes at the end and
// reported success. It is refused, as Go's WriteAt refuses it, and the
// file is left as it was. read_at still works.
TEST_P(Files, WriteAtOnAnAppendOnlyFileIsRefused) {
  const std::string path = temp_path("append-only");
  Run([&] {
    auto f = file::open(path, O_RDWR | O_CREAT | O_TRUNC | O_APPEND, 0600);
    ASSERT_TRUE(f) << f.error().message();
    ASSERT_EQ(::write(f->native_handle(), "hello", 5), 5);
    auto w = f->write_at({"J", 1}, 0);
    ASSERT_FALSE(w) << "write_at(0) on an O_APPEND file wrote";
    EXPECT_EQ(w.error(), std::errc::invalid_argument);
    char buf[8] = {};
    EXPECT_EQ(f->read_at(buf, 0).value(), 5u);
    EXPECT_EQ(std::string_view(buf, 5), "hello");
    // An adopted descriptor is checked too.
    file g(::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC));
    ASSERT_TRUE(g.is_open());
    EXPECT_EQ(g.write_at({"J", 1}, 0).error(), std::errc::invalid_argument);
    file h = std::move(g);
    EXPECT_EQ(h.write_at({"J", 1}, 0).error(), std::errc::invalid_argument);
    EXPECT_EQ(f->read_at(buf, 0).value(), 5u);
  });
  ::unlink(path.c_str());
}

// A write_at of nothing still needs an open file, as a read_at of nothing
// does (and as a socket's write of nothing, or Go's WriteAt): on a closed
// or empty file it returned success without looking.
TEST_P(Files, WriteAtOfNothingOnAClosedFileIsBadFileDescriptor) {
  const std::string path = temp_path("empty-write");
  Run([&] {
    auto f = file::open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_TRUE(f) << f.error().message();
    EXPECT_TRUE(f->write_at({}, 0));  // open: nothing to do
    ASSERT_TRUE(f->close());
    char b;
    EXPECT_EQ(f->read_at({&b, 0}, 0).error(), std::errc::bad_file_descriptor);
    std::size_t written = 1;
    auto w = f->write_at({}, 0, &written);
    ASSERT_FALSE(w) << "write_at of nothing on a closed file succeeded";
    EXPECT_EQ(w.error(), std::errc::bad_file_descriptor);
    EXPECT_EQ(written, 0u);
    file empty;
    auto e = empty.write_at({}, 0);
    ASSERT_FALSE(e) << "write_at of nothing on an empty file succeeded";
    EXPECT_EQ(e.error(), std::errc::bad_file_descriptor);
  });
  ::unlink(path.c_str());
}

// A signal handler installed without SA_RESTART (sigaction's default) makes
// a blocking system call fail with EINTR in whichever thread the signal
// lands on. Under epoll a file call runs on a pool thread, and returned
// that EINTR to the fiber (an open of a FIFO waiting for its writer, a
// read on NFS or FUSE); io_uring's never does, nor Go's (it retries
// EINTR). The call is made again instead.
void on_usr2(int) {}

TEST_P(Files, ASignalHandlerWithoutRestartDoesNotFailAFileCall) {
  const std::string fifo = temp_path("eintr-fifo");
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  struct sigaction sa {}, old {};
  sa.sa_handler = on_usr2;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART
  ASSERT_EQ(::sigaction(SIGUSR2, &sa, &old), 0);
  Run([&] {
    auto reader = spawn([&] { return file::open(fifo, O_RDONLY); });  // waits for a writer
    (void)this_fiber::sleep_for(std::chrono::milliseconds(100));
    for (int round = 0; round < 5; ++round) {  // to every thread, the call's among them
      DIR* d = ::opendir("/proc/self/task");
      ASSERT_NE(d, nullptr);
      while (dirent* e = ::readdir(d))
        if (e->d_name[0] != '.') ::syscall(SYS_tgkill, ::getpid(), std::atoi(e->d_name), SIGUSR2);
      ::closedir(d);
      (void)this_fiber::sleep_for(std::chrono::milliseconds(10));
    }
    int w = -1;
    for (int i = 0; i < 1000 && w < 0; ++i) {  // ENXIO until the reader is in open()
      w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      if (w < 0) (void)this_fiber::sleep_for(std::chrono::milliseconds(1));
    }
    auto r = reader.join();
    EXPECT_TRUE(r) << "open: " << r.error().message();
    if (w >= 0) ::close(w);
  });
  ::sigaction(SIGUSR2, &old, nullptr);
  ::unlink(fifo.c_str());
}

// An open of a FIFO waits for its other end, as open(2) does (and Go's
// OpenFile, and Tokio's File::open), on both drivers. io_uring tries an
// open first without blocking, with O_NONBLOCK forced on: a FIFO's write
// end then failed at once with ENXIO ("No such device or address") when no
// reader was there yet, and its read end returned before any writer came.
TEST_P(Files, AnOpenOfAFifoWaitsForItsOtherEnd) {
  const std::string fifo = temp_path("wait-fifo");
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  Run([&] {
    for (int mode : {O_WRONLY, O_RDONLY}) {
      const char* end = mode == O_WRONLY ? "write end" : "read end";
      std::atomic<bool> opened{false};
      auto h = spawn([&] {
        auto f = file::open(fifo, mode);
        opened.store(true);
        return f;
      });
      (void)this_fiber::sleep_for(std::chrono::milliseconds(50));
      EXPECT_FALSE(opened.load()) << "the " << end << " opened without the other";
      // The other end, which does not wait: a write end only once a reader
      // is in open() (ENXIO before).
      const int other_mode = (mode == O_WRONLY ? O_RDONLY : O_WRONLY) | O_NONBLOCK | O_CLOEXEC;
      int other = -1, err = 0;
      for (int i = 0; i < 1000 && other < 0; ++i) {
        other = ::open(fifo.c_str(), other_mode);
        err = errno;  // right after the call
        if (other < 0) (void)this_fiber::sleep_for(std::chrono::milliseconds(1));
      }
      EXPECT_GE(other, 0) << "the other end: " << std::strerror(err);
      auto f = h.join();
      EXPECT_TRUE(f) << "the " << end << ": " << f.error().message();
      if (other >= 0) ::close(other);
    }
  });
  ::unlink(fifo.c_str());
}

// io_uring cancels an open that waits (a FIFO's write end with no reader)
// on a stop request, and when the run ends with it in flight. The kernel
// interrupts it with ERESTARTSYS (512), a code meant never to leave the
// kernel, which io_uring passes on: the call failed with "Unknown error
// 512" instead of operation_canceled. (Under epoll the open waits on the
// blocking pool, which nothing interrupts: see io/file.h.)
TEST_P(Files, AStopRequestCancelsAnOpenThatWaitsUnderIoUring) {
  const std::string fifo = temp_path("stop-fifo");
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  Run([&] {
    if (io::stats().driver != "io_uring") return;
    // O_CREAT: the kernel sends it to io-wq, where it blocks, on any weft.
    for (int flags : {O_WRONLY, O_WRONLY | O_CREAT}) {
      auto h = spawn([&] { return file::open(fifo, flags); });
      (void)this_fiber::sleep_for(std::chrono::milliseconds(20));
      h.request_stop();
      auto f = h.join();
      ASSERT_FALSE(f) << "the write end opened with no reader";
      EXPECT_EQ(f.error(), std::errc::operation_canceled) << f.error().message();
    }
    // And at the end of the run: cancelled, not waited for (a hang here
    // ends in the test's timeout).
    spawn([&] { (void)file::open(fifo, O_WRONLY); }).detach();
    (void)this_fiber::sleep_for(std::chrono::milliseconds(20));
  });
  ::unlink(fifo.c_str());
}

TEST_P(Files, OpenErrorsAreValues) {
  Run([&] {
    auto f = file::open(temp_path("does-not-exist") + "/x", O_RDONLY);
    ASSERT_FALSE(f);
    EXPECT_EQ(f.error(), std::errc::no_such_file_or_directory);
    auto g = file::open(std::string("a\0b", 3), O_RDONLY);
    ASSERT_FALSE(g);
    EXPECT_EQ(g.error(), std::errc::invalid_argument);
  });
}

}  // namespace
}  // namespace weft
