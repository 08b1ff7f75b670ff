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

from moeprune.adapters import find_moe_layers
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


def slim_channels(
    model: nn.Module, stats: ExpertStats, plan: Plan | None = None, ratio: float = 0.25, method: str = "camera",
    mode: str = "uniform", alpha: float = 0.9, min_per_expert: int = 16, layer_budget: str | None = None,
) -> SlimReport:
    """Slim every routed expert of `model` in place; returns what was kept."""
    if not 0.0 <= ratio < 1.0:
        raise PlanError(f"slim ratio must be in [0, 1) (share of expert channels removed), got {ratio}")
    if method not in ("camera", "coverage") or mode not in ("uniform", "expert"):
        raise PlanError(f"slim method must be camera|coverage and mode uniform|expert, got {method!r}, {mode!r}")
    budget = layer_budget or ("coverage" if method == "coverage" else "uniform")
    if budget not in ("uniform", "coverage"):
        raise PlanError(f"slim layer_budget must be uniform|coverage, got {budget!r}")
    layers = find_moe_layers(model)
    report = SlimReport(ratio=ratio, method=method, mode=mode, layer_budget=budget)
    subs, ranking, channel, attribution = {}, {}, {}, {}
    for layer in layers:
        if layer.layer not in stats.layers:
            raise PlanError(f"statistics have no MoE layer {layer.layer}; calibrate this model")
        lay = layer.layout
        sub = _rows(stats.layers[layer.layer], _slot_map(layer.layer, lay.num_experts, plan))
        if "act_gsq_sum" in sub.tensors and sub.act_gsq_sum.shape[1] != lay.intermediate_dim:
            raise PlanError(f"layer {layer.layer}: statistics have {sub.act_gsq_sum.shape[1]} channels per expert, "
                            f"the model {lay.intermediate_dim}; was it already slimmed?")
        subs[layer.layer] = sub
        if method == "camera":
            down = read_expert_linears(layer.experts)["down"]
            ranking[layer.layer] = camera_energy(sub, down, alpha)
        else:
            channel[layer.layer] = channel_activation(sub)
            attribution[layer.layer] = expert_attribution(sub)
            ranking[layer.layer] = channel[layer.layer]
        report.channels_before += lay.num_experts * lay.intermediate_dim
    if budget == "coverage":
        pool = channel if method == "coverage" else {i: r / r.mean().clamp_min(1e-300) for i, r in ranking.items()}
        totals = loss_coverage({i: layer_loss(s) for i, s in subs.items()}, pool, 1.0 - ratio)
    else:
        totals = {layer.layer: layer.num_experts * width_for(layer.layout.intermediate_dim, ratio) for layer in layers}
    widths, counts = {}, {}
    for layer in layers:
        i, e = layer.layer, layer.num_experts
        if mode == "uniform":
            keep = uniform_keep(ranking[i], _uniform_width(totals[i] / e, layer.layout.intermediate_dim))
        elif method == "camera":
            keep = global_keep(ranking[i], totals[i])
        else:
            keep = attr_coverage(channel[i], attribution[i], totals[i], min_per_expert)
        alive = [x for x in range(e) if keep[x].numel() > 0]
        if len(alive) < e:
            if len(alive) < layer.routing.top_k or layer.routing.group_limited:
                raise PlanError(f"layer {i}: slimming would empty {e - len(alive)} experts, leaving fewer than top-k "
                                "(or unequal groups); lower the slim ratio or use mode 'uniform'")
            slice_layer(layer, alive)
            report.dropped[i] = [x for x in range(e) if x not in alive]
            keep = [keep[x] for x in alive]
        widths[i] = slim_experts(layer.experts, keep)
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
