"""Unified criterion, MAN and MSAN on synthetic statistics: hand-computed scores and decisions."""

from __future__ import annotations

import pytest
import torch

from moeprune import plan
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.plan import PlanError
from moeprune.strategies.criteria import unified_score


def _stats(seed: int = 0, layers: int = 2, e: int = 8, hidden: int = 4, top_k: int = 2) -> ExpertStats:
    """Random but consistent statistics: every field is a sum over the same synthetic routed tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        s = LayerStats.zeros(e, hidden, 3)
        n_tok = 40
        for _ in range(n_tok):
            chosen = torch.randperm(e, generator=g)[:top_k]
            gates = torch.rand(top_k, generator=g, dtype=torch.float64)
            gates = gates / gates.sum()
            for j, gate in zip(chosen.tolist(), gates.tolist()):
                f = torch.randn(hidden, generator=g, dtype=torch.float64) * (1 + j)
                n = float(f.norm())
                t = s.tensors
                t["count"][j] += 1
                t["gate_sum"][j] += gate
                t["ean_sum"][j] += n
                t["reap_sum"][j] += gate * n
                t["reap_sq_sum"][j] += (gate * n) ** 2
                t["out_sum"][j] += f
                t["out_sq"][j] += f * f
        s.tensors["tokens"] += n_tok
        out[i] = s
    routing = {"top_k": top_k, "n_group": 1, "topk_group": 1}
    return ExpertStats(out, {"top_k": top_k, "routing": routing, "num_hidden_layers": layers})


def test_hand_computed_scores():
    s = LayerStats.zeros(3, 2, 2)
    t = s.tensors
    t["tokens"] += 5
    t["count"] += torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    t["ean_sum"] += torch.tensor([8.0, 3.0, 0.0], dtype=torch.float64)
    t["out_sq"] += torch.tensor([[6.0, 10.0], [4.0, 5.0], [0.0, 0.0]], dtype=torch.float64)  # sum ||f||^2 = 16, 9, 0
    t["reap_sq_sum"] += torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)
    assert unified_score(s, 1, 0, 1).tolist() == [2.0, 3.0, 0.0]  # MAN: mean ||f||
    assert unified_score(s, 1, 0, 2).tolist() == [4.0, 9.0, 0.0]  # MSAN: mean ||f||^2
    assert unified_score(s, 0.5, 0, 1).tolist() == [4.0, 3.0, 0.0]  # 8 / sqrt(4)
    assert unified_score(s, 0, 2, 2).tolist() == [2.0, 0.5, 0.0]
    assert unified_score(s, 0, 0, 0).tolist() == [4.0, 1.0, 0.0]


@pytest.mark.parametrize("budget", ["layer", "global"])
@pytest.mark.parametrize("named, bab", [("frequency", (0, 0, 0)), ("ean", (0, 0, 1)), ("reap", (1, 1, 1)),
                                        ("soft-frequency", (0, 1, 0))])
def test_unified_equals_named_criteria(named, bab, budget):
    stats = _stats(seed=1)
    b, alpha, beta = bab
    ref = plan(stats, named, 0.5, budget=budget, protect_super=False)
    uni = plan(stats, "unified", 0.5, b=b, alpha=alpha, beta=beta, budget=budget, min_share=0)
    for i in ref.layers:
        assert uni.layers[i].kept == ref.layers[i].kept
        assert uni.layers[i].scores == pytest.approx(ref.layers[i].scores, rel=1e-12)


def test_man_and_msan_are_unified_special_cases():
    stats = _stats(seed=2)
    for name, beta in (("man", 1), ("msan", 2)):
        p = plan(stats, name, 0.25)
        u = plan(stats, "unified", 0.25, b=1, alpha=0, beta=beta)
        assert p.strategy == name and p.params["beta"] == beta
        assert {i: lp.kept for i, lp in p.layers.items()} == {i: lp.kept for i, lp in u.layers.items()}


def test_man_drops_lowest_mean_norm():
    # expert means ||f||: 1, 5, 2, 4; counts all high -> drop experts 0 and 2
    s = LayerStats.zeros(4, 2, 2)
    s.tensors["tokens"] += 20
    s.tensors["count"] += 10
    s.tensors["ean_sum"] += torch.tensor([10.0, 50.0, 20.0, 40.0], dtype=torch.float64)
    stats = ExpertStats({0: s}, {"top_k": 2, "routing": {"top_k": 2}})
    assert plan(stats, "man", 0.5).layers[0].kept == [1, 3]


def test_min_share_demotes_rarely_routed_experts():
    # expert 1 is routed once with a huge norm: its mean is the highest, but it is seen too rarely
    s = LayerStats.zeros(4, 2, 2)
    s.tensors["tokens"] += 50  # uniform share = 50 * 2 / 4 = 25 per expert
    s.tensors["count"] += torch.tensor([33.0, 1.0, 33.0, 33.0], dtype=torch.float64)
    s.tensors["ean_sum"] += torch.tensor([33.0, 100.0, 66.0, 99.0], dtype=torch.float64)  # means 1, 100, 2, 3
    stats = ExpertStats({0: s}, {"top_k": 2, "routing": {"top_k": 2}})
    assert plan(stats, "man", 0.5, min_share=0).layers[0].kept == [1, 3]
    p = plan(stats, "man", 0.5)  # default 0.05: 1 < 0.05 * 25 = 1.25 -> expert 1 goes first
    assert p.layers[0].kept == [2, 3]
    assert p.layers[0].scores[1] == 100.0  # the plan keeps the real score
    assert plan(stats, "ean", 0.5).layers[0].kept == [1, 3]  # sums (b=0) are not affected


def test_unsupported_moment_names_the_supported_set():
    stats = _stats()
    with pytest.raises(PlanError, match=r"supported \(alpha, beta\): \(0, 0\), \(1, 0\), \(0, 1\), \(0, 2\)"):
        plan(stats, "unified", 0.5, b=1, alpha=1, beta=2)
    with pytest.raises(PlanError, match="unified b must be a number"):
        plan(stats, "unified", 0.5, b="mean")


def test_stats_roundtrip_and_merge_keep_reap_sq_sum(tmp_path):
    a, b = _stats(seed=3), _stats(seed=4)
    merged = a.merge(b)
    assert torch.allclose(merged.layers[0].reap_sq_sum, a.layers[0].reap_sq_sum + b.layers[0].reap_sq_sum)
    loaded = ExpertStats.load(merged.save(tmp_path / "s.safetensors"))
    assert torch.equal(loaded.layers[1].reap_sq_sum, merged.layers[1].reap_sq_sum)


def test_mone_soft_frequency_rank_keeps_the_most_gate_mass_and_novices_the_rest() -> None:
    stats = _stats(seed=3)
    p = plan(stats, "mone", 0.5, rank="soft-frequency")
    for i, layer in p.layers.items():
        gate = stats.layers[i].gate_sum
        expected = sorted(torch.argsort(gate, descending=True)[:4].tolist())
        assert layer.kept == expected
        assert layer.novices == [j for j in range(8) if j not in expected]
    default = plan(stats, "mone", 0.5)
    assert any(default.layers[i].kept != p.layers[i].kept for i in p.layers)  # the spread factor matters here
    with pytest.raises(PlanError, match="rank must be one of"):
        plan(stats, "mone", 0.5, rank="reap")
