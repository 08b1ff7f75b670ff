"""PreMoE: PEU on hand-made logits, the one-pass histogram, the strategy, task patterns and retrieval."""

from __future__ import annotations

import math

import pytest
import torch

import moeprune
from moeprune.calibration.peu import PEU_BINS, accumulate_peu, peu_from_hist, peu_vector
from moeprune.patterns import build_patterns, first_router_logits, nearest_task, pattern_plan
from moeprune.testing.tiny_models import random_batch, tiny_model

# token 1: top-2 = experts 0 (2.0), 1 (0.0); token 2: experts 1 (-0.5), 0 (-1.0); token 3: experts 2 (3.0), 3 (1.0)
LOGITS = torch.tensor([[2.0, 0.0, -1.0, -3.0], [-1.0, -0.5, -2.0, -4.0], [0.0, 0.0, 3.0, 1.0]])


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_peu_by_hand_top2_threshold():
    # local softmax of (2, 0) and (3, 1): max p = sigmoid(2) = 0.8808; of (-0.5, -1): sigmoid(0.5) = 0.6225
    r = (2 * _sig(2.0) + _sig(0.5)) / 3
    peu, threshold = peu_vector(LOGITS, k_a=2)
    assert threshold == pytest.approx(r)
    # above r: token 1 expert 0 (f(2) = 2) and token 3 expert 2 (f(3) = 3); token 2's top entry (0.62) is below
    assert peu.tolist() == pytest.approx([2 / 3, 0.0, 1.0, 0.0])


def test_peu_by_hand_top1_transform_keeps_negative_logits_positive():
    peu, threshold = peu_vector(LOGITS, k_a=1)
    assert threshold == pytest.approx(1.0)
    # token 2's top logit is -0.5: f(-0.5) = max(-0.5, sigmoid(-0.5)) = 0.3775 > 0
    assert peu.tolist() == pytest.approx([2 / 3, _sig(-0.5) / 3, 1.0, 0.0])


@pytest.mark.parametrize("k_a", [1, 2, 3])
def test_one_pass_histogram_matches_direct_and_merges(k_a):
    def fresh():
        return {"peu_hist": torch.zeros(4, PEU_BINS + 1, dtype=torch.float64), "peu_maxp_sum": torch.zeros((), dtype=torch.float64)}

    whole, a, b = fresh(), fresh(), fresh()
    accumulate_peu(whole, LOGITS.double(), k_a)
    accumulate_peu(a, LOGITS[:2].double(), k_a)
    accumulate_peu(b, LOGITS[2:].double(), k_a)
    merged = {k: a[k] + b[k] for k in a}
    direct, r = peu_vector(LOGITS, k_a)
    for t in (whole, merged):
        peu, r_hist = peu_from_hist(t["peu_hist"], t["peu_maxp_sum"], torch.tensor(3.0))
        assert r_hist == pytest.approx(r)
        assert peu.tolist() == pytest.approx(direct.tolist())  # no entry falls in the bin holding r


def test_premoe_strategy_keeps_top_peu_from_observer():
    model = tiny_model("qwen3_moe")
    stats = moeprune.calibrate(model, random_batch(272, 4, 16), progress=False)
    p = moeprune.plan(stats, strategy="premoe", ratio=0.5)
    for i, lp in p.layers.items():
        assert lp.num_kept == 4
        scores = torch.tensor(lp.scores)
        assert sorted(lp.kept) == sorted(torch.argsort(-scores, stable=True)[:4].tolist())
        assert 0.5 <= p.params["thresholds"][str(i)] <= 1.0  # K_a = top-2: max local prob in [0.5, 1]


def test_first_router_logits_equal_full_forward_and_stop_early():
    model = tiny_model("qwen3_moe")
    ids = random_batch(272, 1, 10)
    got = first_router_logits(model, ids)
    seen = {}
    layer = moeprune.adapters.find_moe_layers(model)[0]

    def hook(module, args, output):
        seen["l"] = output[0] if isinstance(output, tuple) else output

    handle = layer.router.register_forward_hook(hook)
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert torch.equal(got, seen["l"].reshape(-1, got.shape[1]).float())


def test_nearest_pattern_by_hand():
    patterns = {"tasks": {"a": {"key": [1.0, 0.0, 0.0]}, "b": {"key": [0.0, 1.0, 0.2]}, "c": {"key": [0.0, 0.0, 3.0]}}}
    assert nearest_task(patterns, torch.tensor([0.1, 0.7, 0.3]))[0] == "b"
    name, dist = nearest_task(patterns, torch.tensor([0.9, 0.1, 0.0]))
    assert name == "a" and dist == pytest.approx(math.sqrt(0.02))


def test_patterns_round_trip_and_retrieval(tmp_path):
    from moeprune.patterns import load_patterns, retrieve_plan, save_patterns
    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    model, tok = tiny_model("qwen3_moe"), byte_tokenizer()
    code = tmp_path / "code.txt"
    code.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + (x - {i})\n" for i in range(60)))
    prose = tmp_path / "prose.txt"
    prose.write_text("\n\n".join(f"The river runs slowly past the old town number {i}, and people walk there." for i in range(60)))
    pats = build_patterns(model, tok, {"code": str(code), "prose": str(prose)}, samples=4, seq_len=32, progress=False)
    save_patterns(pats, tmp_path / "p.json")
    loaded = load_patterns(tmp_path / "p.json")
    assert set(loaded["tasks"]) == {"code", "prose"}
    for name in ("code", "prose"):
        # a query equal to the task's own key retrieves that task
        assert nearest_task(loaded, torch.tensor(loaded["tasks"][name]["key"]))[0] == name
        plan = pattern_plan(loaded, name, 0.5)
        for i, lp in plan.layers.items():
            assert lp.kept == sorted(loaded["tasks"][name]["ranking"][str(i)][:4])
    plan, task, _ = retrieve_plan(model, tok, loaded, "def g(x):\n    return x * 3 + (x - 2)\n", 0.5)
    assert task in ("code", "prose") and plan.params["task"] == task
    moeprune.apply(model, plan)  # a uniform, valid plan
    assert all(layer.num_experts == 4 for layer in moeprune.adapters.find_moe_layers(model))


def test_observer_peu_equals_exact_peu_of_all_router_logits():
    """The one-pass histogram gives the exact PEU up to the bin holding r_l (bounded by its mass)."""
    from moeprune.calibration.peu import local_topk, transform
    from moeprune.strategies.premoe import peu_score

    model = tiny_model("qwen3_moe")
    ids = random_batch(272, 4, 16)
    layer = moeprune.adapters.find_moe_layers(model)[0]
    seen = []

    def hook(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().reshape(-1, layer.num_experts))

    handle = layer.router.register_forward_hook(hook)
    stats = moeprune.calibrate(model, ids, progress=False)  # one forward per batch: the hook sees every token
    handle.remove()
    logits = torch.cat(seen)
    assert logits.shape[0] == ids.numel()
    exact, r = peu_vector(logits, k_a=2)
    index, values, p = local_topk(logits.double(), 2)
    straddle = ((p * PEU_BINS).floor() == int(r * PEU_BINS))  # entries sharing r's bin
    bound = torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(
        0, index[straddle], transform(values[straddle]).abs()) / logits.shape[0]
    got = peu_score(stats.layers[layer.layer])
    assert torch.all((got - exact).abs() <= bound + 1e-12)
