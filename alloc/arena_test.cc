// alloc/arena_test.cc — arenas for buffer pools: whole, aligned 2 MiB
// units; the huge-page backing they report is the one the kernel applied;
// the node preference is set, and a refused one is reported, not fatal.
#include "alloc/arena.h"

#include <linux/mempolicy.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace weft::alloc {
namespace {

// The VmFlags line of the mapping that contains `p` (/proc/self/smaps).
std::string vm_flags_of(const void* p) {
  FILE* f = std::fopen("/proc/self/smaps", "r");
  if (!f) return "";
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  char line[512];
  bool inside = false;
  std::string flags;
  while (std::fgets(line, sizeof line, f)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && std::strchr(line, '-') < std::strchr(line, ' ')) {
      inside = addr >= lo && addr < hi;
    } else if (inside && std::strncmp(line, "VmFlags:", 8) == 0) {
      flags = line + 8;
      break;
    }
  }
  std::fclose(f);
  return flags;
}

TEST(Arena, MapsWholeAlignedHugePageUnitsOfZeroedMemory) {
  auto b = map_arena(5 << 20, -1);
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(b->size, std::size_t{6} << 20);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b->base) % kHugePage, 0u);
  for (std::size_t i = 0; i < b->size; i += 4096) {
    EXPECT_EQ(b->base[i], std::byte{0});
    b->base[i] = std::byte{1};
  }
  EXPECT_FALSE(b->bind_error);
  unmap_arena(*b);
}

TEST(Arena, TheBackingItReportsIsTheOneTheKernelApplied) {
  auto b = map_arena(kHugePage, -1);
  ASSERT_TRUE(b);
  b->base[0] = std::byte{1};
  const std::string flags = vm_flags_of(b->base);
  ASSERT_FALSE(flags.empty()) << "mapping not found in /proc/self/smaps";
  switch (b->backing) {
    case page_backing::hugetlb:
      EXPECT_NE(flags.find(" ht"), std::string::npos) << flags;  // VM_HUGETLB
      break;
    case page_backing::thp:
      EXPECT_EQ(thp_backing(), page_backing::thp);
      EXPECT_NE(flags.find(" hg"), std::string::npos) << flags;  // VM_HUGEPAGE
      break;
    case page_backing::small_pages:
      EXPECT_EQ(thp_backing(), page_backing::small_pages) << "THP is available but was not asked for";
      break;
  }
  EXPECT_STRNE(to_string(b->backing), "?");
  unmap_arena(*b);
}

// MPOL_PREFERRED on node 0, which every Linux machine has.
TEST(Arena, PrefersTheNodeItIsGiven) {
  auto b = map_arena(kHugePage, 0);
  ASSERT_TRUE(b);
  if (b->bind_error) GTEST_SKIP() << "mbind refused here: " << b->bind_error.message();
  int mode = -1;
  unsigned long mask[16] = {};
  ASSERT_EQ(syscall(SYS_get_mempolicy, &mode, mask, 16 * 8 * sizeof(unsigned long),
                    static_cast<void*>(b->base), MPOL_F_ADDR),
            0)
      << std::strerror(errno);
  EXPECT_EQ(mode, MPOL_PREFERRED);
  EXPECT_EQ(mask[0] & 1UL, 1UL);
  unmap_arena(*b);
}

TEST(Arena, ANodeTheKernelDoesNotHaveIsReportedAndTheMemoryStillWorks) {
  auto b = map_arena(kHugePage, 1000);  // no machine here has it
  ASSERT_TRUE(b);
  EXPECT_TRUE(b->bind_error);
  b->base[b->size - 1] = std::byte{7};
  EXPECT_EQ(b->base[b->size - 1], std::byte{7});
  unmap_arena(*b);
  EXPECT_EQ(prefer_node(nullptr, 0, 5000), std::errc::invalid_argument);  // beyond any mask
}

}  // namespace
}  // namespace weft::alloc
