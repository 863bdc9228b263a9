"""bench/quality/quality_csv.py: reading kvc_quality's CSV, shared by plot.py and table.py."""

import csv
import math
import sys


def read_rows(path, program):
    """Every row of the CSV, with its ratio as a float; exits naming `program` when empty."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{program}: {path} has no rows")
    for r in rows:
        r["ratio"] = float(r["ratio"])
        r["byte_budget"] = float(r["byte_budget"]) if r.get("byte_budget") else None
    return rows


def policy_rows(rows):
    """The rows of every scorer x budget at every ratio (no byte budget)."""
    return [r for r in rows if r["byte_budget"] is None]


def codec_rows(rows):
    """The rows of eviction, quantization and both at equal bytes (a byte budget each)."""
    return [r for r in rows if r["byte_budget"] is not None]


def mix_name(row):
    """A codec row's mix: "kivi<4> + snapkv" (the codec evicts with that scorer) or "kivi<4> alone"."""
    return f"{row['codec']} alone" if row["scorer"] == "none" else f"{row['codec']} + {row['scorer']}"


def value(row, metric):
    """The metric of one row as a float, or None when it is empty or the row failed."""
    if row.get("error"):
        return None
    text = row.get(metric, "")
    if text == "":
        return None
    v = float(text)
    return None if math.isnan(v) else v


def ordered(items):
    """Unique items in their first-seen order."""
    seen = []
    for x in items:
        if x not in seen:
            seen.append(x)
    return seen
