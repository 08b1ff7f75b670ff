"""Held-out perplexity on the built-in corpora, printed by `moeprune prune --eval`."""

from __future__ import annotations

from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.evaluation.perplexity import perplexity


def heldout_perplexities(model, tokenizer, max_tokens: int, seq_len: int = 256) -> dict[str, float]:
    """{"code": ppl, "prose": ppl} on the held-out split, capped at `max_tokens` tokens each."""
    return {
        domain: perplexity(model, tokenizer, builtin_documents(domain, "heldout"), seq_len=seq_len, max_tokens=max_tokens)
        for domain in ("code", "prose")
    }
