#!/usr/bin/env bash
# Fine-tuning methods side by side: peak memory (VmHWM) and tokens/s of SFT with finetune.method full / lora /
# qlora on configs/small.yaml (178M parameters), the README's "LoRA and QLoRA" table, in one run.
#   1. A base for configs/small.yaml: one pretraining step on the quickstart's data (its weights are what is
#      loaded; their values do not matter for memory or speed).
#   2. SFT on the arithmetic data (data/make_arith.py) from that base, STEPS steps (default 6) of micro-batch
#      MB (default 4) x seq 128, bf16, for each method; each run a separate process.
#   RECOMPUTE=full|moe sets train.activation_checkpointing for the three runs (default none), into
#   runs/bench_finetune/recompute-X/.
# usage: scripts/bench_finetune.sh   (after scripts/quickstart.sh; KEEP=1 keeps finished runs)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-6}
MB=${MB:-4}
MF=./build/moeforge
Q=runs/quickstart
RECOMPUTE=${RECOMPUTE:-none}
BASE_OUT=runs/bench_finetune
OUT=$BASE_OUT
[ "$RECOMPUTE" = none ] || OUT=$BASE_OUT/recompute-$RECOMPUTE
[ -x "$MF" ] || TARGET=moeforge bash scripts/build.sh
if [ ! -f "$Q/data/meta.json" ]; then
  echo "bench_finetune: $Q/data is missing; run scripts/quickstart.sh first" >&2
  exit 2
fi
[ -f data/arith/sft_train.jsonl ] || python3 data/make_arith.py data/arith
mkdir -p "$OUT"

if [ -z "${KEEP:-}" ] || [ ! -f "$BASE_OUT/base/summary.json" ]; then
  rm -rf "$BASE_OUT/base"
  echo "== base: configs/small.yaml, one pretraining step" >&2
  $MF train recipes/quickstart.yaml --set model=configs/small.yaml --set data.dir=$Q/data --set output_dir=$BASE_OUT/base \
    --set train.max_steps=1 --set train.micro_batch_size=1 --set train.eval_batches=1 --set train.checkpoint_interval=1 \
    > "$BASE_OUT/base.log" 2>&1
fi
base=$(ls -d $BASE_OUT/base/checkpoints/step_* | tail -1)

for method in full lora qlora; do
  if [ -n "${KEEP:-}" ] && [ -f "$OUT/$method/summary.json" ]; then continue; fi
  rm -rf "$OUT/$method"
  echo "== SFT $method ($STEPS steps)" >&2
  $MF train recipes/sft-arith.yaml --set init_from=$base --set output_dir=$OUT/$method --set finetune.method=$method \
    --set train.max_steps=$STEPS --set train.micro_batch_size=$MB --set train.log_interval=1 \
    --set train.eval_interval=$STEPS --set train.eval_batches=1 --set train.checkpoint_interval=$STEPS \
    --set train.activation_checkpointing=$RECOMPUTE \
    > "$OUT/$method.log" 2>&1
done

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = {m: json.load(open(f"{out}/{m}/summary.json")) for m in ("full", "lora", "qlora")}
full = rows["full"]
print(f"{'method':8} {'peak RSS MiB':>13} {'vs full':>8} {'tokens/s':>9} {'vs full':>8}")
for m, s in rows.items():
    rss, tps = s["peak_rss_bytes"] / 2**20, s["tokens_per_second"]
    print(f"{m:8} {rss:13.0f} {rss / (full['peak_rss_bytes'] / 2**20):8.2f} {tps:9.0f} {tps / full['tokens_per_second']:8.2f}")
EOF
