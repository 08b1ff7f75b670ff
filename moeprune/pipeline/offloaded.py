"""`prune` for checkpoints larger than memory: streamed calibration -> plan -> streamed apply.

`should_offload` decides automatically: the in-memory path holds the model in the dtype it is
loaded in (`--dtype`, default the checkpoint's own), so a checkpoint whose size in that dtype
exceeds most of the available memory is streamed instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moeprune.calibration.stats import ExpertStats
from moeprune.config import PruneRecipe
from moeprune.pipeline.result import PruneResult
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
    from moeprune.io.loading import checkpoint_dtype, resolve_dtype
    from moeprune.io.lazy_reader import LazyCheckpoint

    path = Path(path)
    size = LazyCheckpoint(path).total_bytes()
    if not (path / "config.json").is_file():
        return size
    stored = checkpoint_dtype(path)
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


_MONE_SKIP = "dynamic skipping of a MoNE (novice) plan needs the model in memory; drop --offload"


def prune_offloaded(
    recipe: PruneRecipe,
    work_dir: str | Path | None = None,
    resume: bool = False,
    memory_budget: str = "4GB",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    stats: ExpertStats | None = None,
) -> PruneResult:
    """Run a recipe without loading the model: streamed calibration, plan, streamed apply.

    Channel slimming, sparsify and layer-local router KD edit each layer as it is written,
    dynamic-skip betas are fitted on the written output before it is published, task patterns
    pick their plan from a streamed forward up to the first router. Without `work_dir`, a
    resumable work directory `.<output>.moeprune-work` is kept next to the output while the run
    lasts and removed when it succeeds. `stats` computed elsewhere (torchrun ranks) replace the
    streamed calibration. The result has no model (`model=None`): the output is on disk.
    """
    from moeprune.io.loading import resolve_model_path
    from moeprune.strategies import get_strategy
    from moeprune.apply.streamed import streamed_apply

    path = Path(resolve_model_path(recipe.model))
    if not path.is_dir():
        raise FileNotFoundError(f"--offload needs a local checkpoint directory; {recipe.model} is not one (download it first)")
    if recipe.router_kd is not None and recipe.router_kd.steps > 0:
        from moeprune.apply.streamed_passes import GLOBAL_KD_REFUSAL

        raise ValueError(GLOBAL_KD_REFUSAL)
    spec = get_strategy(recipe.strategy)
    if not recipe.patterns:
        spec.check_streamable()  # before any calibration
    if recipe.slim is not None:
        from moeprune.slimming.streamed import check_streamable_slim

        check_streamable_slim(recipe.slim)
    if recipe.dynamic_skip and recipe.strategy == "mone" and not recipe.patterns:  # before any calibration
        raise ValueError(_MONE_SKIP)
    from moeprune.devices import resolve_device

    device = resolve_device(recipe.device)  # layers are materialised and run there; a missing GPU fails now
    config, dtype, work_dir = _preflight(recipe, path, overwrite, work_dir)  # inputs, output, work dir: before any work
    if recipe.router_kd is not None and recipe.router_kd.local:  # before any calibration
        from moeprune.adapters.carried_state import refuse_block_fits
        from moeprune.io.lazy_load import build_skeleton

        refuse_block_fits(build_skeleton(path, dtype), "--router-kd-local")
    needs_stats = (spec.needs_calibration and not recipe.patterns) or recipe.slim is not None
    tokenizer, ids = None, None
    if needs_stats or recipe.patterns or recipe.dynamic_skip:
        from transformers import AutoTokenizer

        from moeprune.io.loading import trust_remote_code

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code())
    if needs_stats or recipe.dynamic_skip:
        from moeprune.calibration.data import calibration_ids

        cal = recipe.calibration
        ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed)
    calibrated = needs_stats and stats is None  # statistics handed in (torchrun ranks) need no pass here
    if stats is not None and not stats.meta.get("fingerprint"):
        from moeprune.fingerprint import checkpoint_fingerprint

        stats.meta["fingerprint"] = checkpoint_fingerprint(path)  # binds the plan to this checkpoint
    if calibrated:
        stats = _calibrate(recipe, spec, path, config, dtype, device, ids, work_dir, resume, memory_budget, progress)
    result_plan = _plan(recipe, spec, path, stats, dtype, tokenizer, device)
    output = None
    if recipe.output:
        edits = []
        if recipe.slim is not None:  # each layer slimmed as it is written (slimming/streamed.py)
            from moeprune.slimming.streamed import SlimEdit

            edits.append(SlimEdit(path, stats, result_plan, dtype, recipe.slim.kwargs()))
        from moeprune.apply.streamed_passes import layer_passes  # sparsify, local router KD: each layer as written
        from moeprune.io.sharded_writer import parse_size

        edits += layer_passes(recipe, path, result_plan, ids, tokenizer, device, parse_size(memory_budget), before=list(edits))
        if recipe.dynamic_skip:  # betas fitted on the written output before it is published
            from moeprune.apply.streamed_skip import DynamicSkipEdit

            if any(lp.novices for lp in result_plan.layers.values()):
                raise ValueError(_MONE_SKIP)
            edits.append(DynamicSkipEdit(result_plan, ids, recipe.calibration.batch_size, dtype, device, memory_budget,
                                         progress))
        output = streamed_apply(
            path, result_plan, recipe.output, overwrite=overwrite, max_shard_size=max_shard_size,
            recipe=recipe.model_dump(mode="json"), progress=progress, edits=edits,
        )
        if work_dir is not None and calibrated:
            from moeprune.io.output_policy import remove_work_dir

            remove_work_dir(work_dir)  # finished: only a work directory moeprune marked as its own is removed
    return PruneResult(None, tokenizer, stats, result_plan, output)


def _calibrate(recipe: PruneRecipe, spec, path: Path, config: dict, dtype, device, ids, work_dir, resume: bool,
               memory_budget: str, progress: bool) -> ExpertStats:
    """Streamed calibration of `path` on `ids` (resumable with a work directory); NaN/Inf checked."""
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.output_policy import prepare_work_dir, remove_work_dir
    from moeprune.nonfinite import check_stats
    from moeprune.calibration.streamed import streamed_calibrate

    if work_dir is not None:
        work_dir = prepare_work_dir(work_dir, inputs=[path], outputs=[recipe.output])
    cal = recipe.calibration
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
            remove_work_dir(work_dir)
        raise
    check_stats(stats)  # NaN/Inf: one line naming layer and experts
    return stats


def _plan(recipe: PruneRecipe, spec, path: Path, stats: ExpertStats | None, dtype, tokenizer, device) -> Plan:
    """The recipe's plan: a task pattern, streamed expert weights (aimer, stun) or the statistics."""
    from moeprune.strategies import plan

    if recipe.patterns:  # PreMoE: the query's nearest task pattern decides (moeprune.patterns)
        from moeprune.patterns import load_patterns
        from moeprune.pipeline.streamed_patterns import streamed_pattern_plan

        result = streamed_pattern_plan(path, tokenizer, load_patterns(recipe.patterns), recipe.query, recipe.ratio,
                                       dtype, device)
    elif not spec.needs_calibration:  # calibration-free (AIMER): read only expert weights from the shards
        result = plan_from_weights(path, recipe.strategy, recipe.ratio, **recipe.strategy_params())
    elif spec.needs_weights:  # stun: routers, then each layer's experts, read from the shards one layer at a time
        from moeprune.engine.expert_reader import LazyExpertWeights

        with LazyExpertWeights(path, dtype) as weights:
            result = plan(stats, recipe.strategy, recipe.ratio, model=weights, **recipe.strategy_params())
    else:
        result = plan(stats, recipe.strategy, recipe.ratio, **recipe.strategy_params())
    if recipe.uniform and not result.uniform:  # same budget, equal counts (strategies/uniform.py)
        from moeprune.strategies.uniform import uniform_from

        result = uniform_from(stats, recipe.strategy, result, **recipe.strategy_params())
    if result.non_uniform_note():
        logger.warning(result.non_uniform_note())
    return result


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


def plan_from_weights(path: str | Path, strategy: str, ratio: float, dtype: Any = None, **params):
    """Plan of a calibration-free strategy (AIMER) for checkpoint directory `path`, reading only its
    routed-expert weights (plus the tiny router tensors the plan's fingerprint hashes)."""
    from moeprune.engine.expert_reader import LazyExpertWeights
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.loading import resolve_dtype
    from moeprune.strategies import get_strategy, plan

    if get_strategy(strategy).needs_calibration:
        raise ValueError(f"strategy {strategy} needs calibration statistics; pass a statistics file")
    with LazyExpertWeights(path, resolve_dtype(dtype, path)) as weights:
        result = plan(None, strategy, ratio, model=weights, **params)
    result.model = checkpoint_fingerprint(path)  # binds the plan to this checkpoint, as plans from statistics are
    return result.validate()
