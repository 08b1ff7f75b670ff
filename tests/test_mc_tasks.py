"""Generated multiple-choice tasks and the native log-likelihood scorer (lm-eval's rules)."""

from __future__ import annotations

import math

import pytest
import torch

from moeprune.evaluation import mc_tasks
from moeprune.evaluation.mc_score import accuracy, choice_loglikelihoods, choice_loglikelihoods_reference, encode_pair
from moeprune.testing.tiny_tokenizer import byte_tokenizer


def _code_docs(n: int = 6) -> list[str]:
    docs = []
    for d in range(n):
        lines = [f"def function_{d}_{i}(value_{i}, other):\n    result = value_{i} * {i} + other_{d}\n"
                 f"    return compute_{d}(result, value_{i})" for i in range(6)]
        docs.append("\n\n".join(lines))
    return docs


def _prose_docs(n: int = 6) -> list[str]:
    return [" ".join(f"Sentence number {i} of document {d} describes how the widget {i} behaves when it is "
                     f"configured for case {d}." for i in range(8)) for d in range(n)]


@pytest.mark.parametrize("name,docs", [("moeprune_next_line", _code_docs()), ("moeprune_prose_continuation", _prose_docs())])
def test_generator_deterministic_and_well_formed(name: str, docs: list[str]) -> None:
    items = mc_tasks.generate_task(name, docs, n_items=20, seed=3)
    assert items == mc_tasks.generate_task(name, docs, n_items=20, seed=3)
    assert items != mc_tasks.generate_task(name, docs, n_items=20, seed=4)
    for item in items:
        assert len(item["choices"]) == mc_tasks.NUM_CHOICES == len(set(item["choices"]))
        assert 0 <= item["label"] < mc_tasks.NUM_CHOICES
        assert item["context"] == item["context"].rstrip()  # choices carry the separator
        own = int(item["source"].removeprefix("doc"))
        # The answer truly continues the context in its own document; distractors come from others.
        assert item["context"] + item["choices"][item["label"]] in docs[own]
        for k, choice in enumerate(item["choices"]):
            if k != item["label"]:
                assert choice.strip() not in docs[own]
    with pytest.raises(ValueError, match="only"):
        mc_tasks.generate_task(name, docs[:2], n_items=500)


def test_shipped_tasks_size_chance_and_not_training_text(tmp_path) -> None:
    from moeprune.calibration.builtin_corpus import builtin_documents

    train = "\x00".join(builtin_documents("code", "train") + builtin_documents("prose", "train"))
    for name in mc_tasks.TASKS:
        items = mc_tasks.load_task(name)
        assert len(items) >= 500
        labels = [it["label"] for it in items]
        assert accuracy(items, [[0.0] * 4 for _ in items])["chance"] == pytest.approx(0.25)
        assert all(labels.count(k) > 80 for k in range(4))  # the answer's position is not a giveaway
        # No item comes from training text (answer in context).
        assert not any(it["context"] + it["choices"][it["label"]] in train for it in items)
    path = mc_tasks.write_task("demo_task", mc_tasks.load_task("moeprune_next_line")[:3], tmp_path)
    assert mc_tasks.load_task("demo_task", tmp_path) == mc_tasks.load_task("moeprune_next_line")[:3]
    assert "target_delimiter: \"\"" in path.with_suffix(".yaml").read_text()


def test_more_held_out_text_gives_more_items() -> None:
    from moeprune.calibration.third_party_corpus import BUDGET_CHARS, _select

    name = "moeprune_prose_continuation"
    with pytest.raises(ValueError, match="only"):  # the default text yields about 700 prose items
        mc_tasks.generate_task(name, n_items=900)
    items = mc_tasks.generate_task(name, n_items=900, budget_chars=BUDGET_CHARS["heldout"] + 60_000)
    default_docs = {key for key, _ in _select(mc_tasks.TASKS[name], "heldout")}
    assert len(items) == 900 and {it["source"] for it in items} - default_docs  # new documents' items
    with pytest.raises(ValueError, match="budget_chars"):
        mc_tasks.generate_task(name, docs=["x"], budget_chars=10)


def test_accuracy_by_hand() -> None:
    items = [{"context": "a", "choices": [" x", " yyyy"], "label": 1},
             {"context": "b", "choices": [" x", " y"], "label": 0}]
    lls = [[-1.0, -2.0], [-1.0, -3.0]]  # raw picks 0, 0; per char picks 1 (-0.4 > -0.5), 0
    uncond = [[-0.5, -5.0], [-2.0, -1.0]]  # mutual info: [-0.5, 3.0] -> 1; [1.0, -2.0] -> 0
    out = accuracy(items, lls, uncond)
    assert out["acc"] == 0.5 and out["acc_norm"] == 1.0 and out["acc_mutual_info"] == 1.0
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.5 / 2)) and out["chance"] == 0.5
    assert out["acc_hits"] == [0, 1] and out["acc_norm_hits"] == [1, 1] and out["acc_mutual_info_hits"] == [1, 1]


def test_encode_pair_follows_lm_eval() -> None:
    tok = byte_tokenizer()
    ctx, cont = encode_pair(tok, "ab ", "c")  # trailing space moves to the continuation
    assert (ctx, cont) == (tok.encode("ab"), tok.encode(" c"))
    assert encode_pair(tok, "", "xy") == ([tok.eos_token_id], tok.encode("xy"))


def test_cached_scorer_matches_full_sequences() -> None:
    from moeprune.testing.tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe").eval()
    tok = byte_tokenizer()
    items = [{"context": "x" * n, "choices": ["\nab", "\ncdef", "\ng", "\nhij"], "label": 0} for n in (3, 7, 12)]
    items.append({"context": "", "choices": [" a", " bb", " c", " dd"], "label": 1})
    fast = choice_loglikelihoods(model, tok, items, max_batch_tokens=64)  # several batches, padded
    ref = choice_loglikelihoods_reference(model, tok, items)
    assert torch.allclose(torch.tensor(fast), torch.tensor(ref), atol=1e-4)


@pytest.mark.slow
def test_lm_eval_matches_native_scorer() -> None:
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.evaluation.lm_eval_bridge import run_lm_eval
    from moeprune.evaluation.mc_score import score_items
    from moeprune.io.loading import bundled_model_path

    path = bundled_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    results = run_lm_eval(model, tok, tasks=list(mc_tasks.TASKS), limit=20, batch_size=8)
    for name in mc_tasks.TASKS:
        native = score_items(model, tok, mc_tasks.load_task(name)[:20])
        for metric in ("acc", "acc_norm", "acc_mutual_info"):
            assert results[name][f"{metric},none"] == pytest.approx(native[metric])
