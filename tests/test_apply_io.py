"""Surgery semantics, non-uniform reloads, atomic output and clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from moeprune import apply, calibrate, load_pruned, plan, save
from moeprune.adapters import NotAnMoEModelError, find_moe_layers
from moeprune.io.checkpoint import OutputPathError
from moeprune.io.safetensors_io import CorruptCheckpointError
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint, tiny_model
from moeprune.testing.checks import logits_of as _logits



@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_dropping_unselected_experts_keeps_logits_of_renormalising_router(family):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=1, seq_len=6, seed=5)
    stats = calibrate(model, ids, progress=False)
    reference = _logits(model, ids)
    layers = {}
    for index, s in stats.layers.items():
        used = [j for j in range(s.num_experts) if s.count[j] > 0]
        assert len(used) < s.num_experts, "the test needs some never-selected experts"
        layers[index] = LayerPlan(index, s.num_experts, used)
    apply(model, Plan("manual", {}, layers, top_k=2))
    assert torch.allclose(_logits(model, ids), reference, atol=1e-6)


def test_non_uniform_plan_reloads_with_load_pruned(tmp_path):
    model = tiny_model("qwen3_moe")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    p = plan(calibrate(model, ids, progress=False), "frequency", 0.5, budget="global")
    layers = {i: LayerPlan(i, 8, kept) for i, kept in {0: [0, 1, 2, 3, 4, 5], 1: [1, 3]}.items()}
    p = Plan("manual", {}, layers, top_k=2)
    apply(model, p)
    expected = _logits(model, ids)
    out = save(model, tmp_path / "out", plan=p)
    reloaded = load_pruned(out)
    assert [layer.num_experts for layer in find_moe_layers(reloaded)] == [6, 2]
    assert torch.allclose(_logits(reloaded, ids), expected, atol=1e-5)
    with pytest.raises(Exception):  # stock loading must fail loudly, not silently re-initialise
        AutoModelForCausalLM.from_pretrained(out)


def test_dense_model_is_rejected():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(NotAnMoEModelError, match="Mixture-of-Experts"):
        find_moe_layers(AutoModelForCausalLM.from_config(config))


def test_plan_for_other_model_and_top_k_errors():
    model = tiny_model("olmoe")
    with pytest.raises(PlanError, match="top-2"):
        apply(model, Plan("manual", {}, {0: LayerPlan(0, 8, [3])}, top_k=2))
    with pytest.raises(PlanError, match="16 experts"):
        apply(model, Plan("manual", {}, {0: LayerPlan(0, 16, list(range(8)))}, top_k=2))
    with pytest.raises(PlanError, match="group"):
        Plan("manual", {}, {1: LayerPlan(1, 8, [0, 1, 2, 4])}, top_k=2, routing={"n_group": 2, "topk_group": 1}).validate()


def test_output_never_written_into_input(tmp_path):
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "in")
    model = AutoModelForCausalLM.from_pretrained(src)
    for target in (src, src / "sub"):
        with pytest.raises(OutputPathError, match="input"):
            save(model, target, input_dir=src)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(OutputPathError, match="not empty"):
        save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("qwen3_moe")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moeprune.io.checkpoint._patch_config_json", boom)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_missing_shards_give_clear_errors(tmp_path):
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[0].write_bytes(b"\x00garbage")
    with pytest.raises(CorruptCheckpointError, match=shards[0].name):
        from moeprune.io.safetensors_io import read_checkpoint_tensors

        read_checkpoint_tensors(src)
    shards[1].unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        read_checkpoint_tensors(src)
