#!/usr/bin/env python3
"""Markdown tables of a kvc_quality CSV, ready to paste into a README.

    table.py RESULTS.csv [--budget uniform] [--ratio 0.9] [--note TEXT] > RESULTS.md

Tables of the policy rows (every scorer x budget at every ratio):
  1. one row per scorer with the headline budget: relative L2 error and recall of the
     oracle's kept set at every ratio, each the mean over the suites;
  2. one row per scorer at one ratio: relative L2 error per suite, and the needle hit
     rate of the suites that have needles;
  3. one row per budget: relative L2 error at every ratio, mean over the scorers other than
     the oracle and over the suites, and the best scorer at one ratio.
The best value of a column among the scorers other than the oracle is in bold. The codec
rows (kvc_quality --rows codecs), if any, get a fourth:
  4. per byte budget, one row per mix of eviction and quantization: bytes, tokens kept,
     relative L2 error (mean and per suite) and needle hit rate; the least error among the
     mixes that do not evict with the oracle in bold, and a line naming them.
Python 3 standard library only.
"""

import argparse
import sys

from quality_csv import codec_rows, mix_name, ordered, policy_rows, read_rows, value


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(v, bold=False, digits=3):
    if v is None:
        return "–"
    s = f"{v:.{digits}f}"
    return f"**{s}**" if bold else s


def ratio_label(x):
    return f"{x:g}"


class Table:
    def __init__(self, header, digits=None):
        self.header = header
        self.digits = digits  # decimals per value column (default 3)
        self.rows = []  # ([label cells], [values], is_reference)

    def add(self, label, values, reference=False):
        """label: the first cell, or a list of the first cells."""
        self.rows.append(([label] if isinstance(label, str) else list(label), values, reference))

    def body(self, lower_is_better):
        """The row lines; lower_is_better: one flag per value column (None: no highlighting)."""
        digits = self.digits or [3] * len(lower_is_better)
        best = []
        for j, low in enumerate(lower_is_better):
            candidates = [round(vals[j], digits[j]) for _, vals, ref in self.rows if not ref and vals[j] is not None]
            best.append(None if low is None or not candidates else (min if low else max)(candidates))
        out = []
        for labels, vals, ref in self.rows:
            cells = [
                fmt(v, not ref and v is not None and best[j] is not None and round(v, digits[j]) == best[j], digits[j])
                for j, v in enumerate(vals)
            ]
            out.append("| " + " | ".join(labels + cells) + " |")
        return out

    def head(self):
        return ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]

    def render(self, lower_is_better):
        return "\n".join(self.head() + self.body(lower_is_better))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="CSV written by kvc_quality --csv")
    p.add_argument("--budget", default="uniform", help="budget of tables 1 and 2 (default: uniform)")
    p.add_argument("--ratio", type=float, default=0.9, help="ratio of tables 2 and 3 (default: 0.9)")
    p.add_argument("--note", default="", help="a line printed under the title (e.g. the model shape)")
    a = p.parse_args()

    all_rows = read_rows(a.csv, "table.py")
    suites = ordered(r["suite"] for r in all_rows)
    rows = policy_rows(all_rows)
    suite_list = ", ".join(suites)
    print(f"# kvc quality: {suite_list}\n")
    if a.note:
        print(a.note + "\n")
    failed = ordered(
        f"{mix_name(r) if r['byte_budget'] is not None else r['scorer'] + '/' + r['budget']} ({r['suite']}): "
        f"{r['error']}"
        for r in all_rows
        if r.get("error")
    )
    if failed:
        print("Policies that could not compress (no numbers):\n")
        for f in failed:
            print(f"- {f}")
        print()
    if rows:
        policy_tables(rows, suites, a)
    if codec_rows(all_rows):
        codec_table(codec_rows(all_rows), suites)


def policy_tables(rows, suites, a):
    suite_list = ", ".join(suites)
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


def codec_table(rows, suites):
    """4. Per byte budget, every mix: bytes, kept, error (mean and per suite), needle hit rate."""
    suites = [su for su in suites if any(r["suite"] == su for r in rows)]
    needle_suites = [su for su in suites if any(value(r, "needle_hit") is not None for r in rows if r["suite"] == su)]
    print(
        "**Eviction, quantization and both at equal bytes.** Per byte budget (a fraction of the bytes of the "
        "f16 cache holding every token), each mix: the bytes its compressed sequence holds (`stats()`, same "
        "unit), the fraction of tokens it keeps, the relative L2 error of the held-out queries' attention "
        "output against the uncompressed f32 cache (lower is better), mean over the suites and per suite"
        + (", and the needle hit rate, mean over the suites with needles (higher is better)" if needle_suites else "")
        + ". `f16 + S` evicts with scorer S (eviction alone), `C alone` quantizes with codec C and keeps every "
        "token, `C + S` does both. Bold: the best value of a column within its budget among the mixes that do "
        "not evict with the oracle.\n"
    )
    header = ["budget", "mix", "bytes", "kept", "error mean"] + [f"error {su}" for su in suites]
    header += ["needle hit"] if needle_suites else []
    lower = [None, None, True] + [True] * len(suites) + ([False] if needle_suites else [])
    digits = [3, 3] + [4] * (1 + len(suites)) + ([3] if needle_suites else [])  # errors go down to 1e-4
    out = Table(header).head()
    winners = []

    def mean_of(group, metric, among):
        return mean(value(r, metric) for r in group if r["suite"] in among)

    for b in ordered(r["byte_budget"] for r in rows):
        at_budget = [r for r in rows if r["byte_budget"] == b]
        t = Table(header, digits)  # one per budget: bold marks the best within it
        contenders = []
        for i, m in enumerate(ordered(mix_name(r) for r in at_budget)):
            group = [r for r in at_budget if mix_name(r) == m]
            vals = [mean_of(group, metric, suites) for metric in ("bytes", "kept", "rel_error")]
            vals += [mean_of(group, "rel_error", [su]) for su in suites]
            vals += [mean_of(group, "needle_hit", needle_suites)] if needle_suites else []
            oracle = group[0]["scorer"] == "oracle"
            t.add([f"{b:.3f}" if i == 0 else "", m], vals, reference=oracle)
            if not oracle and vals[2] is not None:
                contenders.append((vals[2], m))
        out += t.body(lower)
        if contenders:
            winners.append(f"{b:.3f}: {min(contenders)[1]} ({min(contenders)[0]:.4f})")
    print("\n".join(out))
    print()
    print("Least mean error per budget: " + "; ".join(winners) + ".")
    print()


if __name__ == "__main__":
    main()
