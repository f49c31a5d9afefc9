#!/usr/bin/env python3
# Compares two scripts/fingerprint.sh directories: metrics (timing fields dropped), summaries, configs, checkpoint files.
import json, os, sys, hashlib, filecmp
A, B = sys.argv[1], sys.argv[2]
# measurements, not behaviour: times, rates, memory
TIMING = {"tokens_per_second", "mfu", "elapsed_s", "peak_gflops", "peak_rss_bytes", "peak_rss_bytes_per_rank",
          "fp32_step_s", "bf16_step_s"}
bad = 0
def strip(o):
    if isinstance(o, dict): return {k: strip(v) for k, v in o.items() if k not in TIMING}
    return o
for root, dirs, files in os.walk(A):
    for f in sorted(files):
        pa = os.path.join(root, f); rel = os.path.relpath(pa, A); pb = os.path.join(B, rel)
        if rel.endswith(".log") or "tensorboard" in rel: continue
        if not os.path.exists(pb): print("missing in B:", rel); bad += 1; continue
        if f.endswith(".jsonl"):
            la = [strip(json.loads(l)) for l in open(pa)]; lb = [strip(json.loads(l)) for l in open(pb)]
            if la != lb:
                bad += 1; print("DIFF", rel)
                for x, y in zip(la, lb):
                    if x != y:
                        for k in x:
                            if x.get(k) != y.get(k): print("  step", x.get("step"), k, x.get(k), y.get(k))
                        break
        elif f.endswith(".json") and f != "reference_logps.json":
            try: ja, jb = strip(json.load(open(pa))), strip(json.load(open(pb)))
            except Exception: ja, jb = open(pa).read(), open(pb).read()
            if f == "manifest.json":  # these two are compared as files: paths and times differ by design
                for j in (ja, jb): [j.get("files", {}).pop(n, None) for n in ("recipe.yaml", "trainer_state.json")]
            if isinstance(ja, dict): ja.pop("checkpoint", None); jb.pop("checkpoint", None); ja.pop("reference", None); jb.pop("reference", None); ja.pop("data", None); jb.pop("data", None)
            if ja != jb: bad += 1; print("DIFF", rel, ja, jb)
        elif f.endswith((".yaml",)):
            ta = open(pa).read().replace(A, "X"); tb = open(pb).read().replace(B, "X")
            if ta != tb: bad += 1; print("DIFF", rel)
        elif f.endswith(".safetensors") or f == "tokenizer.model":
            if not filecmp.cmp(pa, pb, shallow=False): bad += 1; print("DIFF (bytes)", rel)
print("files differing:", bad)
sys.exit(1 if bad else 0)
