"""How many channels each layer and each expert keeps, and which: the slimming decision rules.

- `uniform_keep`: every expert keeps its own top `width` channels (one width per layer).
- `global_keep`: CAMERA-P's rule, the layer's top `total` micro-experts ranked across all its
  experts, so experts end with different widths (possibly 0).
- `loss_coverage`: MoE-Slimming's split of a global keep budget over layers: layer losses smoothed
  four times (sqrt, then clamp to mean +- std), normalised to mean 1 (lambda_l); a scale s is
  bisected so that keeping in each layer the fewest top channels whose score covers
  min(1, s * lambda_l) of the layer's total keeps the requested share overall.
- `attr_coverage`: MoE-Slimming's split of a layer's budget over experts: w_e = sqrt(max(a_e, 0))
  (normalised), a scale mu bisected so that expert e keeps the fewest top channels covering
  min(1, mu * w_e) of its score, summing to the layer target; the remainder is settled one
  channel at a time by the next channel's score; experts left with 0 < k < min_per_expert are
  emptied and their channels handed to the others the same way. Experts with w_e = 0 get none.

Ties break towards the lower channel index, so results are deterministic.
"""

from __future__ import annotations

import math

import torch


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices of a 1-D score vector, best first (stable: lower index first among equals)."""
    return torch.sort(-scores.double(), stable=True).indices


def uniform_keep(scores: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Each expert's top `width` channels by its own scores [E, I]."""
    width = max(0, min(int(width), scores.shape[1]))
    return [_order(row)[:width].sort().values for row in scores]


def global_keep(scores: torch.Tensor, total: int) -> list[torch.Tensor]:
    """The top `total` (expert, channel) pairs of a layer's scores [E, I], as per-expert sets."""
    e, i = scores.shape
    total = max(0, min(int(total), e * i))
    chosen = _order(scores.reshape(-1))[:total]
    return [chosen[chosen // i == x] % i for x in range(e)]


def _smooth(losses: torch.Tensor) -> torch.Tensor:
    x = losses.double().clamp_min(0)
    for _ in range(4):
        x = x.sqrt()
        if x.numel() > 1:
            m, sd = x.mean(), x.std(unbiased=False)
            x = x.clamp(float(m - sd), float(m + sd))
    return x / x.mean().clamp_min(1e-300)


def _cover_count(cum: torch.Tensor, share: float) -> int:
    """Fewest leading entries whose normalised cumulative sum `cum` reaches `share`."""
    if share <= 0:
        return 0
    return min(int(torch.searchsorted(cum, torch.tensor([share - 1e-12], dtype=cum.dtype))[0]) + 1, cum.numel())


def _cumulative(values: torch.Tensor) -> torch.Tensor:
    v = torch.sort(values.double().clamp_min(0).reshape(-1), descending=True).values
    total = float(v.sum())
    if total <= 0:
        return torch.linspace(1.0 / v.numel(), 1.0, v.numel(), dtype=torch.float64)
    return v.cumsum(0) / total


def _bisect(count, target: int, hi: float) -> float:
    """Smallest scale in [0, hi] (60 halvings) with count(scale) >= target."""
    lo = 0.0
    while count(hi) < target and hi < 1e12:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def loss_coverage(losses: dict[int, float], scores: dict[int, torch.Tensor], keep_share: float) -> dict[int, int]:
    """Channels kept per layer (summing to round(keep_share * all channels))."""
    layers = sorted(scores)
    lam = _smooth(torch.tensor([losses[i] for i in layers]))
    cums = {i: _cumulative(scores[i]) for i in layers}
    sizes = {i: scores[i].numel() for i in layers}
    target = round(keep_share * sum(sizes.values()))

    def counts(s: float) -> dict[int, int]:
        return {i: _cover_count(cums[i], min(1.0, s * float(lam[j]))) for j, i in enumerate(layers)}

    s = _bisect(lambda v: sum(counts(v).values()), target, 1.0 / float(lam.min().clamp_min(1e-12)))
    kept = counts(s)
    while sum(kept.values()) > target:  # the bisection's overshoot: drop the last channel that covers least
        i = min((i for i in layers if kept[i] > 1), key=lambda i: float(cums[i][kept[i] - 1] - cums[i][kept[i] - 2]))
        kept[i] -= 1
    return kept


def _settle(k: list[int], sorted_scores: list[torch.Tensor], active: list[bool], target: int) -> list[int]:
    """Add/remove single channels by the next channel's score until sum(k) == target."""
    k = list(k)
    while sum(k) < target:
        cand = [(float(sorted_scores[e][k[e]]), -e) for e in range(len(k)) if active[e] and k[e] < sorted_scores[e].numel()]
        if not cand:
            break
        k[-max(cand)[1]] += 1
    while sum(k) > target:
        cand = [(float(sorted_scores[e][k[e] - 1]), e) for e in range(len(k)) if k[e] > 0]
        k[min(cand)[1]] -= 1
    return k


def attr_coverage(channel: torch.Tensor, attribution: torch.Tensor, target: int, min_per_expert: int = 16) -> list[torch.Tensor]:
    """Per-expert kept channels of one layer: channel scores c [E, I], attributions a [E]."""
    e, i = channel.shape
    target = max(0, min(int(target), e * i))
    w = attribution.double().clamp_min(0).sqrt()
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / e)
    s = channel.double().clamp_min(0) * attribution.double().clamp_min(0).unsqueeze(1)
    orders = [_order(s[x]) for x in range(e)]
    sorted_scores = [s[x][orders[x]] for x in range(e)]
    cums = [_cumulative(s[x]) for x in range(e)]
    active = [float(w[x]) > 0 for x in range(e)]

    def ks(mu: float) -> list[int]:
        return [_cover_count(cums[x], min(1.0, mu * float(w[x]))) if active[x] else 0 for x in range(e)]

    k = ks(_bisect(lambda mu: sum(ks(mu)), target, 1.0 / float(w[w > 0].min())))
    k = _settle(k, sorted_scores, active, target)
    small = [x for x in range(e) if 0 < k[x] < min_per_expert]
    if small and len(small) < sum(1 for x in range(e) if k[x] > 0):
        for x in small:
            k[x], active[x] = 0, False
        k = _settle(k, sorted_scores, active, target)
    return [orders[x][: k[x]].sort().values for x in range(e)]


def width_for(intermediate: int, ratio: float) -> int:
    """Channels kept per expert when `ratio` of them are removed (at least one)."""
    return max(1, intermediate - math.floor(intermediate * ratio))
