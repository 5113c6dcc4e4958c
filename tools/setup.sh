#!/usr/bin/env bash
# Installs what weft needs from Debian's packages, if missing. Idempotent;
# downloads nothing else (see the Build section of DESIGN.md).
set -euo pipefail

pkgs=(
  bazel-bootstrap bazel-platforms bazel-rules-java  # the build (Bazel 4.2.3)
  g++ liburing-dev libhwloc-dev libmimalloc-dev libboost-context-dev
  libgtest-dev libbenchmark-dev                     # libraries
  golang-go                                         # bench/peers/go
  wrk hyperfine linux-perf                          # benchmarks
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
