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

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fault_cases import CASES
from fault_harness import TEXT, complete_outputs, copy_model, digest, leftovers, poison_expert, prune_args, qwen_layers, run_cli, write_plan
from moeprune.calibration.work_dir import ResumeError
from moeprune.io.output_policy import COMPLETE_MARKER, OutputPathError
from moeprune.testing.tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-base")
    src = save_tiny_checkpoint("qwen3_moe", root / "qwen3", max_shard_size="40KB")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    (root / "calib.txt").write_text(TEXT)
    return {"src": src, "calib": root / "calib.txt", "ds": save_tiny_checkpoint("deepseek_v3", root / "dsv3")}


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
