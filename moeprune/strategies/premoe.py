"""PreMoE (methods-2026.md section 6): keep the experts with the highest Predicted Expert Utility.

PEU_i = mean over all calibration tokens of max(s_i, sigmoid(s_i)) when expert i is among the
token's top-K_a router logits with local softmax probability >= r_l (the layer's mean max local
probability), else 0 (`moeprune.calibration.peu`). Per layer the top M = E - floor(E * ratio)
experts by PEU are kept (the same M in every layer, as in the paper; `budget="global"` pools the
per-token PEU values, which are comparable across layers). Calibrating on one task's data gives
that task's specialist; mixed data gives the generalist. `plan_from_scores` turns stored per-task
PEU vectors (task patterns, `moeprune.patterns`) into a plan without statistics.
"""

from __future__ import annotations

import torch

from moeprune.calibration.peu import peu_from_hist
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.scoring import score_plan
from moeprune.strategies.selection import check_ratio, select_uniform


def peu_score(stats: LayerStats) -> torch.Tensor:
    """PEU per expert of one layer (needs the `peu_hist` statistics, moeprune >= this version)."""
    if "peu_hist" not in stats.tensors:
        raise PlanError("these statistics have no PreMoE fields (peu_hist); recalibrate with this moeprune version")
    return peu_from_hist(stats.peu_hist, stats.peu_maxp_sum, stats.tokens)[0]


def peu_threshold(stats: LayerStats) -> float:
    """The layer's adaptive threshold r_l."""
    return peu_from_hist(stats.peu_hist, stats.peu_maxp_sum, stats.tokens)[1]


def _as_is(s: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return s  # PEU is already a per-token mean


@register_strategy("premoe", "keep the experts with the highest PreMoE utility (PEU: thresholded top-K_a router logits)")
def premoe(stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False) -> Plan:
    result = score_plan(stats, "premoe", peu_score, _as_is, ratio, budget, protect_super)
    result.params["peu_top_k"] = stats.meta.get("peu_top_k")
    result.params["thresholds"] = {str(i): peu_threshold(s) for i, s in sorted(stats.layers.items())}
    return result


def plan_from_scores(
    scores: dict[int, list[float]], ratio: float, top_k: int, routing: dict, strategy: str = "premoe", params: dict | None = None
) -> Plan:
    """A uniform plan keeping the top M experts per layer by stored scores (a task pattern)."""
    check_ratio(ratio)
    tensors = {int(i): torch.tensor(v, dtype=torch.float64) for i, v in scores.items()}
    kept = select_uniform(tensors, ratio, int(routing.get("n_group", 1) or 1))
    layers = {i: LayerPlan(layer=i, num_experts=s.numel(), kept=kept[i], scores=[float(x) for x in s])
              for i, s in sorted(tensors.items())}
    return Plan(strategy=strategy, params={"ratio": ratio, **(params or {})}, layers=layers, top_k=top_k,
                routing=routing).validate()
