"""In-memory expert surgery: make a loaded model match a Plan.

For each planned MoE layer: merge groups and novices are prepared first (their modules, when a plan
asks for them), then every parameter and buffer with one entry per expert is sliced to the kept
experts, in the plan's order (renumbered 0..E'-1): fused expert tensors and their biases, router
rows, router bias and `e_score_correction_bias`, 1 x E router statistics, block-level per-expert
biases. Cached expert counts are updated on the experts module, router, block and the causal-LM
head (gotchas G1, G2), and every expert-count key of the config (G3, G8). Layers may end with
different counts (non-uniform plans); the config then records them in `moeprune_experts_per_layer`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PretrainedConfig

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.adapters.layout import EXPERT_COUNT_ATTRS, expert_modules, router_extra_rows
from moeprune.adapters.shims import expert_count_shared
from moeprune.plan import LayerPlan, Plan, PlanError

logger = logging.getLogger(__name__)

PER_LAYER_KEY = "moeprune_experts_per_layer"
# cached router column counts (routed + extra rows): ZAYA's skip class, Inkling's shared-expert gates
ROUTER_COLUMN_ATTRS = ("num_router_classes", "n_total_experts")


def _slice_tensor(t: torch.Tensor, index: torch.Tensor, num_experts: int, allow_dim1: bool) -> torch.Tensor | None:
    if t.dim() >= 1 and t.shape[0] == num_experts:
        return t.detach().index_select(0, index.to(t.device)).clone()
    if allow_dim1 and t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == num_experts:
        return t.detach().index_select(1, index.to(t.device)).clone()
    return None


def slice_module(module: nn.Module, index: torch.Tensor, num_experts: int, allow_dim1: bool = False) -> None:
    """Slice `module`'s own per-expert parameters/buffers and update its cached counts."""
    new_count = int(index.numel())
    for name, param in list(module.named_parameters(recurse=False)):
        sliced = _slice_tensor(param, index, num_experts, allow_dim1)
        if sliced is not None:
            setattr(module, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        sliced = _slice_tensor(buf, index, num_experts, allow_dim1)
        if sliced is not None:
            module._buffers[name] = sliced
    for attr in EXPERT_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == num_experts:
            setattr(module, attr, new_count)
    if isinstance(module, nn.Linear) and module.out_features == num_experts:
        module.out_features = new_count


def slice_experts(experts: nn.Module, index: torch.Tensor, num_experts: int) -> None:
    """Slice the per-expert tensors of the experts module and of its per-expert output norm
    (`adapters.layout.expert_modules`: Ergo's)."""
    for module in expert_modules(experts):
        slice_module(module, index, num_experts)


def slice_layer(layer: MoELayer, kept: list[int]) -> None:
    """Keep experts `kept` (in that order) in one MoE layer. Router rows after the routed experts'
    (LongCat's identity experts, Inkling's shared-expert gates: `router_extra_rows`) are all kept,
    after the kept rows; router tensors with E rows are sliced to `kept`."""
    num_experts = layer.num_experts
    index = torch.tensor(kept, dtype=torch.long)
    slice_experts(layer.experts, index, num_experts)
    extra = router_extra_rows(layer.router, num_experts)
    rows = torch.cat([index, torch.arange(num_experts, num_experts + extra)])
    for sub in layer.router.modules():
        slice_module(sub, index, num_experts, allow_dim1=True)
        if extra:  # after the E-row pass: counts equal to E are the kept count by now
            slice_module(sub, rows, num_experts + extra, allow_dim1=True)
            for attr in ROUTER_COLUMN_ATTRS:
                if getattr(sub, attr, None) == num_experts + extra:
                    setattr(sub, attr, len(kept) + extra)
    slice_module(layer.block, index, num_experts)


def _prepare_layer(model: nn.Module, layer: MoELayer, lp: LayerPlan, params: dict | None = None) -> None:
    """Run the layer's operations that come before slicing, from the plan's structure alone
    (`LayerPlan`: merge groups, neuron recombination, novices). `params` is accepted for old
    callers and ignored: apply never reads strategy parameters."""
    if lp.merges:
        from moeprune.apply.merge import merge_groups

        merge_groups(layer, lp, align=bool(lp.merge_align), router=lp.merge_router or "representative")
    if lp.recombine_threshold is not None:
        from moeprune.apply.recombine import recombine_neurons

        recombine_neurons(layer, lp, float(lp.recombine_threshold))
    if lp.novices:  # slices the experts itself; the router keeps all rows (moeprune.apply.novice)
        from moeprune.apply.novice import install_novices

        install_novices(model, layer, lp, lp.novice_matrix())


def set_expert_count(model: nn.Module, counts: dict[int, int]) -> None:
    """Write the expert count(s) into the config(s) and the causal-LM head's cache."""
    values = set(counts.values())
    count = max(values)
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    for config in list(configs):  # sub-configs holding a count (DBRX: ffn_config.moe_num_experts)
        configs += [sub for sub in vars(config).values() if isinstance(sub, PretrainedConfig) and sub not in configs
                    and any(isinstance(getattr(sub, key, None), int) for key in EXPERT_COUNT_ATTRS)]
    shared = expert_count_shared(text)  # JetMoE: the count also sizes attention experts; keep it
    for config in configs:
        for key in EXPERT_COUNT_ATTRS:
            if isinstance(getattr(config, key, None), int) and not shared:
                setattr(config, key, count)
        if len(values) > 1 or shared:
            setattr(config, PER_LAYER_KEY, {str(i): n for i, n in sorted(counts.items())})
        elif hasattr(config, PER_LAYER_KEY):
            delattr(config, PER_LAYER_KEY)
        if getattr(config, "num_nextn_predict_layers", 0):
            logger.warning("setting num_nextn_predict_layers=0: MTP layers are not loaded by transformers (G11)")
            config.num_nextn_predict_layers = 0
    for attr in ("num_experts", "num_local_experts"):  # the causal-LM head caches it for the aux loss
        if isinstance(getattr(model, attr, None), int) and not shared:
            setattr(model, attr, count)


def apply_plan(model: nn.Module, plan: Plan, force: bool = False) -> nn.Module:
    """Edit `model` in place to follow `plan`; returns the model.

    The plan must have been made for this model (`Plan.check_model`: fingerprint, every MoE layer,
    counts and groups against the model's routing); `force=True` applies it anyway, with a warning."""
    from moeprune.fingerprint import model_fingerprint

    plan.validate()
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    plan.check_model(layers, model_fingerprint(model), force=force)
    for index, lp in sorted(plan.layers.items()):
        layer = layers[index]
        _prepare_layer(model, layer, lp, plan.params)
        if not lp.novices:
            slice_layer(layer, lp.kept)
    counts = {index: layer.num_experts for index, layer in layers.items()}
    set_expert_count(model, counts)
    return model
