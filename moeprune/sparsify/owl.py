"""OWL (Yin et al. 2024): non-uniform layer sparsity from each layer's share of outlier weights.

D_l = share of the layer's Wanda scores above M * mean (M = 5). The ratios are min-max normalised
onto [0, 2 lambda] (lambda = 0.08), centred, and subtracted from the target: layers with more
outliers are pruned less, and the mean layer sparsity equals the target.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def owl_layer_sparsity(ratios: dict[int, float], target: float, lam: float = 0.08) -> dict[int, float]:
    """{layer: sparsity} with mean `target`, spread 2 * lam, lower where the outlier ratio is higher."""
    if not ratios:
        return {}
    keys = sorted(ratios)
    values = torch.tensor([ratios[k] for k in keys], dtype=torch.float64)
    spread = values.max() - values.min()
    if spread <= 0:
        return {k: target for k in keys}
    scaled = (values - values.min()) / spread * (2 * lam)
    sparsity = target - (scaled - scaled.mean())
    if bool((sparsity < 0).any() or (sparsity >= 1).any()):
        raise ValueError(f"OWL with target {target} and lambda {lam} gives layer sparsities outside [0, 1); lower lambda")
    return {k: float(s) for k, s in zip(keys, sparsity)}
