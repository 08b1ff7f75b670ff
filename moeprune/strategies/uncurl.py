"""UNCURL (methods-2026.md section 8): task-specific merging by spectral clustering of router logits.

Per layer, expert j is represented by its column of router logits over the (task) calibration
tokens; the affinity is M-SMoE's shifted cosine (cos + 1) / 2 in [0, 1], exact from the logit Gram
matrix the observer collects (`similarity.router_logit_similarity`). scikit-learn's
`SpectralClustering(affinity="precomputed")` cuts the experts into E - floor(E * ratio) clusters;
each cluster is merged by the existing aligned, frequency-weighted merge (as m-smoe: neuron
permutation alignment on by default, the most frequent member's router row). Group-limited routers
(DeepSeek-V3, GLM) are clustered inside each routing group with the same count per group.

The paper's code is not public and its full text was not read: this is "M-SMoE's merge with
spectral clustering on task-data router logits" (the documented reading); calibrate on the task's
data (`--calibration`), since generic data defeats the method's purpose.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from moeprune.calibration.stats import ExpertStats
from moeprune.plan import Plan, PlanError
from moeprune.strategies.clustering import (
    _check_budget, _merge_params, _protected, clusters_per_group, group_ranges, layer_plan_from_clusters, with_merge_options,
)
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.selection import check_ratio, routing_of
from moeprune.strategies.similarity import router_logit_similarity


def spectral_clusters(affinity: torch.Tensor, n_clusters: int, seed: int = 0) -> list[list[int]]:
    """Spectral clustering of a symmetric non-negative [E, E] affinity into `n_clusters` clusters
    (each sorted ascending, clusters ordered by their first member)."""
    from sklearn.cluster import SpectralClustering

    e = affinity.shape[0]
    if n_clusters >= e:
        return [[j] for j in range(e)]
    if n_clusters <= 1:
        return [list(range(e))]
    a = affinity.double()
    a = ((a + a.T) / 2).clamp_min(0.0).numpy()
    if (a < 0).any() or not np.isfinite(a).all():
        raise PlanError("uncurl: the affinity must be finite and non-negative")
    with warnings.catch_warnings():  # "graph is not fully connected" is expected for sharp affinities
        warnings.simplefilter("ignore", UserWarning)
        labels = SpectralClustering(
            n_clusters=n_clusters, affinity="precomputed", random_state=seed, assign_labels="cluster_qr",
        ).fit_predict(a)
    clusters = [sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    return sorted((c for c in clusters if c), key=lambda c: c[0])


@register_strategy("uncurl", "merge experts spectrally clustered by router-logit affinity on task data (UNCURL)")
def uncurl(
    stats: ExpertStats, ratio: float, budget: str = "layer", protect_super: bool = False,
    align: bool = True, router: str = "representative", seed: int = 0,
) -> Plan:
    check_ratio(ratio)
    _check_budget(budget, "uncurl")
    routing, top_k, n_group = routing_of(stats)
    protected = _protected(stats, protect_super)
    layers, found = {}, {}
    for index, ls in sorted(stats.layers.items()):
        affinity, freq = router_logit_similarity(ls), ls.count

        def cut(free: list[int], n: int, index: int = index, affinity: torch.Tensor = affinity) -> list[list[int]]:
            local = spectral_clusters(affinity[free][:, free], n, seed)
            if len(local) != n:
                raise PlanError(f"layer {index}: spectral clustering returned {len(local)} clusters, expected "
                                f"{n}; lower the ratio or use m-smoe")
            return local

        clusters = clusters_per_group(index, ls.num_experts, n_group, ratio, protected[index], freq, cut)
        expected = sum(len(m) - math.floor(len(m) * ratio) for m in group_ranges(ls.num_experts, n_group))
        if len(clusters) != expected:  # protected super experts fill a whole routing group
            raise PlanError(f"layer {index}: {len(clusters)} clusters instead of {expected} (protected experts "
                            "fill a routing group); lower the ratio or set protect_super=False")
        found[str(index)] = sorted(sorted(c) for c in clusters)
        layers[index] = layer_plan_from_clusters(index, ls.num_experts, clusters, freq, [float(x) for x in freq])
    params = {"ratio": ratio, "protect_super": protect_super, "seed": seed, "clusters": found,
              "affinity": "(cos + 1) / 2 of router logits", **_merge_params(align, router)}
    with_merge_options(layers, align, router)
    return Plan(strategy="uncurl", params=params, layers=layers, top_k=top_k, routing=routing)
