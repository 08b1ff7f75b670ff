"""The one entry point that assembles a pruning run for the API, the CLI and torchrun.

`run(recipe, ...)` decides where the model lives and hands the recipe to one of two executors of
the same phases (calibrate -> plan -> apply -> slim / sparsify / router KD / dynamic skip -> save):

* `pipeline.in_memory.prune_in_memory`: the whole model resident (one device, or a device map);
* `pipeline.offloaded.prune_offloaded`: one decoder layer at a time from the shards
  (`engine.runner.LayerRunner`), for checkpoints larger than memory.

`offload=None` decides by size (`should_offload`); what only the in-memory path can do (`auto`,
global router KD, a model object handed in) is refused for `offload=True` before any work.
Statistics computed elsewhere (torchrun ranks, all-reduced) are passed as `stats` and replace the
calibration pass; everything after it is the same code for every entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moeprune.calibration.stats import ExpertStats
from moeprune.config import PruneRecipe
from moeprune.pipeline.result import PruneResult

AUTO_REFUSAL = "--strategy auto compares candidates on copies of the loaded model; drop --offload"
MODEL_REFUSAL = "a model object is already in memory; offload streams a checkpoint directory: pass the path, or offload=False"


def _global_kd(recipe: PruneRecipe) -> bool:
    return recipe.router_kd is not None and recipe.router_kd.steps > 0


def choose_offload(recipe: PruneRecipe, offload: bool | None, model: nn.Module | None = None) -> bool:
    """`offload` as given, or (None) streamed when the checkpoint would not fit in memory and the
    recipe has nothing that needs the whole model (`auto`, global router KD, a model handed in)."""
    if offload is not None:
        return offload
    if model is not None or recipe.strategy == "auto" or _global_kd(recipe):
        return False
    from moeprune.io.loading import resolve_model_path
    from moeprune.pipeline.offloaded import should_offload

    return should_offload(resolve_model_path(recipe.model), dtype=recipe.dtype)


def check_offloadable(recipe: PruneRecipe, model: nn.Module | None = None) -> None:
    """Refuse, in one line and before any work, what the offloaded pipeline cannot do."""
    from moeprune.apply.streamed_passes import GLOBAL_KD_REFUSAL

    if model is not None:
        raise ValueError(MODEL_REFUSAL)
    if recipe.strategy == "auto":
        raise ValueError(AUTO_REFUSAL)
    if _global_kd(recipe):
        raise ValueError(GLOBAL_KD_REFUSAL)


def run(
    recipe: PruneRecipe,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    stats: ExpertStats | None = None,
    offload: bool | None = False,
    work_dir: str | Path | None = None,
    resume: bool = False,
    memory_budget: str = "4GB",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Run `recipe` in memory or offloaded (`offload`: True, False, or None to decide by size).

    `model`/`tokenizer`: an already loaded model (in memory only); `stats`: statistics computed
    elsewhere, used instead of a calibration pass; `work_dir`/`resume`/`memory_budget`/
    `max_shard_size`: the offloaded run's resumable work directory, activation budget and shards.
    """
    if resume:
        offload = True  # only a streamed calibration leaves anything to resume from
    if choose_offload(recipe, offload, model):
        from moeprune.pipeline.offloaded import prune_offloaded

        check_offloadable(recipe, model)
        return prune_offloaded(recipe, work_dir=work_dir, resume=resume, memory_budget=memory_budget,
                               max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, stats=stats)
    if work_dir is not None:
        raise ValueError("work_dir is for offloaded runs; drop it or offload")
    from moeprune.pipeline.in_memory import prune_in_memory

    return prune_in_memory(recipe, model=model, tokenizer=tokenizer, progress=progress, overwrite=overwrite, stats=stats)
