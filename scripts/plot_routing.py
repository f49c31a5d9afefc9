#!/usr/bin/python3
"""Plots of `moeforge routing CHECKPOINT --data DIR --json > ROUTING.json`, written as PNG into OUT_DIR:
  routing_share_by_domain.png   per layer: share of each domain's assignments that each expert receives
  routing_repeat_rates.png      per layer: consecutive-token repeat rates next to their baselines
Usage: scripts/plot_routing.py ROUTING.json OUT_DIR   (Debian: python3-matplotlib)"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    try:
        with open(src) as f:
            r = json.load(f)
        layers = r["layers"]
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_routing: {src}: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(out, exist_ok=True)
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 4.5), squeeze=False)
    for i, layer in enumerate(layers):
        doms = sorted(layer["expert_share_by_domain"])
        grid = [layer["expert_share_by_domain"][d] for d in doms]
        ax = axes[0][i]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"layer {layer['layer']}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(doms)))
        ax.set_yticklabels(doms if i == 0 else [""] * len(doms))
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the domain's assignments")
    fig.savefig(os.path.join(out, "routing_share_by_domain.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(n))
    w = 0.2
    ax.bar([x - 1.5 * w for x in xs], [l["first_choice_repeat_rate"] for l in layers], w, label="first choice repeat")
    ax.bar([x - 0.5 * w for x in xs], [l["independent_first_choice_rate"] for l in layers], w,
           label="independent draws at the layer's load")
    ax.bar([x + 0.5 * w for x in xs], [l["top2_set_repeat_rate"] for l in layers], w, label="top-k set repeat")
    ax.bar([x + 1.5 * w for x in xs], [l["random_top2_set_rate"] for l in layers], w, label="random top-k set")
    ax.axhline(layers[0]["random_first_choice_rate"], color="black", linestyle="--", label="random first choice (1/E)")
    ax.set_xticks(xs)
    ax.set_xlabel("layer")
    ax.set_ylabel("rate over consecutive token pairs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "routing_repeat_rates.png"), dpi=110)
    plt.close(fig)
    print(f"plot_routing: plots in {out}")


if __name__ == "__main__":
    main()
