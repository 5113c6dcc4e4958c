// io/file.h
//
// Regular files through the worker's I/O driver: with io_uring, open,
// read_at, write_at, fsync and close are ring operations and park only the
// fiber; with the epoll driver they are plain system calls on the worker
// (files have no readiness). Re-exported as weft::file by runtime/net.h.
//
//   auto f = weft::file::open("/tmp/x", O_RDWR | O_CREAT | O_TRUNC, 0644);
//   f->write_at(data, 0); f->fsync(); f->read_at(buf, 0);
//
// Invariants:
//   - A file owns its descriptor (-1 when closed); moving transfers it; the
//     destructor closes it with a plain close(2) (a destructor cannot park
//     on an unwinding fiber); close() goes through the driver.
#pragma once

#include <fcntl.h>

#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "io/driver.h"

namespace weft::io {

class file {
 public:
  file() = default;
  explicit file(int fd) noexcept : fd_(fd) {}
  file(file&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  file& operator=(file&& o) noexcept;
  ~file();

  // flags as open(2) (O_CLOEXEC is always added); mode for O_CREAT.
  [[nodiscard]] static result<file> open(const std::string& path, int flags, int mode = 0644);

  // Reads up to buf.size() bytes at `offset`; 0 at end of file.
  [[nodiscard]] result<std::size_t> read_at(std::span<char> buf, std::uint64_t offset);
  // Writes all of buf at `offset` (several writes if one is short).
  [[nodiscard]] result<void> write_at(std::span<const char> buf, std::uint64_t offset);
  [[nodiscard]] result<void> fsync(bool data_only = false);
  [[nodiscard]] result<void> close();

  bool is_open() const noexcept { return fd_ >= 0; }
  int native_handle() const noexcept { return fd_; }

 private:
  int fd_ = -1;
};

}  // namespace weft::io
