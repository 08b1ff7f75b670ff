"""NAEE dynamic skipping: beta by hand, the skipping forward against the masked computation, the
config extension through save / load_pruned, and plain from_pretrained without skipping."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.adapters import find_moe_layers
from moeprune.apply.dynamic_skip import (
    CONFIG_KEY, calibrate_dynamic_skip, fit_betas, install_dynamic_skip, skip_counts, skip_weights,
)
from moeprune.io.checkpoint import load_pruned, save_pruned
from moeprune.testing.tiny_models import random_batch, tiny_model


def test_beta_is_the_median_ratio_and_skipping_follows_the_rule():
    betas, means = fit_betas({0: torch.tensor([0.1, 0.5, 0.3]), 1: torch.tensor([0.2, 0.9, 0.4, 0.6])})
    assert betas == {0: pytest.approx(0.3), 1: pytest.approx(0.4)}  # even count: the lower middle value
    assert means[1] == pytest.approx(0.525)
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    new, skip = skip_weights(w, 0.5, renormalize=True)
    assert skip.tolist() == [[False, False], [False, True]]  # 0.1 < 0.5 * 0.9; 0.4 >= 0.5 * 0.6
    assert torch.allclose(new, torch.tensor([[0.6, 0.4], [1.0, 0.0]]))
    new, _ = skip_weights(w, 0.5, renormalize=False)
    assert torch.allclose(new, torch.tensor([[0.6, 0.4], [0.9, 0.0]]))
    # top-k > 2: every selected expert is compared to the top one; the mass is kept when renormalising
    new, skip = skip_weights(torch.tensor([[0.2, 0.5, 0.3]]), 0.5, renormalize=True)
    assert skip.tolist() == [[True, False, False]]
    assert torch.allclose(new, torch.tensor([[0.0, 0.625, 0.375]]))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_skipping_forward_equals_the_masked_computation(family):
    model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    experts = layer.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, layer.layout.hidden_dim, generator=g)
    index = torch.stack([torch.randperm(layer.num_experts, generator=g)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, generator=g).softmax(-1)
    install_dynamic_skip(model, {layer.layer: 0.6}, renormalize=True)
    with torch.no_grad():
        skipped = experts(hidden, index, weights)
        masked_w, skip = skip_weights(weights, 0.6, True)
        reference = type(experts).forward(experts, hidden, index, masked_w)
    assert 0 < int(skip.sum()) < 20
    assert torch.allclose(skipped, reference, atol=1e-5)
    counts = skip_counts(model)
    assert counts["calls"] == 40 and counts["skipped"] == int(skip.sum())
    install_dynamic_skip(model, {layer.layer: 0.6}, renormalize=True)  # installing again replaces, never stacks
    with torch.no_grad():
        experts(hidden, index, weights)
    assert skip_counts(model)["calls"] == 40


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_betas_save_reload_and_plain_loading(tmp_path, capfd):
    model = tiny_model("qwen3_moe")
    ids = random_batch(272, batch=8, seq_len=16, seed=2)
    dense = _logits(model, ids)
    record = calibrate_dynamic_skip(model, ids, batch_size=4, progress=False)
    assert record["renormalize"] is True and set(record["betas"]) == {"0", "1"}
    assert all(0.0 < b < 1.0 for b in record["betas"].values())
    skip_counts(model, reset=True)
    skipping = _logits(model, ids)
    # layer 0 sees the same inputs as during calibration: strictly-below-median skips at most half the tokens
    first = find_moe_layers(model)[0].experts
    calls, skipped = first._moeprune_skip_counts
    assert calls == 2 * ids.numel() and 0.2 * calls < skipped <= 0.25 * calls
    assert not torch.allclose(skipping, dense)
    out = save_pruned(model, tmp_path / "skip")
    reloaded = load_pruned(out)
    assert getattr(reloaded.config, CONFIG_KEY)["betas"] == record["betas"]
    assert torch.allclose(_logits(reloaded, ids), skipping, atol=1e-5)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning ...
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    printed = capfd.readouterr()
    assert "moeprune" not in printed.err + printed.out and "warn" not in printed.err.lower()  # ... and no report
    assert torch.allclose(_logits(plain, ids), dense, atol=1e-5)  # stock loading: the same model, no skipping


def test_cli_naee_with_dynamic_skip_in_memory_and_naee_streamed(tmp_path):
    from click.testing import CliRunner

    from moeprune.cli import main
    from moeprune.plan import Plan
    from moeprune.testing.tiny_models import save_tiny_checkpoint

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src")
    common = ["--strategy", "naee", "--ratio", "0.5", "--samples", "2", "--seq-len", "16", "--calibration", "builtin:code",
              "--naee-tokens", "24"]
    result = CliRunner().invoke(main, ["prune", str(src), *common, "--naee-max-subsets", "10", "--dynamic-skip",
                                       "--no-offload", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "out" / "moeprune_plan.json")
    assert set(plan.params["search"].values()) == {"greedy"} and plan.params["sample_tokens"] == 24
    assert set(plan.params["dynamic_skip"]["betas"]) == {"0", "1"}
    model = load_pruned(tmp_path / "out")
    assert all(layer.num_experts == 4 for layer in find_moe_layers(model))
    assert "forward" in find_moe_layers(model)[0].experts.__dict__  # skipping installed
    streamed = CliRunner().invoke(main, ["prune", str(src), *common, "--naee-max-subsets", "10", "--offload",
                                         "--output", str(tmp_path / "streamed")])
    assert streamed.exit_code == 0, streamed.output
    a = Plan.load(tmp_path / "streamed" / "moeprune_plan.json")
    assert {i: lp.kept for i, lp in a.layers.items()} == {i: lp.kept for i, lp in plan.layers.items()}


def test_routers_without_renormalisation_just_lose_the_skipped_term():
    from moeprune.apply.dynamic_skip import gate_ratios

    model = tiny_model("qwen2_moe")  # norm_topk_prob=False
    ids = random_batch(272, batch=2, seq_len=8, seed=5)
    ratios, renormalize = gate_ratios(model, ids, progress=False)
    assert renormalize is False and all(((r > 0) & (r <= 1)).all() for r in ratios.values())
    assert calibrate_dynamic_skip(tiny_model("qwen3_moe"), ids, progress=False)["renormalize"] is True


def test_skipping_composes_with_novices_and_reloads(tmp_path):
    from moeprune.apply.surgery import apply_plan
    from moeprune.calibration.observer import calibrate
    from moeprune.strategies import plan

    model = tiny_model("qwen3_moe")
    ids = random_batch(272, batch=4, seq_len=12, seed=6)
    apply_plan(model, plan(calibrate(model, ids, progress=False), "mone", 0.5))
    novice_only = _logits(model, ids)
    calibrate_dynamic_skip(model, ids, progress=False)
    skipping = _logits(model, ids)
    assert skip_counts(model)["skipped"] > 0 and not torch.allclose(skipping, novice_only)
    reloaded = load_pruned(save_pruned(model, tmp_path / "mone-skip"))
    assert torch.allclose(_logits(reloaded, ids), skipping, atol=1e-5)


def test_calibrating_a_skipping_model_keeps_its_skip_wrapper():
    """The observer's experts patch is undone by restoring what it replaced, not by deleting the
    instance forward (which removed dynamic skipping from the model)."""
    from moeprune.calibration.observer import calibrate

    model = tiny_model("qwen3_moe")
    install_dynamic_skip(model, {layer.layer: 0.5 for layer in find_moe_layers(model)}, True)
    before = {layer.layer: layer.experts.__dict__["forward"] for layer in find_moe_layers(model)}
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=8, seed=0)
    calibrate(model, ids, batch_size=2, progress=False)
    assert {layer.layer: layer.experts.__dict__.get("forward") for layer in find_moe_layers(model)} == before
