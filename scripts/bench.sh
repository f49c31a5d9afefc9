#!/usr/bin/env bash
# Precision and recomputation benchmark: the figures of the README's "bf16 and activation recomputation"
# section, measured side by side in one run and printed as one table.
#   1. `moeforge bench moe` (one MoE block, forward + backward) in fp32 and bf16, against a plain matmul.
#   2. The quickstart recipe (configs/tiny.yaml on the Brown corpus) in fp32 and bf16: tokens/s, MFU against the
#      peak of the precision in use, final validation loss, peak RSS, steadiness (tokens/s of the last 100 steps over
#      steps 50-150) (STEPS, default the recipe's 500); and what `precision: auto`'s probe measures and picks.
#   3. configs/bench-h256.yaml (hidden 256, 4 layers, 8 experts top-2, seq 256, micro-batch 8) in fp32 and bf16,
#      BENCH_STEPS steps (default 60): tokens/s and MFU.
#   4. Peak memory (VmHWM) of a bf16 training run whose activations dominate (bench-h256 at micro-batch 32, seq 512),
#      with train.activation_checkpointing none / moe / full, MEM_STEPS steps (default 4).
#   5. The peer: scripts/peer_bench.py, a PyTorch eager trainer of the same model and batch (per-expert loop and
#      sorted dispatch, fp32 and bf16 autocast), PEER_STEPS timed steps each (default 20), against moeforge's best
#      quickstart tokens/s.
# usage: scripts/bench.sh   (from anywhere; builds the binary and prepares the quickstart data if needed;
#        KEEP=1 keeps the training runs that finished before, e.g. after an interruption)
# Each run is a separate process; nothing else should run on the machine meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-500}
BENCH_STEPS=${BENCH_STEPS:-60}
MEM_STEPS=${MEM_STEPS:-4}
MF=./build/moeforge
Q=runs/quickstart
OUT=runs/bench
if [ ! -x "$MF" ]; then TARGET=moeforge bash scripts/build.sh; fi
if [ ! -f "$Q/data/meta.json" ]; then
  bash data/get_brown.sh data/brown
  [ -f "$Q/tokenizer/tokenizer.model" ] || $MF tokenizer train --input data/brown/brown.jsonl --vocab-size 4096 --out "$Q/tokenizer"
  $MF prepare --tokenizer "$Q/tokenizer/tokenizer.model" --input data/brown/brown.jsonl --out "$Q/data" \
    --val-fraction 0.05 --seed 1234 --domain-field domain
fi
mkdir -p "$OUT"

run() {  # name, recipe, overrides...
  local name=$1 recipe=$2; shift 2
  if [ -n "${KEEP:-}" ] && [ -f "$OUT/$name/summary.json" ]; then echo "   (kept $OUT/$name)" >&2; return; fi
  rm -rf "$OUT/$name"
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  $MF train "$recipe" --set data.dir=$Q/data --set output_dir=$OUT/$name "${sets[@]}" > "$OUT/$name.log" 2>&1
}

echo "== bench moe" >&2
if [ -z "${KEEP:-}" ] || [ ! -s $OUT/moe_bf16.json ]; then
  $MF bench moe --dtype fp32 --json > $OUT/moe_fp32.json
  $MF bench moe --dtype bf16 --json > $OUT/moe_bf16.json
fi

for p in fp32 bf16; do
  echo "== quickstart $p ($STEPS steps)" >&2
  run qs_$p recipes/quickstart.yaml runtime.precision=$p train.max_steps=$STEPS train.checkpoint_interval=$STEPS
done
echo "== quickstart auto: the precision probe alone (1 step)" >&2
run qs_auto recipes/quickstart.yaml runtime.precision=auto train.max_steps=1 train.eval_interval=1 train.eval_batches=1 \
  train.checkpoint_interval=1
for p in fp32 bf16; do
  echo "== bench-h256 $p ($BENCH_STEPS steps)" >&2
  run h256_$p recipes/quickstart.yaml model=configs/bench-h256.yaml runtime.precision=$p train.micro_batch_size=8 \
    train.max_steps=$BENCH_STEPS train.eval_interval=$BENCH_STEPS train.checkpoint_interval=$BENCH_STEPS \
    train.eval_batches=4 optim.warmup_steps=10
done
for m in none moe full; do
  echo "== memory, activation_checkpointing $m ($MEM_STEPS steps)" >&2
  run mem_$m recipes/quickstart.yaml model=configs/bench-h256.yaml model.max_position_embeddings=512 \
    train.micro_batch_size=32 train.seq_len=512 train.max_steps=$MEM_STEPS train.log_interval=1 \
    train.eval_interval=$MEM_STEPS train.eval_batches=1 train.checkpoint_interval=$MEM_STEPS \
    train.activation_checkpointing=$m runtime.precision=bf16
done

echo "== peer: PyTorch eager trainer (4 variants, ${PEER_STEPS:-20} steps each)" >&2
if [ -z "${KEEP:-}" ] || [ ! -s $OUT/peer.jsonl ]; then
  /usr/bin/python3 scripts/peer_bench.py --all --data $Q/data --steps "${PEER_STEPS:-20}" > $OUT/peer.jsonl
fi

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def j(name): return json.load(open(f"{out}/{name}"))
print("| benchmark | fp32 | bf16 | bf16 / fp32 |")
print("|---|---|---|---|")
m32, m16 = j("moe_fp32.json"), j("moe_bf16.json")
print(f"| bench moe: MoE block GFLOP/s | {m32['moe_gflops']:.0f} | {m16['moe_gflops']:.0f} | {m16['moe_gflops']/m32['moe_gflops']:.2f}x |")
print(f"| bench moe: plain matmul GFLOP/s | {m32['matmul_gflops']:.0f} | {m16['matmul_gflops']:.0f} | {m16['matmul_gflops']/m32['matmul_gflops']:.2f}x |")
print(f"| bench moe: moe_vs_matmul | {m32['moe_vs_matmul']:.2f} | {m16['moe_vs_matmul']:.2f} | |")
for name, label in (("qs", "quickstart"), ("h256", "bench-h256")):
    a, b = j(f"{name}_fp32/summary.json"), j(f"{name}_bf16/summary.json")
    print(f"| {label}: tokens/s | {a['tokens_per_second']:.0f} | {b['tokens_per_second']:.0f} | {b['tokens_per_second']/a['tokens_per_second']:.2f}x |")
    print(f"| {label}: MFU (of the precision's matmul peak) | {100*a['mfu']:.1f}% of {a['peak_gflops']:.0f} | {100*b['mfu']:.1f}% of {b['peak_gflops']:.0f} | |")
    print(f"| {label}: final val loss ({a['steps']} steps) | {a['final_val_loss']:.4f} | {b['final_val_loss']:.4f} | {b['final_val_loss']-a['final_val_loss']:+.4f} |")
    print(f"| {label}: peak RSS | {a['peak_rss_bytes']/2**20:.0f} MiB | {b['peak_rss_bytes']/2**20:.0f} MiB | |")
    if a["steps"] >= 250:  # throughput steady: the last 100 steps against steps 50-150
        def steady(run):
            recs = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"tokens_per_second"' in l]
            tps = lambda lo, hi: [r["tokens_per_second"] for r in recs if lo < r["step"] <= hi and "tokens_per_second" in r]
            early, late = tps(50, 150), tps(a["steps"] - 100, a["steps"])
            return sum(late) / len(late) / (sum(early) / len(early))
        print(f"| {label}: tokens/s of the last 100 steps / steps 50-150 | {steady(name + '_fp32'):.2f} | {steady(name + '_bf16'):.2f} | |")
c = j("qs_auto/summary.json")["precision_choice"]
print(f"| quickstart: `precision: auto` probe, forward + backward ({c['probe_layers']} layers) | {1e3*c['fp32_step_s']:.0f} ms | {1e3*c['bf16_step_s']:.0f} ms | chose {c['chosen']} |")
print()
peer = [json.loads(l) for l in open(f"{out}/peer.jsonl") if l.strip()]
best_peer = next(p["peer_best"] for p in peer if "peer_best" in p)
print("| PyTorch eager peer (same model, batch, data) | tokens/s |")
print("|---|---|")
for p in peer:
    if "dispatch" in p: print(f"| {p['dispatch']} dispatch, {p['precision']} | {p['tokens_per_second']:.0f} |")
ours = max(j(f"qs_{p}/summary.json")["tokens_per_second"] for p in ("fp32", "bf16"))
print(f"| moeforge best quickstart / peer best | {ours / best_peer['tokens_per_second']:.2f}x |")
print()
print("| activation_checkpointing | peak RSS (VmHWM) | tokens/s | final train loss |")
print("|---|---|---|---|")
for m in ("none", "moe", "full"):
    s = j(f"mem_{m}/summary.json")
    print(f"| {m} | {s['peak_rss_bytes']/2**20:.0f} MiB | {s['tokens_per_second']:.0f} | {s['final_train_loss']:.4f} |")
EOF
