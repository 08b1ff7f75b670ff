"""Tests for the offline stdlib corpora: split hygiene, determinism, held-out shares, errors."""

from __future__ import annotations

import pytest

from moeprune.calibration import builtin_corpus as bc
from moeprune.calibration.builtin_corpus import builtin_documents


@pytest.mark.parametrize("domain", ["code", "prose", "mixed"])
def test_splits_disjoint_and_cover_all(domain: str) -> None:
    train = builtin_documents(domain, "train")
    heldout = builtin_documents(domain, "heldout")
    everything = builtin_documents(domain, "all")
    assert train and heldout
    assert len(train) + len(heldout) == len(everything)
    assert sorted(train + heldout) == sorted(everything)
    # Disjoint by content: repeated texts are kept once, so none can sit in both splits.
    assert not set(train) & set(heldout)


def test_deterministic_and_returns_fresh_lists() -> None:
    a = builtin_documents("code", "train")
    a.append("mutated")
    b = builtin_documents("code", "train")
    assert b[-1] != "mutated"
    assert builtin_documents("mixed", "heldout") == builtin_documents("mixed", "heldout")


def test_heldout_shares() -> None:
    code_all = builtin_documents("code", "all")
    code_held = builtin_documents("code", "heldout")
    assert 0.015 < len(code_held) / len(code_all) < 0.08  # ~4% by md5 bucket
    scan = bc._scan()
    # Topics are the first prose documents: about one in seven is held out.
    from pydoc_data.topics import topics

    n_topics = sum(1 for t in topics.values() if t.strip())
    topic_flags = [held for _, held in scan["prose"][:n_topics]]
    assert 0.05 < sum(topic_flags) / n_topics < 0.30


def test_bucket_rule_by_hand() -> None:
    # md5("json/decoder.py") decides the split; recompute independently.
    import hashlib

    key = "json/decoder.py"
    expected = int(hashlib.md5(key.encode()).hexdigest(), 16) % 100 < 4
    assert bc._code_is_heldout(key) is expected


def test_mixed_interleaves_both_domains() -> None:
    mixed = builtin_documents("mixed", "heldout")
    code = builtin_documents("code", "heldout")
    prose = builtin_documents("prose", "heldout")
    assert sorted(mixed) == sorted(code + prose)
    # Both domains appear within the first quarter: truly interleaved, not concatenated.
    head = set(mixed[: max(4, len(mixed) // 4)])
    assert head & set(code) and head & set(prose)


def test_interleave_by_hand() -> None:
    assert bc._interleave(["a", "b", "c", "d"], ["x", "y"]) == ["a", "b", "x", "c", "d", "y"]
    assert bc._interleave([], ["x"]) == ["x"]


@pytest.mark.parametrize("domain,split", [("poetry", "train"), ("code", "validation")])
def test_unknown_names_raise(domain: str, split: str) -> None:
    with pytest.raises(ValueError):
        builtin_documents(domain, split)
