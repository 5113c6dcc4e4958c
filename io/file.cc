// io/file.cc — io::file over io::perform(); see io/file.h.
#include "io/file.h"

#include <unistd.h>

namespace weft::io {

file& file::operator=(file&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

file::~file() {
  if (fd_ >= 0) ::close(fd_);
}

result<file> file::open(const std::string& path, int flags, int mode) {
  if (path.find('\0') != std::string::npos)
    return std::unexpected(std::make_error_code(std::errc::invalid_argument));
  op o{.kind = op_kind::openat,
       .buf = const_cast<char*>(path.c_str()),  // read only, until the op completes
       .offset = static_cast<std::uint64_t>(mode),
       .flags = flags};
  auto r = perform(o, clock::time_point::max(), "file open");
  if (!r) return std::unexpected(r.error());
  return file(*r);
}

result<std::size_t> file::read_at(std::span<char> buf, std::uint64_t offset) {
  op o{.kind = op_kind::read_at, .fd = fd_, .buf = buf.data(), .len = buf.size(), .offset = offset};
  auto r = perform(o, clock::time_point::max(), "file read");
  if (!r) return std::unexpected(r.error());
  return static_cast<std::size_t>(*r);
}

result<void> file::write_at(std::span<const char> buf, std::uint64_t offset) {
  while (!buf.empty()) {
    op o{.kind = op_kind::write_at,
         .fd = fd_,
         .buf = const_cast<char*>(buf.data()),  // read only
         .len = buf.size(),
         .offset = offset};
    auto r = perform(o, clock::time_point::max(), "file write");
    if (!r) return std::unexpected(r.error());
    if (*r == 0) return std::unexpected(std::make_error_code(std::errc::io_error));
    buf = buf.subspan(static_cast<std::size_t>(*r));
    offset += static_cast<std::uint64_t>(*r);
  }
  return {};
}

result<void> file::fsync(bool data_only) {
  op o{.kind = op_kind::fsync, .fd = fd_, .flags = data_only ? 1 : 0};
  auto r = perform(o, clock::time_point::max(), "file fsync");
  if (!r) return std::unexpected(r.error());
  return {};
}

result<void> file::close() {
  if (fd_ < 0) return {};
  op o{.kind = op_kind::close, .fd = std::exchange(fd_, -1)};
  auto r = perform(o, clock::time_point::max(), "file close");
  if (!r) return std::unexpected(r.error());
  return {};
}

}  // namespace weft::io
