"""Sharded writer, lazy reader, automatic offload choice and the `prune --offload` command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from moeprune.io.safetensors_io import read_checkpoint_tensors
from moeprune.pipeline import offloaded as pipeline
from moeprune.io.lazy_reader import LazyCheckpoint
from moeprune.io.sharded_writer import ShardedWriter, parse_size
from moeprune.testing.tiny_models import save_tiny_checkpoint


def test_parse_size():
    assert parse_size("20KB") == 20_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_writer_bounds_shards_and_writes_index(tmp_path):
    tensors = {f"t{i}": torch.full((25,), float(i)) for i in range(5)}  # 100 bytes each
    writer = ShardedWriter(tmp_path, max_shard_size=250)
    for name, t in tensors.items():
        writer.add(name, t)
    weight_map = writer.close()
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 125, "total_size": 500}
    assert index["weight_map"] == weight_map and weight_map["t4"] == "model-00003-of-00003.safetensors"
    back = read_checkpoint_tensors(tmp_path)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_rewrites_a_shard_whose_header_outgrows_the_reserve(tmp_path, monkeypatch):
    from moeprune.io import sharded_writer as writer_module

    monkeypatch.setattr(writer_module, "HEADER_RESERVE", 64)
    tensors = {f"tensor_{i}": torch.randn(3, dtype=torch.float64).to(torch.bfloat16) for i in range(4)}
    writer = ShardedWriter(tmp_path, "1MB")
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    back = read_checkpoint_tensors(tmp_path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_single_shard_has_no_index(tmp_path):
    writer = ShardedWriter(tmp_path, "5GB")
    writer.add("a", torch.ones(3))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="twice"):
        writer.add("a", torch.ones(3))


def test_lazy_reader_reads_only_requested_rows(tmp_path):
    path = save_tiny_checkpoint("gpt_oss", tmp_path / "ckpt", max_shard_size="20KB")
    ckpt = LazyCheckpoint(path)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    full = ckpt.get(name)
    before = ckpt.bytes_read
    rows = ckpt.get_rows(name, [5, 0, 1, 7])
    assert torch.equal(rows, full[[5, 0, 1, 7]])
    assert ckpt.bytes_read - before == full[:4].numel() * 4
    bias = "model.layers.1.mlp.router.bias"
    assert torch.equal(ckpt.get_rows(bias, [2, 3]), ckpt.get(bias)[2:4])


def test_should_offload_compares_float32_size_with_memory(tmp_path, monkeypatch):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    size = LazyCheckpoint(path).total_bytes()
    monkeypatch.setattr(pipeline, "available_memory", lambda: size * 10)
    assert not pipeline.should_offload(path)
    monkeypatch.setattr(pipeline, "available_memory", lambda: size)
    assert pipeline.should_offload(path)
    assert not pipeline.should_offload(tmp_path / "not-a-dir")


def test_prune_offload_cli(tmp_path):
    from moeprune.cli import main
    from moeprune.io.checkpoint import load_pruned

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "in", max_shard_size="20KB")
    out = tmp_path / "out"
    args = ["prune", str(src), "--offload", "--strategy", "frequency", "--ratio", "0.5", "--samples", "4",
            "--seq-len", "16", "--calibration", "builtin:code", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "(streamed)" in result.output and (out / "moeprune_complete.json").is_file()
    assert not any(p.name.endswith(".moeprune-work") for p in tmp_path.iterdir())  # work dir removed
    model = load_pruned(out)
    assert model.config.num_local_experts == 4
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == 4 for layer in model.model.layers)


def test_writer_write_behind_keeps_order_and_reports_write_errors(tmp_path):
    # tensors queued behind the disk land in order, bounded by queue_bytes; a failed write surfaces in the caller
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(20)}
    (tmp_path / "ok").mkdir()
    writer = ShardedWriter(tmp_path / "ok", "30KB", queue_bytes=4000)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    back = read_checkpoint_tensors(tmp_path / "ok")
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())

    (tmp_path / "bad").mkdir()
    writer = ShardedWriter(tmp_path / "bad", "1MB")
    writer.add("a", torch.zeros(10))
    writer._wait()
    writer._file.close()  # the next write fails in the writer thread (ValueError: closed file)
    writer.add("b", torch.zeros(10))
    with pytest.raises(ValueError, match="closed file"):
        writer.close()
    writer.abort()
