"""Hidden states between two decoder layers: in memory up to a budget, spilled to disk beyond it.

A layer-wise pass keeps every calibration batch's hidden states between layers; for models larger
than memory they cannot all stay resident, so `ActivationStore` spills the excess to safetensors
files (`save_activation` / `load_activation`) in a directory its caller owns. An entry is a tensor
or, for families whose layers carry more state (`adapters.carried_state`), a (hidden, carried)
pair, saved side by side in one file.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from moeprune.engine.runner import LayerState


def save_activation(path: Path, state: LayerState) -> None:
    tensors = state if isinstance(state, tuple) else (state,)
    save_file(dict(zip(("hidden", "carried"), (t.contiguous() for t in tensors))), str(path))


def load_activation(path: Path) -> LayerState:
    tensors = load_file(str(path))
    return (tensors["hidden"], tensors["carried"]) if "carried" in tensors else tensors["hidden"]


def _bytes(state: LayerState) -> int:
    return sum(t.numel() * t.element_size() for t in (state if isinstance(state, tuple) else (state,)))


class ActivationStore:
    """Hidden states of every batch between two layers: in memory up to `budget` bytes, then on disk."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = Path(directory)
        self.budget = budget
        self.used = 0
        self.items: dict[int, LayerState | str] = {}
        self.spilled = 0

    def put(self, index: int, state: LayerState) -> None:
        size = _bytes(state)
        if self.used + size <= self.budget:
            self.items[index] = state
            self.used += size
        else:
            name = f"batch_{index:05d}.safetensors"
            save_activation(self.directory / name, state)
            self.items[index] = name
            self.spilled += 1

    def get(self, index: int) -> LayerState:
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
