"""Imports point down: io at the bottom, then the layer engine, calibration, plan/strategies, apply,
evaluation, and the pipeline / API / CLI on top.

Read from the sources with `ast` (every import, including ones inside functions), so a lazy import
that closes a circle fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moeprune

ROOT = Path(moeprune.__file__).resolve().parent


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "moeprune"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "moeprune":  # `from moeprune import x`: the root, or a subpackage
                    found |= {f"moeprune.{a.name}" if (ROOT / a.name).exists() or (ROOT / f"{a.name}.py").exists()
                              else "moeprune" for a in node.names}
                elif node.module.startswith("moeprune."):
                    found.add(node.module)
        graph[module] = found
    return graph


GRAPH = _imports()
ENTRY_POINTS = ("moeprune.pipeline", "moeprune.api", "moeprune.cli", "moeprune.distributed")
ABOVE_STRATEGIES = ("moeprune.apply", "moeprune.evaluation", "moeprune.sparsify", "moeprune.slimming",
                    "moeprune.recover", "moeprune.auto") + ENTRY_POINTS
ABOVE_ENGINE = ("moeprune.calibration", "moeprune.strategies", "moeprune.data") + ABOVE_STRATEGIES


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{m} -> {i}" for m, imps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")
            for i in sorted(imps) if i == "moeprune" or any(i == f or i.startswith(f + ".") for f in forbidden)]


def test_the_walker_sees_lazy_imports():
    assert "moeprune.apply.recombine" in GRAPH["moeprune.apply.surgery"]  # imported inside a function


@pytest.mark.parametrize("package, forbidden", [
    ("moeprune.strategies", ABOVE_STRATEGIES),
    ("moeprune.calibration", ("moeprune.evaluation", "moeprune.strategies") + ABOVE_STRATEGIES),
    ("moeprune.data", ("moeprune.evaluation", "moeprune.strategies") + ABOVE_STRATEGIES),
    ("moeprune.apply", ("moeprune.strategies", "moeprune.evaluation") + ENTRY_POINTS),
    ("moeprune.evaluation", ENTRY_POINTS),
    ("moeprune.engine", ABOVE_ENGINE),
    ("moeprune.io", ("moeprune.engine",) + ABOVE_ENGINE),
])
def test_packages_import_nothing_above_them(package, forbidden):
    assert [v for v in _violations(package, forbidden) if v not in KNOWN_UPWARD] == []


# The one known upward edge: reloading a moeprune output whose modules differ from its config
# (per-layer expert counts, novices, slimmed widths, dynamic skipping) rebuilds those modules with
# apply's and slimming's resizers, lazily inside `load_pruned`.
KNOWN_UPWARD = {"moeprune.io.checkpoint -> moeprune.apply.dynamic_skip", "moeprune.io.checkpoint -> moeprune.apply.novice",
                "moeprune.io.checkpoint -> moeprune.apply.surgery", "moeprune.io.checkpoint -> moeprune.slimming.channels"}


def test_plan_imports_only_the_version():
    assert GRAPH["moeprune.plan"] == {"moeprune._version"}


def test_text_sources_are_neutral():
    # calibration and evaluation share text through moeprune.data, not through each other
    assert "moeprune.data.texts" in GRAPH["moeprune.calibration.data"]
    assert GRAPH["moeprune.evaluation.text_sources"] == {"moeprune.data.texts"}
    assert {i for i in GRAPH["moeprune.data.texts"]} <= {"moeprune.calibration.builtin_corpus"}


def test_no_parallel_streaming_package():
    # streamed variants live in their phase's package (io, engine, calibration, apply, evaluation, pipeline)
    assert not (ROOT / "streaming").exists()
    assert not any(m == "moeprune.streaming" or m.startswith("moeprune.streaming.") for m in GRAPH)
