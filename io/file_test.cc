// io/file_test.cc — files through the driver: a write/read round trip at
// offsets, fsync, end of file, open errors. Runs on both drivers (see
// io/BUILD.bazel) over worker counts {1, 2, 4}.
#include <unistd.h>

#include <cstdlib>
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
