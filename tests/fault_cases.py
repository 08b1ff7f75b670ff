"""The fault-injection table: name -> builder(base, tmp) returning (args, inputs, error class,
message fragment); every builder sets up its own scenario in a fresh directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import click
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from moeprune.io.output_policy import COMPLETE_MARKER, OutputPathError
from moeprune.io.safetensors_io import CorruptCheckpointError
from moeprune.nonfinite import NonFiniteError
from moeprune.plan import PlanError
from moeprune.testing.tiny_models import save_tiny_checkpoint
from fault_harness import CAL, copy_model, poison_expert, prune_args, qwen_layers, run_cli, write_plan

# ---- the table ----------------------------------------------------------------------------------
# name -> builder(base, tmp) returning (args, inputs, error class, message fragment)
Case = Callable[[dict, Path], tuple[list, list[Path], type, str]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


@case
def output_is_parent_of_input(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "models" / "sibling.txt").write_text("keep")
    return prune_args(model, base, tmp / "models", "--overwrite"), [tmp / "models"], OutputPathError, "contains the input"


@case
def output_is_parent_of_input_offload(base, tmp):
    model = copy_model(base, tmp)
    return prune_args(model, base, tmp / "models", "--overwrite", "--offload"), [tmp / "models"], OutputPathError, "contains the input"


@case
def output_is_input(base, tmp):
    model = copy_model(base, tmp)
    return prune_args(model, base, model, "--overwrite"), [model], OutputPathError, "is the input"


@case
def output_inside_input(base, tmp):
    model = copy_model(base, tmp)
    return prune_args(model, base, model / "pruned", "--offload"), [model], OutputPathError, "inside it"


@case
def output_foreign_nonempty_even_with_overwrite(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "busy").mkdir()
    (tmp / "busy" / "thesis.tex").write_text("years of work")
    return prune_args(model, base, tmp / "busy", "--overwrite"), [model, tmp / "busy"], OutputPathError, "not a moeprune output"


@case
def output_previous_moeprune_without_overwrite(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "old").mkdir()
    (tmp / "old" / COMPLETE_MARKER).write_text("{}")
    return prune_args(model, base, tmp / "old"), [model, tmp / "old"], OutputPathError, "--overwrite"


@case
def output_is_a_file(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "out.bin").write_text("x")
    return prune_args(model, base, tmp / "out.bin", "--overwrite"), [model, tmp / "out.bin"], OutputPathError, "is a file"


@case
def output_parent_is_a_file(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "file").write_text("x")
    return prune_args(model, base, tmp / "file" / "out"), [model, tmp / "file"], OutputPathError, "is a file"


@case
def output_parent_is_a_file_offload(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "file").write_text("x")
    return prune_args(model, base, tmp / "file" / "out", "--offload"), [model, tmp / "file"], OutputPathError, "is a file"


@case
def work_dir_is_input(base, tmp):
    model = copy_model(base, tmp)
    return prune_args(model, base, tmp / "out", "--offload", "--work-dir", model), [model], OutputPathError, "is the input"


@case
def work_dir_foreign(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "work").mkdir()
    (tmp / "work" / "stats").mkdir()
    (tmp / "work" / "stats" / "mine.txt").write_text("not moeprune's")
    return (prune_args(model, base, tmp / "out", "--offload", "--work-dir", tmp / "work"), [model, tmp / "work"],
            OutputPathError, "not made by moeprune")


@case
def resume_without_offload(base, tmp):
    model = copy_model(base, tmp)
    return prune_args(model, base, tmp / "out", "--resume", "--no-offload"), [model], click.UsageError, "--resume"


@case
def calibrate_output_inside_input(base, tmp):
    model = copy_model(base, tmp)
    args = ["calibrate", model, "--calibration", base["calib"], *CAL, "-o", model / "stats.safetensors"]
    return args, [model], OutputPathError, "inside it"


@case
def calibrate_output_foreign_file(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "notes.safetensors").write_text("mine")
    args = ["calibrate", model, "--calibration", base["calib"], *CAL, "-o", tmp / "notes.safetensors", "--overwrite"]
    return args, [model, tmp / "notes.safetensors"], OutputPathError, "not a moeprune stats file"


@case
def plan_output_is_its_input(base, tmp):
    model = copy_model(base, tmp)
    stats = tmp / "s.safetensors"
    assert run_cli("calibrate", model, "--calibration", base["calib"], *CAL, "-o", stats)[0] == 0
    return ["plan", stats, "-o", stats, "--overwrite"], [model, stats], OutputPathError, "is the input"


@case
def model_path_missing(base, tmp):
    return prune_args(tmp / "models" / "nope", base, tmp / "out"), [], FileNotFoundError, "does not exist"


@case
def model_path_missing_relative(base, tmp):
    return ["inspect", "./no/such/model"], [], FileNotFoundError, "does not exist"


@case
def truncated_shard_in_memory(base, tmp):
    model = copy_model(base, tmp)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size // 2)
    return prune_args(model, base, tmp / "out", "--no-offload"), [model], CorruptCheckpointError, "truncated"


@case
def truncated_shard_offload(base, tmp):
    model = copy_model(base, tmp)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size // 2)
    return prune_args(model, base, tmp / "out", "--offload"), [model], CorruptCheckpointError, "truncated"


@case
def missing_shard(base, tmp):
    model = copy_model(base, tmp)
    sorted(model.glob("model-*.safetensors"))[0].unlink()
    return prune_args(model, base, tmp / "out"), [model], CorruptCheckpointError, "missing"


@case
def invalid_config_offload(base, tmp):
    model = copy_model(base, tmp)
    (model / "config.json").write_text("{not json")
    return prune_args(model, base, tmp / "out", "--offload"), [model], ValueError, "not valid JSON"


@case
def invalid_config_inspect(base, tmp):
    model = copy_model(base, tmp)
    (model / "config.json").write_text("{not json")
    return ["inspect", model], [model], ValueError, "not valid JSON"


@case
def invalid_config_calibrate(base, tmp):
    model = copy_model(base, tmp)
    (model / "config.json").write_text("[1, 2]")
    return ["calibrate", model, "--calibration", base["calib"], *CAL, "-o", tmp / "s.safetensors"], [model], ValueError, "JSON object"


@case
def calibration_file_missing(base, tmp):
    model = copy_model(base, tmp)
    args = ["prune", model, "--output", tmp / "out", "--calibration", tmp / "nope.txt", *CAL]
    return args, [model], FileNotFoundError, "does not exist"


@case
def calibration_file_missing_calibrate(base, tmp):
    model = copy_model(base, tmp)
    args = ["calibrate", model, "--calibration", "data/calib.jsonl", *CAL, "-o", tmp / "s.safetensors"]
    return args, [model], FileNotFoundError, "does not exist"


@case
def yaml_syntax_error(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "r.yaml").write_text("strategy: reap\nratio: [0.5\n")
    return ["prune", model, "--config", tmp / "r.yaml", "--output", tmp / "out"], [model, tmp / "r.yaml"], ValueError, "not valid YAML"


@case
def recipe_unknown_key(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "r.yaml").write_text("strategy: frequency\nratoi: 0.5\n")
    return ["prune", model, "--config", tmp / "r.yaml", "--output", tmp / "out"], [model], ValidationError, "ratoi"


@case
def ratio_leaves_fewer_than_top_k(base, tmp):
    model = copy_model(base, tmp)
    args = ["prune", model, "--strategy", "frequency", "--ratio", 0.9, "--output", tmp / "out", "--calibration", base["calib"], *CAL]
    return args, [model], PlanError, "top-2"


@case
def plan_is_a_json_list(base, tmp):
    model = copy_model(base, tmp)
    (tmp / "p.json").write_text("[1, 2, 3]")
    return ["apply", model, tmp / "p.json", "-o", tmp / "out"], [model, tmp / "p.json"], PlanError, "JSON object"


@case
def plan_float_index(base, tmp):
    model = copy_model(base, tmp)
    plan = write_plan(tmp / "p.json", qwen_layers(kept0=(3.5, 3, 4, 7)))
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "integer"


@case
def plan_bool_index(base, tmp):
    model = copy_model(base, tmp)
    plan = write_plan(tmp / "p.json", qwen_layers(kept0=(True, 2, 3, 4)))
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "integer"


@case
def plan_missing_a_layer(base, tmp):
    model = copy_model(base, tmp)
    layers = qwen_layers()
    del layers["1"]
    plan = write_plan(tmp / "p.json", layers)
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "no entry for MoE layers [1]"


@case
def plan_bare_nan(base, tmp):
    model = copy_model(base, tmp)
    plan = tmp / "p.json"
    layers = qwen_layers()
    layers["0"]["scores"] = [1.0] * 8
    plan.write_text(json.dumps({"format": "moeprune-plan", "strategy": "m", "params": {}, "top_k": 2, "layers": layers}).replace("1.0, 1.0]", "1.0, NaN]"))
    assert "NaN" in plan.read_text()
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "NaN"


@case
def plan_for_another_model(base, tmp):
    from moeprune.fingerprint import checkpoint_fingerprint

    model = copy_model(base, tmp)
    other = save_tiny_checkpoint("qwen3_moe", tmp / "other", seed=1)  # same shapes, other weights
    plan = write_plan(tmp / "p.json", qwen_layers(), model=checkpoint_fingerprint(other))
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "another model"


@case
def plan_for_another_family(base, tmp):
    from moeprune.fingerprint import checkpoint_fingerprint

    model = copy_model(base, tmp)
    plan = write_plan(tmp / "p.json", qwen_layers(), model=checkpoint_fingerprint(base["ds"]))
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "another model"


@case
def plan_group_constraint_from_model_config(base, tmp):
    model = copy_model(base, tmp, "dsv3", which="ds")
    layers = {str(i): {"layer": i, "num_experts": 8, "kept": [0, 1, 2, 3, 4, 5]} for i in (1, 2)}
    plan = write_plan(tmp / "p.json", layers)  # no `routing` block: the model's n_group=2 must be used
    return ["apply", model, plan, "-o", tmp / "out"], [model, plan], PlanError, "n_group=2"


@case
def pickle_checkpoint_in_memory(base, tmp):
    model = copy_model(base, tmp)
    state = {}
    for shard in model.glob("*.safetensors"):
        state.update(load_file(str(shard)))
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    torch.save(state, model / "pytorch_model.bin")
    return prune_args(model, base, tmp / "out", "--no-offload"), [model], ValueError, "pickle"


@case
def nan_expert_weights(base, tmp):
    model = copy_model(base, tmp)
    poison_expert(model, 0, 3)
    return prune_args(model, base, tmp / "out", "--no-offload"), [model], NonFiniteError, "layer 0, expert 3"


@case
def nan_expert_weights_offload(base, tmp):
    model = copy_model(base, tmp)
    poison_expert(model, 0, 3)
    return prune_args(model, base, tmp / "out", "--offload"), [model], NonFiniteError, "NaN"


@case
def allow_nonfinite_needs_memory(base, tmp):
    model = copy_model(base, tmp)
    return prune_args(model, base, tmp / "out", "--offload", "--allow-nonfinite"), [model], ValueError, "drop --offload"
