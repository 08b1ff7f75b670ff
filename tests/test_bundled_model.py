"""The bundled tiny MoE: loads offline from the package (fast), and its experts specialise (slow).

The specialisation test is the reason the model exists: pruning strategies can only be compared on
a model where removing the most-used experts hurts far more than removing the least-used ones.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import moeprune

ASSET = Path(moeprune.__file__).parent / "assets" / "tiny-moe"
needs_asset = pytest.mark.skipif(
    not (ASSET / "model.safetensors").is_file(), reason="bundled model not trained yet (scripts/train_tiny_moe.py)"
)


def _load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    return model, tok


@needs_asset
def test_bundled_model_loads_offline_and_beats_uniform() -> None:
    model, tok = _load()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3_moe", 6, 16, 2)
    assert cfg.output_router_logits is False
    assert len(tok) == cfg.vocab_size == 8192
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    code = "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n"
    ids = tok(code, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == code  # byte-level BPE round-trips exactly
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 0.6 * math.log(cfg.vocab_size)  # far better than uniform


@needs_asset
def test_eval_cli_self_comparison(tmp_path) -> None:
    from click.testing import CliRunner

    from moeprune.cli.eval_cmd import eval_command

    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_command, [str(ASSET), "--compare", str(ASSET), "--data", "builtin:code",
                                               "--max-tokens", "300", "--seq-len", "64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["tokens"] for r in rows] == [300, 300]
    assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"])
    assert rows[1]["top1_agreement"] == 1.0 and rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@needs_asset
def test_dropping_most_used_experts_hurts_most() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads can be >10x slower
    try:
        _check_specialisation()
    finally:
        torch.set_num_threads(threads)


def _check_specialisation() -> None:
    from moeprune.calibration.builtin_corpus import builtin_documents
    from moeprune.evaluation import encode_texts, experts_by_frequency, mask_experts, perplexity_from_ids, routing_frequencies

    model, tok = _load()
    calib_docs = {d: builtin_documents(d, "train") for d in ("code", "prose")}
    for docs in calib_docs.values():
        random.Random(0).shuffle(docs)
    freq = 0.65 * routing_frequencies(model, encode_texts(tok, calib_docs["code"], 32768)) + \
        0.35 * routing_frequencies(model, encode_texts(tok, calib_docs["prose"], 32768))
    heldout = encode_texts(tok, builtin_documents("code", "heldout"))  # full held-out code, as in the card

    def ppl(dropped: dict[int, list[int]]) -> float:
        with mask_experts(model, dropped):
            return perplexity_from_ids(model, heldout, 256, 8, progress=False)

    dense = ppl({})
    low = ppl(experts_by_frequency(freq, 0.5, highest=False))
    high = ppl(experts_by_frequency(freq, 0.5, highest=True))
    randoms = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        randoms.append(ppl({layer: torch.randperm(16, generator=g)[:8].tolist() for layer in range(6)}))
    print(f"dense {dense:.2f} least {low:.2f} most {high:.2f} random {[round(r, 2) for r in randoms]}")
    assert dense < low
    assert high > 1.5 * low
    assert high > max(randoms)
    assert sum(randoms) / 3 > low
