"""The `sparsify:` section of a recipe (and the `--sparsify/--sparsity/--nm/--owl` options)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SparsifyConfig(BaseModel):
    """Intra-expert pruning run after the plan is applied (see `moeprune.sparsify.run.sparsify`)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["magnitude", "wanda", "moe-pruner", "sparsegpt"] = "wanda"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    total_sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    nm: str | None = None
    owl: bool = False
    owl_m: float = Field(5.0, gt=0.0)
    owl_lambda: float = Field(0.08, ge=0.0, lt=0.5)
    protect_super: bool = True
    super_scale: float = Field(0.0, ge=0.0, le=1.0)
    shared_scale: float = Field(0.0, ge=0.0, le=1.0)
    attention: bool = False
    min_tokens: int = Field(16, ge=0)
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0.0)

    @field_validator("nm")
    @classmethod
    def _valid_nm(cls, value: str | None) -> str | None:
        from moeprune.sparsify.masks import parse_nm

        parse_nm(value)
        return value or None

    @model_validator(mode="after")
    def _compatible(self) -> "SparsifyConfig":
        if self.nm and (self.owl or self.total_sparsity is not None):
            raise ValueError("nm (N:M) fixes the sparsity at 1 - n/m; drop owl / total_sparsity")
        return self

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `sparsify` (besides model, ids, plan)."""
        data = self.model_dump()
        data["total_sparsity_target"] = data.pop("total_sparsity")
        return data
