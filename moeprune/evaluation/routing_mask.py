"""Temporarily remove experts from routing, without touching any weight.

Masking an expert's router logit with -inf is the reference semantics of pruning it: the pruned
model (expert and router row sliced out) must route and compute exactly like the original with that
expert masked. This module is the ONE place that implements that mask, so the model card, tests and
evaluation of strategies all measure the same thing.

Supported routers return ``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`` and
route with softmax → top-k → optional renormalisation (``norm_topk_prob``): Qwen2/3-MoE, OLMoE,
Mixtral-style routers in transformers 5.x. A forward hook on each router recomputes the selection
with the dropped experts' logits set to -inf and *returns* the new tuple, replacing the router output.
Llama4's router (marked `scoring_func = "sigmoid"` by the adapters' shim) returns
``(scores [T, E], router_logits [T, E])``: top-k on the logits, sigmoid of the selected ones, 0
elsewhere; its hook redoes that selection on the masked logits (`masked_sigmoid_scores`). Routers
that return the logits alone (DBRX) get them back masked; their block selects from those.
LongCat-Flash's router (softmax with a correction bias over real and identity columns, marked
`moeprune_scoring = "softmax"` by its shim) is redone the same way (`masked_corrected_routing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn



def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Map decoder-layer index -> router module (the adapters' MoE-layer discovery)."""
    from moeprune.adapters import find_moe_layers

    return {layer.layer: layer.router for layer in find_moe_layers(model)}


def masked_routing(
    logits: torch.Tensor, dropped: Sequence[int], top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax/top-k routing with ``dropped`` experts excluded; returns (logits, weights, index)."""
    masked = logits.clone()
    if len(dropped):
        masked[:, list(dropped)] = float("-inf")
    probs = torch.softmax(masked, dim=-1, dtype=torch.float)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return masked, weights.to(logits.dtype), index


def masked_sigmoid_scores(
    logits: torch.Tensor, dropped: Sequence[int], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4 routing with ``dropped`` experts excluded; returns (scores, masked logits)."""
    masked = logits.clone()
    if len(dropped):
        masked[:, list(dropped)] = float("-inf")
    values, index = torch.topk(masked, top_k, dim=1)
    scores = torch.full_like(masked, float("-inf")).scatter_(1, index, values)
    return torch.sigmoid(scores.float()).to(scores.dtype), masked


def masked_corrected_routing(
    router: nn.Module, logits: torch.Tensor, dropped: Sequence[int], top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LongCat routing with ``dropped`` experts excluded: softmax over every column, top-k of
    softmax + correction bias, gates = softmax x routed_scaling_factor; returns (logits, weights, index)."""
    masked = logits.clone()
    masked[:, list(dropped)] = float("-inf")
    scores = masked.float().softmax(dim=-1)
    choice = scores + router.e_score_correction_bias.float().unsqueeze(0)
    choice[:, list(dropped)] = float("-inf")
    index = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, index) * router.routed_scaling_factor
    return masked, weights.to(logits.dtype), index


@contextlib.contextmanager
def mask_experts(model: nn.Module, dropped: Mapping[int, Sequence[int]]) -> Iterator[nn.Module]:
    """Context manager: route ``model`` as if experts ``dropped[layer]`` were pruned.

    Args:
        model: a transformers MoE causal LM (or its base model).
        dropped: layer index → expert indices to exclude. Layers not listed are untouched.

    Raises:
        ValueError: a listed layer has no router, an index is out of range, or fewer than
            ``top_k`` experts would remain.
    """
    from moeprune.adapters import find_moe_layers

    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    routers = {index: layer.router for index, layer in layers.items()}
    default_norm = bool(getattr(getattr(model, "config", None), "norm_topk_prob", True))
    handles = []
    try:
        for layer, experts in dropped.items():
            if layer not in routers:
                raise ValueError(f"layer {layer} has no supported router (found {sorted(routers)})")
            router = routers[layer]
            n_experts = layers[layer].num_experts
            experts = sorted(set(int(e) for e in experts))
            if experts and (experts[0] < 0 or experts[-1] >= n_experts):
                raise ValueError(f"layer {layer}: expert index out of range 0..{n_experts - 1}: {experts}")
            top_k = layers[layer].routing.top_k
            if n_experts - len(experts) < top_k:
                raise ValueError(
                    f"layer {layer}: dropping {len(experts)} of {n_experts} experts leaves fewer than "
                    f"top_k={top_k}; drop fewer experts"
                )
            if not experts:
                continue
            norm = bool(getattr(router, "norm_topk_prob", default_norm))
            handles.append(router.register_forward_hook(_make_hook(experts, top_k, norm)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(experts: list[int], top_k: int, norm: bool):
    def hook(module: nn.Module, args: tuple, output: object) -> tuple[torch.Tensor, ...]:
        if isinstance(output, torch.Tensor):  # logits only (DBRX): the block selects from the masked logits
            masked = output.clone()
            masked[..., experts] = float("-inf")
            return masked
        if isinstance(output, tuple) and len(output) == 5 and type(module).__name__ == "JetMoeTopKGating":
            masked = output[4].clone()  # the shimmed JetMoE block selects from these logits (adapters.shims)
            masked[..., experts] = float("-inf")
            return (*output[:4], masked)
        if isinstance(output, tuple) and len(output) == 2 and getattr(module, "scoring_func", None) == "sigmoid":
            return masked_sigmoid_scores(output[1], experts, top_k)
        if isinstance(output, tuple) and len(output) == 3 and getattr(module, "moeprune_scoring", None) == "softmax":
            return masked_corrected_routing(module, output[0], experts, top_k)
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(
                f"{type(module).__name__} does not return (logits, weights, index); "
                "mask_experts supports softmax top-k routers only"
            )
        return masked_routing(output[0], experts, top_k, norm)

    return hook
