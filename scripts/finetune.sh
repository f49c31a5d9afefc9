#!/usr/bin/env bash
# Fine-tunes the quickstart's model on two-digit addition: SFT, then DPO on preference pairs, then
# judges both on held-out problems. Run scripts/quickstart.sh first (it makes the pretrained model).
#   data/make_arith.py -> train recipes/sft-arith.yaml -> train recipes/dpo-arith.yaml
#   -> eval --generate (exact match, SFT and DPO) -> eval --preferences (DPO against its reference)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
MF=./build/moeforge
[ -x "$MF" ] || TARGET=moeforge bash scripts/build.sh
if [ ! -d runs/quickstart/train/checkpoints/step_00000500 ]; then
  echo "finetune: runs/quickstart/train/checkpoints/step_00000500 is missing; run scripts/quickstart.sh first" >&2
  exit 2
fi

echo "== data: data/make_arith.py"
python3 data/make_arith.py data/arith

echo "== SFT (recipes/sft-arith.yaml)"
$MF train recipes/sft-arith.yaml --resume
sft=runs/arith/sft/checkpoints/step_00000300

echo "== DPO (recipes/dpo-arith.yaml)"
$MF train recipes/dpo-arith.yaml --resume
dpo=runs/arith/dpo/checkpoints/step_00000800

echo "== held-out exact match (data/arith/test.jsonl, greedy)"
$MF eval "$sft" --generate --data data/arith/test.jsonl --max-new-tokens 8 --json | tee runs/arith/sft_exact_match.json
$MF eval "$dpo" --generate --data data/arith/test.jsonl --max-new-tokens 8 --json | tee runs/arith/dpo_exact_match.json

echo "== held-out reward accuracy of the DPO model against its reference (data/arith/pref_val.jsonl)"
$MF eval "$dpo" --preferences data/arith/pref_val.jsonl --reference "$sft" --json | tee runs/arith/dpo_preferences.json
echo "finetune: $(( $(date +%s) - start )) s"
