// tests/spawn_demo_test.cc — examples/spawn_demo's command line: a count
// it cannot use is refused with its usage (exit 2), not run as 0 fibers
// (NaN per fiber) or crashed on (a negative count threw from
// vector::reserve); a small count runs and checks its own sum.
#include <sys/wait.h>

#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

namespace {

int run_demo(const std::string& args) {
  std::string bin = std::string(std::getenv("TEST_SRCDIR")) + "/weft/examples/spawn_demo";
  int status = std::system((bin + " " + args + " >/dev/null 2>&1").c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(SpawnDemo, ACountItCannotUseIsRefusedWithItsUsage) {
  for (const char* bad : {"abc", "-5", "0", "12x", "1 2"}) EXPECT_EQ(run_demo(bad), 2) << bad;
}

TEST(SpawnDemo, ASmallCountRuns) { EXPECT_EQ(run_demo("1000"), 0); }

}  // namespace
