"""NAEE (subset reconstruction) and UNCURL (spectral merging): hand-computed cases, a brute-force
reference on a real tiny model, the token sample's determinism and its streamed equality."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.adapters import find_moe_layers
from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.evaluation.routing_mask import mask_experts
from moeprune.plan import PlanError
from moeprune.strategies import get_strategy, plan
from moeprune.strategies.naee import LayerSample, search_exact, search_greedy
from moeprune.strategies.uncurl import spectral_clusters
from moeprune.calibration.streamed import streamed_calibrate
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint, tiny_model


def test_subset_error_by_hand():
    # one token, 3 orthonormal experts, top-1: the model picks expert 0 (logit 2) with gate 1
    sample = LayerSample(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
                         torch.eye(3).unsqueeze(0), top_k=1, renormalize=True)
    keep = torch.tensor([[False, True, True], [True, False, True], [True, True, False]])
    # dropping expert 0 re-routes the token to expert 1: ||f_0 - f_1||^2 = 2; the others change nothing
    assert sample.errors(keep).tolist() == pytest.approx([2.0, 0.0, 0.0])
    # top-2 without renormalisation: gates are softmax probabilities; dropping expert 2 moves its
    # probability mass p2 -> 0 and re-normalises the full softmax over the two survivors
    p = torch.tensor([2.0, 1.0, 0.0]).softmax(0)
    g0 = torch.tensor([[p[0], p[1], 0.0]])
    s2 = LayerSample(torch.tensor([[2.0, 1.0, 0.0]]), g0, torch.eye(3).unsqueeze(0), top_k=2, renormalize=False)
    q = torch.tensor([2.0, 1.0]).softmax(0)
    expected = float((q[0] - p[0]) ** 2 + (q[1] - p[1]) ** 2)
    assert float(s2.errors(torch.tensor([[True, True, False]]))[0]) == pytest.approx(expected)


def test_greedy_equals_exact_when_one_expert_is_dropped():
    torch.manual_seed(0)
    n, e = 64, 6
    logits = torch.randn(n, e) * 2
    f = torch.randn(n, e, 5)
    gram = f @ f.transpose(1, 2)
    w, i = logits.softmax(-1).topk(2, -1)
    gates = torch.zeros(n, e).scatter_(1, i, w / w.sum(-1, keepdim=True))
    sample = LayerSample(logits, gates, gram, top_k=2, renormalize=True)
    # with one expert dropped, greedy's single step scores every candidate: it must equal exact
    assert search_greedy(sample, e - 1)[:2] == search_exact(sample, e - 1)[:2]
    kept, err, scored = search_exact(sample, 3)
    assert scored == 20 and len(kept) == 3
    assert search_greedy(sample, 3)[1] >= err - 1e-12  # greedy can only be worse than the optimum


def _block_inputs(model, ids):
    """Every MoE block's input hidden states [tokens, H], per layer index."""
    inputs, handles = {}, []
    for layer in find_moe_layers(model):
        handles.append(layer.block.register_forward_pre_hook(
            lambda m, args, i=layer.layer: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in inputs.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_exact_naee_picks_the_brute_force_subset(family):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10, seed=3)
    stats = calibrate(model, ids, batch_size=2, progress=False, sample_tokens=1000)  # sample = every token
    result = plan(stats, "naee", 0.5, search="exact")
    x = _block_inputs(model, ids)
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    for index, lp in result.layers.items():
        block = layers[index].block
        with torch.no_grad():
            dense = block(x[index].unsqueeze(0))
            dense = dense[0] if isinstance(dense, tuple) else dense
            errors = {}
            for kept in itertools.combinations(range(8), 4):
                dropped = [j for j in range(8) if j not in kept]
                with mask_experts(model, {index: dropped}):
                    y = block(x[index].unsqueeze(0))
                    y = y[0] if isinstance(y, tuple) else y
                errors[kept] = float((dense.double() - y.double()).norm())
        best = min(errors, key=lambda k: (errors[k], k))
        assert lp.kept == list(best), index
        rel = errors[best] / float(dense.double().norm() if family == "qwen3_moe" else 1.0)
        if family == "qwen3_moe":  # no shared expert: the recorded relative error is the brute-force one
            assert result.params["relative_error"][str(index)] == pytest.approx(rel, rel=1e-4)
    assert set(result.params["search"].values()) == {"exact"} and result.params["subsets_scored"]["0"] == 70


def test_auto_search_falls_back_to_greedy_beyond_the_budget():
    model = tiny_model("qwen3_moe")
    stats = calibrate(model, random_batch(272, batch=2, seq_len=8), progress=False, sample_tokens=16)
    assert set(plan(stats, "naee", 0.5, max_subsets=69).params["search"].values()) == {"greedy"}
    assert set(plan(stats, "naee", 0.5, max_subsets=70).params["search"].values()) == {"exact"}
    with pytest.raises(PlanError, match="max_subsets"):
        plan(stats, "naee", 0.5, search="exact", max_subsets=10)
    assert get_strategy("naee").sample_tokens({}) == 2048
    assert get_strategy("naee").sample_tokens({"sample_tokens": 64}) == 64
    assert get_strategy("reap").sample_tokens({}) == 0


def test_naee_without_a_sample_or_on_group_routers_refuses_clearly():
    model = tiny_model("qwen3_moe")
    stats = calibrate(model, random_batch(272, batch=2, seq_len=8), progress=False)
    with pytest.raises(PlanError, match="sample_tokens"):
        plan(stats, "naee", 0.25)
    ds = tiny_model("deepseek_v3")
    stats = calibrate(ds, random_batch(272, batch=2, seq_len=8), progress=False, sample_tokens=8)
    with pytest.raises(PlanError, match="softmax top-k"):
        plan(stats, "naee", 0.25)


def test_token_sample_is_seeded_and_streamed_equals_in_memory(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_batch(272, batch=4, seq_len=12, seed=1)
    a = calibrate(model, ids, batch_size=2, progress=False, sample_tokens=20, sample_seed=5)
    b = calibrate(model, ids, batch_size=2, progress=False, sample_tokens=20, sample_seed=5)
    c = calibrate(model, ids, batch_size=2, progress=False, sample_tokens=20, sample_seed=6)
    s = streamed_calibrate(path, ids, batch_size=2, progress=False, sample_tokens=20, sample_seed=5)
    for index in a.layers:
        ta, tb, tc, ts = (x.layers[index].tensors for x in (a, b, c, s))
        assert ta["sample_gram"].shape == (20, 8, 8)
        assert torch.equal(ta["sample_keys"], tb["sample_keys"]) and torch.equal(ta["sample_gram"], tb["sample_gram"])
        assert not torch.equal(ta["sample_keys"], tc["sample_keys"])
        for name in ("sample_keys", "sample_logits", "sample_gates", "sample_gram"):
            assert torch.allclose(ta[name], ts[name], atol=1e-6), name
    # the sample's tokens are the same in every layer (one key per token)
    keys = [a.layers[i].tensors["sample_keys"] for i in a.layers]
    assert all(torch.equal(keys[0], k) for k in keys)
    assert plan(a, "naee", 0.25).layers == plan(s, "naee", 0.25).layers


def test_spectral_clustering_finds_the_obvious_blocks():
    blocks = [[0, 3, 5], [1, 4], [2, 6, 7]]
    a = torch.full((8, 8), 0.05)
    for b in blocks:
        for i in b:
            for j in b:
                a[i, j] = 1.0
    assert spectral_clusters(a, 3) == blocks
    assert spectral_clusters(a, 8) == [[j] for j in range(8)]
    assert spectral_clusters(a, 1) == [list(range(8))]


def test_uncurl_merges_clusters_of_router_similar_experts():
    # hand-made logit Gram: experts {0,1}, {2,3}, {4,5}, {6,7} have identical logit columns in pairs
    cols = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits = torch.stack([cols[j // 2] for j in range(8)], dim=1).double()  # [50, 8]
    ls = LayerStats.zeros(8, 4, 4)
    ls.tensors["logit_gram"] = logits.T @ logits
    ls.tensors["count"] = torch.tensor([5.0, 9, 1, 2, 8, 3, 4, 4])
    stats = ExpertStats({0: ls}, {"top_k": 2, "routing": {"top_k": 2, "n_group": 1}})
    result = plan(stats, "uncurl", 0.5)
    lp = result.layers[0]
    assert sorted(sorted(g) for g in lp.groups) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lp.kept == [1, 3, 4, 6]  # most frequent member represents (ties: lower index)
    assert lp.group_weights[0] == pytest.approx([9 / 14, 5 / 14])
    assert result.params["merge_align"] is True


def test_uncurl_applies_and_clusters_inside_routing_groups():
    model = tiny_model("deepseek_v3")
    stats = calibrate(model, random_batch(272, batch=2, seq_len=8), progress=False)
    result = plan(stats, "uncurl", 0.5)
    for lp in result.layers.values():
        for group in lp.groups:
            assert len({j // 4 for j in group}) == 1  # n_group=2: clusters never cross groups
    apply_plan(model, result)
    assert all(layer.num_experts == 4 for layer in find_moe_layers(model))


def test_merging_statistics_keeps_the_smallest_keys_of_the_union():
    model = tiny_model("qwen3_moe")
    ids = random_batch(272, batch=4, seq_len=8, seed=4)
    a = calibrate(model, ids[:2], progress=False, sample_tokens=6, sample_seed=1)
    b = calibrate(model, ids[2:], progress=False, sample_tokens=6, sample_seed=2)
    merged = a.merge(b)
    for index in a.layers:
        keys = torch.cat([a.layers[index].tensors["sample_keys"], b.layers[index].tensors["sample_keys"]])
        got = merged.layers[index].tensors
        assert torch.equal(got["sample_keys"], keys.sort().values[:6])
        rows = torch.cat([a.layers[index].tensors["sample_gram"], b.layers[index].tensors["sample_gram"]])
        assert torch.equal(got["sample_gram"], rows[keys.argsort(stable=True)[:6]])
        assert torch.equal(got["count"], a.layers[index].tensors["count"] + b.layers[index].tensors["count"])


def test_cli_calibrate_with_a_sample_then_plan_naee(tmp_path):
    from click.testing import CliRunner

    from moeprune.cli import main

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src")
    stats = tmp_path / "stats.safetensors"
    ran = CliRunner().invoke(main, ["calibrate", str(src), "--calibration", "builtin:code", "--samples", "2",
                                    "--seq-len", "16", "--sample-tokens", "20", "-o", str(stats)])
    assert ran.exit_code == 0, ran.output
    assert ExpertStats.load(stats).layers[0].tensors["sample_gram"].shape == (20, 8, 8)
    planned = CliRunner().invoke(main, ["plan", str(stats), "--strategy", "naee", "--ratio", "0.25", "-o", str(tmp_path / "p.json")])
    assert planned.exit_code == 0, planned.output
