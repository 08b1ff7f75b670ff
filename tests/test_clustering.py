"""Clustering strategies: hand-checked clusterings, global STUN budget, group routing, reloads, CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from moeprune import apply, calibrate, plan, save
from moeprune.adapters import find_moe_layers
from moeprune.calibration.stats import LayerStats
from moeprune.io.checkpoint import load_pruned
from moeprune.plan import PlanError
from moeprune.strategies import available_strategies, get_strategy
from moeprune.strategies.clustering import average_linkage_clusters, dominant_clusters, greedy_reject_mixed
from moeprune.strategies.similarity import coselect_distance, router_logit_similarity, router_weight_distance
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint, tiny_model
from moeprune.testing.checks import logits_of as _logits, safetensors_bytes, router_row_params





def _line_distance(points: list[float]) -> torch.Tensor:
    x = torch.tensor(points, dtype=torch.float64).unsqueeze(1)
    return torch.cdist(x, x)


def test_similarities_by_hand():
    stats = LayerStats({"logit_gram": torch.tensor([[4.0, 2.0, -4.0], [2.0, 1.0, -2.0], [-4.0, -2.0, 4.0]]),
                        "coselect": torch.tensor([[5.0, 3.0, 0.0], [3.0, 4.0, 1.0], [0.0, 1.0, 2.0]])})
    sim = router_logit_similarity(stats)
    assert torch.allclose(sim, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    d = coselect_distance(stats)  # mean |C| off the diagonal = (3+0+3+1+0+1)/6 = 4/3
    assert torch.allclose(d[0, 1], torch.tensor(-3 / (4 / 3), dtype=torch.float64))
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert torch.allclose(router_weight_distance(w)[0, 1], torch.tensor(5.0 / 5.0, dtype=torch.float64))


def test_average_linkage_finds_the_obvious_clusters():
    clusters = average_linkage_clusters(_line_distance([0.0, 10.0, 0.1, 10.2, 0.3, 20.0]), 3)
    assert sorted(clusters) == [[0, 2, 4], [1, 3], [5]]


def test_greedy_clustering_rejects_mixed_clusters():
    d = _line_distance([0.0, 1.0, 2.0, 2.4])
    # single linkage at 1.5 would chain everything; reject-mixed keeps cross distances <= tau
    assert sorted(greedy_reject_mixed(d, 1.5)) == [[0, 1], [2, 3]]
    assert sorted(greedy_reject_mixed(d, 0.5)) == [[0], [1], [2, 3]]
    assert len(greedy_reject_mixed(d, 10.0, min_clusters=2)) == 2


def test_dominant_experts_collect_the_most_similar_rest():
    freq = torch.tensor([10.0, 1.0, 8.0, 2.0])
    sim = torch.tensor([[1.0, 0.2, 0.1, 0.9], [0.2, 1.0, 0.7, 0.3], [0.1, 0.7, 1.0, 0.2], [0.9, 0.3, 0.2, 1.0]])
    assert sorted(dominant_clusters(sim, freq, 2, forced=[])) == [[0, 3], [2, 1]]
    assert sorted(dominant_clusters(sim, freq, 2, forced=[1])) == [[0, 2, 3], [1]]  # protected: singleton


def test_strategies_are_registered_with_their_needs():
    assert {"hc-smoe", "m-smoe", "stun", "mone", "dern"} <= set(available_strategies())
    assert get_strategy("hc-smoe").dense_tokens > 0
    assert get_strategy("stun").needs_weights


def test_hc_smoe_needs_dense_outputs():
    model = tiny_model("qwen3_moe")
    stats = calibrate(model, random_batch(272, 2, 8), progress=False)
    with pytest.raises(PlanError, match="dense_tokens"):
        plan(stats, "hc-smoe", 0.5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_stun_hits_the_global_budget_and_reloads(family, tmp_path):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12)
    original = save(model, tmp_path / "orig")
    stats = calibrate(model, ids, progress=False)
    p = plan(stats, "stun", 0.5, model=model)
    assert sum(p.experts_per_layer.values()) == 8
    clusters = p.params["clusters"]
    for i, lp in p.layers.items():
        assert len(clusters[str(i)]) == lp.num_kept
        assert all(sum(j in c for c in clusters[str(i)]) == 1 for j in lp.kept)  # one kept per cluster
    apply(model, p)
    compressed = _logits(model, ids)
    out = save(model, tmp_path / "out", plan=p)
    reloaded = load_pruned(out)
    assert torch.allclose(_logits(reloaded, ids), compressed, atol=1e-5)
    layout = find_moe_layers(reloaded)[0].layout
    per_expert = (layout.params_per_expert() + router_row_params(reloaded)) * 4
    saved = safetensors_bytes(original) - safetensors_bytes(out)
    assert saved == 8 * per_expert


def test_stun_representative_is_the_member_closest_to_the_centroid():
    model = tiny_model("qwen3_moe")
    ids = random_batch(272, batch=2, seq_len=8)
    with torch.no_grad():  # experts 0..3 share a router row, so they form one cluster; 2 is the middle one
        for layer in find_moe_layers(model):
            layer.router.weight[1:4] = layer.router.weight[0]
            base = layer.experts.down_proj[0].clone()
            for j, scale in zip(range(4), (0.0, 1.0, 2.0, 4.0)):
                layer.experts.gate_up_proj[j] = layer.experts.gate_up_proj[0]
                layer.experts.down_proj[j] = base * scale
    stats = calibrate(model, ids, progress=False)
    p = plan(stats, "stun", 3 / 8, model=model)  # 16 -> 10 experts: the four copies collapse first
    for i, lp in p.layers.items():
        assert [0, 1, 2, 3] in p.params["clusters"][str(i)]
        assert 2 in lp.kept and not {0, 1, 3} & set(lp.kept)


def test_group_limited_routers_cluster_inside_groups():
    model = tiny_model("deepseek_v3")
    ids = random_batch(272, batch=2, seq_len=12)
    stats = calibrate(model, ids, progress=False, dense_tokens=16)
    for strategy in ("hc-smoe", "m-smoe"):
        p = plan(stats, strategy, 0.5, model=model)
        for lp in p.layers.values():
            assert [sum(1 for j in lp.kept if j < 4), sum(1 for j in lp.kept if j >= 4)] == [2, 2]
            assert all(len({j // 4 for j in g}) == 1 for g in lp.groups)
    with pytest.raises(PlanError, match="group"):
        plan(stats, "stun", 0.5, model=model)
    reference = tiny_model("deepseek_v3")
    apply(reference, p)
    assert torch.isfinite(_logits(reference, ids)).all()


@pytest.mark.parametrize("strategy", ["hc-smoe", "m-smoe", "stun", "mone", "dern"])
def test_cli_prune_accepts_the_strategy(strategy, tmp_path):
    from moeprune.cli import main

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src")
    result = CliRunner().invoke(main, ["prune", str(src), "--strategy", strategy, "--ratio", "0.5",
                                       "--samples", "2", "--seq-len", "16", "--calibration", "builtin:code",
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = load_pruned(tmp_path / "out")
    assert sum(layer.num_experts for layer in find_moe_layers(model)) == 8
