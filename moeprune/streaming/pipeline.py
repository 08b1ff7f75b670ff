"""`prune` for checkpoints larger than memory: streamed calibration -> plan -> streamed apply.

`should_offload` decides automatically: the in-memory path holds the model in the dtype it is
loaded in (`--dtype`, default the checkpoint's own), so a checkpoint whose size in that dtype
exceeds most of the available memory is streamed instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from moeprune.calibration.stats import ExpertStats
from moeprune.config import PruneRecipe
from moeprune.plan import Plan

logger = logging.getLogger(__name__)

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


def in_memory_bytes(path: str | Path, dtype: str = "auto") -> int:
    """Approximate bytes the in-memory path needs for checkpoint `path` loaded in `dtype`."""
    from moeprune.io.loading import config_dtype, resolve_dtype
    from moeprune.streaming.lazy_reader import LazyCheckpoint

    path = Path(path)
    size = LazyCheckpoint(path).total_bytes()
    if not (path / "config.json").is_file():
        return size
    stored = config_dtype(path)
    target = resolve_dtype(dtype, path)
    return size * target.itemsize // stored.itemsize


def should_offload(path: str | Path, fraction: float = 0.7, dtype: str = "auto") -> bool:
    """True when the model would not comfortably fit in memory (`fraction` of what is available)."""
    path = Path(path)
    if not path.is_dir():
        return False
    need, have = in_memory_bytes(path, dtype), available_memory()
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

    if recipe.dynamic_skip:
        raise ValueError("--dynamic-skip fits its betas on the pruned model in memory; drop --offload")
    if recipe.slim is not None or recipe.patterns:
        raise ValueError("channel slimming and task patterns (slim:, patterns:) run in memory only; drop --offload")
    path = Path(resolve_model_path(recipe.model))
    if not path.is_dir():
        raise FileNotFoundError(f"--offload needs a local checkpoint directory; {recipe.model} is not one (download it first)")
    spec = get_strategy(recipe.strategy)
    spec.check_streamable()  # before any calibration
    from moeprune.devices import resolve_device

    device = resolve_device(recipe.device)  # layers are materialised and run there; a missing GPU fails now
    checked = _preflight(recipe, path, overwrite, work_dir)  # inputs, output and work dir: before any work
    if not spec.needs_calibration:  # calibration-free (AIMER): read only expert weights from the shards
        from moeprune.streaming.expert_reader import LazyExpertWeights

        with LazyExpertWeights(path) as weights:
            result_plan = plan(None, recipe.strategy, recipe.ratio, model=weights, **recipe.strategy_params())
        output = None
        if recipe.output:
            output = streamed_apply(path, result_plan, recipe.output, overwrite=overwrite, max_shard_size=max_shard_size,
                                    recipe=recipe.model_dump(mode="json"), progress=progress)
        return OffloadResult(None, result_plan, output)
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.loading import trust_remote_code
    from moeprune.nonfinite import check_stats

    from moeprune.io.output_policy import prepare_work_dir

    config, dtype, work_dir = checked
    if work_dir is not None:
        work_dir = prepare_work_dir(work_dir, inputs=[path], outputs=[recipe.output])
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code())
    cal = recipe.calibration
    ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed)
    meta = {"source": cal.source, "seed": cal.seed, "num_hidden_layers": config.get("num_hidden_layers"), "offload": True,
            "fingerprint": checkpoint_fingerprint(path)}
    try:
        stats = streamed_calibrate(
            path, ids, batch_size=cal.batch_size, dense_tokens=max(cal.dense_tokens, spec.dense_tokens), progress=progress,
            meta=meta, work_dir=work_dir, resume=resume, memory_budget=memory_budget, dtype=dtype, device=device,
            sample_tokens=spec.sample_tokens(recipe.strategy_params()), sample_seed=cal.seed,
        )
    except Exception:  # an error (not a kill) before any layer was committed leaves nothing to resume
        if work_dir is not None and not (Path(work_dir) / "progress.json").is_file():
            from moeprune.io.output_policy import remove_work_dir

            remove_work_dir(work_dir)
        raise
    check_stats(stats)  # NaN/Inf: one line naming layer and experts
    if spec.needs_weights:  # stun: routers, then each layer's experts, read from the shards one layer at a time
        from moeprune.streaming.expert_reader import LazyExpertWeights

        with LazyExpertWeights(path, dtype) as weights:
            result_plan = plan(stats, recipe.strategy, recipe.ratio, model=weights, **recipe.strategy_params())
    else:
        result_plan = plan(stats, recipe.strategy, recipe.ratio, **recipe.strategy_params())
    if recipe.uniform and not result_plan.uniform:  # same budget, equal counts (strategies/uniform.py)
        from moeprune.strategies.uniform import uniform_from

        result_plan = uniform_from(stats, recipe.strategy, result_plan, **recipe.strategy_params())
    if result_plan.non_uniform_note():
        logger.warning(result_plan.non_uniform_note())
    output = None
    if recipe.output:
        output = streamed_apply(
            path, result_plan, recipe.output, overwrite=overwrite, max_shard_size=max_shard_size,
            recipe=recipe.model_dump(mode="json"), progress=progress,
        )
        if work_dir is not None:
            from moeprune.io.output_policy import remove_work_dir

            remove_work_dir(work_dir)  # finished: only a work directory moeprune marked as its own is removed
    return OffloadResult(stats, result_plan, output)


def _preflight(recipe: PruneRecipe, path: Path, overwrite: bool, work_dir: str | Path | None):
    """Validate inputs, output and work directory before any calibration; (config, dtype, work dir)."""
    from moeprune.io.input_checks import check_seq_len, check_text_source, read_config
    from moeprune.io.loading import check_local_checkpoint, resolve_dtype, set_trust_remote_code
    from moeprune.io.output_policy import check_output

    if recipe.allow_nonfinite:
        raise ValueError("--allow-nonfinite needs the model in memory (broken experts are zeroed before calibration); drop --offload")
    if recipe.trust_remote_code:
        set_trust_remote_code(True)
    check_local_checkpoint(path)
    config = read_config(path)
    check_text_source(recipe.calibration.source)
    check_seq_len(config, recipe.calibration.seq_len)
    dtype = resolve_dtype(recipe.dtype, path)
    out = check_output(recipe.output, [path], kind="checkpoint", overwrite=overwrite) if recipe.output else None
    if work_dir is None and out is not None:
        work_dir = out.parent / f".{out.name}.moeprune-work"
    if work_dir is not None:
        work_dir = check_output(work_dir, [path, out], kind="workdir")  # created when calibration starts
    return config, dtype, work_dir

