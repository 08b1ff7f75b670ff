"""The `router_kd:` section of a recipe (and the `--router-kd*` options of `moeprune prune`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RouterKDConfig(BaseModel):
    """Router calibration after compression (see `moeprune.recover.run`).

    `steps` > 0 runs global Router KD (KL to the dense model's cached top-k next-token
    distributions); `local: true` runs the layer-local variant (each router fitted to the dense
    MoE block output). Both may be on: local first, then global. Tokens are `samples` x `seq_len`
    drawn from `source` (default: the calibration source / seq_len / seed), disjoint from the
    planning tokens.

    `samples` as a list (e.g. `[64, 512]`) runs global KD once per sample count, each on its own
    copy of the compressed model, and keeps the one with the lowest KL to the dense model on
    `val_samples` sequences of whole documents of the same source that no candidate trains on
    (`moeprune.recover.choose`; the README's "Router KD on more text" found the best count differs
    between the bundled models). `average: true` adds one more candidate, the mean of the trained
    candidates' router parameters (every candidate starts from the same compressed routers, so
    their mean is a "soup" of fine-tunes of one start), scored the same way.
    """

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(0, ge=0)
    lr: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(64, ge=1)
    samples: int | list[int] = 64
    val_samples: int = Field(32, ge=1)
    average: bool = False
    seq_len: int | None = Field(None, ge=2)
    source: str | None = None
    seed: int | None = None
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    local: bool = False
    local_steps: int = Field(200, ge=1)
    local_lr: float = Field(1e-3, gt=0.0)
    local_batch_tokens: int = Field(1024, ge=1)

    @field_validator("samples", mode="before")
    @classmethod
    def _sample_counts(cls, value: Any) -> int | list[int]:
        if isinstance(value, str):  # the CLI's "64,512"
            try:
                value = [int(v) for v in value.split(",")]
            except ValueError:
                raise ValueError(f"router_kd.samples must be a count or a comma-separated list of counts, got {value!r}") from None
        if isinstance(value, (list, tuple)):
            if not value or any(not isinstance(v, int) or v < 1 for v in value) or len(set(value)) != len(value):
                raise ValueError(f"router_kd.samples as a list needs distinct counts >= 1, got {list(value)}")
            return value[0] if len(value) == 1 else list(value)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"router_kd.samples must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _something_to_do(self) -> "RouterKDConfig":
        if self.steps == 0 and not self.local:
            raise ValueError("router_kd needs steps > 0 (global KD) or local: true (layer-local); set one")
        if isinstance(self.samples, list) and (self.steps == 0 or self.local):
            raise ValueError("router_kd.samples as a list chooses among global KD runs by validation KL; it needs "
                             "steps > 0 and local: false")
        if self.average and not isinstance(self.samples, list):
            raise ValueError("router_kd.average averages the routers of several sample counts; give samples as a "
                             "list (e.g. [64, 512])")
        return self

    @property
    def sample_choices(self) -> list[int]:
        """The sample counts to try: one unless `samples` is a list."""
        return list(self.samples) if isinstance(self.samples, list) else [self.samples]

    def with_samples(self, samples: int) -> "RouterKDConfig":
        """This configuration with one sample count (one candidate of a choice)."""
        return self.model_copy(update={"samples": samples})
