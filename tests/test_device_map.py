"""`--device auto` with several GPUs loads the model spread over them (accelerate's device_map);
one GPU or the CPU loads it whole. CUDA is mocked: these tests decide, they do not run on GPUs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moeprune.io.checkpoint as checkpoint
from moeprune.devices import device_map_for, is_spread, move_model
from moeprune.io.loading import load_model
from moeprune.testing.tiny_models import save_tiny_checkpoint, tiny_model


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("count, spec, expected", [
    (2, "auto", "auto"), (4, "auto", "auto"), (1, "auto", None), (0, "auto", None),
    (2, "cuda", None), (2, "cuda:1", None), (2, "cpu", None), (2, None, "auto"),
])
def test_device_map_decision(monkeypatch, count, spec, expected):
    _gpus(monkeypatch, count)
    assert device_map_for(spec) == expected


@pytest.fixture()
def recorded(monkeypatch):
    """from_pretrained's keyword arguments; the load itself runs on the CPU without device_map."""
    calls: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("device_map", None)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("count, device, passed", [(2, "auto", "auto"), (1, "auto", None), (2, "cpu", None), (2, None, None)])
def test_load_model_passes_the_device_map(monkeypatch, recorded, tmp_path, count, device, passed):
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    _gpus(monkeypatch, count)
    model, _, _ = load_model(str(src), device=device)
    if passed:  # spread: from_pretrained places the weights on their GPUs
        assert len(recorded) == 1 and recorded[0].get("device_map") == passed
    else:  # whole on the CPU: the lazy loader (io.lazy_load), not from_pretrained
        assert recorded == []
    assert next(model.parameters()).device.type == "cpu"


def test_checkpoints_with_extensions_are_dispatched_after_building(monkeypatch, recorded, tmp_path):
    # non-uniform outputs are rebuilt by hand (no from_pretrained device_map): dispatched afterwards
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, checkpoint.PER_LAYER_KEY: {"0": 4}}))
    dispatched = []
    monkeypatch.setattr(checkpoint, "_dispatch", lambda model: dispatched.append(model) or model)
    monkeypatch.setattr(checkpoint, "_load_non_uniform", lambda *a, **k: tiny_model("qwen3_moe"))
    _gpus(monkeypatch, 2)
    model, _, _ = load_model(str(src), device="auto")
    assert dispatched == [model] and recorded == []
    _gpus(monkeypatch, 1)
    load_model(str(src), device="auto")
    assert len(dispatched) == 1  # one GPU: not dispatched, moved by the caller


def test_a_spread_model_is_not_moved():
    model = tiny_model("qwen3_moe")
    assert not is_spread(model)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    assert is_spread(model)
    assert move_model(model, torch.device("meta")) is model
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.hf_device_map = {"": 0}  # one device: an ordinary model
    assert not is_spread(model)
    move_model(model, torch.device("meta"))
    assert next(model.parameters()).device.type == "meta"
