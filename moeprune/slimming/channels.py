"""Physical channel slimming of fused experts: keep chosen intermediate channels per expert.

A channel ("micro-expert") i of expert e is row i of gate, row i of up and column i of down (plus
the matching gate/up bias entries). `slim_experts` rebuilds the fused tensors of one experts module
in its own storage layout (through `ExpertLayout`: standard or transposed, concatenated or
interleaved gate/up, biases), keeping `keep[e]` channels of expert e in their original order.

Storage of different widths. Fused tensors hold one width per layer, so a layer whose experts keep
different numbers of channels is stored at its widest expert, rounded up to a multiple of ALIGN = 8
channels (transformers' grouped_mm kernel needs 16-byte strides); every narrower expert is padded with
zero channels (zero gate/up rows and bias entries, zero down columns), which contribute exactly 0
to the output. The config records the real widths, so the padding is visible and a kernel or a
later export can drop it:

- every expert of every layer has the same width W: the family's width key (`moe_intermediate_size`,
  or `intermediate_size` for Mixtral/OLMoE/gpt-oss) is set to W; the checkpoint is stock-loadable
  (unless other modules read the same key, see `_stock_compatible`: then as below);
- layers differ: `moeprune_intermediate_per_layer` {layer: stored width} and the width key keeps the
  original width (the rest of the model is built from it); loaded by `moeprune.load_pruned`
  (`resize_for_load`), stock loading fails loudly on the size mismatch;
- experts within a layer differ (or a width is padded to the alignment): also
  `moeprune_expert_widths` {layer: [real width per expert]}; padded zero channels are then stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeprune.adapters.layout import ExpertLayout
from moeprune.sparsify.expert_weights import read_expert_linears

LAYER_WIDTH_KEY = "moeprune_intermediate_per_layer"
EXPERT_WIDTH_KEY = "moeprune_expert_widths"
WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim")
ALIGN = 8  # grouped_mm needs 16-byte strides: stored widths are multiples of 8 channels (bf16 and fp32)


def stored_width(width: int) -> int:
    """The stored width for a real width: rounded up to a multiple of ALIGN (zero channels pad it)."""
    return -(-int(width) // ALIGN) * ALIGN


def width_key(config: Any) -> str:
    """The config key the routed experts read their width from."""
    return "moe_intermediate_size" if isinstance(getattr(config, "moe_intermediate_size", None), int) else "intermediate_size"


def _split_bias(layout: ExpertLayout, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = layout.intermediate_dim
    return (bias[:, :i], bias[:, i:]) if layout.is_concatenated else (bias[:, 0::2], bias[:, 1::2])


def _join_bias(layout: ExpertLayout, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if layout.is_concatenated:
        return torch.cat([gate, up], dim=1).contiguous()
    return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1]).contiguous()


def _gather_rows(w: torch.Tensor, keep: list[torch.Tensor], width: int) -> torch.Tensor:
    """[E, I, ...] -> [E, width, ...] with expert e's kept rows first, zero padding after."""
    out = w.new_zeros((w.shape[0], width) + tuple(w.shape[2:]))
    for e, idx in enumerate(keep):
        if idx.numel():
            out[e, : idx.numel()] = w[e].index_select(0, idx.to(w.device))
    return out


def _param(like: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def slim_experts(experts: nn.Module, keep: list[torch.Tensor]) -> list[int]:
    """Keep channels `keep[e]` (LongTensor, any order; stored ascending) of each expert e, in place.

    Returns the real width of every expert; the module's stored width is the largest of them."""
    layout = ExpertLayout.of(experts)
    if len(keep) != layout.num_experts:
        raise ValueError(f"need one channel set per expert ({layout.num_experts}), got {len(keep)}")
    keep = [torch.as_tensor(k, dtype=torch.long).unique(sorted=True) for k in keep]
    bad = [e for e, k in enumerate(keep) if k.numel() and (int(k.min()) < 0 or int(k.max()) >= layout.intermediate_dim)]
    if bad:
        raise ValueError(f"channel indices out of range 0..{layout.intermediate_dim - 1} for experts {bad}")
    widths = [int(k.numel()) for k in keep]
    if max(widths) == 0:
        raise ValueError("every expert would lose all its channels; keep at least one")
    width = stored_width(max(widths))
    lin = read_expert_linears(experts)
    down = _gather_rows(lin["down"].transpose(1, 2), keep, width).transpose(1, 2)  # [E, H, W]
    if layout.has_gate:
        gate, up = _gather_rows(lin["gate"], keep, width), _gather_rows(lin["up"], keep, width)
        experts.gate_up_proj = _param(experts.gate_up_proj, layout.join_gate_up(gate, up))
        if layout.has_bias and getattr(experts, "gate_up_proj_bias", None) is not None:
            gb, ub = _split_bias(layout, experts.gate_up_proj_bias.data)
            bias = _join_bias(layout, _gather_rows(gb, keep, width), _gather_rows(ub, keep, width))
            experts.gate_up_proj_bias = _param(experts.gate_up_proj_bias, bias)
    else:
        up = _gather_rows(lin["up"], keep, width)
        experts.up_proj = _param(experts.up_proj, up.transpose(-2, -1) if layout.is_transposed else up)
        if layout.has_bias and getattr(experts, "up_proj_bias", None) is not None:
            experts.up_proj_bias = _param(experts.up_proj_bias, _gather_rows(experts.up_proj_bias.data, keep, width))
    experts.down_proj = _param(experts.down_proj, layout.down_storage(down))
    for attr in WIDTH_ATTRS:
        if getattr(experts, attr, None) == layout.intermediate_dim:
            setattr(experts, attr, width)
    return widths


def record_widths(model: nn.Module, widths: dict[int, list[int]]) -> dict[str, Any]:
    """Write real widths into the config(s) (see the module docstring); returns what was written."""
    stored = {i: stored_width(max(w)) for i, w in widths.items()}
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    key = width_key(text)
    per_layer = len(set(stored.values())) > 1
    per_expert = any(len(set(w)) > 1 or w[0] != stored[i] for i, w in widths.items())
    stock = not per_layer and _stock_compatible(model, key, max(stored.values()))
    for config in configs:
        if stock:
            setattr(config, key, max(stored.values()))
        for name, value, on in ((LAYER_WIDTH_KEY, {str(i): n for i, n in sorted(stored.items())}, not stock),
                                (EXPERT_WIDTH_KEY, {str(i): w for i, w in sorted(widths.items())}, per_expert)):
            if on:
                setattr(config, name, value)
            elif hasattr(config, name):
                delattr(config, name)
    return {"key": key, "width": max(stored.values()), "per_layer": per_layer, "per_expert": per_expert,
            "stock_loadable": stock}


def _stock_compatible(model: nn.Module, key: str, width: int) -> bool:
    """Whether a model built from the config with `key` = `width` has exactly this model's parameter
    shapes. Not so when other modules read the same key: DeepSeek-V2/V3 and GLM-4.5 size their shared
    experts as moe_intermediate_size x n_shared_experts, so their slimmed checkpoints keep the key and
    load through `load_pruned` (the per-layer table) instead."""
    import copy

    from accelerate import init_empty_weights
    from moeprune.io.auto_class import auto_model_class

    if getattr(model.config, "moeprune_experts_per_layer", None):
        return False  # expert counts differ by layer: load_pruned builds it, so keep the key and use the table
    config = copy.deepcopy(model.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    setattr(text, key, width)
    if text is not config:
        setattr(config, key, width)
    try:
        with init_empty_weights():
            fresh = auto_model_class(config).from_config(config)
    except Exception:  # noqa: BLE001 - a config the auto classes cannot build: use moeprune's loader
        return False
    have = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    built = {n: tuple(p.shape) for n, p in fresh.named_parameters(remove_duplicate=False)}
    tied = {"lm_head.weight"}  # listed or not depending on whether the embeddings are tied yet
    return {k: v for k, v in have.items() if k not in tied} == {k: v for k, v in built.items() if k not in tied}


def needs_custom_load(config: Any) -> bool:
    return bool(getattr(config, LAYER_WIDTH_KEY, None))


def resize_for_load(model: nn.Module, config: Any) -> None:
    """Give a freshly built (meta) model the stored widths of each layer, before loading weights."""
    from moeprune.adapters import find_moe_layers

    widths = {int(k): int(v) for k, v in (getattr(config, LAYER_WIDTH_KEY, None) or {}).items()}
    for layer in find_moe_layers(model):
        w = widths.get(layer.layer)
        if w is None or w == layer.layout.intermediate_dim:
            continue
        experts, layout = layer.experts, layer.layout
        for name, shape in _shapes(layout, w).items():
            param = getattr(experts, name, None)
            if isinstance(param, nn.Parameter):
                setattr(experts, name, nn.Parameter(torch.empty(shape, dtype=param.dtype, device=param.device),
                                                    requires_grad=param.requires_grad))
        for attr in WIDTH_ATTRS:
            if getattr(experts, attr, None) == layout.intermediate_dim:
                setattr(experts, attr, w)


def _shapes(layout: ExpertLayout, w: int) -> dict[str, tuple[int, ...]]:
    """Storage shapes of an experts module of `layout` at width `w`."""
    e, h = layout.num_experts, layout.hidden_dim
    first = 2 * w if layout.has_gate else w
    name = "gate_up_proj" if layout.has_gate else "up_proj"
    shapes = {name: (e, h, first) if layout.is_transposed else (e, first, h),
              "down_proj": (e, w, h) if layout.is_transposed else (e, h, w)}
    if layout.has_bias:
        shapes[name + "_bias"] = (e, first)
    return shapes
