"""The command line end to end on a tiny local checkpoint with a local calibration file."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from moeprune.cli import main
from moeprune.testing.tiny_models import save_tiny_checkpoint

TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}" for i in range(60))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_checkpoint("qwen3_moe", root / "model")
    (root / "calib.txt").write_text(TEXT)
    return root


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


CAL = ("--samples", 4, "--seq-len", 32)


def test_prune_as_written(workspace):
    out = workspace / "reap50"
    result = _run("prune", workspace / "model", "--strategy", "reap", "--ratio", 0.5, "--output", out,
                  "--calibration", workspace / "calib.txt", *CAL, "--seed", 1)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 4
    plan = json.loads((out / "moeprune_plan.json").read_text())
    assert plan["strategy"] == "reap" and all(len(lp["kept"]) == 4 for lp in plan["layers"].values())
    assert (out / "moeprune_recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 272


def test_three_phases_equal_prune(workspace):
    stats, plan_path, out = workspace / "s.safetensors", workspace / "p.json", workspace / "phased"
    assert _run("calibrate", workspace / "model", "--calibration", workspace / "calib.txt", *CAL, "--seed", 1, "-o", stats).exit_code == 0
    assert _run("plan", stats, "--strategy", "reap", "--ratio", 0.5, "-o", plan_path).exit_code == 0
    assert _run("apply", workspace / "model", plan_path, "-o", out).exit_code == 0
    one_shot = json.loads((workspace / "reap50" / "moeprune_plan.json").read_text())
    phased = json.loads(plan_path.read_text())
    assert phased["layers"] == one_shot["layers"] and phased["stats_hash"] == one_shot["stats_hash"]


def test_inspect_json(workspace):
    result = _run("inspect", workspace / "model", "--json")
    facts = json.loads(result.stdout)  # progress bars go to stderr
    assert facts["moe_layers"] == [0, 1]
    assert facts["experts_per_layer"] == {"0": 8, "1": 8}
    assert facts["top_k"]["0"] == 2 and 0 < facts["routed_share"] < 1


def test_recipe_file_and_validation(workspace, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"strategy: frequency\nratio: 0.25\ncalibration:\n  source: {workspace / 'calib.txt'}\n  samples: 4\n  seq_len: 32\n")
    out = tmp_path / "freq25"
    assert _run("prune", workspace / "model", "--config", recipe, "--output", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["num_experts"] == 6
    recipe.write_text("strategy: frequency\nratio: 1.5\n")
    bad = _run("prune", workspace / "model", "--config", recipe, "--output", tmp_path / "x")
    assert bad.exit_code == 2 and "ratio" in bad.output
    recipe.write_text("strategy: frequency\nratoi: 0.5\n")
    assert "ratoi" in _run("prune", workspace / "model", "--config", recipe, "--output", tmp_path / "x").output


def test_clear_errors(workspace):
    same = _run("prune", workspace / "model", "--ratio", 0.5, "--output", workspace / "model",
                "--calibration", workspace / "calib.txt", *CAL)
    assert same.exit_code == 2 and "input" in same.output
    too_many = _run("prune", workspace / "model", "--strategy", "frequency", "--ratio", 0.9,
                    "--output", workspace / "x", "--calibration", workspace / "calib.txt", *CAL)
    assert too_many.exit_code == 2 and "top-2" in too_many.output
    assert not (workspace / "x").exists()


def test_prune_refuses_then_overwrites_existing_output(workspace):
    args = ("prune", workspace / "model", "--strategy", "frequency", "--ratio", 0.25, "--output", workspace / "again",
            "--calibration", workspace / "calib.txt", *CAL)
    assert _run(*args).exit_code == 0
    second = _run(*args)
    assert second.exit_code == 2 and "not empty" in second.output
    assert _run(*args, "--overwrite").exit_code == 0
    assert json.loads((workspace / "again" / "config.json").read_text())["num_experts"] == 6
    assert not [p for p in workspace.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_routing_heatmap_places_kept_experts_at_original_indices():
    import numpy as np

    from moeprune.cli.eval_cmd import place_at_original_experts

    values = np.array([[0.5, 0.5], [0.25, 0.75]])
    out = place_at_original_experts(values, [[1, 3], None], 4)
    assert out[0, 1] == 0.5 and out[0, 3] == 0.5 and np.isnan(out[0, 0]) and np.isnan(out[0, 2])
    assert out[1, 0] == 0.25 and out[1, 1] == 0.75 and np.isnan(out[1, 2])
