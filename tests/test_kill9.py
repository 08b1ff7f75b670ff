"""kill -9 during calibration, surgery and publish, in memory and with --offload, then re-run.

The killed run is a real `moeprune prune` process that SIGKILLs itself at the chosen moment (a
wrapper installed before `main()` runs: the second calibration batch, right after the first
streamed layer is committed, the second layer's slicing, the fifth tensor written, the rename of
the finished output into place). Afterwards: the input is byte-identical, nothing that looks like
a finished output exists (or the previous output is intact), and a re-run (`--resume` for the
streamed calibration) gives exactly the tensors and plan of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moeprune.io.output_policy import COMPLETE_MARKER
from moeprune.testing.tiny_models import save_tiny_checkpoint

from test_fault_injection import TEXT, digest, leftovers, run_cli

pytestmark = pytest.mark.slow

CHILD = r'''
import os, signal, sys
phase = sys.argv.pop(1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def kill_on_call(owner, name, nth):
    original, calls = getattr(owner, name), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= nth:
            die()
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)

if phase == "calibration":
    from moeprune.calibration.observer import Observer
    kill_on_call(Observer, "set_mask", 2)
elif phase == "calibration_offload":
    from moeprune.calibration.work_dir import WorkDir
    commit = WorkDir.commit
    def committed(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        die()
    WorkDir.commit = committed
elif phase == "surgery":
    import importlib
    import moeprune
    kill_on_call(importlib.import_module("moeprune.apply.surgery"), "slice_layer", 2)
elif phase == "surgery_offload":
    from moeprune.io.sharded_writer import ShardedWriter
    kill_on_call(ShardedWriter, "add", 5)
elif phase in ("publish", "publish_offload"):
    replace = os.replace
    def killing_replace(src, dst):
        if ".partial-" in os.path.basename(str(src)):  # the finished output renamed into place
            die()
        return replace(src, dst)
    os.replace = killing_replace
from moeprune.cli import main
main()
'''

SCENARIOS = ["calibration", "calibration_offload", "surgery", "surgery_offload", "publish", "publish_offload"]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill9")
    save_tiny_checkpoint("qwen3_moe", root / "model", max_shard_size="40KB")
    (root / "calib.txt").write_text(TEXT)
    return root


def _args(root: Path, out: Path, offload: bool, ratio: float = 0.5) -> list:
    return ["prune", root / "model", "--strategy", "reap", "--ratio", ratio, "--output", out, "--calibration", root / "calib.txt",
            "--samples", 4, "--seq-len", 16, "--batch-size", 1, "--offload" if offload else "--no-offload"]


def _tensors(out: Path) -> dict:
    result = {}
    for shard in sorted(out.glob("*.safetensors")):
        result.update(load_file(str(shard)))
    return result


def _same_output(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)
    pa, pb = (json.loads((p / "moeprune_plan.json").read_text()) for p in (a, b))
    assert pa["layers"] == pb["layers"] and pa["model"] == pb["model"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kill9_then_rerun(scenario, fixture_dir, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(fixture_dir, root)
    offload = scenario.endswith("_offload")
    reference = tmp_path / "reference"
    assert run_cli(*_args(root, reference, offload))[0] == 0
    out = root / "out"
    publish = scenario.startswith("publish")
    if publish:  # a previous output exists and is being replaced (--overwrite)
        assert run_cli(*_args(root, out, offload, ratio=0.25))[0] == 0
        previous = digest(out)
    model_digest = digest(root / "model")
    args = _args(root, out, offload) + (["--overwrite"] if publish else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", CHILD, scenario, *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert digest(root / "model") == model_digest
    if publish:  # the old output was moved aside, complete: the next run restores or replaces it
        olds = [p for p in root.iterdir() if ".out.old-" in p.name]
        assert not out.exists() and len(olds) == 1 and (olds[0] / COMPLETE_MARKER).is_file()
    else:
        assert not out.exists()
    if scenario == "calibration_offload":
        work = root / ".out.moeprune-work"
        assert json.loads((work / "progress.json").read_text())["done"] == 0
        code, message, _ = run_cli(*args, "--resume")
    else:
        code, message, _ = run_cli(*args)
    assert code == 0, message
    _same_output(out, reference)
    assert digest(root / "model") == model_digest
    assert leftovers(root) == [], leftovers(root)
    if publish:
        assert digest(out) != previous
