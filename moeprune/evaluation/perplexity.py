"""Perplexity the way pruning papers report it (wanda, REAP, NAEE style).

Texts are joined with the eos token into one token stream, the stream is cut into non-overlapping
windows of ``seq_len`` tokens, every window is scored independently (no context carried over), and
perplexity is ``exp`` of the mean next-token NLL over all predicted tokens (``seq_len - 1`` per full
window). A trailing partial window of at least two tokens is scored too, so short texts still count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moeprune.data.texts import encode_texts  # noqa: F401  (re-exported: evaluation API)


def iter_windows(ids: torch.Tensor, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``[b, L]`` batches of non-overlapping windows (full windows, then the remainder)."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    ids = ids.reshape(-1)
    n_full = ids.numel() // seq_len
    full = ids[: n_full * seq_len].view(n_full, seq_len)
    for start in range(0, n_full, batch_size):
        yield full[start : start + batch_size]
    rest = ids[n_full * seq_len :]
    if rest.numel() >= 2:
        yield rest.unsqueeze(0)


def count_windows(n_tokens: int, seq_len: int, batch_size: int) -> int:
    n_full = n_tokens // seq_len
    return math.ceil(n_full / batch_size) + int(n_tokens - n_full * seq_len >= 2)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device)).logits.float()


def token_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a ``[b, L]`` batch (``b * (L - 1)`` predicted tokens)."""
    logits = _logits(model, batch)[:, :-1]
    targets = batch[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


@torch.no_grad()
def nll_from_ids(
    model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> tuple[float, int]:
    """(summed NLL, number of predicted tokens) over non-overlapping windows of ``ids``."""
    total, count = 0.0, 0
    n_batches = count_windows(ids.numel(), seq_len, batch_size)
    for batch in tqdm(iter_windows(ids, seq_len, batch_size), total=n_batches, desc="ppl",
                      disable=not progress, leave=False):
        total += token_nll(model, batch).item()
        count += batch.shape[0] * (batch.shape[1] - 1)
    return total, count


@torch.no_grad()
def perplexity_from_ids(
    model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the 1-D token stream ``ids``."""
    was_training = model.training
    model.eval()
    try:
        total, count = nll_from_ids(model, ids, seq_len, batch_size, progress)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("need at least two tokens to compute perplexity")
    return math.exp(total / count)


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``model`` on ``texts`` (joined with eos, windows of ``seq_len``).

    Args:
        max_tokens: cap on the joined token stream (the first ``max_tokens`` tokens are used).
    """
    ids = encode_texts(tokenizer, texts, max_tokens)
    return perplexity_from_ids(model, ids, seq_len=seq_len, batch_size=batch_size)
