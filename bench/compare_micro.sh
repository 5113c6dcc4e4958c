#!/usr/bin/env bash
# bench/compare_micro.sh
#
# Runs the micro workloads on weft (//bench:micro) and on its Go peer
# (bench/peers/go) side by side and prints a Markdown table of the medians and
# their ratio, with the machine named (see *Benchmarks* in the conventions).
#
# Usage:
#   bench/compare_micro.sh [workload...]
#
# Default workloads: spawn_join skynet yield idle_memory pingpong fanin mutex.
# For each workload the two binaries run alternately, weft then Go, 3 times
# each, in this one invocation so both see the same machine noise. Each run is
# bounded by `timeout 300`. A run that exits non-zero, times out or prints no
# well-formed `workload=<w> n=<N> value=<v> unit=<u>` line makes that side of
# the workload `n/a` (the reason goes to stderr); the script carries on.
#
# ratio > 1 means weft is better: go/weft for time-like and bytes/fiber units,
# weft/go for throughput units (those ending in /s).
#
# Environment:
#   WEFT_MICRO=/path/to/micro   use this weft binary instead of running
#                               `bazel build --config=bench //bench:micro`
#   MICRO_N=<N>                 pass N as argv[2] to both binaries (smoke
#                               tests; the figures are then not comparable
#                               with full-size runs)
#
# stdout carries only the report; progress and failures go to stderr.
#
# Both sides run with their default parallelism, one worker (weft) or P
# (Go) per CPU of the affinity mask: WEFT_WORKERS and GOMAXPROCS are
# removed from the environment, since either one set alone would give one
# side more threads than the other. (yield runs on one worker and one P on
# both sides by itself; see bench/micro.cc.)

set -euo pipefail
unset WEFT_WORKERS GOMAXPROCS

readonly kRuns=3
readonly kTimeoutS=300
readonly kDefaultWorkloads=(spawn_join skynet yield idle_memory pingpong fanin mutex)

root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log() { printf '%s\n' "$*" >&2; }
die() { log "compare_micro: $*"; exit 1; }

# --- Build both sides --------------------------------------------------------

if [[ -n "${WEFT_MICRO:-}" ]]; then
  weft_bin=$WEFT_MICRO
  log "weft: using WEFT_MICRO=$weft_bin (no bazel build)"
else
  log "weft: bazel build --config=bench //bench:micro"
  (cd "$root" && bazel build --config=bench //bench:micro) >&2
  weft_bin=$(cd "$root" && bazel info --config=bench bazel-bin 2>/dev/null)/bench/micro
fi
[[ -x "$weft_bin" ]] || die "weft binary $weft_bin is not executable"

go_bin=$tmp/micro-go
log "Go: building bench/peers/go"
(cd "$root/bench/peers/go" && GOFLAGS=-mod=mod GOPROXY=off go build -o "$go_bin" .) >&2 \
  || die "building the Go peer failed"

# --- Running one measurement -------------------------------------------------

# run_one <label> <binary> <workload>
# On success prints "<value> <unit>" and returns 0; otherwise explains on
# stderr and returns 1.
run_one() {
  local label=$1 bin=$2 workload=$3 out rc line value unit
  local args=("$workload")
  [[ -n "${MICRO_N:-}" ]] && args+=("$MICRO_N")
  if out=$(timeout --kill-after=10 "$kTimeoutS" "$bin" "${args[@]}" 2>"$tmp/stderr"); then
    rc=0
  else
    rc=$?
  fi
  if ((rc != 0)); then
    if ((rc == 124)); then
      log "  $label $workload: timed out after ${kTimeoutS}s"
    else
      log "  $label $workload: exit status $rc"
    fi
    tail -n 3 "$tmp/stderr" | sed 's/^/    | /' >&2
    return 1
  fi
  line=$(grep -m1 '^workload=' <<<"$out" || true)
  value=$(sed -nE 's/.*[[:space:]]value=([^[:space:]]+).*/\1/p' <<<"$line")
  unit=$(sed -nE 's/.*[[:space:]]unit=([^[:space:]]+).*/\1/p' <<<"$line")
  if [[ "$line" != "workload=$workload "* ]] ||
     ! [[ "$value" =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]] || [[ -z "$unit" ]]; then
    log "  $label $workload: no well-formed result line in: ${out:-<empty>}"
    return 1
  fi
  printf '%s %s\n' "$value" "$unit"
}

# median <value>... : the middle value (kRuns is odd), as printed by the run.
median() {
  printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"
}

# --- The comparison ----------------------------------------------------------

if (($# > 0)); then workloads=("$@"); else workloads=("${kDefaultWorkloads[@]}"); fi

# The machine's cross-core cache-line trip (bench/micro xcore), before and
# after the workloads: the phases of this VM change it by 4x, and the
# workloads that move fibers between workers with it (see micro.cc).
# Its own N always (MICRO_N would make it measure thread start-up).
xcore() { (r=$(MICRO_N='' run_one weft "$weft_bin" xcore) && echo "${r% *} ns") || echo n/a; }
xcore_before=$(xcore)

rows=()
for w in "${workloads[@]}"; do
  weft_vals=() go_vals=() weft_unit='' go_unit='' weft_ok=1 go_ok=1
  for ((i = 1; i <= kRuns; i++)); do
    if ((weft_ok)); then
      log "$w: weft run $i/$kRuns"
      if r=$(run_one weft "$weft_bin" "$w"); then
        weft_vals+=("${r% *}") weft_unit=${r#* }
      else
        weft_ok=0  # rejected or broken: skip its remaining runs
      fi
    fi
    if ((go_ok)); then
      log "$w: Go run $i/$kRuns"
      if r=$(run_one Go "$go_bin" "$w"); then
        go_vals+=("${r% *}") go_unit=${r#* }
      else
        go_ok=0
      fi
    fi
  done

  weft_med=n/a go_med=n/a ratio=n/a better=n/a
  ((weft_ok)) && weft_med=$(median "${weft_vals[@]}")
  ((go_ok)) && go_med=$(median "${go_vals[@]}")
  unit=${weft_unit:-${go_unit:-?}}
  if ((weft_ok && go_ok)); then
    if [[ "$weft_unit" != "$go_unit" ]]; then
      log "$w: unit mismatch (weft: $weft_unit, Go: $go_unit); no ratio"
      unit="$weft_unit vs $go_unit"
    else
      # Higher is better only for throughput units (ending in /s).
      read -r ratio better < <(awk -v wf="$weft_med" -v go="$go_med" -v u="$unit" 'BEGIN {
        hb = (u ~ /\/s$/)
        num = hb ? wf : go; den = hb ? go : wf
        if (den == 0) { print "n/a n/a"; exit }
        r = sprintf("%.2f", num / den)
        print r, (r > 1.00 ? "weft" : (r < 1.00 ? "Go" : "tie"))
      }')
    fi
  fi
  rows+=("| $w | $unit | $weft_med | $go_med | $ratio | $better |")
done

xcore_after=$(xcore)

# --- The report --------------------------------------------------------------

cpu=$(sed -nE 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo 'no commit')
echo "# weft vs Go: micro benchmarks"
echo
echo "- date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
echo "- machine: Linux $(uname -r), $(nproc) CPUs, ${cpu:-unknown CPU}"
echo "- weft: $weft_bin ($commit)"
echo "- Go: $(go version | sed 's/^go version //')"
echo "- cross-core cache-line transfer (bench/micro xcore): $xcore_before before, $xcore_after after"
echo "- parallelism: $(nproc) weft workers, GOMAXPROCS $(nproc) (yield: 1 and 1)"
[[ -n "${MICRO_N:-}" ]] && echo "- N overridden: MICRO_N=$MICRO_N"
echo
echo "| workload | unit | weft (median of $kRuns) | Go (median of $kRuns) | ratio | better |"
echo "|---|---|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
echo
echo "ratio > 1 means weft is better (go/weft for times and bytes/fiber, weft/go for throughput)."
