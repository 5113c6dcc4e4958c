// io/file.cc — io::file over io::perform(); see io/file.h.
#include "io/file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <limits>

#include "io/fd_state.h"

namespace weft::io {

namespace {

// A pipe, FIFO, socket or terminal: no offsets (see file::stream_).
bool cannot_seek(int fd) noexcept {
  return fd >= 0 && ::lseek(fd, 0, SEEK_CUR) < 0 && errno == ESPIPE;  // errno right after the call
}

// Opened with O_APPEND: pwrite(2) and io_uring's write append there,
// whatever the offset (see file::append_).
bool appends(int fd) noexcept {
  int fl = fd >= 0 ? ::fcntl(fd, F_GETFL) : -1;
  return fl >= 0 && (fl & O_APPEND) != 0;
}

std::unexpected<std::error_code> illegal_seek() {
  return std::unexpected(std::make_error_code(std::errc::invalid_seek));
}

// An offset off_t cannot hold: pread(2) and pwrite(2) (the epoll driver's)
// fail it with EINVAL, but io_uring takes an offset of -1 (~0 here) to
// mean "at the file position", and would read or write there and move it.
// Refused here, for both drivers.
bool offset_too_large(std::uint64_t offset) noexcept {
  return offset > static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
}

std::unexpected<std::error_code> invalid_offset() {
  return std::unexpected(std::make_error_code(std::errc::invalid_argument));
}

}  // namespace

file::file(int fd)
    : st_(fd >= 0 ? new fd_state(fd) : nullptr), stream_(cannot_seek(fd)), append_(appends(fd)) {}

file& file::operator=(file&& o) noexcept {
  if (this != &o) {
    drop();
    st_ = std::exchange(o.st_, nullptr);
    stream_ = std::exchange(o.stream_, false);
    append_ = std::exchange(o.append_, false);
  }
  return *this;
}

void file::drop() noexcept {
  if (!st_) return;
  (void)st_->close();
  std::exchange(st_, nullptr)->release();
}

bool file::is_open() const noexcept { return st_ && !st_->closed(); }

int file::native_handle() const noexcept { return is_open() ? st_->fd() : -1; }

result<file> file::open(const std::string& path, int flags, int mode,
                        std::source_location where) {
  if (path.find('\0') != std::string::npos)
    return std::unexpected(std::make_error_code(std::errc::invalid_argument));
  op o{.kind = op_kind::openat,
       .buf = const_cast<char*>(path.c_str()),  // read only, until the op completes
       .offset = static_cast<std::uint64_t>(mode),
       .flags = flags};
  auto r = perform(o, clock::time_point::max(), "file open", where);
  if (!r) return std::unexpected(r.error());
  return file(*r);
}

result<std::size_t> file::read_at(std::span<char> buf, std::uint64_t offset,
                                  std::source_location where) {
  if (stream_ && is_open()) return illegal_seek();
  if (offset_too_large(offset) && is_open()) return invalid_offset();
  op o{.kind = op_kind::read_at, .buf = buf.data(), .len = buf.size(), .offset = offset};
  auto r = perform_on(st_, o, clock::time_point::max(), "file read", where);
  if (!r) return std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}

result<void> file::write_at(std::span<const char> buf, std::uint64_t offset,
                            std::size_t* written, std::source_location where) {
  std::size_t done = 0;
  struct report {
    std::size_t* to;
    const std::size_t& n;
    ~report() {
      if (to) *to = n;
    }
  } tell{written, done};
  if (stream_ && is_open()) return illegal_seek();
  if (offset_too_large(offset) && is_open()) return invalid_offset();
  if (append_ && is_open()) return invalid_offset();  // it would append, not write at offset
  // Nothing to write: no system call, but the file must still be open, as
  // for a read_at of nothing (the kernel's EBADF) and a socket's write.
  if (buf.empty()) return on_fd(st_, [](int) -> result<void> { return {}; });
  while (done < buf.size()) {
    op o{.kind = op_kind::write_at,
         .buf = const_cast<char*>(buf.data() + done),  // read only
         .len = buf.size() - done,
         .offset = offset + done};
    auto r = perform_on(st_, o, clock::time_point::max(), "file write", where);
    if (!r) return std::unexpected(r.error());
    if (*r == 0) return std::unexpected(std::make_error_code(std::errc::io_error));
    done += static_cast<std::size_t>(*r);
  }
  return {};
}

result<void> file::fsync(bool data_only, std::source_location where) {
  op o{.kind = op_kind::fsync, .flags = data_only ? 1 : 0};
  auto r = perform_on(st_, o, clock::time_point::max(), "file fsync", where);
  if (!r) return std::unexpected(r.error());
  return {};
}

result<void> file::close(std::source_location where) {
  if (!st_) return {};
  // Off a fiber (a plain thread, a blocking() call, main's thread after
  // the run) there is no driver to close through: fd_state closes the
  // descriptor itself with close(2). Taking it here would leave it open.
  if (!current_driver()) return st_->close();
  int fd = -1;
  if (auto c = st_->close(&fd); !c || fd < 0) return c;  // closed already, or by the last call
  op o{.kind = op_kind::close, .fd = fd};
  auto r = perform(o, clock::time_point::max(), "file close", where);
  if (!r) return std::unexpected(r.error());
  return {};
}

}  // namespace weft::io
