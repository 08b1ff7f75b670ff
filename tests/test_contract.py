"""One contract for every strategy x family x path (peft-style CASES table).

For each case, on a tiny multi-shard checkpoint: calibrate and plan in memory and streamed (the
statistics and the plans must be equal), apply in memory + save and streamed (`--offload`'s
writer), then: identical tensors and config, both reload with equal logits, and the output is
smaller than the input. Strategies that declare `in_memory_only` must be refused by the streamed
pipeline before any calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune.apply.surgery import apply_plan
from moeprune.calibration.observer import calibrate
from moeprune.config import load_recipe
from moeprune.io.checkpoint import load_pruned, save_pruned
from moeprune.io.loading import load_model
from moeprune.io.safetensors_io import read_checkpoint_tensors
from moeprune.plan import Plan, PlanError
from moeprune.strategies import get_strategy, plan as make_plan
from moeprune.calibration.streamed import streamed_calibrate
from moeprune.apply.streamed import streamed_apply
from moeprune.testing.checks import safetensors_bytes
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint

ALL = ("qwen3_moe", "gpt_oss", "deepseek_v3")
MORE = ("qwen3_next", "llama4_text", "dbrx", "jetmoe", "longcat_flash")  # hybrid attention; Llama4, DBRX, JetMoE, LongCat through shims
# (strategy, params, ratio, families)
CASES = [
    ("frequency", {}, 0.5, ALL),
    ("reap", {"budget": "global"}, 0.25, ("qwen3_moe", "gpt_oss")),  # no global budget with n_group
    ("ean", {}, 0.5, ("qwen3_moe",)),
    ("hc-smoe", {"router": "average"}, 0.5, ALL),
    ("m-smoe", {}, 0.5, ALL),
    ("dern", {"threshold": 0.0}, 0.5, ALL + ("longcat_flash",)),
    ("stun", {}, 0.5, ("qwen3_moe", "gpt_oss", "longcat_flash")),  # no group-limited routers; weights streamed per layer
    ("stun", {"merge": True}, 0.5, ("qwen3_moe",)),
    ("mone", {}, 0.5, ALL),  # novices: router keeps E rows, extension file next to the shards
    ("reap", {}, 0.5, MORE),  # selection route
    ("m-smoe", {}, 0.5, MORE),  # layer route (merges)
]


def _ids(case):
    return [f"{s}{'-' + '-'.join(map(str, p)) if p else ''}-{f}" for s, p, _, fams in case for f in fams]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    return {f: save_tiny_checkpoint(f, root / f, max_shard_size="20KB") for f in ALL + MORE}


IDS = random_batch(272, batch=6, seq_len=12, seed=3)


def _checkpoints_equal(ref: Path, out: Path) -> None:
    a, b = read_checkpoint_tensors(ref), read_checkpoint_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("strategy, params, ratio, family",
                         [(s, p, r, f) for s, p, r, fams in CASES for f in fams], ids=_ids(CASES))
def test_streamed_equals_in_memory(strategy, params, ratio, family, checkpoints, tmp_path):
    src = checkpoints[family]
    spec = get_strategy(strategy)
    model, tokenizer, _ = load_model(str(src))
    stats = calibrate(model, IDS, batch_size=4, dense_tokens=spec.dense_tokens, progress=False)
    in_memory = make_plan(stats, strategy, ratio, model=model, **params)
    streamed_stats = streamed_calibrate(src, IDS, batch_size=4, dense_tokens=spec.dense_tokens, progress=False)
    assert streamed_stats.digest() == stats.digest()
    if spec.needs_weights:  # what prune_offloaded passes: the shards, one MoE layer at a time
        from moeprune.engine.expert_reader import LazyExpertWeights

        with LazyExpertWeights(src) as weights:
            streamed = make_plan(streamed_stats, strategy, ratio, model=weights, **params)
        assert weights.bytes_read > 0
    else:
        streamed = make_plan(streamed_stats, strategy, ratio, **params)
    assert streamed.layers == in_memory.layers
    ref = save_pruned(apply_plan(model, in_memory), tmp_path / "ref", plan=in_memory, tokenizer=tokenizer, input_dir=src)
    out = streamed_apply(src, streamed, tmp_path / "out", max_shard_size="20KB", progress=False)
    _checkpoints_equal(ref, out)
    assert Plan.load(out / "moeprune_plan.json").layers == in_memory.layers
    if any(lp.novices for lp in in_memory.layers.values()):
        from safetensors.torch import load_file

        from moeprune.apply.novice import NOVICE_FILE

        a, b = load_file(ref / NOVICE_FILE), load_file(out / NOVICE_FILE)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert json.loads((out / "config.json").read_text())["moeprune_novices"] == \
            json.loads((ref / "config.json").read_text())["moeprune_novices"]
    assert safetensors_bytes(out) < safetensors_bytes(src)
    batch = random_batch(272, 2, 8, seed=5)
    with torch.no_grad():
        # tensors are bit-equal above; the two reloads may still differ by an ulp (BLAS paths by storage layout)
        torch.testing.assert_close(load_pruned(out)(batch).logits, load_pruned(ref)(batch).logits, rtol=0, atol=1e-6)


def test_the_table_covers_every_builtin():
    covered = {s for s, *_ in CASES}
    builtin = {"frequency", "soft-frequency", "ean", "reap", "hc-smoe", "m-smoe", "stun", "mone", "dern"}
    assert builtin - {"soft-frequency"} <= covered  # soft-frequency is dern's selection (covered by dern)
    assert not any(get_strategy(s).in_memory_only for s in builtin)


def test_in_memory_only_strategies_are_refused_before_calibration(checkpoints, tmp_path, monkeypatch):
    from moeprune.strategies import registry
    from moeprune.calibration import streamed as layerwise
    from moeprune.pipeline.offloaded import prune_offloaded

    strategy = "test-in-memory-only"
    base = get_strategy("frequency")
    monkeypatch.setitem(registry._REGISTRY, strategy, registry.StrategySpec(
        strategy, base.fn, "test", in_memory_only=True))

    def never(*args, **kwargs):
        raise AssertionError("calibration must not start")

    monkeypatch.setattr(layerwise, "streamed_calibrate", never)
    recipe = load_recipe(None, {"model": str(checkpoints["qwen3_moe"]), "strategy": strategy, "output": str(tmp_path / "o")})
    with pytest.raises(PlanError, match=f"strategy '{strategy}' needs the model in memory; drop --offload"):
        prune_offloaded(recipe, progress=False)
    assert not (tmp_path / "o").exists()


def test_offloaded_prune_with_weights_equals_in_memory(checkpoints, tmp_path):
    """The whole `--offload` pipeline for a strategy that reads weights (stun)."""
    from moeprune.api import prune
    from moeprune.pipeline.offloaded import prune_offloaded

    src = checkpoints["gpt_oss"]
    (tmp_path / "calib.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(80)))
    common = {"model": str(src), "strategy": "stun", "ratio": 0.5, "calibration.source": str(tmp_path / "calib.txt"),
              "calibration.samples": 4, "calibration.seq_len": 16, "device": "cpu"}
    streamed = prune_offloaded(load_recipe(None, {**common, "output": str(tmp_path / "s")}), progress=False)
    in_memory = prune(load_recipe(None, {**common, "output": str(tmp_path / "m")}), progress=False)
    assert streamed.plan.layers == in_memory.plan.layers
    _checkpoints_equal(in_memory.output, streamed.output)
