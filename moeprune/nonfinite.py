"""NaN/Inf in weights or statistics: a clear error naming layer, tensor and expert, never silence.

`check_weights` scans a loaded model before calibration. Non-finite values in a routed expert's
slice of a per-expert tensor (fused expert weights, router rows) are attributed to that expert;
anywhere else (attention, embeddings, shared experts) they are fatal. With `allow=True`
(`--allow-nonfinite`) the broken experts are excluded instead: their weights and router rows are
zeroed in memory (so calibration of the other experts and of later layers stays finite) and
`exclude_from_plan` guarantees the plan drops them. `check_stats` does the same for statistics
(e.g. an overflow during calibration), and the streamed writer refuses to write non-finite tensors.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers

logger = logging.getLogger(__name__)

FIX = "fix or re-download the checkpoint, or pass --allow-nonfinite to drop the broken experts"


class NonFiniteError(ValueError):
    """NaN or Inf in a model's weights or in calibration statistics."""


_CHUNK = 1 << 24  # elements per isfinite pass: temporaries stay ~tens of MB, not a layer's size


_MINMAX_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """`torch.isfinite(t).all()` without a tensor-sized mask: the minimum and maximum of `t` (one
    pass, no temporary; NaN propagates through both, an Inf is an extreme) are finite exactly when
    every element is. ~40x faster than `isfinite` on bf16 CPU tensors, where `isfinite` ran at about
    disk speed (~300 MB/s) and was the largest cost of a streamed prune. Other dtypes (float8):
    `isfinite` in chunks, so checking a fused [E, 2I, H] tensor allocates no tensor-sized mask."""
    t = t.detach()
    if t.numel() == 0:
        return True
    if t.dtype in _MINMAX_DTYPES:
        low, high = torch.aminmax(t)
        return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    return all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(_CHUNK))


def nonfinite_rows(t: torch.Tensor) -> list[int]:
    """Indices along dim 0 of `t` holding NaN/Inf, checked a few rows at a time (after one fast
    whole-tensor check, so a finite tensor costs one min/max pass)."""
    t = t.detach()
    if all_finite(t):
        return []
    step = max(1, _CHUNK // max(1, t[0].numel())) if t.shape[0] else 1
    return [start + int(j) for start in range(0, t.shape[0], step)
            for j in (~torch.isfinite(t[start:start + step])).reshape(min(step, t.shape[0] - start), -1).any(1).nonzero().flatten()]


def _per_expert_tensors(model: nn.Module, layer: MoELayer) -> dict[str, torch.Tensor]:
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for module in (layer.experts, *layer.router.modules()):
        prefix = names[id(module)]
        for name, t in module.named_parameters(recurse=False):
            if t.dim() >= 1 and t.shape[0] == layer.num_experts:
                out[f"{prefix}.{name}"] = t
    return out


def nonfinite_weights(model: nn.Module) -> tuple[dict[int, dict[int, list[str]]], list[str]]:
    """({MoE layer: {expert: [tensor names]}}, [other tensor names]) holding NaN/Inf."""
    per_expert: dict[int, dict[int, list[str]]] = {}
    attributed: set[str] = set()
    for layer in find_moe_layers(model):
        for name, t in _per_expert_tensors(model, layer).items():
            attributed.add(name)
            if not t.is_floating_point():
                continue
            bad = nonfinite_rows(t)
            for j in bad:
                per_expert.setdefault(layer.layer, {}).setdefault(int(j), []).append(name)
    other = [n for n, p in model.named_parameters()
             if n not in attributed and p.is_floating_point() and p.device.type != "meta" and not all_finite(p)]
    return per_expert, other


def check_weights(model: nn.Module, allow: bool = False) -> dict[int, list[int]]:
    """Raise NonFiniteError for NaN/Inf weights; with `allow`, exclude (zero) broken experts and
    return them as {layer: [experts]}."""
    per_expert, other = nonfinite_weights(model)
    if other:
        raise NonFiniteError(f"tensor {other[0]} holds NaN/Inf (not an expert's weights, cannot be dropped; "
                             f"{len(other)} such tensors); fix or re-download the checkpoint")
    if not per_expert:
        return {}
    if not allow:
        layer, experts = next(iter(sorted(per_expert.items())))
        expert, names = next(iter(sorted(experts.items())))
        total = sum(len(e) for e in per_expert.values())
        raise NonFiniteError(f"layer {layer}, expert {expert}: {names[0]} holds NaN/Inf ({total} broken experts in "
                             f"layers {sorted(per_expert)}); {FIX}")
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    with torch.no_grad():
        for index, experts in per_expert.items():
            tensors = _per_expert_tensors(model, layers[index])
            for expert in experts:
                for t in tensors.values():
                    t[expert].zero_()
    excluded = {i: sorted(e) for i, e in sorted(per_expert.items())}
    logger.warning("--allow-nonfinite: excluding experts with NaN/Inf weights %s", excluded)
    return excluded


def check_stats(stats, allow: bool = False) -> dict[int, list[int]]:
    """Raise NonFiniteError for non-finite statistics (naming layer, experts and fields); with
    `allow`, zero those experts' statistics and return them as {layer: [experts]}."""
    excluded: dict[int, list[int]] = {}
    for index, layer in sorted(stats.layers.items()):
        e = layer.num_experts
        bad: dict[int, list[str]] = {}
        for name, t in layer.tensors.items():
            if t.dim() >= 1 and t.shape[0] == e:
                rows = (~torch.isfinite(t)).reshape(e, -1).any(1).nonzero().flatten().tolist()
                for j in rows:
                    bad.setdefault(int(j), []).append(name)
            elif not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"layer {index}: statistic {name} is not finite; the model's outputs overflowed or "
                                     "its weights hold NaN/Inf; " + FIX)
        if not bad:
            continue
        if not allow:
            j, names = next(iter(sorted(bad.items())))
            raise NonFiniteError(f"layer {index}, expert {j}: statistics {sorted(names)[:3]} are not finite "
                                 f"(experts {sorted(bad)}); the expert's weights likely hold NaN/Inf; {FIX}")
        for name, t in layer.tensors.items():
            if t.dim() >= 1 and t.shape[0] == e:
                t[sorted(bad)] = 0
                if t.dim() == 2 and t.shape[1] == e:
                    t[:, sorted(bad)] = 0
        excluded[index] = sorted(bad)
    if excluded:
        logger.warning("--allow-nonfinite: excluding experts with non-finite statistics %s", excluded)
    return excluded


def exclude_from_plan(plan, excluded: dict[int, list[int]]) -> None:
    """Make `plan` drop every excluded expert, keeping each layer's count (and group balance):
    an excluded kept expert is replaced by the best-scored dropped one (same group for
    group-limited routers); excluded merge members leave their group. Recorded in plan.params."""
    from moeprune.plan import PlanError

    if not excluded:
        return
    n_group = int(plan.routing.get("n_group", 1) or 1)
    for index, experts in excluded.items():
        lp = plan.layers.get(index)
        if lp is None:
            continue
        bad = set(experts)
        size = lp.num_experts // n_group
        if lp.groups is not None:
            weights = lp.group_weights or [[1.0 / len(g)] * len(g) for g in lp.groups]
            pairs = [[(m, w) for m, w in zip(g, ws) if m not in bad] for g, ws in zip(lp.groups, weights)]
            lp.groups = [[m for m, _ in ps] or [g[0]] for ps, g in zip(pairs, lp.groups)]
            lp.group_weights = [[w / total for _, w in ps] if ps and (total := sum(w for _, w in ps)) else [1.0]
                                for ps in pairs]
        scores = lp.scores
        for slot, j in enumerate(list(lp.kept)):
            if j not in bad:
                continue
            used = set(lp.kept) | {m for g in (lp.groups or []) for m in g}
            pool = [c for c in range(lp.num_experts) if c not in used and c not in bad and (n_group == 1 or c // size == j // size)]
            if not pool:
                raise PlanError(f"layer {index}: no finite expert left to replace excluded expert {j}")
            best = max(pool, key=lambda c: (scores[c] if scores is not None and scores[c] is not None else float("-inf"), -c))
            lp.kept[slot] = best
            if lp.groups is not None:
                group = [best] + [m for m in lp.groups[slot] if m != best and m not in bad]
                lp.groups[slot] = group
                lp.group_weights[slot] = [1.0 / len(group)] * len(group)
        if n_group > 1:
            order = sorted(range(len(lp.kept)), key=lambda s: lp.kept[s])
            lp.kept = [lp.kept[s] for s in order]
            if lp.groups is not None:
                lp.groups = [lp.groups[s] for s in order]
                lp.group_weights = [lp.group_weights[s] for s in order] if lp.group_weights is not None else None
    plan.params["nonfinite_excluded"] = {str(i): e for i, e in sorted(excluded.items())}
    plan.validate()


def check_loaded(model: nn.Module, names: list[str]) -> None:
    """Raise NonFiniteError when one of the just-loaded tensors `names` holds NaN/Inf (streamed
    calibration checks each decoder layer as it is read), naming the tensor and, for per-expert
    tensors of a MoE layer, the expert."""
    tensors = dict(model.named_parameters())
    for name in names:
        t = tensors.get(name)
        if t is None or not t.is_floating_point() or all_finite(t):
            continue
        for layer in find_moe_layers(model):
            per_expert = _per_expert_tensors(model, layer)
            if name in per_expert:
                j = int((~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(1).nonzero()[0])
                raise NonFiniteError(f"layer {layer.layer}, expert {j}: {name} holds NaN/Inf; fix or re-download the "
                                     "checkpoint, or drop --offload and pass --allow-nonfinite to drop the broken experts")
        raise NonFiniteError(f"tensor {name} holds NaN/Inf; fix or re-download the checkpoint")
