"""Calibration token batches: resolve a source, tokenise, pack into fixed-length sequences.

Sources are the spec strings shared with evaluation (`moeprune.data.texts.load_texts`):
`builtin:code`, `builtin:prose`, `builtin:mixed` (the offline stdlib corpora, train split), a local
.txt/.jsonl file, or a Hugging Face dataset name. Documents are shuffled with the seed, joined with
the eos token and cut into non-overlapping windows of `seq_len` tokens; `samples` windows are drawn
with the seed from a pool of up to `POOL_FACTOR` times the tokens needed, so one long file cannot
fill the whole calibration set. There is no padding: every token is a real calibration token.
"""

from __future__ import annotations

import random

import torch

from moeprune.data.texts import encode_texts, load_texts

POOL_FACTOR = 8


def pack_documents(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] token ids from `texts` (shuffled with `seed`), eos-joined, no padding."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    if not texts:
        raise ValueError("calibration source has no documents")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    needed = samples * seq_len
    ids = encode_texts(tokenizer, [texts[i] for i in order], max_tokens=POOL_FACTOR * needed)
    if ids.numel() < needed:
        raise ValueError(
            f"calibration source has {ids.numel()} tokens, fewer than samples x seq_len = {needed}; "
            "lower --samples or --seq-len"
        )
    windows = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    chosen = sorted(random.Random(seed + 1).sample(range(windows.shape[0]), samples))
    return windows[chosen].clone()


def calibration_ids(source: str, tokenizer, samples: int = 64, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Resolve `source` and pack it (builtin corpora use their train split)."""
    texts = load_texts(source, split="train")
    return pack_documents(tokenizer, texts, samples, seq_len, seed)
