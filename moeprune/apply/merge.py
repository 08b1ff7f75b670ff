"""Merge expert groups into one physical expert each (HC-SMoE / M-SMoE style), before slicing.

For every plan group with more than one member, the members' gate, up and down projections (and
biases) are averaged with the plan's `group_weights` (normalised frequencies) and written into the
representative's slot (`groups[i][0] == kept[i]`); `slice_layer` then keeps only the
representatives, so the merged model really has one expert and one router row per cluster.

Options (plan params `merge_align`, `merge_router`):
- `align=True`: before averaging, each member's intermediate neurons are permuted to match the
  representative's (M-SMoE): a linear sum assignment (scipy) maximising the dot product of each
  neuron's concatenated gate row, up row, down column and biases. SwiGLU experts are invariant to
  such permutations, so alignment changes no member's function, only what averaging pairs up.
- `router="representative"` (default): the representative keeps its own router row; `"average"`:
  its row (and router bias / correction bias) becomes the weighted average of the members' rows.

All weight math goes through `ExpertLayout`, so standard, transposed and gpt-oss interleaved
layouts (with biases) behave the same.
"""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment

from moeprune.adapters import MoELayer
from moeprune.adapters.layout import per_expert_post_norm
from moeprune.plan import LayerPlan, PlanError

logger = logging.getLogger(__name__)

ROUTER_CHOICES = ("representative", "average")


# ---- canonical per-expert tensors ------------------------------------------------------------
def read_experts(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Canonical float copies: gate/up [E, I, H], down [E, H, I], gate_bias/up_bias [E, I], down_bias [E, H],
    post_norm [E, H] (a per-expert output norm's weight)."""
    layout, ex = layer.layout, layer.experts
    out: dict[str, torch.Tensor] = {}
    if layout.has_gate:
        gate, up = layout.split_gate_up(ex.gate_up_proj.detach())
        out["gate"], out["up"] = gate.float().clone(), up.float().clone()
    else:
        up = ex.up_proj.detach()
        out["up"] = (up.transpose(-2, -1) if layout.is_transposed else up).float().clone()
    out["down"] = layout.down_canonical(ex.down_proj.detach()).float().clone()
    if layout.has_bias:
        if layout.has_gate:
            b = ex.gate_up_proj_bias.detach().float()
            i = layout.intermediate_dim
            gb, ub = (b[:, :i], b[:, i:]) if layout.is_concatenated else (b[:, 0::2], b[:, 1::2])
            out["gate_bias"], out["up_bias"] = gb.clone(), ub.clone()
        elif getattr(ex, "up_proj_bias", None) is not None:
            out["up_bias"] = ex.up_proj_bias.detach().float().clone()
        if getattr(ex, "down_proj_bias", None) is not None:
            out["down_bias"] = ex.down_proj_bias.detach().float().clone()
    if (norm := per_expert_post_norm(ex)) is not None:  # Ergo: averaged like the other per-expert tensors
        out["post_norm"] = norm.weight.detach().float().clone()
    return out


def write_experts(layer: MoELayer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy canonical tensors (as returned by `read_experts`) back into the module's storage, in place."""
    layout, ex = layer.layout, layer.experts
    with torch.no_grad():
        if layout.has_gate:
            ex.gate_up_proj.copy_(layout.join_gate_up(tensors["gate"], tensors["up"]).to(ex.gate_up_proj.dtype))
        else:
            up = tensors["up"].transpose(-2, -1) if layout.is_transposed else tensors["up"]
            ex.up_proj.copy_(up.to(ex.up_proj.dtype))
        ex.down_proj.copy_(layout.down_storage(tensors["down"]).to(ex.down_proj.dtype))
        if "gate_bias" in tensors:
            gb, ub = tensors["gate_bias"], tensors["up_bias"]
            b = torch.cat([gb, ub], 1) if layout.is_concatenated else torch.stack([gb, ub], 2).reshape(gb.shape[0], -1)
            ex.gate_up_proj_bias.copy_(b.to(ex.gate_up_proj_bias.dtype))
        elif "up_bias" in tensors:
            ex.up_proj_bias.copy_(tensors["up_bias"].to(ex.up_proj_bias.dtype))
        if "down_bias" in tensors:
            ex.down_proj_bias.copy_(tensors["down_bias"].to(ex.down_proj_bias.dtype))
        if "post_norm" in tensors:
            norm = per_expert_post_norm(ex)
            norm.weight.copy_(tensors["post_norm"].to(norm.weight.dtype))


def neuron_features(t: dict[str, torch.Tensor], j: int) -> torch.Tensor:
    """[I, F] per intermediate neuron of expert j: gate row, up row, down column, gate/up biases."""
    parts = [t[k][j] for k in ("gate", "up") if k in t]
    parts.append(t["down"][j].T)
    parts += [t[k][j].unsqueeze(1) for k in ("gate_bias", "up_bias") if k in t]
    return torch.cat(parts, dim=1)


def permute_neurons(t: dict[str, torch.Tensor], j: int, perm: torch.Tensor) -> None:
    """Reorder expert j's intermediate neurons in place: new neuron c = old neuron perm[c]."""
    for k in ("gate", "up", "gate_bias", "up_bias"):
        if k in t:
            t[k][j] = t[k][j][perm]
    t["down"][j] = t["down"][j][:, perm]


def alignment(t: dict[str, torch.Tensor], reference: int, member: int) -> torch.Tensor:
    """Permutation of `member`'s neurons that best matches `reference`'s (linear sum assignment)."""
    sim = neuron_features(t, reference).double() @ neuron_features(t, member).double().T
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)  # scipy: on the CPU
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm.to(t["down"].device)


# ---- merging ---------------------------------------------------------------------------------
def _normalised(weights: list[float], where: str) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise PlanError(f"{where}: group weights must be finite and non-negative, got {weights}")
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())


def _merge_router_rows(layer: MoELayer, group: list[int], w: torch.Tensor) -> None:
    e = layer.num_experts
    idx = torch.tensor(group, dtype=torch.long)
    with torch.no_grad():
        for module in layer.router.modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for _, t in tensors:
                if t.dim() >= 1 and t.shape[0] == e and t.is_floating_point():
                    rows = t[idx.to(t.device)].double()
                    avg = (w.to(rows.device).view(-1, *([1] * (rows.dim() - 1))) * rows).sum(0)
                    t[group[0]] = avg.to(t.dtype)


def merge_groups(layer: MoELayer, lp: LayerPlan, align: bool = False, router: str = "representative") -> None:
    """Average each multi-member group of `lp` into its representative's slot (weights and router)."""
    if router not in ROUTER_CHOICES:
        raise PlanError(f"merge router must be one of {ROUTER_CHOICES}, got {router!r}")
    if not lp.groups:
        return
    t = read_experts(layer)
    where = f"layer {lp.layer}"
    for group, weights in zip(lp.groups, lp.group_weights or [[1.0] * len(g) for g in lp.groups]):
        if len(group) < 2:
            continue
        w = _normalised(weights, where)
        rep = group[0]
        if align:
            for member in group[1:]:
                permute_neurons(t, member, alignment(t, rep, member))
        for key, value in t.items():
            merged = sum(float(wi) * value[m].double() for wi, m in zip(w, group))
            value[rep] = merged.to(value.dtype)
        if router == "average":
            _merge_router_rows(layer, group, w)
        logger.debug("%s: merged %s into expert %d (weights %s)", where, group, rep, [round(float(x), 3) for x in w])
    write_experts(layer, t)
