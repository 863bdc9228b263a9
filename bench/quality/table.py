#!/usr/bin/env python3
"""Markdown tables of a kvc_quality CSV, ready to paste into a README.

    table.py RESULTS.csv [--budget uniform] [--ratio 0.9] [--note TEXT] > RESULTS.md

Three tables:
  1. one row per scorer with the headline budget: relative L2 error and recall of the
     oracle's kept set at every ratio, each the mean over the suites;
  2. one row per scorer at one ratio: relative L2 error per suite, and the needle hit
     rate of the suites that have needles;
  3. one row per budget: relative L2 error at every ratio, mean over the scorers other than
     the oracle and over the suites, and the best scorer at one ratio.
The best value of a column among the scorers other than the oracle is in bold. Python 3
standard library only.
"""

import argparse
import sys

from quality_csv import ordered, read_rows, value


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(v, bold=False):
    if v is None:
        return "–"
    s = f"{v:.3f}"
    return f"**{s}**" if bold else s


def ratio_label(x):
    return f"{x:g}"


class Table:
    def __init__(self, header):
        self.header = header
        self.rows = []  # (label, [values], is_reference)

    def add(self, label, values, reference=False):
        self.rows.append((label, values, reference))

    def render(self, lower_is_better):
        """lower_is_better: one flag per value column (None: no highlighting)."""
        best = []
        for j, low in enumerate(lower_is_better):
            candidates = [round(vals[j], 3) for _, vals, ref in self.rows if not ref and vals[j] is not None]
            best.append(None if low is None or not candidates else (min if low else max)(candidates))
        out = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        for label, vals, ref in self.rows:
            cells = [
                fmt(v, bold=(not ref and v is not None and best[j] is not None and round(v, 3) == best[j]))
                for j, v in enumerate(vals)
            ]
            out.append("| " + " | ".join([label] + cells) + " |")
        return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="CSV written by kvc_quality --csv")
    p.add_argument("--budget", default="uniform", help="budget of tables 1 and 2 (default: uniform)")
    p.add_argument("--ratio", type=float, default=0.9, help="ratio of tables 2 and 3 (default: 0.9)")
    p.add_argument("--note", default="", help="a line printed under the title (e.g. the model shape)")
    a = p.parse_args()

    rows = read_rows(a.csv, "table.py")
    suites = ordered(r["suite"] for r in rows)
    scorers = ordered(r["scorer"] for r in rows)
    budgets = ordered(r["budget"] for r in rows)
    ratios = sorted(set(r["ratio"] for r in rows) - {0.0})
    if a.budget not in budgets:
        sys.exit(f"table.py: no rows with budget '{a.budget}' ({', '.join(budgets)})")
    at = {(r["suite"], r["scorer"], r["budget"], r["ratio"]): r for r in rows}
    one_ratio = min(ratios, key=lambda x: abs(x - a.ratio))

    def get(suite, scorer, budget, ratio, metric):
        r = at.get((suite, scorer, budget, ratio))
        return None if r is None else value(r, metric)

    suite_list = ", ".join(suites)
    print(f"# kvc quality: {suite_list}\n")
    if a.note:
        print(a.note + "\n")
    failed = ordered(f"{r['scorer']}/{r['budget']} ({r['suite']}): {r['error']}" for r in rows if r.get("error"))
    if failed:
        print("Policies that could not compress (no numbers):\n")
        for f in failed:
            print(f"- {f}")
        print()

    # 1. Headline.
    print(
        f"**Budget `{a.budget}`, mean over the suites ({suite_list}).** Relative L2 error of the attention "
        "output of the held-out queries (lower is better) and recall of the oracle's kept set (higher is "
        "better), by compression ratio (fraction of the cached tokens removed). Bold: the best scorer "
        "other than the oracle.\n"
    )
    t = Table(
        ["scorer"]
        + [f"error {ratio_label(x)}" for x in ratios]
        + [f"recall {ratio_label(x)}" for x in ratios]
    )
    for s in scorers:
        vals = [mean(get(su, s, a.budget, x, "rel_error") for su in suites) for x in ratios]
        vals += [mean(get(su, s, a.budget, x, "recall") for su in suites) for x in ratios]
        t.add(s, vals, reference=(s == "oracle"))
    print(t.render([True] * len(ratios) + [False] * len(ratios)))
    print()

    # 2. Per suite at one ratio.
    needle_suites = [su for su in suites if any(value(r, "needle_hit") is not None for r in rows if r["suite"] == su)]
    print(
        f"**Budget `{a.budget}`, ratio {ratio_label(one_ratio)}, per suite.** Relative L2 error (lower is "
        "better)"
        + (" and needle hit rate (higher is better)" if needle_suites else "")
        + ".\n"
    )
    t = Table(["scorer"] + [f"error {su}" for su in suites] + [f"needle hit {su}" for su in needle_suites])
    for s in scorers:
        vals = [get(su, s, a.budget, one_ratio, "rel_error") for su in suites]
        vals += [get(su, s, a.budget, one_ratio, "needle_hit") for su in needle_suites]
        t.add(s, vals, reference=(s == "oracle"))
    print(t.render([True] * len(suites) + [False] * len(needle_suites)))
    print()

    # 3. Budgets.
    if len(budgets) > 1:
        others = [s for s in scorers if s != "oracle"]
        print(
            "**Budgets.** Relative L2 error by compression ratio, mean over the scorers other than the oracle "
            f"and over the suites; the oracle's error and the best other scorer at ratio {ratio_label(one_ratio)} "
            "(mean over the suites). Bold: the best budget.\n"
        )
        t = Table(
            ["budget"]
            + [f"error {ratio_label(x)}" for x in ratios]
            + [f"oracle {ratio_label(one_ratio)}", f"best scorer {ratio_label(one_ratio)}"]
        )
        labels = []
        for b in budgets:
            vals = [mean(get(su, s, b, x, "rel_error") for su in suites for s in others) for x in ratios]
            vals.append(mean(get(su, "oracle", b, one_ratio, "rel_error") for su in suites))
            per_scorer = [(mean(get(su, s, b, one_ratio, "rel_error") for su in suites), s) for s in others]
            per_scorer = [(v, s) for v, s in per_scorer if v is not None]
            best = min(per_scorer) if per_scorer else (None, "–")
            vals.append(best[0])
            labels.append(best[1])
            t.add(b, vals)
        lines = t.render([True] * len(ratios) + [True, None]).split("\n")
        for i, label in enumerate(labels):
            cells = lines[i + 2].rstrip(" |").split(" | ")
            cells[-1] = f"{label} {cells[-1]}"
            lines[i + 2] = " | ".join(cells) + " |"
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()
