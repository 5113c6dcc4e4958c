// sched/scheduler_test.cc — what the scheduler derives from the topology
// (here: its stack pool's NUMA layout), on synthetic hwloc topologies of
// machines we do not have.
#include "sched/scheduler.h"

#include <gtest/gtest.h>

#include <vector>

namespace weft::sched {
namespace {

scheduler_options on(const char* synthetic, unsigned workers) {
  scheduler_options o;
  auto t = alloc::topology::from_synthetic(synthetic);
  EXPECT_TRUE(t.has_value()) << synthetic;
  o.topology = *t;
  o.workers = workers;
  o.pin = false;
  return o;
}

TEST(SchedulerStacks, EachWorkersStackCacheIsOnItsNumaNode) {
  auto p = stack_pool_options_for(on("pack:2 numa:1 core:2 pu:1", 4));
  EXPECT_EQ(p.caches, 4u);
  EXPECT_EQ(p.cache_nodes, (std::vector<unsigned>{0, 0, 1, 1}));
  EXPECT_EQ(p.node_os, (std::vector<int>{0, 1}));
}

TEST(SchedulerStacks, FewerWorkersThanProcessingUnitsUseTheFirstOnes) {
  auto p = stack_pool_options_for(on("pack:2 numa:1 core:2 pu:1", 3));
  EXPECT_EQ(p.cache_nodes, (std::vector<unsigned>{0, 0, 1}));
  EXPECT_EQ(p.node_os, (std::vector<int>{0, 1}));
}

TEST(SchedulerStacks, OneNodeMeansNoNumaLayoutAndNoBinding) {
  auto p = stack_pool_options_for(on("pack:1 numa:1 core:4 pu:2", 8));
  EXPECT_EQ(p.caches, 8u);
  EXPECT_TRUE(p.cache_nodes.empty());
  EXPECT_TRUE(p.node_os.empty());
}

// Each worker's I/O buffer pool prefers the node its PU is on.
TEST(SchedulerBuffers, EachWorkerGetsItsPusNode) {
  EXPECT_EQ(worker_node_os(on("pack:2 numa:1 core:2 pu:1", 4)), (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(worker_node_os(on("pack:2 numa:2 core:1 pu:2", 8)),
            (std::vector<int>{0, 0, 1, 1, 2, 2, 3, 3}));
  EXPECT_TRUE(worker_node_os(on("pack:1 numa:1 core:4 pu:2", 8)).empty());
}

}  // namespace
}  // namespace weft::sched
