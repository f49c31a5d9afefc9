#!/usr/bin/env bash
# What CI runs: set-up, build, then every ctest test (labels: unit, dist, e2e).
# Extra arguments go to ctest, e.g. scripts/test.sh -L unit
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
bash scripts/build.sh
echo "build: $(( $(date +%s) - start )) s"
cd "${BUILD_DIR:-build}"
# Tests run two at a time, one intra-op thread each (set in CMake).
ctest --output-on-failure -j "$(nproc)" "$@"
echo "total: $(( $(date +%s) - start )) s"
