"""`io.prefetch`: the read ahead fetches exactly the bytes of the next unit's tensors, stays one
unit ahead, survives a broken shard, and a streamed prune writes the same bytes with and without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprune.plan import LayerPlan, Plan
from moeprune.io.lazy_reader import LazyCheckpoint
from moeprune.io.prefetch import Prefetcher, byte_ranges, shard_offsets
from moeprune.apply.streamed import COMPLETE_MARKER, streamed_apply
from moeprune.io.sharded_writer import ShardedWriter
from moeprune.testing.tiny_models import save_tiny_checkpoint


def _toy(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {f"t{i}": torch.arange(i * 100, i * 100 + 50 + i, dtype=torch.float32) for i in range(6)}
    writer = ShardedWriter(tmp_path, max_shard_size=600)  # 3 shards of two tensors
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    return tmp_path, tensors


def test_offsets_point_at_each_tensors_bytes(tmp_path):
    path, tensors = _toy(tmp_path)
    ckpt = LazyCheckpoint(path)
    assert len(set(ckpt.shards.values())) == 3
    for name, t in tensors.items():
        start, end = shard_offsets(ckpt.shards[name])[name]
        with open(ckpt.shards[name], "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), t), name
    ranges = byte_ranges(ckpt.shards, ["t0", "t1", "t4"], {})
    assert len(ranges) == 2  # t0 and t1 share a shard and are adjacent: one range
    assert sum(e - s for _, s, e in ranges) == sum(tensors[n].numel() * 4 for n in ("t0", "t1", "t4"))


def test_one_unit_ahead_and_bytes_read(tmp_path):
    path, tensors = _toy(tmp_path)
    ckpt = LazyCheckpoint(path)
    units = {"a": ["t0", "t1"], "b": ["t2"], "c": ["t5", "t3"]}
    size = {u: sum(tensors[k].numel() * 4 for k in keys) for u, keys in units.items()}
    with Prefetcher(ckpt.shards, units) as ahead:
        assert sorted(ahead._futures) == [0]  # the first unit starts at once
        ahead.ready("a")
        assert sorted(ahead._futures) == [1] and ahead.bytes_read == size["a"]  # b in flight, c not yet
        ahead.ready("b")
        assert sorted(ahead._futures) == [2]
        ahead.ready("c")
        assert ahead._futures == {} and ahead.bytes_read == sum(size.values())
        ahead.ready("not a unit")  # no-op
    off = Prefetcher(ckpt.shards, units, enabled=False)
    off.ready("a")
    assert off.bytes_read == 0 and off._pool is None


def test_a_broken_shard_is_left_to_the_main_read(tmp_path):
    path, _ = _toy(tmp_path)
    ckpt = LazyCheckpoint(path)
    broken = ckpt.shards["t2"]
    broken.write_bytes(broken.read_bytes()[:20])  # truncated header
    with Prefetcher(ckpt.shards, {"a": ["t0"], "b": ["t2"]}) as ahead:
        ahead.ready("a")
        ahead.ready("b")  # no exception here
        assert ahead.bytes_read == 50 * 4  # t0 only


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_streamed_prune_same_bytes_with_and_without_prefetch(family, tmp_path):
    src = save_tiny_checkpoint(family, tmp_path / "src", max_shard_size="20KB")
    config = json.loads((src / "config.json").read_text())
    experts = config.get("num_experts") or config["num_local_experts"]
    layers = {0: LayerPlan(layer=0, kept=list(range(0, experts, 2)), num_experts=experts),
              1: LayerPlan(layer=1, kept=list(range(1, experts, 2)), num_experts=experts)}
    plan = Plan(strategy="frequency", params={"ratio": 0.5}, layers=layers, top_k=config["num_experts_per_tok"])
    outs = {}
    for prefetch in (True, False):
        outs[prefetch] = streamed_apply(src, plan, tmp_path / f"out-{prefetch}", max_shard_size="20KB",
                                        progress=False, prefetch=prefetch, force=True)
    files = sorted(p.name for p in outs[True].glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in outs[False].glob("*.safetensors"))
    for name in files:
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
        assert load_file(outs[True] / name)  # a valid file, not just equal garbage
    marker = json.loads((outs[True] / COMPLETE_MARKER).read_text())
    assert marker["routes"]["selection"] == 2
