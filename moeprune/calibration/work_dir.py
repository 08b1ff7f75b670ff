"""Work directory of a streamed calibration: per-layer checkpoints that make a killed run resumable.

Layout of `work_dir`:

    moeprune_workdir.json       marker: this directory is moeprune's (foreign directories are refused)
    fingerprint.json            what the run is (checkpoint, calibration data digest, options)
    progress.json               {"done": i}: decoder layers 0..i are finished
    stats/layer_00003.safetensors   statistics of each finished MoE layer (`ExpertStats.save`)
    acts/after_00003/batch_00000.safetensors   hidden states after the last finished layer

A layer is committed in this order: its statistics, then its output activations (written to a
`.partial` folder and renamed), then `progress.json` (written to a temporary file and renamed), so
a kill at any moment leaves either the previous or the new state, never a mix. Resuming with a
different fingerprint (other model, data or options) is refused instead of mixing statistics.
The checkpoint is fingerprinted by content, not only by shard names and sizes
(`checkpoint_content_digest`: each shard's safetensors header, the first and last bytes of every
tensor and evenly spaced samples; whole files when the checkpoint is small), so a checkpoint
rewritten in place with other weights of the same shapes is not resumed with stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moeprune.calibration.stats import ExpertStats, LayerStats

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A work directory belongs to another run."""


FULL_HASH_BYTES = 1 << 30  # checkpoints up to this size are hashed whole
_SAMPLES, _SAMPLE_BYTES, _EDGE_BYTES = 64, 1 << 16, 256


def _shard_digest(file: Path, full: bool) -> str:
    import struct

    h = hashlib.sha256()
    size = file.stat().st_size
    h.update(str(size).encode())
    with open(file, "rb") as f:
        if full:
            while chunk := f.read(1 << 24):
                h.update(chunk)
            return h.hexdigest()[:16]
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(n, 100 << 20))
        h.update(header)
        base = 8 + n
        try:
            entries = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            entries = {}
        for name in sorted(k for k in entries if k != "__metadata__"):
            start, end = entries[name].get("data_offsets", [0, 0])
            for offset in {base + start, max(base + start, base + end - _EDGE_BYTES)}:
                f.seek(offset)
                h.update(f.read(min(_EDGE_BYTES, end - start)))
        for i in range(_SAMPLES):
            f.seek(base + (size - base) * i // _SAMPLES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def checkpoint_content_digest(path: str | Path) -> dict[str, str]:
    """{shard name: content digest} of a checkpoint's safetensors files (see the module docstring)."""
    files = sorted(Path(path).glob("*.safetensors"))
    full = sum(f.stat().st_size for f in files) <= FULL_HASH_BYTES
    return {f.name: _shard_digest(f, full) for f in files}


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class WorkDir:
    """Checkpoints of a streamed calibration run."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], resume: bool) -> None:
        from moeprune.io.output_policy import prepare_work_dir

        checkpoint = fingerprint.get("checkpoint")
        self.path = prepare_work_dir(path, inputs=[checkpoint])  # foreign content or the input: refused
        if checkpoint and "content" not in fingerprint:
            fingerprint = {**fingerprint, "content": checkpoint_content_digest(checkpoint)}
        self.fingerprint = fingerprint
        fp_file = self.path / "fingerprint.json"
        if resume and fp_file.is_file():
            old = json.loads(fp_file.read_text())
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise ResumeError(f"{self.path} holds another run (differs in {diff}); use another --work-dir or drop --resume")
        else:
            for sub in ("stats", "acts"):
                shutil.rmtree(self.path / sub, ignore_errors=True)
            (self.path / "progress.json").unlink(missing_ok=True)
        _write_json(fp_file, fingerprint)
        (self.path / "stats").mkdir(exist_ok=True)
        (self.path / "acts").mkdir(exist_ok=True)

    # ---- progress ---------------------------------------------------------------------------
    def done(self) -> int:
        """Index of the last finished decoder layer, -1 if none."""
        progress = self.path / "progress.json"
        return int(json.loads(progress.read_text())["done"]) if progress.is_file() else -1

    def commit(self, layer: int, stats: LayerStats | None, acts_dir: Path) -> None:
        """Record decoder layer `layer` as finished (see the module docstring for the order)."""
        if stats is not None:
            ExpertStats({layer: stats}).save(self.stats_file(layer))
        final = self.acts_dir(layer)
        if acts_dir != final:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(acts_dir, final)
        previous = self.done()
        _write_json(self.path / "progress.json", {"done": layer})
        if previous >= 0 and previous != layer:
            shutil.rmtree(self.acts_dir(previous), ignore_errors=True)

    # ---- files ------------------------------------------------------------------------------
    def stats_file(self, layer: int) -> Path:
        return self.path / "stats" / f"layer_{layer:05d}.safetensors"

    def acts_dir(self, layer: int) -> Path:
        return self.path / "acts" / f"after_{layer:05d}"

    def partial_acts_dir(self, layer: int) -> Path:
        path = self.path / "acts" / f"after_{layer:05d}.partial"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def load_stats(self, upto: int) -> dict[int, LayerStats]:
        """Statistics of finished MoE layers <= `upto`."""
        result: dict[int, LayerStats] = {}
        for file in sorted((self.path / "stats").glob("layer_*.safetensors")):
            index = int(file.stem.split("_")[1])
            if index <= upto:
                result.update(ExpertStats.load(file).layers)
        return result
