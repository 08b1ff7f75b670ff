"""The observer's statistics: hand-set experts and router, a dense reference loop, merging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeprune.adapters import find_moe_layers
from moeprune.calibration.observer import Observer, calibrate
from moeprune.calibration.stats import ExpertStats
from moeprune.testing.tiny_models import random_batch, tiny_model


def test_hand_set_experts_and_router():
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[0]
    experts, router = layer.experts, layer.router
    e, hidden, inter = 8, 32, 24
    with torch.no_grad():
        experts.gate_up_proj.zero_()
        experts.down_proj.zero_()
        for j in range(e):
            experts.gate_up_proj[j, 0, 0] = 1.0 + j  # gate neuron 0 reads x0 with weight 1+j
            experts.gate_up_proj[j, inter, 0] = 1.0  # up neuron 0 reads x0
            experts.down_proj[j, j % hidden, 0] = 2.0  # neuron 0 writes 2 * a0 to dim j
        router.weight.zero_()
        router.weight[:, 0] = torch.arange(e, dtype=torch.float32)  # logits = j * x0
    x = torch.zeros(3, hidden)
    x[:, 0] = torch.tensor([1.0, 2.0, -1.0])
    index = torch.tensor([[0, 1], [1, 2], [2, 0]])
    gates = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    obs = Observer(model)
    with obs, torch.no_grad():
        obs.set_mask(torch.tensor([True, True, False]))  # third token is padding
        experts(x, index, gates)
        router(x)
    stats = obs.stats[layer.layer]

    def a0(j, x0):
        return float(F.silu(torch.tensor((1.0 + j) * x0)) * x0)

    # valid routes: (tok0,e0,.75) (tok0,e1,.25) (tok1,e1,.5) (tok1,e2,.5)
    f = {(0, 0): 2 * a0(0, 1.0), (0, 1): 2 * a0(1, 1.0), (1, 1): 2 * a0(1, 2.0), (1, 2): 2 * a0(2, 2.0)}
    assert stats.count.tolist() == [1, 2, 1, 0, 0, 0, 0, 0]
    assert stats.gate_sum[:3].tolist() == pytest.approx([0.75, 0.75, 0.5])
    assert stats.ean_sum[:3].tolist() == pytest.approx([abs(f[0, 0]), abs(f[0, 1]) + abs(f[1, 1]), abs(f[1, 2])])
    assert stats.reap_sum[1].item() == pytest.approx(0.25 * abs(f[0, 1]) + 0.5 * abs(f[1, 1]))
    assert stats.reap_sq_sum[1].item() == pytest.approx((0.25 * f[0, 1]) ** 2 + (0.5 * f[1, 1]) ** 2)
    assert stats.max_out[1].item() == pytest.approx(max(abs(f[0, 1]), abs(f[1, 1])))
    assert stats.out_sum[1, 1].item() == pytest.approx(f[0, 1] + f[1, 1])
    assert stats.out_sq[2, 2].item() == pytest.approx(f[1, 2] ** 2)
    assert stats.coselect[0, 1].item() == 1 and stats.coselect[1, 2].item() == 1 and stats.coselect[0, 2].item() == 0
    assert stats.reap()[3].item() == 0.0
    # router: logits l_j = j * x0 for the two valid tokens x0 = 1, 2
    logits = torch.arange(e, dtype=torch.float64).outer(torch.tensor([1.0, 2.0], dtype=torch.float64)).T
    assert stats.tokens.item() == 2
    assert torch.allclose(stats.prob_sum, logits.softmax(-1).sum(0))
    assert torch.allclose(stats.logit_gram, logits.T @ logits)


def _reference_scores(model, ids):
    """REAP paper definitions, computed with a dense loop over every expert and token."""
    captured = {}
    layers = find_moe_layers(model)
    hooks = [
        layer.block.register_forward_pre_hook(lambda m, args, i=layer.layer: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])))
        for layer in layers
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    result = {}
    for layer in layers:
        x = captured[layer.layer].double()
        w = layer.router.weight.double()
        p = (x @ w.T).softmax(-1)
        topv, topi = p.topk(layer.routing.top_k, dim=-1)
        if layer.routing.norm_topk_prob is not False:  # Mixtral and Qwen3 renormalise
            topv = topv / topv.sum(-1, keepdim=True)
        e = layer.num_experts
        freq, ean, reap_num = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
        inter = layer.layout.intermediate_dim
        for j in range(e):
            gu = layer.experts.gate_up_proj[j].double()
            down = layer.experts.down_proj[j].double()
            out = (F.silu(x @ gu[:inter].T) * (x @ gu[inter:].T)) @ down.T
            norms = out.norm(dim=-1)
            routed = (topi == j)
            g = (topv * routed).sum(-1)
            mask = routed.any(-1)
            freq[j] = mask.sum()
            ean[j] = norms[mask].sum()
            reap_num[j] = (g[mask] * norms[mask]).sum()
        reap = torch.where(freq > 0, reap_num / freq.clamp_min(1), torch.zeros_like(freq))
        result[layer.layer] = (freq, ean, reap)
    return result


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_scores_match_dense_reference_loop(family):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=3, seq_len=16, seed=3)
    stats = calibrate(model, ids, progress=False)
    reference = _reference_scores(model, ids)
    for index, (freq, ean, reap) in reference.items():
        s = stats.layers[index]
        assert torch.equal(s.frequency(), freq)
        assert torch.allclose(s.ean(), ean, rtol=1e-6)
        assert torch.allclose(s.reap(), reap, rtol=1e-6)


def test_padding_is_excluded():
    model = tiny_model("olmoe")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = calibrate(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert all(s.tokens.item() == 13 for s in padded.layers.values())
    assert all(s.count.sum().item() == 13 * 2 for s in padded.layers.values())


def test_merged_halves_equal_whole_and_roundtrip(tmp_path):
    model = tiny_model("deepseek_v3")
    ids = random_batch(model.config.vocab_size, batch=4, seq_len=12)
    whole = calibrate(model, ids, batch_size=2, progress=False)  # same batches as the halves
    first = calibrate(model, ids[:2], batch_size=2, progress=False)
    second = calibrate(model, ids[2:], batch_size=2, progress=False)
    merged = first.merge(second)
    for index, layer in whole.layers.items():
        for name, value in layer.tensors.items():
            assert torch.allclose(merged.layers[index].tensors[name], value, rtol=1e-10, atol=1e-9), name
    path = whole.save(tmp_path / "stats.safetensors")
    loaded = ExpertStats.load(path)
    assert loaded.digest() == whole.digest()
    assert loaded.meta["top_k"] == 2


def test_sigmoid_group_router_stats_use_models_own_selection():
    model = tiny_model("deepseek_v3")
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=12)
    layer = find_moe_layers(model)[0]
    seen = []
    handle = layer.experts.register_forward_pre_hook(lambda m, args: seen.append((args[1].clone(), args[2].clone())))
    stats = calibrate(model, ids, progress=False)
    handle.remove()
    index, weights = seen[0]
    expected = torch.bincount(index.reshape(-1), minlength=8).double()
    assert torch.equal(stats.layers[layer.layer].count, expected)
    gate = torch.zeros(8, dtype=torch.float64).index_add_(0, index.reshape(-1), weights.reshape(-1).double())
    assert torch.allclose(stats.layers[layer.layer].gate_sum, gate)
    # group-limited: every token's experts come from topk_group=1 group of 4
    assert bool(((index // 4)[:, 0] == (index // 4)[:, 1]).all())


def test_reference_gate_equals_model_gate_for_softmax_and_differs_for_sigmoid():
    for family, same in (("qwen3_moe", True), ("deepseek_v3", False)):
        model = tiny_model(family)
        stats = calibrate(model, random_batch(model.config.vocab_size, batch=2, seq_len=12), progress=False)
        layer = stats.layers[min(stats.layers)]
        assert torch.allclose(layer.reap(), layer.reap_reference(), rtol=1e-5) == same, family
