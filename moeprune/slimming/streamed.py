"""`prune --slim-channels R --offload`: channel slimming, each expert layer slimmed as it is written.

Slimming needs, per MoE layer, the kept experts' calibration statistics (from the one streamed
calibration pass) and, for CAMERA-P, the down projections after the expert plan (merges change
them). `SlimEdit` decides everything before the first tensor is written, with the in-memory rules
(`slimming.run`: `score_layer`, `layer_totals`, `choose_keep`): one layer at a time it reads the
decoder layer from the shards into a meta skeleton (coverage reads nothing: its scores are
statistics), runs the plan's surgery on it (`_prepare_layer`, `slice_layer`), scores its channels
and sends it back to meta. The keep sets then give the output's expert counts, widths and storage
layout (stock hub layout or module layout, as `save_pruned` decides), so `streamed_apply` knows
them up front; as it writes each layer it applies the same `slim_layer` to the materialised layer
right after the plan's surgery. Same inputs, same rules, same order: tensors equal the in-memory
output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.apply.surgery import _prepare_layer, set_expert_count, slice_layer
from moeprune.calibration.stats import ExpertStats
from moeprune.plan import Plan
from moeprune.slimming.channels import record_widths
from moeprune.slimming.run import SlimReport, check_slim_args, choose_keep, layer_totals, score_layer, slim_layer
from moeprune.engine.runner import decoder_layers
from moeprune.io.lazy_load import build_skeleton
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, materialise, release
from moeprune.apply.output_edits import OutputEdits

logger = logging.getLogger(__name__)


def check_streamable_slim(slim: Any) -> None:
    """The slimming options, checked before any calibration (`slim:` of a recipe)."""
    check_slim_args(slim.ratio, slim.method, slim.mode, slim.layer_budget)


def _unit_of(prefix: str, layer: MoELayer) -> str:
    rest = layer.block_name[len(prefix) + 1:]
    return f"{prefix}.{rest.split('.')[0]}"


class SlimEdit(OutputEdits):
    """Channel slimming decided from the shards up front, applied to each layer as it is written."""

    def __init__(self, path: str | Path, stats: ExpertStats, plan: Plan, dtype: torch.dtype, options: dict[str, Any]) -> None:
        ratio, method, mode = options["ratio"], options["method"], options["mode"]
        budget = check_slim_args(ratio, method, mode, options.get("layer_budget"))
        path = Path(path)
        model = build_skeleton(path, dtype)
        layers = find_moe_layers(model)
        report = SlimReport(ratio=ratio, method=method, mode=mode, layer_budget=budget)
        report.channels_before = sum(
            (len(plan.layers[x.layer].kept) if x.layer in plan.layers else x.num_experts) * x.layout.intermediate_dim
            for x in layers)
        scores = {}
        ckpt = LazyCheckpoint(path) if method == "camera" else None
        try:
            keymap = KeyMap(model, ckpt.keys()) if ckpt is not None else None
            prefix = decoder_layers(model)[0]
            for layer in layers:  # the plan's surgery on each layer, then its channel scores (camera: its down weights)
                lp = plan.layers.get(layer.layer)
                names = materialise(model, keymap, ckpt, _unit_of(prefix, layer), dtype) if ckpt is not None else []
                if lp is not None:
                    if names:
                        _prepare_layer(model, layer, lp, plan.params)
                    slice_layer(layer, lp.kept)  # on meta too: the shapes the written layer will have
                scores[layer.layer] = score_layer(layer, stats, plan, method, options["alpha"])
                release(model, names)
        finally:
            if ckpt is not None:
                ckpt.close()
        set_expert_count(model, {x.layer: x.num_experts for x in layers})  # what apply_plan records
        totals = layer_totals(scores, layers, ratio, method, budget)
        self.keep: dict[int, tuple[list[torch.Tensor], list[int]]] = {}
        for layer in layers:  # on the meta skeleton: the output's counts, widths and storage
            i, e = layer.layer, layer.num_experts
            keep, alive = choose_keep(layer, scores[i], totals[i], method, mode, options["min_per_expert"])
            self.keep[i] = (keep, alive)
            if len(alive) < e:
                report.dropped[i] = [x for x in range(e) if x not in alive]
            report.widths[i] = slim_layer(layer, keep, alive)
            report.channels_after += sum(report.widths[i])
        self.counts = {x.layer: x.num_experts for x in layers}
        if report.dropped:
            set_expert_count(model, self.counts)
        report.storage = record_widths(model, report.widths)
        plan.params["slim"] = report.to_dict()
        self.report, self.layers = report, frozenset(self.keep)
        logger.info("slimming %s/%s: %.1f%% of expert channels removed", method, mode, 100 * report.removed_share)

    def final_counts(self, counts: dict[int, int]) -> dict[int, int]:
        return dict(self.counts)

    def hub_layout(self) -> bool:
        return bool(self.report.storage["stock_loadable"])

    def edit_layer(self, model: nn.Module, layer: MoELayer) -> None:
        keep, alive = self.keep[layer.layer]
        widths = slim_layer(layer, keep, alive)
        if widths != self.report.widths[layer.layer]:
            raise RuntimeError(f"layer {layer.layer}: slimmed widths {widths} differ from the decided {self.report.widths[layer.layer]}")

    def configure(self, model: nn.Module) -> None:
        set_expert_count(model, self.counts)
        storage = record_widths(model, self.report.widths)
        if storage != self.report.storage:
            raise RuntimeError(f"slimmed output storage {storage} differs from the decided {self.report.storage}")
