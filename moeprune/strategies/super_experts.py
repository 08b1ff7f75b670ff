"""Super experts (algorithms.md section 9): rare experts with extreme output maxima.

m = max over routed tokens of ||f_j(x)||_inf. Values are pooled over (layer, expert) for layers
below round(0.75 L); an expert is super if m > P99.5 of the pool and m > max(pool) / 10. Removing a
handful of them breaks a model, so strategies protect them (score +inf).
"""

from __future__ import annotations

import torch

from moeprune.calibration.stats import ExpertStats


def super_experts(stats: ExpertStats, num_hidden_layers: int | None = None) -> dict[int, list[int]]:
    """{layer: [expert, ...]} of super experts (empty lists where none)."""
    n_layers = num_hidden_layers or stats.meta.get("num_hidden_layers") or (max(stats.layers) + 1)
    cutoff = round(0.75 * n_layers)
    eligible = [i for i in sorted(stats.layers) if i < cutoff] or sorted(stats.layers)
    pool = torch.cat([stats.layers[i].max_out for i in eligible])
    result: dict[int, list[int]] = {i: [] for i in stats.layers}
    if pool.numel() == 0 or float(pool.max()) <= 0:
        return result
    q995 = float(torch.quantile(pool, 0.995))
    floor = float(pool.max()) / 10
    for i in eligible:
        m = stats.layers[i].max_out
        result[i] = [j for j in range(m.numel()) if float(m[j]) > q995 and float(m[j]) > floor]
    return result
