"""`uniform: true` / `--uniform`: the same budget as a non-uniform plan, as equal per-layer counts.

A global budget (or any strategy that picks per-layer counts) gives layers different expert
counts, which llama.cpp/GGUF and vLLM cannot load. This re-plans with `budget="layer"` at the
per-layer count closest to the non-uniform plan's mean, so about the same share of routed experts
is removed and every layer keeps the same number. Strategies that take no per-layer budget
(STUN's threshold clustering) are refused with a one-line error naming the alternative.
"""

from __future__ import annotations

from typing import Any

from moeprune.calibration.stats import ExpertStats
from moeprune.plan import Plan, PlanError


def uniform_from(stats: ExpertStats | None, strategy: str, made: Plan, model: Any = None, **params: Any) -> Plan:
    """A uniform plan with (about) the budget of the non-uniform plan `made`."""
    from moeprune.strategies.registry import get_strategy, plan

    if made.uniform:
        return made
    spec = get_strategy(strategy)
    if "budget" not in spec.parameters or strategy == "stun":
        raise PlanError(f"strategy {strategy!r} chooses per-layer counts itself; for a uniform checkpoint use a strategy "
                        "with a per-layer budget (e.g. --strategy hc-smoe or reap) instead of --uniform")
    sizes = {lp.num_experts for lp in made.layers.values()}
    if len(sizes) != 1:
        raise PlanError("--uniform needs the same expert count in every MoE layer of the input")
    experts = sizes.pop()
    kept = round(sum(made.experts_per_layer.values()) / len(made.layers))
    ratio = (experts - kept) / experts
    result = plan(stats, strategy, ratio, model=model, **{**params, "budget": "layer"})
    if not result.uniform:
        raise PlanError(f"re-planning at ratio {ratio:.3f} with budget=layer did not give a uniform plan")
    result.params["uniform_from"] = {"budget": params.get("budget", "global"),
                                     "experts_per_layer": {str(i): n for i, n in made.experts_per_layer.items()}}
    return result
