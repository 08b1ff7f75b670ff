"""Small measurement helpers shared by the test suite: logits, on-disk tensor bytes, router rows."""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch import nn

from moeprune.adapters import find_moe_layers


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for `ids`, without gradients."""
    with torch.no_grad():
        return model(ids).logits


def safetensors_bytes(path: str | Path) -> int:
    """Tensor bytes of a checkpoint's safetensors files (headers, which differ by layout, excluded)."""
    total = 0
    for f in Path(path).glob("*.safetensors"):
        if not f.name.startswith("moeprune_"):
            with open(f, "rb") as handle:
                total += f.stat().st_size - 8 - struct.unpack("<Q", handle.read(8))[0]
    return total


def router_row_params(model: nn.Module) -> int:
    """Router parameters per expert (weight row, bias, correction bias) of the first MoE layer."""
    layer = find_moe_layers(model)[0]
    tensors = list(layer.router.parameters()) + list(layer.router.buffers())
    return sum(t.numel() // layer.num_experts for t in tensors if t.dim() >= 1 and t.shape[0] == layer.num_experts)
