#!/usr/bin/python3
"""Applies a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) to a Hugging
Face Mixtral export by hand, the way PEFT merges one (W += scale * B @ A, scale = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora; r from rank_pattern where a module has its own), then runs the
independent Mixtral forward of mixtral_reference.py and compares the logits with the ones moeforge computed
for the LoRA checkpoint. No moeforge code: only the files. Exit 0 when they agree to 1e-4.

usage: peft_reference.py HF_DIR ADAPTER_DIR TOKENS_AND_LOGITS.bin"""
import json
import math
import os
import re
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mixtral_reference as ref  # noqa: E402  (the independent forward and safetensors reader)

PREFIX = "base_model.model."


def module_rank(cfg, module):
    """PEFT's rank_pattern: the first key whose regex matches the end of the module's name."""
    for key, r in cfg.get("rank_pattern", {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return r
    return cfg["r"]


def apply_adapter(cfg, weights, adapter):
    assert cfg["peft_type"] == "LORA", cfg["peft_type"]
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in adapter})
    targets = cfg["target_modules"]
    for m in modules:
        assert any(m == t or m.endswith("." + t) for t in targets), f"{m} is not among target_modules {targets}"
        A = adapter[PREFIX + m + ".lora_A.weight"].double()
        B = adapter[PREFIX + m + ".lora_B.weight"].double()
        r = module_rank(cfg, m)
        assert A.shape[0] == r and B.shape[1] == r, f"{m}: rank {A.shape[0]} but the config says {r}"
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        W = weights[m + ".weight"]
        weights[m + ".weight"] = (W.double() + scale * (B @ A)).float()
    return len(modules)


def main():
    hf_dir, adapter_dir, blob = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg, W = ref.load(hf_dir)
    acfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    adapter = ref.read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    n = apply_adapter(acfg, W, adapter)
    raw = open(blob, "rb").read()
    B, T, V = struct.unpack("<qqq", raw[:24])
    tokens = torch.from_numpy(np.frombuffer(raw[24:24 + 8 * B * T], dtype=np.int64).reshape(B, T).copy())
    theirs = torch.from_numpy(np.frombuffer(raw[24 + 8 * B * T:], dtype=np.float32).reshape(B, T, V).copy())
    with torch.no_grad():
        ours = ref.forward(cfg, W, tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"PEFT adapter ({n} modules) on the HF export vs moeforge's LoRA checkpoint: "
          f"max |logit difference| = {diff:.3e} over {B}x{T}x{V} logits")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()
