"""Router KD (arXiv 2603.02217): after compression, train only the routers to match the dense model.

The compressed student's next-token distributions are pulled towards the uncompressed teacher's
with the forward KL(teacher || student) per token, padding masked, tau^2-scaled (`kd_loss`). The
teacher is represented by a `TeacherCache` built before compression, so teacher and student are
never in memory together. Only the router parameters (`router_params.router_parameters`) receive
gradients; every other tensor is bit-identical afterwards. Gradients reach the router through the
soft gate weights of the selected experts (softmax / sigmoid then top-k then renormalise, as the
transformers routers compute them); the top-k choice itself is not differentiable.

Optimizer: AdamW (no weight decay by default), constant learning rate, gradient-norm clipping at 1
- the paper states lr 5e-5, tau = 1, batch 2 x 4 accumulation, one epoch of ~3k x 512 tokens, and
no optimizer or schedule. Steps cycle through the cached sequences in a seeded random order, so the
same seed gives identical router weights.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.recover.router_params import only_trainable, router_parameters
from moeprune.recover.teacher_cache import TeacherCache, kd_loss, topk_kl

logger = logging.getLogger(__name__)

__all__ = ["router_kd", "cache_kl", "batch_order"]


def batch_order(num_sequences: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Row indices of each step: seeded permutations of the sequences, concatenated epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    rows = torch.cat([torch.randperm(num_sequences, generator=generator) for _ in range(math.ceil(needed / num_sequences))])
    return [rows[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _student_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = _device(model)
    mask = batch.get("attention_mask")
    return model(input_ids=batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device),
                 use_cache=False).logits


@torch.no_grad()
def cache_kl(model: nn.Module, cache: TeacherCache, batch_size: int = 8) -> float:
    """Mean masked per-token KL(teacher~ || model~) over every sequence of `cache` (no tau^2 factor)."""
    total = count = 0.0
    for start in range(0, cache.num_sequences, batch_size):
        batch = cache.batch(torch.arange(start, min(start + batch_size, cache.num_sequences)))
        kl = topk_kl(_student_logits(model, batch).cpu(), batch["top_index"], batch["top_logprob"],
                     batch["tail_logmass"], cache.temperature)
        total += float((kl * batch["mask"]).sum())
        count += float(batch["mask"].sum())
    return total / max(count, 1.0)


def router_kd(
    model: nn.Module, cache: TeacherCache, steps: int, lr: float = 5e-5, batch_size: int = 2, seed: int = 0,
    weight_decay: float = 0.0, max_grad_norm: float = 1.0, progress: bool = True,
) -> dict[str, Any]:
    """Train `model`'s router parameters in place for `steps` AdamW steps on `cache`; returns a report."""
    if steps < 1:
        raise ValueError(f"router KD needs steps >= 1, got {steps}")
    if batch_size < 1 or lr <= 0:
        raise ValueError(f"router KD needs batch_size >= 1 and lr > 0, got batch_size={batch_size}, lr={lr}")
    params = router_parameters(model)
    was_training = model.training
    model.eval()  # no dropout: the loss is deterministic for a seed
    started = time.perf_counter()
    losses: list[float] = []
    first_grad = 0.0
    with only_trainable(model, list(params.values())):
        optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay, foreach=False)
        bar = tqdm(batch_order(cache.num_sequences, steps, batch_size, seed), desc="router KD", unit="step",
                   disable=not progress)
        for step, rows in enumerate(bar):
            batch = cache.batch(rows)
            logits = _student_logits(model, batch)
            loss = kd_loss(logits, *(batch[k].to(logits.device) for k in ("top_index", "top_logprob", "tail_logmass")),
                           mask=batch["mask"].to(logits.device), temperature=cache.temperature)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm if max_grad_norm > 0 else float("inf")))
            if step == 0:
                first_grad = norm
                if norm == 0.0:
                    logger.warning("router KD: the router gradient is zero at step 0; the experts forward may not "
                                   "let gradients reach the gate weights (nothing will change)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.train(was_training)
    window = max(1, steps // 10)
    report = {
        "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "temperature": cache.temperature,
        "top_k": cache.k, "sequences": cache.num_sequences, "tokens_seen": int(steps * batch_size * cache.input_ids.shape[1]),
        "trained_parameters": int(sum(p.numel() for p in params.values())),
        "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
        "grad_norm_first": first_grad, "seconds": round(time.perf_counter() - started, 3),
    }
    logger.info("router KD: %d steps, loss %.4f -> %.4f, %.1fs", steps, report["loss_first"], report["loss_last"], report["seconds"])
    return report
