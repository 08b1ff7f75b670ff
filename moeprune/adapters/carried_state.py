"""Families whose decoder layers hand the next layer more than the hidden states.

ZAYA's router adds the previous layer's router hidden states to its own (`prev_router_hidden_states`,
returned by each decoder layer and passed to the next as its second positional argument). The layer
runner carries that state between layers like the hidden states (`engine.runner`); a pass that
refits one MoE block on its cached inputs alone cannot, because the block's router reads that state
and writes the next one (`refuse_block_fits`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class CarriedState:
    """A decoder layer's extra output that the next layer takes as a call argument. In a captured
    call it stands in for that argument; the runner hands each layer its predecessor's output there
    (None into the first layer, as the model's own loop does)."""

    output: int  # position in the layer's return tuple
    argument: int  # position among the layer's positional arguments after the hidden states
    what: str  # what the state is, for messages


# model_type -> the state its decoder layers hand to the next one besides the hidden states
CARRIED_STATE = {"zaya": CarriedState(output=1, argument=0, what="router hidden states (prev_router_hidden_states)")}


def carried_state(model: nn.Module) -> CarriedState | None:
    """The state `model`'s decoder layers carry to the next layer, if its family has one."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return CARRIED_STATE.get(getattr(text, "model_type", None)) or CARRIED_STATE.get(getattr(config, "model_type", None))


def refuse_block_fits(model: nn.Module, what: str) -> None:
    """One-line ValueError where pass `what` (a per-block refit on cached block inputs, e.g.
    --router-kd-local) cannot run: experts inside the decoder layer, or a router that carries state."""
    from moeprune.adapters.discovery import find_moe_layers

    carried = carried_state(model)
    if carried is not None:
        raise ValueError(f"{what} refits each MoE block on its cached inputs, but this family's routers also read and "
                         f"hand on {carried.what} across layers; use --router-kd instead")
    for layer in find_moe_layers(model):
        layer.refuse_block_output(what)
