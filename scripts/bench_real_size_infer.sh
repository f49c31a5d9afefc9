#!/usr/bin/env bash
# Inference at real size (README, "Real size"): configs/mixtral-2b.yaml (2.43B parameters, 9.7 GB in fp32) made
# by `moeforge init`, then `eval --text` and greedy `generate` in one process (the whole model) and under
# `moeforge launch --nproc-per-node 4` (expert parallelism: each rank holds the dense part and 2 of the 8
# experts of every layer). Prints each command's peak resident memory (GNU time's maximum RSS; under launch,
# the largest rank's) against the fp32 size / 2, and the losses and completions, which must agree.
# usage: scripts/bench_real_size_infer.sh   (~10 GB of disk; KEEP=1 keeps runs/real_size_infer)
set -euo pipefail
cd "$(dirname "$0")/.."
MF=./build/moeforge
OUT=runs/real_size_infer
CFG=configs/mixtral-2b.yaml
[ -x "$MF" ] || TARGET=moeforge bash scripts/build.sh
rm -rf "$OUT"
mkdir -p "$OUT"
# A small tokenizer (the model's vocabulary is larger; its extra rows are unused) and a text to score.
$MF tokenizer train --input README.md --vocab-size 2000 --out "$OUT/tok" > "$OUT/tok.log" 2>&1
head -c 3000 README.md > "$OUT/text.txt"
$MF init $CFG --out "$OUT/init" --seed 1 --tokenizer "$OUT/tok/tokenizer.model" > "$OUT/init.log" 2>&1
peak() {  # label command...: runs it under GNU time; its output in $OUT/label.out
  local label=$1
  shift
  /usr/bin/time -f "%e %M" -o "$OUT/$label.time" "$@" > "$OUT/$label.out" 2>&1
}
LAUNCH=($MF launch --nproc-per-node 4 --)
EVAL=(eval $OUT/init --text $OUT/text.txt --seq-len 256 --json)
GEN=(generate $OUT/init --prompt "The model" --max-new-tokens 8)
peak eval-1 $MF "${EVAL[@]}"
peak eval-4 "${LAUNCH[@]}" "${EVAL[@]}"
peak generate-1 $MF "${GEN[@]}"
peak generate-4 "${LAUNCH[@]}" "${GEN[@]}"
fp32_mib=$($MF info $CFG --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["total_params"]*4/2**20))')
python3 - "$OUT" "$fp32_mib" <<'PY'
import json, sys
out, fp32 = sys.argv[1], int(sys.argv[2])
def text(label):
    return open(f"{out}/{label}.out").read()
def jline(label):  # the JSON line (under launch: rank 0's, after its prefix)
    for line in text(label).splitlines():
        line = line.removeprefix("[rank 0] ")
        if line.startswith("{"):
            return json.loads(line)
def completion(label):
    lines = [l.removeprefix("[rank 0] ") for l in text(label).splitlines()
             if not l.startswith("[rank 0] [moeforge") and not l.startswith("[moeforge")
             and (label.endswith("-1") or l.startswith("[rank 0] "))]
    return " | ".join(l for l in lines if l.strip())
print(f"configs/mixtral-2b.yaml: fp32 size {fp32:,} MiB, half of it {fp32//2:,} MiB")
print("| command | processes | seconds | peak RSS (MiB, largest process) | of fp32 size / 2 | result |")
print("|---|---|---|---|---|---|")
for label, what in [("eval-1", "eval --text"), ("eval-4", "eval --text"), ("generate-1", "generate"), ("generate-4", "generate")]:
    secs, kb = open(f"{out}/{label}.time").read().split()
    mib = int(kb) // 1024
    res = f"loss {jline(label)['loss']:.6f}" if label.startswith("eval") else repr(completion(label))
    print(f"| {what} | {label[-1]} | {float(secs):.0f} | {mib:,} | {100*mib/(fp32/2):.0f}% | {res} |")
PY
[ "${KEEP:-0}" = 1 ] || rm -rf "$OUT"
