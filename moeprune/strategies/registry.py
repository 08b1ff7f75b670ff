"""One validated registry of planning strategies, and `plan()`, the entry point that uses it.

A strategy is a pure function `(stats, ratio, routing, **params) -> Plan` (merging strategies also
receive the model's expert weights). Strategies register by name with what they need, so the CLI
and the calibration step can ask for it (e.g. dense output samples for HC-SMoE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from moeprune.calibration.stats import ExpertStats
from moeprune.plan import Plan, PlanError


@dataclass(frozen=True)
class StrategySpec:
    name: str
    fn: Callable[..., Plan]
    description: str
    needs_weights: bool = False
    dense_tokens: int = 0
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, StrategySpec] = {}


def register_strategy(
    name: str, description: str, needs_weights: bool = False, dense_tokens: int = 0, **defaults: Any
) -> Callable[[Callable[..., Plan]], Callable[..., Plan]]:
    """Decorator registering `fn` under `name`; names are unique."""

    def wrap(fn: Callable[..., Plan]) -> Callable[..., Plan]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        _REGISTRY[name] = StrategySpec(name, fn, description, needs_weights, dense_tokens, dict(defaults))
        return fn

    return wrap


def get_strategy(name: str) -> StrategySpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise PlanError(f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_strategies() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Importing the strategy modules registers them (explicit list, no scanning).
    from moeprune.strategies import scoring  # noqa: F401

    try:  # merging / novice / recombination strategies, when present
        from moeprune.strategies import extra  # noqa: F401
    except ImportError:
        pass


def plan(stats: ExpertStats, strategy: str = "reap", ratio: float = 0.5, model: Any = None, **params: Any) -> Plan:
    """Plan which experts to keep. `model` is needed only by strategies that read weights."""
    spec = get_strategy(strategy)
    kwargs = {**spec.defaults, **params}
    if spec.needs_weights:
        if model is None:
            raise PlanError(f"strategy {strategy!r} reads expert weights: pass model=")
        kwargs["model"] = model
    result = spec.fn(stats, ratio=ratio, **kwargs)
    result.stats_hash = stats.digest()
    return result.validate()
