// alloc/topology_test.cc
//
// Steal order and placement on machines we do not have (hwloc synthetic
// topologies and XML exports), and discovery and pinning on this one.
//
// The XML round trip needs an exported file; the test makes one with hwloc
// itself, which is why this test (and only it, besides topology.cc)
// includes hwloc.h.
#include "alloc/topology.h"

#include <gtest/gtest.h>
#include <hwloc.h>
#include <sched.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace weft::alloc {
namespace {

using groups = std::vector<std::vector<unsigned>>;

std::vector<unsigned> range(unsigned from, unsigned to) {
  std::vector<unsigned> out;
  for (unsigned i = from; i < to; ++i) out.push_back(i);
  return out;
}

void expect_same_pus(const topology& a, const topology& b) {
  ASSERT_EQ(a.pus().size(), b.pus().size());
  for (std::size_t i = 0; i < a.pus().size(); ++i) {
    const pu& x = a.pus()[i];
    const pu& y = b.pus()[i];
    EXPECT_EQ(x.os_index, y.os_index) << "PU " << i;
    EXPECT_EQ(x.core, y.core) << "PU " << i;
    EXPECT_EQ(x.l2, y.l2) << "PU " << i;
    EXPECT_EQ(x.l3, y.l3) << "PU " << i;
    EXPECT_EQ(x.numa, y.numa) << "PU " << i;
    EXPECT_EQ(x.package, y.package) << "PU " << i;
  }
}

TEST(Topology, OnTwoPackagesTheSamePackageComesBeforeTheOther) {
  auto t = topology::from_synthetic("pack:2 core:4 pu:1");
  ASSERT_TRUE(t.has_value()) << t.error();
  ASSERT_EQ(t->pus().size(), 8u);
  EXPECT_EQ(t->steal_groups(0), (groups{{1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(t->steal_groups(5), (groups{{4, 6, 7}, {0, 1, 2, 3}}));
}

TEST(Topology, TheSmtSiblingComesFirstThenTheSharedL3ThenTheOtherPackage) {
  auto t = topology::from_synthetic("pack:2 numa:1 l3:1 core:4 pu:2");
  ASSERT_TRUE(t.has_value()) << t.error();
  ASSERT_EQ(t->pus().size(), 16u);
  EXPECT_EQ(t->steal_groups(0), (groups{{1}, range(2, 8), range(8, 16)}));
  EXPECT_EQ(t->between(0, 1), distance::same_core);
  EXPECT_EQ(t->between(0, 2), distance::shared_l3);
  EXPECT_EQ(t->between(0, 8), distance::remote);
  EXPECT_EQ(t->numa_nodes(), 2u);
  EXPECT_EQ(t->describe(), "16 PUs, 8 cores, 2 L3s, 2 NUMA nodes, 2 packages");
}

TEST(Topology, SeveralNumaNodesInOnePackageComeBeforeTheRemotePackage) {
  auto t = topology::from_synthetic("pack:2 numa:2 l3:1 core:2 pu:1");
  ASSERT_TRUE(t.has_value()) << t.error();
  ASSERT_EQ(t->pus().size(), 8u);
  EXPECT_EQ(t->steal_groups(0), (groups{{1}, {2, 3}, range(4, 8)}));
  EXPECT_EQ(t->between(0, 2), distance::same_package);
  EXPECT_EQ(t->numa_nodes(), 4u);
}

TEST(Topology, FirstKeepsTheFirstPus) {
  auto t = topology::from_synthetic("pack:2 numa:1 l3:1 core:4 pu:2");
  ASSERT_TRUE(t.has_value()) << t.error();
  topology four = t->first(4);
  ASSERT_EQ(four.pus().size(), 4u);
  EXPECT_EQ(four.numa_nodes(), 1u);
  EXPECT_EQ(four.steal_groups(0), (groups{{1}, {2, 3}}));
  EXPECT_EQ(t->first(100).pus().size(), 16u);
}

TEST(Topology, ABadSyntheticDescriptionIsAnError) {
  auto t = topology::from_synthetic("pack:2 bogus:3");
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.error().find("bogus"), std::string::npos) << t.error();
}

TEST(Topology, DiscoverFindsEveryCpuOfTheAffinityMask) {
  cpu_set_t mask;
  ASSERT_EQ(sched_getaffinity(0, sizeof mask, &mask), 0);
  topology t = topology::discover();
  ASSERT_EQ(t.pus().size(), static_cast<std::size_t>(CPU_COUNT(&mask)));
  for (const pu& p : t.pus()) EXPECT_TRUE(CPU_ISSET(p.os_index, &mask));
  EXPECT_GE(t.numa_nodes(), 1u);
  EXPECT_FALSE(t.describe().empty());
}

TEST(Topology, PinningWorksHereAndIsRefusedOnASyntheticMachine) {
  topology here = topology::discover();
  std::error_code pinned;
  cpu_set_t after;
  CPU_ZERO(&after);
  // A thread of its own, so the test's main thread keeps its affinity.
  std::thread([&] {
    pinned = here.pin_current_thread(0);
    sched_getaffinity(0, sizeof after, &after);
  }).join();
  EXPECT_FALSE(pinned) << pinned.message();
  EXPECT_EQ(CPU_COUNT(&after), 1);
  EXPECT_TRUE(CPU_ISSET(here.pus()[0].os_index, &after));
  EXPECT_EQ(here.pin_current_thread(here.pus().size()),
            std::errc::invalid_argument);

  auto synthetic = topology::from_synthetic("pack:1 core:2 pu:1");
  ASSERT_TRUE(synthetic.has_value()) << synthetic.error();
  EXPECT_EQ(synthetic->pin_current_thread(0),
            std::errc::operation_not_supported);
}

// Writes the XML export of a synthetic topology, as `lstopo file.xml` would.
bool export_synthetic_xml(const char* desc, const std::string& path) {
  hwloc_topology_t t = nullptr;
  if (hwloc_topology_init(&t) != 0) return false;
  const bool ok = hwloc_topology_set_synthetic(t, desc) == 0 &&
                  hwloc_topology_load(t) == 0 &&
                  hwloc_topology_export_xml(t, path.c_str(), 0) == 0;
  hwloc_topology_destroy(t);
  return ok;
}

TEST(Topology, AnXmlExportLoadsBackAsTheSameMachine) {
  const char* desc = "pack:2 numa:1 l3:1 core:4 pu:2";
  const std::string path = testing::TempDir() + "/weft_topology_test.xml";
  ASSERT_TRUE(export_synthetic_xml(desc, path));
  auto from_xml = topology::from_xml(path);
  ASSERT_TRUE(from_xml.has_value()) << from_xml.error();
  auto synthetic = topology::from_synthetic(desc);
  ASSERT_TRUE(synthetic.has_value()) << synthetic.error();
  expect_same_pus(*from_xml, *synthetic);
  EXPECT_EQ(from_xml->steal_groups(0), synthetic->steal_groups(0));
  EXPECT_EQ(from_xml->pin_current_thread(0),
            std::errc::operation_not_supported);
  std::remove(path.c_str());
}

TEST(Topology, AMissingXmlFileIsAnError) {
  auto t = topology::from_xml(testing::TempDir() + "/no_such_topology.xml");
  EXPECT_FALSE(t.has_value());
}

}  // namespace
}  // namespace weft::alloc
