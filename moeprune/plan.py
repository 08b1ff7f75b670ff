"""The Plan: which experts each MoE layer keeps, merges or replaces, as a validated JSON artifact.

Output expert slot i of a layer is built from original expert `kept[i]` (the representative);
`groups[i]`, when present, lists the original experts merged into slot i with `group_weights[i]`;
`novices` lists dropped experts replaced by constant vectors. Indices are always renumbered
0..E'-1 in the output (G7). Validation fails fast, naming the layer, the constraint and the fix.

Each `LayerPlan` says everything apply does to its layer (merge options, neuron recombination,
novice vectors), so apply never reads the strategy's `params`; those are a record of how the plan
was made. Plans written before that carried the operations in `params` and are adopted on read.

A plan is bound to its model: `model` holds the model's fingerprint (`moeprune.fingerprint`) and
`check_model` refuses another model (unless forced), a plan that leaves out a MoE layer, and
counts or group constraints that the *model's* routing (its top-k, `n_group`, `topk_group`)
cannot serve. The JSON schema is strict: integer indices (not floats or booleans), a layer entry
per key, finite scores (non-finite ones are written as null).
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprune._version import __version__


logger = logging.getLogger(__name__)

NON_UNIFORM_NOTE = (
    "non-uniform plan (expert counts per layer {counts}): the output loads in transformers only through "
    "moeprune.load_pruned (plain from_pretrained, llama.cpp/GGUF and vLLM need the same count in every layer); "
    "for a uniform checkpoint from the same budget ({share:.1%} of routed experts removed) use {fix}"
)


class PlanError(ValueError):
    """A plan that cannot be applied."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite_or_none(values: list | None) -> list | None:
    if values is None:
        return None
    return [v if not isinstance(v, float) or math.isfinite(v) else None for v in values]


def _check_entry(key: str, entry: Any) -> None:
    """Strict types of one layer entry of a plan file (a PlanError naming the field)."""
    where = f"plan layer {key}"
    if not isinstance(entry, dict):
        raise PlanError(f"{where}: must be a JSON object, got {type(entry).__name__}")
    known = {"layer", "num_experts", "kept", "scores", "groups", "group_weights", "novices", *OPERATION_FIELDS}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise PlanError(f"{where}: unknown fields {unknown}")
    for name in ("layer", "num_experts"):
        if not _is_int(entry.get(name)):
            raise PlanError(f"{where}: {name} must be an integer, got {entry.get(name)!r}")
    if str(entry["layer"]) != key:
        raise PlanError(f"{where}: entry says layer {entry['layer']}")
    lists = {"kept": entry.get("kept"), "novices": entry.get("novices")}
    for name, value in lists.items():
        if value is None and name == "novices":
            continue
        if not isinstance(value, list) or not all(_is_int(j) for j in value):
            raise PlanError(f"{where}: {name} must be a list of integer expert indices, got {value!r}")
    for name in ("groups",):
        value = entry.get(name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(g, list) and g and all(_is_int(j) for j in g) for g in value)):
            raise PlanError(f"{where}: groups must be non-empty lists of integer expert indices")
    weights = entry.get("group_weights")
    if weights is not None and (not isinstance(weights, list) or not all(
            isinstance(w, list) and all(_is_number(x) and math.isfinite(x) for x in w) for w in weights)):
        raise PlanError(f"{where}: group_weights must be lists of finite numbers")
    scores = entry.get("scores")
    if scores is not None and (not isinstance(scores, list) or not all(s is None or _is_number(s) for s in scores)):
        raise PlanError(f"{where}: scores must be numbers (or null for non-finite)")
    if entry.get("merge_align") is not None and not isinstance(entry["merge_align"], bool):
        raise PlanError(f"{where}: merge_align must be true or false, got {entry['merge_align']!r}")
    if entry.get("recombine_threshold") is not None and not _is_number(entry["recombine_threshold"]):
        raise PlanError(f"{where}: recombine_threshold must be a number, got {entry['recombine_threshold']!r}")
    vectors = entry.get("novice_vectors")
    if vectors is not None and (not isinstance(vectors, dict) or not {"shape", "data"} <= set(vectors)):
        raise PlanError(f"{where}: novice_vectors must be an encoded matrix {{shape, dtype, data}}")


def encode_vectors(vectors: torch.Tensor) -> dict[str, Any]:
    """JSON-safe payload of a float matrix (novice vectors): base64 little-endian float32."""
    array = vectors.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_vectors(payload: dict[str, Any]) -> torch.Tensor:
    raw = base64.b64decode(payload["data"])
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy().reshape(payload["shape"]))


MERGE_ROUTERS = ("representative", "average")
# Per-layer operations beyond keeping experts; apply acts on these fields, never on strategy params.
OPERATION_FIELDS = ("merge_align", "merge_router", "recombine_threshold", "novice_vectors")
# Plans written before the operations were typed carried them in `params`; they are adopted on load.
_LEGACY_PARAMS = {"merge_align": "merge_align", "merge_router": "merge_router", "dern_threshold": "recombine_threshold"}


@dataclass
class LayerPlan:
    """What apply does to one MoE layer, in this order:

    1. merge: every `groups[i]` with more than one member is averaged with `group_weights[i]` into
       slot `kept[i]` (`merge_align`: permute members' neurons to the representative first;
       `merge_router`: "representative" keeps its router row, "average" averages the rows);
    2. recombine: with `recombine_threshold`, the dropped experts' neurons join the most similar
       kept neurons whose cosine exceeds it, weighted by `scores` (gate mass);
    3. keep: the experts `kept`, in that order, renumbered 0..E'-1; or, with `novices`, the router
       keeps all E rows and each novice is replaced by its row of `novice_vectors` (encoded
       [len(novices), hidden] float32 matrix, `encode_vectors`).
    """

    layer: int
    num_experts: int
    kept: list[int]
    scores: list[float] | None = None
    groups: list[list[int]] | None = None
    group_weights: list[list[float]] | None = None
    novices: list[int] | None = None
    merge_align: bool | None = None
    merge_router: str | None = None
    recombine_threshold: float | None = None
    novice_vectors: dict[str, Any] | None = None

    @property
    def merges(self) -> bool:
        """True when some kept slot is built from more than one expert."""
        return any(len(g) > 1 for g in (self.groups or []))

    @property
    def edits_weights(self) -> bool:
        """True when kept experts' weights change (merges, neuron recombination), not only their selection."""
        return self.merges or self.recombine_threshold is not None

    def novice_matrix(self) -> torch.Tensor | None:
        """The decoded novice vectors [len(novices), hidden], or None."""
        return None if self.novice_vectors is None else decode_vectors(self.novice_vectors)

    @property
    def num_kept(self) -> int:
        return len(self.kept)

    @property
    def dropped(self) -> list[int]:
        kept = set(self.kept) | {m for g in (self.groups or []) for m in g}
        return [j for j in range(self.num_experts) if j not in kept]

    def validate(self, top_k: int, n_group: int = 1, topk_group: int = 1) -> None:
        where = f"layer {self.layer}"
        bad_type = [j for j in [*self.kept, *(self.novices or []), *(m for g in (self.groups or []) for m in g)] if not _is_int(j)]
        if bad_type:
            raise PlanError(f"{where}: expert indices must be integers, got {bad_type[:4]}")
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
        self._validate_operations(where)
        if n_group > 1:
            self._validate_groups(top_k, n_group, topk_group)

    def _validate_operations(self, where: str) -> None:
        if (self.merge_align is not None or self.merge_router is not None) and self.groups is None:
            raise PlanError(f"{where}: merge_align/merge_router are options of merge groups, but the layer has no groups")
        if self.merge_router is not None and self.merge_router not in MERGE_ROUTERS:
            raise PlanError(f"{where}: merge_router must be one of {', '.join(MERGE_ROUTERS)}, got {self.merge_router!r}")
        t = self.recombine_threshold
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise PlanError(f"{where}: recombine_threshold must be a cosine >= 0 (>= 1 disables it), got {t!r}")
        if self.novice_vectors is not None:
            rows = list(self.novice_vectors.get("shape", []))[:1]
            if not self.novices or rows != [len(self.novices)]:
                raise PlanError(f"{where}: novice_vectors has {rows[0] if rows else 0} rows for "
                                f"{len(self.novices or [])} novices; one vector per novice")

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
    model: dict[str, Any] | None = None  # fingerprint of the model the plan was made for

    def __post_init__(self) -> None:
        self._adopt_legacy_params()  # once, when the plan is made or read; apply reads only the layers

    def _adopt_legacy_params(self) -> None:
        """Move operations that older plans (and strategies) put in `params` onto the layers:
        `merge_align`/`merge_router` (layers with groups), `dern_threshold`, `novice_vectors`."""
        params = self.params or {}
        for lp in self.layers.values():
            for key, name in _LEGACY_PARAMS.items():
                value = params.get(key)
                if value is None or getattr(lp, name) is not None:
                    continue
                if name.startswith("merge_") and lp.groups is None:
                    continue
                setattr(lp, name, float(value) if name == "recombine_threshold" else value)
        vectors = params.get("novice_vectors")
        if isinstance(vectors, dict):
            for i, lp in self.layers.items():
                if lp.novice_vectors is None and str(i) in vectors and lp.novices:
                    lp.novice_vectors = vectors[str(i)]
            self.params = {k: v for k, v in params.items() if k != "novice_vectors"}

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

    def check_model(self, layers: dict[int, Any], fingerprint: dict[str, Any] | None = None, force: bool = False) -> None:
        """Refuse a model this plan was not made for. `layers`: {index: MoELayer} of the model
        (before surgery); `fingerprint`: `moeprune.fingerprint` of the same model, when known."""
        if fingerprint is not None and self.model:
            diff = sorted(k for k in set(self.model) | set(fingerprint) if self.model.get(k) != fingerprint.get(k))
            if diff:
                message = (f"the plan was made for another model (differs in {', '.join(diff)}); apply it to the model it was "
                           "made for, or pass --force (force=True) to apply it anyway")
                if not force:
                    raise PlanError(message)
                logger.warning("--force: %s", message)
        elif fingerprint is not None and not self.model:
            logger.warning("the plan carries no model fingerprint (made by an older moeprune); cannot check it was made for this model")
        extra = sorted(set(self.layers) - set(layers))
        if extra:
            raise PlanError(f"plan names MoE layers {extra} that the model does not have (has {sorted(layers)})")
        for index, lp in sorted(self.layers.items()):
            layer = layers[index]
            if layer.num_experts != lp.num_experts:
                raise PlanError(f"layer {index}: plan was made for {lp.num_experts} experts but the model has "
                                f"{layer.num_experts}; was it already pruned?")
            routing = layer.routing
            lp.validate(routing.top_k, int(routing.n_group or 1), int(routing.topk_group or 1))
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise PlanError(f"plan has no entry for MoE layers {missing} of the model; a plan must cover every MoE layer "
                            "(to leave a layer unpruned, keep all its experts)")

    def non_uniform_note(self) -> str | None:
        """The warning to print when this plan is made or applied, None for uniform plans."""
        if self.uniform:
            return None
        counts = sorted(set(self.experts_per_layer.values()))
        total = sum(lp.num_experts for lp in self.layers.values())
        share = 1 - sum(self.experts_per_layer.values()) / max(total, 1)
        if self.params.get("budget") == "global":
            fix = f"--budget layer --ratio {share:.3f} (recipe `budget: layer`)"
        else:
            fix = f"a per-layer strategy at --ratio {share:.3f} (e.g. --strategy hc-smoe for merging, reap for dropping)"
        return NON_UNIFORM_NOTE.format(counts=f"{counts[0]}-{counts[-1]}", share=share, fix=fix)

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for i, lp in sorted(self.layers.items()):
            entry = _compact(asdict(lp))
            if "scores" in entry:
                entry["scores"] = _finite_or_none(entry["scores"])
            layers[str(i)] = entry
        return {
            "format": "moeprune-plan",
            "version": self.version,
            "strategy": self.strategy,
            "params": self.params,
            "top_k": self.top_k,
            "stats_hash": self.stats_hash,
            "routing": self.routing,
            "model": self.model,
            "uniform": self.uniform,
            "experts_per_layer": {str(i): n for i, n in self.experts_per_layer.items()},
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got a JSON {type(data).__name__}; give a file written by `moeprune plan`")
        if data.get("format") != "moeprune-plan":
            raise PlanError("not a moeprune plan (missing format: moeprune-plan)")
        if not isinstance(data.get("layers"), dict) or not data["layers"]:
            raise PlanError("plan has no `layers` object")
        if not _is_int(data.get("top_k")):
            raise PlanError(f"plan top_k must be an integer, got {data.get('top_k')!r}")
        for key, entry in data["layers"].items():
            _check_entry(key, entry)
        if data.get("model") is not None and not isinstance(data["model"], dict):
            raise PlanError("plan `model` must be a fingerprint object")
        layers = {int(i): LayerPlan(**lp) for i, lp in data["layers"].items()}
        plan = cls(
            strategy=data["strategy"],
            params=data.get("params", {}),
            layers=layers,
            top_k=int(data["top_k"]),
            stats_hash=data.get("stats_hash"),
            routing=data.get("routing", {}),
            version=data.get("version", __version__),
            model=data.get("model"),
        )
        return plan.validate()

    def save(self, path: str | Path) -> Path:
        """Write the plan as strict JSON (no bare NaN), through a temporary file renamed into place."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except ValueError as err:
            raise PlanError(f"plan holds non-finite values outside the scores ({err}); refusing to write invalid JSON") from err
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text(), parse_constant=_no_constants)
        except (json.JSONDecodeError, UnicodeDecodeError, PlanError) as err:
            raise PlanError(f"cannot read plan {path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"cannot read plan {path}: {err}") from err


def _no_constants(name: str) -> Any:
    raise PlanError(f"bare {name} is not JSON (write non-finite scores as null)")


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
