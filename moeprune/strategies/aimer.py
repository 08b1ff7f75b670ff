"""AIMER (arXiv 2603.18492; methods-2026.md §3): calibration-free expert pruning from weights alone.

For each routed expert, w is the concatenation of W_gate, W_up and W_down (N = 3md elements; W_up
and W_down for families without a gate), and

    AIMER(w) = ||w||_1 / (sqrt(N) * ||w||_2),    1/sqrt(N) <= AIMER <= 1

with the absolute sum, squared sum and element count each summed over the matrices (float32)
before the ratio. A HIGH score (spread-out, Gaussian-like weights, ~0.80) means removable: per
layer the floor(E * ratio) highest-scoring experts are pruned, the same count in every layer and
at most E - top_k (a larger ratio is refused; per routing group for group-limited routers). An all-zero expert scores 1.0.
Biases, shared experts and routers are not scored.

No statistics are read (`needs_calibration=False`). `model` is a loaded model, or any object with
an `iter_moe_layers()` method yielding `MoELayer`s whose experts are materialised while yielded
(the offloaded reader in `moeprune.engine.expert_reader` reads only expert weights from shards).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.adapters.layout import ExpertLayout
from moeprune.calibration.stats import ExpertStats
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.selection import check_ratio, keep_top, select_uniform

logger = logging.getLogger(__name__)


def expert_matrices(experts: nn.Module) -> list[torch.Tensor]:
    """The [E, ., .] weight matrices of every routed expert: gate, up (if gated) and down."""
    layout = ExpertLayout.of(experts)
    if layout.has_gate:
        mats = list(layout.split_gate_up(experts.gate_up_proj))
    else:
        mats = [experts.up_proj]
    return mats + [layout.down_canonical(experts.down_proj)]


@torch.no_grad()
def aimer_scores(experts: nn.Module) -> torch.Tensor:
    """AIMER score of every expert of one experts module, float32 [E]."""
    l1, sq, n = None, None, 0
    for m in expert_matrices(experts):
        m = m.detach().float()
        a, s = m.abs().sum(dim=(1, 2)), (m * m).sum(dim=(1, 2))
        l1, sq = (a, s) if l1 is None else (l1 + a, sq + s)
        n += m.shape[1] * m.shape[2]
    score = l1 / (math.sqrt(n) * sq.sqrt())
    return torch.where(sq > 0, score, torch.ones_like(score))


def _moe_layers(model: Any) -> Iterator[MoELayer]:
    if hasattr(model, "iter_moe_layers"):
        yield from model.iter_moe_layers()
    else:
        yield from find_moe_layers(model)


@register_strategy("aimer", "calibration-free: prune the experts whose weights look most Gaussian (AIMER)",
                   needs_weights=True, needs_calibration=False)
def aimer(stats: ExpertStats | None, ratio: float, model: Any = None) -> Plan:
    """`stats` is ignored (may be None)."""
    check_ratio(ratio)
    if model is None:
        raise PlanError("aimer reads expert weights: pass model=")
    layers: dict[int, LayerPlan] = {}
    routing: dict[str, Any] = {}
    top_k = 1
    for layer in _moe_layers(model):
        scores = aimer_scores(layer.experts).double()
        routing, top_k = layer.routing.as_dict(), layer.routing.top_k
        e = scores.numel()
        drop = math.floor(e * ratio)
        if drop > e - top_k:
            raise PlanError(f"layer {layer.layer}: ratio {ratio} would prune {drop} of {e} experts but top-{top_k} "
                            f"routing needs {top_k}; aimer prunes at most E - top_k = {e - top_k} (lower the ratio)")
        if layer.routing.n_group > 1:
            kept = select_uniform({0: -scores}, ratio, layer.routing.n_group)[0]
        else:
            kept = keep_top(-scores, drop)
        layers[layer.layer] = LayerPlan(layer=layer.layer, num_experts=e, kept=kept, scores=[float(x) for x in scores])
    if not layers:
        raise PlanError("aimer found no MoE layers in the model")
    return Plan(strategy="aimer", params={"ratio": ratio, "calibration_free": True}, layers=layers,
                top_k=top_k, routing=routing)
