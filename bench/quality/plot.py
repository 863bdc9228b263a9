#!/usr/bin/env python3
"""Plots of a kvc_quality CSV: accuracy against the compression ratio, one line per policy,
and against the bytes kept, one line per mix of eviction and quantization.

    plot.py RESULTS.csv [--out PREFIX] [--budget uniform] [--metrics rel_error,recall,needle_hit]

writes, from the policy rows (if any)
    PREFIX.png          one budget (default uniform): a row of subplots per metric, a column
                        per suite, one line per scorer
    PREFIX_budgets.png  relative L2 error, mean over the suites: a subplot per scorer, one
                        line per budget
and from the codec rows (kvc_quality --rows codecs), if any
    PREFIX_bytes.png    relative L2 error against bytes (a fraction of the f16 cache), a
                        subplot per suite and one for the mean: a line per codec and scorer
                        across the byte budgets, and one through the codecs alone
PREFIX defaults to the CSV's path without ".csv". Needs Python 3 and matplotlib only
(Debian: python3-matplotlib); draws with the Agg backend, no display needed.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from quality_csv import codec_rows, ordered, policy_rows, read_rows, value  # noqa: E402

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


def log_error_axes(ax, k, cols, nrows, xlabel):
    """Panel k of a grid: grid lines, a log error axis, labels on the outer panels."""
    ax.grid(True, alpha=0.3, which="both")
    ax.set_yscale("log")
    if k % cols == 0:
        ax.set_ylabel("relative L2 error (log)")
    if k // cols == nrows - 1:
        ax.set_xlabel(xlabel)


def finish(fig, axes, used, title, legend_inches, out, fontsize=9, top=0.96):
    """Hides the panels past `used`, adds the first panel's legend on the right and the title, saves."""
    cols = len(axes[0])
    for k in range(used, len(axes) * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False, fontsize=fontsize)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1.0 - legend_inches / fig.get_figwidth(), top))
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    print(f"wrote {out}")


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
    title = f"kvc quality: scorers with the {budget} budget, held-out queries"
    finish(fig, axes, len(metrics) * len(suites), title, 1.9, out, top=0.97)


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
        log_error_axes(ax, k, cols, nrows, "compression ratio")
    title = "kvc quality: budgets compared, relative L2 error (mean over " + ", ".join(suites) + ")"
    finish(fig, axes, len(scorers), title, 1.5, out)


def plot_bytes(rows, out):
    suites = ordered(r["suite"] for r in rows)
    codecs = ordered(r["codec"] for r in rows)
    scorers = [s for s in ordered(r["scorer"] for r in rows) if s != "none"]
    colors = {s: ("black" if s == "oracle" else plt.get_cmap("tab10").colors[i]) for i, s in enumerate(scorers)}
    markers = {c: "os^vD<>ph*"[i % 10] for i, c in enumerate(codecs)}

    floor = 1e-5  # f16 alone is near 1e-4

    def line(group, among):
        """(bytes, error) points sorted by bytes, each the mean over the suites in `among`."""
        pts = {}
        for r in group:
            e, b = value(r, "rel_error"), value(r, "bytes")
            if e is not None and b is not None and r["suite"] in among:
                pts.setdefault(r["byte_budget"], []).append((b, e))
        xy = sorted((sum(b for b, _ in p) / len(p), sum(e for _, e in p) / len(p)) for p in pts.values())
        return [x for x, _ in xy], [max(y, floor) for _, y in xy]

    panels = suites + (["mean"] if len(suites) > 1 else [])
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 2.4, 3.3 * nrows + 0.6), squeeze=False, sharex=True)
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        among = suites if panel == "mean" else [panel]
        alone = [r for r in rows if r["scorer"] == "none"]
        ax.plot(*line(alone, among), color="0.3", linewidth=2.6, alpha=0.6, label="codec alone", zorder=1)
        for c in codecs:
            ax.plot(*line([r for r in alone if r["codec"] == c], among), "none", marker=markers[c], color="0.3", ms=7)
            for s in scorers:
                gx, gy = line([r for r in rows if r["codec"] == c and r["scorer"] == s], among)
                if gx:
                    ax.plot(
                        gx,
                        gy,
                        color=colors[s],
                        marker=markers[c],
                        markersize=4,
                        linewidth=1.2,
                        linestyle="--" if s == "oracle" else "-",
                        label=f"{c} + {s}",
                    )
        ax.set_title(panel if panel != "mean" else "mean over the suites", fontsize=10)
        ax.set_xscale("log")
        log_error_axes(ax, k, cols, nrows, "bytes / f16 cache with every token (log)")
    title = "kvc quality: eviction (f16 + scorer), quantization (codec alone) and both, by bytes"
    finish(fig, axes, len(panels), title, 2.0, out, fontsize=8)


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
    if policy_rows(rows):
        plot_budget(policy_rows(rows), a.budget, metrics, out + ".png")
        plot_budgets(policy_rows(rows), out + "_budgets.png")
    if codec_rows(rows):
        plot_bytes(codec_rows(rows), out + "_bytes.png")


if __name__ == "__main__":
    main()
