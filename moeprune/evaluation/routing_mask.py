"""Temporarily remove experts from routing, without touching any weight.

Masking an expert's router logit with -inf is the reference semantics of pruning it: the pruned
model (expert and router row sliced out) must route and compute exactly like the original with that
expert masked. This module is the ONE place that implements that mask, so the model card, tests and
evaluation of strategies all measure the same thing.

The mask is family-agnostic: it does not re-implement any routing. While a masked router runs its
own forward, a `TorchFunctionMode` sets the dropped columns of the linear output made from the
router's weight to -inf, and the dropped entries of a selection-only correction bias
(`e_score_correction_bias`, which would otherwise still pick a masked expert at weight 0) are -inf
too (and of `expert_bias` / `balancing_biases`, `adapters.layout.SELECTION_BIAS_NAMES`). The router's own softmax / sigmoid / top-k / renormalisation then routes as if the experts were
gone, for every family whose router computes its logits with `F.linear` (nn.Linear included); a
router that does not is refused when it first runs. Group-limited routers (DeepSeek-V3, GLM-4.5)
are masked too, but their pruned models regroup, so the mask is not their pruning reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """Map decoder-layer index -> router module (the adapters' MoE-layer discovery)."""
    from moeprune.adapters import find_moe_layers

    return {layer.layer: layer.router for layer in find_moe_layers(model)}


_CONVERSIONS = frozenset({torch.Tensor.float, torch.Tensor.to, torch.Tensor.type, torch.Tensor.double,
                          torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.contiguous})


class _MaskLinearOutput(TorchFunctionMode):
    """Inside one router's forward: -inf in the dropped columns of `F.linear(x, weight)`, `weight`
    being the router's logit weight or a conversion of it (`self.weight.float()` in a bf16 model)."""

    def __init__(self, weights: Sequence[torch.Tensor], columns: Sequence[int],
                 record: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.record = record
        self.ids = {id(w) for w in weights}
        self.derived: list[torch.Tensor] = []  # conversions of the weight, alive while the router runs
        self.columns = list(columns)
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _CONVERSIONS and args and id(args[0]) in self.ids and isinstance(out, torch.Tensor):
            self.derived.append(out)
            self.ids.add(id(out))
        elif func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self.ids:
            out = out.clone()
            out[..., self.columns] = float("-inf")
            self.hits += 1
            if self.record is not None:
                self.record.append(out.detach())
        return out


def _mask_router(router: nn.Module, num_experts: int, columns: list[int], record: list | None = None) -> list:
    """Hooks that run `router`'s forward under the mask; returns the handles."""
    from moeprune.adapters.layout import router_scoring_weights

    weights = router_scoring_weights(router, num_experts)
    state: dict[str, _MaskLinearOutput] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        state["mode"] = _MaskLinearOutput(weights, columns, record).__enter__()

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        mode = state.pop("mode")
        mode.__exit__(None, None, None)
        if mode.hits == 0:
            raise TypeError(f"{type(module).__name__} computes its logits without F.linear on its weight; "
                            "mask_experts cannot mask it")

    return [router.register_forward_pre_hook(enter), router.register_forward_hook(leave)]


def _mask_selection_bias(layer, columns: list[int]) -> list[tuple]:
    """Set the dropped entries of the layer's selection biases (router or block) to -inf; returns
    (tensor, original) pairs to restore."""
    from moeprune.adapters.layout import SELECTION_BIAS_NAMES

    saved = []
    tensors = [*layer.router.named_parameters(), *layer.router.named_buffers(),
               *layer.block.named_parameters(recurse=False), *layer.block.named_buffers(recurse=False)]
    for name, tensor in tensors:
        if name.rsplit(".", 1)[-1] in SELECTION_BIAS_NAMES and tensor.shape[-1] >= layer.num_experts:
            saved.append((tensor, tensor.detach().clone()))
            with torch.no_grad():
                tensor[..., columns] = float("-inf")
    return saved


@contextlib.contextmanager
def mask_experts(model: nn.Module, dropped: Mapping[int, Sequence[int]],
                 record: dict[int, list[torch.Tensor]] | None = None) -> Iterator[nn.Module]:
    """Context manager: route ``model`` as if experts ``dropped[layer]`` were pruned.

    Args:
        model: a transformers MoE causal LM (or its base model).
        dropped: layer index → expert indices to exclude. Layers not listed are untouched.
        record: if given, filled with layer index → the masked router logits of every call.

    Raises:
        ValueError: a listed layer has no router, an index is out of range, or fewer than
            ``top_k`` experts would remain.
    """
    from moeprune.adapters import find_moe_layers

    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    handles, saved = [], []
    try:
        for index, experts in dropped.items():
            if index not in layers:
                raise ValueError(f"layer {index} has no supported router (found {sorted(layers)})")
            layer = layers[index]
            n_experts = layer.num_experts
            experts = sorted(set(int(e) for e in experts))
            if experts and (experts[0] < 0 or experts[-1] >= n_experts):
                raise ValueError(f"layer {index}: expert index out of range 0..{n_experts - 1}: {experts}")
            top_k = layer.routing.top_k
            if n_experts - len(experts) < top_k:
                raise ValueError(
                    f"layer {index}: dropping {len(experts)} of {n_experts} experts leaves fewer than "
                    f"top_k={top_k}; drop fewer experts"
                )
            if not experts:
                continue
            handles += _mask_router(layer.router, n_experts, experts,
                                    None if record is None else record.setdefault(index, []))
            saved += _mask_selection_bias(layer, experts)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)
