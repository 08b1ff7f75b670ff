"""Every required family: keep-all is exact, pruning reloads exactly with stock transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import apply, calibrate, plan, save
from moeprune.adapters import find_moe_layers
from moeprune.testing.tiny_models import random_batch, tiny_model
from moeprune.testing.checks import logits_of as _logits



def test_keep_all_plan_is_bit_identical(family):
    model = tiny_model(family)
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
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(_logits(reloaded, ids), pruned, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    counts = [config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in config]
    assert counts and all(c == 4 for c in counts)
    assert [layer.num_experts for layer in find_moe_layers(reloaded)] == [4] * len(p.layers)
    assert (out / "moeprune_plan.json").is_file()


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_pruned_model_runs_with_labels_and_router_logits(family, implementation):
    model = tiny_model(family)
    ids = random_batch(model.config.vocab_size, batch=2, seq_len=10)
    apply(model, plan(calibrate(model, ids, progress=False), "frequency", 0.5))
    model.set_experts_implementation(implementation)
    out = model(ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss)
    if getattr(out, "router_logits", None) is not None:
        assert all(t.shape[-1] == 4 for t in out.router_logits)
