"""The Python API: calibrate -> plan -> apply -> save, and `prune` doing all four (in memory, or
offloaded layer by layer for checkpoints larger than memory) through `moeprune.pipeline.run`.

    stats = moeprune.calibrate(model, ids)
    p = moeprune.plan(stats, strategy="reap", ratio=0.5)
    moeprune.apply(model, p)
    moeprune.save(model, "out/", plan=p, tokenizer=tok)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


from torch import nn

from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats
from moeprune.config import PruneRecipe
from moeprune.io.checkpoint import save_pruned
from moeprune.plan import Plan
from moeprune.pipeline import PruneResult, run
from moeprune.strategies import plan

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "plan", "apply", "save", "prune", "PruneResult"]


def apply(model: nn.Module, plan_: Plan, force: bool = False) -> nn.Module:
    """Edit `model` in place to follow the plan (made for this model, unless `force`)."""
    return apply_plan(model, plan_, force=force)


def save(model: nn.Module, output_dir: str | Path, plan: Plan | None = None, tokenizer: Any = None, **kwargs: Any) -> Path:
    """Atomically write a Hugging Face checkpoint (+ plan) to `output_dir`."""
    return save_pruned(model, output_dir, plan=plan, tokenizer=tokenizer, **kwargs)


def prune(
    recipe: PruneRecipe, model: nn.Module | None = None, tokenizer: Any = None, progress: bool = True,
    overwrite: bool = False, offload: bool | None = False, stats: ExpertStats | None = None, **offload_options: Any,
) -> PruneResult:
    """Run a whole recipe: load (unless `model` is given), calibrate (unless `stats` are given),
    plan, apply, save. `offload=True` streams the checkpoint one decoder layer at a time instead of
    loading it (None: only when it would not fit in memory); `offload_options` are
    `moeprune.pipeline.run`'s (`work_dir`, `resume`, `memory_budget`, `max_shard_size`).

    Everything about the output and the inputs is checked before the model is loaded or any
    calibration runs (`moeprune.io.output_policy`, `moeprune.io.input_checks`)."""
    return run(recipe, model, tokenizer, stats=stats, offload=offload, overwrite=overwrite, progress=progress,
               **offload_options)
