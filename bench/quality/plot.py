#!/usr/bin/env python3
"""Plots of a kvc_quality CSV: accuracy against the compression ratio, one line per policy.

    plot.py RESULTS.csv [--out PREFIX] [--budget uniform] [--metrics rel_error,recall,needle_hit]

writes
    PREFIX.png          one budget (default uniform): a row of subplots per metric, a column
                        per suite, one line per scorer
    PREFIX_budgets.png  relative L2 error, mean over the suites: a subplot per scorer, one
                        line per budget
PREFIX defaults to the CSV's path without ".csv". Needs Python 3 and matplotlib only
(Debian: python3-matplotlib); draws with the Agg backend, no display needed.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from quality_csv import ordered, read_rows, value  # noqa: E402

TITLES = {
    "rel_error": "relative L2 error of the output (lower is better)",
    "mass_kept": "attention mass kept (higher is better)",
    "recall": "recall of the oracle's kept set (higher is better)",
    "needle_hit": "needle hit rate (higher is better)",
    "needle_kept": "needles retained (higher is better)",
    "kept": "fraction of tokens retained",
}
SHORT = {
    "rel_error": "relative L2 error",
    "mass_kept": "attention mass kept",
    "recall": "recall of oracle's set",
    "needle_hit": "needle hit rate",
    "needle_kept": "needles retained",
    "kept": "tokens retained",
}


def style(scorers):
    """A distinct colour and line style per scorer; the oracle black, random grey."""
    tab10 = plt.get_cmap("tab10").colors
    palette = [c for i, c in enumerate(tab10) if i != 7] + ["#1a1a80", "#7a5c00", "#006d5b"]  # no grey
    styles = {}
    i = 0
    for s in scorers:
        if s == "oracle":
            styles[s] = dict(color="black", linestyle="--", linewidth=2.0, marker="o", markersize=3)
        elif s == "random":
            styles[s] = dict(color="0.55", linestyle=":", linewidth=1.8, marker="o", markersize=3)
        else:
            styles[s] = dict(
                color=palette[i % len(palette)],
                linestyle="-" if i < len(palette) else "-.",  # more scorers than colours: dash-dot
                linewidth=1.4,
                marker="os^vD<>ph*"[i % 10],
                markersize=3,
            )
            i += 1
    return styles


# Relative errors span 1e-3 to above 1, so their axis is logarithmic; smaller values (an
# exact 0 at a low ratio) are drawn at this floor.
ERROR_FLOOR = 1e-3
DPI = 90


def series(rows, metric):
    """(ratios, values) sorted by ratio, skipping missing values."""
    pts = sorted((r["ratio"], value(r, metric)) for r in rows)
    pts = [(x, y) for x, y in pts if y is not None]
    if metric == "rel_error":
        pts = [(x, max(y, ERROR_FLOOR)) for x, y in pts]
    return [x for x, _ in pts], [y for _, y in pts]


def mean_series(rows, metric, suites):
    """Per ratio, the mean of the metric over the suites that have it at that ratio."""
    by_ratio = {}
    for r in rows:
        v = value(r, metric)
        if v is not None and r["suite"] in suites:
            by_ratio.setdefault(r["ratio"], []).append(v)
    xs = sorted(by_ratio)
    return xs, [sum(by_ratio[x]) / len(by_ratio[x]) for x in xs]


def plot_budget(rows, budget, metrics, out):
    rows = [r for r in rows if r["budget"] == budget]
    if not rows:
        sys.exit(f"plot.py: no rows with budget '{budget}'")
    suites = ordered(r["suite"] for r in rows)
    scorers = ordered(r["scorer"] for r in rows)
    metrics = [m for m in metrics if any(value(r, m) is not None for r in rows)]
    styles = style(scorers)
    fig, axes = plt.subplots(
        len(metrics), len(suites), figsize=(3.4 * len(suites) + 2.2, 2.9 * len(metrics) + 0.6), squeeze=False
    )
    for i, m in enumerate(metrics):
        for j, suite in enumerate(suites):
            ax = axes[i][j]
            have = False
            for s in scorers:
                xs, ys = series([r for r in rows if r["suite"] == suite and r["scorer"] == s], m)
                if xs:
                    ax.plot(xs, ys, label=s, **styles[s])
                    have = True
            if not have:
                ax.text(0.5, 0.5, "no needles", ha="center", va="center", transform=ax.transAxes, color="0.5")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.grid(True, alpha=0.3)
                if m == "rel_error":
                    ax.set_yscale("log")
                    ax.set_ylim(bottom=ERROR_FLOOR * 0.8)
                else:
                    ax.set_ylim(-0.03, 1.03)
            if i == 0:
                ax.set_title(suite)
            if j == 0:
                ax.set_ylabel(SHORT.get(m, m) + (" (log)" if m == "rel_error" else ""))
            if i == len(metrics) - 1:
                ax.set_xlabel("compression ratio (fraction removed)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle(f"kvc quality: scorers with the {budget} budget, held-out queries")
    fig.tight_layout(rect=(0, 0, 1.0 - 1.9 / fig.get_figwidth(), 0.97))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    print(f"wrote {out}")


def plot_budgets(rows, out):
    suites = ordered(r["suite"] for r in rows)
    scorers = ordered(r["scorer"] for r in rows)
    budgets = ordered(r["budget"] for r in rows)
    if len(budgets) < 2:
        return
    colors = plt.get_cmap("tab10").colors
    cols = min(4, len(scorers))
    nrows = (len(scorers) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols + 1.8, 2.7 * nrows + 0.6), squeeze=False, sharey=True)
    for k, s in enumerate(scorers):
        ax = axes[k // cols][k % cols]
        for b_i, b in enumerate(budgets):
            xs, ys = mean_series([r for r in rows if r["scorer"] == s and r["budget"] == b], "rel_error", suites)
            if xs:
                # Budgets can agree exactly (byte_cap on pages of one size, adakv on scorers whose
                # scores every head shares): the first is drawn widest, the others dashed on top.
                ax.plot(
                    xs,
                    [max(y, ERROR_FLOOR) for y in ys],
                    label=b,
                    color=colors[b_i % len(colors)],
                    marker="o",
                    markersize=3,
                    linewidth=3.0 if b_i == 0 else 1.4,
                    linestyle="-" if b_i == 0 else (0, (4, 1 + b_i)),
                )
        ax.set_title(s, fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.set_yscale("log")
        if k % cols == 0:
            ax.set_ylabel("relative L2 error (log)")
        if k // cols == nrows - 1:
            ax.set_xlabel("compression ratio")
    for k in range(len(scorers), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=9)
    fig.suptitle("kvc quality: budgets compared, relative L2 error (mean over " + ", ".join(suites) + ")")
    fig.tight_layout(rect=(0, 0, 1.0 - 1.5 / fig.get_figwidth(), 0.96))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="CSV written by kvc_quality --csv")
    p.add_argument("--out", help="output prefix (default: the CSV's path without .csv)")
    p.add_argument("--budget", default="uniform", help="budget of the main figure (default: uniform)")
    p.add_argument(
        "--metrics",
        default="rel_error,recall,needle_hit",
        help="rows of the main figure: rel_error, mass_kept, recall, needle_hit, needle_kept, kept",
    )
    a = p.parse_args()
    metrics = [m for m in a.metrics.split(",") if m]
    for m in metrics:
        if m not in TITLES:
            sys.exit(f"plot.py: unknown metric '{m}' ({', '.join(TITLES)})")
    out = a.out or (a.csv[:-4] if a.csv.endswith(".csv") else a.csv)
    rows = read_rows(a.csv, "plot.py")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    plot_budget(rows, a.budget, metrics, out + ".png")
    plot_budgets(rows, out + "_budgets.png")


if __name__ == "__main__":
    main()
