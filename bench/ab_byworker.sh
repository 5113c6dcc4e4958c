#!/usr/bin/env bash
# bench/ab_byworker.sh — ab_micro.sh for workloads whose fibers all stay on
# one worker (pingpong), with the runs grouped by that worker.
#
# Usage:
#   bench/ab_byworker.sh <workload> <rounds> <binary>...
#
# On this VM the two vCPUs are not always equally fast (for a while one ran
# a plain loop 1.5x slower than the other), and which worker ends up with
# the pair is chance, so a plain median mixes two populations. Each run
# here prints its per-worker counters (WEFT_MICRO_STATS=1); the run is
# filed under the worker that ran the most fibers, and the table gives the
# median and minimum per binary and worker. Two workers only.
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 <workload> <rounds> <binary>..." >&2
  exit 2
fi
workload=$1 rounds=$2
shift 2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for ((r = 0; r < rounds; r++)); do
  for b in "$@"; do
    s=$(env -u WEFT_WORKERS WEFT_MICRO_STATS=1 timeout 300 "$b" "$workload" 2>&1 || true)
    w0=$(grep -o 'worker0 fibers_run=[0-9]*' <<<"$s" | cut -d= -f2)
    w1=$(grep -o 'worker1 fibers_run=[0-9]*' <<<"$s" | cut -d= -f2)
    v=$(grep -o 'value=[0-9.]*' <<<"$s" | cut -d= -f2)
    [[ -n $w0 && -n $w1 && -n $v ]] || { echo "$b: no result" >&2; continue; }
    if ((w0 > w1)); then k=w0; else k=w1; fi
    echo "$b $k $v" >>"$out"
  done
done
python3 - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    b, k, v = line.split()
    runs[(b, k)].append(float(v))
for (b, k), v in sorted(runs.items()):
    print(f"{b:40s} {k} n={len(v):2d} med={statistics.median(v):9.2f} min={min(v):9.2f}")
PY
