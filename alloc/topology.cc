// alloc/topology.cc
//
// The one file that includes hwloc.h (see *One owner file per third-party
// library* in CONVENTIONS.md). It turns an hwloc topology — this machine's,
// a synthetic description, or an exported XML file — into the flat list of
// PUs that topology.h describes, and binds threads with hwloc.
//
// Invariants:
//   - pus_ is sorted by os_index; each field is a logical index that is only
//     ever compared for equality with the same field of another PU.
//   - Every hwloc topology opened here is destroyed before returning, except
//     the process-wide binding topology (binding_topology()), which is
//     loaded once, never modified, and lives until exit.
//
// Who calls what: every function, any thread (topology is immutable).
#include "alloc/topology.h"

#include <hwloc.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <set>

#include "alloc/check.h"

namespace weft::alloc {
namespace {

// Owns one hwloc topology.
struct hwloc_handle {
  hwloc_topology_t t_ = nullptr;
  hwloc_handle() {
    if (hwloc_topology_init(&t_) != 0) t_ = nullptr;
  }
  ~hwloc_handle() {
    if (t_ != nullptr) hwloc_topology_destroy(t_);
  }
  hwloc_handle(const hwloc_handle&) = delete;
  hwloc_handle& operator=(const hwloc_handle&) = delete;
};

unsigned ancestor_index(hwloc_topology_t t, hwloc_obj_t pu_obj,
                        hwloc_obj_type_t type, unsigned fallback) {
  hwloc_obj_t a = hwloc_get_ancestor_obj_by_type(t, type, pu_obj);
  return a != nullptr ? a->logical_index : fallback;
}

// In hwloc 2 NUMA nodes hang off the tree as memory children, so a PU's
// node comes from its nodeset rather than from its ancestors.
unsigned numa_index(hwloc_topology_t t, hwloc_obj_t pu_obj) {
  const int os =
      pu_obj->nodeset != nullptr ? hwloc_bitmap_first(pu_obj->nodeset) : -1;
  if (os < 0) return 0;
  hwloc_obj_t node =
      hwloc_get_numanode_obj_by_os_index(t, static_cast<unsigned>(os));
  return node != nullptr ? node->logical_index : 0;
}

std::vector<pu> collect_pus(hwloc_topology_t t) {
  std::vector<pu> out;
  const int n = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PU);
  for (int i = 0; i < n; ++i) {
    hwloc_obj_t obj =
        hwloc_get_obj_by_type(t, HWLOC_OBJ_PU, static_cast<unsigned>(i));
    pu p;
    p.os_index = obj->os_index;
    p.core = ancestor_index(t, obj, HWLOC_OBJ_CORE, obj->logical_index);
    p.package = ancestor_index(t, obj, HWLOC_OBJ_PACKAGE, 0);
    p.l2 = ancestor_index(t, obj, HWLOC_OBJ_L2CACHE, p.core);
    p.l3 = ancestor_index(t, obj, HWLOC_OBJ_L3CACHE, p.package);
    p.numa = numa_index(t, obj);
    p.numa_os = obj->nodeset != nullptr ? hwloc_bitmap_first(obj->nodeset) : -1;
    out.push_back(p);
  }
  std::sort(out.begin(), out.end(),
            [](const pu& a, const pu& b) { return a.os_index < b.os_index; });
  return out;
}

template <class Field>
std::size_t count_distinct(const std::vector<pu>& pus, Field field) {
  std::set<unsigned> seen;
  for (const pu& p : pus) seen.insert(p.*field);
  return seen.size();
}

// This system, discovered without moving the calling thread: hwloc's x86
// backend binds the thread to each CPU in turn to run cpuid there, which on
// a loaded machine waits for every CPU's run queue (up to seconds at start
// of weft::run, measured under load); Linux's sysfs backend, which stays,
// reports the same packages, caches, cores and NUMA nodes.
constexpr unsigned long kDiscoveryFlags =
    HWLOC_TOPOLOGY_FLAG_IS_THISSYSTEM | HWLOC_TOPOLOGY_FLAG_DONT_CHANGE_BINDING;

std::string errno_text(int err) { return std::system_category().message(err); }

std::string no_restriction(hwloc_topology_t) { return {}; }

// Loads a topology whose backend `configure` selects, then lets `trim`
// narrow it; the PUs, or what went wrong. Each step returns "" or an error.
template <class Configure, class Trim = decltype(&no_restriction)>
std::expected<std::vector<pu>, std::string> load_pus(
    Configure configure, Trim trim = &no_restriction) {
  hwloc_handle h;
  if (h.t_ == nullptr) return std::unexpected("hwloc_topology_init failed");
  if (std::string err = configure(h.t_); !err.empty())
    return std::unexpected(err);
  if (hwloc_topology_load(h.t_) != 0)
    return std::unexpected("hwloc_topology_load failed: " + errno_text(errno));
  if (std::string err = trim(h.t_); !err.empty()) return std::unexpected(err);
  std::vector<pu> pus = collect_pus(h.t_);
  if (pus.empty()) return std::unexpected("hwloc found no processing units");
  return pus;
}

bool affinity_of_this_thread(cpu_set_t* set) {
  CPU_ZERO(set);
  return sched_getaffinity(0, sizeof *set, set) == 0;
}

// Restricts the system topology to the calling thread's affinity mask.
std::string restrict_to_affinity(hwloc_topology_t t) {
  cpu_set_t mask;
  if (!affinity_of_this_thread(&mask))
    return "sched_getaffinity failed: " + errno_text(errno);
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  if (set == nullptr) return "hwloc_bitmap_alloc failed";
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
    if (CPU_ISSET(cpu, &mask))
      hwloc_bitmap_set(set, static_cast<unsigned>(cpu));
  const int rc = hwloc_topology_restrict(t, set, 0);
  const int err = errno;
  hwloc_bitmap_free(set);
  return rc == 0 ? std::string()
                 : "hwloc_topology_restrict failed: " + errno_text(err);
}

// The fallback: one PU per CPU of the affinity mask, nothing shared.
std::vector<pu> flat_pus() {
  cpu_set_t mask;
  std::vector<pu> out;
  WEFT_CHECK(affinity_of_this_thread(&mask),
             "topology::discover: sched_getaffinity failed");
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    const auto i = static_cast<unsigned>(out.size());
    out.push_back(pu{static_cast<unsigned>(cpu), i, i, 0, 0, 0});
  }
  return out;
}

// The topology hwloc_set_cpubind needs: this system, loaded once.
hwloc_topology_t binding_topology() {
  static hwloc_topology_t t = [] {
    hwloc_topology_t topo = nullptr;
    if (hwloc_topology_init(&topo) != 0) return hwloc_topology_t{nullptr};
    if (hwloc_topology_set_flags(topo, kDiscoveryFlags) != 0 ||
        hwloc_topology_load(topo) != 0) {
      hwloc_topology_destroy(topo);
      return hwloc_topology_t{nullptr};
    }
    return topo;
  }();
  return t;
}

std::error_code pin_with_affinity(unsigned os_index) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (os_index >= CPU_SETSIZE)
    return std::make_error_code(std::errc::invalid_argument);
  CPU_SET(os_index, &set);
  const int rc = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  return rc == 0 ? std::error_code()
                 : std::error_code(rc, std::system_category());
}

}  // namespace

topology topology::discover() {
  auto pus = load_pus(
      [](hwloc_topology_t t) -> std::string {
        if (hwloc_topology_set_flags(t, kDiscoveryFlags) != 0)
          return "hwloc_topology_set_flags failed: " + errno_text(errno);
        return {};
      },
      &restrict_to_affinity);
  topology topo;
  if (pus.has_value()) {
    topo.pus_ = std::move(*pus);
  } else {
    topo.pus_ = flat_pus();
    std::fprintf(stderr,
                 "weft: topology: hwloc discovery failed (%s); using %zu PUs "
                 "from sched_getaffinity as a flat list\n",
                 pus.error().c_str(), topo.pus_.size());
  }
  topo.numa_nodes_ =
      static_cast<unsigned>(count_distinct(topo.pus_, &pu::numa));
  return topo;
}

std::expected<topology, std::string> topology::from_synthetic(
    std::string_view desc) {
  const std::string text(desc);
  auto pus = load_pus([&text](hwloc_topology_t t) -> std::string {
    if (hwloc_topology_set_synthetic(t, text.c_str()) != 0)
      return "hwloc rejected the synthetic topology \"" + text + "\"";
    return {};
  });
  if (!pus.has_value()) return std::unexpected(pus.error());
  topology topo;
  topo.pus_ = std::move(*pus);
  topo.numa_nodes_ =
      static_cast<unsigned>(count_distinct(topo.pus_, &pu::numa));
  topo.synthetic_ = true;
  return topo;
}

std::expected<topology, std::string> topology::from_xml(
    const std::string& path) {
  auto pus = load_pus([&path](hwloc_topology_t t) -> std::string {
    if (hwloc_topology_set_xml(t, path.c_str()) != 0)
      return "hwloc cannot read the XML topology " + path + ": " +
             errno_text(errno);
    return {};
  });
  if (!pus.has_value()) return std::unexpected(pus.error());
  topology topo;
  topo.pus_ = std::move(*pus);
  topo.numa_nodes_ =
      static_cast<unsigned>(count_distinct(topo.pus_, &pu::numa));
  topo.synthetic_ = true;  // another machine's: nothing here to pin to
  return topo;
}

std::string topology::describe() const {
  auto part = [](std::size_t n, const char* one, const char* many) {
    return std::to_string(n) + " " + (n == 1 ? one : many);
  };
  return part(pus_.size(), "PU", "PUs") + ", " +
         part(count_distinct(pus_, &pu::core), "core", "cores") + ", " +
         part(count_distinct(pus_, &pu::l3), "L3", "L3s") + ", " +
         part(numa_nodes_, "NUMA node", "NUMA nodes") + ", " +
         part(count_distinct(pus_, &pu::package), "package", "packages");
}

distance topology::between(unsigned a, unsigned b) const {
  WEFT_CHECK(a < pus_.size() && b < pus_.size(),
             "topology::between: no such PU");
  const pu& x = pus_[a];
  const pu& y = pus_[b];
  if (x.core == y.core) return distance::same_core;
  if (x.l2 == y.l2) return distance::shared_l2;
  if (x.l3 == y.l3) return distance::shared_l3;
  if (x.numa == y.numa) return distance::same_numa;
  if (x.package == y.package) return distance::same_package;
  return distance::remote;
}

std::vector<std::vector<unsigned>> topology::steal_groups(unsigned i) const {
  WEFT_CHECK(i < pus_.size(), "topology::steal_groups: no such PU");
  constexpr auto kDistances = static_cast<std::size_t>(distance::remote) + 1;
  std::array<std::vector<unsigned>, kDistances> rings;
  for (unsigned j = 0; j < pus_.size(); ++j)
    if (j != i) rings[static_cast<std::size_t>(between(i, j))].push_back(j);
  std::vector<std::vector<unsigned>> out;
  for (auto& ring : rings)
    if (!ring.empty()) out.push_back(std::move(ring));
  return out;
}

std::error_code topology::pin_current_thread(unsigned i) const {
  if (synthetic_)
    return std::make_error_code(std::errc::operation_not_supported);
  if (i >= pus_.size())
    return std::make_error_code(std::errc::invalid_argument);
  hwloc_topology_t t = binding_topology();
  if (t == nullptr) return pin_with_affinity(pus_[i].os_index);
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  if (set == nullptr) return std::make_error_code(std::errc::not_enough_memory);
  hwloc_bitmap_only(set, pus_[i].os_index);
  const int rc =
      hwloc_set_cpubind(t, set, HWLOC_CPUBIND_THREAD | HWLOC_CPUBIND_STRICT);
  const int err = errno;
  hwloc_bitmap_free(set);
  return rc == 0 ? std::error_code()
                 : std::error_code(err, std::system_category());
}

topology topology::first(unsigned n) const {
  WEFT_CHECK(n >= 1, "topology::first: n must be at least 1");
  topology out = *this;
  if (n < out.pus_.size()) out.pus_.resize(n);
  out.numa_nodes_ = static_cast<unsigned>(count_distinct(out.pus_, &pu::numa));
  return out;
}

}  // namespace weft::alloc
