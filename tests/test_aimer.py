"""AIMER: hand-computed scores on known weights, every layout, no calibration pass, offload == in-memory."""

from __future__ import annotations

import math

import pytest
import torch

from moeprune import plan
from moeprune.adapters import find_moe_layers
from moeprune.calibration import observer
from moeprune.plan import PlanError
from moeprune.strategies.aimer import aimer_scores
from moeprune.testing.tiny_models import save_tiny_checkpoint, tiny_model


def test_hand_computed_scores_and_highest_pruned():
    model = tiny_model("qwen3_moe")  # 8 experts, hidden 32, moe intermediate 24, gated, standard layout
    layer = find_moe_layers(model)[0]
    ex = layer.experts
    inter = layer.layout.intermediate_dim
    n = 3 * inter * 32
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
        ex.gate_up_proj[0] = 1.0  # gate and up all 1, down all 1: the flattest vector, score 1
        ex.down_proj[0] = 1.0
        ex.gate_up_proj[1, :inter] = 1.0  # gate 1, up 0, down 2
        ex.gate_up_proj[1, inter:] = 0.0
        ex.down_proj[1] = 2.0
        ex.gate_up_proj[2] = 0.0  # one non-zero element: score 1/sqrt(N)
        ex.down_proj[2] = 0.0
        ex.down_proj[2, 0, 0] = -3.0
    s = aimer_scores(ex)
    third = n // 3
    assert s[0].item() == pytest.approx(1.0)
    assert s[1].item() == pytest.approx((third * 1 + third * 2) / (math.sqrt(n) * math.sqrt(third * 1 + third * 4)))
    assert s[2].item() == pytest.approx(1 / math.sqrt(n))
    assert 0.7 < s[3].item() < 0.9  # Gaussian weights: about sqrt(2 / pi) = 0.80
    p = plan(None, "aimer", 0.5, model=model)
    # the four highest scores are pruned: expert 0 (1.0) and three Gaussian ones (~0.79); expert 1
    # (0.775, below the Gaussian ones) and expert 2 (0.02) survive
    first = p.layers[layer.layer]
    assert 0 not in first.kept and 1 in first.kept and 2 in first.kept
    assert first.kept == sorted(torch.tensor(first.scores).argsort()[:4].tolist())
    assert first.scores[0] == pytest.approx(1.0) and p.stats_hash is None


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_scores_equal_raw_sums_in_every_layout(family):
    model = tiny_model(family)
    for layer in find_moe_layers(model):
        first = layer.experts.gate_up_proj if layer.layout.has_gate else layer.experts.up_proj
        raw = [first.detach().float(), layer.experts.down_proj.detach().float()]  # storage order, whatever it is
        l1 = sum(w.abs().flatten(1).sum(1) for w in raw)
        sq = sum((w * w).flatten(1).sum(1) for w in raw)
        count = sum(w[0].numel() for w in raw)
        assert count == (3 if layer.layout.has_gate else 2) * layer.layout.hidden_dim * layer.layout.intermediate_dim
        assert torch.allclose(aimer_scores(layer.experts), l1 / (math.sqrt(count) * sq.sqrt()), rtol=1e-5)


def test_refuses_ratio_above_e_minus_top_k():
    with pytest.raises(PlanError, match="at most E - top_k"):
        plan(None, "aimer", 0.9, model=tiny_model("qwen3_moe"))


def _no_calibration(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the observer ran")

    monkeypatch.setattr(observer.Observer, "__enter__", refuse)


def test_prune_runs_no_calibration(monkeypatch, tmp_path):
    from moeprune.api import prune
    from moeprune.config import PruneRecipe
    from moeprune.io.loading import load_model

    save_tiny_checkpoint("qwen3_moe", tmp_path / "model")
    _no_calibration(monkeypatch)
    recipe = PruneRecipe(model=str(tmp_path / "model"), strategy="aimer", ratio=0.5, output=str(tmp_path / "out"))
    result = prune(recipe, progress=False)
    assert result.stats is None
    reference = plan(None, "aimer", 0.5, model=load_model(str(tmp_path / "model"))[0])
    assert {i: lp.kept for i, lp in result.plan.layers.items()} == {i: lp.kept for i, lp in reference.layers.items()}
    reloaded = find_moe_layers(load_model(str(tmp_path / "out"))[0])
    assert all(layer.num_experts == 4 for layer in reloaded)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_offload_reads_only_experts_and_equals_in_memory(monkeypatch, tmp_path, family):
    from safetensors import safe_open

    from moeprune.config import PruneRecipe
    from moeprune.io.loading import load_model
    from moeprune.engine.expert_reader import LazyExpertWeights
    from moeprune.pipeline.offloaded import prune_offloaded

    path = save_tiny_checkpoint(family, tmp_path / "model", max_shard_size="40KB")
    with LazyExpertWeights(path) as weights:
        streamed = plan(None, "aimer", 0.5, model=weights)
        read = weights.bytes_read
    expert_bytes = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if ".experts." in key and "shared" not in key:
                    t = f.get_slice(key)
                    expert_bytes += math.prod(t.get_shape()) * 4
    assert read == expert_bytes  # nothing but routed-expert weights was read
    in_memory = plan(None, "aimer", 0.5, model=load_model(str(path))[0])
    assert streamed.to_dict()["layers"] == in_memory.to_dict()["layers"]
    _no_calibration(monkeypatch)
    result = prune_offloaded(PruneRecipe(model=str(path), strategy="aimer", ratio=0.5, output=str(tmp_path / "out")),
                             progress=False)
    assert result.stats is None and result.plan.to_dict()["layers"] == in_memory.to_dict()["layers"]
    assert all(layer.num_experts == 4 for layer in find_moe_layers(load_model(str(tmp_path / "out"))[0]))
