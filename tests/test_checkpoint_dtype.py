"""`dtype="auto"` is the dtype most of a checkpoint's weights are stored in, whatever its config
says: a model that keeps its first tensors in float32 (Ergo's embeddings) is saved by transformers
with `dtype: float32` in its config although it is a bfloat16 checkpoint. Outputs keep it, and
their config says so."""

from __future__ import annotations

import json

import torch

from moeprune.io.loading import checkpoint_dtype, resolve_dtype
from moeprune.io.safetensors_io import read_checkpoint_tensors
from moeprune.testing.tiny_models import random_batch, tiny_model
from moeprune.testing.tiny_tokenizer import byte_tokenizer


def _bf16_checkpoint_saying_float32(path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    model.model.embed_tokens.float()  # kept in float32, as Ergo keeps its embeddings
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "float32"  # what transformers writes for such a model: its first parameter's dtype
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_auto_is_the_dtype_most_weights_are_stored_in(tmp_path):
    src = _bf16_checkpoint_saying_float32(tmp_path / "src")
    assert checkpoint_dtype(src) == resolve_dtype("auto", src) == torch.bfloat16
    fp32 = tiny_model("qwen3_moe")
    fp32.save_pretrained(tmp_path / "fp32")
    assert checkpoint_dtype(tmp_path / "fp32") == torch.float32


def test_outputs_keep_every_tensors_dtype_and_say_the_dominant_one(tmp_path):
    """Ergo (transformers 5.25) keeps its embeddings, norms and router in float32 in a bfloat16 model."""
    import pytest
    import transformers
    from click.testing import CliRunner

    from moeprune.cli import main
    from moeprune.testing.family_survey import _as_stock_checkpoint, moe_families, seeded_model
    from moeprune.testing.shrunk_configs import shrunk_config

    if "ergo" not in moe_families():
        pytest.skip("ergo is not in this transformers")
    src = tmp_path / "src"
    _as_stock_checkpoint(seeded_model(shrunk_config("ergo")), torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "float32"  # transformers' own writing
    assert checkpoint_dtype(src) == torch.bfloat16
    before = read_checkpoint_tensors(src)
    assert {v.dtype for v in before.values()} == {torch.bfloat16, torch.float32}
    for extra, name in (([], "out"), (["--offload"], "streamed")):
        args = ["prune", str(src), "--strategy", "frequency", "--ratio", "0.5", "--samples", "4", "--seq-len", "32",
                "-o", str(tmp_path / name), *extra]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        after = read_checkpoint_tensors(tmp_path / name)
        assert {k: v.dtype for k, v in after.items()} == {k: before[k].dtype for k in after}
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert reloaded.model.layers[1].mlp.experts.up_proj.dtype == torch.bfloat16
    ids = random_batch(reloaded.config.vocab_size, batch=1, seq_len=8)
    assert torch.isfinite(reloaded(ids).logits).all()
