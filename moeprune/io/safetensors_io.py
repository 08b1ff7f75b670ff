"""Read safetensors checkpoints (single file or sharded with an index), with clear errors.

A missing shard, an index that names a missing file, or a corrupt file raises
`CorruptCheckpointError` naming the file, instead of a deep stack trace.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing or unreadable."""


def shard_map(path: str | Path) -> dict[str, Path]:
    """{tensor name: shard file} for a checkpoint directory."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CorruptCheckpointError(f"{index}: unreadable index ({err})") from err
        result = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(result.values())):
            if not shard.is_file():
                raise CorruptCheckpointError(f"{path}: shard {shard.name} named in the index is missing")
        return result
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CorruptCheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    with _open(single) as handle:
        return {name: single for name in handle.keys()}


def open_shard(file: str | Path):
    """`safe_open` a shard, raising `CorruptCheckpointError` for a corrupt or truncated file."""
    return _open(Path(file))


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises several types for truncated/corrupt headers
        raise CorruptCheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err


def _names_by_shard(path: str | Path) -> list[tuple[Path, list[str]]]:
    """(shard file, its tensor names) of a checkpoint directory, shards in file order."""
    by_shard: dict[Path, list[str]] = {}
    for name, shard in shard_map(path).items():
        by_shard.setdefault(shard, []).append(name)
    return sorted(by_shard.items())


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read shard by shard."""
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in _names_by_shard(path):
        with _open(shard) as handle:
            for name in names:
                try:
                    tensors[name] = handle.get_tensor(name)
                except Exception as err:
                    raise CorruptCheckpointError(f"{shard}: cannot read tensor {name} ({err})") from err
    return tensors


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_float_dtype(path: str | Path) -> torch.dtype | None:
    """The floating-point dtype most of a checkpoint's weights are stored in (by element count, from
    the shard headers; no tensor is read), or None when it holds no float16/bfloat16/float32/float64 tensor."""
    counts: dict[torch.dtype, int] = {}
    for shard, names in _names_by_shard(path):
        with _open(shard) as handle:
            for name in names:
                piece = handle.get_slice(name)
                dtype = _FLOAT_DTYPES.get(piece.get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(piece.get_shape())
    return dominant_dtype(counts)


def dominant_dtype(counts: dict[torch.dtype, int]) -> torch.dtype | None:
    """The dtype with the most elements in `counts` ({dtype: element count}; ties: the wider one)."""
    return max(counts, key=lambda d: (counts[d], d.itemsize)) if counts else None
