"""Router-calibration tokens held apart from the planning tokens.

The draw packs documents exactly like `calibration.data.pack_documents` (same seeded document order,
eos-joined, non-overlapping windows of `seq_len`), from a pool large enough for both sets, drops
every window identical to a planning window, and samples the rest with a different seeded stream.
With the same source, seq_len and seed the planning windows are windows of this pool, so the two
sets share no window.

`validation_documents` holds whole documents out of that draw (`skip_documents`), for scoring
router-KD candidates on text none of them trained on (`moeprune.recover.choose`).
"""

from __future__ import annotations

import random
from collections.abc import Collection

import torch

from moeprune.calibration.data import POOL_FACTOR
from moeprune.evaluation.perplexity import encode_texts

SEED_OFFSET = 104_729  # a different stream than the planning draw (which uses seed and seed + 1)


def held_apart_ids(
    source: str, tokenizer, samples: int, seq_len: int, seed: int = 0, exclude: torch.Tensor | None = None,
    skip_documents: Collection[int] = (),
) -> torch.Tensor:
    """[samples, seq_len] token ids from `source`'s train split, none equal to a row of `exclude`,
    none from the documents (indices into the split) in `skip_documents`."""
    from moeprune.evaluation.text_sources import load_texts

    texts = load_texts(source, split="train")
    if skip_documents:
        skip = set(skip_documents)
        texts = [t for i, t in enumerate(texts) if i not in skip]
    if not texts:
        raise ValueError(f"{source}: no documents for router calibration")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    excluded = set()
    if exclude is not None and exclude.shape[-1] == seq_len:
        excluded = {bytes(row.numpy().astype("<i8").tobytes()) for row in exclude.reshape(-1, seq_len)}
    needed = (samples + len(excluded)) * seq_len
    ids = encode_texts(tokenizer, [texts[i] for i in order], max_tokens=POOL_FACTOR * needed)
    windows = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    free = [i for i in range(windows.shape[0]) if bytes(windows[i].numpy().astype("<i8").tobytes()) not in excluded]
    if len(free) < samples:
        raise ValueError(f"{source} has {len(free)} windows of {seq_len} tokens besides the planning tokens, fewer "
                         f"than router_kd.samples = {samples}; lower router_kd.samples or seq_len")
    chosen = sorted(random.Random(seed + SEED_OFFSET).sample(free, samples))
    return windows[chosen].clone()


def validation_documents(source: str, tokenizer, samples: int, seq_len: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """(document indices, [samples, seq_len] ids): whole documents of `source`'s train split, in a
    seeded order, until they pack into `samples` windows. A document that alone holds more than
    twice the tokens needed is passed over, so that one long document does not take a large share
    of the text left for training."""
    from moeprune.evaluation.text_sources import load_texts

    texts = load_texts(source, split="train")
    order = list(range(len(texts)))
    random.Random(seed + 2 * SEED_OFFSET).shuffle(order)
    need = samples * seq_len
    chosen: list[int] = []
    have = 0
    for i in order:
        if have >= need:
            break
        n = len(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if n <= 2 * need:
            have += n + (1 if chosen else 0)  # documents are joined by one eos token
            chosen.append(i)
    ids = encode_texts(tokenizer, [texts[i] for i in chosen])
    if ids.numel() < need or len(chosen) == len(texts):
        raise ValueError(f"{source} cannot spare {samples} validation sequences of {seq_len} tokens in whole documents "
                         "and keep text for router calibration; lower router_kd.val_samples")
    return sorted(chosen), ids[:need].view(samples, seq_len).clone()
