"""Clustering strategies: HC-SMoE, M-SMoE (merge each cluster) and STUN (keep one per cluster).

All three group similar experts and leave one physical expert and one router row per cluster, so
the output model really shrinks (the reference repositories keep the router width and copy merged
weights into every member's slot instead).

- `hc-smoe`: u_j = mean output of expert j over a dense token sample (every expert evaluated on
  every sampled token: E x dense_tokens expert evaluations per layer, default 256 tokens);
  average-linkage hierarchical clustering (scipy) on ||u_i - u_j|| to E - floor(E * ratio) clusters
  per layer; members merged by frequency-weighted averaging into the most frequent member.
- `m-smoe`: dominant experts = the E - floor(E * ratio) most frequent per layer; every other expert
  joins the dominant it is most similar to by router-logit cosine ((cos + 1) / 2, from the logit
  Gram matrix); frequency-weighted merge (optionally with neuron permutation alignment).
  Deviation: uniform per-layer counts (the paper's global adaptive counts are not implemented).
- `stun`: STUN stage 1. Distance = router-weight distance ||w_i - w_j|| / ||W_r||_F (data-free,
  default) or co-selection distance; greedy clustering that merges the closest pair of clusters only
  if every cross distance is <= tau ("greedy but reject mixed"); one tau for all layers found by
  bisection over the distinct distances so the total number of clusters matches the global budget
  (layers end with different counts: a non-uniform plan, reloaded with `load_pruned`). The member
  closest to its cluster's weight centroid is kept with its own router row; the others are dropped
  (`merge=True` averages them in instead, an extension). Stage 2 (unstructured pruning) is not part
  of this strategy.

Group-limited routers (DeepSeek-V3, GLM): hc-smoe and m-smoe cluster inside each routing group,
keeping the same count per group; stun raises a PlanError (its counts are not equal per group).
Merge options for `apply` are carried by each layer plan (`merge_align`, `merge_router`); the
plan params keep a record of them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from moeprune.adapters import find_moe_layers
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.selection import check_ratio, keep_top, routing_of
from moeprune.strategies.similarity import (
    coselect_distance,
    expert_weight_matrix,
    output_distance,
    router_logit_similarity,
    router_weight,
    router_weight_distance,
)
from moeprune.strategies.super_experts import super_experts

logger = logging.getLogger(__name__)

HC_SMOE_DENSE_TOKENS = 256


# ---- shared helpers --------------------------------------------------------------------------
def group_ranges(num_experts: int, n_group: int) -> list[list[int]]:
    """Contiguous routing groups (one range for ordinary routers)."""
    size = num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def layer_plan_from_clusters(
    layer: int, num_experts: int, clusters: list[list[int]], weights: torch.Tensor, scores: list[float] | None = None
) -> LayerPlan:
    """LayerPlan with one slot per cluster (representative first), slots in ascending order."""
    clusters = sorted(clusters, key=lambda c: c[0])
    group_weights = []
    for c in clusters:
        w = weights[c].double().clamp_min(0)
        w = w / w.sum() if float(w.sum()) > 0 else torch.full((len(c),), 1.0 / len(c), dtype=torch.float64)
        group_weights.append([float(x) for x in w])
    return LayerPlan(layer=layer, num_experts=num_experts, kept=[c[0] for c in clusters], scores=scores,
                     groups=clusters, group_weights=group_weights)


def _representative_first(cluster: list[int], freq: torch.Tensor) -> list[int]:
    rep = min(cluster, key=lambda j: (-float(freq[j]), j))
    return [rep] + sorted(j for j in cluster if j != rep)


def _merge_params(align: bool, router: str) -> dict[str, Any]:
    """A record of the merge options for the plan params (the layers carry them: `with_merge_options`)."""
    if router not in ("representative", "average"):
        raise PlanError(f"router must be 'representative' or 'average', got {router!r}")
    return {"merge_align": bool(align), "merge_router": router}


def with_merge_options(layers: dict[int, LayerPlan], align: bool, router: str) -> dict[int, LayerPlan]:
    """Set the merge options on every layer plan that has groups; returns `layers`."""
    _merge_params(align, router)
    for lp in layers.values():
        if lp.groups is not None:
            lp.merge_align, lp.merge_router = bool(align), router
    return layers


def _check_budget(budget: str, name: str) -> None:
    if budget != "layer":
        raise PlanError(f"{name} plans per layer (budget='layer'); a global budget is not supported")


def _protected(stats: ExpertStats, protect_super: bool) -> dict[int, list[int]]:
    return super_experts(stats) if protect_super else {i: [] for i in stats.layers}


# ---- HC-SMoE -------------------------------------------------------------------------------
def average_linkage_clusters(distance: torch.Tensor, n_clusters: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage into exactly `n_clusters` clusters."""
    e = distance.shape[0]
    if n_clusters >= e:
        return [[j] for j in range(e)]
    d = distance.double().clone()
    d = (d + d.T) / 2
    d.fill_diagonal_(0.0)
    tree = linkage(squareform(d.numpy(), checks=False), method="average")
    labels = cut_tree(tree, n_clusters=n_clusters).reshape(-1)
    return [sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]


def clusters_per_group(
    index: int, num_experts: int, n_group: int, ratio: float, protected: set[int] | list[int],
    freq: torch.Tensor, cluster_free: Callable[[list[int], int], list[list[int]]],
) -> list[list[int]]:
    """One layer's clusters: in each routing group keep E_g - floor(E_g * ratio) clusters, protected
    (super) experts as singletons and `cluster_free(free, n)` cutting the rest into n clusters
    (positions into `free`); each cluster lists its most frequent member first."""
    clusters: list[list[int]] = []
    for members in group_ranges(num_experts, n_group):
        n = len(members) - math.floor(len(members) * ratio)
        fixed = [j for j in members if j in protected]
        free = [j for j in members if j not in fixed]
        if n - len(fixed) < 1 and free:
            raise PlanError(f"layer {index}: {len(fixed)} protected super experts leave no cluster for the rest")
        local = cluster_free(free, n - len(fixed)) if free else []
        clusters += [[j] for j in fixed] + [_representative_first([free[i] for i in c], freq) for c in local]
    return clusters


@register_strategy(
    "hc-smoe", "merge experts clustered by mean output (hierarchical, average linkage)",
    dense_tokens=HC_SMOE_DENSE_TOKENS,
)
def hc_smoe(
    stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
    align: bool = False, router: str = "representative",
) -> Plan:
    check_ratio(ratio)
    _check_budget(budget, "hc-smoe")
    routing, top_k, n_group = routing_of(stats)
    protected = _protected(stats, protect_super)
    layers = {}
    for index, ls in sorted(stats.layers.items()):
        dist, freq = output_distance(ls), ls.count
        clusters = clusters_per_group(
            index, ls.num_experts, n_group, ratio, protected[index], freq,
            lambda free, n: average_linkage_clusters(dist[free][:, free], n),
        )
        layers[index] = layer_plan_from_clusters(index, ls.num_experts, clusters, freq, [float(x) for x in freq])
    params = {"ratio": ratio, "protect_super": protect_super, **_merge_params(align, router)}
    with_merge_options(layers, align, router)
    return Plan(strategy="hc-smoe", params=params, layers=layers, top_k=top_k, routing=routing)


# ---- M-SMoE --------------------------------------------------------------------------------
def dominant_clusters(similarity: torch.Tensor, freq: torch.Tensor, n: int, forced: list[int]) -> list[list[int]]:
    """Top-n experts by frequency (forced ones first) lead; the rest join their most similar leader.
    Forced leaders (protected super experts) stay singletons when another leader exists."""
    score = freq.double().clone()
    score[forced] = float("inf")
    leaders = keep_top(score, score.numel() - n)
    clusters = {d: [d] for d in leaders}
    hosts = [d for d in leaders if d not in forced] or leaders
    for j in range(score.numel()):
        if j in clusters:
            continue
        best = max(hosts, key=lambda d: (float(similarity[j, d]), -d))
        clusters[best].append(j)
    return [clusters[d] for d in leaders]


@register_strategy("m-smoe", "merge rare experts into the most router-similar frequent expert (M-SMoE)")
def m_smoe(
    stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
    align: bool = True, router: str = "representative",
) -> Plan:
    check_ratio(ratio)
    _check_budget(budget, "m-smoe")
    routing, top_k, n_group = routing_of(stats)
    protected = _protected(stats, protect_super)
    layers = {}
    for index, ls in sorted(stats.layers.items()):
        sim, freq = router_logit_similarity(ls), ls.count
        clusters: list[list[int]] = []
        for members in group_ranges(ls.num_experts, n_group):
            n = len(members) - math.floor(len(members) * ratio)
            forced = [i for i, j in enumerate(members) if j in protected[index]]
            local = dominant_clusters(sim[members][:, members], freq[members], n, forced)
            clusters += [[members[i] for i in c] for c in local]
        layers[index] = layer_plan_from_clusters(index, ls.num_experts, clusters, freq, [float(x) for x in freq])
    params = {"ratio": ratio, "protect_super": protect_super, **_merge_params(align, router)}
    with_merge_options(layers, align, router)
    return Plan(strategy="m-smoe", params=params, layers=layers, top_k=top_k, routing=routing)


# ---- STUN ----------------------------------------------------------------------------------
def weight_layers(model: Any, parts: tuple[str, ...]):
    """MoE layers with `parts` ("router", "experts") readable: a loaded model's own layers, or a
    streamed source's, materialised one layer at a time."""
    if hasattr(model, "iter_moe_layers"):
        yield from model.iter_moe_layers(parts)
    else:
        yield from find_moe_layers(model)


def greedy_reject_mixed(distance: torch.Tensor, tau: float, min_clusters: int = 1) -> list[list[int]]:
    """Take pairs by increasing distance; merge their clusters only if every cross distance <= tau."""
    d = distance.double()
    e = d.shape[0]
    owner = list(range(e))
    clusters: dict[int, list[int]] = {j: [j] for j in range(e)}
    iu = torch.triu_indices(e, e, offset=1)
    values = d[iu[0], iu[1]]
    for p in torch.argsort(values, stable=True).tolist():
        if float(values[p]) > tau or len(clusters) <= min_clusters:
            break
        a, b = owner[int(iu[0, p])], owner[int(iu[1, p])]
        if a == b:
            continue
        if float(d[clusters[a]][:, clusters[b]].max()) <= tau:
            clusters[a] += clusters.pop(b)
            for j in clusters[a]:
                owner[j] = a
    return [sorted(c) for c in clusters.values()]


def _stun_distance(kind: str, ls: LayerStats, weight: torch.Tensor) -> torch.Tensor:
    if kind == "router":
        return router_weight_distance(weight)
    if kind == "coselect":
        return coselect_distance(ls)
    raise PlanError(f"stun distance must be 'router' or 'coselect', got {kind!r}")


def global_tau(distances: dict[int, torch.Tensor], target: int, min_clusters: int) -> tuple[float, dict[int, list[list[int]]]]:
    """Bisection over the distinct pairwise distances for one tau giving `target` clusters in total
    (or, when no tau hits it exactly, the closest count above it)."""
    upper = [d[tuple(torch.triu_indices(*d.shape, 1))] for d in distances.values()]
    candidates = sorted({float(v) for u in upper for v in u if math.isfinite(float(v))})
    candidates = [-math.inf] + candidates

    def run(tau: float) -> dict[int, list[list[int]]]:
        return {i: greedy_reject_mixed(d, tau, min_clusters) for i, d in distances.items()}

    lo, hi = 0, len(candidates) - 1
    best = run(candidates[lo])
    best_tau = candidates[lo]
    while lo <= hi:
        mid = (lo + hi) // 2
        result = run(candidates[mid])
        count = sum(len(c) for c in result.values())
        if count >= target:
            best, best_tau = result, candidates[mid]
            if count == target:
                break
            lo = mid + 1
        else:
            hi = mid - 1
    total = sum(len(c) for c in best.values())
    if total != target:
        logger.warning("stun: no single tau gives exactly %d experts; using %d (tau=%.4g)", target, total, best_tau)
    return best_tau, best


@register_strategy("stun", "STUN stage 1: cluster by router weights with one global threshold; keep one per cluster",
                   needs_weights=True)
def stun(
    stats: ExpertStats, ratio: float, model: Any, budget: str = "global", protect_super: bool = False,
    distance: str = "router", merge: bool = False,
) -> Plan:
    """STUN stage 1; the budget is always global (`budget` is accepted and ignored).

    `model` is a loaded model or a streamed weights source (`iter_moe_layers(parts)`, e.g.
    `engine.expert_reader.LazyExpertWeights`): routers are read in one pass, each layer's
    experts in a second, one layer at a time."""
    check_ratio(ratio)
    routing, top_k, n_group = routing_of(stats)
    if n_group > 1:
        raise PlanError(
            f"stun keeps different expert counts per layer and cannot keep equal counts per routing group "
            f"(n_group={n_group}); use hc-smoe or m-smoe for group-limited routers"
        )
    routers = {layer.layer: router_weight(layer) for layer in weight_layers(model, ("router",)) if layer.layer in stats.layers}
    protected = _protected(stats, protect_super)
    distances = {}
    for index, ls in sorted(stats.layers.items()):
        d = _stun_distance(distance, ls, routers[index]).clone()
        for j in protected[index]:
            d[j, :] = math.inf
            d[:, j] = math.inf
            d[j, j] = 0.0
        distances[index] = d
    total = sum(ls.num_experts for ls in stats.layers.values())
    target = total - math.floor(total * ratio)
    if target < top_k * len(distances):
        raise PlanError(f"stun: ratio {ratio} leaves {target} experts, fewer than top-{top_k} in every layer")
    tau, clusters = global_tau(distances, target, min_clusters=top_k)
    layers = {}
    for layer in weight_layers(model, ("experts",)):
        if layer.layer not in clusters:
            continue
        index, layer_clusters = layer.layer, clusters[layer.layer]
        ls = stats.layers[index]
        flat = expert_weight_matrix(layer)
        ordered = []
        for c in layer_clusters:
            centroid = flat[c].mean(0, keepdim=True)
            rep = c[int(torch.cdist(flat[c], centroid).argmin())]
            ordered.append([rep] + [j for j in c if j != rep])
        if merge:
            layers[index] = layer_plan_from_clusters(index, ls.num_experts, ordered, ls.count, [float(x) for x in ls.count])
        else:
            kept = sorted(c[0] for c in ordered)
            layers[index] = LayerPlan(layer=index, num_experts=ls.num_experts, kept=kept, scores=[float(x) for x in ls.count])
    params = {"ratio": ratio, "tau": tau, "distance": distance, "merge": merge, "protect_super": protect_super,
              "clusters": {str(i): sorted(c) for i, c in clusters.items()}, **_merge_params(False, "representative")}
    with_merge_options(layers, False, "representative")
    return Plan(strategy="stun", params=params, layers=layers, top_k=top_k, routing=routing)
