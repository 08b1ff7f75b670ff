"""Paired task comparison from `bench_quality.py --json` files: one recipe against each other row.

Accuracies of two models measured on the same items differ by less noise than each accuracy's own
standard error suggests: most items are answered alike by both. `bench_quality.py` stores every
task item's 0/1 outcome (`<task> hits`), so a difference can be judged item by item:

* per seed s, d_s = accuracy(reference, s) - accuracy(other, s) on the same items;
* the item noise of the seed mean: for each item, the reference's hits minus the other's averaged
  over the seeds both have (the dense row has one seed and is compared with every seed), then the
  standard error of the mean over items of those per-item differences;
* verdict: `ahead` when every d_s > 0 and the mean exceeds twice that standard error, `behind` in
  the mirror case, `within` otherwise.

`python scripts/bench_paired_tasks.py RUN.json [RUN.json ...] --reference "ROW NAME"` prints a
Markdown table (model, task, other row, mean gap, seed range of the gaps, paired item SE, verdict).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of every file that carry per-item task outcomes (no errors)."""
    return [r for p in paths for r in json.loads(p.read_text())["rows"]
            if "error" not in r and any(k.endswith(" hits") for k in r)]


def _hits(row: dict[str, Any], task: str) -> list[int]:
    return [int(c) for c in row[f"{task} hits"]]


def paired_gap(reference: dict[Any, list[int]], other: dict[Any, list[int]]) -> dict[str, Any]:
    """Gap of `reference` over `other` from their per-seed hit vectors ({seed: hits}); a single
    `other` entry under seed None (the dense model) is compared with every reference seed."""
    single = other.get(None)  # the dense row: one measurement for every reference seed

    def theirs(seed: Any) -> list[int]:
        return single if single is not None else other[seed]

    seeds = sorted(s for s in reference if single is not None or s in other)
    if not seeds:
        raise ValueError("the two rows share no seed")
    n = len(reference[seeds[0]])
    if any(len(reference[s]) != n or len(theirs(s)) != n for s in seeds):
        raise ValueError("the two rows were scored on different numbers of items")
    per_seed = [(sum(reference[s]) - sum(theirs(s))) / n for s in seeds]
    per_item = [statistics.fmean(reference[s][i] - theirs(s)[i] for s in seeds) for i in range(n)]
    se = statistics.stdev(per_item) / math.sqrt(n) if n > 1 else float("nan")
    mean = statistics.fmean(per_seed)
    if all(d > 0 for d in per_seed) and mean > 2 * se:
        verdict = "ahead"
    elif all(d < 0 for d in per_seed) and -mean > 2 * se:
        verdict = "behind"
    else:
        verdict = "within"
    return {"seeds": seeds, "per_seed": per_seed, "mean": mean, "se": se, "n": n, "verdict": verdict}


def compare(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """For every model and task, the paired gap of the `reference` row over every other row."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        tasks = sorted({k.removesuffix(" hits") for r in mine for k in r if k.endswith(" hits")})
        by_strategy: dict[str, dict[str, dict[Any, list[int]]]] = {}
        for r in mine:
            for task in tasks:
                if f"{task} hits" in r:
                    by_strategy.setdefault(r["strategy"], {}).setdefault(task, {})[r["seed"]] = _hits(r, task)
        if reference not in by_strategy:
            continue
        for task in tasks:
            for name, per_task in by_strategy.items():
                if name != reference and task in per_task and task in by_strategy[reference]:
                    out.append({"model": model, "task": task, "other": name,
                                **paired_gap(by_strategy[reference][task], per_task[task])})
    return out


def table(results: list[dict[str, Any]], reference: str) -> str:
    lines = [f"Paired gaps of `{reference}` (accuracy, acc_mutual_info) over each other row, same items:", "",
             "| model | task | other row | items | mean gap | per-seed gaps | paired item SE | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        seeds = " / ".join(f"{d:+.3f}" for d in r["per_seed"])
        lines.append(f"| {r['model'].removeprefix('builtin:')} | {r['task']} | {r['other']} | {r['n']} | "
                     f"{r['mean']:+.3f} | {seeds} | {r['se']:.3f} | {r['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench_quality.py --json files")
    ap.add_argument("--reference", required=True, help="the row (strategy name) compared with every other")
    args = ap.parse_args()
    results = compare(load_rows(args.runs), args.reference)
    if not results:
        raise SystemExit(f"no rows with per-item task outcomes for {args.reference!r} in {[str(p) for p in args.runs]}")
    print(table(results, args.reference))


if __name__ == "__main__":
    main()
