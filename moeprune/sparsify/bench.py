"""One-call compressed variants for benchmark rows (STUN's comparison).

    model2, report = compressed_variant(model, ids, strategy="reap", ratio=0.25, method="wanda", sparsity=0.5)
    model3, report = compressed_variant(model, ids, ratio=0.0, method="wanda", total_sparsity=0.625)

The input model is deep-copied and left untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.sparsify.run import SparsifyReport, sparsify
from moeprune.strategies import plan as make_plan


def compressed_variant(
    model: nn.Module,
    ids: torch.Tensor,
    strategy: str = "reap",
    ratio: float = 0.25,
    method: str = "wanda",
    sparsity: float = 0.5,
    total_sparsity: float | None = None,
    batch_size: int = 8,
    progress: bool = False,
    strategy_params: dict[str, Any] | None = None,
    **sparsify_kwargs: Any,
) -> tuple[nn.Module, SparsifyReport]:
    """Copy of `model` with `ratio` of experts removed by `strategy`, then intra-expert `method`
    at `sparsity` (or at `total_sparsity` over routed-expert parameters, counting the removal)."""
    variant = copy.deepcopy(model)
    result_plan = None
    if ratio > 0:
        stats = calibrate(variant, ids, batch_size=batch_size, progress=progress,
                          meta={"num_hidden_layers": variant.config.get_text_config().num_hidden_layers})
        result_plan = make_plan(stats, strategy, ratio, model=variant, **(strategy_params or {}))
        apply_plan(variant, result_plan)
    report = sparsify(variant, ids, method, sparsity, total_sparsity_target=total_sparsity, plan=result_plan,
                      batch_size=batch_size, progress=progress, **sparsify_kwargs)
    return variant, report
