// alloc/arena.cc — see alloc/arena.h.
#include "alloc/arena.h"

#include <linux/mempolicy.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(WEFT_ASAN)
#include <sanitizer/asan_interface.h>
#endif

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace weft::alloc {

namespace {
#ifdef MAP_HUGE_2MB
constexpr int kHuge2MiB = MAP_HUGE_2MB;
#else
constexpr int kHuge2MiB = 21 << 26;  // log2(2 MiB) << MAP_HUGE_SHIFT
#endif
}  // namespace

const char* to_string(page_backing b) noexcept {
  switch (b) {
    case page_backing::hugetlb: return "hugetlb";
    case page_backing::thp: return "thp";
    case page_backing::small_pages: return "small_pages";
  }
  return "?";
}

page_backing thp_backing() noexcept {
  static const page_backing b = [] {
    FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return page_backing::small_pages;  // no THP in this kernel
    char line[128] = {};
    bool ok = std::fgets(line, sizeof line, f) != nullptr;
    std::fclose(f);
    // The active mode is bracketed: "always [madvise] never".
    if (ok && (std::strstr(line, "[always]") || std::strstr(line, "[madvise]")))
      return page_backing::thp;
    return page_backing::small_pages;
  }();
  return b;
}

std::error_code prefer_node(void* base, std::size_t span, unsigned node_os) noexcept {
  constexpr unsigned kMaskBits = 1024;
  constexpr unsigned kWordBits = 8 * sizeof(unsigned long);
  if (node_os >= kMaskBits) return std::make_error_code(std::errc::invalid_argument);
  unsigned long mask[kMaskBits / kWordBits] = {};
  mask[node_os / kWordBits] |= 1UL << (node_os % kWordBits);
  if (::syscall(SYS_mbind, base, span, MPOL_PREFERRED, mask, kMaskBits + 1, 0) == 0) return {};
  return std::error_code(errno, std::system_category());  // read right after the call
}

std::expected<arena_block, std::error_code> map_arena(std::size_t bytes, int node_os) noexcept {
  arena_block b;
  b.size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (b.size == 0) b.size = kHugePage;
  // Reserved huge pages first: they come whole and aligned.
  void* p = ::mmap(nullptr, b.size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | kHuge2MiB, -1, 0);
  if (p != MAP_FAILED) {
    b.base = static_cast<std::byte*>(p);
    b.backing = page_backing::hugetlb;
  } else {
    // Small pages, over-mapped by one huge page and trimmed to a 2 MiB
    // aligned range, so THP can back every part of it.
    const std::size_t span = b.size + kHugePage;
    p = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return std::unexpected(std::error_code(errno, std::system_category()));
    auto* raw = static_cast<std::byte*>(p);
    auto addr = reinterpret_cast<std::uintptr_t>(raw);
    auto* aligned = reinterpret_cast<std::byte*>((addr + kHugePage - 1) & ~(kHugePage - 1));
    if (aligned > raw) ::munmap(raw, static_cast<std::size_t>(aligned - raw));
    std::byte* end = aligned + b.size;
    if (end < raw + span) ::munmap(end, static_cast<std::size_t>(raw + span - end));
    b.base = aligned;
    b.backing = page_backing::small_pages;
    if (thp_backing() == page_backing::thp && ::madvise(b.base, b.size, MADV_HUGEPAGE) == 0)
      b.backing = page_backing::thp;
  }
  if (node_os >= 0) b.bind_error = prefer_node(b.base, b.size, static_cast<unsigned>(node_os));
#if defined(WEFT_ASAN)
  // Fresh memory: whatever ASan's shadow still says about these addresses
  // (a fiber stack unmapped here before, say) is stale. The kernel writes
  // received data into the arena, which ASan never sees as a write.
  __asan_unpoison_memory_region(b.base, b.size);
#endif
  return b;
}

void unmap_arena(const arena_block& b) noexcept {
  if (b.base) ::munmap(b.base, b.size);
}

}  // namespace weft::alloc
