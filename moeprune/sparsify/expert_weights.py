"""Expert linears of a fused experts module as ordinary [out, in] weights, in every layout.

Fused experts store gate/up as [E, 2I, H] (or transposed [E, H, 2I], concatenated or interleaved)
and down as [E, H, I] (or [E, I, H]). Pruning treats each expert's gate, up and down projections as
`nn.Linear`-shaped matrices: gate/up [E, I, H] take the hidden state as input, down [E, H, I] takes
the activation. `ExpertLayout` converts both ways, so gpt-oss (transposed, interleaved, biases)
works like Mixtral. Biases are never pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.adapters.layout import ExpertLayout

GATE_UP_INPUT = ("gate", "up")  # linears whose input is the hidden state


def read_expert_linears(experts: nn.Module) -> dict[str, torch.Tensor]:
    """{"gate", "up", "down"} (no "gate" for ungated experts) as [E, out, in] tensors (views)."""
    layout = ExpertLayout.of(experts)
    result: dict[str, torch.Tensor] = {}
    if layout.has_gate:
        result["gate"], result["up"] = layout.split_gate_up(experts.gate_up_proj.data)
    else:
        up = experts.up_proj.data
        result["up"] = up.transpose(-2, -1) if layout.is_transposed else up
    result["down"] = layout.down_canonical(experts.down_proj.data)
    return result


@torch.no_grad()
def write_expert_linears(experts: nn.Module, linears: dict[str, torch.Tensor]) -> None:
    """Store [E, out, in] tensors (as returned by `read_expert_linears`) back into the module."""
    layout = ExpertLayout.of(experts)
    if layout.has_gate:
        fused = layout.join_gate_up(linears["gate"], linears["up"])
        experts.gate_up_proj.data.copy_(fused.to(experts.gate_up_proj.dtype))
    else:
        up = linears["up"]
        up = up.transpose(-2, -1).contiguous() if layout.is_transposed else up
        experts.up_proj.data.copy_(up.to(experts.up_proj.dtype))
    experts.down_proj.data.copy_(layout.down_storage(linears["down"]).to(experts.down_proj.dtype))


def expert_tensor_names(experts: nn.Module) -> list[str]:
    """Names of the fused weight parameters pruning touches (biases excluded)."""
    return (["gate_up_proj"] if getattr(experts, "has_gate", True) else ["up_proj"]) + ["down_proj"]
