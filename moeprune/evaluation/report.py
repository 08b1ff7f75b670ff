"""Render evaluation result rows (a list of flat dicts) as a text table, JSON or CSV.

Rows may have different keys; columns are the union of keys in first-seen order, missing cells
are empty. Floats are shown with 4 significant decimals in the table and kept exact in JSON/CSV.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def columns(rows: Sequence[Row]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width text table; numbers right-aligned."""
    if not rows:
        return "(no results)"
    cols = columns(rows)
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in cols]

    def fmt(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [fmt(cols), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[Row]) -> None:
    print(format_table(rows))


def write_json(rows: Sequence[Row], path: str | Path) -> None:
    Path(path).write_text(json.dumps(list(rows), indent=2, default=str) + "\n")


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def format_markdown(rows: Sequence[Row]) -> str:
    """A GitHub-flavoured markdown table (for READMEs)."""
    if not rows:
        return "(no results)"
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)
