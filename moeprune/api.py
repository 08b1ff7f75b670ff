"""The Python API: calibrate -> plan -> apply -> save, and `prune` doing all four.

    stats = moeprune.calibrate(model, ids)
    p = moeprune.plan(stats, strategy="reap", ratio=0.5)
    moeprune.apply(model, p)
    moeprune.save(model, "out/", plan=p, tokenizer=tok)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from torch import nn

from moeprune.apply.surgery import apply_plan
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats
from moeprune.auto.config import AUTO
from moeprune.config import PruneRecipe
from moeprune.io.checkpoint import save_pruned
from moeprune.io.loading import load_model
from moeprune.plan import Plan
from moeprune.strategies import get_strategy, plan

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "plan", "apply", "save", "prune", "PruneResult"]


def apply(model: nn.Module, plan_: Plan) -> nn.Module:
    """Edit `model` in place to follow the plan."""
    return apply_plan(model, plan_)


def save(model: nn.Module, output_dir: str | Path, plan: Plan | None = None, tokenizer: Any = None, **kwargs: Any) -> Path:
    """Atomically write a Hugging Face checkpoint (+ plan) to `output_dir`."""
    return save_pruned(model, output_dir, plan=plan, tokenizer=tokenizer, **kwargs)


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: Any
    stats: ExpertStats | None  # None for calibration-free strategies (aimer)
    plan: Plan
    output: Path | None
    report: dict | None = None  # strategy auto: the candidates' comparison (moeprune_report.json)


def prune(
    recipe: PruneRecipe, model: nn.Module | None = None, tokenizer: Any = None, progress: bool = True,
    overwrite: bool = False,
) -> PruneResult:
    """Run a whole recipe: load (unless `model` is given), calibrate, plan, apply, save."""
    source_path = None
    if model is None:
        model, tokenizer, source_path = load_model(recipe.model)
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer; the model directory has none")
    spec = None if recipe.strategy == AUTO else get_strategy(recipe.strategy)
    cal = recipe.calibration
    needs_ids = spec is None or spec.needs_calibration or recipe.sparsify is not None
    ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed) if needs_ids else None
    stats, auto = None, None
    if spec is None:  # strategy auto: one calibration pass, every candidate scored on held-out sequences
        from moeprune.auto.select import auto_select

        auto = auto_select(model, recipe, ids, progress=progress)
        stats, ids = auto.stats, auto.planning_ids
    elif spec.needs_calibration:  # calibration-free strategies (aimer) skip the pass entirely
        dense = max(cal.dense_tokens, spec.dense_tokens)
        meta = {"source": cal.source, "seed": cal.seed, "num_hidden_layers": model.config.get_text_config().num_hidden_layers}
        stats = calibrate(model, ids, batch_size=cal.batch_size, dense_tokens=dense, progress=progress, meta=meta,
                          sample_tokens=spec.sample_tokens(recipe.strategy_params()), sample_seed=cal.seed)
    if auto is not None:
        result_plan = auto.plan
    else:
        result_plan = plan(stats, recipe.strategy, recipe.ratio, model=model, **recipe.strategy_params())
    apply_plan(model, result_plan)
    if recipe.sparsify is not None:
        from moeprune.sparsify.run import sparsify

        sparsify(model, ids, plan=result_plan, batch_size=cal.batch_size, progress=progress, **recipe.sparsify.kwargs())
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


