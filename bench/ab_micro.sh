#!/usr/bin/env bash
# bench/ab_micro.sh — A/B of micro-benchmark binaries, alternating.
#
# Usage:
#   bench/ab_micro.sh <workload> <rounds> <binary|go>...
#
# Runs each binary (a //bench:micro build, or `go` for the Go peer built
# from bench/peers/go, as /tmp/gomicro or $GO_MICRO) on <workload>, one
# after another, <rounds> times, so all of them see the same machine noise,
# and prints each one's values, minimum and median. For comparing a change
# against the binary before it (see bench/README.md); compare_micro.sh is
# the weft-against-Go table.
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 <workload> <rounds> <binary|go>..." >&2
  exit 2
fi
workload=$1 rounds=$2
shift 2
go_bin=${GO_MICRO:-/tmp/gomicro}
declare -A vals
for ((r = 0; r < rounds; r++)); do
  for b in "$@"; do
    if [[ $b == go ]]; then
      procs=2
      [[ $workload == yield ]] && procs=1
      out=$(GOMAXPROCS=$procs timeout 300 "$go_bin" "$workload" || true)
    else
      out=$(env -u WEFT_WORKERS timeout 300 "$b" "$workload" || true)
    fi
    v=$(sed -n 's/.*value=\([0-9.]*\).*/\1/p' <<<"$out")
    vals[$b]+="${v:-nan} "
  done
done
for b in "$@"; do
  # shellcheck disable=SC2086
  sorted=$(printf '%s\n' ${vals[$b]} | sort -g)
  n=$(wc -l <<<"$sorted")
  med=$(sed -n "$(((n + 1) / 2))p" <<<"$sorted")
  printf '%-10s %-40s min=%-10s med=%-10s all=%s\n' "$workload" "$b" \
    "$(head -1 <<<"$sorted")" "$med" "${vals[$b]}"
done
