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
from typing import Any, Callable

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


@dataclass
class SparsifyJob:
    """What `sparsify` does to one decoder layer, shared by the in-memory pass and the streamed one.

    Built by `sparsify_job` (checks and budgets); `use_supers` / `owl_ratio` + `set_layer_targets`
    take the pre-pass results; `prune(model, index, moe, run_all)` is the sequential pass's visit;
    `finish` records the measured sparsity."""

    report: SparsifyReport
    settings: PruneSettings
    pattern: tuple[int, int] | None
    sparsity: float
    owl: bool = False
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    protect_super: bool = True
    super_scale: float = 0.0
    shared_scale: float = 0.0
    attention: bool = False
    supers: dict[int, list[int]] = field(default_factory=dict)  # by MoE layer
    ratios: dict[int, float] = field(default_factory=dict)  # OWL outlier ratios, by decoder index
    layer_sparsity: dict[int, float] = field(default_factory=dict)  # by decoder index

    @property
    def needs_owl(self) -> bool:
        return self.owl and self.sparsity > 0

    def use_supers(self, stats: Any, num_layers: int, experts: dict[int, int]) -> None:
        """Super experts of the (compressed, unpruned) model's `stats`; `experts`: {MoE layer: count}."""
        self.supers = {k: v for k, v in super_experts(stats, num_layers).items() if v}
        self.report.protected_super = self.supers
        if self.report.total_target is not None and self.supers and self.super_scale < 1.0:
            self.sparsity = _compensate(self.sparsity, experts, self.supers, self.super_scale)
            self.report.sparsity = self.sparsity

    def owl_ratio(self, model: nn.Module, index: int, moe: Any, run_all: Callable[[], None]) -> None:
        """OWL pre-pass visit (no pruning): outlier ratio of decoder layer `index`'s Wanda scores."""
        if moe is None:
            return
        plain = plain_linears(model, index, moe, self.shared_scale > 0, self.attention)
        with LayerCollector(moe, plain) as collector:
            run_all()
        scores = wanda_layer_scores(moe.experts, collector.experts, plain, collector.linears)
        self.ratios[index] = outlier_ratio(scores, self.owl_m)

    def set_layer_targets(self, moe_layers: dict[int, int]) -> None:
        """Per decoder layer sparsity (OWL from `ratios`, else uniform); `moe_layers`: {decoder index: MoE layer}."""
        self.layer_sparsity = {i: self.sparsity for i in moe_layers}
        if self.needs_owl:
            logger.info("OWL outlier ratios: %s", {k: round(v, 4) for k, v in self.ratios.items()})
            self.layer_sparsity = owl_layer_sparsity(self.ratios, self.sparsity, self.owl_lambda)
            for i in moe_layers:
                self.layer_sparsity.setdefault(i, self.sparsity)
        self.report.layer_sparsity = {moe_layers[i]: s for i, s in self.layer_sparsity.items()}

    def prune(self, model: nn.Module, index: int, moe: Any, run_all: Callable[[], None]) -> None:
        """Sequential-pass visit: collect routed-token statistics on decoder layer `index`, prune it."""
        if moe is None or self.sparsity <= 0:
            return
        method, settings, pattern, report = self.settings.method, self.settings, self.pattern, self.report
        plain = plain_linears(model, index, moe, self.shared_scale > 0, self.attention)
        collector = LayerCollector(moe, plain, hessian=method == "sparsegpt")
        if method != "magnitude":
            with collector:
                run_all()
        s = self.layer_sparsity[index]
        protected = set(self.supers.get(moe.layer, []))
        per_expert = [_scaled(s, self.super_scale, pattern) if e in protected and self.protect_super else s
                      for e in range(moe.num_experts)]
        outcome = prune_experts(moe.experts, collector.experts, per_expert, settings)
        report.tokens[moe.layer] = outcome.tokens
        if outcome.fallback:
            report.fallback[moe.layer] = outcome.fallback
            logger.info("layer %d: experts %s saw < %d routed tokens; pruned by magnitude", moe.layer,
                        outcome.fallback, settings.min_tokens)
        shared_ids = {id(m) for mod in moe.shared for m in mod.modules()}
        for name, linear in plain.items():
            scale = self.shared_scale if id(linear) in shared_ids else 1.0
            fell_back = prune_linear(linear, collector.linears.get(name), _scaled(s, scale, pattern), settings)
            report.tensors[f"{name}.weight"] = zero_share(linear.weight.data)
            if fell_back:
                logger.info("%s saw < %d tokens; pruned by magnitude", name, settings.min_tokens)

    def finish(self, tensors: dict[str, float], expert_sparsity: float, plan: Any = None) -> SparsifyReport:
        """Record the measured zeros (per tensor, routed experts overall); store the report in `plan`."""
        report = self.report
        report.tensors.update(tensors)
        report.expert_sparsity = expert_sparsity
        report.total_sparsity = total_sparsity(expert_sparsity, report.removed_share)
        if plan is not None:
            plan.params["sparsity"] = report.to_dict()
        logger.info("%s: routed-expert sparsity %.3f (total with expert removal %.3f)", report.method,
                    report.expert_sparsity, report.total_sparsity)
        return report


def sparsify_job(
    method: str = "wanda", sparsity: float = 0.5, *, nm: str | tuple[int, int] | None = None,
    total_sparsity_target: float | None = None, plan: Any = None, owl: bool = False, owl_m: float = 5.0,
    owl_lambda: float = 0.08, protect_super: bool = True, super_scale: float = 0.0, shared_scale: float = 0.0,
    attention: bool = False, min_tokens: int = 16, blocksize: int = 128, percdamp: float = 0.01,
) -> SparsifyJob:
    """Check the options of `sparsify` and turn the budget into an intra-expert target (before any pass)."""
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
    report = SparsifyReport(method, sparsity, None if pattern is None else f"{pattern[0]}:{pattern[1]}",
                            total_sparsity_target, removed)
    return SparsifyJob(report, PruneSettings(method, pattern, min_tokens, blocksize, percdamp), pattern, sparsity,
                       owl, owl_m, owl_lambda, protect_super, super_scale, shared_scale, attention)


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
    job = sparsify_job(method, sparsity, nm=nm, total_sparsity_target=total_sparsity_target, plan=plan, owl=owl,
                       owl_m=owl_m, owl_lambda=owl_lambda, protect_super=protect_super, super_scale=super_scale,
                       shared_scale=shared_scale, attention=attention, min_tokens=min_tokens, blocksize=blocksize,
                       percdamp=percdamp)
    moe_map = moe_by_decoder_index(model)
    if job.protect_super:
        num_layers = model.config.get_text_config().num_hidden_layers
        stats = calibrate(model, ids, batch_size=batch_size, progress=False, meta={"num_hidden_layers": num_layers})
        job.use_supers(stats, num_layers, {moe.layer: moe.num_experts for moe in moe_map.values()})
    if job.needs_owl:
        sequential_pass(model, ids, lambda i, layer, run_all: job.owl_ratio(model, i, moe_map.get(i), run_all),
                        batch_size=batch_size, progress=progress, desc="OWL outlier ratios")
    job.set_layer_targets({i: moe.layer for i, moe in moe_map.items()})
    sequential_pass(model, ids, lambda i, layer, run_all: job.prune(model, i, moe_map.get(i), run_all),
                    batch_size=batch_size, progress=progress, desc=f"sparsify ({method})")
    measured = measured_sparsity(model)
    return job.finish(measured["tensors"], measured["routed_experts"], plan)


def _compensate(intra: float, experts: dict[int, int], supers: dict[int, list[int]], super_scale: float) -> float:
    """Sparsity of unprotected experts that keeps the average over all experts at `intra`."""
    slots = sum(experts.values())
    protected = sum(len(supers.get(layer, [])) for layer in experts)
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
