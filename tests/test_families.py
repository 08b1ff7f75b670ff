"""Every supported family: keep-all is exact, pruning equals the original with the dropped experts
masked out of routing, and the pruned model reloads exactly with stock transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import apply, calibrate, plan, save
from moeprune.adapters import find_moe_layers
from moeprune.adapters.shims import expert_count_shared
from moeprune.io.checkpoint import load_pruned
from moeprune.evaluation.routing_mask import mask_experts
from moeprune.testing.tiny_models import FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, random_batch, tiny_model
from moeprune.testing.checks import logits_of as _logits

# routers whose selection `mask_experts` reproduces (softmax top-k, Llama4's sigmoid top-k, DBRX's logits);
# group-limited routers (DeepSeek-V3, GLM-4.5) regroup after pruning, so masking is not their reference
MASKABLE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "qwen3_next", "llama4_text", "dbrx", "jetmoe",
            "longcat_flash")


@pytest.fixture(params=sorted(FAMILY_CONFIGS) + sorted(MORE_FAMILY_CONFIGS))
def family(request) -> str:
    return request.param


def test_keep_all_plan_is_bit_identical(family):
    model = tiny_model(family)
    find_moe_layers(model)  # shims undecorated families (Llama4) first: the reference is the shimmed model
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    reference = _logits(model, ids)
    stats = calibrate(model, ids, progress=False)
    assert torch.equal(_logits(model, ids), reference), "observing must not change the model"
    apply(model, plan(stats, "frequency", 0.0))
    assert torch.equal(_logits(model, ids), reference)


def test_pruned_model_reloads_exactly(family, tmp_path):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    stats = calibrate(model, ids, progress=False)
    p = plan(stats, "reap", 0.5)
    apply(model, p)
    pruned = _logits(model, ids)
    out = save(model, tmp_path / "out", plan=p)
    config = json.loads((out / "config.json").read_text())
    if expert_count_shared(model.config):  # JetMoE: the count also sizes attention experts; moeprune reloads it
        assert config["num_local_experts"] == 8 and config["moeprune_experts_per_layer"] == {str(i): 4 for i in p.layers}
        reloaded = load_pruned(out, dtype=torch.float32)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        config.update(config.get("ffn_config") or {})  # DBRX keeps its count in the FFN sub-config
        counts = [config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") if k in config]
        assert counts and all(c == 4 for c in counts)
    assert torch.allclose(_logits(reloaded, ids), pruned, atol=1e-5)
    assert [layer.num_experts for layer in find_moe_layers(reloaded)] == [4] * len(p.layers)
    assert (out / "moeprune_plan.json").is_file()


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_pruned_model_runs_with_labels_and_router_logits(family, implementation):
    if family == "jetmoe":
        pytest.skip("jetmoe: its auxiliary loss stacks attention-expert (8) and MLP-expert (4) router logits")
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    apply(model, plan(calibrate(model, ids, progress=False), "frequency", 0.5))
    if model._can_set_experts_implementation():
        model.set_experts_implementation(implementation)
    elif implementation == "eager":
        pytest.skip(f"{family}: transformers offers no experts implementation switch (the shim runs grouped_mm)")
    out = model(ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss)
    if getattr(out, "router_logits", None) is not None:  # LongCat's routers keep their identity columns
        columns = 4 + find_moe_layers(model)[0].routing.identity_experts
        assert all(t.shape[-1] == columns for t in out.router_logits)


@pytest.mark.parametrize("family", MASKABLE)
def test_pruned_model_equals_the_masked_original(family):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    p = plan(calibrate(model, ids, progress=False), "reap", 0.5)
    dropped = {i: sorted(set(range(8)) - set(lp.kept)) for i, lp in p.layers.items()}
    assert all(len(d) == 4 for d in dropped.values())
    with mask_experts(model, dropped):
        masked = _logits(model, ids)
    assert not torch.allclose(masked, _logits(model, ids), atol=1e-4)  # the mask matters
    apply(model, p)
    torch.testing.assert_close(_logits(model, ids), masked, rtol=0, atol=1e-5)


def test_llama4_shim_computes_the_stock_forward():
    model = tiny_model("llama4_text")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    stock = _logits(model, ids)
    layers = find_moe_layers(model)
    assert [(layer.routing.scoring, layer.routing.top_k, layer.layout.describe()) for layer in layers] == \
        [("sigmoid", 1, "gated/transposed")] * 2
    assert all(len(layer.shared) == 1 for layer in layers)
    torch.testing.assert_close(_logits(model, ids), stock, rtol=0, atol=1e-6)
    assert len(find_moe_layers(model)) == 2  # installing again is a no-op


def test_longcat_shim_computes_the_stock_forward_and_prunes_real_experts_only(tmp_path):
    model = tiny_model("longcat_flash")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    stock, stock_state = _logits(model, ids), {k: v.clone() for k, v in model.state_dict().items()}
    layers = find_moe_layers(model)
    assert [(layer.num_experts, layer.routing.identity_experts, layer.routing.scoring) for layer in layers] == \
        [(8, 3, "softmax")] * 2
    torch.testing.assert_close(_logits(model, ids), stock, rtol=0, atol=1e-6)
    state = model.state_dict()  # stock names and shapes; the never-read identity rows of gate_up_proj are zeros
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in stock_state.items()}
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(state[gate_up][:8], stock_state[gate_up][:8]) and not state[gate_up][8:].any()
    stats = calibrate(model, ids, progress=False)
    picks = stats.layers[0].count.sum()
    assert 0 < picks < 2 * 20  # identity picks are not any real expert's tokens
    router = layers[0].router
    weight, bias = router.classifier.weight.clone(), router.e_score_correction_bias.clone()
    p = plan(stats, "reap", 0.5)
    apply(model, p)
    kept = p.layers[0].kept
    assert torch.equal(router.classifier.weight, torch.cat([weight[kept], weight[8:]]))
    assert torch.equal(router.e_score_correction_bias, torch.cat([bias[kept], bias[8:]]))
    assert (router.n_routed_experts, router.num_experts, layers[0].experts.total_experts) == (7, 4, 7)
    out = save(model, tmp_path / "out", plan=p)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["zero_expert_num"]) == (4, 3)


def test_dbrx_shim_keeps_the_stock_state_dict_and_streams(tmp_path):
    from moeprune.io.lazy_reader import KeyMap
    from moeprune.testing.tiny_models import save_tiny_checkpoint
    from safetensors.torch import load_file

    model = tiny_model("dbrx")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    stock, state = _logits(model, ids), {k: v.clone() for k, v in model.state_dict().items()}
    layer = find_moe_layers(model)[0]
    assert (layer.routing.top_k, layer.routing.norm_topk_prob, layer.layout.describe()) == (2, True, "gated/standard")
    w1 = state["transformer.blocks.0.ffn.experts.mlp.w1"]
    assert torch.equal(layer.experts.gate_up_proj[3, :24], w1[72:96])  # expert 3 = rows 3I..4I of w1
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], state[k]) for k in state)
    torch.testing.assert_close(_logits(model, ids), stock, rtol=0, atol=1e-6)
    fresh = tiny_model("dbrx", seed=1)
    find_moe_layers(fresh)
    fresh.load_state_dict(state)  # the load hook takes the stock names too
    assert torch.equal(fresh.transformer.blocks[0].ffn.experts.down_proj, layer.experts.down_proj)
    ckpt = save_tiny_checkpoint("dbrx", tmp_path / "dbrx")
    assert "transformer.blocks.0.ffn.experts.mlp.w1" in load_file(ckpt / "model.safetensors")
    # streamed: the checkpoint's mlp.w1/v1/w2 feed the shimmed parameters, converted as the load hook does
    skeleton = tiny_model("dbrx")
    find_moe_layers(skeleton)
    keymap = KeyMap(skeleton, list(load_file(ckpt / "model.safetensors")))
    assert keymap.unexpected == []
    target = keymap.targets["transformer.blocks.0.ffn.experts.mlp.w1"]
    assert target.model_key == "transformer.blocks.0.ffn.experts.gate_up_proj"


def test_longcat_refuses_novices_naee_and_dynamic_skip_in_one_line():
    from moeprune.apply.dynamic_skip import install_dynamic_skip
    from moeprune.plan import PlanError

    model = tiny_model("longcat_flash")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    stats = calibrate(model, ids, progress=False, sample_tokens=8)  # NAEE's token sample skips identity picks
    assert stats.layers[0].tensors["sample_gates"].shape == (8, 8)
    for strategy in ("mone", "naee"):
        with pytest.raises(PlanError, match="identity") as err:
            plan(stats, strategy, 0.5)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="identity"):
        install_dynamic_skip(model, {0: 0.5}, renormalize=False)
