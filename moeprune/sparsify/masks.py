"""Pure tensor math: importance scores -> keep masks (unstructured per row, or N:M).

Every function takes a 2-D weight laid out like `nn.Linear.weight` ([out, in]): a row is one output
channel, a column one input channel. Masks are boolean, True = keep. Pruning is per output row, as
in Wanda: each row loses exactly `round(sparsity * in)` weights (unstructured), or `m - n` weights in
every group of `m` consecutive input columns (N:M, e.g. 2:4 keeps 2 of every 4).
"""

from __future__ import annotations

import torch


def parse_nm(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): n weights kept in every m consecutive inputs."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, (tuple, list)):
        n, m = int(spec[0]), int(spec[1])
    else:
        try:
            n_s, m_s = str(spec).split(":")
            n, m = int(n_s), int(m_s)
        except ValueError as err:
            raise ValueError(f"N:M pattern must look like '2:4', got {spec!r}") from err
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < n < m, got {n}:{m}")
    return n, m


def prune_count(columns: int, sparsity: float) -> int:
    """Weights removed from a row of `columns` inputs at `sparsity`."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(round(sparsity * columns))


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing the `round(sparsity * in)` lowest-scoring weights of every row."""
    rows, cols = scores.shape
    k = prune_count(cols, sparsity)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    # stable sort: ties broken by column index so results are deterministic
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    mask.scatter_(1, order, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the `n` highest scores of every `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, drop, False)
    return mask.reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """N:M mask when `nm` is given (sparsity is then 1 - n/m), else the unstructured mask."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_:,j||_2 from the per-input-channel sum of squares of the inputs.

    With `sq_sum` = sum over routed tokens of g^2 x_j^2 this is MoE-Pruner's router-weighted score.
    """
    if sq_sum.shape[-1] != weight.shape[1]:
        raise ValueError(f"input statistics have {sq_sum.shape[-1]} channels, weight has {weight.shape[1]} inputs")
    return weight.abs().float() * sq_sum.float().clamp_min(0).sqrt().unsqueeze(0)


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """OWL: share of scores above `m` times the mean score, over all tensors of one layer."""
    flat = torch.cat([s.reshape(-1).float() for s in scores]) if scores else torch.zeros(0)
    if flat.numel() == 0:
        return 0.0
    mean = flat.mean()
    return float((flat > m * mean).float().mean())
