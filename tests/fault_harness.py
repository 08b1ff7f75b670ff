"""The fault-injection harness: a tiny multi-shard checkpoint, an in-process CLI runner, digests of
inputs and the leftovers a failed run must not leave (used by test_fault_injection and fault_cases)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import click
import torch
from safetensors.torch import load_file, save_file

from moeprune.io.output_policy import COMPLETE_MARKER

TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}" for i in range(60))
CAL = ("--samples", 2, "--seq-len", 16)


def run_cli(*args) -> tuple[int, str, BaseException | None]:
    """(exit code, message, original exception) of one in-process `moeprune` run."""
    from moeprune.cli import main

    try:
        main.main([str(a) for a in args], prog_name="moeprune", standalone_mode=False)
    except click.ClickException as err:
        return err.exit_code, err.format_message(), err.__cause__ or err
    return 0, "", None


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def complete_outputs(root: Path) -> set[Path]:
    return {p.parent for p in root.rglob(COMPLETE_MARKER)}


def leftovers(root: Path) -> list[Path]:
    names = (".partial-", ".old-", ".moeprune-work")
    return [p for p in root.rglob("*") if any(n in p.name for n in names) or p.name.endswith(".partial")]


# ---- scenario helpers ---------------------------------------------------------------------------
def copy_model(base, tmp: Path, name: str = "models/qwen3", which: str = "src") -> Path:
    dst = tmp / name
    shutil.copytree(base[which], dst)
    return dst


def prune_args(model: Path, base, out: Path, *extra) -> list:
    return ["prune", model, "--strategy", "frequency", "--ratio", 0.5, "--output", out, "--calibration", base["calib"], *CAL, *extra]


def write_plan(path: Path, layers: dict, **top) -> Path:
    data = {"format": "moeprune-plan", "strategy": "manual", "params": {}, "top_k": 2, "layers": layers, **top}
    path.write_text(json.dumps(data) if not isinstance(layers, str) else layers)
    return path


def qwen_layers(kept0=(0, 1, 2, 3), kept1=(0, 1, 2, 3)) -> dict:
    return {"0": {"layer": 0, "num_experts": 8, "kept": list(kept0)}, "1": {"layer": 1, "num_experts": 8, "kept": list(kept1)}}


def poison_expert(model: Path, layer: int = 0, expert: int = 3) -> str:
    """Write NaN into one expert's gate weight in the shard that holds it; returns the key."""
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if f"layers.{layer}.mlp.experts.{expert}." in k and "gate" in k)
    shard = model / index[key]
    tensors = load_file(str(shard))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return key
