"""Router KD with the sample count chosen per model: `router_kd.samples: [64, 512]`.

The best number of router-calibration sequences differed between the bundled models (README,
"Router KD on more text": 512 ahead on tiny-moe, 64 on tiny-moe-64), so a recipe can list several
and let evidence decide, the way `--strategy auto` chooses a strategy:

    choice = prepare_kd_choice(model, tokenizer, config, ...)   # dense model: every teacher cache
    ... apply the plan, sparsify ...
    report = run_kd_choice(model, choice)                       # compressed: the best routers kept

1. Before compression, whole documents of the KD source are held out for validation (seeded,
   `kd_data.validation_documents`), and the dense model's top-k next-token distributions on
   `val_samples` windows of them are cached. Whole documents, because an unused window of a training
   document sits next to the windows a candidate trained on: with 512 of broad text's ~600 windows
   drawn, such a window measures how well the candidate fits text it has mostly seen.
2. Each candidate count gets the tokens and teacher cache a recipe with that one count would get
   from the remaining documents (`prepare_router_kd(..., skip_documents=)`).
3. After compression, each candidate trains on its own copy of the compressed model and is scored by
   the mean KL(dense || candidate) on the validation cache (`cache_kl`). With `average: true` the
   mean of the candidates' router parameters is scored too (a uniform soup). The lowest KL wins
   (ties: the earlier candidate, the soup last); its router parameters are copied into the model.

Memory: the compressed model plus one copy at a time, and one teacher cache per candidate.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprune.recover.config import RouterKDConfig
from moeprune.recover.kd_data import validation_documents
from moeprune.recover.router_kd import cache_kl
from moeprune.recover.router_params import router_parameters
from moeprune.recover.run import RouterKDPrep, prepare_router_kd, run_router_kd
from moeprune.recover.teacher_cache import TeacherCache, build_teacher_cache

__all__ = ["KDChoice", "prepare_kd_choice", "run_kd_choice"]

METRIC = "mean KL(dense || candidate) of top-k next-token distributions on sequences of held-out documents"


@dataclass
class KDChoice:
    candidates: list[RouterKDPrep]
    validation: TeacherCache
    info: dict[str, Any]
    average: bool = False


def prepare_kd_choice(
    model: nn.Module, tokenizer: Any, config: RouterKDConfig, source: str, seq_len: int, seed: int,
    planning_ids: torch.Tensor | None = None, batch_size: int = 8, progress: bool = True,
) -> KDChoice:
    """Run on the UNCOMPRESSED model: the validation cache and every candidate's teacher cache."""
    source, seq_len = config.source or source, config.seq_len or seq_len
    seed = config.seed if config.seed is not None else seed
    documents, val_ids = validation_documents(source, tokenizer, config.val_samples, seq_len, seed)
    validation = build_teacher_cache(model, val_ids, k=config.top_k, batch_size=batch_size, progress=progress)
    candidates = [prepare_router_kd(model, tokenizer, config.with_samples(n), source, seq_len, seed,
                                    planning_ids=planning_ids, batch_size=batch_size, progress=progress,
                                    skip_documents=documents)
                  for n in config.sample_choices]
    info = {"metric": METRIC, "source": source, "sequences": config.val_samples, "seq_len": seq_len, "seed": seed,
            "documents": len(documents)}
    return KDChoice(candidates, validation, info, average=config.average)


def run_kd_choice(model: nn.Module, choice: KDChoice, progress: bool = True) -> dict[str, Any]:
    """Train every candidate on a copy of the compressed `model`, keep the best routers in `model`.

    Returns the selected candidate's router-KD report (for the soup: the first candidate's, its
    training curves) with a `choice` entry: the validation set, every candidate's sample count and
    validation KL, the uncalibrated model's KL, and the selection.
    """
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    trained: list[tuple[float, dict[str, torch.Tensor], dict[str, Any]]] = []
    uncalibrated = cache_kl(model, choice.validation)
    for prep in choice.candidates:
        candidate = copy.deepcopy(model)
        report = run_router_kd(candidate, prep, progress=progress)
        kl = cache_kl(candidate, choice.validation)
        rows.append({"samples": prep.config.samples, "kl": kl, "seconds": report["global"]["seconds"]})
        trained.append((kl, {name: p.detach().clone() for name, p in router_parameters(candidate).items()}, report))
        del candidate
    assert trained  # at least one candidate (RouterKDConfig.sample_choices)
    best = min(range(len(trained)), key=lambda i: trained[i][0])  # ties: the earlier candidate
    kl, routers, report = trained[best]
    selected: dict[str, Any] = {"samples": report["sequences"], "kl": kl}
    if choice.average:
        soup = {name: torch.stack([t[1][name] for t in trained]).mean(dim=0) for name in routers}
        _load_routers(model, soup)
        soup_kl = cache_kl(model, choice.validation)
        counts = [row["samples"] for row in rows]
        rows.append({"samples": f"mean of {counts}", "kl": soup_kl})
        if soup_kl < kl:
            kl, routers, report = soup_kl, soup, trained[0][2]
            selected = {"samples": f"mean of {counts}", "kl": kl, "average": True}
    _load_routers(model, routers)
    report = dict(report)
    report["choice"] = {**choice.info, "kl_uncalibrated": uncalibrated, "candidates": rows,
                        "selected": selected, "seconds": round(time.perf_counter() - started, 3)}
    return report


def _load_routers(model: nn.Module, routers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in router_parameters(model).items():
            param.copy_(routers[name].to(param.dtype))
