"""PreMoE's Predicted Expert Utility (PEU) from router logits, in one mergeable pass.

For every token x (all tokens, routed or not) and layer (methods-2026.md section 6):

    E_Ka = TopK(s(x), K_a),   p_i = softmax over E_Ka of s_i        (local softmax)
    r_l  = mean over x of max_i p_i                                   (per-layer threshold)
    s~_i = max(s_i, sigmoid(s_i))  if i in E_Ka and p_i >= r_l, else 0
    PEU_i = mean over x of s~_i

r_l is only known after the whole calibration set, so a literal implementation needs two passes
or a cache of every token's top-K_a logits. We keep instead, per expert, a histogram over the
local probability p of the transformed logits f(s) of its top-K_a entries (`peu_hist`, [E, B + 1]:
B = PEU_BINS equal bins on [0, 1) and one for p = 1, which K_a = 1 always gives) plus the sum of
max p (`peu_maxp_sum`). Both are plain
sums, so statistics of two halves merge into the whole's (and all-reduce across ranks) and the
file stays bounded by E x B whatever the number of tokens. PEU is then read off the histogram
for the final r_l; the bin containing r_l is counted pro rata, so the only approximation is
inside one bin of width 1/B (exact when no entry falls in that bin).

K_a defaults to the model's top-k (the released code fixes K_a = 1; the v3 default was not
retrieved). `peu_vector` computes the same score directly from a block of logits, for queries.
"""

from __future__ import annotations

import torch

PEU_BINS = 256
ONE = 1.0 - 1e-9  # local probabilities at or above this count as 1


def transform(s: torch.Tensor) -> torch.Tensor:
    """PreMoE v3's default f(s) = max(s, sigmoid(s)): keeps selected negative logits above 0."""
    return torch.maximum(s, torch.sigmoid(s))


def local_topk(logits: torch.Tensor, k_a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [N, K], raw logits [N, K], local softmax p [N, K]) of each row's top-K_a logits."""
    k = max(1, min(int(k_a), logits.shape[-1]))
    values, index = logits.topk(k, dim=-1)
    return index, values, values.softmax(dim=-1)


def accumulate_peu(tensors: dict[str, torch.Tensor], logits: torch.Tensor, k_a: int) -> None:
    """Add one batch of float64 router logits [N, E] (valid tokens only) to `peu_hist`/`peu_maxp_sum`."""
    if logits.shape[0] == 0:
        return
    width = tensors["peu_hist"].shape[1]
    bins = width - 1
    index, values, p = local_topk(logits, k_a)
    tensors["peu_maxp_sum"] += p.amax(dim=-1).sum().cpu()
    b = torch.where(p >= ONE, torch.full_like(p, bins), (p * bins).floor().clamp_(0, bins - 1)).long()
    flat = (index * width + b).reshape(-1).cpu()
    hist = tensors["peu_hist"].view(-1)
    hist.index_add_(0, flat, transform(values).reshape(-1).double().cpu())


def peu_from_hist(hist: torch.Tensor, maxp_sum: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(PEU per expert [E], threshold r_l) from the accumulated histogram."""
    n = float(tokens)
    if n <= 0:
        return torch.zeros(hist.shape[0], dtype=torch.float64), 0.0
    bins = hist.shape[1] - 1
    r = float(maxp_sum) / n
    weights = torch.zeros(bins + 1, dtype=torch.float64)
    weights[bins] = 1.0  # p = 1 is >= any threshold
    if r < ONE:
        pos = r * bins
        first = min(int(pos), bins - 1)
        weights[first + 1 : bins] = 1.0
        weights[first] = max(0.0, min(1.0, (first + 1) - pos))  # share of the straddling bin at or above r
    return (hist.double() * weights).sum(1) / n, r


def peu_vector(logits: torch.Tensor, k_a: int, threshold: float | None = None) -> tuple[torch.Tensor, float]:
    """Exact PEU of one block of logits [N, E] (r_l = their own mean max p unless `threshold`)."""
    l64 = logits.double().reshape(-1, logits.shape[-1])
    index, values, p = local_topk(l64, k_a)
    r = float(p.amax(dim=-1).mean()) if threshold is None else float(threshold)
    kept = torch.where((p >= r) | (p >= ONE), transform(values), torch.zeros_like(values))
    out = torch.zeros(l64.shape[-1], dtype=torch.float64)
    out.index_add_(0, index.reshape(-1), kept.reshape(-1))
    return out / max(l64.shape[0], 1), r
