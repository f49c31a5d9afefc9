#!/usr/bin/env bash
# `moeforge plan` against measurement: each rank's peak resident memory (VmHWM, from summary.json's
# peak_rss_bytes_per_rank) next to the plan's total for the same recipe and layout, on configs/tiny.yaml and
# configs/small.yaml, in 1, 2 and 4 processes (parallel.expert = processes), pretraining in bf16 on the
# quickstart's data, STEPS steps (default 3) of micro-batch MB (default 4) x seq 256; plus LoRA SFT on small.
# The plan is the busiest rank's (expert parallelism: --expert-load 1.5, its default), so it is compared with the
# highest VmHWM of the ranks. Prints a Markdown table (the README's "Memory plan against measurement") and writes
# runs/bench_plan/table.md.
# usage: scripts/bench_plan.sh   (after scripts/quickstart.sh; KEEP=1 keeps finished runs)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3}
MB=${MB:-4}
SEQ=${SEQ:-256}
MF=./build/moeforge
Q=runs/quickstart
OUT=runs/bench_plan
[ -x "$MF" ] || TARGET=moeforge bash scripts/build.sh
if [ ! -f "$Q/data/meta.json" ]; then
  echo "bench_plan: $Q/data is missing; run scripts/quickstart.sh first" >&2
  exit 2
fi
[ -f data/arith/sft_train.jsonl ] || python3 data/make_arith.py data/arith
mkdir -p "$OUT"
COMMON=(--set data.dir=$Q/data --set train.max_steps=$STEPS --set train.micro_batch_size=$MB --set train.seq_len=$SEQ
        --set train.eval_batches=1 --set train.eval_interval=100000 --set train.checkpoint_interval=100000
        --set runtime.precision=bf16)

# A base for the LoRA rows: small.yaml after one step (its values do not matter for memory).
if [ ! -d "$OUT/base/checkpoints" ]; then
  rm -rf "$OUT/base"
  $MF train recipes/quickstart.yaml --set model=configs/small.yaml "${COMMON[@]}" --set train.max_steps=1 \
    --set train.checkpoint_interval=1 --set output_dir=$OUT/base > "$OUT/base.log" 2>&1
fi
base=$(ls -d $OUT/base/checkpoints/step_* | tail -1)

run() {  # name recipe nproc extra-args...
  local name=$1 recipe=$2 n=$3
  shift 3
  local dir=$OUT/$name
  if [ -z "${KEEP:-}" ] || [ ! -f "$dir/summary.json" ]; then
    rm -rf "$dir"
    local args=(train "$recipe" "${COMMON[@]}" --set parallel.expert=$n --set output_dir=$dir "$@")
    if [ "$n" = 1 ]; then $MF "${args[@]}" > "$dir.log" 2>&1
    else $MF launch --nproc-per-node $n -- "${args[@]}" > "$dir.log" 2>&1; fi
  fi
  local plan
  plan=$($MF plan "$recipe" "${COMMON[@]}" --set parallel.expert=$n --nproc-per-node $n --json "$@" --set output_dir=$dir)
  python3 - "$dir/summary.json" "$name" "$n" <<PY
import json, sys
s = json.load(open(sys.argv[1])); p = json.loads('''$plan''')
meas = s["peak_rss_bytes_per_rank"]; pred = p["total_bytes"]
worst = abs(pred - max(meas)) / max(meas)  # the plan is the busiest rank's
b = p["bytes"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {pred/2**20:,.0f} | {', '.join(f'{m/2**20:,.0f}' for m in meas)} | {100*worst:.0f}% "
      f"| {b['weights']/2**20:,.0f} / {(b['gradients']+b['optimizer']+b['compute_copies'])/2**20:,.0f} / "
      f"{(b['activations']+b['backward']+b['logits'])/2**20:,.0f} / {b['runtime']/2**20:,.0f} |")
PY
}

{
  echo "| run | ranks | plan (MiB/rank) | measured VmHWM per rank (MiB) | plan vs the busiest rank | plan: weights / grads+optimizer+copies / activations+backward+logits / runtime |"
  echo "|---|---|---|---|---|---|"
  for cfg in tiny small; do
    for n in 1 2 4; do run "$cfg-pretrain-ep$n" recipes/quickstart.yaml $n --set model=configs/$cfg.yaml; done
  done
  for n in 1 4; do
    run "small-lora-ep$n" recipes/quickstart.yaml $n --set model=configs/small.yaml --set init_from=$base \
      --set finetune.method=lora
  done
} | tee "$OUT/table.md"
