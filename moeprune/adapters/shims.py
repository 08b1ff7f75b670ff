"""Make MoE families whose experts transformers does not decorate look like the decorated ones.

Discovery, calibration, surgery and merging read transformers v5's fused-experts contract: an
experts module with `has_gate`/`is_transposed`/... flags, 3-D `gate_up_proj`/`down_proj`, called
as `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. A few families store their
experts fused but are not decorated and call them differently. For those, `install_shims`
re-classes the instances (once; `state_dict()` keeps the stock names and shapes, so
`save_pretrained` writes the stock layout and plain `from_pretrained` reloads it) to subclasses that
follow the contract and compute the same function:

* Llama4 (`Llama4TextMoe`): experts `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]` are the
  transposed layout. The stock block runs every expert on every token with the input scaled by the
  sigmoid gate (zero for unselected experts, whose output is then zero: no biases). The shimmed
  block runs only the selected (token, expert) pairs, still scaling the input, and calls the experts
  with gates of 1: the observer therefore sees gates of 1 and outputs that already carry the gate.
  The router is marked `scoring_func = "sigmoid"`.

* DBRX (`DbrxFFN`): the experts are flat `mlp.w1`/`mlp.v1`/`mlp.w2 [E*I, H]` matrices. The shim
  re-parameterises them as `gate_up_proj [E, 2I, H]` (w1 | v1) and `down_proj [E, H, I]` (w2
  transposed), with state-dict hooks that translate back to (and from) the stock names and shapes,
  so `state_dict()`/`save_pretrained` still write `mlp.w1/v1/w2`. Its router gets `top_k` and
  `norm_topk_prob` (`moe_normalize_expert_weights` set: renormalised, by a p-norm: exact for the
  default p = 1) from the FFN config. The streamed (`--offload`) paths read it too: `STOCK_SOURCES`
  says which checkpoint tensors feed which shimmed parameter and `io.lazy_reader.KeyMap` converts
  them as the load hook does; written layers go back through the state-dict hook.

* JetMoE (`JetMoeMoE`): the MLP experts' `input_linear.weight [E, 2I, H]` (gate half first) and
  `output_linear.weight [E, H, I]` become a new v5 experts module holding the same Parameters, with
  state-dict hooks back to the stock names; the 5-output gate runs as is and the block selects top-k
  from its logits (softmax over the k: `norm_topk_prob`). Its attention experts are not touched.
  `num_local_experts` also sizes them, so `SHARED_EXPERT_COUNT` makes a pruned JetMoE keep the count
  and record per-layer counts (module layout, reloaded by `load_pruned`).

* LongCat-Flash (`LongcatFlashMoE`): zero-compute (identity) experts share the router with the real
  ones; `adapters/longcat.py` shims its experts module (see there).

Families that store experts some other way are refused by discovery with one line
(`UNSUPPORTED_FAMILIES` by model type, `UNSUPPORTED_BLOCKS` by MoE block class: Doge's product-key
CDMoE). `moeprune.testing.family_survey` checks every MoE family of the installed transformers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# model_type -> the config count that also sizes something else than the routed MLP experts: a pruned
# checkpoint keeps it and records its per-layer counts instead (module layout, `load_pruned` reloads it)
SHARED_EXPERT_COUNT = {"jetmoe": "num_local_experts also sizes JetMoE's attention experts"}


def expert_count_shared(config) -> bool:
    """True when `config`'s expert count is shared with modules moeprune does not prune (JetMoE)."""
    return getattr(config, "model_type", None) in SHARED_EXPERT_COUNT


# model_type -> why moeprune cannot prune it yet (one line, shown by discovery); none at present
UNSUPPORTED_FAMILIES: dict[str, str] = {}
# MoE block class -> why moeprune refuses the model that holds one
UNSUPPORTED_BLOCKS: dict[str, str] = {
    "DogeCDMoE": "Doge's CDMoE routes by product keys over a num_keys x num_keys grid of single-neuron experts "
                 "(embedding rows); removing experts would break the key grid, so moeprune does not prune it",
}


def _llama4_moe_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Llama4TextMoe.forward` on the selected (token, expert) pairs only, through the v5 contract."""
    hidden = hidden_states.reshape(-1, self.hidden_dim)
    scores, logits = self.router(hidden)
    index = torch.topk(logits, self.router.top_k, dim=1).indices  # the router's own selection
    gates = scores.gather(1, index)  # sigmoid of the selected logits, as the stock block applies them
    tokens, k = index.shape
    scaled = (hidden.unsqueeze(1) * gates.unsqueeze(-1)).reshape(tokens * k, -1)
    ones = torch.ones(tokens * k, 1, dtype=scaled.dtype, device=scaled.device)
    routed = self.experts(scaled, index.reshape(-1, 1), ones).view(tokens, k, -1).sum(dim=1)
    out = self.shared_expert(hidden)
    out.add_(routed)
    return out, logits


_CLASSES: dict[type, type] = {}


def _subclass(cls: type, namespace: dict) -> type:
    """A cached subclass of `cls` with the same name, marked as shimmed."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {**namespace, "_moeprune_shim": True, "__module__": cls.__module__})
    return _CLASSES[cls]


def _shim_llama4(block: nn.Module) -> None:
    from transformers.integrations.moe import _default_apply_gate, grouped_mm_experts_forward

    experts = block.experts
    experts.__class__ = _subclass(type(experts), {
        "forward": grouped_mm_experts_forward, "_apply_gate": _default_apply_gate, "has_gate": True,
        "has_bias": False, "is_transposed": True, "is_concatenated": True, "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    })
    block.__class__ = _subclass(type(block), {"forward": _llama4_moe_forward})
    block.router.scoring_func = "sigmoid"


def _dbrx_ffn_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`DbrxFFN.forward` with the experts called on [T, H] rows (the v5 contract)."""
    shape = hidden_states.shape
    weights, index = self.route_tokens_to_experts(self.router(hidden_states))
    return self.experts(hidden_states.reshape(-1, shape[-1]), index, weights).view(shape)


def _dbrx_to_stock(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: gate_up_proj/down_proj -> the stock mlp.w1/v1/w2 [E*I, H]."""
    gate_up, down = state.pop(prefix + "gate_up_proj", None), state.pop(prefix + "down_proj", None)
    if gate_up is None or down is None:
        return
    e, two_i, h = gate_up.shape
    state[prefix + "mlp.w1"] = gate_up[:, : two_i // 2].reshape(-1, h)
    state[prefix + "mlp.v1"] = gate_up[:, two_i // 2 :].reshape(-1, h)
    state[prefix + "mlp.w2"] = down.transpose(1, 2).reshape(-1, h)


def _dbrx_parts_from_stock(experts: nn.Module, stock: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"mlp.w1", "mlp.v1", "mlp.w2": stock tensor} (any complete subset) -> the shimmed parameters."""
    out = {}
    if "mlp.w1" in stock and "mlp.v1" in stock:
        w1, v1 = stock["mlp.w1"], stock["mlp.v1"]
        e, h = experts.num_experts, w1.shape[1]
        out["gate_up_proj"] = torch.cat([w1.view(e, -1, h), v1.view(e, -1, h)], dim=1)
    if "mlp.w2" in stock:
        w2 = stock["mlp.w2"]
        out["down_proj"] = w2.view(experts.num_experts, -1, w2.shape[1]).transpose(1, 2).contiguous()
    return out


def _dbrx_from_stock(experts: nn.Module, state: dict, prefix: str, *rest) -> None:
    """Load pre-hook: the stock mlp.w1/v1/w2 -> gate_up_proj/down_proj."""
    names = [prefix + f"mlp.{n}" for n in ("w1", "v1", "w2")]
    if not all(n in state for n in names):
        return
    stock = {n[len(prefix):]: state.pop(n) for n in names}
    state.update({prefix + k: v for k, v in _dbrx_parts_from_stock(experts, stock).items()})


def _shim_dbrx(block: nn.Module) -> None:
    from transformers.integrations.moe import _default_apply_gate, grouped_mm_experts_forward

    experts = block.experts
    mlp = experts.mlp
    e, i, h = experts.num_experts, experts.ffn_hidden_size, experts.hidden_size
    w1, v1, w2 = (getattr(mlp, n).detach() for n in ("w1", "v1", "w2"))
    grad = mlp.w1.requires_grad
    experts.__class__ = _subclass(type(experts), {
        "forward": grouped_mm_experts_forward, "_apply_gate": _default_apply_gate, "has_gate": True,
        "has_bias": False, "is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    })
    experts.act_fn = mlp.activation_fn
    del experts.mlp
    experts.gate_up_proj = nn.Parameter(torch.cat([w1.view(e, i, h), v1.view(e, i, h)], dim=1), requires_grad=grad)
    experts.down_proj = nn.Parameter(w2.view(e, i, h).transpose(1, 2).contiguous(), requires_grad=grad)
    experts._register_state_dict_hook(_dbrx_to_stock)
    experts._register_load_state_dict_pre_hook(_dbrx_from_stock, with_module=True)
    block.__class__ = _subclass(type(block), {"forward": _dbrx_ffn_forward})
    block.router.top_k = block.top_k
    block.router.norm_topk_prob = block.moe_normalize_expert_weights is not None


def _jetmoe_moe_forward(self: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """`JetMoeMoE.forward` through the v5 experts contract: the stock gate (top-k of the logits,
    softmax over those k), the experts on [T, H] rows, the block's output bias."""
    bsz, length, hidden = layer_input.shape
    x = layer_input.reshape(-1, hidden)
    logits = self.router(x)[4]  # the stock gate runs (and its hooks see its stock outputs)
    top_logits, index = logits.topk(self.router.top_k, dim=1)
    weights = torch.softmax(top_logits, dim=1).type_as(x)
    return self.experts(x, index, weights).view(bsz, length, hidden) + self.bias


_JETMOE_STOCK = {"input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj"}


def _jetmoe_to_stock(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: experts.gate_up_proj/down_proj -> the stock input_linear/output_linear.weight."""
    for stock, ours in _JETMOE_STOCK.items():
        if prefix + ours in state:
            state[prefix + stock] = state.pop(prefix + ours)


def _jetmoe_parts_from_stock(block: nn.Module, stock: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_JETMOE_STOCK[name]: tensor for name, tensor in stock.items()}


def _jetmoe_from_stock(block: nn.Module, state: dict, prefix: str, *rest) -> None:
    """Load pre-hook: the stock input_linear/output_linear.weight -> experts.gate_up_proj/down_proj."""
    for stock, ours in _JETMOE_STOCK.items():
        if prefix + stock in state:
            state[prefix + ours] = state.pop(prefix + stock)


class _JetMoeExperts(nn.Module):
    """The experts module the JetMoE shim builds (its methods come from `_subclass`)."""


def _shim_jetmoe(block: nn.Module) -> None:
    """JetMoE's MLP experts (`input_linear.weight [E, 2I, H]`, gate half first; `output_linear.weight
    [E, H, I]`) become one v5 experts module holding the same tensors; attention experts stay."""
    from transformers.integrations.moe import _default_apply_gate, grouped_mm_experts_forward

    gate_up, down = block.input_linear.weight, block.output_linear.weight
    experts = nn.Module()
    experts.__class__ = _subclass(_JetMoeExperts, {
        "forward": grouped_mm_experts_forward, "_apply_gate": _default_apply_gate, "has_gate": True,
        "has_bias": False, "is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    })
    experts.num_experts = gate_up.shape[0]
    experts.act_fn = block.activation
    experts.gate_up_proj, experts.down_proj = gate_up, down  # the same Parameters, no copy
    del block.input_linear, block.output_linear
    block.experts = experts
    block._register_state_dict_hook(_jetmoe_to_stock)
    block._register_load_state_dict_pre_hook(_jetmoe_from_stock, with_module=True)
    block.__class__ = _subclass(type(block), {"forward": _jetmoe_moe_forward})
    block.router.norm_topk_prob = True  # softmax over the top-k logits = softmax, then renormalised


def _shim_longcat(block: nn.Module) -> None:
    from moeprune.adapters.longcat import shim_longcat

    shim_longcat(block, _subclass)  # re-classes the block too (marks it shimmed: install_shims is idempotent)


def _shim_step3p7(block: nn.Module) -> None:
    """Step3p7's experts hold the v5 tensors (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) without
    the decorator's flags: give them the flags; its own loop forward and clamped `_apply_gate` stay."""
    experts = block.experts
    experts.__class__ = _subclass(type(experts), {
        "has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
        "has_post_expert_norm": False, "_is_expert_parallel": False,
    })
    block.__class__ = _subclass(type(block), {})


SHIMS: dict[str, Callable[[nn.Module], None]] = {"Llama4TextMoe": _shim_llama4, "DbrxFFN": _shim_dbrx,
                                                 "JetMoeMoE": _shim_jetmoe, "LongcatFlashMoE": _shim_longcat,
                                                 "Step3p7SparseMoeBlock": _shim_step3p7}
STOCK_KEYS_DIFFER = ("DbrxExperts", "JetMoeMoE")  # shimmed modules whose parameters are not the checkpoint's tensors
# For those: {checkpoint name under the module: the parameter it feeds}, and the conversion, which the
# streamed reader (`io.lazy_reader.KeyMap`) applies to the tensors of one parameter at a time.
STOCK_SOURCES: dict[str, dict[str, str]] = {
    "DbrxExperts": {"mlp.w1": "gate_up_proj", "mlp.v1": "gate_up_proj", "mlp.w2": "down_proj"},
    "JetMoeMoE": _JETMOE_STOCK}
FROM_STOCK: dict[str, Callable[[nn.Module, dict], dict]] = {"DbrxExperts": _dbrx_parts_from_stock,
                                                            "JetMoeMoE": _jetmoe_parts_from_stock}


def stock_source(model: nn.Module, key: str) -> tuple[str, str] | None:
    """(module name, parameter) that checkpoint tensor `key` feeds inside a shimmed module whose
    parameters are not the checkpoint's tensors; None for any other key."""
    for suffix in {s for sources in STOCK_SOURCES.values() for s in sources}:
        if key.endswith("." + suffix):
            prefix = key[: -len(suffix) - 1]
            try:
                module = model.get_submodule(prefix)
            except AttributeError:
                continue
            sources = STOCK_SOURCES.get(type(module).__name__) if getattr(type(module), "_moeprune_shim", False) else None
            if sources and suffix in sources:
                return prefix, sources[suffix]
    return None


def loaded_trims(model: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{parameter name: conversion} for shimmed parameters that are a part of the checkpoint tensor
    of the same name (LongCat's gate_up_proj holds the real experts' rows of the stock one); the
    streamed reader applies them to what it loads."""
    from moeprune.adapters.longcat import trim_gate_up

    out = {}
    for name, module in model.named_modules():
        if getattr(type(module), "_moeprune_shim", False) and type(module).__name__ == "LongcatFlashExperts":
            out[f"{name}.gate_up_proj"] = lambda value, m=module: trim_gate_up(m, value)
    return out


def from_stock(module: nn.Module, stock: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shimmed parameters of `module` from its stock tensors ({name under the module: tensor})."""
    return FROM_STOCK[type(module).__name__](module, stock)


def streamable(model: nn.Module) -> str | None:
    """None when the streamed paths can read `model`'s checkpoint key by key, else why not (every
    shimmed family with re-parameterised experts declares its stock sources, so: always None)."""
    for module in model.modules():
        name = type(module).__name__
        if getattr(type(module), "_moeprune_shim", False) and name in STOCK_KEYS_DIFFER and name not in STOCK_SOURCES:
            return (f"{name} is re-parameterised in memory (its checkpoint tensors are not its "
                    "parameters): --offload does not support this family yet; drop --offload")
    return None


def install_shims(model: nn.Module) -> int:
    """Shim every MoE block of a known undecorated family in `model` (idempotent); returns how many."""
    count = 0
    for module in model.modules():
        shim = SHIMS.get(type(module).__name__)
        if shim is not None and not getattr(type(module), "_moeprune_shim", False):
            shim(module)
            count += 1
    return count


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model`'s family cannot be pruned, when it is a known MoE family moeprune refuses."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        reason = UNSUPPORTED_FAMILIES.get(getattr(cfg, "model_type", None))
        if reason is not None:
            return reason
    for module in model.modules():
        reason = UNSUPPORTED_BLOCKS.get(type(module).__name__)
        if reason is not None:
            return reason
    return None


def per_expert_submodule(experts: nn.Module, num_experts: int) -> str | None:
    """Why an experts module cannot be pruned when a submodule of it holds per-expert parameters that
    moeprune does not know how to use (calibration would compute the experts without them); Ergo's
    per-expert post norm (`layout.per_expert_post_norm`) is known."""
    from moeprune.adapters.layout import per_expert_post_norm

    known = per_expert_post_norm(experts)  # sliced with the experts, applied by calibration
    for child_name, child in experts.named_children():
        if child is known:
            continue
        for name, param in child.named_parameters():
            if param.dim() >= 2 and param.shape[0] == num_experts:
                return (f"{type(experts).__name__} holds per-expert parameters in a submodule "
                        f"({child_name}.{name} {list(param.shape)}, {type(child).__name__}) that moeprune does not "
                        "prune yet")
    return None
