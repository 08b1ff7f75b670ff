"""One validated registry of planning strategies, and `plan()`, the entry point that uses it.

A strategy is a pure function `(stats, ratio, routing, **params) -> Plan` (strategies that read
expert weights also receive `model=`). Strategies register by name with what they need, so a run
can refuse early, before calibration, what it cannot do:

- `needs_calibration`: reads routing/expert statistics (every built-in strategy does);
- `needs_weights`: reads the loaded model's expert weights (passed as `model=`);
- `dense_tokens`: calibration must also run every expert on this many tokens per layer;
- a `sample_tokens` parameter: calibration keeps a token sample with expert-output Gram matrices;
- `in_memory_only`: the streamed (`--offload`) path cannot apply its plans.

Parameters are checked against the function's signature (`StrategySpec.check_params`) when a
recipe is read or CLI options are parsed, with a one-line error naming the bad key and the
accepted ones. The built-in strategy modules are imported explicitly at the bottom of this file
(`scoring`, and `extra`, which imports the others); an ImportError there surfaces as itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moeprune.calibration.stats import ExpertStats
from moeprune.plan import Plan, PlanError

# Arguments the registry passes itself; never recipe `params`.
_RESERVED = ("stats", "ratio", "model")
# Recipe-level options (`budget:`, `protect_super:`) that reach every strategy accepting them.
COMMON_PARAMS = ("budget", "protect_super")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    fn: Callable[..., Plan]
    description: str
    needs_weights: bool = False
    dense_tokens: int = 0
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_calibration: bool = True
    in_memory_only: bool = False

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword parameters a recipe may set (the signature minus stats, ratio, model)."""
        sig = inspect.signature(self.fn)
        return {n: p for n, p in sig.parameters.items()
                if n not in _RESERVED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @property
    def open_params(self) -> bool:
        """True when the function takes **kwargs (any key is accepted)."""
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(self.fn).parameters.values())

    def accepts(self, key: str) -> bool:
        return self.open_params or key in self.parameters

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Raise PlanError naming the first key the strategy does not take; returns `params`."""
        for key in params:
            if key in _RESERVED or not self.accepts(key):
                accepted = ", ".join(self.parameters) or "none"
                raise PlanError(f"strategy {self.name!r} has no parameter {key!r}; accepted: {accepted}")
        return params

    def common_params(self, budget: str = "layer", protect_super: bool | None = None) -> dict[str, Any]:
        """The recipe-level options this strategy takes; a non-default one it cannot take fails."""
        out: dict[str, Any] = {}
        if self.accepts("budget"):
            out["budget"] = budget
        elif budget != "layer":
            raise PlanError(f"strategy {self.name!r} has no global budget (budget={budget!r}); use budget='layer'")
        if protect_super is not None:
            if not self.accepts("protect_super"):
                raise PlanError(f"strategy {self.name!r} has no parameter 'protect_super'; accepted: "
                                f"{', '.join(self.parameters) or 'none'}")
            out["protect_super"] = protect_super
        return out

    def sample_tokens(self, params: dict[str, Any] | None = None) -> int:
        """Tokens per layer calibration must sample with expert-output Gram matrices for this strategy
        (`calibration/token_sample.py`, NAEE): its `sample_tokens` parameter, 0 if it has none."""
        if "sample_tokens" not in self.parameters:
            return 0
        default = self.defaults.get("sample_tokens", self.parameters["sample_tokens"].default)
        return int((params or {}).get("sample_tokens", default))

    def check_streamable(self) -> None:
        """Refuse, before any work, a strategy the streamed (`--offload`) path cannot run."""
        if self.in_memory_only:
            raise PlanError(f"strategy {self.name!r} needs the model in memory; drop --offload")


_REGISTRY: dict[str, StrategySpec] = {}


def register_strategy(
    name: str, description: str, needs_weights: bool = False, dense_tokens: int = 0, *,
    needs_calibration: bool = True, in_memory_only: bool = False, **defaults: Any,
) -> Callable[[Callable[..., Plan]], Callable[..., Plan]]:
    """Decorator registering `fn` under `name`; names are unique and `defaults` must be parameters."""

    def wrap(fn: Callable[..., Plan]) -> Callable[..., Plan]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        spec = StrategySpec(name, fn, description, needs_weights, dense_tokens, dict(defaults),
                            needs_calibration=needs_calibration, in_memory_only=in_memory_only)
        try:
            spec.check_params(spec.defaults)
        except PlanError as err:
            raise ValueError(f"register_strategy defaults: {err}") from None
        if needs_weights and "model" not in inspect.signature(fn).parameters:
            raise ValueError(f"strategy {name!r} declares needs_weights but its function takes no `model`")
        _REGISTRY[name] = spec
        return fn

    return wrap


def get_strategy(name: str) -> StrategySpec:
    if name not in _REGISTRY:
        raise PlanError(f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def plan(stats: ExpertStats | None, strategy: str = "reap", ratio: float = 0.5, model: Any = None, **params: Any) -> Plan:
    """Plan which experts to keep. `model` is needed only by strategies that read weights;
    `stats` may be None for calibration-free strategies (`needs_calibration=False`)."""
    spec = get_strategy(strategy)
    if stats is None and spec.needs_calibration:
        raise PlanError(f"strategy {strategy!r} needs calibration statistics: run calibration first")
    kwargs = {**spec.defaults, **spec.check_params(params)}
    if spec.needs_weights:
        if model is None:
            raise PlanError(f"strategy {strategy!r} reads expert weights: pass model=")
        kwargs["model"] = model
    result = spec.fn(stats, ratio=ratio, **kwargs)
    result.stats_hash = stats.digest() if stats is not None else None
    if stats is not None and not result.model:  # binds the plan to the calibrated model (moeprune.fingerprint)
        result.model = stats.meta.get("fingerprint")
    elif stats is None and not result.model and isinstance(model, torch.nn.Module):  # data-free: the model read
        from moeprune.fingerprint import model_fingerprint

        result.model = model_fingerprint(model)
    return result.validate()


# The built-in strategies register on import (explicit list, no scanning, no swallowed errors).
# New strategy modules add one import line to `extra.py`.
from moeprune.strategies import scoring  # noqa: E402,F401
from moeprune.strategies import extra  # noqa: E402,F401
