"""Merging expert groups into one physical expert: exactness, alignment, router choice, reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import apply, calibrate, plan, save
from moeprune.adapters import find_moe_layers
from moeprune.apply.merge import alignment, permute_neurons, read_experts, write_experts
from moeprune.plan import LayerPlan, Plan
from moeprune.testing.tiny_models import random_batch, tiny_model
from moeprune.testing.checks import logits_of as _logits, safetensors_bytes, router_row_params

FAMILIES = ["qwen3_moe", "gpt_oss"]





def _copy_expert(model, src: int, dst: int, perm: torch.Tensor | None = None, router: bool = False) -> None:
    for layer in find_moe_layers(model):
        t = read_experts(layer)
        for v in t.values():
            v[dst] = v[src]
        if perm is not None:
            permute_neurons(t, dst, perm)
        write_experts(layer, t)
        if router:
            with torch.no_grad():
                for p in [layer.router.weight, getattr(layer.router, "bias", None)]:
                    if p is not None:
                        p[dst] = p[src]


def _group_plan(model, groups: list[list[int]], weights: list[list[float]] | None, **params) -> Plan:
    layers = {}
    for layer in find_moe_layers(model):
        lp = LayerPlan(layer=layer.layer, num_experts=layer.num_experts, kept=[g[0] for g in groups])
        if weights is not None:
            lp.groups, lp.group_weights = [list(g) for g in groups], [list(w) for w in weights]
        layers[layer.layer] = lp
    top_k = find_moe_layers(model)[0].routing.top_k
    return Plan(strategy="test", params=params, layers=layers, top_k=top_k)


GROUPS = [[0, 1, 2], [3], [4, 5], [6], [7]]
WEIGHTS = [[0.5, 0.3, 0.2], [1.0], [0.6, 0.4], [1.0], [1.0]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ["representative", "average"])
def test_merging_identical_experts_equals_dropping_them(family, router):
    ids = random_batch(272, batch=2, seq_len=10)
    merged, dropped = tiny_model(family), tiny_model(family)
    for m in (merged, dropped):
        _copy_expert(m, 0, 1, router=True)
        _copy_expert(m, 0, 2, router=True)
        _copy_expert(m, 4, 5, router=True)
    apply(merged, _group_plan(merged, GROUPS, WEIGHTS, merge_router=router))
    apply(dropped, _group_plan(dropped, GROUPS, None))
    assert find_moe_layers(merged)[0].num_experts == 5
    assert torch.allclose(_logits(merged, ids), _logits(dropped, ids), atol=1e-6)


def test_merging_never_routed_identical_experts_changes_no_logits():
    # gpt-oss: softmax over the selected logits only, so never-selected experts do not matter
    model = tiny_model("gpt_oss")
    _copy_expert(model, 0, 1)
    _copy_expert(model, 0, 2)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.router.bias[[1, 2]] = -1e4
    ids = random_batch(272, batch=2, seq_len=10)
    reference = _logits(model, ids)
    apply(model, _group_plan(model, [[0, 1, 2], [3], [4], [5], [6], [7]], [[0.2, 0.5, 0.3]] + [[1.0]] * 5))
    assert find_moe_layers(model)[0].num_experts == 6
    assert torch.allclose(_logits(model, ids), reference, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_alignment_recovers_a_random_permutation(family):
    model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    width = layer.layout.intermediate_dim
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(3))
    _copy_expert(model, 0, 1, perm=perm)
    t = read_experts(find_moe_layers(model)[0])
    assert not torch.equal(t["gate" if "gate" in t else "up"][1], t["gate" if "gate" in t else "up"][0])
    found = alignment(t, 0, 1)
    assert torch.equal(perm[found], torch.arange(width))  # found undoes perm exactly
    permute_neurons(t, 1, found)
    for v in t.values():
        assert torch.equal(v[1], v[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_merge_of_permuted_copies_is_exact(family):
    ids = random_batch(272, batch=2, seq_len=10)
    models = {name: tiny_model(family) for name in ("aligned", "plain", "dropped")}
    for m in models.values():
        _copy_expert(m, 0, 1, perm=torch.randperm(24, generator=torch.Generator().manual_seed(5)))
    apply(models["aligned"], _group_plan(models["aligned"], [[0, 1]] + [[j] for j in range(2, 8)],
                                         [[0.5, 0.5]] + [[1.0]] * 6, merge_align=True))
    apply(models["plain"], _group_plan(models["plain"], [[0, 1]] + [[j] for j in range(2, 8)], [[0.5, 0.5]] + [[1.0]] * 6))
    apply(models["dropped"], _group_plan(models["dropped"], [[0]] + [[j] for j in range(2, 8)], None))
    reference = _logits(models["dropped"], ids)
    assert torch.allclose(_logits(models["aligned"], ids), reference, atol=1e-6)
    assert not torch.allclose(_logits(models["plain"], ids), reference, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_the_weighted_average_and_router_choice(family):
    for router in ("representative", "average"):
        model = tiny_model(family)
        before = find_moe_layers(model)[0]
        names = [n for n, _ in before.experts.named_parameters()]
        orig = {n: p.detach().clone() for n, p in before.experts.named_parameters()}
        rows = before.router.weight.detach().clone()
        apply(model, _group_plan(model, [[2, 5]] + [[j] for j in (0, 1, 3, 4, 6, 7)],
                                 [[0.75, 0.25]] + [[1.0]] * 6, merge_router=router))
        after = find_moe_layers(model)[0]
        slot = 0  # slots follow the plan's kept order: expert 2's group comes first
        for n in names:  # every storage layout is linear in the canonical one
            expected = 0.75 * orig[n][2] + 0.25 * orig[n][5]
            assert torch.allclose(getattr(after.experts, n)[slot], expected, atol=1e-7), n
        want = 0.75 * rows[2] + 0.25 * rows[5] if router == "average" else rows[2]
        assert torch.allclose(after.router.weight[slot], want, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["hc-smoe", "m-smoe"])
def test_merged_checkpoint_reloads_and_is_smaller(family, strategy, tmp_path):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12)
    original = save(model, tmp_path / "orig")
    stats = calibrate(model, ids, progress=False, dense_tokens=32)
    p = plan(stats, strategy, 0.5, model=model)
    assert all(len(g) >= 1 for lp in p.layers.values() for g in lp.groups)
    assert any(len(g) > 1 for lp in p.layers.values() for g in lp.groups)
    apply(model, p)
    compressed = _logits(model, ids)
    out = save(model, tmp_path / "out", plan=p)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(_logits(reloaded, ids), compressed, atol=1e-5)
    layout = find_moe_layers(reloaded)[0].layout
    removed = sum(lp.num_experts - lp.num_kept for lp in p.layers.values())
    per_expert = (layout.params_per_expert() + router_row_params(reloaded)) * 4  # + one router row
    saved = safetensors_bytes(original) - safetensors_bytes(out)
    assert removed == 8
    assert saved == removed * per_expert
