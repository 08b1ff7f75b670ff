"""SparseGPT (Frantar & Alistarh 2023) for one linear: prune and fix up the remaining weights.

H = sum x x^T over the calibration inputs (the 2/n factor cancels), damped by 0.01 * mean(diag H).
Columns are processed left to right in blocks of 128; inside a block the mask is chosen from
w^2 / [H^-1]_jj^2 (with [H^-1] the upper Cholesky factor of the inverse Hessian, as in the paper),
and each pruned column's error is propagated onto the not-yet-processed columns (OBS update).
Here the mask keeps the per-row count exact: a row loses round(s * in) weights overall, split over
blocks, so the requested sparsity is met exactly per row like Wanda's. N:M picks per m columns.
Rare experts give ill-conditioned Hessians; damping is raised tenfold until Cholesky succeeds.
"""

from __future__ import annotations

import logging

import torch

from moeprune.sparsify.masks import prune_count

logger = logging.getLogger(__name__)


def _inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1."""
    diag_mean = torch.diag(hessian).mean()
    damp = percdamp * (diag_mean if diag_mean > 0 else torch.tensor(1.0, dtype=hessian.dtype))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + damp * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10
            logger.debug("Hessian not positive definite; raising damping to %g", float(damp))
    raise torch.linalg.LinAlgError("Hessian stays singular even with heavy damping")


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [rows, cols] marking the k lowest scores of each row (True = prune)."""
    prune = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        prune.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    return prune


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Pruned and error-compensated copy of `weight` [out, in] given H = sum x x^T [in, in]."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight inputs {cols}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={nm[1]}")
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs the input width ({cols}) to be a multiple of {nm[1]}")
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_factor(H, percdamp)
    total_k = prune_count(cols, sparsity) if nm is None else 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        if nm is None:
            k = int(round(total_k * i2 / cols)) - int(round(total_k * i1 / cols))
            prune = _lowest(W1**2 / diag.unsqueeze(0) ** 2, k)
        else:
            prune = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                block = W1[:, i : i + m] ** 2 / diag[i : i + m].unsqueeze(0) ** 2
                prune[:, i : i + m] = _lowest(block, m - n)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[prune[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
