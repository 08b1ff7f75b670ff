"""Batches through a skeleton's decoder layers, each read from the shards once, for read-only passes.

Streamed evaluation, the streamed dynamic-skip fit and the streamed sparsify / local router KD chains
(`apply.streamed_passes`, through `capture` and `store`) share one prelude and loop: build the
skeleton of a checkpoint (or take one already resized), run every batch through the input
embeddings while recording each decoder layer's call arguments (`runner.capture_calls`), then
visit the layers with `runner.LayerRunner`, each materialised on the compute device, its next
layer's bytes read ahead (`io.prefetch.Prefetcher`), and released after all batches went through
it. Hidden states wait in an `ActivationStore` (memory up to half the budget each side, disk
beyond) in a scratch directory that lives as long as the `StreamedForward`.

    with StreamedForward(model, path, dtype, device, "4GB") as sf:
        final = sf.run(batches, progress=True, desc="evaluating layers")   # hooks on `model` fire
        tail = sf.load("model.norm")                                         # more modules, on the device
        hidden = final.get(0)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from moeprune.engine.activations import ActivationStore
from moeprune.engine.runner import Batch, LayerRunner, capture_calls, decoder_layers
from moeprune.engine.skeleton import materialise_prelude, resident_to_device, to_device, to_host
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, materialise, release
from moeprune.io.prefetch import Prefetcher
from moeprune.io.sharded_writer import parse_size


class StreamedForward:
    """Read-only layer-wise forward of checkpoint `path` through the meta skeleton `model`."""

    def __init__(self, model: nn.Module, path: str | Path, dtype: torch.dtype, device: str | torch.device,
                 memory_budget: str | int = "4GB", prefix: str = "moeprune-pass-", ckpt: LazyCheckpoint | None = None,
                 scratch: Path | None = None) -> None:
        """`ckpt`/`scratch`: a reader and a directory the caller owns and shares (default: this
        object's own, closed and removed by `close`); `memory_budget` is split between a layer's
        inputs and outputs."""
        self.model, self.path, self.dtype, self.device = model, Path(path), dtype, torch.device(device)
        resident_to_device(model, self.device)  # rotary tables and other buffers built outside the shards
        self._own_ckpt = ckpt is None
        self.ckpt = LazyCheckpoint(self.path) if ckpt is None else ckpt
        self.keymap = KeyMap(model, self.ckpt.keys())
        self.layer_prefix, self.layers = decoder_layers(model)
        self.budget = parse_size(memory_budget) // 2  # inputs and outputs of a layer share the budget
        self._scratch = tempfile.TemporaryDirectory(prefix=prefix) if scratch is None else None
        self.scratch = Path(self._scratch.name) if scratch is None else Path(scratch)
        self.seconds: dict[str, float] = {}

    def load(self, module: str) -> list[str]:
        """Materialise module `module` from the shards on the compute device; the names loaded."""
        names = materialise(self.model, self.keymap, self.ckpt, module, self.dtype)
        to_device(self.model, names, self.device)
        return names

    def store(self, name: str) -> ActivationStore:
        """An empty activation store in the scratch subdirectory `name` (emptied if it was used)."""
        store = ActivationStore(self.scratch / name, self.budget)
        store.directory.mkdir(parents=True, exist_ok=True)
        for f in store.directory.glob("*.safetensors"):
            f.unlink()
        return store

    @torch.no_grad()
    def capture(self, batches: list[Batch], keep_embeddings: bool = False) -> tuple[ActivationStore, list]:
        """Every batch through the input embeddings: (layer-0 inputs, each batch's layer call arguments).

        `keep_embeddings`: leave the input embeddings loaded (e.g. a tied LM head reads them)."""
        embed = materialise_prelude(self.model, self.keymap, self.ckpt, self.layer_prefix, self.device, self.dtype)
        current = self.store("in")
        calls = []
        for b, batch in enumerate(batches):
            hidden, batch_calls = capture_calls(self.model, self.layers, batch, self.device)
            calls.append(batch_calls)
            current.put(b, to_host(hidden))
        if not keep_embeddings:
            release(self.model, embed)
        return current, calls

    @torch.no_grad()
    def run(self, batches: list[Batch], progress: bool = True, desc: str = "layers",
            keep_embeddings: bool = False) -> ActivationStore:
        """Every batch through the embeddings and all decoder layers; the last layer's outputs."""
        current, calls = self.capture(batches, keep_embeddings)
        names: list[str] = []
        ahead = Prefetcher(self.ckpt.shards, {i: self.keymap.keys_under(f"{self.layer_prefix}.{i}")
                                              for i in range(len(self.layers))})

        def load(index: int) -> None:
            ahead.ready(index)  # read ahead while the previous layer ran
            names[:] = self.load(f"{self.layer_prefix}.{index}")

        runner = LayerRunner(self.layers, calls, self.device, load=load,
                             release=lambda index: release(self.model, names), host=True)
        try:
            current = runner.run(current, new_store=lambda index: self.store(f"out{index % 2}"), progress=progress,
                                 desc=desc)
        finally:
            ahead.close()
        self.seconds = dict(runner.seconds)
        return current

    def close(self) -> None:
        if self._own_ckpt:
            self.ckpt.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self) -> "StreamedForward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
