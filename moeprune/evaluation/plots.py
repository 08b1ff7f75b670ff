"""PNG figures for pruning results (matplotlib, headless Agg backend).

- :func:`plot_perplexity_vs_compression`: one line per strategy, perplexity against the share of
  experts removed, a dashed line for the dense model when given.
- :func:`plot_perplexity_bars`: perplexity per evaluated model (bars) and data source (colours),
  as produced by ``moeprune eval``.
- :func:`plot_routing_heatmaps`: per-layer expert routing frequencies ``[layers, experts]`` before
  and after pruning side by side (dropped experts show as empty cells when ``after`` uses NaN).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Write `fig` to `path` and release it."""
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_perplexity_vs_compression(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    x: str = "compression",
    y: str = "perplexity",
    group: str = "strategy",
    dense: float | None = None,
    title: str | None = None,
) -> Path:
    """Line plot of ``y`` against ``x`` per ``group`` value; returns the written path."""
    plt = _pyplot()
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            series[str(row.get(group, "?"))].append((float(row[x]), float(row[y])))
    if not series:
        raise ValueError(f"no rows with both {x!r} and {y!r}")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle="--", label="dense")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_yscale("log")
    ax.set_title(title or f"{y} vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_perplexity_bars(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars from rows with ``model``, ``data`` and ``perplexity`` keys (models in row order)."""
    plt = _pyplot()
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    sources = list(dict.fromkeys(str(r["data"]) for r in rows))
    value = {(str(r["model"]), str(r["data"])): float(r["perplexity"]) for r in rows}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(models) * len(sources)), 4), dpi=120)
    width = 0.8 / len(sources)
    for j, src in enumerate(sources):
        xs = [i + j * width for i in range(len(models))]
        ax.bar(xs, [value.get((m, src), float("nan")) for m in models], width, label=src)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
    ax.set_xticklabels([Path(m).name or m for m in models], rotation=20, ha="right")
    ax.set_ylabel("perplexity")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_routing_heatmaps(
    before: np.ndarray, after: np.ndarray | None, path: str | Path, title: str | None = None
) -> Path:
    """Heatmaps of routing frequency per (layer, expert); ``after`` may be None or hold NaN."""
    plt = _pyplot()
    panels = [("before", np.asarray(before, dtype=float))]
    if after is not None:
        panels.append(("after", np.asarray(after, dtype=float)))
    for name, arr in panels:
        if arr.ndim != 2:
            raise ValueError(f"{name}: expected [layers, experts], got shape {arr.shape}")
    vmax = max(float(np.nanmax(arr)) for _, arr in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), dpi=120, squeeze=False)
    for ax, (name, arr) in zip(axes[0], panels):
        im = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="routing frequency")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)
