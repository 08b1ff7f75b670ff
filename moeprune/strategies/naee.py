"""NAEE expert pruning (algorithms.md section 3, methods-2026.md section 5): per layer, keep the expert
subset whose MoE output is closest to the dense output on calibration tokens.

For a kept set S, Y_S(x) is the block output with the dropped experts' router logits at -inf: the
router re-selects its top-k among the survivors and renormalises as the model does. The objective
is ||Y - Y_S||_F over a seeded sample of calibration tokens (`calibration/token_sample.py` stores,
per token, the logits, the model's gates and the Gram matrix G of every expert's output, so
||Y(x) - Y_S(x)||^2 = d^T G(x) d with d = g(x) - g_S(x); shared experts cancel).

- Search: every C(E, r) subset when that is <= `max_subsets` ("exact"), else greedy backward
  elimination (drop, one at a time, the expert whose removal increases the error least). Which one
  ran, the number of subsets scored and the relative error ||Y - Y_S|| / ||Y|| are recorded per layer
  in the plan params.
- Inputs: every layer's sample comes from the dense model's calibration pass, i.e. the reference's
  layer-wise mode (`layerwise_pruning`: X and Z cached in one forward of the original model, layers
  independent), not its progressive mode. It runs in memory and with `--offload` alike, because the
  sample is collected by the same observer hooks in both.
- Deviations: one Frobenius norm over the token sample instead of a sum of per-batch norms over all
  tokens (same argmin in the limit of one batch); the rule that turns logits into gates is checked
  against the model's own gates on the sample, and routers it cannot reproduce (sigmoid scoring,
  group-limited selection) are refused.
- Expert scores in the plan: the error of dropping that expert alone (higher = more important).
"""

from __future__ import annotations

import itertools
import logging
import math

import torch

from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.strategies.registry import register_strategy
from moeprune.strategies.selection import check_ratio, routing_of

logger = logging.getLogger(__name__)

NAEE_SAMPLE_TOKENS = 2048
NAEE_MAX_SUBSETS = 4096
_CHUNK_ELEMENTS = 4_000_000  # subsets x tokens x experts scored at once


class LayerSample:
    """The token sample of one layer: logits [N, E], model gates [N, E], expert-output Gram [N, E, E]."""

    def __init__(self, logits: torch.Tensor, gates: torch.Tensor, gram: torch.Tensor, top_k: int,
                 renormalize: bool, scale: float = 1.0) -> None:
        self.logits, self.gates, self.gram = logits.double(), gates.double(), gram.double()
        self.top_k, self.renormalize, self.scale = int(top_k), bool(renormalize), float(scale)

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[1])

    def dense_energy(self) -> float:
        """||Y||^2 over the sample (routed part)."""
        g = self.gates
        return float(torch.einsum("ne,nef,nf->", g, self.gram, g))

    def gates_for(self, keep: torch.Tensor) -> torch.Tensor:
        """[S, N, E] gates when only the experts of each row of `keep` [S, E] (bool) may be selected."""
        masked = self.logits.unsqueeze(0).masked_fill(~keep.unsqueeze(1), float("-inf"))
        probs = masked.softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter_(-1, index, weights * self.scale)

    def errors(self, keep: torch.Tensor) -> torch.Tensor:
        """[S] squared Frobenius error sum_x ||Y(x) - Y_S(x)||^2 for each kept set (bool rows)."""
        n, e = self.logits.shape
        step = max(1, _CHUNK_ELEMENTS // max(1, n * e))
        out = []
        for start in range(0, keep.shape[0], step):
            d = (self.gates_for(keep[start : start + step]) - self.gates.unsqueeze(0)).transpose(0, 1)  # [N, S, E]
            out.append(((d @ self.gram) * d).sum(-1).sum(0))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def fit_routing(logits: torch.Tensor, gates: torch.Tensor, top_k: int, scale: float) -> bool:
    """Whether the model renormalises its top-k softmax weights, read off its own gates; raises
    PlanError when neither softmax -> top-k rule reproduces them."""
    probs = logits.double().softmax(dim=-1)
    weights, index = probs.topk(top_k, dim=-1)
    selected = gates.gt(0).sum(-1) > 0
    model_index = gates.topk(top_k, dim=-1).indices.sort(-1).values
    agree = (index.sort(-1).values == model_index).all(-1) | ~selected
    best, best_err = None, math.inf
    for renorm in (True, False):
        w = weights / weights.sum(-1, keepdim=True) if renorm else weights
        fitted = torch.zeros_like(probs).scatter_(-1, index, w * scale)
        err = float((fitted - gates.double()).abs()[agree].mean()) if bool(agree.any()) else math.inf
        if err < best_err:
            best, best_err = renorm, err
    if float(agree.double().mean()) < 0.99 or best_err > 1e-2:
        raise PlanError(
            f"naee cannot reproduce this router's gates from its logits (selection agreement "
            f"{float(agree.double().mean()):.3f}, gate error {best_err:.3g}); it supports softmax top-k routers"
        )
    return bool(best)


def layer_sample(ls: LayerStats, top_k: int, scale: float) -> LayerSample:
    t = ls.tensors
    if "sample_gram" not in t or t["sample_gram"].shape[0] == 0:
        raise PlanError(
            "naee needs a token sample with expert outputs: calibrate with sample_tokens > 0 "
            f"(`moeprune calibrate --sample-tokens {NAEE_SAMPLE_TOKENS}`; `moeprune prune` does it automatically)"
        )
    renorm = fit_routing(t["sample_logits"], t["sample_gates"], top_k, scale)
    return LayerSample(t["sample_logits"], t["sample_gates"], t["sample_gram"], top_k, renorm, scale)


def _masks(subsets: list[tuple[int, ...]], num_experts: int) -> torch.Tensor:
    keep = torch.zeros(len(subsets), num_experts, dtype=torch.bool)
    for row, s in enumerate(subsets):
        keep[row, list(s)] = True
    return keep


def search_exact(sample: LayerSample, keep_count: int) -> tuple[list[int], float, int]:
    """Best kept set over all C(E, keep_count) subsets: (kept, squared error, subsets scored).
    Ties go to the first subset in lexicographic order."""
    e = sample.num_experts
    best, best_err, scored = None, math.inf, 0
    combos = itertools.combinations(range(e), keep_count)
    while True:
        chunk = list(itertools.islice(combos, 1024))
        if not chunk:
            break
        errs = sample.errors(_masks(chunk, e))
        i = int(torch.argmin(errs))
        if float(errs[i]) < best_err:
            best, best_err = list(chunk[i]), float(errs[i])
        scored += len(chunk)
    return best, best_err, scored


def search_greedy(sample: LayerSample, keep_count: int) -> tuple[list[int], float, int]:
    """Backward elimination: repeatedly drop the expert whose removal increases the error least
    (lowest index among ties). Returns (kept, squared error, subsets scored)."""
    kept = list(range(sample.num_experts))
    err, scored = 0.0, 0
    while len(kept) > keep_count:
        candidates = [tuple(j for j in kept if j != drop) for drop in kept]
        errs = sample.errors(_masks(candidates, sample.num_experts))
        i = int(torch.argmin(errs))
        err, scored = float(errs[i]), scored + len(candidates)
        kept = list(candidates[i])
    return kept, err, scored


def drop_one_errors(sample: LayerSample) -> torch.Tensor:
    """[E] squared error of dropping each expert alone."""
    e = sample.num_experts
    keep = ~torch.eye(e, dtype=torch.bool)
    return sample.errors(keep)


@register_strategy(
    "naee", "keep the expert subset whose masked-router output best reconstructs the layer (NAEE; exact or greedy)",
)
def naee(
    stats: ExpertStats, ratio: float, budget: str = "layer", search: str = "auto",
    max_subsets: int = NAEE_MAX_SUBSETS, sample_tokens: int = NAEE_SAMPLE_TOKENS,
) -> Plan:
    """`search`: "auto" (exact when C(E, kept) <= max_subsets, else greedy), "exact" or "greedy".
    `sample_tokens` is the calibration sample per layer (read by the calibration step)."""
    check_ratio(ratio)
    if budget != "layer":
        raise PlanError("naee keeps the same number of experts in every layer (budget='layer')")
    if search not in ("auto", "exact", "greedy"):
        raise PlanError(f"naee search must be 'auto', 'exact' or 'greedy', got {search!r}")
    routing, top_k, n_group = routing_of(stats)
    if n_group > 1 or routing.get("scoring", "softmax") != "softmax" or routing.get("identity_experts"):
        raise PlanError(
            "naee supports softmax top-k routers without identity experts; this model routes with "
            f"{routing.get('scoring')} scoring, n_group={n_group} and {routing.get('identity_experts', 0)} "
            "identity experts (use reap or frequency)"
        )
    scale = float(routing.get("routed_scaling_factor", 1.0) or 1.0)
    layers, which, scored, rel, renorm = {}, {}, {}, {}, None
    for index, ls in sorted(stats.layers.items()):
        sample = layer_sample(ls, top_k, scale)
        renorm = sample.renormalize
        e = sample.num_experts
        keep_count = e - math.floor(e * ratio)
        subsets = math.comb(e, keep_count)
        exact = search == "exact" or (search == "auto" and subsets <= max_subsets)
        if search == "exact" and subsets > max_subsets:
            raise PlanError(f"layer {index}: exact naee would score C({e}, {keep_count}) = {subsets} subsets, "
                            f"more than max_subsets={max_subsets}; raise max_subsets or use search='greedy'")
        kept, err, n = (search_exact if exact else search_greedy)(sample, keep_count)
        energy = sample.dense_energy()
        which[str(index)], scored[str(index)] = "exact" if exact else "greedy", n
        rel[str(index)] = math.sqrt(err / energy) if energy > 0 else 0.0
        scores = [float(x) for x in drop_one_errors(sample)]
        layers[index] = LayerPlan(layer=index, num_experts=e, kept=sorted(kept), scores=scores)
        logger.info("naee layer %d: %s over %d subsets, relative error %.4f", index, which[str(index)], n, rel[str(index)])
    params = {
        "ratio": ratio, "search": which, "subsets_scored": scored, "relative_error": rel, "max_subsets": max_subsets,
        "mode": "layerwise (dense inputs)", "sample_tokens": int(next(iter(stats.layers.values())).tensors.get(
            "sample_keys", torch.zeros(0)).numel()) if stats.layers else 0, "renormalize": renorm,
    }
    return Plan(strategy="naee", params=params, layers=layers, top_k=top_k, routing=routing)
