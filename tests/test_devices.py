"""`--device`: one validation for every command that runs a model; CPU runs here, CUDA by construction."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from moeprune.cli import main
from moeprune.config import load_recipe
from moeprune.devices import check_device_spec, move_model, resolve_device
from moeprune.testing.tiny_models import save_tiny_checkpoint, tiny_model

TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}" for i in range(60))


def test_device_strings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert check_device_spec(" CUDA:1 ") == "cuda:1"
    for bad in ("gpu", "cpu:0", "cuda:x", "", "mps"):
        with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto"):
            check_device_spec(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_auto_is_cpu_and_cuda_is_refused_without_a_gpu():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible"):
        resolve_device("cuda")


def test_auto_and_indices_with_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\) visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_recipe_device_field():
    assert load_recipe(None).device == "auto"
    assert load_recipe(None, {"device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(ValidationError, match="device must be"):
        load_recipe(None, {"device": "tpu"})


def test_move_model_is_a_no_op_when_already_there():
    model = tiny_model("qwen3_moe")
    weight = model.lm_head.weight
    assert move_model(model, torch.device("cpu")) is model and model.lm_head.weight is weight


@pytest.mark.parametrize("command", ["prune", "calibrate", "eval"])
def test_every_model_command_has_device(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert "--device" in result.output and "cuda:N" in result.output


def test_cli_rejects_a_bad_device_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["prune", "builtin:random-tiny", "--device", "gpu", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "device must be cpu, cuda, cuda:N or auto" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("offload", ["--no-offload", "--offload"])
def test_missing_gpu_fails_before_calibration(tmp_path, offload):
    save_tiny_checkpoint("qwen3_moe", tmp_path / "model")
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "model"), offload, "--device", "cuda",
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "no CUDA GPU is visible" in result.output
    assert not (tmp_path / "o").exists()


def test_cpu_device_runs_prune_and_calibrate(tmp_path):
    save_tiny_checkpoint("qwen3_moe", tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT)
    cal = ["--calibration", str(tmp_path / "calib.txt"), "--samples", "4", "--seq-len", "32"]
    runner = CliRunner()
    res = runner.invoke(main, ["calibrate", str(tmp_path / "model"), *cal, "--device", "cpu", "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["prune", str(tmp_path / "model"), *cal, "--device", "cpu", "--ratio", "0.5",
                               "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    recipe = (tmp_path / "out" / "moeprune_recipe.yaml").read_text()
    assert "device: cpu" in recipe
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 4


def test_streamed_skeleton_buffers_follow_the_device(tmp_path):
    # The rotary tables are real tensors in the meta skeleton; they must move with the compute device.
    from moeprune.io.lazy_load import build_skeleton
    from moeprune.engine.skeleton import resident_to_device

    save_tiny_checkpoint("qwen3_moe", tmp_path / "model")
    model = build_skeleton(tmp_path / "model")
    real = [n for n, b in model.named_buffers() if b.device.type != "meta"]
    assert real, "expected real buffers (rotary inv_freq) in the skeleton"
    resident_to_device(model, torch.device("meta"))  # any non-CPU device takes the same path as CUDA
    assert all(b.device.type == "meta" for b in model.buffers())


TEST_DEVICE = __import__("os").environ.get("MOEPRUNE_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh sets cuda


def _bf16_checkpoint(tmp_path, family: str = "qwen3_moe"):
    from moeprune.io.loading import load_model

    src = save_tiny_checkpoint(family, tmp_path / "f32")
    model = load_model(str(src))[0].to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    return tmp_path / "bf16"


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_streamed_layers_compute_in_the_checkpoint_dtype(tmp_path, monkeypatch, family):
    from moeprune.calibration.observer import calibrate
    from moeprune.io.loading import load_model
    from moeprune.calibration import streamed as layerwise
    from moeprune.testing.tiny_models import random_batch

    path = _bf16_checkpoint(tmp_path, family)
    seen: set[torch.dtype] = set()
    original = layerwise.materialise

    def recording(model, keymap, ckpt, prefix, dtype=None):
        names = original(model, keymap, ckpt, prefix, dtype)
        seen.update(model.get_parameter(n).dtype for n in names if n.endswith("proj") or n.endswith("weight"))
        return names

    monkeypatch.setattr(layerwise, "materialise", recording)
    ids = random_batch(272, batch=4, seq_len=10, seed=2)
    device = resolve_device(TEST_DEVICE)
    streamed = layerwise.streamed_calibrate(path, ids, batch_size=2, progress=False, device=device)
    assert seen == {torch.bfloat16}  # no float32 upcast of the layers
    model = move_model(load_model(str(path))[0], device)  # in memory: the checkpoint dtype too (dtype auto)
    assert model.lm_head.weight.dtype == torch.bfloat16
    reference = calibrate(model, ids, batch_size=2, progress=False)
    for index, layer in reference.layers.items():
        for name, value in layer.tensors.items():
            got = streamed.layers[index].tensors[name]
            assert got.dtype == value.dtype and got.device.type == "cpu", name  # statistics: float64 on the CPU
            if device.type == "cpu":
                assert torch.equal(got, value), (index, name)
            else:  # CUDA atomics may reorder float sums
                assert torch.allclose(got, value, rtol=1e-4, atol=1e-6), (index, name)


def test_finite_checks_work_in_chunks(monkeypatch):
    # the NaN/Inf checks of each streamed layer must not allocate a tensor-sized mask (peak RSS)
    import moeprune.nonfinite as nonfinite

    t = torch.randn(70, 3, 5)
    assert nonfinite.all_finite(t) and nonfinite.nonfinite_rows(t) == []
    t[3, 1, 2], t[69, 0, 0] = float("nan"), float("inf")
    monkeypatch.setattr(nonfinite, "_CHUNK", 7)  # several chunks, rows split across them
    assert not nonfinite.all_finite(t) and nonfinite.nonfinite_rows(t) == [3, 69]
