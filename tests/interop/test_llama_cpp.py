#!/usr/bin/env python3
"""moeforge's GGUF in the real llama.cpp (node-llama-cpp's prebuilt CPU build, installed by scripts/setup.sh).

Trains a small model (MoE, and a dense one), exports it to GGUF in every type the export writes, and checks in
llama.cpp: the file loads; tokenizing texts (BOS, byte fallback, non-ASCII, leading spaces) gives exactly the
SentencePiece ids moeforge gives; per-position next-token log-probabilities equal `moeforge eval --token-logprobs`
(f32 within TOL_F32, derived below; f16 / bf16 within a looser bound); greedy generation gives the tokens of
`moeforge generate --temperature 0`; quantized files (q8_0, q4_0) score a held-out text within a stated bound of
the f32 file's loss; a LoRA checkpoint exported with --format gguf-lora, applied by llama.cpp to the base's file,
gives the merged export's log-probabilities. A model with shared experts is refused by the export with one line
(exit 2).
usage: test_llama_cpp.py MOEFORGE   (exit 77 = skipped: node-llama-cpp is not installed)"""
import json, math, os, random, shutil, subprocess, sys, tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MF = os.path.abspath(sys.argv[1])
NODE_DIR = os.path.join(ROOT, "third_party", "node-llama-cpp")
CHECK = os.path.join(ROOT, "tests", "interop", "llama_check.mjs")

# Tolerances. Both sides compute in fp32 from the same fp32 weights, in different orders (llama.cpp's ggml
# kernels against LibTorch's BLAS). A logit is a sum of H products through L layers; fp32 rounding moves each
# accumulation by about sqrt(n) * 2^-24 relative, so over the model's ~10 accumulation levels (H = 64, I = 128,
# attention over <= 64 positions, V = 512 softmax) a logit of magnitude <= 20 moves by ~20 * 10 * 16 * 6e-8
# ~ 2e-4 in the worst case. A log-probability is a logit minus a log-sum-exp, so ~2x that: TOL_F32 = 5e-4.
TOL_F32 = 5e-4
# f16 / bf16 weights: each weight rounded to 11 / 8 significant bits (relative 2^-11 / 2^-8); the logits then
# move by about that fraction of their size in the mean, more at the extremes: bounds of 0.02 / 0.15 nats per
# position, and the mean over the text 5x tighter.
TOL_HALF = {"f16": 0.02, "bf16": 0.15}
# Quantized files: the mean loss over the held-out text against the f32 file's. Measured at this size (printed by
# the test; AMD EPYC, 2 cores): q8_0 moved it by 0.0012 (MoE) and 0.0046 (dense), q4_0 by 0.0085 and 0.045; the
# bounds are 2-3x the larger. (f32: the worst per-position difference measured 1.0e-5 and 3.8e-6, under TOL_F32.)
TOL_QUANT = {"q8_0": 0.01, "q4_0": 0.15}

WORDS = ("the cat a dog old man my sister river small bird sees likes follows finds paints remembers moon red apple "
         "long road quiet town green boat winter sky café naïve façade über Grüße señor").split()
HELD_OUT = "The old man finds a green boat. My sister paints the quiet town in winter.\n  A café, naïve and über-quiet: Grüße aus Köln! 日本語 ✓ 42°"
TOKENIZE_CASES = [
    "Hello world",
    " leading space",
    "   three leading spaces and  two inside",
    "café naïve façade über Grüße señor",
    "日本語のテキスト ✓ €100 — emoji 🙂",
    "line one\nline two\n\ttabbed",
    HELD_OUT,
]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"FAILED ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def mf(*args):
    return run([MF] + [str(a) for a in args])


def llama(job, work):
    path = os.path.join(work, "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    out = run(["node", CHECK, path])
    return json.loads(out.strip().splitlines()[-1])


def corpus(path, n=400, seed=5):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            sents = []
            for _ in range(rng.randint(2, 6)):
                s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
                sents.append(s[0].upper() + s[1:] + ".")
            f.write(json.dumps({"text": " ".join(sents)}, ensure_ascii=False) + "\n")


def model_yaml(name, experts, shared=0):
    moe = f"  moe:\n    num_experts: {experts}\n    num_experts_per_tok: {min(2, experts)}\n    balance: aux_loss\n" \
          f"    aux_loss_coef: 0.01\n    z_loss_coef: 0.001\n"
    if shared:
        moe += f"    num_shared_experts: {shared}\n"
    return (f"model:\n  name: {name}\n  vocab_size: 512\n  hidden_size: 64\n  intermediate_size: 128\n  num_layers: 2\n"
            f"  num_attention_heads: 4\n  num_key_value_heads: 2\n  max_position_embeddings: 256\n  rope_theta: 10000.0\n"
            + (moe if experts > 1 else "  moe:\n    num_experts: 1\n    num_experts_per_tok: 1\n    balance: none\n"))


def train(work, data, name, experts, shared=0):
    recipe = os.path.join(work, f"{name}.yaml")
    with open(recipe, "w") as f:
        f.write(model_yaml(name, experts, shared) +
                f"stage: pretrain\ndata:\n  dir: {data}\ntrain:\n  micro_batch_size: 8\n  seq_len: 64\n  max_steps: 80\n"
                f"  log_interval: 40\n  eval_interval: 80\n  eval_batches: 2\n  checkpoint_interval: 80\n  seed: 3\n"
                f"optim:\n  lr: 1.0e-2\n  min_lr: 1.0e-3\n  warmup_steps: 5\nruntime:\n  precision: fp32\n  threads: 2\n"
                f"output_dir: {work}/{name}\n")
    mf("train", recipe)
    return f"{work}/{name}/checkpoints/step_00000080"


def train_lora(work, data, name, base):
    """LoRA on every linear layer and the LM head, experts at their own rank, rank-stabilised scale: every way a
    module's scale can differ from alpha / r."""
    recipe = os.path.join(work, f"{name}-lora.yaml")
    with open(recipe, "w") as f:
        f.write(f"stage: pretrain\ninit_from: {base}\ndata:\n  dir: {data}\ntrain:\n  micro_batch_size: 8\n  seq_len: 64\n"
                f"  max_steps: 30\n  log_interval: 30\n  eval_interval: 30\n  eval_batches: 2\n  checkpoint_interval: 30\n"
                f"  seed: 4\noptim:\n  lr: 2.0e-2\n  min_lr: 2.0e-3\n  warmup_steps: 2\nruntime:\n  precision: fp32\n"
                f"  threads: 2\nfinetune:\n  method: lora\n  lora:\n    rank: 8\n    alpha: 16\n    expert_rank: 4\n"
                f"    rslora: true\n    targets: [all, lm_head]\noutput_dir: {work}/{name}-lora\n")
    mf("train", recipe)
    return f"{work}/{name}-lora/checkpoints/step_00000030"


def eval_logprobs(ckpt, text, work):
    path = os.path.join(work, "text.txt")
    with open(path, "w") as f:
        f.write(text)
    return json.loads(mf("eval", ckpt, "--text", path, "--json", "--token-logprobs", "--precision", "fp32",
                       "--seq-len", 256))  # one window: llama.cpp sees the whole text


def main():
    if not os.path.exists(os.path.join(NODE_DIR, "node_modules", "node-llama-cpp", "package.json")) or not shutil.which("node"):
        print("interop: skipped: node-llama-cpp is not installed in third_party/node-llama-cpp (scripts/setup.sh "
              "installs it with npm; npm could not)")
        return 77
    work = tempfile.mkdtemp(prefix="moeforge_interop_")
    problems = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            problems.append(what)

    corpus(os.path.join(work, "corpus.jsonl"))
    mf("tokenizer", "train", "--input", f"{work}/corpus.jsonl", "--vocab-size", 400, "--out", f"{work}/tok")
    mf("prepare", "--tokenizer", f"{work}/tok/tokenizer.model", "--input", f"{work}/corpus.jsonl", "--out", f"{work}/data",
       "--val-fraction", 0.1, "--seed", 1)
    for name, experts in (("mixtral", 4), ("dense", 1)):
        ckpt = train(work, f"{work}/data", name, experts)
        files = {}
        for dtype in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            files[dtype] = f"{work}/{name}-{dtype}.gguf"
            mf("export", ckpt, "--format", "gguf", "--dtype", dtype, "--out", files[dtype])
        ref = {t: eval_logprobs(ckpt, t, work) for t in TOKENIZE_CASES}
        # 1. tokenization, in the f32 file (the vocabulary is the same in all)
        for t in TOKENIZE_CASES:
            got = llama({"model": files["f32"], "text": t}, work)
            check(got["ids"] == ref[t]["ids"], f"{name}: llama.cpp tokenizes {t!r} as SentencePiece does"
                  + ("" if got["ids"] == ref[t]["ids"] else f": {got['ids']} vs {ref[t]['ids']}"))
        # 2. per-position log-probabilities
        losses = {}
        for dtype, path in files.items():
            got = llama({"model": path, "text": HELD_OUT}, work)
            want = ref[HELD_OUT]["logprobs"]
            diff = [abs(a - b) for a, b in zip(got["logprobs"], want)]
            losses[dtype] = -sum(got["logprobs"]) / len(got["logprobs"])
            worst = max(diff)
            if dtype == "f32":
                check(len(diff) == len(want) and worst <= TOL_F32,
                      f"{name} f32: {len(diff)} log-probs equal moeforge eval's, worst |diff| {worst:.2e} <= {TOL_F32}")
            elif dtype in TOL_HALF:
                mean = sum(diff) / len(diff)
                check(worst <= TOL_HALF[dtype] and mean <= TOL_HALF[dtype] / 5,
                      f"{name} {dtype}: worst |diff| {worst:.4f} <= {TOL_HALF[dtype]}, mean {mean:.4f} <= {TOL_HALF[dtype] / 5}")
        eval_loss = -sum(ref[HELD_OUT]["logprobs"]) / len(ref[HELD_OUT]["logprobs"])
        print(f"     {name}: held-out loss moeforge {eval_loss:.5f}, llama.cpp " +
              ", ".join(f"{d} {l:.5f}" for d, l in losses.items()))
        for dtype, bound in TOL_QUANT.items():
            d = abs(losses[dtype] - losses["f32"])
            check(d <= bound, f"{name} {dtype}: held-out loss within {bound} of the f32 file's ({d:.5f})")
        # 3. LoRA: the adapters as a llama.cpp adapter on the base's f32 file, against the merged export and eval
        lora = train_lora(work, f"{work}/data", name, ckpt)
        mf("export", lora, "--format", "gguf", "--dtype", "f32", "--out", f"{work}/{name}-merged.gguf")
        mf("export", lora, "--format", "gguf-lora", "--out", f"{work}/{name}-lora.gguf")
        merged = llama({"model": f"{work}/{name}-merged.gguf", "text": HELD_OUT}, work)["logprobs"]
        adapted = llama({"model": files["f32"], "lora": f"{work}/{name}-lora.gguf", "text": HELD_OUT}, work)["logprobs"]
        tuned = eval_logprobs(lora, HELD_OUT, work)["logprobs"]
        moved = max(abs(a - b) for a, b in zip(tuned, ref[HELD_OUT]["logprobs"]))
        worst = max(abs(a - b) for a, b in zip(adapted, merged))
        worst_eval = max(abs(a - b) for a, b in zip(adapted, tuned))
        check(len(adapted) == len(merged) and worst <= TOL_F32 and worst_eval <= TOL_F32 and moved > 100 * TOL_F32,
              f"{name}: llama.cpp with the GGUF LoRA adapter equals the merged export (worst {worst:.2e}) and "
              f"moeforge eval of the adapter checkpoint ({worst_eval:.2e}); the adapters moved log-probs by {moved:.3f}")
        # 4. greedy generation
        prompt, n = "The old man", 24
        want = json.loads(mf("generate", ckpt, "--prompt", prompt, "--max-new-tokens", n, "--temperature", 0,
                             "--json", "--precision", "fp32"))
        got = llama({"model": files["f32"], "prompt": prompt, "max_new_tokens": n}, work)
        check(got["prompt_ids"] == want["prompt_ids"] and got["generated"][:len(want["ids"])] == want["ids"],
              f"{name}: greedy generation in llama.cpp equals moeforge generate ({len(want['ids'])} tokens)"
              + ("" if got["generated"][:len(want["ids"])] == want["ids"] else f": {got['generated']} vs {want['ids']}"))
    # 5. shared experts: refused clearly, nothing written
    shared = train(work, f"{work}/data", "shared", 4, shared=1)
    r = subprocess.run([MF, "export", shared, "--format", "gguf", "--out", f"{work}/shared.gguf"], capture_output=True,
                       text=True)
    check(r.returncode == 2 and "shared experts" in r.stderr and len(r.stderr.strip().splitlines()) == 1
          and not os.path.exists(f"{work}/shared.gguf"),
          f"shared experts: export refused in one line, exit {r.returncode}: {r.stderr.strip()[:160]}")
    if not problems and not os.environ.get("MOEFORGE_KEEP_TMP"):
        shutil.rmtree(work)
    print(f"interop: {len(problems)} problems" + (f" (work dir {work})" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
