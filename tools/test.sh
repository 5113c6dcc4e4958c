#!/usr/bin/env bash
# The whole test suite: installs what is missing, runs `bazel test //...`
# (pass a config such as --config=asan or --config=tsan as arguments), and
# ends with one line `N passed, N failed` counting GoogleTest cases (a test
# binary that crashed before writing its results counts as one failure).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash tools/setup.sh

bazel test //... "$@" 2>&1 | tee /tmp/weft-test.log
status=${PIPESTATUS[0]}

logs=$(bazel info "$@" bazel-testlogs 2>/dev/null)
passed=0
failed=0
while IFS= read -r target; do
  xml="$logs/${target#//}"
  xml="${xml/://}/test.xml"
  if [ -f "$xml" ]; then
    cases=$(grep -c '<testcase ' "$xml" || true)
    bad=$(grep -c '<failure' "$xml" || true)
    passed=$((passed + cases - bad))
    failed=$((failed + bad))
  fi
done < <(bazel query 'tests(//...)' 2>/dev/null)
# Targets that failed without a failing case in their XML (a crash, a
# timeout): count each once.
while IFS= read -r line; do
  target=$(echo "$line" | awk '{print $1}')
  xml="$logs/${target#//}"
  xml="${xml/://}/test.xml"
  if [ ! -f "$xml" ] || ! grep -q '<failure' "$xml"; then failed=$((failed + 1)); fi
done < <(grep -E '^//[^ ]+ +(FAILED|TIMEOUT|NO STATUS)' /tmp/weft-test.log || true)
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
