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
    return rows


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
