// io/file.h
//
// Regular files through the worker's I/O driver: with io_uring, open,
// read_at, write_at, fsync and close are ring operations and park only the
// fiber; with the epoll driver (files have no readiness) they are system
// calls on the blocking pool (io/blocking.h), so they too park only the
// fiber, and run to completion even after a stop request. Re-exported as
// weft::file by runtime/net.h.
//
//   auto f = weft::file::open("/tmp/x", O_RDWR | O_CREAT | O_TRUNC, 0644);
//   f->write_at(data, 0); f->fsync(); f->read_at(buf, 0);
//
// Invariants:
//   - A file owns its descriptor through an fd_state (io/fd_state.h), as a
//     socket does, so close() may run while other fibers are in read_at(),
//     write_at() or fsync() on it: calls that start after it fail with
//     std::errc::bad_file_descriptor; calls in flight finish (or are
//     cancelled where the kernel can), and the descriptor is closed when the
//     last of them has left, so none of them ever acts on a file that
//     reused its number. write_at() stops between its partial writes.
//   - close() with nothing in flight goes through the driver; the last call
//     to leave, the destructor (which cannot park on an unwinding fiber),
//     and close() off a fiber (a plain thread, a blocking() call: no
//     driver) use a plain close(2). Moving transfers the state.
#pragma once

#include <fcntl.h>

#include <cstdint>
#include <source_location>
#include <span>
#include <string>
#include <utility>

#include "io/driver.h"

namespace weft::io {

class fd_state;

class file {
 public:
  file() = default;
  explicit file(int fd);  // adopts fd (-1: an empty file)
  file(file&& o) noexcept
      : st_(std::exchange(o.st_, nullptr)), stream_(std::exchange(o.stream_, false)),
        append_(std::exchange(o.append_, false)) {}
  file& operator=(file&& o) noexcept;
  ~file() { drop(); }

  // flags as open(2) (O_CLOEXEC is always added); mode for O_CREAT. An
  // open that waits under open(2) (a FIFO's end for the other end, unless
  // O_NONBLOCK) waits here too, on both drivers.
  [[nodiscard]] static result<file> open(const std::string& path, int flags, int mode = 0644,
                                           std::source_location where = std::source_location::current());

  // Reads up to buf.size() bytes at `offset`; 0 at end of file. An offset
  // past what off_t holds (2^63 - 1) is std::errc::invalid_argument. A file
  // without offsets (a FIFO, or a pipe, socket or terminal adopted by
  // file(fd)) fails read_at and write_at with ESPIPE, as pread(2) does.
  [[nodiscard]] result<std::size_t> read_at(std::span<char> buf, std::uint64_t offset,
                                            std::source_location where = std::source_location::current());
  // Writes all of buf at `offset` (several writes if one is short). Past
  // the file size limit (RLIMIT_FSIZE) it is std::errc::file_too_large,
  // with what fitted written (never SIGXFSZ: see ignore_write_signals_once()).
  // A file opened with O_APPEND (by open(), or adopted) is
  // std::errc::invalid_argument, nothing written: the kernel would append
  // whatever the offset (pwrite(2) BUGS), as Go's WriteAt refuses it.
  // *written (if given) says how many bytes went, on an error too (a stop
  // request or a full disk part-way; Go's WriteAt returns that count with
  // its error), so a caller can tell what the file now holds.
  [[nodiscard]] result<void> write_at(std::span<const char> buf, std::uint64_t offset,
                                       std::size_t* written = nullptr,
                                       std::source_location where = std::source_location::current());
  [[nodiscard]] result<void> fsync(bool data_only = false, std::source_location where = std::source_location::current());
  [[nodiscard]] result<void> close(std::source_location where = std::source_location::current());

  bool is_open() const noexcept;
  int native_handle() const noexcept;  // -1 when empty or closed

 private:
  void drop() noexcept;
  fd_state* st_ = nullptr;  // null when empty
  // The descriptor cannot seek (lseek(2): ESPIPE). io_uring ignores the
  // offset of a read or write on such a file and reads the stream, where
  // pread(2) (the epoll driver's) fails: checked here, once, for both.
  bool stream_ = false;
  // Opened with O_APPEND: the kernel ignores a write's offset (write_at).
  bool append_ = false;
};

}  // namespace weft::io
