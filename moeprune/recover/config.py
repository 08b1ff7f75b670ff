"""The `router_kd:` section of a recipe (and the `--router-kd*` options of `moeprune prune`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouterKDConfig(BaseModel):
    """Router calibration after compression (see `moeprune.recover.run`).

    `steps` > 0 runs global Router KD (KL to the dense model's cached top-k next-token
    distributions); `local: true` runs the layer-local variant (each router fitted to the dense
    MoE block output). Both may be on: local first, then global. Tokens are `samples` x `seq_len`
    drawn from `source` (default: the calibration source / seq_len / seed), disjoint from the
    planning tokens.
    """

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(0, ge=0)
    lr: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(64, ge=1)
    samples: int = Field(64, ge=1)
    seq_len: int | None = Field(None, ge=2)
    source: str | None = None
    seed: int | None = None
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    local: bool = False
    local_steps: int = Field(200, ge=1)
    local_lr: float = Field(1e-3, gt=0.0)
    local_batch_tokens: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _something_to_do(self) -> "RouterKDConfig":
        if self.steps == 0 and not self.local:
            raise ValueError("router_kd needs steps > 0 (global KD) or local: true (layer-local); set one")
        return self
