#!/usr/bin/env python3
"""moeforge's LoRA and QLoRA trainers against the independent one (tests/python/lora_reference.py), fp32, same
batches. QLoRA: the reference stores the base's attention and expert weights in NF4 itself (its own code of the
QLoRA paper's format, double quantisation included) and trains on those; equal losses then say that moeforge's
dequantised base equals QLoRA's, value for value (the NF4 base moves step 1's loss by 0.03 from the float one's;
the two trainers agree to 4.8e-7, the adapters to 6.2e-6).

DPO with `dpo.reference: adapters_off` (LoRA, the same targets): moeforge dumps each micro-batch's pairs (ids and loss
masks); the reference scores every completion alone (no packing) under the adapted weights and under the bare base,
and trains on the sigmoid DPO loss (beta 0.5, lr 3e-3; random pairs, so the loss moves both ways). Measured: losses
3.6e-6, adapters 9.7e-7; a beta 10% off moves them 8.3e-2 and 5.7e-3, a reference of zeros 36 and 1.7e-2. At lr
1e-2 with the long prompts first tried (completions truncated to one token) the trajectory swung 0.1 -> 1.4 and the
adapters drifted 1.7e-3 apart from step 3 on: a chaotic run amplifies fp32 order-of-operations noise, so the test
uses a DPO learning rate.

A small Mixtral (4 experts, top-2) is initialised and exported to Hugging Face; moeforge trains LoRA adapters on
every linear layer, the router and the LM head (experts at rank 4, the rest at 8, rank-stabilised scale, weight
decay, clipping that bites) for STEPS steps, dumping its batches and its initial adapters; the reference trains
the same adapters from the same start on the same batches. Per-step losses and the final adapters must agree.

Tolerance, derived: both sides compute in fp32 with different operation orders (LibTorch's fused LoRA path
x A^T B^T s + x W^T against the reference's merged W + s B A), so a step's loss differs by ~1e-6 relative and the
gradients by ~1e-5 relative (fp32 sums over ~10^3 terms, through 2 layers). AdamW divides each gradient by its
running RMS, so an update's relative error is that of the gradient, and after STEPS steps of lr <= 1e-2 an adapter
entry differs by at most ~STEPS * lr * 1e-5 plus what the drift of earlier steps feeds back; over 8 steps a
bound of 1e-5 absolute on the losses and 2e-6 + 1e-4 * |x| on the adapters leaves an order of magnitude over
the measured differences (AMD EPYC, 2 cores: losses 4.8e-7, adapters 1.1e-6). A real defect moves them by far
more; measured by breaking the reference on purpose: scale alpha / r instead of alpha / sqrt(r) 1.06 (loss) and
6.5e-2 (adapters), no weight decay 2.5e-3 and 3.0e-3, the learning rate one step late 0.25 and 6.0e-2.
usage: test_lora_reference.py MOEFORGE"""
import json, math, os, random, shutil, subprocess, sys, tempfile

try:
    import torch
except ImportError:  # python3-torch (Debian) is what scripts/setup.sh installs; a GPU machine's python may lack it
    print(f"lora reference: skipped: {sys.executable} cannot import torch")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mixtral_reference as ref  # noqa: E402  (its safetensors reader)
MF = os.path.abspath(sys.argv[1])
STEPS = 8
TOL_LOSS, TOL_ABS, TOL_REL = 1e-5, 2e-6, 1e-4


def run(cmd, env=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"FAILED ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def compare(work, method):
    """Trains `method` (lora | qlora | dpo: LoRA under DPO, reference adapters_off) in moeforge and in the reference
    from the same start; returns the problems."""
    s = {"steps": STEPS, "micro_batch": 4, "seq_len": 32, "lr": 1e-2, "min_lr": 1e-3, "warmup": 2,
         "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 0.5, "alpha": 16, "rslora": True}
    quant, stage, data = "", "pretrain", f"  dir: {work}/data\n"
    if method == "dpo":
        s["dpo"] = {"beta": 0.5}
        s["lr"], s["min_lr"] = 3e-3, 3e-4  # a DPO learning rate (1e-2 swings the loss 0.1 -> 1.4 -> 0.7)
        s["seq_len"] = 64  # prompt and completion whole (the chat template's markers take ~20 tokens)
        stage = "dpo\ndpo:\n  beta: 0.5\n  loss: sigmoid\n  reference: adapters_off\n  rpo_alpha: 0.0"
        data = f"  train: {work}/pairs.jsonl\n  val: {work}/pairs.jsonl\n"
    if method == "qlora":
        s["qlora"] = {"block_size": 64, "double_quant": True}
        quant = "  quant:\n    type: nf4\n    block_size: 64\n    double_quant: true\n"
    with open(f"{work}/{method}.yaml", "w") as f:
        f.write(f"stage: {stage}\ninit_from: {work}/base\ndata:\n{data}train:\n"
                f"  micro_batch_size: {s['micro_batch']}\n  seq_len: {s['seq_len']}\n  max_steps: {STEPS}\n"
                f"  log_interval: 1\n  eval_interval: {STEPS}\n  eval_batches: 1\n  checkpoint_interval: {STEPS}\n"
                f"  seed: 9\noptim:\n  lr: {s['lr']}\n  min_lr: {s['min_lr']}\n  warmup_steps: {s['warmup']}\n"
                f"  betas: {s['betas']}\n  eps: {s['eps']}\n  weight_decay: {s['weight_decay']}\n"
                f"  grad_clip: {s['grad_clip']}\n  schedule: cosine\nruntime:\n  precision: fp32\n  threads: 2\n"
                f"finetune:\n  method: {'lora' if method == 'dpo' else method}\n  lora:\n    rank: 8\n    alpha: {s['alpha']}\n    expert_rank: 4\n"
                f"    rslora: true\n    dropout: 0.0\n    targets: [all, lm_head]\n{quant}output_dir: {work}/{method}-run\n")
    dump = f"{work}/{method}-batches.bin"
    run([MF, "train", f"{work}/{method}.yaml"], env=dict(os.environ, MOEFORGE_DUMP_BATCHES=dump))
    json.dump(s, open(f"{work}/{method}-settings.json", "w"))
    run([sys.executable, os.path.join(HERE, "lora_reference.py"), f"{work}/hf", dump, f"{work}/{method}-settings.json",
         f"{work}/{method}-ref"])

    problems = []
    ours = [json.loads(l) for l in open(f"{work}/{method}-run/metrics.jsonl")]
    ours = [r["loss"] for r in ours if "loss" in r and "step" in r][:STEPS]
    theirs = json.load(open(f"{work}/{method}-ref.json"))["losses"]
    dl = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"{method} losses: moeforge  {['%.6f' % x for x in ours]}\n"
          f"{' ' * len(method)}         reference {['%.6f' % x for x in theirs]}\n"
          f"{' ' * len(method)}         worst difference {dl:.2e} (bound {TOL_LOSS})")
    if len(ours) != STEPS or dl > TOL_LOSS:
        problems.append(f"{method}: per-step losses differ")
    final = {}
    ckdir = f"{work}/{method}-run/checkpoints/step_{STEPS:08d}"
    for f in os.listdir(ckdir):
        if f.startswith(("model", "experts")) and f.endswith(".safetensors"):
            final.update(ref.read_safetensors(os.path.join(ckdir, f)))
    init = ref.read_safetensors(dump + ".init.safetensors")
    got = torch.load(f"{work}/{method}-ref.pt")
    worst, moved, n = 0.0, 0.0, 0
    for key, t in got.items():
        name, which = key.split("|")
        stored = name[: -len(".weight")] + f".lora_{which}.weight"
        diff = (final[stored] - t).abs()
        worst = max(worst, diff.max().item())
        moved = max(moved, (t - init[stored]).abs().max().item())
        n += 1
        if (diff > TOL_ABS + TOL_REL * t.abs()).any():
            problems.append(f"{method} {stored}: differs by {diff.max().item():.2e}")
    print(f"{method} adapters: {n} tensors, worst |moeforge - reference| {worst:.2e}; training moved them by up to "
          f"{moved:.3f}")
    if n == 0 or moved < 100 * TOL_REL:
        problems.append(f"{method}: no adapters compared, or they did not move")
    return problems


def main():
    work = tempfile.mkdtemp(prefix="moeforge_lora_ref_")
    rng = random.Random(2)
    words = "the cat a dog old man my sister river small bird sees likes follows finds paints moon red apple".split()
    with open(f"{work}/corpus.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": ". ".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(4))}) + "\n")
    run([MF, "tokenizer", "train", "--input", f"{work}/corpus.jsonl", "--vocab-size", 300, "--out", f"{work}/tok"])
    run([MF, "prepare", "--tokenizer", f"{work}/tok/tokenizer.model", "--input", f"{work}/corpus.jsonl",
         "--out", f"{work}/data", "--val-fraction", 0.1, "--seed", 1])
    with open(f"{work}/model.yaml", "w") as f:
        f.write("name: ref\nvocab_size: 320\nhidden_size: 32\nintermediate_size: 64\nnum_layers: 2\n"
                "num_attention_heads: 4\nnum_key_value_heads: 2\nmax_position_embeddings: 64\nrope_theta: 10000.0\n"
                "init_std: 0.1\nmoe:\n  num_experts: 4\n  num_experts_per_tok: 2\n  balance: none\n  z_loss_coef: 0.0\n"
                "  router_jitter: 0.0\n")
    run([MF, "init", f"{work}/model.yaml", "--out", f"{work}/base", "--seed", 5, "--tokenizer", f"{work}/tok/tokenizer.model"])
    run([MF, "export", f"{work}/base", "--format", "hf", "--dtype", "fp32", "--out", f"{work}/hf"])
    problems = []
    with open(f"{work}/pairs.jsonl", "w") as f:  # DPO: two random endings of a random prompt, neither learnable
        for _ in range(64):
            prompt, chosen, rejected = (" ".join(rng.choice(words) for _ in range(n)) for n in (4, rng.randint(2, 4),
                                                                                                  rng.randint(2, 4)))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    for method in os.environ.get("LORA_REFERENCE_METHODS", "lora qlora dpo").split():
        problems += compare(work, method)
    for p in problems[:10]:
        print("FAIL", p)
    if not problems:
        shutil.rmtree(work)
    print(f"lora reference: {len(problems)} problems" + (f" (work dir {work})" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
