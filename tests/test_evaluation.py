"""Evaluation metrics checked against hand computations, plus text sources, reports and plots."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moeprune.evaluation.agreement import compare_models, kl_and_agreement
from moeprune.evaluation.perplexity import iter_windows, nll_from_ids, perplexity, perplexity_from_ids
from moeprune.evaluation.report import format_table, write_csv, write_json
from moeprune.evaluation.routing_mask import find_routers, mask_experts
from moeprune.evaluation.routing_stats import experts_by_frequency, routing_entropy, routing_frequencies, total_variation
from moeprune.evaluation.text_sources import load_texts


class FixedLogits(nn.Module):
    """Looks like a causal LM: the same next-token logits at every position."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.tensor(logits), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, t, -1).clone())


class CharTokenizer:
    """Minimal tokenizer: one id per character (a=1, b=2, ...), eos id 0."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) - ord("a") + 1 for c in text]}


def test_uniform_model_perplexity_equals_vocab_size() -> None:
    vocab = 7
    model = FixedLogits([0.0] * vocab)
    ids = torch.randint(0, vocab, (100,))
    assert perplexity_from_ids(model, ids, seq_len=16, batch_size=3) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_by_hand_two_token_vocab() -> None:
    # p(0) = 1/4, p(1) = 3/4 everywhere; one window [0, 1, 1, 0] predicts 1, 1, 0.
    model = FixedLogits([0.0, math.log(3.0)])
    ids = torch.tensor([0, 1, 1, 0])
    expected = math.exp(-(2 * math.log(0.75) + math.log(0.25)) / 3)
    assert perplexity_from_ids(model, ids, seq_len=4) == pytest.approx(expected, rel=1e-6)


def test_windows_do_not_overlap_and_count_predicted_tokens() -> None:
    model = FixedLogits([0.0, 0.0])
    ids = torch.arange(10) % 2
    windows = [w for b in iter_windows(ids, 4, 1) for w in b]
    assert [w.tolist() for w in windows] == [[0, 1, 0, 1], [0, 1, 0, 1], [0, 1]]
    assert nll_from_ids(model, ids, seq_len=4, batch_size=2, progress=False)[1] == 3 + 3 + 1
    assert nll_from_ids(model, ids[:9], seq_len=4, batch_size=2, progress=False)[1] == 6  # 1-token rest dropped


def test_perplexity_joins_texts_with_eos_and_caps_tokens() -> None:
    vocab = 5
    model = FixedLogits([0.0] * vocab)
    # "ab" + eos + "cd" -> [1, 2, 0, 3, 4]; cap 4 tokens -> one window, 3 predicted tokens.
    assert perplexity(model, CharTokenizer(), ["ab", "cd"], seq_len=8, max_tokens=4) == pytest.approx(vocab)


def test_identical_models_agree_with_zero_kl() -> None:
    torch.manual_seed(0)
    model = FixedLogits(torch.randn(11).tolist())
    out = compare_models(model, model, torch.randint(0, 11, (50,)), seq_len=10, batch_size=2)
    assert out["top1_agreement"] == 1.0
    assert out["kl"] == pytest.approx(0.0, abs=1e-7)
    assert out["positions"] == 5 * 9


def test_kl_two_token_case_by_hand() -> None:
    ref = torch.log(torch.tensor([[0.75, 0.25]]))
    cand = torch.log(torch.tensor([[0.25, 0.75]]))
    kl, agree, n = kl_and_agreement(ref, cand)
    assert kl == pytest.approx(0.75 * math.log(3) + 0.25 * math.log(1 / 3), rel=1e-6)  # = 0.5 ln 3
    assert (agree, n) == (0, 1)
    ref_model, cand_model = FixedLogits(ref[0].tolist()), FixedLogits(cand[0].tolist())
    out = compare_models(ref_model, cand_model, torch.tensor([0, 1, 0]), seq_len=3)
    assert out["kl"] == pytest.approx(0.5 * math.log(3), rel=1e-6)
    assert out["top1_agreement"] == 0.0


def test_mask_experts_runs_the_routers_own_code_on_masked_logits() -> None:
    model = _tiny_qwen3_moe()
    router = find_routers(model)[0]
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    logits = hidden @ router.weight.T
    with mask_experts(model, {0: [3, 6]}):
        masked, weights, index = router(hidden)
    probs = logits.clone()
    probs[:, [3, 6]] = float("-inf")
    top = probs.softmax(-1).topk(2, dim=-1)  # by hand: softmax over the rest, top-2, renormalised
    assert torch.isinf(masked[:, [3, 6]]).all() and torch.equal(index, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    assert torch.equal(router(hidden)[0], logits)  # unmasked after the context
    record: dict = {}
    with mask_experts(model, {0: [3, 6]}, record=record):
        router(hidden)
        router(hidden[:2])
    assert list(record) == [0] and [t.shape[0] for t in record[0]] == [5, 2]  # every call, as masked
    assert torch.equal(record[0][0], masked)


def test_mask_experts_masks_a_correction_bias_and_restores_it() -> None:
    from moeprune.adapters import find_moe_layers
    from moeprune.testing.tiny_models import tiny_model

    model = tiny_model("deepseek_v3")
    layer = find_moe_layers(model)[0]
    bias = layer.router.e_score_correction_bias
    bias[2] = 10.0  # picks expert 2 for every token; after a logit mask alone it would still, at weight 0
    before = bias.clone()
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    assert (layer.router(hidden)[2] == 2).any(dim=1).all()
    with mask_experts(model, {layer.layer: [2]}):
        assert bias[2] == float("-inf")
        index = layer.router(hidden)[2]
    assert not (index == 2).any()
    assert torch.equal(bias, before)


def _tiny_qwen3_moe() -> nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for router in find_routers(model).values():
            router.weight.normal_(0, 1.0)
    return model


def test_mask_experts_changes_routing_and_restores() -> None:
    model = _tiny_qwen3_moe()
    ids = torch.randint(0, 64, (64,))
    before = routing_frequencies(model, ids, seq_len=16)
    assert set(find_routers(model)) == {0, 1}
    dropped = {0: [0, 1, 2], 1: [5]}
    with mask_experts(model, dropped):
        during = routing_frequencies(model, ids, seq_len=16)
        masked_logits = model(input_ids=ids[None, :16]).logits
    after = routing_frequencies(model, ids, seq_len=16)
    assert during[0, [0, 1, 2]].sum() == 0 and during[1, 5] == 0
    assert torch.equal(before, after)  # hooks removed
    assert not torch.allclose(masked_logits, model(input_ids=ids[None, :16]).logits)
    assert before.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_mask_experts_validates() -> None:
    model = _tiny_qwen3_moe()
    with pytest.raises(ValueError, match="top_k"):
        with mask_experts(model, {0: list(range(7))}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with mask_experts(model, {0: [8]}):
            pass
    with pytest.raises(ValueError, match="no supported router"):
        with mask_experts(model, {9: [0]}):
            pass


def test_routing_stats_by_hand() -> None:
    freq = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    assert routing_entropy(freq).tolist() == pytest.approx([2.0, 1.0])
    assert total_variation(freq[:1], freq[1:]).tolist() == pytest.approx([0.5])
    freq2 = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    assert experts_by_frequency(freq2, 0.5, highest=True) == {0: [1, 2]}
    assert experts_by_frequency(freq2, 0.5, highest=False) == {0: [0, 3]}


def test_text_sources_local_files(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n  \n\nthird\n")
    assert load_texts(str(txt)) == ["first doc\nline two", "second doc", "third"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "", "z"])) + "\n")
    assert load_texts(str(jsonl)) == ["x y", "z"]
    assert load_texts(str(jsonl), max_docs=1) == ["x y"]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "2.txt").write_text("two")
    (folder / "1.txt").write_text("one\n\nstill one")
    assert load_texts(str(folder)) == ["one\n\nstill one", "two"]
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        load_texts(str(bad))


def test_text_sources_via_datasets_loaders(tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)) + "\n")
    assert load_texts(f"hf:json:{jsonl}") == [f"doc {i}" for i in range(5)]
    assert load_texts(f"hf:json:{jsonl}", max_docs=2) == ["doc 0", "doc 1"]
    txt = tmp_path / "lines.txt"
    txt.write_text("alpha\nbeta\n")
    assert load_texts(f"hf:text:{txt}") == ["alpha", "beta"]


def test_text_sources_builtin() -> None:
    from moeprune.calibration.builtin_corpus import builtin_documents

    assert load_texts("builtin:prose", max_docs=3) == builtin_documents("prose", "heldout")[:3]
    assert load_texts("builtin:code", split="train", max_docs=2) == builtin_documents("code", "train")[:2]
    with pytest.raises(ValueError):
        load_texts("builtin:poetry")


def test_report_formats(tmp_path) -> None:
    rows = [{"model": "dense", "ppl": 19.4}, {"model": "pruned-50", "ppl": 39.61234, "kl": 0.5}]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["model", "ppl", "kl"]
    assert table[3].split() == ["pruned-50", "39.6123", "0.5000"]
    write_json(rows, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    write_csv(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == ["model,ppl,kl", "dense,19.4,", "pruned-50,39.61234,0.5"]


def test_plots_write_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import numpy as np

    from moeprune.evaluation.plots import plot_perplexity_bars, plot_perplexity_vs_compression, plot_routing_heatmaps

    rows = [{"strategy": s, "compression": c, "perplexity": 20 * (1 + c) * k}
            for s, k in (("frequency", 1.0), ("random", 1.5)) for c in (0.25, 0.5)]
    p1 = plot_perplexity_vs_compression(rows, tmp_path / "ppl.png", dense=19.4)
    before = np.full((3, 8), 1 / 8)
    after = before.copy()
    after[:, :4] = np.nan
    p2 = plot_routing_heatmaps(before, after, tmp_path / "heat.png")
    p3 = plot_perplexity_bars([{"model": "a/dense", "data": "builtin:code", "perplexity": 19.4},
                               {"model": "b/pruned", "data": "builtin:code", "perplexity": 39.6}], tmp_path / "bars.png")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
