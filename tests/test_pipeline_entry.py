"""`moeprune.pipeline.run`, the one entry point behind the API, the CLI and torchrun.

The API's `prune(offload=True)` writes the same tensors and plan as the in-memory `prune`;
statistics handed in replace the calibration pass (no pass runs) and give the plan a calibration
would; what only the in-memory path can do is refused before any work; `offload=None` decides by
size.
"""

from __future__ import annotations

import pytest
import torch

import moeprune
from moeprune.config import load_recipe
from moeprune.io.loading import load_model
from moeprune.io.safetensors_io import read_checkpoint_tensors
from moeprune.pipeline import entry, run
from moeprune.plan import Plan
from moeprune.testing.tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("entry") / "ckpt", max_shard_size="20KB")


def _recipe(path, out, **extra):
    return load_recipe(None, {"model": str(path), "strategy": "reap", "ratio": 0.5, "output": str(out),
                              "calibration.samples": 6, "calibration.seq_len": 12, "calibration.batch_size": 4, **extra})


def test_api_offload_equals_in_memory(checkpoint, tmp_path):
    mem = moeprune.prune(_recipe(checkpoint, tmp_path / "mem"), progress=False)
    streamed = moeprune.prune(_recipe(checkpoint, tmp_path / "str"), offload=True, progress=False,
                              memory_budget="1MB")
    assert mem.model is not None and streamed.model is None
    assert streamed.plan.layers == mem.plan.layers and streamed.stats.digest() == mem.stats.digest()
    a, b = read_checkpoint_tensors(mem.output), read_checkpoint_tensors(streamed.output)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".str.moeprune-work").exists()  # its work directory is gone after success


@pytest.mark.parametrize("offload", [False, True])
def test_stats_handed_in_replace_calibration(checkpoint, tmp_path, monkeypatch, offload):
    ref = run(_recipe(checkpoint, tmp_path / "ref"), offload=offload, progress=False)
    stats = ref.stats
    stats.meta.pop("fingerprint")  # as torchrun ranks make them; the pipeline binds the plan itself

    def never(*args, **kwargs):
        raise AssertionError("no calibration pass when statistics are given")

    from moeprune.calibration import streamed
    from moeprune.pipeline import in_memory

    monkeypatch.setattr(in_memory, "calibrate", never)
    monkeypatch.setattr(streamed, "streamed_calibrate", never)
    again = run(_recipe(checkpoint, tmp_path / "again"), stats=stats, offload=offload, progress=False)
    assert again.plan.layers == ref.plan.layers and again.plan.model == ref.plan.model
    assert Plan.load(again.output / "moeprune_plan.json").layers == ref.plan.layers


@pytest.mark.parametrize("extra, model, message", [
    ({"strategy": "auto"}, False, "drop --offload"),
    ({"router_kd": {"steps": 2}}, False, "--router-kd"),
    ({}, True, "a model object is already in memory"),
])
def test_offload_refusals_before_any_work(checkpoint, tmp_path, monkeypatch, extra, model, message):
    from moeprune.calibration import streamed

    monkeypatch.setattr(streamed, "streamed_calibrate", lambda *a, **k: pytest.fail("calibration started"))
    loaded = load_model(str(checkpoint))[0] if model else None
    with pytest.raises(ValueError, match=message):
        run(_recipe(checkpoint, tmp_path / "o", **extra), loaded, offload=True, progress=False)
    assert not (tmp_path / "o").exists()


def test_offload_none_decides_by_size(checkpoint, tmp_path, monkeypatch):
    from moeprune.pipeline import offloaded

    recipe = _recipe(checkpoint, tmp_path / "o")
    monkeypatch.setattr(offloaded, "available_memory", lambda: 1)
    assert entry.choose_offload(recipe, None) is True
    assert entry.choose_offload(_recipe(checkpoint, tmp_path / "o", strategy="auto"), None) is False  # needs memory
    assert entry.choose_offload(recipe, False) is False
    monkeypatch.setattr(offloaded, "available_memory", lambda: 1 << 50)
    assert entry.choose_offload(recipe, None) is False


def test_the_entry_points_share_the_pipeline():
    # API, CLI and torchrun assemble nothing themselves: each calls pipeline.run
    import inspect

    from moeprune import api, distributed
    from moeprune.cli import pipeline_cmds

    for module in (api, distributed, pipeline_cmds):
        source = inspect.getsource(module)
        assert "run(" in source and "prune_offloaded(" not in source and "streamed_apply(" not in source, module.__name__
    assert "calibrate(" not in inspect.getsource(api.prune)
