"""Validated recipes: the YAML files in configs/ and the `--config` option are parsed into these.

Unknown keys, ratios outside [0, 1) and unknown strategies fail with pydantic's message naming
the field. CLI options override recipe values they are given for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeprune.io.loading import BUNDLED
from moeprune.sparsify.config import SparsifyConfig
from moeprune.slimming.config import SlimConfig
from moeprune.auto.config import AUTO, AutoConfig
from moeprune.recover.config import RouterKDConfig


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "builtin:mixed"
    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=2)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    dense_tokens: int = Field(0, ge=0)


class PruneRecipe(BaseModel):
    """Everything `moeprune prune` needs."""

    model_config = ConfigDict(extra="forbid")
    model: str = BUNDLED
    strategy: str = "reap"
    ratio: float = Field(0.5, ge=0.0, lt=1.0)
    budget: Literal["layer", "global"] = "layer"
    protect_super: bool | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    output: str | None = None
    evaluate: bool = False
    eval_max_tokens: int = Field(32768, ge=16)
    sparsify: SparsifyConfig | None = None  # intra-expert pruning after the plan (moeprune.sparsify)
    slim: SlimConfig | None = None  # channel slimming inside experts after the plan (moeprune.slimming)
    patterns: str | None = None  # PreMoE task patterns file (`moeprune patterns`); the plan follows `query`
    query: str | None = None  # text, or @FILE, matched to the nearest task pattern
    dynamic_skip: bool = False  # NAEE dynamic expert skipping at inference (moeprune.apply.dynamic_skip)
    auto: AutoConfig | None = None  # strategy: auto -- candidates, budgets, validation split (moeprune.auto)
    router_kd: RouterKDConfig | None = None  # router calibration after compression (moeprune.recover)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: the checkpoint's own dtype
    trust_remote_code: bool = False  # run the checkpoint's own Python code (auto_map); never by default
    allow_nonfinite: bool = False  # drop (and report) experts with NaN/Inf weights instead of failing
    uniform: bool = False  # a non-uniform plan (global budget) is re-planned with equal per-layer counts
    device: str = "auto"  # cpu | cuda | cuda:N | auto (CUDA when available): where the model runs (moeprune.devices)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from moeprune.strategies import available_strategies

        if value != AUTO and value not in available_strategies():
            raise ValueError(f"unknown strategy {value!r}; available: {', '.join(available_strategies())}")
        return value

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        from moeprune.devices import check_device_spec

        return check_device_spec(value)

    @model_validator(mode="after")
    def _patterns_with_query(self) -> "PruneRecipe":
        if bool(self.patterns) != bool(self.query):
            raise ValueError("patterns and query go together: --patterns FILE --query TEXT (or @FILE)")
        return self

    @model_validator(mode="after")
    def _known_params(self) -> "PruneRecipe":
        # Checked when the recipe is read, before any calibration: a one-line error naming the key.
        self.strategy_params()
        return self

    def strategy_params(self) -> dict[str, Any]:
        """`params` plus the recipe-level options the strategy takes, checked against its signature."""
        from moeprune.strategies import get_strategy

        if self.strategy == AUTO:  # params are keyed by candidate; each candidate's are checked
            from moeprune.auto.config import check_auto_recipe

            check_auto_recipe(self)
            return {}
        spec = get_strategy(self.strategy)
        common = spec.common_params(self.budget, self.protect_super)
        return spec.check_params({**common, **self.params})


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PruneRecipe:
    """Read a YAML recipe (or defaults) and apply non-None overrides; dotted keys reach nested
    fields, e.g. {"calibration.samples": 16}."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}; fix the recipe") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping")
        data = loaded
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return PruneRecipe.model_validate(data)
