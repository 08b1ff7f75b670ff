"""What an experts module and a router look like, read from the modules' own flags.

transformers v5 decorates fused experts modules with `use_experts_implementation`, which stores
`has_gate`, `has_bias`, `is_transposed`, `is_concatenated` and `has_post_expert_norm` on every
instance. Reading those flags (instead of a per-family table) lets every decorated family work with
no new code. `ExpertLayout` also converts between the module's storage and a canonical per-expert
form (gate [E, I, H], up [E, I, H], down [E, H, I]) used by merging and sparsification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# per-expert biases added to the scores for the top-k choice only, on the router or the MoE block
SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "balancing_biases")
TOP_K_ATTRS = ("num_experts_per_tok", "top_k", "moe_k", "moe_topk", "num_selected_experts", "top_k_experts",
               "num_experts_per_token")
# MoNE novices (apply/novice.py) on an experts module: the router keeps E columns, the module holds P
# experts; NOVICE_MAP_BUFFER [E] maps a router column to its kept slot, or -(novice position + 1).
NOVICE_MAP_BUFFER = "moeprune_expert_map"
NOVICE_VECTOR_BUFFER = "moeprune_novice_vectors"
# LongCat-Flash's zero-compute experts: the router has E + Z columns, the last Z select the identity
# (the token itself, times its gate); the experts module holds the E real experts (adapters.longcat)
IDENTITY_EXPERTS_ATTR = "zero_expert_num"


def identity_experts(experts: nn.Module) -> int:
    """How many identity (zero-compute) experts follow `experts`' real ones in its router (LongCat)."""
    return int(getattr(experts, IDENTITY_EXPERTS_ATTR, 0) or 0)


def per_expert_post_norm(experts: nn.Module) -> nn.Module | None:
    """The experts' per-expert output norm, called as `norm(outputs [S, H], expert_ids [S])`, when
    they have one (Ergo's `post_expert_norm`: an RMSNorm whose weight has one row per expert, applied
    to each route's output before its gate); None otherwise (a shared `post_expert_norm` is the
    decorator's `has_post_expert_norm`)."""
    norm = getattr(experts, "post_expert_norm", None)
    weight = getattr(norm, "weight", None)
    if not isinstance(norm, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return norm if weight.shape[0] == ExpertLayout.of(experts).num_experts else None


def expert_modules(experts: nn.Module) -> list[nn.Module]:
    """The modules whose per-expert tensors pruning slices: the experts module, and its per-expert
    output norm where it has one (discovery refuses other submodules with per-expert tensors)."""
    norm = per_expert_post_norm(experts)
    return [experts] if norm is None else [experts, norm]


def router_scoring_weights(router: nn.Module, num_experts: int) -> list[torch.Tensor]:
    """The router's 2-D weights that make its logits: those with one row per routed expert, or,
    where there are none, those with the fewest rows beyond them (LongCat's identity experts, Inkling's
    shared-expert gate columns); a hidden layer of a router MLP (ZAYA) is neither."""
    weights = [p for p in router.parameters() if p.dim() == 2 and p.shape[0] >= num_experts]
    exact = [w for w in weights if w.shape[0] == num_experts]
    if exact or not weights:
        return exact
    fewest = min(w.shape[0] for w in weights)
    return [w for w in weights if w.shape[0] == fewest]


def router_extra_rows(router: nn.Module, num_experts: int) -> int:
    """Rows of the router's logit weight after the E routed experts' rows (see
    `router_scoring_weights`). Pruning keeps them, after the kept rows."""
    weights = router_scoring_weights(router, num_experts)
    return weights[0].shape[0] - num_experts if weights else 0


def kept_columns(experts: nn.Module) -> torch.Tensor | None:
    """Router columns of a novice experts module's kept experts, in slot order (None: no novices)."""
    mapping = getattr(experts, NOVICE_MAP_BUFFER, None)
    if mapping is None:
        return None
    kept = torch.nonzero(mapping >= 0).squeeze(1)
    return kept[mapping[kept].argsort()]


def refuse_identity_experts(layer: Any, what: str) -> None:
    """Raise ValueError (one line) when `layer` (an `MoELayer`) routes to identity experts too."""
    if layer.routing.identity_experts:
        raise ValueError(f"layer {layer.layer}: {what} does not support routers with identity (zero-compute) "
                         "experts (LongCat-Flash)")


@dataclass(frozen=True)
class ExpertLayout:
    """Storage layout of one fused experts module."""

    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    has_post_expert_norm: bool

    @classmethod
    def of(cls, experts: nn.Module) -> "ExpertLayout":
        has_gate = bool(getattr(experts, "has_gate", True))
        first = experts.gate_up_proj if has_gate else experts.up_proj
        transposed = bool(getattr(experts, "is_transposed", False))
        num_experts = int(first.shape[0])
        hidden = int(first.shape[1] if transposed else first.shape[2])
        width = int(first.shape[2] if transposed else first.shape[1])
        intermediate = width // 2 if has_gate else width
        return cls(
            num_experts=num_experts,
            hidden_dim=hidden,
            intermediate_dim=intermediate,
            has_gate=has_gate,
            has_bias=bool(getattr(experts, "has_bias", False)),
            is_transposed=transposed,
            is_concatenated=bool(getattr(experts, "is_concatenated", True)),
            has_post_expert_norm=bool(getattr(experts, "has_post_expert_norm", False)),
        )

    def describe(self) -> str:
        parts = ["gated" if self.has_gate else "no-gate", "transposed" if self.is_transposed else "standard"]
        if self.has_gate and not self.is_concatenated:
            parts.append("interleaved")
        if self.has_bias:
            parts.append("bias")
        return "/".join(parts)

    def params_per_expert(self) -> int:
        n = (3 if self.has_gate else 2) * self.hidden_dim * self.intermediate_dim
        if self.has_bias:
            n += (2 if self.has_gate else 1) * self.intermediate_dim + self.hidden_dim
        return n

    # ---- canonical per-expert views -------------------------------------------------------
    def split_gate_up(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, 2I, H] (or transposed [E, H, 2I]) -> gate, up as [E, I, H]."""
        w = gate_up.transpose(-2, -1) if self.is_transposed else gate_up
        if self.is_concatenated:
            return w[:, : self.intermediate_dim], w[:, self.intermediate_dim :]
        return w[:, 0::2], w[:, 1::2]

    def join_gate_up(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Inverse of `split_gate_up`."""
        if self.is_concatenated:
            w = torch.cat([gate, up], dim=1)
        else:
            w = torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], gate.shape[2])
        return w.transpose(-2, -1).contiguous() if self.is_transposed else w.contiguous()

    def down_canonical(self, down: torch.Tensor) -> torch.Tensor:
        """[E, H, I] view of the down projection whatever the storage."""
        return down.transpose(-2, -1) if self.is_transposed else down

    def down_storage(self, down: torch.Tensor) -> torch.Tensor:
        """Inverse of `down_canonical`."""
        return down.transpose(-2, -1).contiguous() if self.is_transposed else down.contiguous()


@dataclass(frozen=True)
class RoutingInfo:
    """How a router turns logits into the selected set and gates."""

    scoring: str  # "softmax" or "sigmoid"
    top_k: int
    norm_topk_prob: bool | None
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    has_bias: bool
    has_correction_bias: bool
    logits_index: int
    identity_experts: int = 0  # router columns after the real experts that select the identity (LongCat)

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if not self.identity_experts:
            out.pop("identity_experts")
        return out


def first_attr(objects: list[Any], names: tuple[str, ...], default: Any = None) -> Any:
    """First attribute among `names` found on any of `objects` (in order)."""
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return default


def routing_info(router: nn.Module, config: Any, logits_index: int, identity: int = 0) -> RoutingInfo:
    """Routing semantics of `router`, from its attributes first and the config second (a shim's
    `moeprune_scoring` on the router wins: LongCat is softmax with a correction bias)."""
    sources = [router, config]
    correction = getattr(router, "e_score_correction_bias", None) is not None
    scoring_func = first_attr(sources, ("scoring_func",))
    scoring = "sigmoid" if correction or scoring_func == "sigmoid" else "softmax"
    scoring = getattr(router, "moeprune_scoring", None) or scoring
    n_group = int(first_attr(sources, ("num_group", "n_group"), 1) or 1)
    topk_group = int(first_attr(sources, ("topk_group",), n_group) or n_group)
    if getattr(router, "topk_method", getattr(config, "topk_method", None)) == "greedy":
        n_group, topk_group = 1, 1
    top_k = first_attr(sources, TOP_K_ATTRS)
    if top_k is None:
        raise ValueError(f"{type(router).__name__}: no top-k found on the router or the config "
                         f"(looked for {', '.join(TOP_K_ATTRS)}); this family is not supported yet")
    return RoutingInfo(
        scoring=scoring,
        top_k=int(top_k),
        norm_topk_prob=first_attr(sources, ("norm_topk_prob",)),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(first_attr(sources, ("routed_scaling_factor",), 1.0) or 1.0),
        has_bias=getattr(router, "bias", None) is not None,
        has_correction_bias=correction,
        logits_index=logits_index,
        identity_experts=int(identity),
    )
