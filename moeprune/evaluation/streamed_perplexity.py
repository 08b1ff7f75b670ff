"""Perplexity of a checkpoint larger than memory, one decoder layer at a time (`prune --offload --eval`).

The same windows and next-token NLL as `evaluation.perplexity.nll_from_ids` (non-overlapping
`seq_len` windows, summed cross-entropy in float32 logits), computed the way `streamed_calibrate`
computes statistics: the model is a meta skeleton, the embeddings run every window up to the first
decoder layer (recording each layer's call arguments), each decoder layer is read from the shards,
runs all cached hidden states on `device` in the checkpoint's dtype and is freed (the loop is
`engine.streamed_forward.StreamedForward`), and the final norm and the LM head turn the last hidden
states into logits. Nothing but one layer (plus the embeddings, norm and head) is resident; hidden
states wait in host memory up to `memory_budget` and spill to disk beyond it. moeprune outputs
whose layers differ from their config are rebuilt as `load_pruned` rebuilds them (per-layer expert
counts, slimmed widths: `io.checkpoint.pruned_skeleton`; dynamic skipping from the config's betas);
MoNE novices are refused: evaluate those in memory with `moeprune eval`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moeprune.apply.dynamic_skip import restore_dynamic_skip
from moeprune.engine.runner import hidden_of
from moeprune.engine.skeleton import module_name
from moeprune.io.checkpoint import pruned_skeleton
from moeprune.engine.streamed_forward import StreamedForward
from moeprune.evaluation.perplexity import iter_windows

_NOT_STREAMABLE = ("moeprune_novices",)  # novice vectors live outside the shards: evaluate those in memory


def check_streamable_output(path: str | Path) -> None:
    """Refuse checkpoints whose modules a meta skeleton cannot rebuild layer by layer (MoNE novices)."""
    config = json.loads((Path(path) / "config.json").read_text())
    special = [k for k in _NOT_STREAMABLE if config.get(k)]
    if special:
        raise ValueError(f"{path}: {', '.join(special)} in config: streamed evaluation cannot rebuild it; "
                         "evaluate it in memory with `moeprune eval`")


def _final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"{type(model).__name__}: no final norm found for streamed evaluation")
    return norm


def _norm_input(hidden: torch.Tensor, norm: nn.Module, device: torch.device) -> torch.Tensor:
    """The last layer's hidden states as the final norm takes them: a float32 residual stream (ZAYA's)
    cast to the norm's lower-precision weight dtype, as the model's own forward does; else as they are."""
    weight = getattr(norm, "weight", None)
    hidden = hidden.to(device)
    if hidden.dtype == torch.float32 and isinstance(weight, torch.Tensor) and weight.dtype in (torch.bfloat16, torch.float16):
        return hidden.to(weight.dtype)
    return hidden


@torch.no_grad()
def streamed_nll(
    path: str | Path, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", memory_budget: str | int = "4GB", progress: bool = True,
) -> tuple[float, int]:
    """(summed NLL, predicted tokens) of checkpoint `path` over non-overlapping windows of `ids`."""
    from moeprune.io.loading import resolve_dtype

    path, device = Path(path), torch.device(device)
    check_streamable_output(path)
    dtype = resolve_dtype(dtype, path)
    model = pruned_skeleton(path, dtype)  # per-layer expert counts and slimmed widths, as load_pruned builds
    restore_dynamic_skip(model)  # the output's dynamic skipping (config betas), as load_pruned installs it
    windows = [{"input_ids": w} for w in iter_windows(ids, seq_len, batch_size)]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with StreamedForward(model, path, dtype, device, memory_budget, prefix="moeprune-eval-") as sf:
        final = sf.run(windows, progress=progress, desc="evaluating layers", keep_embeddings=tied)
        norm = _final_norm(model)
        sf.load(module_name(model, norm))
        if not tied:
            sf.load(module_name(model, model.get_output_embeddings()))
        total, count = 0.0, 0
        for b, window in enumerate(windows):
            batch = window["input_ids"]
            logits = model.get_output_embeddings()(norm(_norm_input(hidden_of(final.get(b)), norm, device))).float()[:, :-1]
            targets = batch[:, 1:].to(logits.device)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += batch.shape[0] * (batch.shape[1] - 1)
    return total, count


def streamed_perplexity(path: str | Path, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8, **kwargs) -> float:
    """exp(mean next-token NLL), as `evaluation.perplexity.perplexity_from_ids`, streamed."""
    total, count = streamed_nll(path, ids, seq_len, batch_size, **kwargs)
    if count == 0:
        raise ValueError("need at least two tokens to compute perplexity")
    return math.exp(total / count)
