"""`--strategy auto`: plan with every candidate, keep the one whose model is closest to the dense one.

1. The calibration sequences are split (seeded): `val_fraction` of them are held out; the rest are
   the planning tokens. With `auto.val_source`, every calibration sequence plans and the
   validation sequences come from that text source instead.
2. One calibration pass over the planning tokens collects what every candidate needs (the union:
   dense samples where one wants them); it is skipped when every candidate is calibration-free.
3. Each candidate (x each budget in `auto.budgets` that it supports) plans from those statistics,
   is applied to a deep copy of the model, and is scored by the mean KL(dense || candidate) of
   next-token distributions over the held-out sequences (`evaluation.agreement.compare_models`).
4. The lowest KL wins (ties: the earlier candidate). Its plan is returned with the comparison,
   which `api.prune` writes to `moeprune_report.json` in the output and the CLI prints.

Memory: the dense model plus one candidate copy at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprune.apply.surgery import apply_plan
from moeprune.auto.config import AutoConfig, candidate_params
from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats
from moeprune.evaluation.agreement import compare_models
from moeprune.plan import Plan, PlanError
from moeprune.strategies import get_strategy, plan

logger = logging.getLogger(__name__)

REPORT_FILE = "moeprune_report.json"


@dataclass
class AutoSelection:
    plan: Plan
    stats: ExpertStats | None
    planning_ids: torch.Tensor
    validation_ids: torch.Tensor
    report: dict[str, Any]


def split_validation(ids: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(planning, validation) rows of `ids`: round(n * fraction) rows (at least 1) chosen with `seed`."""
    n = ids.shape[0]
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise ValueError(f"auto needs at least 2 calibration sequences to hold some out for validation, got {n}; "
                         "raise calibration samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, keep = perm[:n_val].sort().values, perm[n_val:].sort().values
    return ids[keep], ids[val]


def auto_select(model: nn.Module, recipe: Any, ids: torch.Tensor, progress: bool = True,
                meta: dict[str, Any] | None = None, tokenizer: Any = None) -> AutoSelection:
    """Compare the recipe's `auto` candidates on held-out calibration sequences (or on `auto.val_source`
    text, which needs `tokenizer`); see the module doc."""
    cfg = recipe.auto or AutoConfig()
    cal = recipe.calibration
    seed = cal.seed if cfg.val_seed is None else cfg.val_seed
    if cfg.val_source is not None:
        from moeprune.calibration.data import calibration_ids

        if tokenizer is None:
            raise ValueError("auto.val_source needs the model's tokenizer")
        planning, validation = ids, calibration_ids(cfg.val_source, tokenizer, cfg.val_samples, cal.seq_len, seed)
    else:
        planning, validation = split_validation(ids, cfg.val_fraction, seed)
    specs = {name: get_strategy(name) for name in cfg.candidates}
    stats, cal_seconds = None, 0.0
    if any(s.needs_calibration for s in specs.values()):
        dense = max([cal.dense_tokens] + [s.dense_tokens for s in specs.values()])
        extra: dict[str, Any] = {}
        sample = max(s.sample_tokens(recipe.params.get(n, {})) for n, s in specs.items())
        if sample > 0:
            extra = {"sample_tokens": sample, "sample_seed": cal.seed}
        meta = {"source": cal.source, "seed": cal.seed, "auto_validation_sequences": int(validation.shape[0]),
                "num_hidden_layers": model.config.get_text_config().num_hidden_layers, **(meta or {})}
        start = time.perf_counter()
        stats = calibrate(model, planning, batch_size=cal.batch_size, dense_tokens=dense, progress=progress,
                          meta=meta, **extra)
        cal_seconds = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    best: tuple[float, Plan] | None = None
    for name in cfg.candidates:
        for budget in cfg.budgets or [recipe.budget]:
            params = candidate_params(recipe, name, budget)
            if params is None:
                continue
            row: dict[str, Any] = {"strategy": name, "budget": budget}
            start = time.perf_counter()
            try:
                p = plan(stats if specs[name].needs_calibration else None, name, recipe.ratio, model=model, **params)
            except PlanError as err:
                row["error"] = str(err)
                rows.append(row)
                logger.warning("auto: %s (%s budget) cannot plan: %s", name, budget, err)
                continue
            candidate = copy.deepcopy(model)
            apply_plan(candidate, p)
            metrics = compare_models(model, candidate, validation, seq_len=validation.shape[1],
                                     batch_size=cal.batch_size)
            del candidate
            row.update(kl=metrics["kl"], top1_agreement=metrics["top1_agreement"],
                       experts_per_layer=p.experts_per_layer, seconds=round(time.perf_counter() - start, 3))
            rows.append(row)
            if best is None or metrics["kl"] < best[0]:
                best = (metrics["kl"], p)
    if best is None:
        raise PlanError("auto: no candidate could plan; " + "; ".join(f"{r['strategy']}: {r['error']}" for r in rows))
    chosen = best[1]
    selected = {"strategy": chosen.strategy, "budget": chosen.params.get("budget", "layer"), "kl": best[0]}
    report = {
        "format": "moeprune-auto-report",
        "ratio": recipe.ratio,
        "selected": selected,
        "metric": "mean KL(dense || candidate) of next-token distributions on held-out calibration sequences",
        "validation": {"sequences": int(validation.shape[0]), "tokens": int(validation.numel()), "seed": seed,
                       "source": cfg.val_source or f"{cal.source} (held out of planning)"},
        "planning_sequences": int(planning.shape[0]),
        "calibration_seconds": round(cal_seconds, 3),
        "candidates": rows,
    }
    chosen.params["auto"] = {"selected": selected, "candidates": [
        {k: r.get(k) for k in ("strategy", "budget", "kl", "error") if k in r} for r in rows]}
    return AutoSelection(chosen, stats, planning, validation, report)


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a text table, best first."""
    lines = [f"auto: {len(report['candidates'])} candidates at ratio {report['ratio']}, "
             f"KL on {report['validation']['tokens']} held-out tokens",
             f"  {'strategy':<16} {'budget':<7} {'KL':>9} {'top-1':>7}"]
    ok = sorted((r for r in report["candidates"] if "kl" in r), key=lambda r: r["kl"])
    sel = report["selected"]
    for r in ok:
        mark = " <- selected" if (r["strategy"], r["budget"]) == (sel["strategy"], sel["budget"]) else ""
        lines.append(f"  {r['strategy']:<16} {r['budget']:<7} {r['kl']:>9.4f} {r['top1_agreement']:>7.3f}{mark}")
    for r in report["candidates"]:
        if "error" in r:
            lines.append(f"  {r['strategy']:<16} {r['budget']:<7} {'failed':>9}  {r['error']}")
    return "\n".join(lines)
