"""Turn per-expert scores into kept sets: uniform per layer, per group, or one global budget.

Higher score = more important. Ties break towards the lower expert index, so plans are
deterministic. Group-limited routers (DeepSeek-V3, GLM) prune the same count from each contiguous
group. The global budget pools scores that the caller made comparable across layers and keeps at
least `min_keep` experts per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moeprune.calibration.stats import ExpertStats
from moeprune.plan import PlanError


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise PlanError(f"ratio must be in [0, 1) (share of experts removed), got {ratio!r}")
    return float(ratio)


def routing_of(stats: ExpertStats) -> tuple[dict[str, Any], int, int]:
    """(routing semantics, top-k, n_group) recorded in the statistics' metadata."""
    routing = stats.meta.get("routing", {})
    top_k = int(stats.meta.get("top_k") or routing.get("top_k") or 1)
    return routing, top_k, int(routing.get("n_group", 1) or 1)


def _order(scores: torch.Tensor) -> list[int]:
    """Expert indices from least to most important (stable: lower index first among equals)."""
    return sorted(range(scores.numel()), key=lambda j: (float(scores[j]), j))


def keep_top(scores: torch.Tensor, drop: int) -> list[int]:
    """Indices kept after dropping the `drop` lowest-scoring experts, ascending."""
    return sorted(_order(scores)[drop:])


def select_uniform(scores: dict[int, torch.Tensor], ratio: float, n_group: int = 1) -> dict[int, list[int]]:
    """Drop floor(E * ratio) experts per layer (floor(E/n_group * ratio) per group if grouped)."""
    check_ratio(ratio)
    kept: dict[int, list[int]] = {}
    for layer, s in scores.items():
        e = s.numel()
        if n_group > 1:
            size = e // n_group
            drop = math.floor(size * ratio)
            kept[layer] = sorted(
                g * size + j for g in range(n_group) for j in keep_top(s[g * size : (g + 1) * size], drop)
            )
        else:
            kept[layer] = keep_top(s, math.floor(e * ratio))
    return kept


def select_global(scores: dict[int, torch.Tensor], ratio: float, min_keep: int) -> dict[int, list[int]]:
    """One budget for all layers: drop the floor(total * ratio) lowest pooled scores, but never
    below `min_keep` experts in a layer. Scores must be comparable across layers."""
    check_ratio(ratio)
    total = sum(s.numel() for s in scores.values())
    budget = math.floor(total * ratio)
    pool = sorted((float(s[j]), layer, j) for layer, s in scores.items() for j in range(s.numel()))
    remaining = {layer: s.numel() for layer, s in scores.items()}
    dropped: set[tuple[int, int]] = set()
    for _, layer, j in pool:
        if len(dropped) >= budget:
            break
        if remaining[layer] > min_keep:
            dropped.add((layer, j))
            remaining[layer] -= 1
    if len(dropped) < budget:
        raise PlanError(f"a global ratio of {ratio} cannot keep {min_keep} experts in every layer")
    return {layer: [j for j in range(s.numel()) if (layer, j) not in dropped] for layer, s in scores.items()}
