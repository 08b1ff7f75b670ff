"""Expert similarities and distances for the clustering strategies (algorithms.md sections 4-5).

All are [E, E] float64 matrices computed from calibration statistics or, for the data-free ones,
from the model's weights:

- `router_logit_similarity`: M-SMoE's (cos(L_:,i, L_:,j) + 1) / 2 over router logits, exact from
  the logit Gram matrix L^T L collected in one pass.
- `coselect_distance`: STUN's co-selection distance -C_ij / mean|C| (C = times i and j were both
  in the top-k).
- `router_weight_distance`: STUN's data-free ||w_i - w_j||_2 / ||W_r||_F over router rows.
- `output_vectors` / `output_distance`: HC-SMoE's mean expert output over a token sample on which
  every expert was evaluated (`dense_out_sum / dense_tokens`) and the Euclidean distances between
  those vectors.
- `expert_weight_matrix`: every expert's weights flattened into one row (gate, up, down, biases in
  canonical layout), for centroids and representatives.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.adapters.layout import router_scoring_weights
from moeprune.calibration.stats import LayerStats
from moeprune.plan import PlanError


def router_logit_similarity(stats: LayerStats) -> torch.Tensor:
    """(cos + 1) / 2 between columns of the router-logit matrix, in [0, 1]."""
    gram = stats.logit_gram.double()
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    cos = (gram / norms.unsqueeze(0) / norms.unsqueeze(1)).clamp(-1.0, 1.0)
    return (cos + 1.0) / 2.0


def coselect_distance(stats: LayerStats) -> torch.Tensor:
    """-C_ij / mean|C_ij| over off-diagonal pairs (lower = selected together more often)."""
    c = stats.coselect.double().clone()
    c.fill_diagonal_(0.0)
    e = c.shape[0]
    scale = c.abs().sum() / max(e * (e - 1), 1)
    d = -c / scale.clamp_min(1e-300)
    d.fill_diagonal_(0.0)
    return d


def router_weight_distance(router_weight: torch.Tensor) -> torch.Tensor:
    """||w_i - w_j||_2 / ||W_r||_F between router rows (no data needed)."""
    w = router_weight.detach().double()
    return torch.cdist(w, w) / w.norm().clamp_min(1e-300)


def output_vectors(stats: LayerStats) -> torch.Tensor:
    """HC-SMoE's u_j: mean output of expert j over the dense token sample, [E, H]."""
    if "dense_out_sum" not in stats.tensors or float(stats.tensors.get("dense_tokens", torch.zeros(()))) <= 0:
        raise PlanError(
            "hc-smoe needs expert outputs on a dense token sample; calibrate with dense_tokens > 0 "
            "(`moeprune calibrate --dense-tokens 256`; `moeprune prune` does it automatically)"
        )
    return stats.dense_out_sum.double() / stats.dense_tokens.double()


def output_distance(stats: LayerStats) -> torch.Tensor:
    u = output_vectors(stats)
    return torch.cdist(u, u)


def layers_by_index(model: nn.Module) -> dict[int, MoELayer]:
    return {layer.layer: layer for layer in find_moe_layers(model)}


def expert_weight_matrix(layer: MoELayer) -> torch.Tensor:
    """[E, P] float64: each expert's parameters, flattened in a layout-independent order."""
    layout = layer.layout
    experts = layer.experts
    e = layout.num_experts
    parts: list[torch.Tensor] = []
    if layout.has_gate:
        gate, up = layout.split_gate_up(experts.gate_up_proj.detach())
        parts += [gate.reshape(e, -1), up.reshape(e, -1)]
    else:
        parts.append(experts.up_proj.detach().transpose(-2, -1).reshape(e, -1) if layout.is_transposed
                     else experts.up_proj.detach().reshape(e, -1))
    parts.append(layout.down_canonical(experts.down_proj.detach()).reshape(e, -1))
    for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
        bias = getattr(experts, name, None)
        if isinstance(bias, torch.Tensor) and bias.dim() == 2 and bias.shape[0] == e:
            parts.append(bias.detach())
    return torch.cat([p.double().cpu() for p in parts], dim=1)  # planning runs on the CPU


def router_weight(layer: MoELayer) -> torch.Tensor:
    """The router's [E, H] weight rows of the routed experts (its own `weight`, or a submodule's:
    LongCat's `classifier`: `router_scoring_weights`; rows after the routed experts' are left out)."""
    weights = router_scoring_weights(layer.router, layer.num_experts)
    if weights:
        return weights[0].detach()[: layer.num_experts].cpu()
    raise PlanError(f"layer {layer.layer}: router has no 2-D weight to compare experts by")
