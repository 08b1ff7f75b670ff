"""Read the next decoder layer's bytes from disk while the current one is computed or written.

A streamed pass visits units (decoder layers) in order and reads each unit's tensors from the
shards through `LazyCheckpoint`, whose memory-mapped reads stall on the disk. `Prefetcher` keeps
one background thread (a one-worker `ThreadPoolExecutor`) one unit ahead: while unit i is being
processed it reads the byte ranges of unit i+1's tensors with plain file reads into a small
reusable buffer, which leaves those pages in the operating system's page cache; the main thread's
later reads of unit i+1 are then memory copies. Nothing read ahead is kept in the process (the
page cache is not the process's RSS), so peak memory is unchanged, and the tensors the pass uses
still come from the same `LazyCheckpoint` calls: output bytes cannot differ with or without it.
A failed read ahead (truncated shard, missing file) is ignored here; the main thread's own read
raises the usual `CorruptCheckpointError`.

    ahead = Prefetcher(ckpt.shards, {unit: keys_of(unit) for unit in units})
    for unit in units:
        ahead.ready(unit)      # this unit's bytes are in the page cache; the next unit's read starts
        ...                    # read, compute, write the unit
    ahead.close()
"""

from __future__ import annotations

import json
import logging
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Hashable, Mapping, Sequence

logger = logging.getLogger(__name__)

_BUFFER = 16 * 2**20  # bytes per read call: the only memory the read ahead holds
_GAP = 1 * 2**20  # byte ranges closer than this are read as one (fewer calls; the gap is read too)


def shard_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (start, end)} absolute byte offsets of every tensor in safetensors `file`."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    return {name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def byte_ranges(shards: dict[str, Path], keys: Sequence[str], offsets: dict[Path, dict[str, tuple[int, int]]]) -> list[tuple[Path, int, int]]:
    """Merged (file, start, end) ranges holding tensors `keys`, in file order."""
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for key in keys:
        file = shards[key]
        if file not in offsets:
            offsets[file] = shard_offsets(file)
        by_file.setdefault(file, []).append(offsets[file][key])
    merged: list[tuple[Path, int, int]] = []
    for file in sorted(by_file, key=str):
        for start, end in sorted(by_file[file]):
            if merged and merged[-1][0] == file and start - merged[-1][2] <= _GAP:
                merged[-1] = (file, merged[-1][1], max(end, merged[-1][2]))
            else:
                merged.append((file, start, end))
    return merged


class Prefetcher:
    """Warm the page cache with unit i+1's tensor bytes while unit i is processed (one unit ahead).

    `shards` maps tensor names to shard files (`LazyCheckpoint.shards`); `units` maps each unit
    (any name, e.g. a decoder layer's module name or index), in visiting order, to the tensor names
    that unit will read (only those: e.g. the kept experts of a selection). With `enabled=False`
    every call is a no-op, so a caller has one code path for both settings.
    """

    def __init__(self, shards: dict[str, Path], units: Mapping[Hashable, Sequence[str]], enabled: bool = True) -> None:
        self.shards = shards
        self.order = list(units)
        self.position = {unit: i for i, unit in enumerate(self.order)}
        self.units = [list(units[unit]) for unit in self.order]
        self.enabled = enabled and bool(self.units)
        self.bytes_read = 0  # bytes the read ahead fetched (ranges merged across small gaps)
        self.wait_seconds = 0.0  # time `ready` blocked on a read ahead that had not finished
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}
        self._futures: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeprune-prefetch") if self.enabled else None
        if self._pool is not None:
            self._submit(0)  # the first unit's read overlaps whatever the caller does before its loop

    def _read(self, index: int) -> int:
        buffer = bytearray(_BUFFER)
        view = memoryview(buffer)
        total = 0
        try:
            for file, start, end in byte_ranges(self.shards, self.units[index], self._offsets):
                with open(file, "rb", buffering=0) as handle:
                    handle.seek(start)
                    left = end - start
                    while left > 0:
                        got = handle.readinto(view[: min(left, _BUFFER)])
                        if not got:
                            break
                        left -= got
                        total += got
        except (OSError, KeyError, ValueError, struct.error) as err:  # the main thread's read reports it
            logger.debug("read ahead of unit %d stopped: %s", index, err)
        return total

    def _submit(self, index: int) -> None:
        if 0 <= index < len(self.units) and index not in self._futures:
            self._futures[index] = self._pool.submit(self._read, index)

    def ready(self, unit: Hashable) -> None:
        """Wait until `unit`'s bytes were read ahead (starting that read if it was not), then start
        reading the next unit in the background. A unit not given at construction is a no-op."""
        if not self.enabled or unit not in self.position:
            return
        index = self.position[unit]
        self._submit(index)
        self._submit(index + 1)  # queued behind `index` on the one worker: never more than one unit ahead
        for stale in [i for i in self._futures if i < index]:  # units skipped by the caller
            self._futures.pop(stale).result()
        future = self._futures.pop(index)
        tick = time.perf_counter()
        self.bytes_read += future.result()
        self.wait_seconds += time.perf_counter() - tick

    def close(self) -> None:
        """Stop the worker (a read ahead still running is waited for, not abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
