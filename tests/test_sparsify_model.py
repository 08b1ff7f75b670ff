"""Intra-expert sparsity on tiny MoE models: routed-token statistics, sequential pass, protection."""

from __future__ import annotations

import copy

import pytest
import torch

from moeprune.adapters import find_moe_layers
from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.sparsify.budget import BudgetError
from moeprune.sparsify.collect import LayerCollector, moe_by_decoder_index, sequential_pass
from moeprune.sparsify.expert_weights import read_expert_linears
from moeprune.sparsify.masks import unstructured_mask, wanda_scores
from moeprune.sparsify.run import sparsify
from moeprune.strategies import plan as make_plan
from moeprune.testing.tiny_models import random_batch, tiny_model

IDS = random_batch(272, 4, 32, seed=3)


def _row_zeros(w: torch.Tensor) -> torch.Tensor:
    return (w == 0).sum(-1)


def test_routed_statistics_differ_from_all_tokens_and_are_used():
    model = tiny_model("qwen3_moe")
    moe = find_moe_layers(model)[0]
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"], seen["top_k"] = args[0].detach().clone(), args[1].detach().clone()

    handle = moe.experts.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(IDS)
    handle.remove()
    hidden, top_k = seen["hidden"], seen["top_k"]
    original = {k: v.clone() for k, v in read_expert_linears(moe.experts).items()}
    counts = torch.stack([(top_k == e).any(1).sum() for e in range(moe.num_experts)])
    assert counts.max() > 2 * counts.min()  # uneven routing

    sparsify(model, IDS, "wanda", 0.5, protect_super=False, min_tokens=0, progress=False)
    pruned = read_expert_linears(moe.experts)
    all_sq = (hidden.double() ** 2).sum(0)
    differs = 0
    for e in range(moe.num_experts):
        routed = hidden[(top_k == e).any(1)].double()
        routed_sq = (routed**2).sum(0)
        # per-token-normalised routed statistics are not the all-token ones
        assert not torch.allclose(routed_sq / len(routed), all_sq / len(hidden), rtol=0.05)
        w = original["gate"][e]
        expected = w * unstructured_mask(wanda_scores(w, routed_sq), 0.5)
        assert torch.allclose(pruned["gate"][e], expected)
        differs += int(not torch.equal(unstructured_mask(wanda_scores(w, all_sq), 0.5),
                                       unstructured_mask(wanda_scores(w, routed_sq), 0.5)))
    assert differs > 0  # all-token statistics would have chosen other weights


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_sequential_pass_sees_what_the_full_model_sees(family):
    """Without pruning, layer-by-layer replay (per-layer masks, rotary, dense first layers) gives
    the same routed statistics for the last MoE layer as a full forward."""
    model = tiny_model(family)
    moe_map = moe_by_decoder_index(model)
    last = max(moe_map)
    with LayerCollector(moe_map[last], {}, hessian=True) as full, torch.no_grad():
        for i in range(0, IDS.shape[0], 2):
            model(IDS[i : i + 2])
    got = {}

    def visit(index, layer, run_all):
        if index == last:
            with LayerCollector(moe_map[last], {}, hessian=True) as c:
                run_all()
            got["c"] = c

    sequential_pass(model, IDS, visit, batch_size=2, progress=False)
    a, b = full.experts, got["c"].experts
    assert torch.equal(a.count, b.count)
    for name in ("gu_sq", "gu_gsq", "dn_sq", "dn_gsq", "gu_hess", "dn_hess"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["moe-pruner", "sparsegpt"])
def test_exact_sparsity_every_layout(family, method):
    model = tiny_model(family)
    report = sparsify(model, IDS, method, 0.5, protect_super=False, min_tokens=4, progress=False)
    for moe in find_moe_layers(model):
        for name, w in read_expert_linears(moe.experts).items():
            assert (_row_zeros(w) == round(0.5 * w.shape[-1])).all(), (moe.layer, name)
        if moe.shared:  # shared experts untouched by default
            assert all((p != 0).all() for m in moe.shared for p in m.parameters() if p.dim() == 2)
    assert report.expert_sparsity == pytest.approx(0.5)


def test_nm_pattern_on_experts():
    model = tiny_model("qwen3_moe")
    sparsify(model, IDS, "wanda", nm="2:4", protect_super=False, progress=False)
    for moe in find_moe_layers(model):
        for w in read_expert_linears(moe.experts).values():
            assert ((w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1) == 2).all()


def test_super_experts_untouched_when_protected():
    model = tiny_model("qwen3_moe")
    before = copy.deepcopy(model)
    report = sparsify(model, IDS, "wanda", 0.5, progress=False)
    assert report.protected_super, "tiny model should have at least one super expert"
    for moe, ref in zip(find_moe_layers(model), find_moe_layers(before)):
        now, then = read_expert_linears(moe.experts), read_expert_linears(ref.experts)
        protected = set(report.protected_super.get(moe.layer, []))
        for e in range(moe.num_experts):
            same = all(torch.equal(now[k][e], then[k][e]) for k in now)
            assert same == (e in protected)
    # without protection the same experts are pruned
    other = copy.deepcopy(before)
    sparsify(other, IDS, "wanda", 0.5, protect_super=False, progress=False)
    layer, experts = next(iter(report.protected_super.items()))
    moe = next(m for m in find_moe_layers(other) if m.layer == layer)
    assert (read_expert_linears(moe.experts)["down"][experts[0]] == 0).any()


def test_after_expert_pruning_total_target_and_fallback():
    model = tiny_model("qwen3_moe")
    stats = calibrate(model, IDS, progress=False)
    p = make_plan(stats, "frequency", 0.25)
    apply_plan(model, p)
    report = sparsify(model, IDS, "sparsegpt", total_sparsity_target=0.625, plan=p, min_tokens=40, progress=False)
    assert report.removed_share == pytest.approx(0.25)
    assert report.total_sparsity == pytest.approx(0.625, abs=0.02)  # super experts compensated
    assert p.params["sparsity"]["method"] == "sparsegpt"
    assert report.fallback  # rare experts (< 40 routed tokens) pruned by magnitude, and reported
    for layer, experts in report.fallback.items():
        assert all(report.tokens[layer][e] < 40 for e in experts)
    with pytest.raises(BudgetError):
        sparsify(model, IDS, "wanda", total_sparsity_target=0.1, plan=p, progress=False)


def test_owl_layer_sparsity_mean_and_measured():
    model = tiny_model("qwen3_moe")
    report = sparsify(model, IDS, "wanda", 0.5, owl=True, protect_super=False, progress=False)
    values = list(report.layer_sparsity.values())
    assert sum(values) / len(values) == pytest.approx(0.5)
    assert max(values) - min(values) == pytest.approx(0.16)
    for moe in find_moe_layers(model):
        w = read_expert_linears(moe.experts)["gate"]
        assert (_row_zeros(w) == round(report.layer_sparsity[moe.layer] * w.shape[-1])).all()
