"""Calibrating and sparsifying a model with MoNE novices installed (router E columns, P kept experts).

The observer's and the sparsify collector's experts patch maps router picks to kept slots, adds the
novices' g * mu and hands only kept-expert pairs to the sink: the patched forward equals the novice
forward, statistics have the kept experts' width, and `mone` + `--sparsify` runs end to end.
"""

from __future__ import annotations

import torch

from moeprune.adapters import find_moe_layers
from moeprune.apply.surgery import apply_plan
from moeprune.calibration.capture import routed_forward
from moeprune.calibration.observer import calibrate
from moeprune.sparsify.run import sparsify
from moeprune.strategies import plan
from moeprune.testing.tiny_models import random_batch, tiny_model


def _mone_model(seed: int = 0):
    model = tiny_model("qwen3_moe", seed=seed).eval()
    ids = random_batch(model.config.vocab_size, batch=4, seq_len=16, seed=seed)
    stats = calibrate(model, ids, progress=False, meta={"num_hidden_layers": model.config.num_hidden_layers})
    apply_plan(model, plan(stats, "mone", 0.5, model=model))
    return model, ids


def test_patched_forward_equals_novice_forward() -> None:
    model, _ = _mone_model()
    layer = find_moe_layers(model)[0]
    experts = layer.experts
    e = experts.moeprune_expert_map.numel()
    hidden = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    index = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:2] for i in range(7)])
    weights = torch.rand(7, 2, generator=torch.Generator().manual_seed(2))
    seen = {}

    def sink(expert_ids, token_ids, gates, act, out, top_k_index, hidden_states):
        seen.update(ids=expert_ids, top=top_k_index)

    expected = experts(hidden, index, weights)  # the installed novice wrapper
    got = routed_forward(experts, hidden, index, weights, sink)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    kept = int((experts.moeprune_expert_map >= 0).sum())
    assert int(seen["ids"].max()) < kept  # kept slots only
    novice_picks = experts.moeprune_expert_map[index] < 0
    assert bool(novice_picks.any()) and bool((seen["top"][novice_picks] == -1).all())


def test_calibrate_mone_model_has_kept_width() -> None:
    model, ids = _mone_model()
    stats = calibrate(model, ids, progress=False, meta={"num_hidden_layers": model.config.num_hidden_layers})
    for layer in find_moe_layers(model):
        kept = int((layer.experts.moeprune_expert_map >= 0).sum())
        assert stats.layers[layer.layer].tensors["count"].numel() == kept
        assert stats.layers[layer.layer].tensors["prob_sum"].numel() == kept


def test_mone_then_sparsify_runs_and_zeroes_half() -> None:
    model, ids = _mone_model()
    before = model(input_ids=ids).logits
    report = sparsify(model, ids, method="wanda", sparsity=0.5, progress=False)
    layer = find_moe_layers(model)[0]
    w = layer.experts.down_proj
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.05
    after = model(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert report is not None
