"""The in-memory pipeline: load -> calibrate -> plan -> apply (-> slim, sparsify, router KD,
dynamic skip) -> save, with the whole model resident (on one device, or spread over several GPUs
by accelerate's device map). `moeprune.pipeline.run` chooses it or the offloaded pipeline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from moeprune.apply.surgery import apply_plan
from moeprune.auto.config import AUTO
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats
from moeprune.config import PruneRecipe
from moeprune.io.checkpoint import save_pruned
from moeprune.io.loading import load_model
from moeprune.pipeline.result import PruneResult
from moeprune.strategies import get_strategy, plan

logger = logging.getLogger(__name__)


def prune_in_memory(
    recipe: PruneRecipe, model: nn.Module | None = None, tokenizer: Any = None, progress: bool = True,
    overwrite: bool = False, stats: ExpertStats | None = None,
) -> PruneResult:
    """Run a whole recipe with the model in memory: load (unless `model` is given), calibrate
    (unless `stats` are given, e.g. all-reduced by torchrun ranks), plan, apply, save.

    Everything about the output and the inputs is checked before the model is loaded or any
    calibration runs (`moeprune.io.output_policy`, `moeprune.io.input_checks`)."""
    from moeprune.devices import move_model, resolve_device
    from moeprune.fingerprint import model_fingerprint
    from moeprune.io.input_checks import check_seq_len, check_text_source
    from moeprune.io.loading import resolve_model_path, set_trust_remote_code
    from moeprune.io.output_policy import check_output
    from moeprune.nonfinite import check_stats, check_weights, exclude_from_plan

    if recipe.trust_remote_code:
        set_trust_remote_code(True)
    check_text_source(recipe.calibration.source)
    source_path = None
    if recipe.output:
        source = resolve_model_path(recipe.model) if model is None else getattr(model, "name_or_path", None)
        check_output(recipe.output, [source], kind="checkpoint", overwrite=overwrite)
    device = resolve_device(recipe.device)  # a missing GPU fails here, before loading
    if model is None or recipe.device != "auto":  # a model handed in stays where it is unless asked
        if model is None:
            model, tokenizer, source_path = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
        move_model(model, device)
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer; the model directory has none")
    spec = None if recipe.strategy == AUTO else get_strategy(recipe.strategy)
    cal = recipe.calibration
    check_seq_len(model.config, cal.seq_len)
    if recipe.router_kd is not None and recipe.router_kd.local:  # before any calibration
        from moeprune.adapters.carried_state import refuse_block_fits

        refuse_block_fits(model, "--router-kd-local")
    excluded = check_weights(model, allow=recipe.allow_nonfinite)
    fingerprint = model_fingerprint(model)
    calibrating = stats is None and spec is not None and ((spec.needs_calibration and not recipe.patterns) or recipe.slim is not None)
    needs_ids = spec is None or calibrating or recipe.sparsify is not None or recipe.router_kd is not None \
        or recipe.dynamic_skip
    ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed) if needs_ids else None
    auto = None
    calibration_tokens = ids  # every calibration sequence (auto splits it); router KD draws apart from all
    if spec is None:  # strategy auto: one calibration pass, every candidate scored on held-out sequences
        from moeprune.auto.select import auto_select

        auto = auto_select(model, recipe, ids, progress=progress, meta={"fingerprint": fingerprint}, tokenizer=tokenizer)
        stats, ids = auto.stats, auto.planning_ids
    elif calibrating:  # aimer, patterns: no pass
        dense = max(cal.dense_tokens, spec.dense_tokens)
        meta = {"source": cal.source, "seed": cal.seed, "num_hidden_layers": model.config.get_text_config().num_hidden_layers,
                "fingerprint": fingerprint}
        stats = calibrate(model, ids, batch_size=cal.batch_size, dense_tokens=dense, progress=progress, meta=meta,
                          sample_tokens=spec.sample_tokens(recipe.strategy_params()), sample_seed=cal.seed)
    kd_prep = None
    if recipe.router_kd is not None:  # cache the dense model's outputs before compression edits it in place
        from moeprune.recover.choose import prepare_kd_choice
        from moeprune.recover.run import prepare_router_kd

        prepare = prepare_kd_choice if len(recipe.router_kd.sample_choices) > 1 else prepare_router_kd
        kd_prep = prepare(model, tokenizer, recipe.router_kd, cal.source, cal.seq_len, cal.seed,
                          planning_ids=calibration_tokens, batch_size=cal.batch_size, progress=progress)
    if stats is not None and not stats.meta.get("fingerprint"):  # statistics made elsewhere (torchrun ranks)
        stats.meta["fingerprint"] = fingerprint
    for index, experts in (check_stats(stats, allow=recipe.allow_nonfinite) if stats is not None else {}).items():
        excluded[index] = sorted(set(excluded.get(index, [])) | set(experts))
    if auto is not None:
        result_plan = auto.plan
    elif recipe.patterns:  # PreMoE: the query's nearest task pattern decides (moeprune.patterns)
        from moeprune.patterns import load_patterns, retrieve_plan

        result_plan = retrieve_plan(model, tokenizer, load_patterns(recipe.patterns), recipe.query, recipe.ratio)[0]
        result_plan.model = fingerprint
    else:
        result_plan = plan(stats, recipe.strategy, recipe.ratio, model=model, **recipe.strategy_params())
    if recipe.uniform and not result_plan.uniform:  # same budget, equal counts (strategies/uniform.py)
        from moeprune.strategies.uniform import uniform_from

        result_plan = uniform_from(stats, recipe.strategy, result_plan, model=model, **recipe.strategy_params())
    exclude_from_plan(result_plan, excluded)
    if result_plan.non_uniform_note():
        logger.warning(result_plan.non_uniform_note())
    apply_plan(model, result_plan)
    if recipe.slim is not None:  # channel slimming inside the kept experts (moeprune.slimming)
        from moeprune.slimming.run import slim_channels

        slim_channels(model, stats, result_plan, **recipe.slim.kwargs())
    if recipe.sparsify is not None:
        from moeprune.sparsify.run import sparsify

        sparsify(model, ids, plan=result_plan, batch_size=cal.batch_size, progress=progress, **recipe.sparsify.kwargs())
    if kd_prep is not None:
        from moeprune.recover.choose import KDChoice, run_kd_choice
        from moeprune.recover.run import run_router_kd

        run = run_kd_choice if isinstance(kd_prep, KDChoice) else run_router_kd
        result_plan.params["router_kd"] = run(model, kd_prep, progress=progress)
    if recipe.dynamic_skip:  # NAEE dynamic skipping, fitted on the compressed model (apply/dynamic_skip.py)
        from moeprune.apply.dynamic_skip import calibrate_dynamic_skip

        result_plan.params["dynamic_skip"] = calibrate_dynamic_skip(model, ids, batch_size=cal.batch_size, progress=progress)
    output = None
    if recipe.output:
        output = save_pruned(
            model, recipe.output, plan=result_plan, tokenizer=tokenizer,
            recipe=recipe.model_dump(mode="json"), input_dir=source_path, overwrite=overwrite,
        )
        if auto is not None:
            from moeprune.auto.select import REPORT_FILE

            (Path(output) / REPORT_FILE).write_text(json.dumps(auto.report, indent=1))
    return PruneResult(model, tokenizer, stats, result_plan, output, auto.report if auto is not None else None)


