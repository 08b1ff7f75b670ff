"""Router calibration inside `prune`: what to keep from the dense model, and the training after compression.

    prep = prepare_router_kd(model, tokenizer, config, source, seq_len, seed, planning_ids)  # dense model
    ... apply the plan, sparsify ...
    report = run_router_kd(model, prep)                                                     # compressed

`prepare_router_kd` draws the router-calibration tokens (held apart from the planning tokens), and
from the still-uncompressed model caches what the chosen variants need: top-k teacher log-probs for
global KD, MoE block inputs/outputs for the layer-local variant. After that the dense weights are
no longer needed, so compression can happen in place.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeprune.recover.config import RouterKDConfig
from moeprune.recover.kd_data import held_apart_ids
from moeprune.recover.router_kd import cache_kl, router_kd
from moeprune.recover.router_kd_local import capture_block_io, router_kd_local
from moeprune.recover.teacher_cache import TeacherCache, build_teacher_cache

__all__ = ["RouterKDPrep", "prepare_router_kd", "run_router_kd"]


@dataclass
class RouterKDPrep:
    config: RouterKDConfig
    seed: int
    cache: TeacherCache | None = None
    block_io: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def prepare_router_kd(
    model: nn.Module, tokenizer: Any, config: RouterKDConfig, source: str, seq_len: int, seed: int,
    planning_ids: torch.Tensor | None = None, batch_size: int = 8, progress: bool = True,
    skip_documents: Collection[int] = (),
) -> RouterKDPrep:
    """Run on the UNCOMPRESSED model: draw held-apart tokens (none from `skip_documents`) and cache
    the teacher's outputs."""
    if isinstance(config.samples, list):
        raise ValueError("prepare_router_kd takes one sample count; a list is a choice (moeprune.recover.choose)")
    started = time.perf_counter()
    seed = config.seed if config.seed is not None else seed
    ids = held_apart_ids(config.source or source, tokenizer, config.samples, config.seq_len or seq_len, seed,
                         exclude=planning_ids, skip_documents=skip_documents)
    prep = RouterKDPrep(config, seed)
    if config.steps > 0:
        prep.cache = build_teacher_cache(model, ids, k=config.top_k, temperature=config.temperature,
                                         batch_size=batch_size, progress=progress)
    if config.local:
        prep.block_io = capture_block_io(model, ids, batch_size=batch_size, progress=progress)
    prep.info = {"source": config.source or source, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                 "seed": seed, "prepare_seconds": round(time.perf_counter() - started, 3)}
    return prep


def run_router_kd(model: nn.Module, prep: RouterKDPrep, progress: bool = True, measure: bool = True) -> dict[str, Any]:
    """Calibrate the compressed `model`'s routers in place (local first, then global); returns the report.

    With `measure`, the report also has the KL to the teacher on the router-calibration tokens
    before and after (training tokens, not held-out: a sanity check, not a quality claim).
    """
    cfg = prep.config
    report: dict[str, Any] = dict(prep.info)
    kl_before = cache_kl(model, prep.cache) if measure and prep.cache is not None else None
    if prep.block_io is not None:
        report["local"] = router_kd_local(model, prep.block_io, steps=cfg.local_steps, lr=cfg.local_lr,
                                          batch_tokens=cfg.local_batch_tokens, seed=prep.seed, progress=progress)
    if prep.cache is not None:
        report["global"] = router_kd(model, prep.cache, cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=prep.seed,
                                     weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, progress=progress)
        if measure:
            report["global"]["train_kl_before"] = kl_before
            report["global"]["train_kl_after"] = cache_kl(model, prep.cache)
    return report
