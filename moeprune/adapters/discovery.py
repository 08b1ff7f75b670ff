"""Discover the MoE layers of a loaded transformers model, family-agnostically.

An MoE layer is found by its experts module: any module carrying the flags that
`use_experts_implementation` sets (`has_gate`, `is_transposed`) and a 3-D expert weight. The router
is the sibling whose class the model declares in `_can_record_outputs["router_logits"]` (the
recorder also says which output element holds the logits); failing that, a sibling named
`gate`/`router` whose weight has one row per expert. Shared experts are siblings named
`shared_expert(s)`; they are reported and never pruned. Families whose experts transformers does not
decorate are first shimmed onto that contract, or refused in one line (`shims.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from moeprune.adapters.layout import NOVICE_MAP_BUFFER, ExpertLayout, RoutingInfo, identity_experts, routing_info
from moeprune.adapters.shims import install_shims, per_expert_submodule, unsupported_reason
from moeprune.adapters.versions import warn_if_untested

SHARED_EXPERT_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate",)
ROUTER_NAMES = ("gate", "router", "wg")


class NotAnMoEModelError(ValueError):
    """The model has no routed-expert layers moeprune can handle."""


@dataclass
class MoELayer:
    """One MoE block: where its parts live and how it routes."""

    layer: int
    block_name: str
    block: nn.Module
    experts: nn.Module
    router: nn.Module
    router_name: str
    routing: RoutingInfo
    shared: list[nn.Module]

    @property
    def layout(self) -> ExpertLayout:
        return ExpertLayout.of(self.experts)

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def block_is_decoder_layer(self) -> bool:
        """The experts and router sit directly in the decoder layer (Gemma-4): no MoE block module."""
        return is_list_item(self.block_name)

    def refuse_block_output(self, what: str) -> None:
        """One-line ValueError for a pass that needs the MoE block's own output."""
        if self.block_is_decoder_layer:
            raise ValueError(f"layer {self.layer}: {what} fits the MoE block's output, but this family computes its "
                             "experts inside the decoder layer (no MoE block module); use --router-kd instead")

    @property
    def experts_name(self) -> str:
        return f"{self.block_name}.experts" if self.block_name else "experts"


def is_list_item(module_name: str) -> bool:
    """Whether `module_name` names an item of a module list (`...layers.3`): a decoder layer."""
    return module_name.rsplit(".", 1)[-1].isdigit()


def _is_fused_experts(module: nn.Module) -> bool:
    if not (hasattr(module, "has_gate") and hasattr(module, "is_transposed")):
        return False
    weight = getattr(module, "gate_up_proj", None)
    if weight is None:
        weight = getattr(module, "up_proj", None)
    return weight is not None and getattr(weight, "dim", lambda: 0)() == 3


def _router_recorder(model: nn.Module) -> tuple[type | None, int]:
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None) or {}
        recorder = recorders.get("router_logits") if isinstance(recorders, dict) else None
        if recorder is not None:
            target = getattr(recorder, "target_class", None)
            return target, int(getattr(recorder, "index", 0) or 0)
    return None, 0


def _find_router(block: nn.Module, num_experts: int, router_cls: type | None) -> tuple[str, nn.Module]:
    children = dict(block.named_children())
    if router_cls is not None:
        for name, child in children.items():
            if isinstance(child, router_cls):
                return name, child
    for name in ROUTER_NAMES:
        child = children.get(name)
        weight = getattr(child, "weight", None)
        if child is not None and weight is not None and weight.dim() == 2 and weight.shape[0] == num_experts:
            return name, child
    novice_map = getattr(block.get_submodule("experts"), NOVICE_MAP_BUFFER, None) if "experts" in children else None
    if novice_map is not None and novice_map.numel() != num_experts:  # MoNE novices: the router keeps E rows
        return _find_router(block, novice_map.numel(), router_cls)
    raise NotAnMoEModelError(
        f"found an experts module in {type(block).__name__} but no router with {num_experts} rows; "
        "this family is not supported yet"
    )


def _layer_index(name: str, fallback: int) -> int:
    match = re.search(r"layers?\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else fallback


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model`, in depth order. Raises NotAnMoEModelError for dense models."""
    warn_if_untested()
    install_shims(model)
    router_cls, logits_index = _router_recorder(model)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers: list[MoELayer] = []
    for name, module in model.named_modules():
        if not _is_fused_experts(module):
            continue
        num_experts = ExpertLayout.of(module).num_experts
        if (reason := per_expert_submodule(module, num_experts)) is not None:
            raise NotAnMoEModelError(f"{type(model).__name__}: {reason}")
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = model.get_submodule(block_name) if block_name else model
        router_name, router = _find_router(block, num_experts, router_cls)
        shared = [getattr(block, n) for n in SHARED_EXPERT_NAMES if isinstance(getattr(block, n, None), nn.Module)]
        layers.append(
            MoELayer(
                layer=_layer_index(name, len(layers)),
                block_name=block_name,
                block=block,
                experts=module,
                router=router,
                router_name=f"{block_name}.{router_name}" if block_name else router_name,
                routing=routing_info(router, text_config, logits_index, identity_experts(module)),
                shared=shared,
            )
        )
    if not layers and (reason := unsupported_reason(model)) is not None:
        raise NotAnMoEModelError(f"{type(model).__name__}: {reason}")
    if not layers:
        raise NotAnMoEModelError(
            f"{type(model).__name__} has no routed-expert layers (no fused experts module found): "
            "moeprune prunes Mixture-of-Experts models only"
        )
    by_index: dict[int, list[str]] = {}
    for layer in layers:
        by_index.setdefault(layer.layer, []).append(layer.block_name)
    for index, blocks in by_index.items():
        if len(blocks) > 1:  # ERNIE-4.5-VL: text and vision experts, one expert count for both
            raise NotAnMoEModelError(
                f"{type(model).__name__}: decoder layer {index} holds {len(blocks)} expert sets ({', '.join(blocks)}; "
                "e.g. modality-isolated text and vision experts sharing one expert count), which moeprune does not prune")
    return sorted(layers, key=lambda layer: layer.layer)


def moe_summary(model: nn.Module) -> dict[str, Any]:
    """Machine-readable facts about the MoE structure (what `moeprune inspect --json` prints)."""
    layers = find_moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    shared = sum(p.numel() for layer in layers for m in layer.shared for p in m.parameters())
    config = model.config
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "num_hidden_layers": getattr(config.get_text_config(), "num_hidden_layers", None),
        "moe_layers": [layer.layer for layer in layers],
        "experts_per_layer": {str(layer.layer): layer.num_experts for layer in layers},
        "top_k": {str(layer.layer): layer.routing.top_k for layer in layers},
        "router": layers[0].routing.as_dict(),
        "expert_layout": layers[0].layout.describe(),
        "params_per_expert": layers[0].layout.params_per_expert(),
        "shared_experts_per_layer": {str(layer.layer): len(layer.shared) for layer in layers},
        "total_params": total,
        "routed_expert_params": routed,
        "shared_expert_params": shared,
        "routed_share": routed / total if total else 0.0,
    }
