"""Score-and-drop strategies: frequency, soft frequency, EAN and REAP (algorithms.md sections 1-2).

Each expert gets a score from the calibration statistics; the lowest are dropped. Scores:
- frequency: |X_j|, tokens routed to j;
- soft-frequency: sum of the model's effective gate g_j over routed tokens;
- ean: sum over routed tokens of ||f_j(x)||_2;
- reap: mean over routed tokens of g_j(x) * ||f_j(x)||_2 (0 if never routed).
With `budget="global"` scores are made comparable across layers first: frequencies are divided by
the layer's token count and EAN/REAP by the layer's score total (norms grow with depth).
Super experts are protected (score +inf) by default for REAP, on request for the others.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.selection import check_ratio, routing_of, select_global, select_uniform
from moeprune.strategies.super_experts import super_experts

ScoreFn = Callable[[LayerStats], torch.Tensor]


def _normalise_per_token(s: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return s / stats.tokens.clamp_min(1)


def _normalise_per_total(s: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return s / s.sum().clamp_min(1e-300)


def score_plan(
    stats: ExpertStats,
    name: str,
    score: ScoreFn,
    normalise: Callable[[torch.Tensor, LayerStats], torch.Tensor],
    ratio: float,
    budget: str = "layer",
    protect_super: bool = False,
    demote: Callable[[LayerStats], torch.Tensor] | None = None,
) -> Plan:
    """Shared body of the scoring strategies. `demote(stats)` (a bool mask) ranks those experts
    below every other, ordered among themselves by routed count (rarely routed experts first)."""
    check_ratio(ratio)
    routing, top_k, n_group = routing_of(stats)
    raw = {i: score(s).double() for i, s in sorted(stats.layers.items())}
    protected = super_experts(stats) if protect_super else {i: [] for i in raw}
    ranked = {}
    for i, s in raw.items():
        r = normalise(s, stats.layers[i]) if budget == "global" else s.clone()
        if demote is not None:
            low = demote(stats.layers[i])
            count = stats.layers[i].count.double()
            r[low] = count[low] / count.max().clamp_min(1) - 1.0  # in [-1, 0): below every real score
        r[protected[i]] = float("inf")
        ranked[i] = r
    if budget == "layer":
        kept = select_uniform(ranked, ratio, n_group)
    elif budget == "global":
        if n_group > 1:
            raise PlanError("a global budget is not supported for group-limited routers; use budget='layer'")
        kept = select_global(ranked, ratio, min_keep=top_k)
    else:
        raise PlanError(f"budget must be 'layer' or 'global', got {budget!r}")
    layers = {
        i: LayerPlan(layer=i, num_experts=raw[i].numel(), kept=kept[i], scores=[float(x) for x in raw[i]])
        for i in raw
    }
    params = {"ratio": ratio, "budget": budget, "protect_super": protect_super,
              "super_experts": {str(i): v for i, v in protected.items() if v}}
    return Plan(strategy=name, params=params, layers=layers, top_k=top_k, routing=routing)


@register_strategy("frequency", "drop the experts routed the fewest tokens")
def frequency(stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False) -> Plan:
    return score_plan(stats, "frequency", LayerStats.frequency, _normalise_per_token, ratio, budget, protect_super)


@register_strategy("soft-frequency", "drop the experts with the least total gate mass")
def soft_frequency(stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False) -> Plan:
    return score_plan(stats, "soft-frequency", LayerStats.soft_frequency, _normalise_per_token, ratio, budget, protect_super)


@register_strategy("ean", "drop the experts with the smallest summed activation norm (EAN)")
def ean(stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False) -> Plan:
    return score_plan(stats, "ean", LayerStats.ean, _normalise_per_total, ratio, budget, protect_super)


@register_strategy("reap", "drop the experts with the smallest router-weighted activation norm (REAP)")
def reap(stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = True, gate: str = "model") -> Plan:
    """`gate="model"` weights norms by the model's own gate (default); `gate="reference"` by the
    REAP reference code's softmax gate, which differs from the model for sigmoid routers."""
    if gate not in ("model", "reference"):
        raise PlanError(f"reap gate must be 'model' or 'reference', got {gate!r}")
    score = LayerStats.reap if gate == "model" else LayerStats.reap_reference
    result = score_plan(stats, "reap", score, _normalise_per_total, ratio, budget, protect_super)
    result.params["gate"] = gate
    return result
