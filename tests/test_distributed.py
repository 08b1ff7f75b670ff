"""Data-parallel calibration: 2 torchrun processes (gloo, CPU) equal one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats, LayerStats
from moeprune.distributed import all_reduce_stats, rank_batches
from moeprune.io.loading import load_model
from moeprune.plan import Plan
from moeprune.strategies import plan as make_plan
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint


def test_rank_batches_partition_the_single_process_batches():
    ids = torch.arange(50).view(10, 5)
    shares = [rank_batches(ids, 3, r, 2) for r in range(2)]
    assert [b["input_ids"][0, 0].item() for b in shares[0]] == [0, 30]
    assert [b["input_ids"][0, 0].item() for b in shares[1]] == [15, 45]
    assert sum(b["input_ids"].shape[0] for s in shares for b in s) == 10


def test_all_reduce_is_identity_without_process_group():
    stats = ExpertStats({0: LayerStats.zeros(4, 2, 3)}, {"sequences": 3})
    assert all_reduce_stats(stats) is stats and stats.meta["sequences"] == 3


@pytest.mark.parametrize("offload", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_torchrun_two_processes_equal_single_process(tmp_path, offload):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", max_shard_size="20KB")
    ids = random_batch(272, batch=10, seq_len=12, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    out, pruned = tmp_path / "stats.safetensors", tmp_path / "pruned"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moeprune.distributed", str(path), "--ids", str(tmp_path / "ids.pt"), "--batch-size", "2",
           "--output", str(out), "--strategy", "frequency", "--ratio", "0.5", "--prune-output", str(pruned), "--quiet"]
    if offload:
        cmd += ["--offload", "--work-dir", str(tmp_path / "work")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: wrote" in proc.stdout

    model = load_model(str(path))[0]
    single = calibrate(model, ids, batch_size=2, progress=False)
    both = ExpertStats.load(out)
    assert both.meta["world_size"] == 2 and both.meta["sequences"] == 10
    for index, layer in single.layers.items():
        for name, value in layer.tensors.items():
            torch.testing.assert_close(both.layers[index].tensors[name], value, rtol=1e-10, atol=1e-12, msg=name)
    assert Plan.load(pruned / "moeprune_plan.json").layers == make_plan(single, "frequency", 0.5).layers


@pytest.mark.parametrize("where", ["stats-inside-input", "prune-output-parent-of-input", "foreign-stats", "no-model"])
def test_outputs_refused_before_any_work(tmp_path, capsys, where, monkeypatch):
    """The data-parallel entry point follows the one output policy, before calibrating."""
    from moeprune import distributed

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "models" / "ckpt", max_shard_size="20KB")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("mine")
    args = {"stats-inside-input": ["--output", str(path / "stats.safetensors")],
            "prune-output-parent-of-input": ["--output", str(tmp_path / "s.safetensors"),
                                             "--prune-output", str(tmp_path / "models"), "--overwrite"],
            "foreign-stats": ["--output", str(foreign), "--overwrite"],
            "no-model": ["--output", str(tmp_path / "s.safetensors")]}[where]
    if where == "no-model":
        path = tmp_path / "models" / "absent"
    monkeypatch.setattr(distributed, "distributed_calibrate", lambda *a, **k: pytest.fail("calibrated"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        distributed.main([str(path), "--ids", str(tmp_path / "missing.pt"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err
    model_dir = tmp_path / "models" / "ckpt"
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before and foreign.read_text() == "mine"
    assert not (tmp_path / "s.safetensors").exists()
