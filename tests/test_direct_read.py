"""Direct (pread) reads of safetensors tensors into existing buffers: same bits as the mapped read,
refusal of what they cannot take, one-line errors for truncated files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moeprune.io.direct_read import read_header, read_into
from moeprune.io.lazy_reader import LazyCheckpoint
from moeprune.io.safetensors_io import CorruptCheckpointError


def _file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(4, 6, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
               "c": torch.arange(5)}
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", tensors


def test_read_into_gives_the_mapped_bits_and_counts_bytes(tmp_path):
    path, tensors = _file(tmp_path)
    ckpt = LazyCheckpoint(tmp_path)
    for name, ref in tensors.items():
        out = torch.empty_like(ref)
        assert ckpt.read_into(name, out) and torch.equal(out, ref) and torch.equal(out, ckpt.get(name))
    assert ckpt.dtype("a") == torch.bfloat16
    slot = torch.zeros(2, 4, 6, dtype=torch.bfloat16)
    assert ckpt.read_into("a", slot[1]) and torch.equal(slot[1], tensors["a"]) and not slot[0].any()


def test_fp8_and_unsigned_tensors_are_read_directly(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
               "v": torch.randn(5, generator=g).to(torch.float8_e5m2), "u": torch.arange(6).to(torch.uint16)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = LazyCheckpoint(tmp_path)
    for name, ref in tensors.items():
        assert ckpt.dtype(name) == ref.dtype
        out = torch.empty_like(ref)
        assert ckpt.read_into(name, out)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))  # bit-equal (fp8 has no equal kernel)


def test_read_into_refuses_another_dtype_size_or_layout(tmp_path):
    path, tensors = _file(tmp_path)
    entry = read_header(path)["a"]
    assert not read_into(path, entry, torch.empty(4, 6))  # float32: a cast, the mapped path does it
    assert not read_into(path, entry, torch.empty(4, 5, dtype=torch.bfloat16))
    assert not read_into(path, entry, torch.empty(6, 4, dtype=torch.bfloat16).T)  # not contiguous


def test_truncated_file_is_one_line_error(tmp_path):
    path, _ = _file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(CorruptCheckpointError, match="truncated") as err:
        read_header(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_huge_page_allocation_is_on_unless_the_user_said_otherwise(preset, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import moeprune, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_dtypes_it_does_not_know_go_through_the_map_with_the_same_result(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from moeprune.io import direct_read
    from moeprune.io.lazy_load import load_lazily
    from moeprune.testing.tiny_models import save_tiny_checkpoint

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "q")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    monkeypatch.setattr(direct_read, "DTYPES", {})  # every tensor "unknown": the fused fill reads its first once
    lazy = load_lazily(path, torch.float32).state_dict()
    assert sorted(lazy) == sorted(ref) and all(torch.equal(lazy[k], ref[k]) for k in ref)
