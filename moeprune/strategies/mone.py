"""MoNE (algorithms.md section 6): keep the least redundant experts, replace the rest by novices.

Redundancy score s_j = phi_var_j * phi_freq_j, with phi_freq_j = (1/N) sum_x g_j(x) (soft routing
frequency) and phi_var_j = sqrt(sum_{X_j} ||f_j - mu_j||^2 / (|X_j| - 1)) (spread of the expert's
outputs around their mean). Per layer the top P = E - floor(E * ratio) are kept; every other expert
becomes a novice: the constant vector mu_j (its mean routed output). The router is unchanged, so
tokens still route to novices and receive g_j(x) * mu_j. The novice vectors travel in the plan
(each layer's `novice_vectors`), so `apply` needs no statistics; see `moeprune.apply.novice` for how
the result is saved and reloaded.

`rank="soft-frequency"` keeps the experts with the most gate mass instead (no spread factor) and
still replaces the rest by novices: soft frequency's choice of survivors with MoNE's stand-ins.
"""

from __future__ import annotations

import torch

from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import LayerPlan, Plan, PlanError, encode_vectors
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.selection import check_ratio, routing_of, select_uniform
from moeprune.strategies.super_experts import super_experts


def redundancy_score(stats: LayerStats) -> torch.Tensor:
    """phi_var * phi_freq per expert (low = redundant)."""
    return stats.output_std() * (stats.gate_sum / stats.tokens.clamp_min(1))


RANKS = {"redundancy": redundancy_score, "soft-frequency": LayerStats.soft_frequency}


@register_strategy("mone", "replace redundant experts by constant novice vectors (MoNE); router unchanged")
def mone(stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
         rank: str = "redundancy") -> Plan:
    check_ratio(ratio)
    if rank not in RANKS:
        raise PlanError(f"mone rank must be one of {', '.join(RANKS)}, got {rank!r}")
    if budget != "layer":
        raise PlanError("mone keeps the top P experts per layer (budget='layer'); a global budget is not supported")
    routing, top_k, n_group = routing_of(stats)
    if routing.get("identity_experts"):
        raise PlanError("mone replaces experts by novices, which routers with identity (zero-compute) experts "
                        "(LongCat-Flash) do not support; use a selection or merging strategy")
    scores = {i: RANKS[rank](s).double() for i, s in sorted(stats.layers.items())}
    protected = super_experts(stats) if protect_super else {i: [] for i in scores}
    ranked = {}
    for i, s in scores.items():
        r = s.clone()
        r[protected[i]] = float("inf")
        ranked[i] = r
    kept = select_uniform(ranked, ratio, n_group)
    layers = {}
    for i, s in scores.items():
        novices = [j for j in range(s.numel()) if j not in kept[i]]
        vectors = encode_vectors(stats.layers[i].output_mean()[novices]) if novices else None
        layers[i] = LayerPlan(layer=i, num_experts=s.numel(), kept=kept[i], scores=[float(x) for x in s],
                              novices=novices or None, novice_vectors=vectors)
    params = {"ratio": ratio, "protect_super": protect_super, "rank": rank}
    return Plan(strategy="mone", params=params, layers=layers, top_k=top_k, routing=routing)
