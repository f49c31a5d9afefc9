#!/usr/bin/env bash
# Configures and builds moeforge into build/ (Release, Ninja, precompiled LibTorch headers).
# TARGET=moeforge builds only the binary (and the SentencePiece shim), not the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
fi
if [ -n "${TARGET:-}" ]; then
  cmake --build "$BUILD_DIR" -j "$JOBS" --target "$TARGET" moeforge_spm
else
  cmake --build "$BUILD_DIR" -j "$JOBS"
fi
