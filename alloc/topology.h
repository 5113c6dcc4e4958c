// alloc/topology.h
//
// The machine as the scheduler sees it: the processing units (PUs) that
// workers run on and how far apart they are. Discovered with hwloc (the only
// file that includes hwloc.h is alloc/topology.cc), or built from an hwloc
// synthetic description or exported XML so tests can place workers on
// machines we do not have ("pack:2 numa:1 l3:1 core:4 pu:1").
//
// Steal order: a worker looks for work first on the PUs nearest to it —
// same core (SMT sibling), then shared L2, shared L3, same NUMA node, same
// package, then the rest. steal_groups(i) returns those rings, nearest first;
// within a ring the scheduler starts at a random victim.
//
// Immutable after construction; every method may be called from any thread.
#pragma once

#include <cstdint>
#include <expected>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace weft::alloc {

struct pu {
  unsigned os_index = 0;  // the CPU number the kernel uses
  unsigned core = 0;      // logical index of its core
  unsigned l2 = 0;        // logical index of its L2 (or its core if none)
  unsigned l3 = 0;        // logical index of its L3 (or its package if none)
  unsigned numa = 0;      // logical index of its NUMA node
  int numa_os = -1;       // the kernel's number for that node (-1: unknown)
  unsigned package = 0;   // logical index of its package
};

// Distance classes, nearest first.
enum class distance : std::uint8_t {
  same_core = 0,
  shared_l2 = 1,
  shared_l3 = 2,
  same_numa = 3,
  same_package = 4,
  remote = 5,
};

class topology {
 public:
  // The PUs of the calling process's cpuset (sched_getaffinity), in OS index
  // order. If hwloc fails, one flat PU list from sched_getaffinity with one
  // log line.
  static topology discover();
  // An hwloc synthetic description, e.g. "pack:2 numa:1 l3:1 core:4 pu:2".
  static std::expected<topology, std::string> from_synthetic(std::string_view desc);
  // An hwloc XML export (lstopo foo.xml).
  static std::expected<topology, std::string> from_xml(const std::string& path);

  const std::vector<pu>& pus() const { return pus_; }
  unsigned numa_nodes() const { return numa_nodes_; }
  // A human summary: "2 PUs, 2 cores, 1 L3, 1 NUMA node, 1 package".
  std::string describe() const;

  distance between(unsigned a, unsigned b) const;  // indices into pus()
  // Victims of PU i grouped by distance, nearest first; i is not included;
  // empty groups are omitted.
  std::vector<std::vector<unsigned>> steal_groups(unsigned i) const;

  // Binds the calling thread to pus()[i] with hard affinity. Returns the
  // error (e.g. EINVAL for a CPU outside the cpuset) instead of aborting.
  std::error_code pin_current_thread(unsigned i) const;

  // Restrict to the first n PUs (worker count option); n >= 1.
  topology first(unsigned n) const;

 private:
  std::vector<pu> pus_;
  unsigned numa_nodes_ = 1;
  bool synthetic_ = false;  // pin_current_thread refuses on a synthetic one
};

}  // namespace weft::alloc
