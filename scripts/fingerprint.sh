#!/usr/bin/env bash
# Behaviour fingerprint of a moeforge binary: runs that every refactor must reproduce bit for bit.
# usage: scripts/fingerprint.sh MOEFORGE OUT_DIR   (from the repository root; the data is prepared once under
# runs/fingerprint-data; data/brown must exist: data/get_brown.sh). Compare two with scripts/compare_fingerprints.py.
# Used for issue 12: every run below was bit-identical before and after the reshaping (router jitter aside).
set -euo pipefail
MF=$(readlink -f "$1"); OUT=$2
rm -rf "$OUT"; mkdir -p "$OUT"
D=$(pwd)/runs/fingerprint-data
if [ ! -f $D/data/meta.json ]; then
  $MF tokenizer train --input data/brown/brown.jsonl --vocab-size 4096 --out $D/tok
  $MF prepare --tokenizer $D/tok/tokenizer.model --input data/brown/brown.jsonl --out $D/data --val-fraction 0.05 --seed 1234 --domain-field domain
  python3 data/make_arith.py $D/arith
fi
# 1. quickstart, 100 of its 500 steps (killed after the step-100 checkpoint)
MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=100 $MF train recipes/quickstart.yaml --set data.dir=$D/data --set output_dir=$OUT/qs > $OUT/qs.log 2>&1 || true
Q=$OUT/qs/checkpoints/step_00000100
# 2. two ranks, EP=2 + ZeRO-1, and DP=2, 12 steps with a checkpoint at 6 and router jitter
$MF launch --nproc-per-node 2 -- train recipes/quickstart.yaml --set data.dir=$D/data --set output_dir=$OUT/ep2z \
  --set train.max_steps=12 --set train.log_interval=2 --set train.eval_interval=6 --set train.checkpoint_interval=6 \
  --set train.eval_batches=2 --set parallel.expert=2 --set parallel.zero=1 --set model.moe.router_jitter=0.1 > $OUT/ep2z.log 2>&1
$MF launch --nproc-per-node 2 -- train recipes/quickstart.yaml --set data.dir=$D/data --set output_dir=$OUT/dp2 \
  --set train.max_steps=8 --set train.log_interval=2 --set train.eval_interval=4 --set train.checkpoint_interval=4 \
  --set train.eval_batches=2 --set train.grad_accum=2 --set train.micro_batch_size=4 > $OUT/dp2.log 2>&1
# 3. SFT from the step-100 checkpoint, then DPO (precompute and frozen, rpo) from it
$MF train recipes/sft-arith.yaml --set init_from=$Q --set data.train=$D/arith/sft_train.jsonl --set data.val=$D/arith/sft_val.jsonl \
  --set output_dir=$OUT/sft --set train.max_steps=30 --set train.log_interval=5 --set train.eval_interval=15 --set train.checkpoint_interval=15 > $OUT/sft.log 2>&1
S=$OUT/sft/checkpoints/step_00000030
for ref in precompute frozen; do
  $MF train recipes/dpo-arith.yaml --set init_from=$S --set data.train=$D/arith/pref_train.jsonl --set data.val=$D/arith/pref_val.jsonl \
    --set output_dir=$OUT/dpo-$ref --set dpo.reference=$ref --set train.max_steps=12 --set train.log_interval=3 \
    --set train.eval_interval=6 --set train.checkpoint_interval=6 --set train.eval_batches=2 > $OUT/dpo-$ref.log 2>&1
done
$MF eval $OUT/dpo-precompute/checkpoints/step_00000012 --preferences $D/arith/pref_val.jsonl --reference $S --json > $OUT/eval_prefs.json
$MF eval $Q --data $D/data --json --batches 4 > $OUT/eval.json
echo fingerprint done
