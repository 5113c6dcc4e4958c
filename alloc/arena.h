// alloc/arena.h
//
// Memory for long-lived, per-worker buffers (the io_uring receive-buffer
// pool; see *NUMA arenas* in DESIGN.md): mapped in whole 2 MiB units,
// aligned to 2 MiB, preferring a NUMA node, and backed by huge pages when
// the machine gives them — fewer TLB misses on buffers every connection
// touches. The backing actually set up is recorded, so stats can say:
//
//   hugetlb      MAP_HUGETLB from the reserved pool (vm.nr_hugepages);
//                taken at map time, so a short pool fails the map, never a
//                later touch
//   thp          transparent huge pages requested with MADV_HUGEPAGE (THP in
//                `always` or `madvise` mode); the kernel backs the range
//                with 2 MiB pages as it can
//   small_pages  neither (THP `never`, or no THP at all)
//
// The node preference is mbind(MPOL_PREFERRED) before first touch: pages
// come from that node while it has free memory, from another one after
// (BIND would turn a full node into SIGBUS). It is advice; a refusal is
// returned in the block (bind_error), not fatal. stack_pool binds its
// regions with the same prefer_node().
//
// Channel buffers and timer nodes, which DESIGN.md also puts in arenas, come
// from mimalloc: its per-thread heaps already place them on the node of
// the worker that allocates them (first touch on a pinned thread), and a
// second small-object allocator would buy nothing measurable here.
//
// Who calls what: any thread; blocks are independent.
#pragma once

#include <cstddef>
#include <cstdint>
#include <expected>
#include <system_error>

namespace weft::alloc {

enum class page_backing : std::uint8_t { hugetlb, thp, small_pages };
const char* to_string(page_backing b) noexcept;

struct arena_block {
  std::byte* base = nullptr;
  std::size_t size = 0;  // a multiple of kHugePage
  page_backing backing = page_backing::small_pages;
  std::error_code bind_error;  // from prefer_node(); empty if bound or not asked
};

inline constexpr std::size_t kHugePage = std::size_t{2} << 20;

// Maps at least `bytes` (rounded up to kHugePage), zero-filled. node_os < 0:
// no node preference. Fails only if no memory can be mapped at all.
std::expected<arena_block, std::error_code> map_arena(std::size_t bytes, int node_os) noexcept;
void unmap_arena(const arena_block& b) noexcept;

// mbind(MPOL_PREFERRED) of [base, base + span) to the kernel's node
// `node_os`. Call before the pages are first touched.
std::error_code prefer_node(void* base, std::size_t span, unsigned node_os) noexcept;

// What MADV_HUGEPAGE gets on this machine: thp if THP is in `always` or
// `madvise` mode, small_pages otherwise (read once).
page_backing thp_backing() noexcept;

}  // namespace weft::alloc
