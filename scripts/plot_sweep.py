#!/usr/bin/python3
"""Plots of a `moeforge sweep` report (OUTPUT_DIR/report.json), written as PNG next to it:
  val_curves.png        validation loss against step, one line per point
  balance_curves.png    the worst layer's max/mean expert load against step, one line per point (runs of a
                        row in one colour), the 1.5 line that the report's settling step refers to
  final_val_<key>.png   final validation loss against each swept value (seeds as separate dots, mean as line)
  load_<point>.png      per-layer expert-load heat map of each point (last logged training step)
Usage: scripts/plot_sweep.py OUTPUT_DIR [--offset ROW=STEPS ...]   (Debian: python3-matplotlib; scripts/setup.sh
installs it). --offset shifts the curves of a row (a variant's name, or e.g. aux_loss_coef=0.01) right by STEPS:
arms that continue a model a prepare step trained (recipes/upcycling.yaml) are drawn at their total steps."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def as_number(v):
    try:
        return float(v)
    except ValueError:
        return None


def row_of(p, axes):
    """A point's row: its values on the axes other than the seed."""
    return " ".join(f"{k.split('.')[-1]}={p['values'][k]}" for k in axes if k not in ("train.seed", "seed")) or "all"


def parse_args(argv):
    out, offsets = None, {}
    i = 0
    while i < len(argv):
        if argv[i] == "--offset" and i + 1 < len(argv):
            # A row named by its variant alone, or by its full "key=value ..." text: the last '=' splits the steps.
            row, _, steps = argv[i + 1].rpartition("=")
            try:
                offsets[row] = int(steps)
            except ValueError:
                sys.exit(f"plot_sweep: --offset {argv[i + 1]}: expected ROW=STEPS")
            i += 2
        elif out is None and not argv[i].startswith("--"):
            out = argv[i]
            i += 1
        else:
            sys.exit(__doc__)
    if out is None:
        sys.exit(__doc__)
    return out, offsets


def main():
    out, offsets = parse_args(sys.argv[1:])
    path = os.path.join(out, "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"plot_sweep: {path}: {e}", file=sys.stderr)
        sys.exit(2)
    points = [p for p in report["points"] if p.get("finished")]
    if not points:
        print(f"plot_sweep: {path}: no finished points", file=sys.stderr)
        sys.exit(2)

    rows = sorted({row_of(p, report["axes"]) for p in points})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    unknown = [r for r in offsets if r not in rows and f"variant={r}" not in rows]
    if unknown:
        sys.exit(f"plot_sweep: --offset {unknown[0]}: no such row (rows: {', '.join(rows)})")

    def shift(p):
        row = row_of(p, report["axes"])
        return offsets.get(row, offsets.get(row[len("variant="):] if row.startswith("variant=") else None, 0))

    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = set()
    for p in points:
        curve = p.get("val_curve", [])
        if curve:
            row = row_of(p, report["axes"])
            ax.plot([c[0] + shift(p) for c in curve], [c[1] for c in curve], marker=".", alpha=0.7, linewidth=1,
                    color=colours[rows.index(row) % len(colours)], label=None if row in labelled else row)
            labelled.add(row)
    ax.set_xlabel("step" + (" (arms with an offset: counting the steps before them)" if offsets else ""))
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss (one line per run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = set()
    for p in points:
        curve = p.get("balance_curve", [])
        if not curve:
            continue
        row = row_of(p, report["axes"])
        ax.plot([c[0] + shift(p) for c in curve], [c[1] for c in curve], color=colours[rows.index(row) % len(colours)], alpha=0.7,
                linewidth=1, label=None if row in labelled else row)
        labelled.add(row)
    if labelled:
        ax.axhline(1.5, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("max/mean expert load (worst layer)")
        ax.set_title("balance over training (one line per run)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "balance_curves.png"), dpi=110)
    plt.close(fig)

    for key in report["axes"]:
        xs = [p["values"][key] for p in points]
        nums = [as_number(x) for x in xs]
        labels = sorted(set(xs), key=lambda v: (as_number(v) is None, as_number(v) or 0, v))
        # Numbers above zero on their own axis (log when they span decades); otherwise (0, names) in order.
        on_axis = all(n is not None for n in nums) and min(nums) > 0
        x_of = (lambda v: float(v)) if on_axis else (lambda v: labels.index(v))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([x_of(x) for x in xs], [p["final_val_loss"] for p in points], alpha=0.6, label="runs")
        means = []
        for v in labels:
            vals = [p["final_val_loss"] for p in points if p["values"][key] == v]
            means.append((x_of(v), sum(vals) / len(vals)))
        ax.plot([m[0] for m in means], [m[1] for m in means], color="black", label="mean")
        if on_axis and max(nums) / min(nums) >= 100:
            ax.set_xscale("log")
        if not on_axis:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels)
        ax.set_xlabel(key)
        ax.set_ylabel("final validation loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "final_val_" + key.replace(".", "_") + ".png"), dpi=110)
        plt.close(fig)

    for p in points:
        load = p.get("layer_load")
        if not load:
            continue
        share = [[c / max(1, sum(layer)) for c in layer] for layer in load]
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(share[0]), 1.2 + 0.45 * len(share)))
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(p["name"], fontsize=8)
        fig.colorbar(im, ax=ax, label="share of assignments")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "load_" + p["name"] + ".png"), dpi=110)
        plt.close(fig)
    print(f"plot_sweep: plots in {out}")


if __name__ == "__main__":
    main()
