#!/usr/bin/env bash
# The README's memory plans for Mixtral 8x7B and 8x22B: `moeforge plan` per rank for full fine-tuning, LoRA
# (r 16, default targets, bf16 base) and QLoRA (NF4) on 1, 2, 8 and 16 GPUs of 80 GB, micro-batch 1 x 4096,
# bf16, activation recomputation full; parallel.expert = min(GPUs, 8), ZeRO-1 when there are replicas.
# usage: scripts/plan_tables.sh   (needs build/moeforge; reads recipes/sft-arith.yaml for the stage and optimiser)
set -euo pipefail
cd "$(dirname "$0")/.."
MF=./build/moeforge
[ -x "$MF" ] || TARGET=moeforge bash scripts/build.sh
for model in mixtral-8x7b mixtral-8x22b; do
  echo
  echo "$model (configs/$model.yaml), per GPU:"
  echo
  echo "| method | 1 GPU | 2 GPUs | 8 GPUs | 16 GPUs |"
  echo "|---|---|---|---|---|"
  for method in full lora qlora; do
    row="| $method |"
    for n in 1 2 8 16; do
      ep=$(( n < 8 ? n : 8 )); zero=$(( n > ep ? 1 : 0 ))
      j=$($MF plan recipes/sft-arith.yaml --set init_from=hf:BASE --set model=configs/$model.yaml --set finetune.method=$method \
            --set train.micro_batch_size=1 --set train.seq_len=4096 --set train.activation_checkpointing=full \
            --set runtime.precision=bf16 --set parallel.expert=$ep --set parallel.zero=$zero \
            --nproc-per-node $n --device cuda --device-memory 80GB --json)
      row="$row $(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); t=j["total_bytes"]/1e9; print(f"{t:,.1f} GB" + ("" if j["fits"] else " (does not fit)"))' "$j") |"
    done
    echo "$row"
  done
done
