"""Sparsity budgets: intra-expert sparsity alone, or a total target over structured + unstructured.

STUN-style accounting over routed-expert parameters: if the plan already removed a share r of them
(dropped or merged experts), intra-expert sparsity s on the survivors gives a total
r + (1 - r) * s, so reaching a total T needs s = (T - r) / (1 - r). T below r (the plan alone
already removes more) or s >= 1 is impossible and raises.
"""

from __future__ import annotations

from typing import Any


class BudgetError(ValueError):
    """A sparsity target that cannot be reached."""


def removed_share(plan: Any) -> float:
    """Share of routed-expert parameters the plan removes (experts are all the same size)."""
    if plan is None:
        return 0.0
    before = sum(lp.num_experts for lp in plan.layers.values())
    after = sum(lp.num_kept for lp in plan.layers.values())
    return 1.0 - after / before if before else 0.0


def intra_sparsity_for_total(total: float, removed: float) -> float:
    """Intra-expert sparsity that brings routed-expert sparsity to `total` given `removed` share."""
    if not 0.0 <= total < 1.0:
        raise BudgetError(f"total sparsity must be in [0, 1), got {total}")
    if total < removed - 1e-9:
        raise BudgetError(
            f"total sparsity {total:.3f} is below the {removed:.3f} of expert parameters the plan already "
            "removes; raise the total or lower the expert-pruning ratio"
        )
    intra = (total - removed) / (1.0 - removed)
    if intra >= 1.0:
        raise BudgetError(f"total sparsity {total} needs intra-expert sparsity {intra:.3f} >= 1")
    return max(0.0, intra)


def total_sparsity(intra: float, removed: float) -> float:
    """Routed-expert sparsity after removing `removed` experts and pruning `intra` of the rest."""
    return removed + (1.0 - removed) * intra
