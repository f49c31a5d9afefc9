#!/usr/bin/env python3
"""Deterministic arithmetic data for the fine-tuning recipes (standard library only).

Two-digit addition, "What is 37 + 45?" -> "82", split by problem (a + b and b + a are different
problems) into disjoint sets:

  sft_train.jsonl   {"prompt", "completion"}           supervised fine-tuning
  sft_val.jsonl     {"prompt", "completion"}           SFT validation loss
  pref_train.jsonl  {"prompt", "chosen", "rejected"}   DPO: chosen is the sum, rejected a near miss
  pref_val.jsonl    {"prompt", "chosen", "rejected"}   held-out preference pairs
  test.jsonl        {"prompt", "completion"}           held-out exact match (the pref_val problems)

A near miss is the sum off by one in the units digit or by ten (a dropped or invented carry), never
negative, so chosen and rejected can be told apart by checking the arithmetic.

Usage: data/make_arith.py OUT_DIR [--seed S]   (writes nothing if OUT_DIR/test.jsonl exists)
"""
import json
import os
import random
import sys

SIZES = {"test": 400, "sft_val": 200, "pref_train": 3000}  # sft_train: the rest of the 8,100


def near_miss(rng, s):
    while True:
        r = s + rng.choice([-10, -1, 1, 10])
        if r >= 0:
            return r


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    out, seed = argv[0], 1234
    if len(argv) == 3 and argv[1] == "--seed":
        seed = int(argv[2])
    elif len(argv) != 1:
        sys.exit(__doc__)
    if os.path.exists(os.path.join(out, "test.jsonl")):
        print(f"arith: {out} already present")
        return
    rng = random.Random(seed)
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]  # 8,100 two-digit sums
    rng.shuffle(problems)
    sets, at = {}, 0
    for name in ["test", "sft_val", "pref_train"]:
        sets[name] = problems[at:at + SIZES[name]]
        at += SIZES[name]
    sets["sft_train"] = problems[at:]

    def prompt(a, b):
        return f"What is {a} + {b}?"

    os.makedirs(out, exist_ok=True)
    files = {}
    for name in ["sft_train", "sft_val", "test"]:
        files[name] = [{"prompt": prompt(a, b), "completion": str(a + b)} for a, b in sets[name]]
    for name, src in [("pref_train", "pref_train"), ("pref_val", "test")]:
        files[name] = [{"prompt": prompt(a, b), "chosen": str(a + b), "rejected": str(near_miss(rng, a + b))}
                       for a, b in sets[src]]
    for name in ["sft_train", "sft_val", "pref_train", "pref_val", "test"]:  # test last: marks done
        rows = files[name]
        tmp = os.path.join(out, name + ".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, os.path.join(out, name + ".jsonl"))
        print(f"arith: {out}/{name}.jsonl: {len(rows)} lines")


if __name__ == "__main__":
    main(sys.argv[1:])
