"""`prune --dynamic-skip --offload`: NAEE dynamic-skip betas fitted on the streamed output.

The in-memory path fits beta_l (median of w_(2) / w_(1) over the calibration tokens, see
`apply.dynamic_skip`) on the pruned model. Streamed, the pruned model is the checkpoint that
`streamed_apply` has just written into its temporary directory: `DynamicSkipEdit.finish` runs the
calibration tokens through that checkpoint one decoder layer at a time (a meta skeleton built from
the output's config, resized to its per-layer expert counts and channel widths as `load_pruned`
does; each layer read from the shards, run on every cached batch with `GateRatios`' hooks on its
experts, and freed), then writes the extension into the output's config.json and the plan's
params, before the output is published. Same modules, same batches, same order: the betas equal
the in-memory ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moeprune.adapters import find_moe_layers
from moeprune.engine.runner import as_batches
from moeprune.engine.streamed_forward import StreamedForward
from moeprune.apply.dynamic_skip import CONFIG_KEY, GateRatios, fitted_entry
from moeprune.io.checkpoint import PLAN_FILE, pruned_skeleton
from moeprune.io.output_policy import write_text_atomic
from moeprune.plan import Plan
from moeprune.apply.output_edits import OutputEdits


@torch.no_grad()
def streamed_gate_ratios(
    path: str | Path, ids: torch.Tensor, batch_size: int = 8, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", memory_budget: str | int = "4GB", progress: bool = True,
) -> tuple[dict[int, torch.Tensor], bool]:
    """`apply.dynamic_skip.gate_ratios` of checkpoint `path`, one decoder layer resident at a time."""
    from moeprune.io.loading import resolve_dtype

    path = Path(path)
    dtype = resolve_dtype(dtype, path)
    if json.loads((path / "config.json").read_text()).get("moeprune_novices"):
        raise ValueError("dynamic skipping of a MoNE (novice) output needs the model in memory; drop --offload")
    model = pruned_skeleton(path, dtype)
    recorder = GateRatios(find_moe_layers(model))  # hooks on the skeleton's modules fire on each loaded layer
    with StreamedForward(model, path, dtype, device, memory_budget, prefix="moeprune-skip-") as sf, recorder:
        sf.run(as_batches(ids, batch_size), progress=progress, desc="dynamic-skip betas")
    return recorder.result()


class DynamicSkipEdit(OutputEdits):
    """Fit the betas on the written output and record them in its config and plan (before publishing)."""

    def __init__(self, plan: Plan, ids: torch.Tensor, batch_size: int, dtype: torch.dtype, device: Any,
                 memory_budget: str | int, progress: bool = True) -> None:
        self.plan, self.ids, self.batch_size, self.dtype = plan, ids, batch_size, dtype
        self.device, self.memory_budget, self.progress = device, memory_budget, progress
        self.entry: dict[str, Any] | None = None

    def finish(self, tmp: Path) -> None:
        ratios, renormalize = streamed_gate_ratios(tmp, self.ids, self.batch_size, self.dtype, self.device,
                                                   self.memory_budget, self.progress)
        self.entry = fitted_entry(ratios, renormalize)
        config = json.loads((tmp / "config.json").read_text())
        config[CONFIG_KEY] = self.entry
        if isinstance(config.get("text_config"), dict):  # composite configs: the text config records it too
            config["text_config"][CONFIG_KEY] = self.entry
        write_text_atomic(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
        self.plan.params["dynamic_skip"] = self.entry
        self.plan.save(tmp / PLAN_FILE)
