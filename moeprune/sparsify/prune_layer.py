"""Prune one decoder layer's expert linears and plain linears from collected input statistics.

Methods: "magnitude" (|W|), "wanda" (|W| * ||X_j||), "moe-pruner" (|W| * ||g X_j||, routed tokens
scaled by their gate; plain linears have no gate and use Wanda), "sparsegpt" (OBS with the routed
Hessian). Each expert gets its own sparsity (super experts may be lighter or skipped); experts that
saw fewer than `min_tokens` routed tokens fall back to magnitude, since their statistics are noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.sparsify.collect import ExpertInputStats, LinearInputStats
from moeprune.sparsify.expert_weights import read_expert_linears, write_expert_linears
from moeprune.sparsify.masks import magnitude_scores, make_mask, wanda_scores
from moeprune.sparsify.sparsegpt import sparsegpt_prune

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "moe-pruner", "sparsegpt")


@dataclass
class PruneSettings:
    method: str
    nm: tuple[int, int] | None = None
    min_tokens: int = 16
    blocksize: int = 128
    percdamp: float = 0.01


@dataclass
class LayerOutcome:
    fallback: list[int] = field(default_factory=list)  # experts pruned by magnitude (too few tokens)
    tokens: list[int] = field(default_factory=list)


def prune_matrix(
    weight: torch.Tensor,
    method: str,
    sparsity: float,
    sq: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    settings: PruneSettings | None = None,
) -> torch.Tensor:
    """Pruned copy of one [out, in] matrix."""
    settings = settings or PruneSettings(method)
    if sparsity <= 0:
        return weight.clone()
    if method == "sparsegpt":
        if hessian is None:
            raise ValueError("sparsegpt needs the input Hessian")
        return sparsegpt_prune(weight, hessian, sparsity, settings.nm, settings.blocksize, settings.percdamp)
    if method == "magnitude":
        scores = magnitude_scores(weight)
    elif method in ("wanda", "moe-pruner"):
        if sq is None:
            raise ValueError(f"{method} needs input channel statistics")
        scores = wanda_scores(weight, sq)
    else:
        raise ValueError(f"unknown sparsification method {method!r}; choose from {', '.join(METHODS)}")
    return weight * make_mask(scores, sparsity, settings.nm).to(weight.dtype)


@torch.no_grad()
def prune_experts(
    experts: nn.Module,
    stats: ExpertInputStats | None,
    sparsities: list[float],
    settings: PruneSettings,
) -> LayerOutcome:
    """Prune every expert e of a fused experts module to `sparsities[e]` (0 = untouched)."""
    linears = {name: w.clone() for name, w in read_expert_linears(experts).items()}
    outcome = LayerOutcome(tokens=[] if stats is None else [int(c) for c in stats.count.tolist()])
    for e, sparsity in enumerate(sparsities):
        if sparsity <= 0:
            continue
        method = settings.method
        if method != "magnitude" and (stats is None or stats.count[e] < settings.min_tokens):
            method = "magnitude"
            outcome.fallback.append(e)
        for name, weights in linears.items():
            sq = hess = None
            if method != "magnitude":
                sq = stats.sq(name, router_weighted=method == "moe-pruner")[e]
                hess = stats.hessian(name)[e] if method == "sparsegpt" else None
            weights[e] = prune_matrix(weights[e], method, sparsity, sq, hess, settings)
    write_expert_linears(experts, linears)
    return outcome


@torch.no_grad()
def prune_linear(linear: nn.Linear, stats: LinearInputStats | None, sparsity: float, settings: PruneSettings) -> bool:
    """Prune a plain nn.Linear in place; returns True when it fell back to magnitude."""
    method = "wanda" if settings.method == "moe-pruner" else settings.method
    fallback = method != "magnitude" and (stats is None or stats.tokens < settings.min_tokens)
    if fallback:
        method = "magnitude"
    sq = None if stats is None else stats.sq
    hess = None if stats is None else stats.hess
    linear.weight.data.copy_(prune_matrix(linear.weight.data, method, sparsity, sq, hess, settings))
    return fallback


def wanda_layer_scores(experts: nn.Module | None, stats: ExpertInputStats | None,
                       plain: dict[str, nn.Linear], plain_stats: dict[str, LinearInputStats]) -> list[torch.Tensor]:
    """Every Wanda score of one decoder layer (per expert and linear), for OWL's outlier ratio."""
    scores: list[torch.Tensor] = []
    if experts is not None and stats is not None:
        for name, weights in read_expert_linears(experts).items():
            sq = stats.sq(name)
            scores.extend(wanda_scores(weights[e], sq[e]) for e in range(weights.shape[0]))
    for name, linear in plain.items():
        scores.append(wanda_scores(linear.weight.data, plain_stats[name].sq))
    return scores
