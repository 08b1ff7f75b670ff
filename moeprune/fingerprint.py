"""Model fingerprints: bind statistics and plans to the model they were made for.

A fingerprint is a small JSON-able dict: the config essentials a plan depends on (model type,
hidden size, layer count, vocabulary, MoE layers with their expert counts, top-k, expert groups)
plus a sha256 over every router's weights. The router weights are tiny (E x hidden per layer), so
the fingerprint of a checkpoint on disk is read from the safetensors shards without loading the
model (a meta-device skeleton names the router tensors, `KeyMap` finds them on disk), and the
fingerprint of an in-memory model reads the same tensors from the modules. Weights are hashed
after rounding to bfloat16, so a model loaded in float32 from a bf16 checkpoint, or in bf16 from
a float32 one, has the fingerprint of its checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers

ESSENTIALS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def _router_params(model: nn.Module, layer: MoELayer) -> list[str]:
    prefix = next(name for name, m in model.named_modules() if m is layer.router)
    return sorted(f"{prefix}.{name}" for name, _ in layer.router.named_parameters())


def _digest(model: nn.Module, layers: list[MoELayer], read: Callable[[str], torch.Tensor]) -> str:
    h = hashlib.sha256()
    for layer in layers:
        for name in _router_params(model, layer):
            tensor = read(name).detach().to("cpu", torch.bfloat16).contiguous()
            h.update(name.encode())
            h.update(str(list(tensor.shape)).encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _essentials(model: nn.Module, layers: list[MoELayer]) -> dict[str, Any]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    out: dict[str, Any] = {key: getattr(config, key, None) for key in ESSENTIALS}
    out["model_type"] = getattr(model.config, "model_type", out["model_type"])
    out["moe_layers"] = {str(layer.layer): layer.num_experts for layer in layers}
    out["top_k"] = layers[0].routing.top_k
    out["n_group"] = layers[0].routing.n_group
    out["topk_group"] = layers[0].routing.topk_group
    return out


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of an in-memory model (call it before the model is pruned)."""
    layers = find_moe_layers(model)
    params = dict(model.named_parameters())
    return {**_essentials(model, layers), "routers": _digest(model, layers, params.__getitem__)}


def checkpoint_fingerprint(path: str | Path) -> dict[str, Any]:
    """Fingerprint of a safetensors checkpoint directory, reading only the router tensors."""
    from moeprune.io.lazy_load import build_skeleton
    from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint

    path = Path(path)
    model = build_skeleton(path)
    layers = find_moe_layers(model)
    with LazyCheckpoint(path) as ckpt:
        keymap = KeyMap(model, ckpt.keys())
        wanted = {n for layer in layers for n in _router_params(model, layer)}
        state: dict[str, torch.Tensor] = {}
        for name in sorted(wanted):
            module = name.rsplit(".", 1)[0]
            state.update(keymap.load_state(ckpt, keymap.keys_under(module)))
    missing = sorted(wanted - set(state))
    if missing:
        from moeprune.io.safetensors_io import CorruptCheckpointError

        raise CorruptCheckpointError(f"{path}: router tensors {missing[:3]} are not in the checkpoint")
    return {**_essentials(model, layers), "routers": _digest(model, layers, state.__getitem__)}


def fingerprint_difference(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Keys on which two fingerprints differ (empty when they match)."""
    return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
