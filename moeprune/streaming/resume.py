"""Work directory of a streamed calibration: per-layer checkpoints that make a killed run resumable.

Layout of `work_dir`:

    fingerprint.json            what the run is (checkpoint, calibration data digest, options)
    progress.json               {"done": i}: decoder layers 0..i are finished
    stats/layer_00003.safetensors   statistics of each finished MoE layer (`ExpertStats.save`)
    acts/after_00003/batch_00000.safetensors   hidden states after the last finished layer

A layer is committed in this order: its statistics, then its output activations (written to a
`.partial` folder and renamed), then `progress.json` (written to a temporary file and renamed), so
a kill at any moment leaves either the previous or the new state, never a mix. Resuming with a
different fingerprint (other model, data or options) is refused instead of mixing statistics.
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
from safetensors.torch import load_file, save_file

from moeprune.calibration.stats import ExpertStats, LayerStats

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A work directory belongs to another run."""


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class WorkDir:
    """Checkpoints of a streamed calibration run."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.path.mkdir(parents=True, exist_ok=True)
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


def save_activation(path: Path, tensor: torch.Tensor) -> None:
    save_file({"hidden": tensor.contiguous()}, str(path))


def load_activation(path: Path) -> torch.Tensor:
    return load_file(str(path))["hidden"]
