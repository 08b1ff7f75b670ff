"""LongCat-Flash's experts on the v5 experts contract, its zero-compute experts kept apart.

LongCat-Flash (`LongcatFlashMoE`) routes every token to top-k of E + Z router columns: the first E
are real experts, the last Z "zero experts" return the token itself (times its gate). Two layouts
ship: up to transformers 5.24 the experts module stores `gate_up_proj [E + Z, 2I, H]` (the last Z
rows are never read), `down_proj [E, H, I]` and the counts, and handles the identity picks itself;
from 5.25 it is a decorated v5 experts module with E rows, and the block remaps identity picks to
real experts with gate 0 and adds gate x token itself.

The shim brings both onto one form, so that the rest of moeprune sees E real experts:
`gate_up_proj` holds the first E rows (a view, no copy), `num_experts = E`, and `zero_expert_num = Z`
on the experts (`adapters.layout.identity_experts`) tells discovery, calibration and surgery that the
router has Z more columns after the real ones. The block passes the router's picks to the experts
as they are (no gate-0 stand-in picks reach calibration); the experts' forward runs the real picks
through transformers' grouped_mm forward (identity picks are its expert-parallel sentinels: indices
>= E, no compute, zero output) and adds gate x token for the identity picks.

The router is softmax with a correction bias (marked `moeprune_scoring = "softmax"`). Pruning keeps
the kept experts' router rows and every identity row (`surgery.slice_layer`), and the config's
`n_routed_experts`; `zero_expert_num` is unchanged.

The state dict keeps the installed transformers' names and shapes: with the padded layout its hook
writes `gate_up_proj` back with Z rows of zeros after the real experts (the stock forward never
reads them, so `from_pretrained` reloads the same function; the junk values the stock module held
there are not kept), and the streamed reader trims a checkpoint's `gate_up_proj` to the real rows
(`trim_gate_up`; a no-op on the unpadded layout).
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.adapters.layout import IDENTITY_EXPERTS_ATTR


def _experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Real picks through grouped_mm (identity picks are sentinels there), plus gate x token."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    identity = top_k_index >= self.gate_up_proj.shape[0]
    # zero gates at the sentinels too: transformers 5.24 masks them itself, 5.25 only masks their rows
    routed = grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights.masked_fill(identity, 0))
    gates = top_k_weights.masked_fill(~identity, 0).sum(dim=1, keepdim=True)
    return (routed + gates.to(routed.dtype) * hidden_states).to(hidden_states.dtype)


def _block_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`LongcatFlashMoE.forward` with the router's picks passed on as they are: the shimmed experts
    handle the identity picks (the same function as both stock layouts' blocks)."""
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    _, weights, index = self.router(flat)
    return self.experts(flat, index, weights).reshape(shape)


def _pad_gate_up(gate_up: torch.Tensor, zero: int) -> torch.Tensor:
    pad = torch.zeros(zero, *gate_up.shape[1:], dtype=gate_up.dtype, device=gate_up.device)
    return torch.cat([gate_up, pad], dim=0)


def _to_stock(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: gate_up_proj [E, 2I, H] -> the stock [E + Z, 2I, H] (zero rows appended)."""
    key = prefix + "gate_up_proj"
    if key in state:
        state[key] = _pad_gate_up(state[key], getattr(module, IDENTITY_EXPERTS_ATTR))  # padded layout only


def _from_stock(module: nn.Module, state: dict, prefix: str, *rest) -> None:
    """Load pre-hook: a stock gate_up_proj [E + Z, 2I, H] -> its first E rows."""
    key = prefix + "gate_up_proj"
    if key in state:
        state[key] = trim_gate_up(module, state[key])


def trim_gate_up(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The real experts' rows of a stock `gate_up_proj` (unchanged when it has no identity rows)."""
    real = experts.num_experts
    if gate_up.shape[0] == real + getattr(experts, IDENTITY_EXPERTS_ATTR):
        return gate_up[:real]
    return gate_up


def shim_longcat(block: nn.Module, subclass) -> None:
    """Re-class `block` (a `LongcatFlashMoE`) and its experts to the v5 contract; mark its router."""
    from transformers.integrations.moe import _default_apply_gate

    experts = block.experts
    padded = hasattr(experts, "num_routed_experts")  # transformers <= 5.24: counts and E + Z rows on the experts
    if padded:
        real, zero = int(experts.num_routed_experts), int(experts.zero_expert_num)
    else:
        real, zero = int(experts.num_experts), int(getattr(block, "zero_expert_num", 0) or 0)
    for stale in ("num_routed_experts", "total_experts"):  # the subclasses compute them
        experts.__dict__.pop(stale, None)
        block.__dict__.pop(stale, None)
    experts.__class__ = subclass(type(experts), {
        "forward": _experts_forward, "_apply_gate": _default_apply_gate, "has_gate": True, "has_bias": False,
        "is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False,
        "_is_expert_parallel": True,  # grouped_mm's sentinel handling: indices >= E cost nothing, give 0
        "num_routed_experts": property(lambda self: int(self.gate_up_proj.shape[0])),
        "total_experts": property(lambda self: int(self.gate_up_proj.shape[0]) + getattr(self, IDENTITY_EXPERTS_ATTR)),
    })
    experts.num_experts = real
    experts._is_expert_parallel = True  # the 5.25 decorator sets False on the instance, over the class's
    setattr(experts, IDENTITY_EXPERTS_ATTR, zero)
    if experts.gate_up_proj is not None and padded:
        stock = experts.gate_up_proj
        experts.gate_up_proj = nn.Parameter(stock.detach()[:real], requires_grad=stock.requires_grad)
        experts._register_state_dict_hook(_to_stock)
        experts._register_load_state_dict_pre_hook(_from_stock, with_module=True)
    block.__class__ = subclass(type(block), {
        "forward": _block_forward, "num_routed_experts": property(lambda self: int(self.experts.num_experts))})
    block.router.moeprune_scoring = "softmax"  # softmax with a correction bias (not DeepSeek-V3's sigmoid)
