"""Compare two `harmon eval shapes` runs item by item (same prompts, seeds and questions): what
docs/shapes.md's "paired" columns report.

    .venv/bin/python scripts/probes/paired.py BEFORE/results.json AFTER/results.json

For each part both runs hold (generation, understanding) it prints each run's overall score (mean of
categories or question types), the items AFTER got right and BEFORE wrong (won) and the reverse (lost), and the
change in the share correct with its standard error over the pairs; the same per category or type. The runs
must hold the same items in the same order.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from harmon.shapes.report import grouped_accuracy


PARTS = {  # part of results.json -> (group, item identity, correct) of each of its items
    "generation": lambda r: [(item["category"], (item["prompt"], s["seed"]), bool(s["correct"]))
                             for item in r["generation"]["items"] for s in item["samples"]],
    "understanding": lambda r: [(q["type"], q["question"], bool(q["correct"])) for q in r["understanding"]["items"]],
}


def read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(results, dict):
            raise TypeError("not an object")
        return results
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise SystemExit(f"paired.py: error: {path} is not a results.json of `harmon eval shapes` ({err})")


def items(results: dict, part: str, path: Path) -> list[tuple[str, object, bool]]:
    """(group, identity, correct) of every item of ``part``."""
    try:
        return PARTS[part](results)
    except (KeyError, TypeError) as err:
        raise SystemExit(f"paired.py: error: {path} has no readable {part} items ({err!r})")


def change(pairs: list[tuple[bool, bool]]) -> str:
    """``won / lost, +d +- se`` of (before, after) pairs: d the change in the share correct."""
    diffs = [int(b) - int(a) for a, b in pairs]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return f"{diffs.count(1)} won / {diffs.count(-1)} lost, {mean:+.3f} +- {se:.3f} (n = {n})"


def overall(rows: list[tuple[str, object, bool]]) -> float:
    """The overall score as the evaluation gives it: the mean over groups of each group's share correct."""
    return grouped_accuracy([r[0] for r in rows], [r[2] for r in rows], ())[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="paired.py", description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="results.json of the reference run")
    p.add_argument("after", type=Path, help="results.json of the run compared with it")
    args = p.parse_args(argv)
    first, second = read_results(args.before), read_results(args.after)
    parts = [part for part in PARTS if first.get(part) and second.get(part)]
    if not parts:
        p.error("the two runs share no evaluated part (generation or understanding)")
    for part in parts:
        before, after = items(first, part, args.before), items(second, part, args.after)
        if [r[:2] for r in before] != [r[:2] for r in after] or not before:
            p.error(f"the two runs' {part} items differ (other prompts, seeds or questions, or none)")
        print(f"{part}: overall before {overall(before):.3f}, after {overall(after):.3f}; "
              f"all items: {change([(a[2], b[2]) for a, b in zip(before, after)])}")
        for group in dict.fromkeys(r[0] for r in before):
            pairs = [(a[2], b[2]) for a, b in zip(before, after) if a[0] == group]
            print(f"  {group}: {change(pairs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
