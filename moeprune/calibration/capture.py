"""A grouped, routed-tokens-only experts forward that exposes per-(token, slot) outputs.

Fused experts modules have no per-expert submodule to hook, so the observer temporarily replaces an
experts module's `forward` (on the instance, so nothing global changes) with `routed_forward`. It
computes exactly what transformers' `grouped_mm` implementation computes — tokens sorted by
expert, one grouped linear for gate/up and one for down, the module's own `_apply_gate` — and hands
the un-gated outputs f and activations a of every routed (token, slot) pair to a sink before
weighting and summing. Only routed tokens go through an expert.

On a layer with MoNE novices (router E columns, P kept experts, `adapters.layout.NOVICE_MAP_BUFFER`)
the router's picks are mapped to kept slots; picks of novices add g * mu and never reach the sink,
whose `top_k_index` then holds kept slots with -1 for novice picks. Identity experts (LongCat's zero
experts: router columns >= E, `adapters.layout.identity_experts`) are stand-ins the same way: their
picks add g * x and reach the sink as -1. So are picks at weight exactly 0, which add nothing:
ZAYA's router rewrites a pick of its skip class as (expert 0, weight 0), which is no token of expert 0's.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn
from transformers.integrations.moe import _grouped_linear

from moeprune.adapters.layout import NOVICE_MAP_BUFFER, NOVICE_VECTOR_BUFFER, identity_experts, per_expert_post_norm
from moeprune.adapters.forward_patches import patch_forward as owned_patch


class RoutedSink(Protocol):
    def __call__(
        self,
        expert_ids: torch.Tensor,
        token_ids: torch.Tensor,
        gates: torch.Tensor,
        activations: torch.Tensor,
        outputs: torch.Tensor,
        top_k_index: torch.Tensor,
        hidden: torch.Tensor,
    ) -> None: ...


def run_experts(experts: nn.Module, inputs: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of `experts` for rows of `inputs`, row i going through expert `expert_ids[i]`.

    `expert_ids` must be sorted ascending. Returns (activations a [S, I], outputs f [S, H]), f un-gated.
    """
    num_experts = experts.gate_up_proj.shape[0] if experts.has_gate else experts.up_proj.shape[0]
    histc_input = expert_ids.float() if inputs.device.type in ("cpu", "mps") else expert_ids.int()
    per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    if experts.has_gate:
        weight, bias_name = experts.gate_up_proj, "gate_up_proj_bias"
    else:
        weight, bias_name = experts.up_proj, "up_proj_bias"
    bias = getattr(experts, bias_name)[expert_ids] if experts.has_bias else None
    hidden = _grouped_linear(inputs, weight, offsets, bias=bias, is_transposed=experts.is_transposed)
    act = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    down_bias = experts.down_proj_bias[expert_ids] if experts.has_bias else None
    out = _grouped_linear(act, experts.down_proj, offsets, bias=down_bias, is_transposed=experts.is_transposed)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    elif (norm := per_expert_post_norm(experts)) is not None:  # Ergo: each route's output, its expert's norm
        out = norm(out, expert_ids)
    return act, out


def routed_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    sink: RoutedSink | None = None,
) -> torch.Tensor:
    """Drop-in experts forward: same result as the grouped_mm implementation, plus a sink call."""
    if getattr(experts, NOVICE_MAP_BUFFER, None) is not None:
        mapped = getattr(experts, NOVICE_MAP_BUFFER)[top_k_index]  # kept slot, or -(novice position + 1)
        vectors = getattr(experts, NOVICE_VECTOR_BUFFER)[(-mapped - 1).clamp_min(0)]  # [T, k, H]
        return _standin_routed_forward(experts, hidden_states, mapped, top_k_weights, sink,
                                       lambda w: (w.unsqueeze(-1) * vectors.to(w.dtype)).sum(dim=1))
    if identity_experts(experts):
        mapped = top_k_index.masked_fill(top_k_index >= experts.gate_up_proj.shape[0], -1)
        return _standin_routed_forward(experts, hidden_states, mapped, top_k_weights, sink,
                                       lambda w: w.sum(dim=1, keepdim=True) * hidden_states.to(w.dtype))
    # A pick at weight 0 serves no token (ZAYA's skip class, rewritten as expert 0). It adds nothing to
    # the output, so only a sink needs it left out, and only then is the host sync paid.
    zero = top_k_weights == 0 if sink is not None else None
    if zero is not None and bool(zero.any()):
        mapped = top_k_index.masked_fill(zero, -1)
        return _standin_routed_forward(experts, hidden_states, mapped, top_k_weights, sink,
                                       lambda w: torch.zeros_like(hidden_states, dtype=w.dtype))
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    token_ids = perm // num_top_k
    gates = top_k_weights.reshape(-1)[perm]
    act, out = run_experts(experts, hidden_states[token_ids], expert_ids)
    if sink is not None:
        sink(expert_ids, token_ids, gates, act, out, top_k_index, hidden_states)
    weighted = out * gates.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inverse]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def patch_forward(experts: nn.Module, sink: RoutedSink | None, owner: str = "calibration") -> Callable[[], None]:
    """Route `experts` through `routed_forward` with `sink`; returns a function that undoes it
    (`owner`: whose patch it is, `adapters.forward_patches`)."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(experts, hidden_states, top_k_index, top_k_weights, sink)

    return owned_patch(experts, forward, owner)  # over a novice / dynamic-skip forward, restored after


def _standin_routed_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    mapped: torch.Tensor,
    top_k_weights: torch.Tensor,
    sink: RoutedSink | None,
    standins: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`routed_forward` of a layer whose picks are expert slots (>= 0) or stand-ins (< 0: MoNE
    novices, identity experts): slots through the experts (and the sink), stand-ins as
    `standins(their gates [T, k], 0 elsewhere) -> [T, H]`."""
    num_top_k = mapped.size(-1)
    standin = mapped < 0
    real = torch.nonzero(~standin.reshape(-1)).squeeze(1)
    expert_ids, order = torch.sort(mapped.reshape(-1)[real])
    perm = real[order]
    token_ids = perm // num_top_k
    gates = top_k_weights.reshape(-1)[perm]
    act, out = run_experts(experts, hidden_states[token_ids], expert_ids)
    if sink is not None:
        sink(expert_ids, token_ids, gates, act, out, mapped.masked_fill(standin, -1), hidden_states)
    result = torch.zeros(hidden_states.shape[0], out.shape[-1], dtype=out.dtype, device=out.device)
    result.index_add_(0, token_ids, out * gates.unsqueeze(-1).to(out.dtype))
    result += standins(top_k_weights.masked_fill(~standin, 0).to(out.dtype))
    return result.to(hidden_states.dtype)
