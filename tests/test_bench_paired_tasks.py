"""bench_paired_tasks: per-seed and item-paired gaps between two rows scored on the same items."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from script_loader import load_script


def _script():
    return load_script("bench_paired_tasks")


def test_paired_gap_by_hand() -> None:
    paired = _script().paired_gap
    ref = {0: [1, 1, 0, 1], 1: [1, 0, 1, 1]}
    other = {0: [1, 0, 0, 0], 1: [0, 0, 1, 1], 2: [0, 0, 0, 0]}  # seed 2 has no reference: ignored
    out = paired(ref, other)
    assert out["seeds"] == [0, 1] and out["per_seed"] == pytest.approx([0.5, 0.25])
    per_item = [0.5, 0.5, 0.0, 0.5]  # (1-1 + 1-0)/2, (1-0 + 0-0)/2, (0-0 + 1-1)/2, (1-0 + 1-1)/2
    assert out["mean"] == pytest.approx(0.375)
    assert out["se"] == pytest.approx(statistics.stdev(per_item) / math.sqrt(4))
    assert out["verdict"] == "ahead"  # both seeds > 0 and 0.375 > 2 * 0.125
    # the dense row (seed None) is compared with every seed; a tie on one seed is not "ahead"
    tied = paired(ref, {None: [1, 1, 0, 1]})
    assert tied["per_seed"] == pytest.approx([0.0, 0.0]) and tied["verdict"] == "within"
    assert paired({0: [0, 0, 0, 0], 1: [0, 0, 0, 1]}, {None: [1, 1, 1, 1]})["verdict"] == "behind"
    with pytest.raises(ValueError, match="different numbers of items"):
        paired({0: [1, 0]}, {0: [1, 0, 1]})


def test_compare_reads_bench_json(tmp_path: Path) -> None:
    script = _script()
    rows = [{"model": "m", "strategy": "dense", "seed": None, "next_line hits": "1100"},
            {"model": "m", "strategy": "kd", "seed": 0, "next_line hits": "1110"},
            {"model": "m", "strategy": "mone", "seed": 0, "next_line hits": "0100"},
            {"model": "m", "strategy": "reap", "seed": 0, "error": "PlanError: cannot"},
            {"model": "m", "strategy": "frequency", "seed": 0, "3p code ppl": 3.0}]  # no hits: not compared
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": rows}))
    results = {r["other"]: r for r in script.compare(script.load_rows([path]), "kd")}
    assert sorted(results) == ["dense", "mone"]
    assert results["dense"]["mean"] == pytest.approx(0.25) and results["mone"]["mean"] == pytest.approx(0.5)
    assert "| m | next_line | mone | 4 | +0.500 |" in script.table(list(results.values()), "kd")
