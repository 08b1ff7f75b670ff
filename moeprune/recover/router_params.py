"""Which tensors router calibration may change: the learnable parameters of every MoE router.

Router KD trains the router weight of every MoE layer and its bias where the family has a learnable
one (gpt-oss). Load-balancing correction terms (DeepSeek-V3 / GLM-4.5 `e_score_correction_bias`)
are buffers in transformers and are never trained; a parameter with that name would be skipped too.
Shared-expert gates (Qwen2-MoE `shared_expert_gate`) are not routers and stay frozen.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers

FROZEN_ROUTER_NAMES = ("e_score_correction_bias",)


def layer_router_parameters(layer: MoELayer) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of one MoE layer's router (weight, bias), correction terms excluded."""
    return {f"{layer.router_name}.{name}": p for name, p in layer.router.named_parameters()
            if not name.endswith(FROZEN_ROUTER_NAMES)}


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every router parameter of `model`, in depth order."""
    params: dict[str, nn.Parameter] = {}
    for layer in find_moe_layers(model):
        params.update(layer_router_parameters(layer))
    if not params:
        raise ValueError("the model's MoE routers have no learnable parameters; nothing to calibrate")
    return params


@contextmanager
def only_trainable(module: nn.Module, params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter of `module` except `params` inside the block; restore the flags after."""
    flags = {id(p): p.requires_grad for p in module.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in module.parameters():
            p.requires_grad_(id(p) in keep)
        yield params
    finally:
        for p in module.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
