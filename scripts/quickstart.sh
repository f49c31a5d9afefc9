#!/usr/bin/env bash
# The main job: set-up, build, then the shipped model configs' parameter counts and memory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
for c in configs/tiny.yaml configs/small.yaml configs/mixtral-8x7b.yaml configs/mixtral-8x22b.yaml; do
  ./build/moeforge info "$c"
  echo
done
