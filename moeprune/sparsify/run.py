"""`sparsify`: unstructured or N:M pruning inside the surviving experts of an in-memory MoE model.

Runs after expert drop/merge (or on an uncompressed model) and re-collects its statistics on the
model as it is now, from the tokens each expert actually receives (`collect.sequential_pass`).
Budgets: `sparsity` inside every expert linear, or `total_sparsity` over routed-expert parameters
counting what the plan already removed (STUN-style). Optional OWL layer-wise sparsity, super-expert
and shared-expert protection, attention projections, magnitude fallback for rarely routed experts.

    report = sparsify(model, ids, method="wanda", sparsity=0.5)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from moeprune.calibration.observer import calibrate
from moeprune.sparsify.budget import BudgetError, intra_sparsity_for_total, removed_share, total_sparsity
from moeprune.sparsify.collect import LayerCollector, moe_by_decoder_index, plain_linears, sequential_pass
from moeprune.sparsify.masks import outlier_ratio, parse_nm
from moeprune.sparsify.owl import owl_layer_sparsity
from moeprune.sparsify.prune_layer import METHODS, PruneSettings, prune_experts, prune_linear, wanda_layer_scores
from moeprune.sparsity_report import measured_sparsity, zero_share
from moeprune.strategies.super_experts import super_experts

logger = logging.getLogger(__name__)


@dataclass
class SparsifyReport:
    """What `sparsify` did; `to_dict()` is stored in `plan.params["sparsity"]`."""

    method: str
    sparsity: float  # intra-expert target (uniform, or OWL mean)
    nm: str | None
    total_target: float | None
    removed_share: float
    layer_sparsity: dict[int, float] = field(default_factory=dict)
    protected_super: dict[int, list[int]] = field(default_factory=dict)
    fallback: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    tensors: dict[str, float] = field(default_factory=dict)
    expert_sparsity: float = 0.0  # measured share of zeros in routed-expert weights
    total_sparsity: float = 0.0  # removed_share + (1 - removed_share) * expert_sparsity

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("layer_sparsity", "protected_super", "fallback", "tokens"):
            data[key] = {str(k): v for k, v in data[key].items()}
        return data


def sparsify(
    model: nn.Module,
    ids: torch.Tensor,
    method: str = "wanda",
    sparsity: float = 0.5,
    *,
    nm: str | tuple[int, int] | None = None,
    total_sparsity_target: float | None = None,
    plan: Any = None,
    owl: bool = False,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    protect_super: bool = True,
    super_scale: float = 0.0,
    shared_scale: float = 0.0,
    attention: bool = False,
    min_tokens: int = 16,
    batch_size: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: bool = True,
) -> SparsifyReport:
    """Prune inside the experts of `model` in place, from calibration token ids [n, seq_len].

    `sparsity` is the share of weights zeroed in each surviving expert linear (ignored with `nm`,
    e.g. "2:4", where it is 1 - n/m); `total_sparsity_target` instead sets the share of routed-
    expert parameters removed in total, counting experts `plan` already dropped or merged.
    Super experts get `super_scale` x the sparsity (0 = untouched) when `protect_super`; shared
    experts get `shared_scale` x (0 = untouched); `attention` also prunes attention projections.
    Experts with fewer than `min_tokens` routed tokens are pruned by magnitude (reported).
    When `plan` is given, the report is also stored in `plan.params["sparsity"]`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sparsification method {method!r}; choose from {', '.join(METHODS)}")
    pattern = parse_nm(nm)
    removed = removed_share(plan)
    if pattern is not None:
        if owl or total_sparsity_target is not None:
            raise ValueError("N:M sparsity is fixed at 1 - n/m; it cannot be combined with OWL or a total target")
        sparsity = 1.0 - pattern[0] / pattern[1]
    elif total_sparsity_target is not None:
        sparsity = intra_sparsity_for_total(total_sparsity_target, removed)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    settings = PruneSettings(method, pattern, min_tokens, blocksize, percdamp)
    moe_map = moe_by_decoder_index(model)
    report = SparsifyReport(method, sparsity, None if pattern is None else f"{pattern[0]}:{pattern[1]}",
                            total_sparsity_target, removed)

    supers: dict[int, list[int]] = {}
    if protect_super:
        num_layers = model.config.get_text_config().num_hidden_layers
        stats = calibrate(model, ids, batch_size=batch_size, progress=False, meta={"num_hidden_layers": num_layers})
        supers = {k: v for k, v in super_experts(stats, num_layers).items() if v}
        report.protected_super = supers
    if total_sparsity_target is not None and supers and super_scale < 1.0:
        sparsity = _compensate(sparsity, moe_map, supers, super_scale)
        report.sparsity = sparsity

    layer_sparsity = {i: sparsity for i in moe_map}
    if owl and sparsity > 0:
        ratios = _owl_ratios(model, ids, moe_map, shared_scale > 0, attention, owl_m, batch_size, progress)
        layer_sparsity = owl_layer_sparsity(ratios, sparsity, owl_lambda)
        for i in moe_map:
            layer_sparsity.setdefault(i, sparsity)
    report.layer_sparsity = {moe_map[i].layer: s for i, s in layer_sparsity.items()}

    def visit(index: int, layer: nn.Module, run_all) -> None:
        moe = moe_map.get(index)
        if moe is None or sparsity <= 0:
            return
        plain = plain_linears(model, index, moe, shared_scale > 0, attention)
        collector = LayerCollector(moe, plain, hessian=method == "sparsegpt")
        if method != "magnitude":
            with collector:
                run_all()
        s = layer_sparsity[index]
        protected = set(supers.get(moe.layer, []))
        per_expert = [_scaled(s, super_scale, pattern) if e in protected and protect_super else s
                      for e in range(moe.num_experts)]
        outcome = prune_experts(moe.experts, collector.experts, per_expert, settings)
        report.tokens[moe.layer] = outcome.tokens
        if outcome.fallback:
            report.fallback[moe.layer] = outcome.fallback
            logger.info("layer %d: experts %s saw < %d routed tokens; pruned by magnitude", moe.layer,
                        outcome.fallback, min_tokens)
        shared_ids = {id(m) for mod in moe.shared for m in mod.modules()}
        for name, linear in plain.items():
            scale = shared_scale if id(linear) in shared_ids else 1.0
            fell_back = prune_linear(linear, collector.linears.get(name), _scaled(s, scale, pattern), settings)
            report.tensors[f"{name}.weight"] = zero_share(linear.weight.data)
            if fell_back:
                logger.info("%s saw < %d tokens; pruned by magnitude", name, min_tokens)

    sequential_pass(model, ids, visit, batch_size=batch_size, progress=progress, desc=f"sparsify ({method})")
    measured = measured_sparsity(model)
    report.tensors.update(measured["tensors"])
    report.expert_sparsity = measured["routed_experts"]
    report.total_sparsity = total_sparsity(report.expert_sparsity, removed)
    if plan is not None:
        plan.params["sparsity"] = report.to_dict()
    logger.info("%s: routed-expert sparsity %.3f (total with expert removal %.3f)", method,
                report.expert_sparsity, report.total_sparsity)
    return report


def _compensate(intra: float, moe_map: dict, supers: dict[int, list[int]], super_scale: float) -> float:
    """Sparsity of unprotected experts that keeps the average over all experts at `intra`."""
    slots = sum(moe.num_experts for moe in moe_map.values())
    protected = sum(len(supers.get(moe.layer, [])) for moe in moe_map.values())
    effective = slots - protected * (1.0 - super_scale)
    adjusted = intra * slots / effective
    if adjusted >= 1.0:
        raise BudgetError(f"with {protected} protected super experts the others would need sparsity {adjusted:.3f} >= 1")
    return adjusted


def _scaled(sparsity: float, scale: float, pattern: tuple[int, int] | None) -> float:
    """Lighter sparsity for protected modules; N:M cannot be lighter, so anything < 1 skips."""
    if pattern is not None:
        return sparsity if scale >= 1.0 else 0.0
    return sparsity * max(0.0, min(1.0, scale))


def _owl_ratios(model, ids, moe_map, shared: bool, attention: bool, m: float, batch_size: int,
                progress: bool) -> dict[int, float]:
    """OWL pre-pass (no pruning): outlier ratio of every MoE decoder layer's Wanda scores."""
    ratios: dict[int, float] = {}

    def visit(index: int, layer: nn.Module, run_all) -> None:
        moe = moe_map.get(index)
        if moe is None:
            return
        plain = plain_linears(model, index, moe, shared, attention)
        with LayerCollector(moe, plain) as collector:
            run_all()
        scores = wanda_layer_scores(moe.experts, collector.experts, plain, collector.linears)
        ratios[index] = outlier_ratio(scores, m)

    sequential_pass(model, ids, visit, batch_size=batch_size, progress=progress, desc="OWL outlier ratios")
    logger.info("OWL outlier ratios: %s", {k: round(v, 4) for k, v in ratios.items()})
    return ratios
