#!/usr/bin/env bash
# The whole test suite: installs what is missing, runs `bazel test //...`
# (pass a config such as --config=asan or --config=tsan as arguments), and
# ends with one line `N passed, N failed` counting GoogleTest cases: a case
# fails once however many of its assertions failed; a skipped case
# (GTEST_SKIP) is neither, and is counted on the line before; a test binary
# that crashed before writing its results counts as one failure.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash tools/setup.sh

# A log of this run's own: runs of two configurations at once (asan and
# tsan side by side) each count only their own failures.
log=$(mktemp /tmp/weft-test.XXXXXX)
trap 'rm -f "$log"' EXIT
bazel test //... "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

logs=$(bazel info "$@" bazel-testlogs 2>/dev/null)
# Per case of a GoogleTest XML report: "pass", "fail" or "skip". A case is
# one <testcase> element, self-closed or ended by </testcase>; failure
# texts are escaped, so "<failure" and "<skipped" only start elements.
count_cases() {
  awk '
    function finish() { print (bad ? "fail" : skip ? "skip" : "pass"); open = 0 }
    /<testcase / {
      if (open) finish()
      open = 1; bad = 0; skip = ($0 ~ /result="skipped"/ || $0 ~ /status="notrun"/)
      if ($0 ~ /\/>[[:space:]]*$/) finish()
      next
    }
    open && /<failure/ { bad = 1 }
    open && /<skipped/ { skip = 1 }
    open && /<\/testcase>/ { finish() }
    END { if (open) finish() }
  ' "$1"
}

passed=0
failed=0
skipped=0
while IFS= read -r target; do
  xml="$logs/${target#//}"
  xml="${xml/://}/test.xml"
  if [ -f "$xml" ]; then
    while IFS= read -r verdict; do
      case "$verdict" in
        pass) passed=$((passed + 1)) ;;
        fail) failed=$((failed + 1)) ;;
        skip) skipped=$((skipped + 1)) ;;
      esac
    done < <(count_cases "$xml")
  fi
done < <(bazel query 'tests(//...)' 2>/dev/null)
# Targets that failed without a failing case in their XML (a crash, a
# timeout): count each once.
while IFS= read -r line; do
  target=$(echo "$line" | awk '{print $1}')
  xml="$logs/${target#//}"
  xml="${xml/://}/test.xml"
  if [ ! -f "$xml" ] || ! grep -q '<failure' "$xml"; then failed=$((failed + 1)); fi
done < <(grep -E '^//[^ ]+ +(FAILED|TIMEOUT|NO STATUS)' "$log" || true)
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
[ "$skipped" -eq 0 ] || echo "$skipped skipped (GTEST_SKIP: see their messages in the test logs)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
