"""The `slim:` section of a recipe (and the `--slim-channels/--slim-method/--slim-mode` options)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SlimConfig(BaseModel):
    """Channel slimming inside the surviving experts (see `moeprune.slimming.run.slim_channels`)."""

    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.25, ge=0.0, lt=1.0)  # share of routed-expert channels removed
    method: Literal["camera", "coverage"] = "camera"
    # uniform: every expert of a layer keeps the same width; expert: widths differ per expert
    mode: Literal["uniform", "expert"] = "uniform"
    alpha: float = Field(0.9, ge=0.0, le=1.0)  # CAMERA-P L2 / L-inf mix (run.sh: 0.9)
    min_per_expert: int = Field(16, ge=0)  # coverage: experts left with fewer channels are emptied
    layer_budget: Literal["uniform", "coverage"] | None = None  # default: uniform for camera, coverage for coverage

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump()
