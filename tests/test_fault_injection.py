"""Fault injection: every bad input or output ends in one line, exit code 2, input untouched, nothing
that looks like a finished output left behind.

One table, `CASES`: each case builds its scenario in a fresh directory (a copy of a tiny multi-shard
Qwen3-MoE checkpoint), runs the real `moeprune` command in-process (click's `main(standalone_mode=
False)`, so the original exception class is visible as `__cause__`), and the harness checks the
error class, a message fragment, that the message is one line, that the digests of every input are
unchanged and that no `.partial-*`, `.old-*`, work directory or new complete output remains. A few
cases also run as a real process (`test_cases_as_a_process`) to see exit code and stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import click
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from moeprune.io.output_policy import COMPLETE_MARKER, OutputPathError
from moeprune.io.safetensors_io import CorruptCheckpointError
from moeprune.nonfinite import NonFiniteError
from moeprune.plan import PlanError
from moeprune.calibration.work_dir import ResumeError
from moeprune.testing.tiny_models import save_tiny_checkpoint

TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}" for i in range(60))
CAL = ("--samples", 2, "--seq-len", 16)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-base")
    src = save_tiny_checkpoint("qwen3_moe", root / "qwen3", max_shard_size="40KB")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    (root / "calib.txt").write_text(TEXT)
    return {"src": src, "calib": root / "calib.txt", "ds": save_tiny_checkpoint("deepseek_v3", root / "dsv3")}


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_fault(name, base, tmp_path):
    args, inputs, error, fragment = CASES[name](base, tmp_path)
    before = {p: digest(p) for p in inputs}
    complete_before = complete_outputs(tmp_path)
    code, message, cause = run_cli(*args)
    assert code == 2, (name, code, message)
    assert isinstance(cause, error), (name, type(cause), message)
    assert fragment in message, (name, message)
    assert "\n" not in message.strip(), message
    for path, value in before.items():
        assert digest(path) == value, f"{name}: input {path} changed"
    assert complete_outputs(tmp_path) == complete_before, name
    assert leftovers(tmp_path) == [], (name, leftovers(tmp_path))


# ---- behaviour around the table ------------------------------------------------------------------
def test_force_applies_a_foreign_plan_with_a_warning(base, tmp_path, caplog):
    args, inputs, _, _ = CASES["plan_for_another_model"](base, tmp_path)
    code, message, _ = run_cli(*args, "--force")
    assert code == 0, message
    assert "--force" in caplog.text and "another model" in caplog.text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 4


def test_allow_nonfinite_drops_and_reports_the_broken_expert(base, tmp_path):
    model = copy_model(base, tmp_path)
    poison_expert(model, 0, 3)
    before = digest(model)
    code, message, _ = run_cli(*prune_args(model, base, tmp_path / "out", "--no-offload", "--allow-nonfinite"))
    assert code == 0, message
    plan = json.loads((tmp_path / "out" / "moeprune_plan.json").read_text())
    assert plan["params"]["nonfinite_excluded"] == {"0": [3]}
    assert 3 not in plan["layers"]["0"]["kept"] and len(plan["layers"]["0"]["kept"]) == 4
    from moeprune.io.checkpoint import load_pruned

    pruned = load_pruned(tmp_path / "out")
    assert all(bool(torch.isfinite(p).all()) for p in pruned.parameters())
    assert digest(model) == before


def test_seq_len_beyond_positions_warns(base, tmp_path, caplog):
    model = copy_model(base, tmp_path)  # max_position_embeddings 256
    args = ["calibrate", model, "--calibration", base["calib"], "--samples", 1, "--seq-len", 300, "-o", tmp_path / "s.safetensors"]
    code, message, _ = run_cli(*args)
    assert code == 0, message
    assert "max_position_embeddings (256)" in caplog.text


def test_overwrite_replaces_only_moeprune_outputs_and_cleans_temporaries(base, tmp_path):
    model = copy_model(base, tmp_path)
    out = tmp_path / "out"
    stale = [tmp_path / ".out.partial-0123abcd", tmp_path / ".out.old-89abcdef"]
    for d in stale:
        d.mkdir()
        (d / "junk").write_text("x")
    assert run_cli(*prune_args(model, base, out))[0] == 0
    assert not any(d.exists() for d in stale)  # leftovers of killed runs are cleaned on the next run
    assert run_cli(*prune_args(model, base, out, "--overwrite"))[0] == 0
    assert leftovers(tmp_path) == []


def test_killed_publish_keeps_the_previous_output_recoverable(base, tmp_path, monkeypatch):
    """A run killed between moving the old output aside and renaming the new one into place: the
    next run puts the old output back (then replaces it only with --overwrite)."""
    model = copy_model(base, tmp_path)
    out = tmp_path / "out"
    assert run_cli(*prune_args(model, base, out))[0] == 0
    old_digest = digest(out)
    trash = tmp_path / ".out.old-00000000"
    os.replace(out, trash)  # the state a kill -9 inside publish_directory leaves
    code, message, _ = run_cli(*prune_args(model, base, out))  # no --overwrite: refused, old output restored
    assert code == 2 and "--overwrite" in message
    assert not trash.exists() and digest(out) == old_digest  # restored byte for byte
    assert run_cli(*prune_args(model, base, out, "--overwrite"))[0] == 0
    assert leftovers(tmp_path) == []


def test_resume_refuses_a_checkpoint_rewritten_in_place(base, tmp_path):
    """Same shard names and sizes, other weights: the content fingerprint differs."""
    from moeprune.calibration.data import pack_documents
    from moeprune.calibration.streamed import streamed_calibrate
    from moeprune.testing.tiny_tokenizer import byte_tokenizer

    model = copy_model(base, tmp_path)
    ids = pack_documents(byte_tokenizer(), [TEXT], 2, 16)
    work = tmp_path / "work"

    def stop(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streamed_calibrate(model, ids, batch_size=1, progress=False, work_dir=work, on_layer_done=stop)
    sizes = {f.name: f.stat().st_size for f in model.glob("*.safetensors")}
    other = save_tiny_checkpoint("qwen3_moe", tmp_path / "other", seed=7, max_shard_size="40KB")
    for f in other.glob("*.safetensors"):
        shutil.copy(f, model / f.name)
    assert {f.name: f.stat().st_size for f in model.glob("*.safetensors")} == sizes
    with pytest.raises(ResumeError, match="content"):
        streamed_calibrate(model, ids, batch_size=1, progress=False, work_dir=work, resume=True)


def test_plan_json_is_strict_and_non_finite_scores_are_null(tmp_path):
    from moeprune.plan import LayerPlan, Plan

    plan = Plan("manual", {}, {0: LayerPlan(0, 8, [0, 1, 2, 3], scores=[float("nan"), 1.0, float("inf")] + [0.0] * 5)}, top_k=2)
    text = plan.save(tmp_path / "p.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["layers"]["0"]["scores"][:3] == [None, 1.0, None]
    assert Plan.load(tmp_path / "p.json").layers[0].kept == [0, 1, 2, 3]


def test_non_uniform_plan_warns_and_is_recorded(base, tmp_path, capsys):
    model = copy_model(base, tmp_path)
    plan = write_plan(tmp_path / "p.json", qwen_layers(kept0=(0, 1, 2, 3), kept1=(0, 1, 2, 3, 4, 5)), params={"budget": "global"})
    code, message, _ = run_cli("apply", model, plan, "-o", tmp_path / "out")
    assert code == 0, message
    warning = capsys.readouterr().err
    assert "moeprune.load_pruned" in warning and "llama.cpp" in warning and "--budget layer --ratio 0.375" in warning
    saved = json.loads((tmp_path / "out" / "moeprune_plan.json").read_text())
    marker = json.loads((tmp_path / "out" / COMPLETE_MARKER).read_text())
    assert saved["uniform"] is False and marker["uniform"] is False and marker["experts_per_layer"] == {"0": 4, "1": 6}
    from moeprune.adapters import find_moe_layers
    from moeprune.io.checkpoint import load_pruned

    assert [layer.num_experts for layer in find_moe_layers(load_pruned(tmp_path / "out"))] == [4, 6]


def test_api_save_refuses_a_parent_of_the_input(base, tmp_path):
    from moeprune import save
    from moeprune.io.checkpoint import load_pruned

    model_dir = copy_model(base, tmp_path)
    before = digest(tmp_path / "models")
    with pytest.raises(OutputPathError, match="contains the input"):
        save(load_pruned(model_dir), tmp_path / "models", overwrite=True)
    with pytest.raises(OutputPathError, match="contains the input"):
        save(load_pruned(model_dir), tmp_path, overwrite=True, input_dir=model_dir)
    assert digest(tmp_path / "models") == before


# ---- as a real process --------------------------------------------------------------------------
PROCESS = [sys.executable, "-c", "from moeprune.cli import main; main()"]


def _process(args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*PROCESS, *map(str, args)], capture_output=True, text=True, timeout=240, env=env,
                          stdin=subprocess.DEVNULL, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["output_is_parent_of_input", "plan_is_a_json_list", "truncated_shard_in_memory",
                                  "model_path_missing", "invalid_config_offload", "yaml_syntax_error", "pickle_checkpoint_in_memory"])
def test_cases_as_a_process(name, base, tmp_path):
    args, inputs, _, fragment = CASES[name](base, tmp_path)
    before = {p: digest(p) for p in inputs}
    result = _process(args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert all(digest(p) == v for p, v in before.items())


@pytest.mark.slow
def test_remote_code_never_runs_nor_prompts(tmp_path):
    """A checkpoint with auto_map and an unknown model_type: no y/N prompt, its code never runs."""
    ckpt = tmp_path / "remote"
    ckpt.mkdir()
    sentinel = tmp_path / "code-ran"
    (ckpt / "configuration_evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_moe'\n")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "evil_moe", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    save_file({"w": torch.zeros(1)}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    for args in (["inspect", ckpt], ["prune", ckpt, "--offload", "--output", tmp_path / "out", "--calibration", "builtin:code"]):
        result = _process(args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "trust" in result.stderr.lower(), result.stderr
        assert not sentinel.exists()


def test_read_only_parent_is_refused_before_any_work(base, tmp_path, monkeypatch):
    """The output's nearest existing parent must be writable (root ignores chmod, so access is faked)."""
    import moeprune.io.output_policy as policy

    model = copy_model(base, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(policy.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    for extra in ((), ("--offload",)):
        code, message, cause = run_cli(*prune_args(model, base, locked / "new" / "out", *extra))
        assert code == 2 and isinstance(cause, OutputPathError) and "not writable" in message, message
    assert list(locked.iterdir()) == [] and leftovers(tmp_path) == []
