"""Third-party held-out text: reachable as builtin sources, deterministic, disjoint from training."""

from __future__ import annotations

import hashlib

import pytest

from moeprune.calibration import third_party_corpus as tp
from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.evaluation.text_sources import load_texts


@pytest.mark.parametrize("domain", tp.DOMAINS)
def test_sources_splits_and_sizes(domain: str) -> None:
    held = load_texts(f"builtin:{domain}")  # --data default split: heldout
    calib = load_texts(f"builtin:{domain}", split="train")  # what --calibration reads
    assert held == tp.third_party_documents(domain, "heldout")
    assert not set(held) & set(calib)
    assert sorted(builtin_documents(domain, "all")) == sorted(held + calib)
    for split, docs in (("heldout", held), ("train", calib)):
        chars = sum(map(len, docs))
        assert tp.BUDGET_CHARS[split] <= chars < tp.BUDGET_CHARS[split] + tp.MAX_DOC_CHARS
        assert all(tp.MIN_DOC_CHARS <= len(d.strip()) and len(d) <= tp.MAX_DOC_CHARS for d in docs)
    keys = [k for k, _ in tp._select(domain, "heldout")]
    assert len({k.split("/")[0] for k in keys}) >= 10  # many packages, not one big one
    # md5 of the key decides role and split (a METADATA description is always prose).
    assert all(tp.role_and_split(k)[1] == "heldout" for k in keys)
    assert all(tp.role_and_split(k)[0] == domain.split("-")[-1] for k in keys if not k.endswith("/METADATA"))


def test_no_document_shared_with_training_text() -> None:
    train = set(builtin_documents("code", "train")) | set(builtin_documents("prose", "train"))
    for domain in tp.DOMAINS:
        docs = tp.third_party_documents(domain, "all")
        assert not train & set(docs)
        # Not even as a large piece: no third-party document's opening 300 characters occur in training text.
        joined = "\x00".join(sorted(train))
        assert not any(d[:300] in joined for d in docs)


def test_deterministic_and_fresh_lists() -> None:
    first = tp.third_party_documents("third-party-code")
    first.append("mutated")
    assert tp.third_party_documents("third-party-code")[-1] != "mutated"
    # Recomputed from scratch (bypassing the cache): same keys and texts.
    assert tp._select.__wrapped__("third-party-prose", "heldout") == tp._select("third-party-prose", "heldout")


def test_a_larger_budget_extends_the_same_selection() -> None:
    """Task items from more text (bench_quality --task-budget) keep the default documents first."""
    default = tp._select("third-party-prose", "heldout")
    larger = tp._select("third-party-prose", "heldout", tp.BUDGET_CHARS["heldout"] + 20_000)
    assert larger[: len(default)] == default and len(larger) > len(default)
    assert tp.BUDGET_CHARS["heldout"] + 20_000 <= sum(len(t) for _, t in larger)
    assert all(tp.role_and_split(k)[1] == "heldout" for k, _ in larger)


def test_role_and_split_by_hand() -> None:
    key = "transformers/utils/loading_report.py"
    h = int(hashlib.md5(key.encode()).hexdigest(), 16)
    assert tp.role_and_split(key) == ("code" if h % 2 == 0 else "prose", "train" if (h // 2) % 3 == 0 else "heldout")


def test_manifest_records_versions_and_documents() -> None:
    manifest = tp.third_party_manifest()
    assert manifest["packages"]["torch"] and manifest["packages"]["transformers"]
    docs = manifest["documents"]["third-party-code/heldout"]
    texts = tp.third_party_documents("third-party-code")
    assert [d["md5"] for d in docs] == [hashlib.md5(t.encode()).hexdigest() for t in texts]


def test_unknown_domain_and_split() -> None:
    with pytest.raises(ValueError, match="third-party"):
        tp.third_party_documents("third-party-poetry")
    with pytest.raises(ValueError, match="split"):
        tp.third_party_documents("third-party-code", "validation")


def test_third_party_mixed_interleaves_both_domains_per_split() -> None:
    from moeprune.calibration.builtin_corpus import builtin_documents

    for split in ("train", "heldout"):
        mixed = builtin_documents("third-party-mixed", split)
        code, prose = (builtin_documents(f"third-party-{d}", split) for d in ("code", "prose"))
        assert sorted(mixed) == sorted(code + prose)
    assert not set(builtin_documents("third-party-mixed", "train")) & set(builtin_documents("third-party-mixed", "heldout"))
