#!/usr/bin/env bash
# Installs what is missing and runs the demo: 1,000,000 fibers over all
# workers, with what happened (fibers run per worker, steals, time, RSS).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash tools/setup.sh
bazel run --config=bench //examples:spawn_demo -- "$@"
