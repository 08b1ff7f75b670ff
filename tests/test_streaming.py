"""Streamed calibration and surgery equal the in-memory path on tiny multi-shard checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.io.checkpoint import load_pruned, save_pruned
from moeprune.io.loading import load_model
from moeprune.io.safetensors_io import CorruptCheckpointError, read_checkpoint_tensors
from moeprune.plan import Plan
from moeprune.strategies import plan as make_plan
from moeprune.calibration.streamed import streamed_calibrate
from moeprune.engine.activations import ActivationStore
from moeprune.io.lazy_reader import LazyCheckpoint
from moeprune.apply.streamed import COMPLETE_MARKER, streamed_apply
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint

FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_tiny_checkpoint(f, root / f, max_shard_size="20KB") for f in FAMILIES}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return random_batch(272, batch=6, seq_len=12, seed=1)


@pytest.fixture(scope="module")
def reference(checkpoints, ids):
    """In-memory statistics per family."""
    out = {}
    for family, path in checkpoints.items():
        model, _, _ = load_model(str(path))
        out[family] = calibrate(model, ids, batch_size=4, progress=False)
    return out


def assert_stats_equal(a, b) -> None:
    assert sorted(a.layers) == sorted(b.layers)
    for index in a.layers:
        assert sorted(a.layers[index].tensors) == sorted(b.layers[index].tensors)
        for name, value in a.layers[index].tensors.items():
            assert torch.equal(value, b.layers[index].tensors[name]), (index, name)


def assert_checkpoints_equal(ref: Path, out: Path) -> None:
    a, b = read_checkpoint_tensors(ref), read_checkpoint_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((ref / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    assert Plan.load(ref / "moeprune_plan.json").layers == Plan.load(out / "moeprune_plan.json").layers


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_statistics_equal_in_memory(family, checkpoints, ids, reference):
    # 2 kB budget: most hidden states spill to disk between layers
    stats = streamed_calibrate(checkpoints[family], ids, batch_size=4, progress=False, memory_budget=2000)
    assert_stats_equal(reference[family], stats)
    assert stats.meta["sequences"] == 6 and stats.digest() == reference[family].digest()


def test_activation_store_spills_beyond_budget(tmp_path):
    store = ActivationStore(tmp_path, budget=100)
    small, big = torch.arange(10.0), torch.arange(100.0)
    store.put(0, small)
    store.put(1, big)
    assert isinstance(store.items[0], torch.Tensor) and store.items[1] == "batch_00001.safetensors"
    assert torch.equal(store.get(1), big) and store.spilled == 1


def test_activation_store_keeps_carried_state_pairs_in_memory_and_on_disk(tmp_path):
    """A (hidden, carried) pair (ZAYA's router state) counts both tensors against the budget and
    comes back as the same pair, dtypes kept, from memory, a spill and a persisted directory."""
    store = ActivationStore(tmp_path, budget=100 * 4 + 30 * 2)
    pair = (torch.arange(100.0), torch.arange(30.0).to(torch.bfloat16))
    store.put(0, pair)
    store.put(1, (pair[0] + 1, pair[1] + 1))  # over the budget: spilled
    store.put(2, torch.arange(5.0))
    assert store.items[0] is pair and store.items[1] == "batch_00001.safetensors" and store.spilled == 2
    spilled = store.get(1)
    assert isinstance(spilled, tuple) and torch.equal(spilled[0], pair[0] + 1) and spilled[1].dtype == torch.bfloat16
    assert torch.equal(spilled[1], pair[1] + 1) and torch.equal(store.get(2), torch.arange(5.0))
    store.persist()
    again = ActivationStore.from_directory(tmp_path, 3, budget=0)
    assert all(torch.equal(a, b) for a, b in zip(again.get(0), pair)) and torch.equal(again.get(2), torch.arange(5.0))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("budget", ["layer", "global"])
@pytest.mark.parametrize("selection_route", [True, False])
def test_streamed_apply_equals_in_memory(family, budget, selection_route, checkpoints, reference, tmp_path):
    src = checkpoints[family]
    plan = make_plan(reference[family], "reap", 0.5 if budget == "layer" else 0.25, budget=budget)
    model, tokenizer, _ = load_model(str(src))
    ref = save_pruned(apply_plan(model, plan), tmp_path / "ref", plan=plan, tokenizer=tokenizer, input_dir=src)
    out = streamed_apply(src, plan, tmp_path / "out", max_shard_size="20KB", progress=False, selection_route=selection_route)
    assert_checkpoints_equal(ref, out)
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    uniform = len(set(plan.experts_per_layer.values())) == 1
    if uniform and selection_route:  # only kept experts' bytes were read
        assert marker["routes"] == {"selection": 2, "layer": 0}
        assert marker["bytes_read"] < LazyCheckpoint(src).total_bytes() * 0.9
    else:
        assert marker["routes"]["layer"] == 2
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "tokenizer.json").is_file()
    reloaded = load_pruned(out)
    batch = random_batch(272, 2, 8, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, load_pruned(ref)(batch).logits)


def test_resume_after_kill(checkpoints, ids, reference, tmp_path):
    path, work = checkpoints["deepseek_v3"], tmp_path / "work"
    ran: list[int] = []

    def kill_after_first_moe_layer(index: int) -> None:
        ran.append(index)
        if index == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        streamed_calibrate(path, ids, batch_size=4, progress=False, work_dir=work, on_layer_done=kill_after_first_moe_layer)
    assert ran == [0, 1] and json.loads((work / "progress.json").read_text()) == {"done": 1}
    ran.clear()
    stats = streamed_calibrate(path, ids, batch_size=4, progress=False, work_dir=work, resume=True, on_layer_done=ran.append)
    assert ran == [2]  # layers 0 and 1 were not run again
    assert_stats_equal(reference["deepseek_v3"], stats)


def test_resume_refuses_other_data(checkpoints, ids, tmp_path):
    from moeprune.calibration.work_dir import ResumeError

    path, work = checkpoints["qwen3_moe"], tmp_path / "work"
    streamed_calibrate(path, ids, batch_size=4, progress=False, work_dir=work)
    with pytest.raises(ResumeError, match="data"):
        streamed_calibrate(path, ids + 1, batch_size=4, progress=False, work_dir=work, resume=True)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_shard_leaves_no_output(checkpoints, reference, tmp_path):
    src = _copy(checkpoints["qwen3_moe"], tmp_path / "in")
    plan = make_plan(reference["qwen3_moe"], "frequency", 0.5)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        streamed_apply(src, plan, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no partial directory
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        streamed_calibrate(src, random_batch(272, 2, 8), progress=False)


def test_missing_shard_raises_before_writing(checkpoints, reference, tmp_path):
    src = _copy(checkpoints["gpt_oss"], tmp_path / "in")
    plan = make_plan(reference["gpt_oss"], "frequency", 0.5)
    sorted(src.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        streamed_apply(src, plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
