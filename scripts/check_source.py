#!/usr/bin/env python3
"""Two rules of src/, checked by the unit test Source.LayersAndFunctionLengths:
1. Its folders form one-way layers: a file includes headers of its own folder and of folders below it only.
2. No function is over 150 lines (run_training, the training loop, over 271). A function here is a block that
   opens at column 0 and closes with the next '}' at column 0 (the project's clang-format style).
Prints every breach and exits 1."""
import os, re, sys

# lowest first
LAYERS = ["core", "model", "io", "data", "parallel", "optim", "recipe", "checkpoint", "eval", "objective", "output",
          "train", "research", "cli"]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
rank = {d: i for i, d in enumerate(LAYERS)}
bad = []
for d in sorted(os.listdir(root)):
    p = os.path.join(root, d)
    if not os.path.isdir(p):
        continue
    if d not in rank:
        bad.append(f"src/{d}/: a folder not in the layer list of scripts/check_layers.py")
        continue
    for f in sorted(os.listdir(p)):
        for n, line in enumerate(open(os.path.join(p, f), encoding="utf-8"), 1):
            m = re.match(r'\s*#include "([a-z_]+)/', line)
            if m and m.group(1) in rank and rank[m.group(1)] > rank[d]:
                bad.append(f"src/{d}/{f}:{n}: includes {m.group(1)}/, a layer above {d}/")
            elif m and m.group(1) not in rank:
                bad.append(f"src/{d}/{f}:{n}: includes {m.group(1)}/, a folder not in the layer list")
LIMIT, EXCEPTIONS = 150, {"run_training": 271}
for d, _, files in os.walk(root):
    for f in sorted(files):
        if not f.endswith((".cpp", ".h")):
            continue
        path = os.path.join(d, f)
        start = None
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            head = line.rstrip()
            if start is None and head.endswith("{") and head[:1] not in ("", " ", "#", "/", "}") and \
                    not re.match(r"(namespace|struct|class|enum|extern|union)\b", head):
                start, name = n, head
            elif start is not None and line.startswith("}"):
                length = n - start + 1
                m = re.search(r"(\w+)\s*\(", name)
                limit = EXCEPTIONS.get(m.group(1) if m else "", LIMIT)
                if length > limit:
                    rel = os.path.relpath(path, os.path.join(root, ".."))
                    bad.append(f"{rel}:{start}: {length} lines (limit {limit}): {name[:70]}")
                start = None
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
