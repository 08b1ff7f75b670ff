"""MoE-Slimming's expert attribution and layer loss, in closed form during the forward pass.

MoE-Slimming (methods-2026.md section 4) scales every routed expert's output by alpha = 0.9 in a
copy of the decoder block, takes the relative-L2 loss L = sum_t ||y^_t - y_t||^2 / ||y_t||^2
against the block's original output y, and backpropagates. Because the block output is linear in
the expert outputs, y^_t - y_t = (alpha - 1) m_t with m_t = sum_e g_{t,e} z_{t,e} the routed MoE
output, and every quantity has a closed form that needs no backward pass:

    dL/dz_{t,e} . z_{t,e} = 2 alpha (alpha - 1) g_{t,e} <m_t, z_{t,e}> / ||y_t||^2
    a_e  = -u_e * mean over e's routed tokens of that     (u_e = N_e / N)
    L_l  = (1 - alpha)^2 * mean_t ||m_t||^2 / ||y_t||^2

We accumulate `attr_sum` [E] = sum over routed (t, e) of g <m_t, z> / ||y_t||^2 and
`layer_loss_sum` [] = sum_t ||m_t||^2 / ||y_t||^2; the alpha factors are constants per layer and are
applied by the strategy. Deviations from the reference: the per-channel 99th-percentile clipping
before the mean ("clipmean") is not applied (a quantile is not a mergeable one-pass sum); the
EMA over batches is a plain mean; y is the decoder layer's output (residual stream), which is what
makes L_l differ between layers. Shared experts are not scaled (they are not pruned).

The experts sink hands over each batch's routed rows (from which m_t follows); the decoder layer's
forward hook then knows y_t and completes the sums.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.adapters.discovery import is_list_item


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class AttributionCollector:
    """Per-layer state between the experts sink and the decoder layer's forward hook."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self._pending: tuple[torch.Tensor, ...] | None = None

    def record_routed(self, expert_ids: torch.Tensor, token_ids: torch.Tensor, gated: torch.Tensor,
                      valid: torch.Tensor) -> None:
        """Routed rows of valid tokens: expert ids, token ids, g * z [S, H]; `valid` [N] tokens."""
        m = torch.zeros(valid.shape[0], gated.shape[-1], dtype=gated.dtype, device=gated.device)
        m.index_add_(0, token_ids, gated)  # routed MoE output m_t (shared experts excluded)
        dots = (m[token_ids] * gated).sum(-1)
        self._pending = (expert_ids, token_ids, dots, (m * m).sum(-1), valid)

    def layer_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._pending is None:
            return None
        ids, tok, dots, m_sq, valid = self._pending
        self._pending = None
        y = _first(output).detach().float()
        y_sq = (y.reshape(-1, y.shape[-1]) ** 2).sum(-1).double().clamp_min(1e-30)
        if y_sq.shape[0] != valid.shape[0]:
            return None
        t = self.tensors
        t["attr_sum"].index_add_(0, ids.cpu(), (dots.double() / y_sq[tok]).cpu())
        t["layer_loss_sum"] += (m_sq.double() / y_sq)[valid].sum().cpu()
        return None


def decoder_layer_of(model: nn.Module, block_name: str) -> nn.Module | None:
    """The module that contains the MoE block (the decoder layer), or None at the top level; the
    block itself where it is the decoder layer (an item of a module list: Gemma-4)."""
    if "." not in block_name:
        return None
    if is_list_item(block_name):
        return model.get_submodule(block_name)
    return model.get_submodule(block_name.rsplit(".", 1)[0])
