"""`slim_channels`: remove the lowest-scoring intermediate channels of every routed expert, physically.

Runs on an in-memory model after the expert plan is applied (or on an unpruned model), from the
statistics of the one calibration pass (no second pass: the scores come from the original routing,
unlike CAMERA's layer-sequential driver; a documented simplification). Output slot j of a planned
layer is scored with the statistics of original expert `plan.layers[l].kept[j]` (for merged slots,
the representative's). Methods: `camera` (CAMERA-P energy) and `coverage` (MoE-Slimming), see
`scores`; modes and budgets, see `allocate`. Experts left with no channel (per-expert mode) are
removed with their router rows, keeping at least top-k experts. Shared experts are not slimmed.

    report = slim_channels(model, stats, plan, ratio=0.25, method="camera", mode="expert")
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.apply.surgery import set_expert_count, slice_layer
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import Plan, PlanError
from moeprune.slimming.allocate import attr_coverage, global_keep, loss_coverage, uniform_keep, width_for
from moeprune.slimming.channels import ALIGN, record_widths, slim_experts
from moeprune.slimming.scores import camera_energy, channel_activation, expert_attribution, layer_loss
from moeprune.sparsify.expert_weights import read_expert_linears

logger = logging.getLogger(__name__)

_ROW_FIELDS = ("count", "act_gsq_sum", "act_gmax", "act_sq_sum", "attr_sum")


@dataclass
class SlimReport:
    """What `slim_channels` did; `to_dict()` is stored in `plan.params["slim"]`."""

    ratio: float
    method: str
    mode: str
    layer_budget: str
    widths: dict[int, list[int]] = field(default_factory=dict)  # real width per output expert
    dropped: dict[int, list[int]] = field(default_factory=dict)  # output slots removed (no channel left)
    channels_before: int = 0  # routed-expert channels before slimming (after expert dropping)
    channels_after: int = 0
    storage: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_share(self) -> float:
        return 1.0 - self.channels_after / max(self.channels_before, 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = {str(k): v for k, v in self.widths.items()}
        data["dropped"] = {str(k): v for k, v in self.dropped.items()}
        data["removed_share"] = self.removed_share
        return data


def _rows(stats: LayerStats, kept: list[int]) -> LayerStats:
    """The statistics of `kept` experts, in that order (plus the layer-level fields)."""
    index = torch.tensor(kept, dtype=torch.long)
    out = {k: stats.tensors[k].index_select(0, index) for k in _ROW_FIELDS if k in stats.tensors}
    for k in ("tokens", "layer_loss_sum"):
        if k in stats.tensors:
            out[k] = stats.tensors[k]
    return LayerStats(out)


def _slot_map(layer_index: int, num_experts: int, plan: Plan | None) -> list[int]:
    if plan is None or layer_index not in plan.layers:
        return list(range(num_experts))
    lp = plan.layers[layer_index]
    if lp.novices:
        raise PlanError("channel slimming cannot follow a novice (MoNE) plan; use a dropping or merging strategy")
    if len(lp.kept) != num_experts:
        raise PlanError(f"layer {layer_index}: the model has {num_experts} experts but the plan keeps {len(lp.kept)}; "
                        "apply the plan first")
    return list(lp.kept)


def _uniform_width(width: float, intermediate: int) -> int:
    """Round a uniform width to whole channels; to a multiple of ALIGN when experts are wide enough
    (>= 8 ALIGN channels), so that no zero padding is stored."""
    if intermediate >= 8 * ALIGN:
        return max(ALIGN, min(intermediate, ALIGN * round(width / ALIGN)))
    return max(1, min(intermediate, round(width)))


def check_slim_args(ratio: float, method: str, mode: str, layer_budget: str | None) -> str:
    """Validate the slimming options; returns the layer budget rule in effect."""
    if not 0.0 <= ratio < 1.0:
        raise PlanError(f"slim ratio must be in [0, 1) (share of expert channels removed), got {ratio}")
    if method not in ("camera", "coverage") or mode not in ("uniform", "expert"):
        raise PlanError(f"slim method must be camera|coverage and mode uniform|expert, got {method!r}, {mode!r}")
    budget = layer_budget or ("coverage" if method == "coverage" else "uniform")
    if budget not in ("uniform", "coverage"):
        raise PlanError(f"slim layer_budget must be uniform|coverage, got {budget!r}")
    return budget


@dataclass
class LayerScores:
    """One layer's slimming inputs: its kept experts' statistics and channel scores."""

    sub: LayerStats
    ranking: torch.Tensor  # [E, I]: camera energy, or the coverage channel score
    channel: torch.Tensor | None = None  # coverage only
    attribution: torch.Tensor | None = None  # coverage only


def score_layer(layer: MoELayer, stats: ExpertStats, plan: Plan | None, method: str, alpha: float) -> LayerScores:
    """Channel scores of one MoE layer after its plan was applied (camera reads its down weights)."""
    if layer.layer not in stats.layers:
        raise PlanError(f"statistics have no MoE layer {layer.layer}; calibrate this model")
    lay = layer.layout
    sub = _rows(stats.layers[layer.layer], _slot_map(layer.layer, lay.num_experts, plan))
    if "act_gsq_sum" in sub.tensors and sub.act_gsq_sum.shape[1] != lay.intermediate_dim:
        raise PlanError(f"layer {layer.layer}: statistics have {sub.act_gsq_sum.shape[1]} channels per expert, "
                        f"the model {lay.intermediate_dim}; was it already slimmed?")
    if method == "camera":
        return LayerScores(sub, camera_energy(sub, read_expert_linears(layer.experts)["down"], alpha))
    channel = channel_activation(sub)
    return LayerScores(sub, channel, channel, expert_attribution(sub))


def layer_totals(scores: dict[int, LayerScores], layers: list[MoELayer], ratio: float, method: str, budget: str
                 ) -> dict[int, int]:
    """Channels each layer keeps (over all its experts)."""
    if budget == "coverage":
        pool = ({i: s.channel for i, s in scores.items()} if method == "coverage"
                else {i: s.ranking / s.ranking.mean().clamp_min(1e-300) for i, s in scores.items()})
        return loss_coverage({i: layer_loss(s.sub) for i, s in scores.items()}, pool, 1.0 - ratio)
    return {layer.layer: layer.num_experts * width_for(layer.layout.intermediate_dim, ratio) for layer in layers}


def choose_keep(layer: MoELayer, scores: LayerScores, total: int, method: str, mode: str, min_per_expert: int
                ) -> tuple[list[torch.Tensor], list[int]]:
    """(kept channels per surviving expert, surviving experts) of one layer."""
    i, e = layer.layer, layer.num_experts
    if mode == "uniform":
        keep = uniform_keep(scores.ranking, _uniform_width(total / e, layer.layout.intermediate_dim))
    elif method == "camera":
        keep = global_keep(scores.ranking, total)
    else:
        keep = attr_coverage(scores.channel, scores.attribution, total, min_per_expert)
    alive = [x for x in range(e) if keep[x].numel() > 0]
    if len(alive) < e and (len(alive) < layer.routing.top_k or layer.routing.group_limited):
        raise PlanError(f"layer {i}: slimming would empty {e - len(alive)} experts, leaving fewer than top-k "
                        "(or unequal groups); lower the slim ratio or use mode 'uniform'")
    return [keep[x] for x in alive], alive


def slim_layer(layer: MoELayer, keep: list[torch.Tensor], alive: list[int]) -> list[int]:
    """Drop the emptied experts (with their router rows) and slim the rest; returns their real widths."""
    if len(alive) < layer.num_experts:
        slice_layer(layer, alive)
    return slim_experts(layer.experts, keep)


def slim_channels(
    model: nn.Module, stats: ExpertStats, plan: Plan | None = None, ratio: float = 0.25, method: str = "camera",
    mode: str = "uniform", alpha: float = 0.9, min_per_expert: int = 16, layer_budget: str | None = None,
) -> SlimReport:
    """Slim every routed expert of `model` in place; returns what was kept."""
    budget = check_slim_args(ratio, method, mode, layer_budget)
    layers = find_moe_layers(model)
    report = SlimReport(ratio=ratio, method=method, mode=mode, layer_budget=budget)
    scores = {layer.layer: score_layer(layer, stats, plan, method, alpha) for layer in layers}
    report.channels_before = sum(layer.num_experts * layer.layout.intermediate_dim for layer in layers)
    totals = layer_totals(scores, layers, ratio, method, budget)
    widths, counts = {}, {}
    for layer in layers:
        i, e = layer.layer, layer.num_experts
        keep, alive = choose_keep(layer, scores[i], totals[i], method, mode, min_per_expert)
        if len(alive) < e:
            report.dropped[i] = [x for x in range(e) if x not in alive]
        widths[i] = slim_layer(layer, keep, alive)
        counts[i] = layer.num_experts
        report.channels_after += sum(widths[i])
    if report.dropped:
        set_expert_count(model, counts)
    report.widths = widths
    report.storage = record_widths(model, widths)
    if plan is not None:
        plan.params["slim"] = report.to_dict()
    logger.info("slimmed %s/%s: %.1f%% of expert channels removed", method, mode, 100 * report.removed_share)
    return report
