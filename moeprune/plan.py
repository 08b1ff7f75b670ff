"""The Plan: which experts each MoE layer keeps, merges or replaces, as a validated JSON artifact.

Output expert slot i of a layer is built from original expert `kept[i]` (the representative);
`groups[i]`, when present, lists the original experts merged into slot i with `group_weights[i]`;
`novices` lists dropped experts replaced by constant vectors. Indices are always renumbered
0..E'-1 in the output (G7). Validation fails fast, naming the layer, the constraint and the fix.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprune._version import __version__


class PlanError(ValueError):
    """A plan that cannot be applied."""


def encode_vectors(vectors: torch.Tensor) -> dict[str, Any]:
    """JSON-safe payload of a float matrix (novice vectors): base64 little-endian float32."""
    array = vectors.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_vectors(payload: dict[str, Any]) -> torch.Tensor:
    raw = base64.b64decode(payload["data"])
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy().reshape(payload["shape"]))


@dataclass
class LayerPlan:
    layer: int
    num_experts: int
    kept: list[int]
    scores: list[float] | None = None
    groups: list[list[int]] | None = None
    group_weights: list[list[float]] | None = None
    novices: list[int] | None = None

    @property
    def num_kept(self) -> int:
        return len(self.kept)

    @property
    def dropped(self) -> list[int]:
        kept = set(self.kept) | {m for g in (self.groups or []) for m in g}
        return [j for j in range(self.num_experts) if j not in kept]

    def validate(self, top_k: int, n_group: int = 1, topk_group: int = 1) -> None:
        where = f"layer {self.layer}"
        if len(set(self.kept)) != len(self.kept):
            raise PlanError(f"{where}: kept experts repeat: {self.kept}")
        bad = [j for j in self.kept if not 0 <= j < self.num_experts]
        if bad:
            raise PlanError(f"{where}: expert indices {bad} out of range 0..{self.num_experts - 1}")
        if self.num_kept < top_k:
            raise PlanError(
                f"{where}: {self.num_kept} experts would remain but the router selects top-{top_k}; "
                f"keep at least {top_k} experts (lower the ratio)"
            )
        if self.groups is not None:
            if len(self.groups) != self.num_kept or any(g[0] != k for g, k in zip(self.groups, self.kept)):
                raise PlanError(f"{where}: groups must be one per kept expert, representative first")
            members = [m for g in self.groups for m in g]
            if len(set(members)) != len(members):
                raise PlanError(f"{where}: an expert belongs to two merge groups")
            if self.group_weights is None or [len(w) for w in self.group_weights] != [len(g) for g in self.groups]:
                raise PlanError(f"{where}: group_weights must match groups")
        if n_group > 1:
            self._validate_groups(top_k, n_group, topk_group)

    def _validate_groups(self, top_k: int, n_group: int, topk_group: int) -> None:
        where = f"layer {self.layer}"
        size = self.num_experts // n_group
        per_group = [sum(1 for j in self.kept if j // size == g) for g in range(n_group)]
        if len(set(per_group)) != 1:
            raise PlanError(
                f"{where}: group-limited router (n_group={n_group}) needs equal kept experts per group, "
                f"got {per_group}; prune the same number from every group"
            )
        kept_per_group = per_group[0]
        if kept_per_group < 2:
            raise PlanError(f"{where}: group routing needs >= 2 experts per group, {kept_per_group} would remain")
        if topk_group * kept_per_group < top_k:
            raise PlanError(
                f"{where}: topk_group ({topk_group}) x experts per group ({kept_per_group}) < top-k ({top_k}); "
                "routing would be silently wrong"
            )
        if sorted(self.kept) != self.kept:
            raise PlanError(f"{where}: group-limited routers need kept experts in ascending order")


@dataclass
class Plan:
    strategy: str
    params: dict[str, Any]
    layers: dict[int, LayerPlan]
    top_k: int
    stats_hash: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    @property
    def uniform(self) -> bool:
        return len({lp.num_kept for lp in self.layers.values()}) <= 1

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {i: lp.num_kept for i, lp in sorted(self.layers.items())}

    def validate(self) -> "Plan":
        n_group = int(self.routing.get("n_group", 1) or 1)
        topk_group = int(self.routing.get("topk_group", 1) or 1)
        for lp in self.layers.values():
            lp.validate(self.top_k, n_group, topk_group)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "moeprune-plan",
            "version": self.version,
            "strategy": self.strategy,
            "params": self.params,
            "top_k": self.top_k,
            "stats_hash": self.stats_hash,
            "routing": self.routing,
            "layers": {str(i): _compact(asdict(lp)) for i, lp in sorted(self.layers.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if data.get("format") != "moeprune-plan":
            raise PlanError("not a moeprune plan (missing format: moeprune-plan)")
        layers = {int(i): LayerPlan(**lp) for i, lp in data["layers"].items()}
        plan = cls(
            strategy=data["strategy"],
            params=data.get("params", {}),
            layers=layers,
            top_k=int(data["top_k"]),
            stats_hash=data.get("stats_hash"),
            routing=data.get("routing", {}),
            version=data.get("version", __version__),
        )
        return plan.validate()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PlanError(f"cannot read plan {path}: {err}") from err


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
