#!/usr/bin/python3
"""An independent LoRA trainer (python3-torch; no moeforge code, only files), PEFT's conventions: a frozen base from
a Hugging Face Mixtral export, adapters W' = W + scale * B @ A on the targeted modules (scale = alpha / r, or
alpha / sqrt(r) with rslora, r the module's own rank), dropout 0, trained with torch.optim.AdamW on the mean
next-token cross-entropy, global gradient-norm clipping and moeforge's documented schedule (linear warm-up, then
cosine to min_lr). The forward pass is mixtral_reference.forward, fed the adapted weights.

It starts from the adapters moeforge had before its first step and reads the micro-batches moeforge trained on
(both written by moeforge's test hook MOEFORGE_DUMP_BATCHES: FILE.init.safetensors and FILE), and writes the
per-step losses and the final adapters (JSON and safetensors-free .pt) for the caller to compare.

usage: lora_reference.py HF_DIR DUMP_FILE SETTINGS.json OUT_PREFIX
SETTINGS: {"steps", "micro_batch", "seq_len", "lr", "min_lr", "warmup", "betas", "eps", "weight_decay", "grad_clip",
           "alpha", "rslora"}"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mixtral_reference as ref  # noqa: E402

torch.set_num_threads(2)


def lr_at(step, total, s):
    """Linear warm-up to lr, then cosine from lr to min_lr over the remaining steps (docs/keys.md: optim.*)."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    span = max(1, total - s["warmup"] - 1)
    p = min(1.0, (step - s["warmup"]) / span)
    return s["min_lr"] + (s["lr"] - s["min_lr"]) * 0.5 * (1 + math.cos(math.pi * p))


def main():
    hf_dir, dump, settings_path, out = sys.argv[1:5]
    s = json.load(open(settings_path))
    cfg, W = ref.load(hf_dir)
    init = ref.read_safetensors(dump + ".init.safetensors")
    adapters = {}  # module weight name -> (A, B, scale)
    for n, a in init.items():
        if ".lora_A.weight" not in n:
            continue
        stem = n[: n.index(".lora_A.weight")]
        A = a.clone().float().requires_grad_(True)
        B = init[stem + ".lora_B.weight"].clone().float().requires_grad_(True)
        r = A.shape[0]
        scale = s["alpha"] / math.sqrt(r) if s["rslora"] else s["alpha"] / r
        adapters[stem + ".weight"] = (A, B, scale)
    params = [t for A, B, _ in adapters.values() for t in (A, B)]
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"], weight_decay=s["weight_decay"])
    mb, T = s["micro_batch"], s["seq_len"]
    data = np.fromfile(dump, dtype=np.int64).reshape(-1, 2, mb, T)
    losses = []
    for step in range(s["steps"]):
        inputs, targets = (torch.from_numpy(data[step, i].copy()) for i in (0, 1))
        Wa = dict(W)
        for name, (A, B, scale) in adapters.items():
            Wa[name] = W[name] + scale * (B @ A)
        logits = ref.forward(cfg, Wa, inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if s["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s["steps"], s)
        opt.step()
        losses.append(loss.item())
    json.dump({"losses": losses}, open(out + ".json", "w"))
    torch.save({n + "|A": A.detach() for n, (A, B, _) in adapters.items()} |
               {n + "|B": B.detach() for n, (A, B, _) in adapters.items()}, out + ".pt")


if __name__ == "__main__":
    main()
