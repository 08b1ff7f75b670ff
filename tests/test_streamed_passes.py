"""Streamed sparsify and layer-local router KD (`apply/streamed_passes.py`) equal the in-memory path.

Tiny multi-shard checkpoints; the same plan applied in memory (then `sparsify` / `run_router_kd`,
saved with `save_pruned`) and streamed (`streamed_apply` with `LayerPasses`): every output tensor
and the recorded reports match.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.io.checkpoint import save_pruned
from moeprune.io.loading import load_model
from moeprune.io.safetensors_io import read_checkpoint_tensors
from moeprune.recover.config import RouterKDConfig
from moeprune.sparsify.run import sparsify, sparsify_job
from moeprune.strategies import plan as make_plan
from moeprune.apply.streamed import streamed_apply
from moeprune.apply.streamed_passes import LayerPasses, LocalKD
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint

IDS = random_batch(272, 6, 16, seed=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("passes")
    return {f: save_tiny_checkpoint(f, root / f, max_shard_size="20KB") for f in ("qwen3_moe", "deepseek_v3")}


def _plan_and_model(path: Path):
    model, tokenizer, _ = load_model(str(path))
    plan = make_plan(calibrate(model, IDS, batch_size=4, progress=False), "reap", 0.5)
    return model, tokenizer, plan


def _assert_same_tensors(ref: Path, out: Path) -> None:
    a, b = read_checkpoint_tensors(ref), read_checkpoint_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name] == 0, b[name] == 0), name  # the same weights pruned
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("family, options", [
    ("qwen3_moe", {"method": "wanda", "sparsity": 0.5}),  # super experts protected (a pre-pass)
    ("qwen3_moe", {"method": "sparsegpt", "sparsity": 0.5, "min_tokens": 4, "protect_super": False}),
    ("qwen3_moe", {"method": "wanda", "nm": "2:4", "protect_super": False}),
    ("deepseek_v3", {"method": "moe-pruner", "sparsity": 0.4, "owl": True, "attention": True, "shared_scale": 0.5}),
    ("deepseek_v3", {"method": "sparsegpt", "total_sparsity_target": 0.7, "super_scale": 0.5, "min_tokens": 4}),
])
def test_streamed_sparsify_equals_in_memory(family, options, checkpoints, tmp_path):
    src = checkpoints[family]
    model, tokenizer, plan = _plan_and_model(src)
    streamed_plan = copy.deepcopy(plan)
    apply_plan(model, plan)
    report = sparsify(model, IDS, plan=plan, batch_size=4, progress=False, **options)
    ref = save_pruned(model, tmp_path / "ref", plan=plan, tokenizer=tokenizer, input_dir=src)
    passes = LayerPasses(src, streamed_plan, IDS, 4, torch.device("cpu"), 2000,  # tiny budget: activations spill
                         sparsify_job(plan=streamed_plan, **options))
    out = streamed_apply(src, streamed_plan, tmp_path / "out", max_shard_size="20KB", progress=False, edits=[passes])
    _assert_same_tensors(ref, out)
    assert report.expert_sparsity > 0.3
    assert streamed_plan.params["sparsity"] == plan.params["sparsity"]


def _text_source(tmp_path: Path) -> str:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "moe"]
    file = tmp_path / "kd.txt"
    file.write_text("\n".join(" ".join(rng.choice(words) for _ in range(80)) for _ in range(40)))
    return str(file)


@pytest.mark.parametrize("with_sparsify", [False, True])
def test_streamed_local_router_kd_equals_in_memory(with_sparsify, checkpoints, tmp_path):
    from moeprune.recover.kd_data import held_apart_ids
    from moeprune.recover.run import prepare_router_kd, run_router_kd

    src = checkpoints["qwen3_moe"]
    source = _text_source(tmp_path)
    cfg = RouterKDConfig(local=True, local_steps=12, samples=4, seq_len=16, seed=3)
    model, tokenizer, plan = _plan_and_model(src)
    streamed_plan = copy.deepcopy(plan)
    prep = prepare_router_kd(model, tokenizer, cfg, source, 16, 0, planning_ids=IDS, batch_size=4, progress=False)
    apply_plan(model, plan)
    options = {"method": "wanda", "sparsity": 0.5, "protect_super": False}
    if with_sparsify:
        sparsify(model, IDS, plan=plan, batch_size=4, progress=False, **options)
    kd_report = run_router_kd(model, prep, progress=False)
    ref = save_pruned(model, tmp_path / "ref", plan=plan, tokenizer=tokenizer, input_dir=src)

    kd_ids = held_apart_ids(source, tokenizer, cfg.samples, cfg.seq_len, cfg.seed, exclude=IDS)
    kd = LocalKD(cfg, cfg.seed, kd_ids)
    job = sparsify_job(plan=streamed_plan, **options) if with_sparsify else None
    passes = LayerPasses(src, streamed_plan, IDS, 4, torch.device("cpu"), 2000, job, kd)
    out = streamed_apply(src, streamed_plan, tmp_path / "out", max_shard_size="20KB", progress=False, edits=[passes])
    _assert_same_tensors(ref, out)
    a, b = kd_report["local"]["layers"], streamed_plan.params["router_kd"]["local"]["layers"]
    assert sorted(a) == sorted(b)
    for layer in a:
        assert a[layer]["mse_after"] < a[layer]["mse_before"]  # the fit did something that could differ
        assert b[layer]["mse_before"] == pytest.approx(a[layer]["mse_before"], rel=1e-5)
        assert b[layer]["mse_after"] == pytest.approx(a[layer]["mse_after"], rel=1e-5)
    dense = read_checkpoint_tensors(src)
    router = next(k for k in dense if k.endswith("mlp.gate.weight"))
    assert not torch.equal(read_checkpoint_tensors(out)[router], dense[router][plan.layers[int(router.split(".")[2])].kept])


@pytest.mark.slow  # two CLI prunes (~20 s alone, more on a shared CPU)
def test_cli_offload_sparsify_and_local_kd_equal_in_memory(checkpoints, tmp_path):
    from click.testing import CliRunner

    from moeprune.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    common = ["prune", checkpoints["qwen3_moe"], "--strategy", "reap", "--ratio", "0.5", "--calibration",
              _text_source(tmp_path), "--samples", "4", "--seq-len", "16", "--sparsify", "sparsegpt", "--sparsity", "0.5",
              "--router-kd-local", "--router-kd-local-steps", "6", "--router-kd-samples", "4"]
    memory = run(*common, "--no-offload", "-o", tmp_path / "mem")
    assert memory.exit_code == 0, memory.output
    streamed = run(*common, "--offload", "-o", tmp_path / "off")
    assert streamed.exit_code == 0, streamed.output
    assert "(streamed)" in streamed.output and "intra-expert sparsegpt" in streamed.output
    assert "local router KD: 6 steps/layer" in streamed.output
    _assert_same_tensors(tmp_path / "mem", tmp_path / "off")
    refused = run(*common, "--router-kd", "2", "--offload", "-o", tmp_path / "out2")
    assert refused.exit_code == 2 and "runs in memory only" in refused.output and "--router-kd-local" in refused.output
