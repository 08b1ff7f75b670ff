"""MoNE novices: constant-vector experts, full-width router, save / exact reload / loud stock load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import apply, calibrate, plan, save
from moeprune.adapters import find_moe_layers
from moeprune.apply.novice import NOVICE_FILE, decode_vectors, encode_vectors
from moeprune.io.checkpoint import load_pruned
from moeprune.plan import LayerPlan, Plan
from moeprune.strategies.mone import redundancy_score
from moeprune.testing.tiny_models import random_batch, tiny_model
from moeprune.testing.checks import logits_of as _logits, safetensors_bytes




def _constant_expert_model():
    """gpt-oss with expert 0 of every layer made constant: zero gate/up weights, so its output is
    down @ act(biases) + down bias for every token; its router bias is raised so it is routed to."""
    model = tiny_model("gpt_oss")
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.experts.gate_up_proj[0] = 0.0
            layer.experts.gate_up_proj_bias[0] = torch.linspace(-1.0, 1.0, layer.experts.gate_up_proj_bias.shape[1])
            layer.router.bias[0] = 2.0
    return model


def test_novice_reproduces_a_constant_expert_exactly():
    model = _constant_expert_model()
    ids = random_batch(272, batch=2, seq_len=12)
    reference = _logits(model, ids)
    stats = calibrate(model, ids, progress=False)
    assert all(float(s.count[0]) > 0 for s in stats.layers.values()), "expert 0 must be routed to"
    for ls in stats.layers.values():  # a constant expert has (numerically) no output variance
        score = redundancy_score(ls)
        assert float(score[0]) < 1e-2 * float(score[ls.count > 1].median())
    p = plan(stats, "mone", 0.125)
    layers = {i: LayerPlan(layer=i, num_experts=8, kept=list(range(1, 8)), novices=[0]) for i in p.layers}
    vectors = {str(i): encode_vectors(stats.layers[i].output_mean()[[0]]) for i in p.layers}
    p = Plan(strategy="mone", params={"novice_vectors": vectors}, layers=layers, top_k=2)
    dropped = tiny_model("gpt_oss")
    dropped.load_state_dict(model.state_dict())
    plain = Plan.from_dict({**p.to_dict(), "params": {}, "layers": {
        str(i): {"layer": i, "num_experts": 8, "kept": lp.kept} for i, lp in p.layers.items()}})
    apply(dropped, plain)
    apply(model, p)
    assert find_moe_layers(model)[0].num_experts == 7
    assert find_moe_layers(model)[0].router.weight.shape[0] == 8  # router unchanged
    assert torch.allclose(_logits(model, ids), reference, atol=1e-5)
    assert not torch.allclose(_logits(dropped, ids), reference, atol=1e-3)  # the novice matters


def test_vectors_round_trip_through_the_plan_exactly():
    v = torch.randn(3, 32, dtype=torch.float64).float()
    assert torch.equal(decode_vectors(json.loads(json.dumps(encode_vectors(v)))), v)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_novice_checkpoint_reloads_exactly_and_refuses_stock_loading(family, tmp_path):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12)
    original = save(model, tmp_path / "orig")
    reference = _logits(model, ids)
    stats = calibrate(model, ids, progress=False)
    p = Plan.from_dict(json.loads(json.dumps(plan(stats, "mone", 0.5).to_dict())))  # through JSON
    apply(model, p)
    compressed = _logits(model, ids)
    assert not torch.allclose(compressed, reference, atol=1e-4)
    out = save(model, tmp_path / "out", plan=p)
    assert (out / NOVICE_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["moeprune_novices"]
    reloaded = load_pruned(out)
    assert torch.allclose(_logits(reloaded, ids), compressed, atol=1e-5)
    with pytest.raises(Exception, match="mismatch|size"):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layout = find_moe_layers(reloaded)[0].layout
    novices = sum(len(lp.novices) for lp in p.layers.values())
    assert novices == 8
    saved = safetensors_bytes(original) - safetensors_bytes(out)  # router rows stay: experts only
    expected = novices * layout.params_per_expert() * 4
    assert saved == expected
    extension = (out / NOVICE_FILE).stat().st_size
    assert extension < 0.2 * expected  # novice vectors + full routers are small
