"""The fine-grained bundled model `builtin:tiny-moe-64`: loads offline, shares tiny-moe's tokenizer,
and predicts held-out text (built-in and third-party) far better than a uniform guess."""

from __future__ import annotations

import math

import pytest
import torch

from moeprune.io.loading import ASSET_DIR, ASSET_DIR_64, BUNDLED_64, load_model, resolve_model_path

needs_asset = pytest.mark.skipif(not (ASSET_DIR_64 / "model.safetensors").is_file(), reason="tiny-moe-64 not bundled")


@needs_asset
def test_loads_offline_and_beats_uniform(monkeypatch) -> None:
    from moeprune.calibration.builtin_corpus import builtin_documents
    from moeprune.evaluation.perplexity import encode_texts, perplexity_from_ids

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path(BUNDLED_64) == str(ASSET_DIR_64)
    model, tok, path = load_model(BUNDLED_64, dtype=torch.float32)
    cfg = model.config
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == ("qwen3_moe", 64, 8, 64)
    assert (ASSET_DIR_64 / "tokenizer.json").read_bytes() == (ASSET_DIR / "tokenizer.json").read_bytes()
    uniform = cfg.vocab_size  # perplexity of a uniform guess
    for domain in ("code", "third-party-prose"):
        ids = encode_texts(tok, builtin_documents(domain, "heldout"), max_tokens=1024)
        ppl = perplexity_from_ids(model, ids, seq_len=256, progress=False)
        assert math.isfinite(ppl) and ppl < uniform / 10
