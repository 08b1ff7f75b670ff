"""Hidden states between two decoder layers: in memory up to a budget, spilled to disk beyond it.

A layer-wise pass keeps every calibration batch's hidden states between layers; for models larger
than memory they cannot all stay resident, so `ActivationStore` spills the excess to safetensors
files (`save_activation` / `load_activation`) in a directory its caller owns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_activation(path: Path, tensor: torch.Tensor) -> None:
    save_file({"hidden": tensor.contiguous()}, str(path))


def load_activation(path: Path) -> torch.Tensor:
    return load_file(str(path))["hidden"]


class ActivationStore:
    """Hidden states of every batch between two layers: in memory up to `budget` bytes, then on disk."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = Path(directory)
        self.budget = budget
        self.used = 0
        self.items: dict[int, torch.Tensor | str] = {}
        self.spilled = 0

    def put(self, index: int, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.used + size <= self.budget:
            self.items[index] = tensor
            self.used += size
        else:
            name = f"batch_{index:05d}.safetensors"
            save_activation(self.directory / name, tensor)
            self.items[index] = name
            self.spilled += 1

    def get(self, index: int) -> torch.Tensor:
        item = self.items[index]
        return load_activation(self.directory / item) if isinstance(item, str) else item

    def persist(self) -> None:
        """Write the in-memory entries to the directory too (for a resumable commit)."""
        for index, item in self.items.items():
            if not isinstance(item, str):
                save_activation(self.directory / f"batch_{index:05d}.safetensors", item)

    @classmethod
    def from_directory(cls, directory: Path, count: int, budget: int) -> "ActivationStore":
        store = cls(directory, budget)
        for index in range(count):
            store.items[index] = f"batch_{index:05d}.safetensors"
            if not (directory / store.items[index]).is_file():
                raise FileNotFoundError(f"{directory}: activation of batch {index} is missing; rerun without --resume")
        return store
