#!/usr/bin/env bash
# bench/compare_echo.sh
#
# The TCP echo comparison. It guards weft's cost per request and per idle
# connection against its peers, measured in the same run on the same machine:
#   weft        examples/echo_server --workers 1, WEFT_IO=uring (small TCP
#               writes go on behind the fiber: *Write-behind* in README.md)
#   weft-epoll  the same with WEFT_IO=epoll
#   weft-nowb   weft with WEFT_WRITE_BEHIND=0: every write parks for its
#               completion
#   go          bench/peers/go/echo, goroutine per connection, GOMAXPROCS=1
#   threads     bench/thread_echo_server, thread per connection (no runtime)
#   loop        bench/loop_echo_server --io uring: a hand-written io_uring
#               event loop, one thread, no runtime (the floor; see its header)
#   loop-epoll  the same with a hand-written epoll loop
# (the default list leaves the two loops out: ECHO_SERVERS adds them)
# Every server drops a peer after 30 s without a request, so each pays for
# an idle timeout as a real server does: weft, go and threads by a deadline
# on every read, the loops by a sweep once a second.
# Each server runs pinned to CPU 0, the load generator (bench/echo_load.cc)
# to CPU 1. Everything listens and connects on 127.0.0.1 only.
#
# Per server and connection count C: RUNS closed-loop runs of WARMUP+SECONDS,
# in rounds (each round runs every server once, side by side);
# from each run, req/s and p99 (from echo_load) and the server's CPU per
# request: its utime+stime from /proc/PID/stat sampled around the echo_load
# process, divided by every request echo_load completed (warmup included).
# Tables show medians. Then, on a fresh server (so no stacks or buffers left
# cached by the load runs are reused), the idle test: VmRSS before and while
# ECHO_IDLE idle connections are held, per connection. Other work on the
# machine (CPU 0 or 1) skews req/s and p99 but hardly the server's own CPU per
# request; the report flags runs where CPU 0 was busy beyond the server.
#
# Environment (defaults in brackets):
#   ECHO_SERVERS  servers to run             ["weft weft-epoll go threads"]
#   ECHO_CONNS    connection counts          ["50 1000"]
#   ECHO_SECONDS  measured seconds per run   [10]
#   ECHO_WARMUP   warmup seconds per run     [2]
#   ECHO_RUNS     runs per (server, C)       [3]
#   ECHO_SIZE     request bytes              [64]
#   ECHO_IDLE     idle connections (0: skip) [10000]
#   ECHO_PORT     first port; each server instance takes the next one [19300]
#   BAZEL_STARTUP_OPTS  e.g. "--output_base=/tmp/bazel_echo"  [none]
#
# Quick run:  ECHO_SECONDS=1 ECHO_WARMUP=0.5 ECHO_RUNS=1 ECHO_IDLE=1000 bench/compare_echo.sh
set -euo pipefail
# WEFT_WORKERS overrides --workers (runtime/runtime.cc): one left in the
# environment would give the weft servers more workers than Go's one P.
# The other knobs of either runtime, left exported by an experiment, would
# change a row that claims the defaults (WEFT_WRITE_BEHIND=0 would make
# "weft" weft-nowb; GOGC=off would spare Go its collections). Each row sets
# what it varies (WEFT_IO, WEFT_WRITE_BEHIND, GOMAXPROCS) itself.
unset WEFT_WORKERS WEFT_IO WEFT_WRITE_BEHIND WEFT_MULTISHOT_RECV WEFT_LINGER_MS \
  WEFT_BLOCKING_THREADS GOGC GOMEMLIMIT GODEBUG GOMAXPROCS

cd "$(dirname "$0")/.."

SERVERS=${ECHO_SERVERS:-"weft weft-epoll go threads"}
CONNS=${ECHO_CONNS:-"50 1000"}
RUN_SECONDS=${ECHO_SECONDS:-10}
WARMUP=${ECHO_WARMUP:-2}
RUNS=${ECHO_RUNS:-3}
SIZE=${ECHO_SIZE:-64}
IDLE=${ECHO_IDLE:-10000}
NEXT_PORT=${ECHO_PORT:-19300}
CLK_TCK=$(getconf CLK_TCK)

WORK=$(mktemp -d /tmp/compare_echo.XXXXXX)
RESULTS=$WORK/results   # one line per run: see load_run
IDLE_RESULTS=$WORK/idle # server conns rss_bytes_per_conn kernel_bytes_per_conn
: >"$RESULTS"
: >"$IDLE_RESULTS"
STARTED_PIDS=()

# ---------------------------------------------------------------------------
# Cleanup: only the processes this script started, by pid.
# ---------------------------------------------------------------------------
cleanup() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

note() { echo "compare_echo: $*" >&2; }

# reap PID: stops a process this script started and forgets its pid, so that
# cleanup never signals a pid the system has since given to someone else.
reap() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local keep=() pid
  for pid in "${STARTED_PIDS[@]}"; do
    [[ $pid == "$1" ]] || keep+=("$pid")
  done
  STARTED_PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------
bazel_cmd() {
  # BAZEL_STARTUP_OPTS is split into words on purpose.
  # shellcheck disable=SC2086
  bazel ${BAZEL_STARTUP_OPTS:-} "$@"
}

HAVE_WEFT=0
HAVE_GO=0
build_all() {
  local targets=(//bench:echo_load //bench:thread_echo_server //bench:loop_echo_server)
  if bazel_cmd query //examples:echo_server >/dev/null 2>&1; then
    targets+=(//examples:echo_server)
    HAVE_WEFT=1
  else
    note "//examples:echo_server does not exist yet: skipping the weft rows"
  fi
  # --symlink_prefix=/ leaves the bazel-* convenience links alone (they may
  # belong to another output base); binaries are found through `bazel info`.
  bazel_cmd build --config=bench --symlink_prefix=/ "${targets[@]}"
  BIN=$(bazel_cmd info --config=bench bazel-bin 2>/dev/null)
  if command -v go >/dev/null; then
    (cd bench/peers/go/echo && GOFLAGS=-mod=mod GOPROXY=off go build -o "$WORK/go_echo_server" .)
    HAVE_GO=1
  else
    note "go is not installed: skipping the go rows"
  fi
}

# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------
available() {
  case $1 in
    weft|weft-epoll|weft-nowb) [[ $HAVE_WEFT == 1 ]] ;;
    go) [[ $HAVE_GO == 1 ]] ;;
    threads|loop|loop-epoll) true ;;
    *) note "unknown server '$1'"; false ;;
  esac
}

port_accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_server NAME: starts it pinned to CPU 0 on a fresh port; sets
# SERVER_PID and PORT and returns once the port accepts (at most 10 s).
start_server() {
  PORT=$NEXT_PORT
  NEXT_PORT=$((NEXT_PORT + 1))
  if port_accepts "$PORT"; then note "port $PORT is already in use"; exit 1; fi
  local log=$WORK/$1.$PORT.log
  case $1 in
    weft)       WEFT_IO=uring taskset -c 0 "$BIN/examples/echo_server" --port "$PORT" --workers 1 >"$log" 2>&1 & ;;
    weft-epoll) WEFT_IO=epoll taskset -c 0 "$BIN/examples/echo_server" --port "$PORT" --workers 1 >"$log" 2>&1 & ;;
    weft-nowb)  WEFT_IO=uring WEFT_WRITE_BEHIND=0 taskset -c 0 "$BIN/examples/echo_server" --port "$PORT" --workers 1 >"$log" 2>&1 & ;;
    go)         GOMAXPROCS=1 taskset -c 0 "$WORK/go_echo_server" --port "$PORT" >"$log" 2>&1 & ;;
    threads)    taskset -c 0 "$BIN/bench/thread_echo_server" --port "$PORT" >"$log" 2>&1 & ;;
    loop)       taskset -c 0 "$BIN/bench/loop_echo_server" --io uring --port "$PORT" >"$log" 2>&1 & ;;
    loop-epoll) taskset -c 0 "$BIN/bench/loop_echo_server" --io epoll --port "$PORT" >"$log" 2>&1 & ;;
  esac
  SERVER_PID=$!
  STARTED_PIDS+=("$SERVER_PID")
  local i
  for ((i = 0; i < 100; i++)); do
    if port_accepts "$PORT"; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  note "$1 did not start listening on 127.0.0.1:$PORT"; cat "$log" >&2; exit 1
}

stop_server() { reap "$SERVER_PID"; }

# server_failed NAME WHY: stops the script with the server's log, rather
# than print a table with a broken run in it.
server_failed() {
  note "$1: $2; its log:"
  cat "$WORK/$1.$PORT.log" >&2
  exit 1
}

# utime+stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat;
# the command name in field 2 may hold spaces, so split after its ')').
cpu_ticks() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }
  local -a f
  read -ra f <<<"$stat"
  echo $((f[11] + f[12]))
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Kernel memory that follows sockets and threads but is not in any RSS.
kernel_kb() { awk '/^(Slab|KernelStack|PageTables):/ {s += $2} END {print s}' /proc/meminfo; }

# field KEY LINE: the value of KEY=value in LINE.
field() { awk -v k="$1" '{for (i = 1; i <= NF; i++) {split($i, a, "="); if (a[1] == k) print a[2]}}' <<<"$2"; }

# ---------------------------------------------------------------------------
# Load runs
# ---------------------------------------------------------------------------

# busy and total clock ticks of CPUs 0 and 1 from /proc/stat: "b0 t0 b1 t1".
# Busy counts softirq, where loopback TCP receive processing is accounted and
# which no process's utime+stime includes.
cpu_lines() {
  awk '/^cpu[01] / {b = $2 + $3 + $4 + $7 + $8 + $9; printf "%d %d ", b, b + $5 + $6}' /proc/stat
}

# load_run NAME C RUN: one echo_load run against the running server; appends
# to RESULTS: server C run rps p99 cpu_us/req server% echo_load% errors
#             cpu0_us/req cpu0_busy% cpu1_busy%
load_run() {
  local name=$1 conns=$2 run=$3 out c0 c1 s0 s1 limit
  limit=$(awk -v s="$RUN_SECONDS" -v w="$WARMUP" 'BEGIN {printf "%d", s + w + 60}')
  c0=$(cpu_ticks "$SERVER_PID")
  s0=$(cpu_lines)
  if ! out=$(timeout "$limit" taskset -c 1 "$BIN/bench/echo_load" --port "$PORT" --conns "$conns" \
        --seconds "$RUN_SECONDS" --warmup "$WARMUP" --size "$SIZE"); then
    server_failed "$name" "echo_load failed at C=$conns (run $run)"
  fi
  s1=$(cpu_lines)
  # A server that died during the run has no /proc entry to sample: its row
  # would show a negative or zero CPU per request, not a failure.
  kill -0 "$SERVER_PID" 2>/dev/null || server_failed "$name" "exited during the run at C=$conns"
  c1=$(cpu_ticks "$SERVER_PID")
  if ! [[ $(field total_requests "$out") =~ ^[1-9][0-9]*$ ]]; then
    server_failed "$name" "no request completed at C=$conns: ${out:-<no output>}"
  fi
  echo "  $name run $run: $out" >&2
  awk -v n="$name" -v c="$conns" -v r="$run" -v rps="$(field rps "$out")" \
      -v p99="$(field p99_us "$out")" -v dc="$((c1 - c0))" -v tck="$CLK_TCK" \
      -v total="$(field total_requests "$out")" -v cli="$(field client_cpu_pct "$out")" \
      -v err="$(field errors "$out")" -v s0="$s0" -v s1="$s1" 'BEGIN {
        split(s0, a, " "); split(s1, b, " ")
        b0 = b[1] - a[1]; t0 = b[2] - a[2]; b1 = b[3] - a[3]; t1 = b[4] - a[4]
        if (total == 0) total = 1
        printf "%s %s %s %s %s %.3f %.1f %s %s %.3f %.1f %.1f\n", n, c, r, rps, p99,
               dc * 1e6 / tck / total, 100 * dc / (t0 > 0 ? t0 : 1), cli, err,
               b0 * 1e6 / tck / total, 100 * b0 / (t0 > 0 ? t0 : 1), 100 * b1 / (t1 > 0 ? t1 : 1)
      }' >>"$RESULTS"
}

# load_round RUN: one run of every server at every C, servers side by side,
# so a slow phase of the machine (they last minutes here) hits every server
# of the round, not all the runs of one server.
load_round() {
  local run=$1 name conns
  for name in $SERVERS; do
    available "$name" || continue
    note "== $name, round $run"
    start_server "$name"
    for conns in $CONNS; do
      load_run "$name" "$conns" "$run"
    done
    stop_server
  done
}

# ---------------------------------------------------------------------------
# Idle test
# ---------------------------------------------------------------------------

# accepted PORT: connections the server has taken off its accept queue
# (established sockets on the port minus the listener's queue length). Works
# whatever the server does with the socket afterwards (fd, io_uring direct
# descriptor, ...).
accepted() {
  local est queued
  est=$(ss -Htn state established "( sport = :$1 )" | wc -l)
  queued=$(ss -Hltn "( sport = :$1 )" | awk '{s += $2} END {print s + 0}')
  echo $((est - queued))
}

# wait_for COUNT TEST...: retries TEST every 0.1 s, at most COUNT times.
wait_for() {
  local n=$1 i
  shift
  for ((i = 0; i < n; i++)); do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  return 1
}

idle_printed() { grep -q '^idle_conns=' "$1"; }
all_accepted() { (($(accepted "$1") >= $2)); }

idle_test() {
  local name=$1 rss0 rss1 k0 k1 loader out got
  start_server "$name"
  sleep 0.5
  rss0=$(rss_kb "$SERVER_PID")
  k0=$(kernel_kb)
  out=$WORK/idle.$name.out
  : >"$out"
  taskset -c 1 "$BIN/bench/echo_load" --port "$PORT" --idle "$IDLE" --hold 120 >"$out" 2>&1 &
  loader=$!
  STARTED_PIDS+=("$loader")
  if ! wait_for 600 idle_printed "$out"; then note "$name: idle connections not up in 60 s"; fi
  got=$(field idle_conns "$(grep '^idle_conns=' "$out" || true)")
  got=${got:-0}
  if ! wait_for 300 all_accepted "$PORT" "$got"; then
    note "$name: only $(accepted "$PORT") of $got idle connections accepted after 30 s"
  fi
  sleep 1  # let the per-connection fiber/goroutine/thread reach its first read
  rss1=$(rss_kb "$SERVER_PID")
  k1=$(kernel_kb)
  echo "  $name idle: $got connections, VmRSS ${rss0} kB -> ${rss1} kB" >&2
  reap "$loader"
  stop_server
  if ((got > 0)); then
    echo "$name $got $(((rss1 - rss0) * 1024 / got)) $(((k1 - k0) * 1024 / got))" >>"$IDLE_RESULTS"
  fi
}

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

# median COLUMN SERVER C: median of COLUMN (1-based in RESULTS) over the runs.
median() {
  awk -v col="$1" -v s="$2" -v c="$3" '$1 == s && $2 == c {print $col}' "$RESULTS" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2];
                           else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b}'
}

# round_ratios A B C: CPU µs/req of A over B at C, per round (the same run
# number: measured minutes apart at most), in round order.
round_ratios() {
  awk -v a="$1" -v b="$2" -v c="$3" '
    $2 == c && $1 == a {x[$3] = $6}
    $2 == c && $1 == b {y[$3] = $6}
    END {
      for (r = 1; r in x || r in y; r++)
        out = out (out == "" ? "" : " ") ((r in x && r in y && y[r] > 0) ? sprintf("%.2f", x[r] / y[r]) : "n/a")
      print (out == "" ? "n/a" : out)
    }' "$RESULTS"
}

report() {
  local s c
  echo
  echo "machine: $(uname -n), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs, kernel $(uname -r)"
  echo "servers on CPU 0, echo_load on CPU 1; ${SIZE}-byte requests; ${RUNS} runs of ${WARMUP} s warmup + ${RUN_SECONDS} s; medians"
  echo
  echo "| server | C | req/s (median) | p99 µs (median) | CPU µs/req (median) | CPU 0 µs/req | server CPU % | CPU 0 busy % | echo_load CPU % | CPU 1 busy % | errors (max) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for s in $SERVERS; do
    for c in $CONNS; do
      grep -q "^$s $c " "$RESULTS" || continue
      echo "| $s | $c | $(median 4 "$s" "$c") | $(median 5 "$s" "$c") | $(median 6 "$s" "$c") |" \
           "$(median 10 "$s" "$c") | $(median 7 "$s" "$c") | $(median 11 "$s" "$c") |" \
           "$(median 8 "$s" "$c") | $(median 12 "$s" "$c") |" \
           "$(awk -v s="$s" -v c="$c" '$1 == s && $2 == c && $9 > m {m = $9} END {print m + 0}' "$RESULTS") |"
    done
  done
  if [[ -s $IDLE_RESULTS ]]; then
    echo
    echo "| server | RSS bytes per idle connection | kernel bytes per idle connection (system-wide: incl. client sockets, noisy if other work runs) |"
    echo "|---|---|---|"
    awk '{printf "| %s | %s | %s |\n", $1, $3, ($4 < 0 ? "n/a (noise)" : $4)}' "$IDLE_RESULTS"
    echo "($(awk 'NR == 1 {print $2}' "$IDLE_RESULTS") idle connections; RSS counts user pages only: a thread's kernel stack shows in the kernel column)"
  fi
  echo
  echo "ratios (CPU µs/req, medians):"
  for c in $CONNS; do
    echo "- weft / go at C=$c: $(ratio "$(median 6 weft "$c")" "$(median 6 go "$c")") (per round: $(round_ratios weft go "$c"))"
  done
  echo "- threads / weft at C=1000: $(ratio "$(median 6 threads 1000)" "$(median 6 weft 1000)")"
  for c in $CONNS; do
    echo "- weft-uring / weft-epoll at C=$c: $(ratio "$(median 6 weft "$c")" "$(median 6 weft-epoll "$c")") (per round: $(round_ratios weft weft-epoll "$c"))"
  done
  if [[ " $SERVERS " == *" loop "* ]]; then
    for c in $CONNS; do
      echo "- loop (hand-written io_uring) / go at C=$c: $(ratio "$(median 6 loop "$c")" "$(median 6 go "$c")") (per round: $(round_ratios loop go "$c"))"
      echo "- weft / loop at C=$c: $(ratio "$(median 6 weft "$c")" "$(median 6 loop "$c")") (per round: $(round_ratios weft loop "$c"))"
    done
  fi
  if [[ " $SERVERS " == *" weft-nowb "* ]]; then
    for c in $CONNS; do
      echo "- weft / weft-nowb (write-behind on / off) at C=$c: $(ratio "$(median 6 weft "$c")" "$(median 6 weft-nowb "$c")") (per round: $(round_ratios weft weft-nowb "$c"))"
      echo "- weft-nowb / go at C=$c: $(ratio "$(median 6 weft-nowb "$c")" "$(median 6 go "$c")") (per round: $(round_ratios weft-nowb go "$c"))"
    done
  fi
  if [[ " $SERVERS " == *" loop-epoll "* ]]; then
    for c in $CONNS; do
      echo "- loop-epoll (hand-written epoll) / go at C=$c: $(ratio "$(median 6 loop-epoll "$c")" "$(median 6 go "$c")") (per round: $(round_ratios loop-epoll go "$c"))"
    done
  fi
  local busy
  busy=$(awk '$12 >= 90 {print $1 " C=" $2}' "$RESULTS" | sort -u | paste -sd, -)
  echo
  echo "CPU µs/req: the server's utime+stime per request. CPU 0 µs/req: all busy time of"
  echo "CPU 0 (the server's CPU) per request, including softirq, where loopback TCP"
  echo "receive work is accounted (charged to the running process, or to ksoftirqd"
  echo "when deferred). CPU 0 busy % well above server CPU % means ksoftirqd or another"
  echo "process took CPU 0 in that run: req/s and p99 are then not the server's own."
  local shared
  shared=$(awk '$11 - $7 > 10 {print $1 " C=" $2 " run " $3}' "$RESULTS" | paste -sd, -)
  if [[ -n $shared ]]; then
    echo "warning: CPU 0 was > 10 points busier than the server in: $shared"
  fi
  if [[ -n $busy ]]; then
    echo "note: CPU 1 (echo_load) was >= 90% busy in runs of: $busy; there req/s is"
    echo "bounded by the client as much as by the server; CPU µs/req is not affected."
  fi
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
ulimit -n "$(ulimit -Hn)" || note "could not raise the open-file limit: $(ulimit -n)"
if (($(nproc) < 2)); then note "needs 2 CPUs (server on 0, load on 1)"; exit 1; fi
build_all
for ((round = 1; round <= RUNS; round++)); do
  load_round "$round"
done
if ((IDLE > 0)); then
  for server in $SERVERS; do
    available "$server" || continue
    note "== $server, idle connections"
    idle_test "$server"
  done
fi
report
