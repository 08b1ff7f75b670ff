"""Hooks that let a method edit the streamed output while `streamed_apply` writes it.

`streamed_apply(..., edits=[...])` calls, for every `OutputEdits` it is given:

* `final_counts(counts)` before anything is written: the experts per layer the output will have
  (channel slimming may drop experts left with no channel);
* `hub_layout()`: False when the output must be written in module layout (what `save_pruned` does
  for configs with `moeprune_experts_per_layer` / `moeprune_intermediate_per_layer`);
* `edit_layer(model, layer)` for every MoE layer in `layers`, right after the plan's surgery on
  that one materialised decoder layer (such layers always take the layer route);
* `configure(model)` on the skeleton after the last layer, before the config is written;
* `finish(tmp)` on the complete output in its temporary directory, before it is published (e.g.
  fitting dynamic-skip betas on the written checkpoint and patching its config and plan), so the
  published output is complete or absent.

The base class does nothing; subclasses override what they need.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moeprune.adapters import MoELayer


class OutputEdits:
    """No-op hooks (see the module docstring)."""

    layers: frozenset[int] = frozenset()

    def final_counts(self, counts: dict[int, int]) -> dict[int, int]:
        return counts

    def hub_layout(self) -> bool:
        return True

    def edit_layer(self, model: nn.Module, layer: MoELayer) -> None:
        return None

    def configure(self, model: nn.Module) -> None:
        return None

    def finish(self, tmp: Path) -> None:
        return None
