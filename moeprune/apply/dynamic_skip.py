"""NAEE dynamic skipping (algorithms.md section 3): at inference, skip selected experts whose gate is
small next to the token's top gate.

Calibration: per MoE layer, beta_l = median over calibration tokens of w_(2) / w_(1), the ratio of
the two largest selected gates (renormalisation and scaling cancel in the ratio; the mean is
recorded but, as in the reference `method/dynamic_skipping.py`, not used). Inference: a selected
expert i of a token is skipped when w_i < beta_l * max_j w_j (the reference's top-2 rule,
generalised to top-k by comparing every selected expert to the top one; the top one is never
skipped). Routers that renormalise their top-k (Qwen3-MoE, Mixtral, gpt-oss, DeepSeek-V3) then
renormalise over the experts that run, as the reference's Mixtral does (a lone survivor gets the
whole gate mass); routers that do not (Qwen2-MoE, OLMoE) just lose the skipped term. Which one a
model does is read off its own gates during calibration (constant per-token sums).

Skipped (token, expert) pairs are not computed: the wrapped experts forward runs the grouped
routed computation (`calibration.capture.run_experts`) on the remaining pairs only. On a layer whose
forward is already wrapped (MoNE novices) the skipped gates are zeroed instead (same output, no
compute saved).

Saved as a documented config extension, `moeprune_dynamic_skip` = {"betas": {layer: beta},
"mean_ratio": {layer: mean}, "renormalize": bool, "tokens": N, "rule": ...}. `moeprune.load_pruned`
installs it (`restore_dynamic_skip`); plain `from_pretrained` loads the same weights and runs
without skipping (an unknown config key is kept as an attribute and otherwise ignored).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.adapters import find_moe_layers
from moeprune.adapters.forward_patches import install_forward
from moeprune.adapters.layout import refuse_identity_experts
from moeprune.calibration.capture import run_experts
from moeprune.engine.runner import as_batches

logger = logging.getLogger(__name__)

CONFIG_KEY = "moeprune_dynamic_skip"
RULE = "skip selected expert i when w_i < beta * max_j w_j; renormalise over the rest iff the router renormalises"
_COUNTS = "_moeprune_skip_counts"


# ---- calibration ---------------------------------------------------------------------------
def _experts_weights(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    hidden, weights = values[0], values[2]
    return hidden, weights.reshape(-1, weights.shape[-1])


class GateRatios:
    """Pre-hooks on every MoE layer's experts recording w_(2) / w_(1) of each token's selected gates
    (and the gate sums, to tell whether the router renormalises). Works on any model whose layers
    run while attached, loaded or streamed one layer at a time (`apply.streamed_skip`)."""

    def __init__(self, layers: list) -> None:
        if layers[0].routing.top_k < 2:
            raise ValueError("dynamic skipping compares the second routing weight to the first; it needs top-k >= 2")
        for layer in layers:
            refuse_identity_experts(layer, "dynamic skipping")
        self.layers = layers
        self.ratios: dict[int, list[torch.Tensor]] = {layer.layer: [] for layer in layers}
        self.sums: list[torch.Tensor] = []
        self.handles: list = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            _, w = _experts_weights(args, kwargs)
            top = w.double().sort(dim=-1, descending=True).values
            self.ratios[index].append((top[:, 1] / top[:, 0].clamp_min(1e-30)).cpu())
            self.sums.append(top.sum(-1).cpu())
            return None

        return hook

    def __enter__(self) -> "GateRatios":
        self.handles = [layer.experts.register_forward_pre_hook(self._hook(layer.layer), with_kwargs=True)
                        for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def result(self) -> tuple[dict[int, torch.Tensor], bool]:
        """(ratios per layer, whether every token's selected gates sum to the same value)."""
        s = torch.cat(self.sums)
        renormalize = bool((s.max() - s.min()) <= 1e-3 * s.abs().mean().clamp_min(1e-30))
        return {i: torch.cat(r) for i, r in self.ratios.items()}, renormalize


@torch.no_grad()
def gate_ratios(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, progress: bool = True
                ) -> tuple[dict[int, torch.Tensor], bool]:
    """Per MoE layer, w_(2) / w_(1) of the model's selected gates for every calibration token, and
    whether the router renormalises (every token's selected gates sum to the same value)."""
    recorder = GateRatios(find_moe_layers(model))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with recorder:
            for batch in tqdm(as_batches(ids, batch_size), desc="dynamic-skip betas", disable=not progress, unit="batch"):
                model(input_ids=batch["input_ids"].to(device), use_cache=False, logits_to_keep=1)
    finally:
        model.train(was_training)
    return recorder.result()


def fit_betas(ratios: dict[int, torch.Tensor]) -> tuple[dict[int, float], dict[int, float]]:
    """(median, mean) of the ratios per layer; the median is beta. The median of an even count is the
    lower middle value (torch.median)."""
    return ({i: float(r.median()) for i, r in ratios.items()}, {i: float(r.mean()) for i, r in ratios.items()})


# ---- inference -----------------------------------------------------------------------------
def skip_weights(weights: torch.Tensor, beta: float, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(new gates, skip mask) for gates [T, k]: zero those below beta x the token's top gate."""
    top = weights.max(dim=-1, keepdim=True).values
    skip = weights < beta * top
    kept = weights.masked_fill(skip, 0)
    if renormalize:
        kept = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-30))
    return kept, skip


def skip_forward(experts: nn.Module, beta: float, renormalize: bool, inner: Any,
                 hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward that leaves out the skipped (token, expert) pairs."""
    weights, skip = skip_weights(top_k_weights, beta, renormalize)
    counts = getattr(experts, _COUNTS)
    counts[0] += skip.numel()
    counts[1] += int(skip.sum())
    if inner is not None:  # an already-wrapped forward (novices): zero the skipped gates
        return inner(hidden_states, top_k_index, weights)
    num_tokens, k = top_k_index.shape
    keep = ~skip.reshape(-1)
    token = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(k)[keep]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1)[keep])
    token_ids, gates = token[perm], weights.reshape(-1)[keep][perm]
    out = torch.zeros(num_tokens, hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
    if expert_ids.numel():
        _, f = run_experts(experts, hidden_states[token_ids], expert_ids)
        out.index_add_(0, token_ids, f.float() * gates.float().unsqueeze(-1))
    return out.to(hidden_states.dtype)


def install_dynamic_skip(model: nn.Module, betas: dict[int, float], renormalize: bool,
                         record: dict[str, Any] | None = None) -> nn.Module:
    """Wrap every listed MoE layer's experts forward with skipping; record the config extension."""
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    missing = sorted(set(betas) - set(layers))
    if missing:
        raise ValueError(f"dynamic skip betas name MoE layers {missing} the model does not have")
    for index, beta in betas.items():
        experts = layers[index].experts
        refuse_identity_experts(layers[index], "dynamic skipping")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"layer {index}: beta must be in [0, 1], got {beta}")
        setattr(experts, _COUNTS, [0, 0])
        install_forward(experts, lambda inner, experts=experts, beta=beta: functools.partial(  # re-install replaces
            skip_forward, experts, float(beta), bool(renormalize), inner), "dynamic-skip")
    entry = skip_entry(betas, renormalize, record)
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    for config in configs:
        setattr(config, CONFIG_KEY, entry)
    return model


def skip_entry(betas: dict[int, float], renormalize: bool, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `moeprune_dynamic_skip` config extension for `betas`."""
    return {"betas": {str(i): float(b) for i, b in sorted(betas.items())}, "renormalize": bool(renormalize),
            "rule": RULE, **(record or {})}


def fitted_entry(ratios: dict[int, torch.Tensor], renormalize: bool) -> dict[str, Any]:
    """The extension fitted from gate ratios (`gate_ratios` / `GateRatios.result`)."""
    betas, means = fit_betas(ratios)
    tokens = int(next(iter(ratios.values())).numel())
    return skip_entry(betas, renormalize, {"mean_ratio": {str(i): m for i, m in sorted(means.items())}, "tokens": tokens})


def calibrate_dynamic_skip(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Fit beta per layer on `ids` with the model as it is now (after any pruning), install skipping
    and return the recorded extension."""
    ratios, renormalize = gate_ratios(model, ids, batch_size, progress)
    entry = fitted_entry(ratios, renormalize)
    betas = {int(i): b for i, b in entry["betas"].items()}
    install_dynamic_skip(model, betas, renormalize, {k: entry[k] for k in ("mean_ratio", "tokens")})
    logger.info("dynamic skip: betas %s (renormalize=%s)", {i: round(b, 4) for i, b in betas.items()}, renormalize)
    return dict(getattr(model.config, CONFIG_KEY))


def restore_dynamic_skip(model: nn.Module) -> nn.Module:
    """Install the skipping recorded in a loaded model's config (what `load_pruned` calls)."""
    entry = getattr(model.config, CONFIG_KEY, None)
    if not entry:
        return model
    betas = {int(i): float(b) for i, b in entry["betas"].items()}
    record = {k: v for k, v in entry.items() if k not in ("betas", "renormalize", "rule")}
    return install_dynamic_skip(model, betas, bool(entry.get("renormalize", True)), record)


def skip_counts(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Expert calls (selected token-expert pairs) seen and skipped since install or the last reset."""
    calls = skipped = 0
    for layer in find_moe_layers(model):
        counts = getattr(layer.experts, _COUNTS, None)
        if counts is not None:
            calls, skipped = calls + counts[0], skipped + counts[1]
            if reset:
                counts[0] = counts[1] = 0
    return {"calls": calls, "skipped": skipped, "share": skipped / calls if calls else 0.0}
