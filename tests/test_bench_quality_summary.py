"""bench_quality's seed summary: mean ± half-range, retention, and which rows the seed spread separates."""

from __future__ import annotations

import pytest

from script_loader import load_script


def _bench():
    return load_script("bench_quality")


def _row(strategy: str, seed, ppl: float, acc: float, ratio: float = 0.5) -> dict:
    return {"model": "m", "strategy": strategy, "ratio": ratio, "seed": seed, "calib_tokens": 16384 if seed is not None else 0,
            "3p code ppl": ppl, "top-1 agree": 0.5, "KL": 0.1, "next_line acc": acc}


def test_summary_by_hand() -> None:
    bench = _bench()
    rows = [_row("dense", None, 10.0, 0.8, ratio=0.0)]
    rows += [_row("a", s, p, 0.6) for s, p in enumerate((20.0, 22.0, 24.0))]  # 22 ± 2
    rows += [_row("b", s, p, 0.4) for s, p in enumerate((30.0, 31.0, 32.0))]  # 31 ± 1: disjoint from a
    rows += [_row("c", s, p, 0.4) for s, p in enumerate((23.0, 25.0, 27.0))]  # 25 ± 2: overlaps a
    rows.append({**_row("d", 0, 0.0, 0.0), "error": "PlanError: cannot"})
    summary = {s["strategy"]: s for s in bench.summarise(rows)}
    assert summary["a"]["3p code ppl"] == pytest.approx(22.0) and summary["a"]["3p code ppl ±"] == pytest.approx(2.0)
    assert summary["a"]["next_line acc retention %"] == pytest.approx(75.0)
    assert (summary["a"]["vs best"], summary["b"]["vs best"], summary["c"]["vs best"]) == ("best", "worse", "≈")
    peers = [summary[k] for k in "abc"]
    assert [bench.separated(summary[k], peers, "3p code ppl") for k in "abc"] == ["best", "worse", ""]
    assert bench.separated(summary["a"], peers, "next_line acc") == "best"
    assert "d" not in summary and summary["a"]["n_seeds"] == 3
    table = bench.markdown(list(summary.values()), rows)
    assert "**22.0 ± 2.0**" in table and "31.0 ± 1.0 *" in table and "**0.600 ± 0.000** (75%)" in table and "Not measured: m d: PlanError" in table
