"""How closely a pruned model tracks its dense reference, token by token.

Perplexity can hide behaviour changes (a pruned model can be confidently wrong in new places).
Over the same non-overlapping windows as :mod:`perplexity`, this measures the share of positions
where both models' top-1 next-token predictions agree, and the mean KL(reference ‖ candidate) of
their next-token distributions (natural log, averaged over predicted positions).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.evaluation.perplexity import _logits, count_windows, iter_windows


def kl_and_agreement(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> tuple[float, int, int]:
    """(summed KL(ref ‖ cand), top-1 agreements, positions) for logits of shape ``[..., V]``."""
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1).reshape(-1, ref_logits.shape[-1])
    cand_logp = torch.log_softmax(cand_logits.float(), dim=-1).reshape(-1, cand_logits.shape[-1])
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1)
    agree = (ref_logp.argmax(dim=-1) == cand_logp.argmax(dim=-1)).sum()
    return kl.sum().item(), int(agree.item()), ref_logp.shape[0]


@torch.no_grad()
def compare_models(
    reference: nn.Module, candidate: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8
) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference ‖ candidate) over predicted positions of ``ids``.

    Returns:
        ``{"top1_agreement": float in [0, 1], "kl": float >= 0, "positions": int}``.
    """
    kl_sum, agree, positions = 0.0, 0, 0
    states = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        n_batches = count_windows(ids.numel(), seq_len, batch_size)
        for batch in tqdm(iter_windows(ids, seq_len, batch_size), total=n_batches, desc="compare",
                          leave=False):
            ref = _logits(reference, batch)[:, :-1]
            cand = _logits(candidate, batch)[:, :-1].to(ref.device)
            k, a, p = kl_and_agreement(ref, cand)
            kl_sum, agree, positions = kl_sum + k, agree + a, positions + p
    finally:
        reference.train(states[0])
        candidate.train(states[1])
    if positions == 0:
        raise ValueError("need at least two tokens to compare models")
    return {"top1_agreement": agree / positions, "kl": kl_sum / positions, "positions": positions}
