"""The unified expert criterion S_j(b, alpha, beta) and its gate-free means MAN and MSAN.

From "How to Score Experts for One-Shot MoE Expert Pruning" (arXiv 2606.15716; methods-2026.md §2):

    S_j(b, alpha, beta) = N_j^-b * sum over tokens routed to j of g_j(x)^alpha * ||f_j(x)||_2^beta

N_j is the routed count, g the model's effective gate, f_j the expert output before gating. b is
free; (alpha, beta) must be a moment the one calibration pass collects (`MOMENTS`):

| (alpha, beta) | statistic                     | named criteria                                  |
|---------------|-------------------------------|-------------------------------------------------|
| (0, 0)        | count                         | frequency (b=0)                                 |
| (1, 0)        | gate_sum                      | soft frequency (b=0)                            |
| (0, 1)        | ean_sum                       | EAN (b=0), **MAN** (b=1)                        |
| (0, 2)        | out_sq summed over dimensions | **MSAN** (b=1)                                  |
| (1, 1)        | reap_sum                      | REAP (b=1), task-specific (0,1,1)               |
| (2, 2)        | reap_sq_sum                   | task-specific (0,2,2)                           |

Per layer the lowest scores are dropped (the same count per layer, or one global budget after
dividing each layer's scores by their total); an expert never routed scores 0.

Mean criteria (b > 0) are noisy for rarely routed experts: an expert seen on a handful of tokens
can score high by chance. With `min_share` > 0 (default 0.05), an expert routed fewer than
`min_share` x its uniform share (tokens x top_k / E) is ranked below every other and pruned first
(among such experts, the least routed go first); `min_share=0` disables this.
"""

from __future__ import annotations

import math

import torch

from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.scoring import score_plan
from moeprune.strategies.selection import routing_of

DEFAULT_MIN_SHARE = 0.05

# (alpha, beta) -> statistic name; "out_sq" is summed over its hidden dimension (sum ||f||^2).
MOMENTS: dict[tuple[int, int], str] = {
    (0, 0): "count",
    (1, 0): "gate_sum",
    (0, 1): "ean_sum",
    (0, 2): "out_sq",
    (1, 1): "reap_sum",
    (2, 2): "reap_sq_sum",
}


def _as_moment(alpha: float, beta: float) -> tuple[int, int]:
    key = (alpha, beta)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in key):
        raise PlanError(f"unified alpha and beta must be numbers, got alpha={alpha!r}, beta={beta!r}")
    rounded = (int(round(alpha)), int(round(beta)))
    if rounded != key or rounded not in MOMENTS:
        supported = ", ".join(f"({a}, {b})" for a, b in MOMENTS)
        raise PlanError(
            f"unified (alpha, beta) = ({alpha}, {beta}) is not collected by calibration; "
            f"supported (alpha, beta): {supported} (any b)"
        )
    return rounded


def moment(stats: LayerStats, alpha: float, beta: float) -> torch.Tensor:
    """sum over routed tokens of g^alpha * ||f||^beta, per expert (float64)."""
    name = MOMENTS[_as_moment(alpha, beta)]
    if name not in stats.tensors:
        raise PlanError(f"statistics lack {name!r} (needed for alpha={alpha}, beta={beta}); recalibrate with this version")
    value = stats.tensors[name].double()
    return value.sum(-1) if name == "out_sq" else value


def unified_score(stats: LayerStats, b: float, alpha: float, beta: float) -> torch.Tensor:
    """S_j(b, alpha, beta) per expert; 0 for experts never routed."""
    total = moment(stats, alpha, beta)
    if b == 0:
        return total.clone()
    count = stats.count.double()
    return torch.where(count > 0, total / count.clamp_min(1) ** b, torch.zeros_like(total))


def rarely_routed(stats: LayerStats, top_k: int, min_share: float) -> torch.Tensor:
    """Bool mask of experts routed fewer than `min_share` x tokens x top_k / E times."""
    share = float(stats.tokens) * top_k / stats.num_experts
    return stats.count.double() < min_share * share


def unified_plan(
    stats: ExpertStats, name: str, ratio: float, b: float, alpha: float, beta: float,
    budget: str = "layer", protect_super: bool = False, min_share: float = DEFAULT_MIN_SHARE,
) -> Plan:
    """Plan with S(b, alpha, beta); the body of `unified`, `man` and `msan`."""
    if isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b):
        raise PlanError(f"unified b must be a number (0 sums, 1 averages over routed tokens), got {b!r}")
    _as_moment(alpha, beta)
    if not isinstance(min_share, (int, float)) or not 0.0 <= min_share <= 1.0:
        raise PlanError(f"min_share must be in [0, 1] (share of an expert's uniform routed count), got {min_share!r}")
    _, top_k, _ = routing_of(stats)
    demote = None
    if b > 0 and min_share > 0:
        demote = lambda s: rarely_routed(s, top_k, min_share)  # noqa: E731
    per_total = lambda s, _: s / s.sum().clamp_min(1e-300)  # noqa: E731
    result = score_plan(stats, name, lambda s: unified_score(s, b, alpha, beta), per_total, ratio, budget,
                        protect_super, demote=demote)
    result.params.update({"b": float(b), "alpha": float(alpha), "beta": float(beta), "min_share": float(min_share)})
    return result


@register_strategy("unified", "drop the experts with the lowest N^-b * sum g^alpha ||f||^beta (unified criterion)")
def unified(
    stats: ExpertStats, ratio: float, b: float = 1.0, alpha: float = 0.0, beta: float = 1.0,
    budget: str = "layer", protect_super: bool = False, min_share: float = DEFAULT_MIN_SHARE,
) -> Plan:
    return unified_plan(stats, "unified", ratio, b, alpha, beta, budget, protect_super, min_share)


@register_strategy("man", "drop the experts with the smallest mean activation norm over routed tokens (MAN)")
def man(
    stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
    min_share: float = DEFAULT_MIN_SHARE,
) -> Plan:
    return unified_plan(stats, "man", ratio, 1.0, 0.0, 1.0, budget, protect_super, min_share)


@register_strategy("msan", "drop the experts with the smallest mean squared activation norm over routed tokens (MSAN)")
def msan(
    stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
    min_share: float = DEFAULT_MIN_SHARE,
) -> Plan:
    return unified_plan(stats, "msan", ratio, 1.0, 0.0, 2.0, budget, protect_super, min_share)
