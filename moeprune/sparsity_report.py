"""Measured sparsity of a model: the share of exactly-zero weights in its expert tensors.

`moeprune inspect` reports it under `expert_sparsity`, so a checkpoint written with intra-expert
pruning (saved dense with zeros) can be checked after reloading. Biases are not counted.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moeprune.adapters import find_moe_layers
from moeprune.sparsify.expert_weights import expert_tensor_names


def zero_share(weight) -> float:
    """Share of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0


def measured_sparsity(model: nn.Module) -> dict[str, Any]:
    """{"routed_experts", "shared_experts", "layers": {layer: share}, "tensors": {name: share}}."""
    tensors: dict[str, float] = {}
    layers: dict[str, float] = {}
    zeros = total = shared_zeros = shared_total = 0
    for moe in find_moe_layers(model):
        layer_zeros = layer_total = 0
        for name in expert_tensor_names(moe.experts):
            weight = getattr(moe.experts, name).data
            nz = int((weight == 0).sum())
            tensors[f"{moe.experts_name}.{name}"] = nz / weight.numel()
            layer_zeros += nz
            layer_total += weight.numel()
        layers[str(moe.layer)] = layer_zeros / layer_total if layer_total else 0.0
        zeros += layer_zeros
        total += layer_total
        for module in moe.shared:
            for pname, param in module.named_parameters():
                if pname.endswith("weight") and param.dim() == 2:
                    shared_zeros += int((param.data == 0).sum())
                    shared_total += param.numel()
    return {
        "routed_experts": zeros / total if total else 0.0,
        "shared_experts": shared_zeros / shared_total if shared_total else None,
        "layers": layers,
        "tensors": tensors,
    }
