#!/usr/bin/env bash
# The CUDA check, one command for a lent GPU machine (../shared/GPU.md): prints what it finds (GPU, driver, nvcc,
# the PyTorch wheel's LibTorch, NCCL, the carried Debian packages), unpacks .gpu-debs into /opt/deps, configures
# build-cuda against the wheel's LibTorch and NCCL, builds with all cores, runs the unit and e2e tests (e2e runs
# take runtime.device: auto, so they train on the GPU), times `bench moe --device cuda --dtype bf16` (the default
# shape and a hidden-1024 one) and bf16 pretraining of configs/bench-h256.yaml and of a hidden-1024 model, with
# MFU against the H100's dense bf16 peak, and writes every log and summary.txt under $OUT.
# Without a GPU it runs in dry mode: the same inventory, the checks it can make here, then "no GPU" and exit 0.
# Each stage stops cleanly, saying which assumption failed, and the rest is skipped (exit 1).
# usage: OUT=/tmp/gpu_check bash scripts/gpu_check.sh   (the device tool sets OUT)
#        env: GPU_CHECK_TESTS=0 skips ctest; DATA=DIR a prepared data directory (else a synthetic corpus is made)
set -uo pipefail
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "gpu_check: $*" | tee -a "$SUMMARY"; }
stop() { say "STOP: $*"; exit 1; }
start=$(date +%s)
H100_BF16_TFLOPS=989  # dense bf16 peak of an H100 SXM (the issue's figure; an H200 has the same compute)
DEBS=(libyaml-cpp0.7 libyaml-cpp-dev libsentencepiece0 libsentencepiece-dev libprotobuf-lite32 nlohmann-json3-dev
      libgtest-dev libgmock-dev googletest)

# ---- 1. inventory ------------------------------------------------------------------------------------------------
say "$(date -u '+%F %T') UTC on $(hostname), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  GPU=1
else
  say "GPU: none (no working nvidia-smi)"
fi
command -v nvcc >/dev/null 2>&1 && say "nvcc: $(nvcc --version | tail -1)" || say "nvcc: not found"
say "cmake: $(cmake --version 2>/dev/null | head -1 || echo 'not found'); ninja: $(ninja --version 2>/dev/null || echo 'not found')"
PY=$(command -v python3 || true)
TORCH_PREFIX="" NCCL_DIR=""
if [ -n "$PY" ] && "$PY" -c 'import torch' >/dev/null 2>&1; then
  say "python3 torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
  TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  say "LibTorch CMake prefix: $TORCH_PREFIX"
  NCCL_DIR=$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
  [ -n "$NCCL_DIR" ] && say "NCCL: $NCCL_DIR ($(ls "$NCCL_DIR"/lib 2>/dev/null | tr '\n' ' '))" || say "NCCL: no nvidia.nccl package"
  if [ "$GPU" = 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "GPU present but torch.cuda.is_available() is False"; GPU=0
  fi
else
  say "python3 torch: not importable (${PY:-no python3})"
fi
have=0 missing=()
for p in "${DEBS[@]}"; do
  if ls .gpu-debs/"${p}"_*.deb >/dev/null 2>&1; then have=$((have + 1)); else missing+=("$p"); fi
done
say ".gpu-debs: $have of ${#DEBS[@]} packages${missing:+; missing ${missing[*]}}"

# ---- dry mode ----------------------------------------------------------------------------------------------------
if [ "$GPU" = 0 ]; then
  say "dry mode: no GPU here"
  bash -n "$0" && say "this script parses"
  [ ${#missing[@]} -eq 0 ] || say "to carry the packages: mkdir -p .gpu-debs && (cd .gpu-debs && apt-get download ${DEBS[*]})"
  # The CUDA-only code (MOEFORGE_WITH_CUDA / MOEFORGE_WITH_NCCL) needs CUDA LibTorch headers to compile-check.
  if [ -n "$TORCH_PREFIX" ] && [ -d "$TORCH_PREFIX/../../include/ATen/cuda" ]; then
    inc=$(cd "$TORCH_PREFIX/../../include" && pwd)
    for f in src/parallel/dist.cpp src/core/compat.cpp src/model/router.cpp; do
      if g++ -std=c++17 -fsyntax-only -DMOEFORGE_WITH_CUDA=1 -Isrc -I"$inc" -I"$inc/torch/csrc/api/include" "$f" \
           >"$OUT/syntax_$(basename "$f").log" 2>&1; then say "compile-check $f with CUDA headers: ok"
      else say "compile-check $f with CUDA headers: FAILED ($OUT/syntax_$(basename "$f").log)"; fi
    done
  else
    say "no CUDA LibTorch headers here (Debian's libtorch-dev is CPU-only): the CUDA code is not compile-checked"
  fi
  say "dry mode done in $(( $(date +%s) - start )) s"
  exit 0
fi

# ---- 2. dependencies and build -----------------------------------------------------------------------------------
[ ${#missing[@]} -eq 0 ] || stop ".gpu-debs lacks ${missing[*]} (../shared/GPU.md: apt-get download them beside the tree)"
[ -n "$TORCH_PREFIX" ] || stop "no LibTorch: python3 cannot import torch"
DEPS=/opt/deps
mkdir -p "$DEPS" 2>/dev/null || DEPS=$OUT/deps
for f in .gpu-debs/*.deb; do dpkg -x "$f" "$DEPS" || stop "dpkg -x $f failed"; done
export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu:$TORCH_PREFIX/../../lib${NCCL_DIR:+:$NCCL_DIR/lib}:${LD_LIBRARY_PATH:-}
say "deps unpacked in $DEPS"
t=$(date +%s)
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$DEPS/usr" \
  ${NCCL_DIR:+-DNCCL_ROOT="$NCCL_DIR"} -DMOEFORGE_FUZZ_ASAN=OFF > "$OUT/configure.log" 2>&1 \
  || stop "configure failed: $(grep -m3 -i 'error' "$OUT/configure.log" | tr '\n' ' ')"
grep -E "moeforge: (NCCL|CUDA)" "$OUT/configure.log" | while read -r l; do say "configure: $l"; done
cmake --build build-cuda -j "$(nproc)" > "$OUT/build.log" 2>&1 \
  || stop "build failed: $(grep -m3 'error' "$OUT/build.log" | tr '\n' ' ')"
say "configured and built in $(( $(date +%s) - t )) s"
MF=build-cuda/moeforge
say "$($MF version)"

# ---- 3. tests ----------------------------------------------------------------------------------------------------
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  for label in unit e2e; do
    t=$(date +%s)
    (cd build-cuda && timeout 300 ctest -L "$label" -j 8 --output-on-failure) > "$OUT/ctest_$label.log" 2>&1
    say "ctest -L $label: $(grep -E 'tests passed|tests failed' "$OUT/ctest_$label.log" | tail -1) ($(( $(date +%s) - t )) s)"
  done
fi

# ---- 4. bench moe ------------------------------------------------------------------------------------------------
$MF bench moe --device cuda --dtype bf16 --json > "$OUT/bench_moe.json" 2> "$OUT/bench_moe.log" \
  && say "bench moe bf16 (default shape): $(cat "$OUT/bench_moe.json")" || say "bench moe failed: $(tail -2 "$OUT/bench_moe.log")"
$MF bench moe --device cuda --dtype bf16 --tokens 16384 --hidden 1024 --intermediate 3584 --json \
  > "$OUT/bench_moe_h1024.json" 2> "$OUT/bench_moe_h1024.log" \
  && say "bench moe bf16 (16384 tokens, hidden 1024, intermediate 3584): $(cat "$OUT/bench_moe_h1024.json")" \
  || say "bench moe h1024 failed: $(tail -2 "$OUT/bench_moe_h1024.log")"

# ---- 5. training MFU ---------------------------------------------------------------------------------------------
DATA=${DATA:-runs/quickstart/data}
if [ ! -f "$DATA/meta.json" ]; then
  DATA=$OUT/data
  "$PY" - "$OUT/corpus.jsonl" <<'PYEOF'
import json, random, sys
rng = random.Random(1)
words = [w.strip(".,") for w in open("README.md", encoding="utf-8").read().split() if w.isascii()][:20000] or ["a"]
with open(sys.argv[1], "w") as f:
    for _ in range(4000):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n")
PYEOF
  $MF tokenizer train --input "$OUT/corpus.jsonl" --vocab-size 4096 --out "$OUT/tok" > "$OUT/data.log" 2>&1 &&
  $MF prepare --tokenizer "$OUT/tok/tokenizer.model" --input "$OUT/corpus.jsonl" --out "$DATA" --val-fraction 0.02 \
    --seed 1 >> "$OUT/data.log" 2>&1 || stop "could not make the synthetic corpus ($OUT/data.log)"
  say "data: a synthetic corpus from README.md's words (no network here; DATA=DIR for a real one)"
fi
train_run() {  # name, then --set overrides
  local name=$1; shift
  local set=()
  for kv in "$@"; do set+=(--set "$kv"); done
  $MF train recipes/quickstart.yaml --set data.dir="$DATA" --set output_dir="$OUT/$name" --set runtime.precision=bf16 \
    --set runtime.device=cuda --set train.max_steps=60 --set train.log_interval=10 --set train.eval_interval=60 \
    --set train.eval_batches=2 --set train.checkpoint_interval=60 "${set[@]}" > "$OUT/$name.log" 2>&1 \
    || { say "$name: training failed: $(tail -2 "$OUT/$name.log" | tr '\n' ' ')"; return; }
  "$PY" - "$OUT/$name/summary.json" "$name" "$H100_BF16_TFLOPS" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
s = json.load(open(sys.argv[1]))
tps, fpt = s["tokens_per_second"], s["model_flops_per_token"]
print(f"gpu_check: {sys.argv[2]}: {tps:,.0f} tokens/s, MFU {tps * fpt / (float(sys.argv[3]) * 1e12):.1%} of "
      f"{sys.argv[3]} TFLOP/s bf16 ({s.get('mfu', 0):.1%} of the measured matmul peak), final val loss "
      f"{s['final_val_loss']:.4f}, {s['total_params']:,} parameters")
PYEOF
}
train_run h256 model=configs/bench-h256.yaml train.micro_batch_size=32 train.seq_len=256
train_run h1024 model=configs/bench-h256.yaml model.hidden_size=1024 model.intermediate_size=3584 model.num_layers=8 \
  model.num_attention_heads=16 model.num_key_value_heads=8 train.micro_batch_size=16 train.seq_len=512
say "done in $(( $(date +%s) - start )) s; logs in $OUT"
