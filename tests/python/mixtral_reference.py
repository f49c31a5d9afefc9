#!/usr/bin/python3
"""An independent Mixtral forward pass (PyTorch + NumPy, no moeforge code) over an exported
Hugging Face directory: reads config.json and the safetensors files by hand, runs the tokens,
compares the logits with the ones moeforge computed. Exit 0 when they agree to 1e-4.

usage: mixtral_reference.py HF_DIR TOKENS_AND_LOGITS.bin
The .bin file: int64 B, T, V; int64 tokens[B*T]; float32 logits[B*T*V] (moeforge's)."""
import json
import os
import struct
import sys

import numpy as np
import torch


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", "export the reference test's directory with --dtype fp32"
        b, e = info["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[b:e], dtype=np.float32).reshape(info["shape"]).copy())
    return out


def load(hf_dir):
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    weights = {}
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for f in files:
        weights.update(read_safetensors(os.path.join(hf_dir, f)))
    return cfg, weights


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward(cfg, W, tokens):
    B, T = tokens.shape
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // nh
    dense = cfg["model_type"] == "mistral"  # MistralForCausalLM: one MLP per layer, no router
    # Qwen2MoeForCausalLM: biases on q, k, v; the router and experts under mlp.*; a shared expert beside the routed
    # ones, its output scaled by sigmoid(shared_expert_gate . h).
    qwen = cfg["model_type"] == "qwen2_moe"
    if qwen:
        assert cfg["norm_topk_prob"] and cfg["decoder_sparse_step"] == 1 and not cfg["mlp_only_layers"]
        assert not cfg["use_sliding_window"]
        E, K = cfg["num_experts"], cfg["num_experts_per_tok"]
    else:
        E, K = (1, 1) if dense else (cfg["num_local_experts"], cfg["num_experts_per_tok"])
    eps = cfg["rms_norm_eps"]
    window = None if qwen else cfg.get("sliding_window")
    x = W["model.embed_tokens.weight"][tokens]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(t):  # t [B, heads, T, D], rotate-half
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    i = torch.arange(T)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        def proj(n):
            y = h @ W[p + f"self_attn.{n}.weight"].T
            return y + W[p + f"self_attn.{n}.bias"] if qwen else y
        q = proj("q_proj").view(B, T, nh, D).transpose(1, 2)
        k = proj("k_proj").view(B, T, nkv, D).transpose(1, 2)
        v = proj("v_proj").view(B, T, nkv, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        s = (q @ k.transpose(-1, -2)) / (D ** 0.5)
        s = s.masked_fill(~allowed, float("-inf"))
        a = torch.softmax(s, -1) @ v
        x = x + a.transpose(1, 2).reshape(B, T, nh * D) @ W[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if dense:
            m = p + "mlp."
            x = x + (torch.nn.functional.silu(h @ W[m + "gate_proj.weight"].T) * (h @ W[m + "up_proj.weight"].T)) \
                @ W[m + "down_proj.weight"].T
            continue
        def swiglu(u, gate, up, down):  # one token
            return down @ (torch.nn.functional.silu(gate @ u) * (up @ u))
        if qwen:
            m, proj = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
        else:
            m, proj = p + "block_sparse_moe.", ("w1", "w3", "w2")
        probs = torch.softmax(h @ W[m + "gate.weight"].T, -1)
        top_p, top_i = probs.topk(K, -1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        y = torch.zeros_like(h)
        for b in range(B):
            for t in range(T):
                u = h[b, t]
                for j in range(K):
                    ex = m + f"experts.{int(top_i[b, t, j])}."
                    y[b, t] += top_p[b, t, j] * swiglu(u, *(W[ex + n + ".weight"] for n in proj))
                if qwen:
                    g = torch.sigmoid(W[m + "shared_expert_gate.weight"][0] @ u)
                    y[b, t] += g * swiglu(u, *(W[m + "shared_expert." + n + ".weight"] for n in proj))
        x = x + y
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["model.embed_tokens.weight"]
    return x @ head.T


def main():
    hf_dir, blob = sys.argv[1], sys.argv[2]
    raw = open(blob, "rb").read()
    B, T, V = struct.unpack("<qqq", raw[:24])
    tokens = torch.from_numpy(np.frombuffer(raw[24:24 + 8 * B * T], dtype=np.int64).reshape(B, T).copy())
    theirs = torch.from_numpy(np.frombuffer(raw[24 + 8 * B * T:], dtype=np.float32).reshape(B, T, V).copy())
    cfg, W = load(hf_dir)
    with torch.no_grad():
        ours = forward(cfg, W, tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"reference vs moeforge: max |logit difference| = {diff:.3e} over {B}x{T}x{V} logits")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()
