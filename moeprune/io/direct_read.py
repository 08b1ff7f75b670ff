"""Read a safetensors tensor's bytes straight into a tensor that already exists (one `pread`).

`safe_open` maps the shard: a copy out of the map faults every 4 KiB page of the source in, and the
touched pages count in the process's RSS until the map closes. The streamed paths fill large fused
expert tensors slot by slot (`io.lazy_reader.KeyMap._stack_direct`); reading each source tensor
with `os.preadv` into its slot is one system call and one kernel copy from the page cache, and the
file is never mapped. On this project's 2-core VM a 0.8 GB layer of bf16 experts took ~0.3 s this
way against ~2 s through the map (`scripts/bench_offload.py` measures the whole prune).

Only the header is parsed here (8-byte length, JSON with dtype, shape and data offsets); anything
out of range is a `CorruptCheckpointError`, and a dtype or size that does not match the
destination returns False so the caller takes the mapped path.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprune.io.safetensors_io import CorruptCheckpointError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,  # fp8 checkpoints (DeepSeek-V3)
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype | None  # None: a dtype this reader does not handle (the mapped path reads it)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """{tensor name: where its bytes are} from a safetensors file's header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} beyond the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise CorruptCheckpointError(f"{file}: corrupt or truncated safetensors header ({err})") from err
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end or base + end > size:
            raise CorruptCheckpointError(f"{file}: tensor {name} lies beyond the end of the file (truncated)")
        entries[name] = TensorEntry(DTYPES.get(info["dtype"]), tuple(info["shape"]), base + start, end - start)
    return entries


def read_into(file: Path, entry: TensorEntry, out: torch.Tensor) -> bool:
    """Fill `out` (contiguous, on the CPU, same dtype and byte size) with the tensor's bytes;
    False (nothing read) when `out` cannot take them directly."""
    if (entry.dtype is None or out.dtype != entry.dtype or out.device.type != "cpu" or not out.is_contiguous()
            or out.numel() * out.element_size() != entry.nbytes or entry.dtype == torch.bool):
        return False
    if entry.nbytes == 0:
        return True
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < entry.nbytes:
            got = os.preadv(fd, [view[done:]], entry.offset + done)
            if got <= 0:
                raise CorruptCheckpointError(f"{file}: truncated while reading a tensor ({done} of {entry.nbytes} bytes)")
            done += got
    finally:
        os.close(fd)
    return True
