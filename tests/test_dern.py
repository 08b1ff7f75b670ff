"""DERN: dropped experts' neurons recombined into retained experts, shapes unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import apply, calibrate, plan, save
from moeprune.adapters import find_moe_layers
from moeprune.apply.merge import read_experts, write_experts
from moeprune.plan import LayerPlan
from moeprune.apply.recombine import recombine_neurons
from moeprune.testing.tiny_models import random_batch, tiny_model
from moeprune.testing.checks import logits_of as _logits, safetensors_bytes, router_row_params





@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_dern_keeps_shapes_and_reloads_with_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12)
    original = save(model, tmp_path / "orig")
    shapes = {n: p.shape[1:] for n, p in find_moe_layers(model)[0].experts.named_parameters()}
    stats = calibrate(model, ids, progress=False)
    p = plan(stats, "dern", 0.5, threshold=0.0)
    baseline = tiny_model(family)
    apply(baseline, plan(stats, "soft-frequency", 0.5))
    apply(model, p)
    assert [lp.kept for lp in p.layers.values()] == [lp.kept for lp in plan(stats, "soft-frequency", 0.5).layers.values()]
    for layer in find_moe_layers(model):
        assert layer.num_experts == 4
        assert {n: q.shape[1:] for n, q in layer.experts.named_parameters()} == shapes
    compressed = _logits(model, ids)
    assert not torch.allclose(compressed, _logits(baseline, ids), atol=1e-4)  # neurons were recombined
    out = save(model, tmp_path / "out", plan=p)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(_logits(reloaded, ids), compressed, atol=1e-5)
    layout = find_moe_layers(reloaded)[0].layout
    per_expert = (layout.params_per_expert() + router_row_params(reloaded)) * 4
    saved = safetensors_bytes(original) - safetensors_bytes(out)
    assert saved == 8 * per_expert


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_threshold_one_equals_plain_dropping(family):
    ids = random_batch(272, batch=2, seq_len=12)
    a, b = tiny_model(family), tiny_model(family)
    stats = calibrate(a, ids, progress=False)
    apply(a, plan(stats, "dern", 0.5, threshold=1.0))
    apply(b, plan(stats, "soft-frequency", 0.5))
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_segment_merges_into_its_matching_neuron_weighted_by_gate_mass():
    model = tiny_model("gpt_oss")
    layer = find_moe_layers(model)[0]
    t = read_experts(layer)
    # expert 5 neuron 7 = 2 x expert 1 neuron 3 (cosine 1); every other neuron of expert 5 is
    # orthogonal-ish noise that the threshold rejects
    for k in ("gate", "up"):
        t[k][5] = 0.0
        t[k][5][7] = 2 * t[k][1][3]
    for k in ("gate_bias", "up_bias"):
        t[k][5] = 0.0
        t[k][5][7] = 2 * t[k][1][3]
    t["down"][5][:, 7] = torch.linspace(-1, 1, t["down"].shape[1])
    write_experts(layer, t)
    before = read_experts(layer)
    mass = [1.0] * 8
    mass[1], mass[5] = 3.0, 1.0
    lp = LayerPlan(layer=layer.layer, num_experts=8, kept=[0, 1, 2, 3], scores=mass)
    assigned = recombine_neurons(layer, lp, threshold=0.99)
    after = read_experts(layer)
    assert assigned == 1
    for k in ("gate", "up", "gate_bias", "up_bias"):
        assert torch.allclose(after[k][1][3], (3 * before[k][1][3] + 2 * before[k][1][3]) / 4, atol=1e-6)
    expected_down = (3 * before["down"][1][:, 3] + before["down"][5][:, 7]) / 4
    assert torch.allclose(after["down"][1][:, 3], expected_down, atol=1e-6)
    changed = [(e, k) for k in after for e in range(4) if not torch.equal(after[k][e], before[k][e])]
    assert {e for e, _ in changed} == {1}
    assert torch.equal(after["down_bias"], before["down_bias"])
