#!/usr/bin/env bash
# Held-out exact match (data/arith/test.jsonl, greedy) of every point of a finetune sweep (recipes/finetune-*.yaml), and a table
# per arm (mean and every seed; for DPO points also the last evaluation's held-out reward accuracy) in OUT.md (default docs/finetune-methods/results.md). usage: scripts/finetune_methods_report.sh [RUNS [OUT.md]]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
R=${1:-runs/finetune-methods}
OUT_MD=${2:-docs/finetune-methods/results.md}
MF=./build/moeforge
for d in "$R"/*/; do
  p=$(basename "$d")
  ck=$(ls -d "$d"checkpoints/step_* 2>/dev/null | sort | tail -1) || true
  [ -n "$ck" ] || { echo "$p: no checkpoint" >&2; continue; }
  [ -f "$d/exact_match.json" ] || $MF eval "$ck" --generate --data data/arith/test.jsonl --max-new-tokens 8 --json > "$d/exact_match.json"
done
python3 - "$R" "$OUT_MD" <<'PY'
import glob, json, os, statistics, sys
R = sys.argv[1]
arms = {}
for f in sorted(glob.glob(os.path.join(R, "*", "exact_match.json"))):
    point = os.path.basename(os.path.dirname(f))
    arm = point.split("_seed=")[0].replace("variant=", "")
    em = json.loads(open(f).read().strip().splitlines()[-1])
    s = json.load(open(os.path.join(os.path.dirname(f), "summary.json")))
    # A DPO point: the held-out reward accuracy of its last evaluation (against its reference, on data.val).
    acc = None
    for line in open(os.path.join(os.path.dirname(f), "metrics.jsonl")):
        rec = json.loads(line)
        if "val_rewards/accuracies" in rec:
            acc = rec["val_rewards/accuracies"]
    arms.setdefault(arm, []).append((em.get("exact_match", em.get("accuracy")), s["final_val_loss"], s["tokens_per_second"], acc))
dpo = any(x[3] is not None for v in arms.values() for x in v)
head = "| arm | exact match, mean | per seed | final val loss (mean) | tokens/s (mean) |"
lines = [head + (" reward accuracy, mean | per seed |" if dpo else ""), "|---|---|---|---|---|" + ("---|---|" if dpo else "")]
for arm, v in arms.items():
    row = (f"| {arm} | {statistics.mean(x[0] for x in v):.3f} | {', '.join('%.3f' % x[0] for x in v)} | "
           f"{statistics.mean(x[1] for x in v):.4f} | {statistics.mean(x[2] for x in v):,.0f} |")
    if dpo:
        accs = [x[3] for x in v if x[3] is not None]
        row += (f" {statistics.mean(accs):.4f} | {', '.join('%.4f' % a for a in accs)} |" if accs else " | |")
    lines.append(row)
out = sys.argv[2]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
