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


def _recipes(root: Path, tmp_path: Path, family: str, **extra) -> tuple:
    common = {"model": str(root / family), "calibration.source": str(root / "code.txt"), "calibration.samples": 4,
              "calibration.seq_len": 16, "calibration.batch_size": 3, "device": "cpu", **extra}
    return (load_recipe(None, {**common, "output": str(tmp_path / "mem")}),
            load_recipe(None, {**common, "output": str(tmp_path / "off")}))


def _prune_both(root: Path, tmp_path: Path, family: str, **extra):
    from moeprune.api import prune
    from moeprune.pipeline.offloaded import prune_offloaded

    in_memory, streamed = _recipes(root, tmp_path, family, **extra)
    mem = prune(in_memory, progress=False)
    off = prune_offloaded(streamed, progress=False)
    assert {i: lp.kept for i, lp in off.plan.layers.items()} == {i: lp.kept for i, lp in mem.plan.layers.items()}
    _equal_checkpoints(mem.output, off.output)
    return mem, off


@pytest.mark.parametrize("family, extra", [
    ("qwen3_moe", {"strategy": "reap", "ratio": 0.5}),
    ("gpt_oss", {"strategy": "reap", "ratio": 0.25, "budget": "global"}),  # non-uniform counts: module layout
    ("deepseek_v3", {"strategy": "aimer", "ratio": 0.5}),  # calibration-free plan, dense first layer
])
def test_dynamic_skip_offload_equals_in_memory(root, tmp_path, family, extra):
    from moeprune.apply.dynamic_skip import CONFIG_KEY
    from moeprune.io.checkpoint import load_pruned

    mem, off = _prune_both(root, tmp_path, family, dynamic_skip=True, **extra)
    a, b = _config(mem.output)[CONFIG_KEY], _config(off.output)[CONFIG_KEY]
    assert a["betas"].keys() == b["betas"].keys() and a["tokens"] == b["tokens"] == 4 * 16
    assert a["renormalize"] == b["renormalize"] and a["rule"] == b["rule"]
    for layer in a["betas"]:
        assert b["betas"][layer] == pytest.approx(a["betas"][layer], abs=1e-6)
        assert b["mean_ratio"][layer] == pytest.approx(a["mean_ratio"][layer], abs=1e-6)
    saved = Plan.load(Path(off.output) / "moeprune_plan.json")
    assert saved.params["dynamic_skip"] == b and off.plan.params["dynamic_skip"] == b
    assert 0.0 < min(b["betas"].values()) <= max(b["betas"].values()) <= 1.0
    reloaded = load_pruned(off.output)  # skipping installed from the streamed output's config
    from moeprune.adapters import find_moe_layers

    assert all("forward" in layer.experts.__dict__ for layer in find_moe_layers(reloaded))


def test_task_patterns_offload_equals_in_memory(root, tmp_path):
    pats = tmp_path / "patterns.json"
    built = _run("patterns", root / "deepseek_v3", "--task", f"code={root / 'code.txt'}", "--task",
                 f"prose={root / 'prose.txt'}", "--samples", 4, "--seq-len", 32, "-o", pats)
    assert built.exit_code == 0, built.output
    for text, name in ((PROSE[:300], "prose"),):
        query = tmp_path / f"{name}.txt"
        query.write_text(text)
        outs = {}
        for mode in ("--no-offload", "--offload"):
            outs[mode] = tmp_path / f"{name}{mode}"
            result = _run("prune", root / "deepseek_v3", "--patterns", pats, "--query", f"@{query}", "--ratio", 0.5,
                          mode, "-o", outs[mode])
            assert result.exit_code == 0, result.output
            assert "matched task" in result.output
        a = Plan.load(outs["--no-offload"] / "moeprune_plan.json")
        b = Plan.load(outs["--offload"] / "moeprune_plan.json")
        assert b.params["task"] == a.params["task"]
        assert b.params["query_distance"] == pytest.approx(a.params["query_distance"], abs=1e-9)
        assert b.model == a.model and b.to_dict()["layers"] == a.to_dict()["layers"]
        _equal_checkpoints(outs["--no-offload"], outs["--offload"])


@pytest.mark.parametrize("family, slim, extra", [
    ("qwen3_moe", {"ratio": 1 / 3}, {"strategy": "reap", "ratio": 0.25}),  # camera, one width: stock hub layout
    ("qwen3_moe", {"ratio": 0.5, "mode": "expert"}, {"strategy": "reap", "ratio": 0.25}),  # per-expert widths
    ("gpt_oss", {"ratio": 0.5, "method": "coverage", "mode": "expert"}, {"strategy": "frequency", "ratio": 0.25}),
    ("deepseek_v3", {"ratio": 0.25, "method": "coverage"}, {"strategy": "hc-smoe", "ratio": 0.5}),  # merged experts
    ("qwen3_moe", {"ratio": 0.25, "layer_budget": "coverage"}, {"strategy": "m-smoe", "ratio": 0.5}),  # camera, merges
])
def test_slimming_offload_equals_in_memory(root, tmp_path, family, slim, extra):
    from moeprune.io.checkpoint import load_pruned

    mem, off = _prune_both(root, tmp_path, family, slim=slim, **extra)
    assert off.plan.params["slim"] == mem.plan.params["slim"]
    assert 0 < off.plan.params["slim"]["removed_share"] < 1
    assert _config(off.output) == _config(mem.output)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        a = load_pruned(mem.output, dtype=torch.float32)(ids).logits
        b = load_pruned(off.output, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_slimming_and_dynamic_skip_offload_equal_in_memory(root, tmp_path):
    from moeprune.apply.dynamic_skip import CONFIG_KEY

    mem, off = _prune_both(root, tmp_path, "qwen3_moe", slim={"ratio": 0.5, "mode": "expert"}, dynamic_skip=True,
                           strategy="reap", ratio=0.25)
    a, b = _config(mem.output)[CONFIG_KEY]["betas"], _config(off.output)[CONFIG_KEY]["betas"]
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], abs=1e-6) for k in a)


def test_dynamic_skip_with_novices_is_refused_before_calibration(root, tmp_path):
    result = _run("prune", root / "qwen3_moe", "--strategy", "mone", "--dynamic-skip", "--offload",
                  "--calibration", root / "code.txt", "--samples", 2, "--seq-len", 8, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "MoNE (novice) plan needs the model in memory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no work directory
