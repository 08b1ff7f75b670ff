"""Routed-expert weights of a checkpoint, one MoE layer at a time, read straight from its shards.

For calibration-free strategies (AIMER) on checkpoints larger than memory: the model is built on
the meta device, and `iter_moe_layers()` materialises only one layer's experts module (the same
key conversions as `from_pretrained`, through `lazy_reader`), yields its `MoELayer`, and sends it
back to meta. Attention, embeddings, routers and shared experts are never read; `bytes_read`
counts what was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, materialise, release


class LazyExpertWeights:
    """A weights source for strategies that read expert weights (`model=` of `plan`)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from moeprune.io.lazy_load import build_skeleton

        self.path = Path(path)
        self.dtype = dtype
        self.model = build_skeleton(self.path, dtype)
        self.ckpt = LazyCheckpoint(self.path)
        self.keymap = KeyMap(self.model, self.ckpt.keys())
        self.config = self.model.config

    @property
    def bytes_read(self) -> int:
        return self.ckpt.bytes_read

    def iter_moe_layers(self, parts: tuple[str, ...] = ("experts",)) -> Iterator[MoELayer]:
        """Each MoE layer with `parts` ("experts", "router") loaded while it is yielded, then released."""
        unknown = set(parts) - {"experts", "router"}
        if unknown:
            raise ValueError(f"unknown MoE layer parts {sorted(unknown)}; choose from experts, router")
        for layer in find_moe_layers(self.model):
            modules = [layer.experts_name] * ("experts" in parts) + [layer.router_name] * ("router" in parts)
            names = [n for module in modules for n in materialise(self.model, self.keymap, self.ckpt, module, self.dtype)]
            try:
                yield layer
            finally:
                release(self.model, names)
        self.ckpt.close()

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> "LazyExpertWeights":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
