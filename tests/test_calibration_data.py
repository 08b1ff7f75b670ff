"""Calibration packing: fixed-length, no padding, reproducible per seed, every source kind."""

from __future__ import annotations

import json

import pytest
import torch

from moeprune.calibration.data import calibration_ids, pack_documents
from moeprune.testing.tiny_tokenizer import byte_tokenizer

DOCS = [f"document number {i} " * 3 for i in range(40)]


def test_packing_shape_seed_and_eos_joins():
    tok = byte_tokenizer()
    a = pack_documents(tok, DOCS, samples=5, seq_len=20, seed=1)
    b = pack_documents(tok, DOCS, samples=5, seq_len=20, seed=1)
    c = pack_documents(tok, DOCS, samples=5, seq_len=20, seed=2)
    assert a.shape == (5, 20) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    short = pack_documents(tok, [f"doc {i}" for i in range(100)], samples=5, seq_len=20, seed=1)
    assert ((short == tok.eos_token_id).sum(1) >= 2).all()  # documents are joined by eos, not padded
    text = tok.decode(a.reshape(-1).tolist())
    assert "number" in text and "document" in text


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than samples x seq_len"):
        pack_documents(byte_tokenizer(), ["tiny"], samples=4, seq_len=64)


def test_local_jsonl_and_hf_json_loader(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    tok = byte_tokenizer()
    local = calibration_ids(str(path), tok, samples=3, seq_len=16, seed=0)
    via_datasets = calibration_ids(f"hf:json:{path}", tok, samples=3, seq_len=16, seed=0)
    assert torch.equal(local, via_datasets)


def test_builtin_mixed_has_code_and_prose():
    tok = byte_tokenizer()
    ids = calibration_ids("builtin:mixed", tok, samples=8, seq_len=256, seed=0)
    text = tok.decode(ids.reshape(-1).tolist())
    assert "def " in text or "import " in text
    assert ids.shape == (8, 256)
