"""Size-bounded sharded safetensors writer producing Hugging Face shard names and index.

Tensors are buffered until the next one would push the shard past `max_shard_size`; the shard is
then written and the buffer freed, so memory stays bounded by one shard. Shards are written with
provisional names and renamed to `model-0000i-of-0000N.safetensors` by `close()`, which also writes
`model.safetensors.index.json` (`metadata.total_size`, `total_parameters`, `weight_map`). A single
shard is named `model.safetensors` with no index, like `save_pretrained`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeprune.io.safetensors_io import INDEX_FILE, SINGLE_FILE

logger = logging.getLogger(__name__)

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'5GB' / '20KB' / '512MiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS | {"": 1}:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '5GB', '500MB', '20KB'")
    return int(float(match.group(1)) * _UNITS.get(match.group(2).upper(), 1))


class ShardedWriter:
    """Write tensors into size-bounded shards inside `directory` (which must exist)."""

    def __init__(self, directory: str | Path, max_shard_size: str | int = "5GB") -> None:
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_shard_size)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0
        self.bytes_written = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_bytes:
            self.flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size
        self.total_params += tensor.numel()

    def flush(self) -> None:
        if not self._buffer:
            return
        part = self.directory / f"model-part-{len(self._parts) + 1:05d}.safetensors"
        save_file(self._buffer, str(part), metadata={"format": "pt"})
        self._parts.append((part, list(self._buffer)))
        self.bytes_written += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Write the last shard, give shards their final names, write the index; returns the weight map."""
        self.flush()
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._parts, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            part.rename(self.directory / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {
                "metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        logger.info("wrote %d tensors in %d shard(s), %.1f MB", len(weight_map), n, self.total_bytes / 1e6)
        return weight_map
