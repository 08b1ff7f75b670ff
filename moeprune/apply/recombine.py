"""Neuron recombination (DERN, algorithms.md section 7): dropped experts' neurons join retained ones.

Executes a plan layer's `recombine_threshold` before slicing: every dropped expert is split into
neuron segments (W_gate[c, :], W_up[c, :], W_down[:, c], + gate/up biases). A segment goes to the
retained expert holding the neuron most similar to it (cosine over the concatenated gate and up
rows), if that cosine is above the threshold; otherwise it is discarded. Inside each retained
expert its own d_ff neurons are the cluster centres: every assigned segment joins the neuron it
matched, and each neuron becomes the average of itself and its segments, weighted by source gate
mass (the plan's `scores`). Widths are unchanged, so the result loads with stock classes. With
threshold >= 1.0 nothing is assigned and recombination equals plain dropping. The down-projection
bias (gpt-oss) belongs to the expert and is left unchanged. The strategy that plans it is
`moeprune.strategies.dern`; this module knows nothing about strategies.
"""

from __future__ import annotations

import logging

import torch

from moeprune.adapters import MoELayer
from moeprune.apply.merge import read_experts, write_experts
from moeprune.plan import LayerPlan

logger = logging.getLogger(__name__)

ROW_KEYS = ("gate", "up", "gate_bias", "up_bias")


def _segments(t: dict[str, torch.Tensor], experts: list[int]) -> dict[str, torch.Tensor]:
    """Per-neuron rows of `experts`, flattened to [len(experts) * I, ...]."""
    out = {k: t[k][experts].reshape(-1, *t[k].shape[2:]).double() for k in ROW_KEYS if k in t}
    out["down"] = t["down"][experts].transpose(1, 2).reshape(-1, t["down"].shape[1]).double()  # columns as rows
    return out


def _similarity_features(seg: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = [seg[k] for k in ("gate", "up") if k in seg]
    f = torch.cat(parts, dim=1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def recombine_neurons(layer: MoELayer, lp: LayerPlan, threshold: float) -> int:
    """Merge the dropped experts' neurons into the retained experts of `layer` (in place, before
    slicing). Returns the number of segments assigned."""
    dropped = lp.dropped
    if threshold >= 1.0 or not dropped:
        return 0
    t = read_experts(layer)
    e, width = layer.num_experts, layer.layout.intermediate_dim
    device = t["down"].device  # computed where the layer lives (CPU or GPU)
    mass = torch.tensor(lp.scores, dtype=torch.float64) if lp.scores else torch.ones(e, dtype=torch.float64)
    mass = mass.to(device)
    mass = mass.clamp_min(1e-12)
    kept = list(lp.kept)
    own = _segments(t, kept)
    weight = mass[kept].repeat_interleave(width)
    sums = {k: v * weight.unsqueeze(1) if v.dim() == 2 else v * weight for k, v in own.items()}
    total = weight.clone()
    centres = _similarity_features(own)
    assigned = 0
    for d in dropped:
        seg = _segments(t, [d])
        cos = _similarity_features(seg) @ centres.T  # [I, len(kept) * I]
        best, target = cos.max(dim=1)
        take = best > threshold
        if not take.any():
            continue
        target, w = target[take], mass[d]
        for k, v in seg.items():
            sums[k].index_add_(0, target, v[take] * w)
        total.index_add_(0, target, torch.full((int(take.sum()),), float(w), dtype=torch.float64, device=device))
        assigned += int(take.sum())
    for k, v in sums.items():
        merged = v / (total.unsqueeze(1) if v.dim() == 2 else total)
        if k == "down":
            merged = merged.reshape(len(kept), width, -1).transpose(1, 2)
        else:
            merged = merged.reshape(len(kept), width, *t[k].shape[2:])
        t[k][kept] = merged.to(t[k].dtype)
    write_experts(layer, t)
    logger.info("layer %d: %d neuron segments of %d dropped experts recombined", lp.layer, assigned, len(dropped))
    return assigned
