#!/usr/bin/python3
"""An independent LoRA trainer (python3-torch; no moeforge code, only files), PEFT's conventions: a frozen base from
a Hugging Face Mixtral export, adapters W' = W + scale * B @ A on the targeted modules (scale = alpha / r, or
alpha / sqrt(r) with rslora, r the module's own rank), dropout 0, trained with torch.optim.AdamW on the mean
next-token cross-entropy, global gradient-norm clipping and moeforge's documented schedule (linear warm-up, then
cosine to min_lr). The forward pass is mixtral_reference.forward, fed the adapted weights.

It starts from the adapters moeforge had before its first step and reads the micro-batches moeforge trained on
(both written by moeforge's test hook MOEFORGE_DUMP_BATCHES: FILE.init.safetensors and FILE), and writes the
per-step losses and the final adapters (JSON and safetensors-free .pt) for the caller to compare.

DPO (settings "dpo": {"beta"}): the objective is the sigmoid DPO loss of Rafailov et al. 2023,
-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) averaged over the micro-batch's pairs, each log-prob the sum
over a completion's target tokens; the reference is the base with the adapters off (moeforge's
dpo.reference: adapters_off), and each sequence runs alone (no packing), so that moeforge's packed rows are checked
too. The dump is then JSON lines, one per micro-batch: {"pairs": [{"chosen": {"ids", "mask"}, "rejected": ...}]}.

usage: lora_reference.py HF_DIR DUMP_FILE SETTINGS.json OUT_PREFIX
SETTINGS: {"steps", "micro_batch", "seq_len", "lr", "min_lr", "warmup", "betas", "eps", "weight_decay", "grad_clip",
           "alpha", "rslora", "qlora": {"block_size", "double_quant"} (QLoRA: an NF4 base; absent for LoRA),
           "dpo": {"beta"} (absent: next-token prediction)}"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mixtral_reference as ref  # noqa: E402

torch.set_num_threads(2)


# QLoRA's NF4 levels (Dettmers et al. 2023, appendix; the bitsandbytes table).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def nf4_roundtrip(w, block, double_quant):
    """QLoRA's storage of a weight, dequantised: the flattened weight in blocks of `block` (the last zero-padded),
    each element the NF4 level nearest to w / absmax (ties to the lower level), times the block's absmax; with
    double quantisation the absmax values are stored as int8 after removing their mean, one scale (max |.| / 127)
    per 256 blocks, and dequantised (clamped at 0) before use."""
    flat = w.reshape(-1).float()
    nb = (flat.numel() + block - 1) // block
    blocks = torch.nn.functional.pad(flat, (0, nb * block - flat.numel())).view(nb, block)
    absmax = blocks.abs().amax(1)
    unit = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    dist = (unit[..., None] - NF4).abs()
    idx = dist.argmin(-1)  # first minimum: the lower level on a tie
    if double_quant:
        mean = absmax.mean()
        groups = (nb + 255) // 256
        centered = torch.nn.functional.pad(absmax - mean, (0, groups * 256 - nb)).view(groups, 256)
        scale = centered.abs().amax(1) / 127.0
        codes = torch.round(centered / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).clamp(-127, 127)
        absmax = (codes * scale[:, None] + mean).reshape(-1)[:nb].clamp_min(0)
    return (NF4[idx] * absmax[:, None]).reshape(-1)[: flat.numel()].view(w.shape)


def lr_at(step, total, s):
    """Linear warm-up to lr, then cosine from lr to min_lr over the remaining steps (docs/keys.md: optim.*)."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    span = max(1, total - s["warmup"] - 1)
    p = min(1.0, (step - s["warmup"]) / span)
    return s["min_lr"] + (s["lr"] - s["min_lr"]) * 0.5 * (1 + math.cos(math.pi * p))


def completion_logp(cfg, W, side):
    """Sum of log p(token) over the completion's target tokens (mask 1), the sequence alone."""
    ids = torch.tensor(side["ids"], dtype=torch.long)
    mask = torch.tensor(side["mask"][1:], dtype=torch.float32)
    logits = ref.forward(cfg, W, ids[None, :-1])[0]
    logp = torch.log_softmax(logits.float(), -1).gather(1, ids[1:, None]).squeeze(1)
    return (logp * mask).sum()


def dpo_loss(cfg, W, Wa, pairs, beta):
    """Sigmoid DPO over one micro-batch; the reference is the base W (adapters off), without gradient."""
    with torch.no_grad():
        ref_c = torch.stack([completion_logp(cfg, W, p["chosen"]) for p in pairs])
        ref_r = torch.stack([completion_logp(cfg, W, p["rejected"]) for p in pairs])
    pc = torch.stack([completion_logp(cfg, Wa, p["chosen"]) for p in pairs])
    pr = torch.stack([completion_logp(cfg, Wa, p["rejected"]) for p in pairs])
    return -torch.nn.functional.logsigmoid(beta * ((pc - ref_c) - (pr - ref_r))).mean()


def main():
    hf_dir, dump, settings_path, out = sys.argv[1:5]
    s = json.load(open(settings_path))
    cfg, W = ref.load(hf_dir)
    if s.get("qlora"):  # the base's attention and expert weights as QLoRA stores them (router and head stay float)
        q = s["qlora"]
        for n in list(W):
            if any(n.endswith(f"self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                    any(n.endswith(f".{p}.weight") and ".experts." in n for p in ("w1", "w2", "w3")):
                W[n] = nf4_roundtrip(W[n], q["block_size"], q["double_quant"])
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
    dpo = s.get("dpo")
    if dpo:
        data = [json.loads(line)["pairs"] for line in open(dump)]
    else:
        data = np.fromfile(dump, dtype=np.int64).reshape(-1, 2, mb, T)
    losses = []
    for step in range(s["steps"]):
        Wa = dict(W)
        for name, (A, B, scale) in adapters.items():
            Wa[name] = W[name] + scale * (B @ A)
        if dpo:
            loss = dpo_loss(cfg, W, Wa, data[step], dpo["beta"])
        else:
            inputs, targets = (torch.from_numpy(data[step, i].copy()) for i in (0, 1))
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
