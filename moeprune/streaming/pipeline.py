"""`prune` for checkpoints larger than memory: streamed calibration -> plan -> streamed apply.

`should_offload` decides automatically: the in-memory path holds the model in float32, so a
checkpoint whose float32 size exceeds most of the available memory is streamed instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from moeprune.calibration.stats import ExpertStats
from moeprune.config import PruneRecipe
from moeprune.plan import Plan

logger = logging.getLogger(__name__)

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1}


def available_memory() -> int:
    """Bytes of memory available to a new allocation (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def in_memory_bytes(path: str | Path) -> int:
    """Approximate bytes the in-memory path needs for checkpoint `path` (loaded as float32)."""
    from moeprune.streaming.lazy_reader import LazyCheckpoint

    path = Path(path)
    size = LazyCheckpoint(path).total_bytes()
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    width = _BYTES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), 4)
    return size * 4 // width


def should_offload(path: str | Path, fraction: float = 0.7) -> bool:
    """True when the model would not comfortably fit in memory (`fraction` of what is available)."""
    path = Path(path)
    if not path.is_dir():
        return False
    need, have = in_memory_bytes(path), available_memory()
    if need > fraction * have:
        logger.warning("checkpoint needs ~%.1f GB in memory, %.1f GB available: streaming it (--offload)", need / 1e9, have / 1e9)
        return True
    return False


@dataclass
class OffloadResult:
    stats: ExpertStats | None  # None for calibration-free strategies
    plan: Plan
    output: Path | None


def prune_offloaded(
    recipe: PruneRecipe,
    work_dir: str | Path | None = None,
    resume: bool = False,
    memory_budget: str = "4GB",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> OffloadResult:
    """Run a recipe without loading the model: streamed calibration, plan, streamed apply.

    Without `work_dir`, a resumable work directory `.<output>.moeprune-work` is kept next to the
    output while the run lasts and removed when it succeeds.
    """
    from transformers import AutoTokenizer

    from moeprune.calibration.data import calibration_ids
    from moeprune.io.loading import resolve_model_path
    from moeprune.strategies import get_strategy, plan
    from moeprune.streaming.layerwise import streamed_calibrate
    from moeprune.streaming.streamed_apply import streamed_apply

    path = Path(resolve_model_path(recipe.model))
    if not path.is_dir():
        raise FileNotFoundError(f"--offload needs a local checkpoint directory; {recipe.model} is not one (download it first)")
    spec = get_strategy(recipe.strategy)
    spec.check_streamable()  # before any calibration
    if not spec.needs_calibration:  # calibration-free (AIMER): read only expert weights from the shards
        from moeprune.streaming.expert_reader import LazyExpertWeights

        with LazyExpertWeights(path) as weights:
            result_plan = plan(None, recipe.strategy, recipe.ratio, model=weights, **recipe.strategy_params())
        output = None
        if recipe.output:
            output = streamed_apply(path, result_plan, recipe.output, overwrite=overwrite, max_shard_size=max_shard_size,
                                    recipe=recipe.model_dump(mode="json"), progress=progress)
        return OffloadResult(None, result_plan, output)
    if spec.needs_weights:
        raise ValueError(f"strategy {recipe.strategy} reads expert weights from a loaded model; it cannot run with --offload")
    tokenizer = AutoTokenizer.from_pretrained(path)
    cal = recipe.calibration
    ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed)
    own_work_dir = work_dir is None and recipe.output is not None
    if own_work_dir:
        out = Path(recipe.output).expanduser().resolve()
        work_dir = out.parent / f".{out.name}.moeprune-work"
    config = json.loads((path / "config.json").read_text())
    meta = {"source": cal.source, "seed": cal.seed, "num_hidden_layers": config.get("num_hidden_layers"), "offload": True}
    stats = streamed_calibrate(
        path, ids, batch_size=cal.batch_size, dense_tokens=max(cal.dense_tokens, spec.dense_tokens), progress=progress,
        meta=meta, work_dir=work_dir, resume=resume, memory_budget=memory_budget,
        sample_tokens=spec.sample_tokens(recipe.strategy_params()), sample_seed=cal.seed,
    )
    result_plan = plan(stats, recipe.strategy, recipe.ratio, **recipe.strategy_params())
    output = None
    if recipe.output:
        output = streamed_apply(
            path, result_plan, recipe.output, overwrite=overwrite, max_shard_size=max_shard_size,
            recipe=recipe.model_dump(mode="json"), progress=progress,
        )
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return OffloadResult(stats, result_plan, output)

