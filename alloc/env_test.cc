// alloc/env_test.cc — parse_decimal, which reads the counts of WEFT_WORKERS,
// WEFT_BLOCKING_THREADS and WEFT_LINGER_MS: digits only, in range.
#include "alloc/env.h"

#include <gtest/gtest.h>

namespace weft::alloc {
namespace {

TEST(ParseDecimal, TakesDigitsOnlyAndInRange) {
  unsigned long long v = 7;
  EXPECT_TRUE(parse_decimal("0", 10, v));
  EXPECT_EQ(v, 0u);
  EXPECT_TRUE(parse_decimal("4096", 4096, v));
  EXPECT_EQ(v, 4096u);
  EXPECT_TRUE(parse_decimal("000000000000000012", 100, v));  // 18 digits
  EXPECT_EQ(v, 12u);
  v = 7;
  // strtoul took each of these as a number.
  for (const char* bad : {"", " 2", "+2", "2 ", "-1", "-18446744073709551615", "8x", "0x10",
                          "4097", "1e3", "1000000000000000000000", "0000000000000000012"})
    EXPECT_FALSE(parse_decimal(bad, 4096, v)) << '"' << bad << '"';
  EXPECT_FALSE(parse_decimal(nullptr, 4096, v));
  EXPECT_EQ(v, 7u);  // untouched by a refusal
}

}  // namespace
}  // namespace weft::alloc
