"""Size-bounded sharded safetensors writer producing Hugging Face shard names and index.

A new shard starts when the next tensor would push the current one past `max_shard_size`. Tensors
are written to disk as they arrive by one background thread (write-behind), so the caller reads and
converts the next tensors while the last ones are written; at most `queue_bytes` (or one tensor,
if larger) wait for it, so memory stays bounded by that. A write error surfaces in the caller's
next `add`/`flush`/`close`; `abort()` stops the thread without finishing. Shards are written with
provisional names and renamed to `model-0000i-of-0000N.safetensors` by `close()`, which also writes
`model.safetensors.index.json` (`metadata.total_size`, `total_parameters`, `weight_map`). A single
shard is named `model.safetensors` with no index, like `save_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO

import torch

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


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
HEADER_RESERVE = 2 * 2**20  # bytes kept free for the header at the start of each shard


class ShardedWriter:
    """Write tensors into size-bounded shards inside `directory` (which must exist).

    Each tensor goes to disk as soon as it is added (no shard is buffered in memory): its bytes are
    written after a reserved header area, and the safetensors header is written into that area,
    space-padded, when the shard closes (a header larger than the area is handled by rewriting
    the shard once).
    """

    def __init__(self, directory: str | Path, max_shard_size: str | int = "5GB", queue_bytes: int = 64 * 2**20) -> None:
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_shard_size)
        self._file: BinaryIO | None = None
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0
        self._names: set[str] = set()
        self.queue_bytes = queue_bytes
        self._queue: deque[tuple[BinaryIO, object, int]] = deque()
        self._queued = 0
        self._error: BaseException | None = None
        self._stop = False
        self._aborted = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name="moeprune-writer", daemon=True)
        self._thread.start()

    # ---- the write-behind thread ---------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                file, data, size = self._queue[0]
            try:
                if self._error is None and not self._aborted:
                    file.write(memoryview(data))
            except BaseException as err:  # disk full, I/O error: reported to the caller
                self._error = err
            with self._cv:
                self._queue.popleft()
                self._queued -= size
                self._cv.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait(self, room: int = 0) -> None:
        """Block until the queue has `room` bytes free (0: until it is empty); re-raise a write error."""
        with self._cv:
            while self._queue and (room == 0 or self._queued + room > self.queue_bytes):
                self._cv.wait()
        self._raise_error()

    def abort(self) -> None:
        """Stop the writer thread; what is still queued is dropped unwritten (the caller removes
        the directory). The thread itself empties the queue, so nothing is taken from under it."""
        with self._cv:
            self._aborted = True
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        if self._file is not None:
            self._file.close()
            self._file = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be written to safetensors")
        from moeprune.nonfinite import FIX, NonFiniteError, all_finite

        if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and not all_finite(tensor):
            raise NonFiniteError(f"tensor {name} holds NaN/Inf; refusing to write it ({FIX}; --allow-nonfinite needs the in-memory path)")
        self._raise_error()
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._offset + size > self.max_bytes:
            self.flush()
        if self._file is None:
            part = self.directory / f"model-part-{len(self._parts) + 1:05d}.safetensors"
            self._file = open(part, "wb")
            self._file.seek(HEADER_RESERVE)
            self._parts.append((part, []))
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._wait(room=size)  # at most queue_bytes (or this one tensor) waiting for the disk
        with self._cv:
            self._queue.append((self._file, data, size))
            self._queued += size
            self._cv.notify_all()
        self._entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._parts[-1][1].append(name)
        self._offset += size
        self.total_bytes += size
        self.total_params += tensor.numel()

    def flush(self) -> None:
        """Finish the current shard: wait for its queued tensors, write its header."""
        self._wait()
        if self._file is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) + 8 <= HEADER_RESERVE:
            header += b" " * (HEADER_RESERVE - 8 - len(header))
            self._file.seek(0)
            self._file.write(struct.pack("<Q", len(header)) + header)
            self._file.close()
        else:  # rare: more tensor entries than the reserve holds; rewrite once with a full header
            self._file.close()
            header += b" " * (-(len(header) + 8) % 8)
            part = self._parts[-1][0]
            tmp = part.with_name(part.name + ".tmp")
            with open(part, "rb") as src, open(tmp, "wb") as dst:
                dst.write(struct.pack("<Q", len(header)) + header)
                src.seek(HEADER_RESERVE)
                shutil.copyfileobj(src, dst, 64 * 2**20)
            os.replace(tmp, part)
        self._file, self._entries, self._offset = None, {}, 0

    def close(self) -> dict[str, str]:
        """Finish the last shard, give shards their final names, write the index; returns the weight map."""
        self.flush()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
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
