#!/usr/bin/python3
"""PyTorch eager "peer" trainer of moeforge's quickstart model, for throughput comparison.

An independent implementation, in plain PyTorch eager mode, of the Mixtral-style MoE of a moeforge model
config (default configs/tiny.yaml) trained on the quickstart's batch shape (16 x 256 tokens) with AdamW and
gradient clipping. scripts/bench.sh runs it next to `moeforge train` on the same machine and reads the JSON
lines it prints on stdout (one per variant, then {"peer_best": {...}} with --all) to put moeforge's tokens/s
beside those of a straightforward PyTorch trainer.

Variants: --dispatch loop (HF-style loop over experts with torch.where + index_add_) or sorted (assignments
argsorted by expert, one gather, contiguous per-expert slices); --precision fp32 or bf16 (CPU autocast around
the forward, fp32 master weights, loss in fp32). --check verifies that both dispatches compute the same loss
and gradients. Data: seeded random token ids, or --data DIR with the train shards of `moeforge prepare`.

The load-balancing loss follows HF Mixtral and moeforge's load_balancing_loss: pooled over all layers,
E * sum_e f_e * P_e with f_e = (top-k slots routed to e) / tokens; the z-loss is the pooled mean of
logsumexp(router logits)^2.

Run it with Debian's interpreter (/usr/bin/python3, which has torch): stdlib + torch only.
usage: /usr/bin/python3 scripts/peer_bench.py [--all | --check] [--dispatch loop|sorted] [--precision fp32|bf16]
       [--config PATH] [--data DIR] [--batch 16] [--seq 256] [--steps 30] [--warmup 5] [--threads T] [--seed 0]
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- config
def _scalar(v):
    if v in ("null", "~", ""):
        return None
    if v in ("true", "false"):
        return v == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v.strip("'\"")


def parse_simple_yaml(text):
    """`key: value` lines with one level of nesting (e.g. the `moe:` block), `#` comments, null -> None."""
    root, block = {}, None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        key, sep, value = line.strip().partition(":")
        if not sep:
            raise ValueError(f"not a 'key: value' line: {raw!r}")
        nested = line[0] in " \t"
        if nested and block is None:
            raise ValueError(f"indented line outside a block: {raw!r}")
        if not nested:
            block = None
        value = value.strip()
        if nested:
            block[key] = _scalar(value)
        elif value == "":
            block = root[key] = {}
        else:
            root[key] = _scalar(value)
    return root


def load_config(path):
    with open(path) as f:
        text = f.read()
    try:
        import yaml
        cfg = yaml.safe_load(text)
    except ImportError:
        cfg = parse_simple_yaml(text)
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.get("sliding_window") is not None:
        raise ValueError(f"{path}: sliding_window is not supported by the peer")
    return cfg


# ---------------------------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.q = nn.Linear(c["hidden_size"], self.h * self.d, bias=False)
        self.k = nn.Linear(c["hidden_size"], self.kv * self.d, bias=False)
        self.v = nn.Linear(c["hidden_size"], self.kv * self.d, bias=False)
        self.o = nn.Linear(self.h * self.d, c["hidden_size"], bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.h // self.kv  # query head i reads kv head i // rep, as HF repeat_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
        probs = torch.softmax(scores.float().masked_fill(mask, float("-inf")), dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(B, T, self.h * self.d))


class Expert(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, c, dispatch):
        super().__init__()
        m = c["moe"]
        self.E, self.k, self.dispatch = m["num_experts"], m["num_experts_per_tok"], dispatch
        self.router = nn.Linear(c["hidden_size"], self.E, bias=False)
        self.experts = nn.ModuleList(Expert(c["hidden_size"], c["intermediate_size"]) for _ in range(self.E))

    def forward(self, x):  # x [N, H] -> (out [N, H] fp32, router logits [N, E] fp32, top-k ids [N, k])
        logits = self.router(x).float()
        probs = torch.softmax(logits, dim=-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros(x.shape, dtype=torch.float32)
        if self.dispatch == "loop":
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where(idx == e)
                if tok.numel():
                    out.index_add_(0, tok, expert(x[tok]).float() * w[tok, slot, None])
        else:
            flat = idx.reshape(-1)
            _, order = torch.sort(flat, stable=True)
            tok = order // self.k
            counts = torch.bincount(flat, minlength=self.E).tolist()
            pieces = torch.split(x[tok], counts)
            y = torch.cat([ex(p) for ex, p in zip(self.experts, pieces) if p.shape[0]]).float()
            out.index_add_(0, tok, y * w.reshape(-1)[order, None])
        return out, logits, idx


class Block(nn.Module):
    def __init__(self, c, dispatch):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(c["hidden_size"], c["rms_norm_eps"]), RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.attn, self.moe = Attention(c), SparseMoE(c, dispatch)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        y, logits, idx = self.moe(self.norm2(x).reshape(-1, x.shape[-1]))
        return x + y.view(x.shape), logits, idx


class Mixtral(nn.Module):
    def __init__(self, c, dispatch):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c, dispatch) for _ in range(c["num_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=c["init_std"])
        if c.get("tie_word_embeddings"):
            self.lm_head.weight = self.embed.weight
        self._rope = {}

    def rope(self, T):
        if T not in self._rope:
            d = self.c["head_dim"]
            inv = 1.0 / self.c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
            emb = torch.cat((ang, ang), dim=-1)
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            self._rope[T] = (emb.cos().float(), emb.sin().float(), mask)
        return self._rope[T]

    def forward(self, ids, targets):
        """Returns (total loss, cross entropy), both fp32 scalars."""
        cos, sin, mask = self.rope(ids.shape[1])
        x, all_logits, all_idx = self.embed(ids), [], []
        for layer in self.layers:
            x, logits, idx = layer(x, cos, sin, mask)
            all_logits.append(logits)
            all_idx.append(idx)
        logits = self.lm_head(self.norm(x)).float()
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        m, E = self.c["moe"], self.c["moe"]["num_experts"]
        router_logits, idx = torch.cat(all_logits), torch.cat(all_idx)
        f = F.one_hot(idx, E).float().sum(1).mean(0)                 # [E]: slots per token routed to e
        P = torch.softmax(router_logits, dim=-1).mean(0)            # [E]: mean router probability
        aux = E * (f * P).sum()
        z = torch.logsumexp(router_logits, dim=-1).pow(2).mean()
        return ce + m["aux_loss_coef"] * aux + m["z_loss_coef"] * z, ce


# ---------------------------------------------------------------------------------------------- data
def read_shard_tokens(path):
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 32 or buf[:8] != b"MFTOKS01":
        raise ValueError(f"{path}: not a moeforge token shard (bad magic)")
    tb, zero, n, docs = struct.unpack_from("<IIQQ", buf, 8)
    if tb not in (2, 4) or zero != 0:
        raise ValueError(f"{path}: bad header (token_bytes {tb}, reserved {zero})")
    tok_bytes = (n * tb + 7) // 8 * 8
    want = 32 + tok_bytes + 8 * (docs + 1) + 4 * docs
    if len(buf) != want:
        raise ValueError(f"{path}: {len(buf)} bytes, the header ({n} tokens, {docs} docs) implies {want}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    raw = torch.frombuffer(bytearray(buf[32:32 + n * tb]), dtype=torch.int16 if tb == 2 else torch.int32)
    return raw.long() & 0xFFFF if tb == 2 else raw.long()


def load_train_tokens(data_dir, vocab):
    meta_path = os.path.join(data_dir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    shards = meta.get("splits", {}).get("train", {}).get("shards")
    if not shards:
        raise ValueError(f"{meta_path}: no splits.train.shards")
    tokens = torch.cat([read_shard_tokens(os.path.join(data_dir, s)) for s in shards])
    if tokens.numel() and int(tokens.max()) >= vocab:
        raise ValueError(f"{data_dir}: token id {int(tokens.max())} >= the model's vocab_size {vocab}")
    return tokens


class Batches:
    def __init__(self, args, vocab, seed):
        self.B, self.T, self.vocab, self.tokens = args.batch, args.seq, vocab, args.tokens
        self.g = torch.Generator().manual_seed(seed)
        if self.tokens is not None and self.tokens.numel() < self.T + 1:
            raise ValueError(f"{args.data}: {self.tokens.numel()} train tokens, fewer than seq + 1 = {self.T + 1}")

    def next(self):
        if self.tokens is None:
            w = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=self.g)
        else:
            start = torch.randint(0, self.tokens.numel() - self.T, (self.B,), generator=self.g)
            w = self.tokens[start[:, None] + torch.arange(self.T + 1)]
        return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------------------------------------- runs
def build(cfg, dispatch, seed):
    torch.manual_seed(seed)
    model = Mixtral(cfg, dispatch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    return model, opt


def train_step(model, opt, batch, precision):
    ids, targets = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, ce = model(ids, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item()


def bench(cfg, args, dispatch, precision):
    model, opt = build(cfg, dispatch, args.seed)
    batches = Batches(args, cfg["vocab_size"], args.seed)
    for _ in range(args.warmup):
        train_step(model, opt, batches.next(), precision)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, opt, batches.next(), precision)
    dt = time.perf_counter() - t0
    tokens = args.batch * args.seq
    return {"peer": "pytorch-eager", "dispatch": dispatch, "precision": precision, "threads": args.threads,
            "steps": args.steps, "warmup": args.warmup, "tokens_per_step": tokens,
            "tokens_per_second": tokens * args.steps / dt, "seconds_per_step": dt / args.steps,
            "final_loss": loss, "data": args.data or "random", "config": args.config,
            "torch_version": torch.__version__}


def check(cfg, args):
    batch = Batches(args, cfg["vocab_size"], args.seed).next()
    runs = {}
    for d in ("loop", "sorted"):
        model, _ = build(cfg, d, args.seed)
        loss, _ = model(*batch)
        loss.backward()
        runs[d] = (loss.item(), dict(model.named_parameters()))
    (la, pa), (lb, pb) = runs["loop"], runs["sorted"]
    ok = abs(la - lb) <= 1e-5 * abs(la)
    print(f"loss loop {la:.8f} sorted {lb:.8f} {'ok' if ok else 'MISMATCH'}")
    last, names = cfg["num_layers"] - 1, ["embed.weight", "lm_head.weight", "layers.0.moe.router.weight"]
    names += [f"layers.0.moe.experts.{e}.w1.weight" for e in range(cfg["moe"]["num_experts"])]
    names += [f"layers.{last}.moe.experts.0.w2.weight", f"layers.{last}.attn.q.weight"]
    for n in names:
        ga, gb = pa[n].grad, pb[n].grad
        rel = float((ga - gb).norm() / gb.norm().clamp_min(1e-30))
        ok &= rel <= 1e-4
        print(f"grad {n}: relative difference {rel:.2e} {'ok' if rel <= 1e-4 else 'MISMATCH'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def at_least(lo):
    def parse(s):
        v = int(s)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def main():
    p = argparse.ArgumentParser(description="PyTorch eager peer trainer of moeforge's quickstart MoE.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="run loop/sorted x fp32/bf16, then print peer_best")
    mode.add_argument("--check", action="store_true", help="check that both dispatches agree (fp32), then exit")
    p.add_argument("--dispatch", choices=("loop", "sorted"), help="expert dispatch (default sorted)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="compute precision (default bf16)")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"), help="moeforge model config")
    p.add_argument("--data", metavar="DIR", help="a 'moeforge prepare' directory (default: random tokens)")
    p.add_argument("--batch", type=at_least(1), default=16, help="sequences per step (16)")
    p.add_argument("--seq", type=at_least(1), default=256, help="tokens per sequence (256)")
    p.add_argument("--steps", type=at_least(1), default=30, help="timed steps (30)")
    p.add_argument("--warmup", type=at_least(0), default=5, help="untimed steps before them (5)")
    p.add_argument("--threads", type=at_least(1), default=os.cpu_count() or 1, help="torch threads (all cores)")
    p.add_argument("--seed", type=int, default=0, help="init and data seed (0)")
    args = p.parse_args()
    if args.all and (args.dispatch or args.precision):
        p.error("--all runs every --dispatch and --precision; give neither")
    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config)
        args.tokens = load_train_tokens(args.data, cfg["vocab_size"]) if args.data else None
    except (OSError, ValueError) as e:
        print(f"peer_bench: error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"peer_bench: error: {args.config}: missing key {e}", file=sys.stderr)
        return 1
    if args.check:
        return check(cfg, args)
    if args.all:
        variants = [(d, pr) for d in ("loop", "sorted") for pr in ("fp32", "bf16")]
    else:
        variants = [(args.dispatch or "sorted", args.precision or "bf16")]
    records = []
    for d, pr in variants:
        records.append(bench(cfg, args, d, pr))
        print(json.dumps(records[-1]), flush=True)
    if args.all:
        print(json.dumps({"peer_best": max(records, key=lambda r: r["tokens_per_second"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
