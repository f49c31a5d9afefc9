#!/usr/bin/env bash
# Real size on one 24 GiB machine (README, "Real size"): configs/mixtral-2b.yaml (2.43B parameters, 9.7 GB in
# fp32) made by `moeforge init` (one expert share at a time), exported to Hugging Face safetensors (streamed,
# 1 GB shards), imported back (streamed), then LoRA-fine-tuned from `init_from: hf:DIR` under parallel.expert 4
# (four processes, each building and reading only its dense part and 2 of the 8 experts of every layer) for
# STEPS steps (default 3) of SFT on the arithmetic data. Each command's peak resident memory (GNU time's maximum
# RSS; the training ranks' VmHWM from summary.json) is printed against the model's fp32 size / 2, and the
# training ranks' against `moeforge plan`.
# usage: scripts/bench_real_size.sh   (after scripts/quickstart.sh: its tokenizer is the model's; ~16 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3}
MF=./build/moeforge
OUT=runs/real_size
TOK=runs/quickstart/data/tokenizer.model
CFG=configs/mixtral-2b.yaml
[ -x "$MF" ] || TARGET=moeforge bash scripts/build.sh
[ -f "$TOK" ] || { echo "bench_real_size: $TOK is missing; run scripts/quickstart.sh first" >&2; exit 2; }
[ -f data/arith/sft_train.jsonl ] || python3 data/make_arith.py data/arith
rm -rf "$OUT"
mkdir -p "$OUT"
peak() {  # label command...: runs it under GNU time, prints "label seconds peak-MiB"
  local label=$1
  shift
  /usr/bin/time -f "%e %M" -o "$OUT/$label.time" "$@" > "$OUT/$label.log" 2>&1
  read -r secs kb < "$OUT/$label.time"
  echo "$label $secs $((kb / 1024))"
}
fp32_mib=$($MF info $CFG --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["total_params"]*4/2**20))')
{
  peak init $MF init $CFG --out $OUT/init --seed 1 --tokenizer $TOK
  peak export $MF export $OUT/init --format hf --out $OUT/hf --max-shard-size 1GB
  peak import $MF import $OUT/hf --out $OUT/imported
} > "$OUT/commands.txt"
rm -rf $OUT/imported  # 9.7 GB; its peak was the point
SFT=(train recipes/sft-arith.yaml --set init_from=hf:$OUT/hf --set finetune.method=lora --set parallel.expert=4
     --set train.max_steps=$STEPS --set train.micro_batch_size=1 --set train.seq_len=128 --set train.eval_batches=1
     --set train.eval_interval=100000 --set train.checkpoint_interval=$STEPS --set output_dir=$OUT/sft)
/usr/bin/time -f "%e %M" -o "$OUT/sft.time" $MF launch --nproc-per-node 4 -- "${SFT[@]}" > "$OUT/sft.log" 2>&1
plan=$($MF plan "${SFT[@]:1}" --nproc-per-node 4 --json)
python3 - "$OUT" "$fp32_mib" <<PY
import json, sys
out, fp32 = sys.argv[1], int(sys.argv[2])
plan = json.loads('''$plan''')
s = json.load(open(f"{out}/sft/summary.json"))
print(f"configs/mixtral-2b.yaml: {s['total_params']/1e9:.2f}B parameters, fp32 size {fp32:,} MiB, half of it {fp32//2:,} MiB")
print("| step | seconds | peak RSS (MiB) | of fp32 size / 2 |")
print("|---|---|---|---|")
for line in open(f"{out}/commands.txt"):
    label, secs, mib = line.split()
    print(f"| {label} | {float(secs):.0f} | {int(mib):,} | {100*int(mib)/(fp32/2):.0f}% |")
secs = open(f"{out}/sft.time").read().split()[0]
for r, b in enumerate(s["peak_rss_bytes_per_rank"]):
    print(f"| LoRA SFT rank {r} (EP 4, {s['steps']} steps) | {float(secs):.0f} | {b/2**20:,.0f} | {100*b/2**20/(fp32/2):.0f}% |")
print(f"plan for the SFT ranks: {plan['total_bytes']/2**20:,.0f} MiB per rank; tokens/s {s['tokens_per_second']:.1f}")
PY
