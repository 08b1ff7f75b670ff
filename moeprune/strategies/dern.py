"""DERN (algorithms.md section 7): drop experts, then recombine their neurons into retained experts.

A reconstruction from the paper's description; no official code was found.

1. Plan: drop the floor(E * ratio) experts with the least soft frequency (total gate mass), per
   layer (per routing group for group-limited routers). The plan's `scores` keep each expert's
   gate mass and each layer's `recombine_threshold` the similarity threshold.
2. Apply (`moeprune.apply.recombine.recombine_neurons`, run by `apply_plan` before slicing): split every dropped expert
   into neuron segments (W_gate[c, :], W_up[c, :], W_down[:, c], + gate/up biases). A segment goes
   to the retained expert holding the neuron most similar to it (cosine over the concatenated
   gate and up rows), if that cosine is above the threshold (default 0.4); otherwise it is
   discarded.
3. Inside each retained expert its own d_ff neurons are the cluster centres: every assigned segment
   joins the neuron it matched, and each neuron becomes the average of itself and its segments,
   weighted by source gate mass. Widths are unchanged, so the result loads with stock classes.
   With threshold >= 1.0 nothing is assigned and DERN equals plain dropping.
The down-projection bias (gpt-oss) belongs to the expert and is left unchanged.
"""

from __future__ import annotations

from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.scoring import score_plan

DEFAULT_THRESHOLD = 0.4


@register_strategy("dern", "drop low-frequency experts and merge their neurons into similar retained neurons (DERN)")
def dern(
    stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
) -> Plan:
    if not 0.0 <= float(threshold) or threshold != threshold:
        raise PlanError(f"dern threshold must be a cosine in [0, 1] (>= 1 disables recombination), got {threshold}")
    per_token = lambda s, ls: s / ls.tokens.clamp_min(1)  # noqa: E731
    result = score_plan(stats, "dern", LayerStats.soft_frequency, per_token, ratio, budget, protect_super)
    result.params["threshold"] = float(threshold)
    for lp in result.layers.values():
        lp.recombine_threshold = float(threshold)
    return result
