"""Strategies are pure functions of statistics: synthetic stats, hand-checked decisions."""

from __future__ import annotations

import pytest
import torch

from moeprune import plan
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import Plan, PlanError
from moeprune.strategies.selection import select_global, select_uniform
from moeprune.strategies.super_experts import super_experts


def _stats(counts: dict[int, list[float]], top_k: int = 2, n_group: int = 1, **fields) -> ExpertStats:
    layers = {}
    for i, c in counts.items():
        s = LayerStats.zeros(len(c), 4, 4)
        s.tensors["count"] = torch.tensor(c, dtype=torch.float64)
        s.tensors["tokens"] = torch.tensor(sum(c) / top_k, dtype=torch.float64)
        s.tensors["gate_sum"] = torch.tensor(c, dtype=torch.float64) / 2
        for name, per_layer in fields.items():
            s.tensors[name] = torch.tensor(per_layer[i], dtype=torch.float64)
        layers[i] = s
    routing = {"top_k": top_k, "n_group": n_group, "topk_group": 1}
    return ExpertStats(layers, {"top_k": top_k, "routing": routing, "num_hidden_layers": len(counts)})


def test_frequency_uniform_drops_lowest_per_layer():
    stats = _stats({0: [5, 1, 9, 3, 7, 2, 8, 4], 1: [1, 2, 3, 4, 5, 6, 7, 8]})
    p = plan(stats, "frequency", 0.5)
    assert p.layers[0].kept == [0, 2, 4, 6]
    assert p.layers[1].kept == [4, 5, 6, 7]
    assert p.uniform and p.stats_hash == stats.digest()


def test_reap_uses_mean_over_routed_tokens():
    # expert 0: routed 10 times, mean g||f|| = 0.1; expert 1: routed once with 0.5
    reap_sum = {0: [1.0, 0.5, 0.2, 0.3]}
    stats = _stats({0: [10, 1, 1, 1]}, reap_sum=reap_sum, max_out={0: [1.0, 1.0, 1.0, 1.0]})
    p = plan(stats, "reap", 0.5)
    assert p.layers[0].kept == [1, 3]  # scores 0.1, 0.5, 0.2, 0.3


def test_global_budget_is_non_uniform_and_keeps_top_k():
    scores = {0: torch.tensor([1.0, 1, 1, 1, 1, 1]), 1: torch.tensor([9.0, 9, 9, 9, 9, 0])}
    kept = select_global(scores, 0.5, min_keep=2)  # drop 6: (1,5), four of layer 0, then (1,0)
    assert kept == {0: [4, 5], 1: [1, 2, 3, 4]}
    stats = _stats({0: [1, 1, 1, 1, 1, 1], 1: [9, 9, 9, 9, 9, 0]})
    p = plan(stats, "frequency", 0.5, budget="global")
    assert not p.uniform and p.experts_per_layer == {0: 2, 1: 4}


def test_group_limited_prunes_equally_per_group():
    scores = {0: torch.tensor([1.0, 2, 3, 4, 40, 30, 20, 10])}
    assert select_uniform(scores, 0.5, n_group=2) == {0: [2, 3, 4, 5]}


def test_super_experts_are_protected():
    counts = {i: [5.0] * 8 for i in range(4)}
    max_out = {i: [1.0] * 8 for i in range(4)}
    max_out[1][3] = 500.0  # one huge activation in an early layer
    counts[1][3] = 0.5
    stats = _stats(counts, max_out=max_out)
    assert super_experts(stats)[1] == [3]
    assert 3 not in plan(stats, "frequency", 0.5, protect_super=False).layers[1].kept
    assert 3 in plan(stats, "frequency", 0.5, protect_super=True).layers[1].kept


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(PlanError, match="ratio"):
        plan(_stats({0: [1, 2, 3, 4]}), "frequency", ratio)


def test_unknown_strategy_and_too_few_experts():
    stats = _stats({0: [1, 2, 3, 4]})
    with pytest.raises(PlanError, match="unknown strategy"):
        plan(stats, "nope", 0.5)
    with pytest.raises(PlanError, match="top-2"):
        plan(stats, "frequency", 0.75)


def test_plan_json_roundtrip(tmp_path):
    p = plan(_stats({0: [5, 1, 9, 3], 1: [1, 2, 3, 4]}), "soft-frequency", 0.5)
    loaded = Plan.load(p.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == p.to_dict()
