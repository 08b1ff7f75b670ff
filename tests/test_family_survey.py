"""Every MoE family of the installed transformers is pruned right or refused in one line
(moeprune/testing/family_survey.py: keep-all exact, pruned == masked original, reload equal,
`--offload` == in memory), and the helpers that made the untested families work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeprune.adapters.layout import router_extra_rows, router_scoring_weights
from moeprune.testing.family_survey import moe_families, survey

# families the survey found correct (transformers 5.24 and 5.25): a family that stops passing fails this test
EXPECTED_OK = {
    "afmoe", "aria", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "dbrx", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint",
    "gemma4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling", "inkling2",
    "inkling2_loop", "jamba", "jetmoe", "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2_moe", "llama4",
    "longcat_flash", "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "minimax_m3_vl", "mixtral", "nemotron_h",
    "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen4_exp", "solar_open", "zaya",
    "qwen3_vl_moe", "mistral_large4", "step3p7", "mistral4", "glm4v_moe", "hy_v4_vl",  # image-text-to-text
    "deepseek_ocr2", "glm5_next", "muse_spark", "unlimited_ocr",
    "kolibri1_1", "minicpm5_moe", "ergo",  # new in transformers 5.25 (ergo: a per-expert output norm)
}


def _installed(family: str) -> None:
    if family not in moe_families():
        pytest.skip(f"{family} is not in this transformers")


@pytest.fixture(scope="module")
def results():
    return {r.family: r for r in survey()}


def test_no_family_is_pruned_wrong_and_none_errors(results):
    bad = {f: (r.status, r.detail, r.checks) for f, r in results.items() if r.status in ("wrong", "error")}
    assert not bad


def test_every_expected_family_is_correct_in_memory_and_streamed(results):
    expected = EXPECTED_OK & set(results)  # another transformers may not ship every one of them
    assert len(expected) >= 13  # the family table's own families at least
    assert expected <= {f for f, r in results.items() if r.status == "ok"}
    for family in expected:
        checks = results[family].checks
        assert checks["keep-all"] == "exact" and checks["reload"] == "equal", family
        assert checks["masked"] in ("equal", "n/a (group-limited routing)"), family
        assert checks["streamed"] == "equal", family


def test_refusals_are_one_line(results):
    refused = {f: r.detail for f, r in results.items() if r.status == "refused"}
    assert "doge" in refused and "product keys" in refused["doge"]
    if "ernie4_5_vl_moe" in results:  # text and vision experts in one layer, one expert count for both
        assert "2 expert sets" in refused["ernie4_5_vl_moe"]
    assert all("\n" not in why for why in refused.values())


@pytest.mark.parametrize("model_type, kind", [("qwen3_omni_moe", "not a causal LM"),
                                              ("switch_transformers", "an encoder-decoder model"),
                                              ("diffusion_gemma", "a block-diffusion model")])
def test_checkpoints_without_a_causal_lm_are_refused_in_one_line(model_type, kind, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    from click.testing import CliRunner

    from moeprune.cli import main

    for args in (["inspect", str(tmp_path)], ["prune", str(tmp_path), "-o", str(tmp_path / "out"), "--offload"]):
        run = CliRunner().invoke(main, args)
        assert run.exit_code != 0
        lines = [line for line in run.output.splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and f"{model_type} is {kind}" in lines[0], run.output[-500:]
        assert not (tmp_path / "out").exists()


def test_router_scoring_weights_by_shape():
    plain = nn.Linear(16, 8, bias=False)  # one row per expert
    assert router_scoring_weights(plain, 8) == [plain.weight] and router_extra_rows(plain, 8) == 0
    extra = nn.Linear(16, 11, bias=False)  # 8 experts + 3 trailing columns (identity / shared-expert gates)
    assert router_scoring_weights(extra, 8) == [extra.weight] and router_extra_rows(extra, 8) == 3
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))  # a router MLP: the hidden layer is not its logits
    assert router_scoring_weights(mlp, 8) == [mlp[1].weight] and router_extra_rows(mlp, 8) == 0
    skip = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 9))  # ZAYA: a skip class after the experts
    assert router_scoring_weights(skip, 8) == [skip[1].weight] and router_extra_rows(skip, 8) == 1


def test_extra_router_rows_are_kept_after_the_kept_ones():
    from moeprune.apply.surgery import slice_layer
    from moeprune.adapters import find_moe_layers
    from moeprune.testing.family_survey import causal_lm_type, seeded_model, shrunk_config

    _installed("inkling")
    model = seeded_model(shrunk_config(causal_lm_type("inkling")))  # router rows: 8 routed experts + 1 shared-expert gate
    layer = find_moe_layers(model)[0]
    weight = layer.router.weight.detach().clone()
    assert weight.shape[0] == 9 and layer.router.n_total_experts == 9
    slice_layer(layer, [6, 1, 3, 0])
    assert torch.equal(layer.router.weight, weight[[6, 1, 3, 0, 8]])
    assert (layer.router.num_experts, layer.router.n_total_experts) == (4, 5)
    assert layer.router.e_score_correction_bias.shape == (4,)


@pytest.mark.parametrize("family", ["afmoe", "deepseek_v4", "ernie4_5_moe", "inkling", "jetmoe", "zaya"])
def test_mone_novices_keep_every_full_width_routing_tensor(family, tmp_path):
    """Novice layers keep the router at E rows: block-level expert biases (AFMoE), 1 x E correction
    biases (ERNIE), extra router rows (Inkling, ZAYA), routers found by name (DeepSeek-V4) and the
    module-layout reload (JetMoE) all come back at full width."""
    from moeprune.testing.family_survey import check_family

    _installed(family)
    result = check_family(family, tmp_path, strategy="mone")
    assert result.status == "ok", (result.detail, result.checks)
    assert result.checks["reload"] == "equal"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["mone", "m-smoe", "hc-smoe", "dern", "stun"])
def test_every_family_with_more_strategies(strategy):
    results = survey(strategy=strategy)
    assert not {r.family: (r.detail, r.checks) for r in results if r.status in ("wrong", "error")}
    refused = {r.family: r.detail for r in results if r.status == "refused"}
    assert all("\n" not in why for why in refused.values())
    assert (EXPECTED_OK & {r.family for r in results}) - set(refused) <= {r.family for r in results if r.status == "ok"}


def _gemma4_checkpoint(path):
    from moeprune.testing.family_survey import causal_lm_type, seeded_model, shrunk_config
    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    model = seeded_model(shrunk_config(causal_lm_type("gemma4")))
    model.save_pretrained(path, max_shard_size="20KB")
    byte_tokenizer().save_pretrained(path)
    return model


def _sparsify_streams_and_local_kd_is_refused(tmp_path, refusal: str) -> None:
    """The CLI on checkpoint tmp_path/src: --offload with Wanda writes the in-memory tensors, and
    --router-kd-local fails in one line containing `refusal`, before any calibration, writing nothing."""
    from click.testing import CliRunner

    from moeprune.cli import main
    from moeprune.io.safetensors_io import read_checkpoint_tensors

    common = [str(tmp_path / "src"), "--ratio", "0.5", "--samples", "4", "--seq-len", "32"]
    for mode in ("--offload", "--no-offload"):
        run = CliRunner().invoke(main, ["prune", *common, "-o", str(tmp_path / mode), "--sparsify", "wanda", mode])
        assert run.exit_code == 0, run.output[-600:]
    a, b = read_checkpoint_tensors(tmp_path / "--offload"), read_checkpoint_tensors(tmp_path / "--no-offload")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for mode in ("--offload", "--no-offload"):
        run = CliRunner().invoke(main, ["prune", *common, "-o", str(tmp_path / f"kd{mode}"), "--router-kd-local", mode])
        lines = [line for line in run.output.splitlines() if line.startswith("Error")]
        assert run.exit_code != 0 and len(lines) == 1 and refusal in lines[0], run.output[-600:]
        assert "calibrat" not in run.output and not (tmp_path / f"kd{mode}").exists()


def test_experts_in_the_decoder_layer_stream_sparsify_and_refuse_local_kd(tmp_path):
    """Gemma-4 keeps router and experts in the decoder layer itself (no MoE block module): the
    layer-wise passes find their layer, and the block-output fit is refused in one line."""
    from moeprune.adapters import find_moe_layers
    from moeprune.calibration.attribution import decoder_layer_of
    from moeprune.sparsify.collect import moe_by_decoder_index

    _installed("gemma4")
    model = _gemma4_checkpoint(tmp_path / "src")
    layer = find_moe_layers(model)[0]
    assert layer.block_is_decoder_layer and decoder_layer_of(model, layer.block_name) is layer.block
    assert sorted(moe_by_decoder_index(model)) == [0, 1]
    _sparsify_streams_and_local_kd_is_refused(tmp_path, "inside the decoder layer")


def test_router_state_carried_across_layers_streams_sparsifies_and_refuses_local_kd(tmp_path):
    """ZAYA's routers add the previous layer's router state: the layer runner carries it, so
    streamed calibration equals in-memory (and the state matters: without it layer 1 routes
    otherwise), --offload with Wanda writes the in-memory tensors, and the layer-local router fit,
    which would see the block without that state, is refused in one line before any work."""
    from moeprune import calibrate
    from moeprune.calibration.streamed import streamed_calibrate
    from moeprune.testing.family_survey import seeded_model, shrunk_config
    from moeprune.testing.tiny_models import random_batch
    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    _installed("zaya")
    model = seeded_model(shrunk_config("zaya"))
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    ids = random_batch(256, batch=4, seq_len=16)
    in_memory = calibrate(model, ids, progress=False)
    assert streamed_calibrate(tmp_path / "src", ids, progress=False).digest() == in_memory.digest()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.router_states_scale.zero_()  # layer 1 ignores the carried state
    assert not torch.equal(calibrate(model, ids, progress=False).layers[1].tensors["count"], in_memory.layers[1].tensors["count"])
    _sparsify_streams_and_local_kd_is_refused(tmp_path, "router hidden states")


def test_streamed_perplexity_of_a_float32_residual_stream_in_bf16(tmp_path):
    """ZAYA keeps its residual stream in float32 and casts it to the final norm's dtype itself: the
    streamed evaluation does the same, so a bf16 checkpoint scores as the stock model does."""
    import math

    import transformers

    from moeprune.evaluation.perplexity import perplexity_from_ids
    from moeprune.evaluation.streamed_perplexity import streamed_nll
    from moeprune.testing.family_survey import seeded_model, shrunk_config
    from moeprune.testing.tiny_models import random_batch

    _installed("zaya")
    seeded_model(shrunk_config("zaya")).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    ids = random_batch(256, batch=1, seq_len=64)[0]
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    total, count = streamed_nll(tmp_path, ids, seq_len=16, batch_size=2, progress=False)
    assert math.isclose(math.exp(total / count), perplexity_from_ids(stock, ids, 16, progress=False), rel_tol=1e-5)


@pytest.mark.parametrize("family", ["afmoe", "inkling2", "deepseek_v2", "longcat_flash", "gpt_oss"])
def test_bf16_checkpoints_load_like_from_pretrained_and_keep_their_dtypes(family, tmp_path):
    """In bf16: tensors transformers keeps in float32 (Inkling-2's routers and correction bias,
    AFMoE's expert_bias) load in float32 as with `from_pretrained` (the loader and the streamed
    reader), routers that upcast their weight are masked, and every output tensor keeps its input
    dtype, in memory and streamed."""
    import transformers

    from moeprune.io.lazy_load import load_lazily
    from moeprune.testing.family_survey import (_as_stock_checkpoint, causal_lm_type, check_family, seeded_model,
                                                shrunk_config)

    _installed(family)
    result = check_family(family, tmp_path / "survey", dtype=torch.bfloat16)
    assert result.status == "ok" and result.checks["dtypes"] == "kept" and result.checks["masked"] == "equal", \
        (result.detail, result.checks)
    src = tmp_path / "src"
    _as_stock_checkpoint(seeded_model(shrunk_config(causal_lm_type(family))), torch.bfloat16).save_pretrained(src)
    stock = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    lazy = load_lazily(src, torch.bfloat16).state_dict()
    assert {k: v.dtype for k, v in lazy.items()} == {k: v.dtype for k, v in stock.items()}
    assert all(torch.equal(lazy[k], stock[k]) for k in stock)


@pytest.mark.slow
def test_every_family_in_bf16():
    results = survey(dtype=torch.bfloat16)
    assert not {r.family: (r.detail, r.checks) for r in results if r.status in ("wrong", "error")}
    assert EXPECTED_OK & {r.family for r in results} <= {r.family for r in results if r.status == "ok"}


def test_zero_weight_picks_are_no_expert_tokens():
    """ZAYA's router rewrites a pick of its skip class as (expert 0, weight 0): calibration must not
    count it as expert 0's token, and observing must not change the layer's output."""
    from moeprune import calibrate
    from moeprune.adapters import find_moe_layers
    from moeprune.testing.family_survey import seeded_model, shrunk_config
    from moeprune.testing.tiny_models import random_batch

    _installed("zaya")
    model = seeded_model(shrunk_config("zaya"))
    layer = find_moe_layers(model)[0]
    with torch.no_grad():
        layer.router.balancing_biases[-1] = 0.3  # make the skip class a frequent pick
    ids = random_batch(272, batch=2, seq_len=10)
    with torch.no_grad():
        reference = model(ids).logits
    picks = []
    handle = layer.router.register_forward_hook(lambda module, args, out: picks.append((out[1].detach(), out[2].detach())))
    stats = calibrate(model, ids, progress=False)
    handle.remove()
    weights, index = picks[0]
    assert (weights == 0).sum() > 0
    by_hand = torch.bincount(index[weights != 0].reshape(-1), minlength=8).double()
    assert torch.equal(stats.layers[layer.layer].tensors["count"], by_hand)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_image_text_to_text_moe_prunes_its_text_model_through_the_cli(tmp_path):
    """Qwen3-VL-MoE has no causal-LM class: it loads, prunes (text experts; the vision tower copied),
    streams bit-equal and reloads as the same image-text-to-text class with stock transformers."""
    import transformers
    from click.testing import CliRunner

    from moeprune.cli import main
    from moeprune.io.safetensors_io import read_checkpoint_tensors
    from moeprune.testing.family_survey import causal_lm_type, seeded_model, shrunk_config
    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    _installed("qwen3_vl_moe")
    model = seeded_model(shrunk_config(causal_lm_type("qwen3_vl_moe")))
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    common = [str(tmp_path / "src"), "--ratio", "0.5", "--samples", "4", "--seq-len", "32", "--sparsify", "wanda"]
    for mode in ("--offload", "--no-offload"):
        run = CliRunner().invoke(main, ["prune", *common, "-o", str(tmp_path / mode), mode])
        assert run.exit_code == 0, run.output[-600:]
    a, b = read_checkpoint_tensors(tmp_path / "--offload"), read_checkpoint_tensors(tmp_path / "--no-offload")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    vision = [k for k in a if "visual" in k]
    source = read_checkpoint_tensors(tmp_path / "src")
    assert vision and all(torch.equal(a[k], source[k]) for k in vision)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "--offload")
    assert type(reloaded).__name__ == type(model).__name__ and reloaded.config.text_config.num_experts == 4


def test_a_per_expert_output_norm_is_calibrated_sliced_and_merged():
    """Ergo (transformers 5.25) passes each route's output through its expert's own RMSNorm
    (`experts.post_expert_norm.weight [E, H]`): calibration's routed forward applies it, surgery
    slices it with the experts, a merge averages it; an unknown per-expert submodule is refused."""
    import copy

    from moeprune.adapters import find_moe_layers
    from moeprune.adapters.discovery import NotAnMoEModelError
    from moeprune.apply.merge import merge_groups
    from moeprune.apply.surgery import slice_layer
    from moeprune.calibration.capture import routed_forward
    from moeprune.plan import LayerPlan
    from moeprune.testing.family_survey import seeded_model
    from moeprune.testing.shrunk_configs import shrunk_config

    _installed("ergo")
    model = seeded_model(shrunk_config("ergo"))
    layer = find_moe_layers(model)[0]
    experts, norm = layer.experts, layer.experts.post_expert_norm
    assert norm.weight.shape == (8, 32) and norm.weight.std() > 0  # seeded, not all ones
    hidden = torch.randn(6, 32)
    index = torch.tensor([[0, 3], [5, 3], [7, 1], [2, 6], [1, 0], [4, 7]])
    weights = torch.rand(6, 2)
    sink_outputs = []
    with torch.no_grad():
        stock = experts(hidden, index, weights)
        ours = routed_forward(experts, hidden, index, weights,
                              sink=lambda ids, tokens, gates, act, out, *rest: sink_outputs.append((ids, tokens, out)))
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    ids, tokens, out = sink_outputs[0]
    with torch.no_grad():  # the sink's outputs are normed ones: expert ids[0] alone on token tokens[0]
        alone = experts(hidden[tokens[:1]], ids[:1].view(1, 1), torch.ones(1, 1))
    torch.testing.assert_close(out[:1], alone, rtol=0, atol=1e-5)

    merged = copy.deepcopy(layer)
    lp = LayerPlan(layer=layer.layer, num_experts=8, kept=[2, 0, 1, 3], groups=[[2, 4], [0, 5], [1, 6], [3, 7]],
                   group_weights=[[3.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    before = norm.weight.detach().clone()
    merge_groups(merged, lp)
    slice_layer(merged, lp.kept)
    after = merged.experts.post_expert_norm.weight
    assert after.shape == (4, 32)
    torch.testing.assert_close(after[0], 0.75 * before[2] + 0.25 * before[4])
    torch.testing.assert_close(after[2], before[1])

    class Scale(nn.Module):  # a per-expert tensor moeprune does not know
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8, 32))

    experts.route_scale = Scale()
    with pytest.raises(NotAnMoEModelError, match="route_scale.weight"):
        find_moe_layers(model)
