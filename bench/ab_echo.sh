#!/usr/bin/env bash
# bench/ab_echo.sh — A/B of echo servers at one connection count, alternating.
#
# Usage:
#   bench/ab_echo.sh <conns> <rounds> <server>...
#
# <server>: an examples/echo_server binary (run with --workers 1 and
# WEFT_IO=${AB_IO:-uring}), `go` (bench/peers/go/echo built as /tmp/go_echo
# or $GO_ECHO, GOMAXPROCS=1), `threads` (a //bench:thread_echo_server
# binary given as threads=PATH) or any other server as cmd="PATH ARGS..."
# (run with --port N appended; e.g. cmd="bazel-bin/bench/loop_echo_server
# --io uring"). Each round runs every server once, pinned to
# CPU 0, with echo_load ($ECHO_LOAD, default /tmp/echo_load) on CPU 1 for
# 1 s warmup + ${AB_SECONDS:-5} s of 64-byte requests, so all of them see the
# same machine phase; per run it prints the server's CPU µs per request
# (utime+stime from /proc/PID/stat around the load, over every request
# echo_load completed), req/s, p50 and p99, then each server's medians.
# For a change against the binary before it, and for a quick look beside
# Go; compare_echo.sh makes the table of record.
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 <conns> <rounds> <server>..." >&2
  exit 2
fi
conns=$1 rounds=$2
shift 2
load=${ECHO_LOAD:-/tmp/echo_load}
go_bin=${GO_ECHO:-/tmp/go_echo}
seconds=${AB_SECONDS:-5}
port=${AB_PORT:-19600}
tck=$(getconf CLK_TCK)
unset WEFT_WORKERS  # would override --workers 1
declare -A cpu p99
pid=
trap '[[ -n $pid ]] && kill "$pid" 2>/dev/null; true' EXIT

for ((r = 0; r < rounds; r++)); do
  for s in "$@"; do
    port=$((port + 1))
    case $s in
      go) GOMAXPROCS=1 taskset -c 0 "$go_bin" --port "$port" >/dev/null 2>&1 & ;;
      threads=*) taskset -c 0 "${s#threads=}" --port "$port" >/dev/null 2>&1 & ;;
      # shellcheck disable=SC2086  # the command's words
      cmd=*) taskset -c 0 ${s#cmd=} --port "$port" >/dev/null 2>&1 & ;;
      *) WEFT_IO=${AB_IO:-uring} taskset -c 0 "$s" --port "$port" --workers 1 >/dev/null 2>&1 & ;;
    esac
    pid=$!
    sleep 0.5
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$(taskset -c 1 timeout 60 "$load" --port "$port" --conns "$conns" --seconds "$seconds" \
      --warmup 1 --size 64 || true)
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid" && wait "$pid" 2>/dev/null || true
    pid=
    total=$(sed -n 's/.*total_requests=\([0-9]*\).*/\1/p' <<<"$out")
    if [[ -z $total || $total == 0 ]]; then
      echo "ab_echo: $s served no request: $out" >&2
      exit 1
    fi
    us=$(awk -v d=$((t1 - t0)) -v n="$total" -v t="$tck" 'BEGIN { printf "%.3f", d * 1e6 / t / n }')
    cpu[$s]+="$us "
    p99[$s]+="$(sed -n 's/.*p99_us=\([0-9.]*\).*/\1/p' <<<"$out") "
    printf '%-28s C=%-5s cpu_us_per_req=%s %s\n' "$(basename "${s%% *}")${s#"${s%% *}"}" "$conns" "$us" \
      "$(grep -o 'rps=[0-9]* p50_us=[0-9.]* p99_us=[0-9.]*' <<<"$out")"
  done
done

median() {  # of the words in $1
  # shellcheck disable=SC2086
  local sorted n
  sorted=$(printf '%s\n' $1 | sort -g)
  n=$(wc -l <<<"$sorted")
  sed -n "$(((n + 1) / 2))p" <<<"$sorted"
}
for s in "$@"; do
  printf 'median %-21s C=%-5s cpu_us_per_req=%s p99_us=%s\n' "$(basename "${s%% *}")${s#"${s%% *}"}" "$conns" \
    "$(median "${cpu[$s]}")" "$(median "${p99[$s]}")"
done
