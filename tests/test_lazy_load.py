"""`io.lazy_load.load_lazily` (the in-memory loader of stock local checkpoints) equals
`from_pretrained` for every family: the same tensors, dtypes, tied weights and logits; families it
does not cover answer None (the caller then uses `from_pretrained`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.adapters.shims import install_shims
from moeprune.io.lazy_load import load_lazily
from moeprune.testing.tiny_models import FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, random_batch, save_tiny_checkpoint

FAMILIES = sorted(FAMILY_CONFIGS) + sorted(MORE_FAMILY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_load_equals_from_pretrained(family, tmp_path):
    path = save_tiny_checkpoint(family, tmp_path / family, max_shard_size="20KB")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lazy = load_lazily(path, torch.float32)
    install_shims(ref)  # the lazy model is shimmed by its key map, as load_model shims every model
    a, b = ref.state_dict(), lazy.state_dict()  # (LongCat's never-read identity rows of gate_up_proj: zeros in both)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert dict(ref.named_buffers()).keys() == dict(lazy.named_buffers()).keys()
    if ref.get_output_embeddings().weight is ref.get_input_embeddings().weight:  # tied: one tensor, as stock
        assert lazy.get_output_embeddings().weight is lazy.get_input_embeddings().weight
    assert lazy.name_or_path == str(path) and not lazy.training
    batch = random_batch(ref.config.get_text_config().vocab_size, 2, 8, seed=1)
    with torch.no_grad():
        # the tensors are bit-equal above; from_pretrained's are views into the map (other alignment, other
        # SIMD paths in a few kernels), so logits may differ by float32 rounding
        torch.testing.assert_close(lazy(batch).logits, ref(batch).logits, rtol=0, atol=1e-6)


def test_load_model_uses_it_and_keeps_the_dtype(tmp_path, monkeypatch):
    from moeprune.io.loading import load_model

    model = AutoModelForCausalLM.from_pretrained(save_tiny_checkpoint("qwen3_moe", tmp_path / "f32"))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not run for a stock local checkpoint")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    loaded = load_model(str(tmp_path / "bf16"))[0]
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(x, y) for x, y in zip(ref.state_dict().values(), loaded.state_dict().values()))


def test_quantized_or_remote_code_checkpoints_are_left_to_from_pretrained(tmp_path):
    import json

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (path / "config.json").write_text(json.dumps(config))
    assert load_lazily(path, torch.float32) is None
