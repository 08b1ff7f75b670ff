"""The `auto:` section of a recipe: which strategies `--strategy auto` compares, and how.

Candidates default to the score strategies, MAN/MSAN, AIMER, MoNE and DERN. `budgets` lists the
budgets tried for every candidate that has one (default: the recipe's `budget`; `--auto-budget`
sets `[layer, global]`).
`val_fraction` of the calibration sequences (chosen with `val_seed`, default the calibration seed)
are held out of planning and used only to score candidates. With `val_source` the candidates are
instead scored on `val_samples` sequences of that text source (its train split; e.g. third-party text
the model never trained on) and planning uses every calibration sequence: when the calibration text
is the model's own training text, the dense model is sharper on it than on new text, and KL there
can rank candidates the other way round (seen on the bundled models; README, `auto`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moeprune.plan import PlanError

AUTO = "auto"
DEFAULT_CANDIDATES = ("frequency", "soft-frequency", "ean", "reap", "man", "msan", "aimer", "mone", "dern")


class AutoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[str] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    budgets: list[Literal["layer", "global"]] | None = None  # None: the recipe's own `budget`
    val_fraction: float = Field(0.125, gt=0.0, lt=1.0)
    val_seed: int | None = None
    val_source: str | None = None  # score on this text source instead of a split of the calibration
    val_samples: int = Field(16, ge=1)  # sequences of val_source (calibration seq_len)

    @field_validator("candidates")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from moeprune.strategies import available_strategies

        if not value:
            raise ValueError("auto needs at least one candidate strategy")
        unknown = [v for v in value if v not in available_strategies()]
        if unknown:
            raise ValueError(f"unknown auto candidate(s) {unknown}; available: {', '.join(available_strategies())}")
        if len(set(value)) != len(value):
            raise ValueError(f"auto candidates repeat: {value}")
        return value

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"auto budgets must be a non-empty list without repeats, got {value}")
        return value


def candidate_params(recipe: Any, name: str, budget: str) -> dict[str, Any] | None:
    """Parameters for candidate `name` under `budget`: `recipe.params[name]` plus the recipe's
    budget / protect_super where the strategy takes them; None when it has no such budget."""
    from moeprune.strategies import get_strategy

    spec = get_strategy(name)
    own = recipe.params.get(name, {}) or {}
    if not isinstance(own, dict):
        raise PlanError(f"with strategy auto, params.{name} must be a mapping of that strategy's parameters")
    common: dict[str, Any] = {}
    if spec.accepts("budget"):
        common["budget"] = budget
    elif budget != "layer":
        return None
    if recipe.protect_super is not None and spec.accepts("protect_super"):
        common["protect_super"] = recipe.protect_super
    return spec.check_params({**common, **own})


def check_auto_recipe(recipe: Any) -> None:
    """Fail before any work on params that name no candidate or that a candidate does not take."""
    cfg = recipe.auto or AutoConfig()
    stray = sorted(set(recipe.params) - set(cfg.candidates))
    if stray:
        raise PlanError(f"with strategy auto, params must be keyed by candidate name; {stray} is not a candidate "
                        f"({', '.join(cfg.candidates)})")
    for name in cfg.candidates:
        candidate_params(recipe, name, "layer")  # a budget a candidate lacks is skipped, not an error
