"""`--uniform` / `uniform: true`: a global budget re-planned as equal per-layer counts."""

from __future__ import annotations

import json

import pytest

from moeprune.calibration.observer import calibrate
from moeprune.plan import LayerPlan, Plan, PlanError
from moeprune.strategies import plan
from moeprune.strategies.uniform import uniform_from
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def stats():
    model = tiny_model("qwen3_moe")
    return calibrate(model, random_batch(model.config.vocab_size, batch=4, seq_len=16), progress=False)


def test_uniform_from_keeps_the_mean_count_in_every_layer(stats):
    made = Plan("frequency", {"budget": "global"}, {0: LayerPlan(0, 8, [0, 1, 2, 3]), 1: LayerPlan(1, 8, [0, 1, 2, 3, 4, 5])}, top_k=2)
    result = uniform_from(stats, "frequency", made, budget="global")
    assert result.uniform and result.experts_per_layer == {0: 5, 1: 5}
    assert result.layers[0].kept == plan(stats, "frequency", 3 / 8).layers[0].kept  # the per-layer plan at that share
    assert result.params["uniform_from"]["experts_per_layer"] == {"0": 4, "1": 6}


def test_uniform_refuses_strategies_that_pick_counts_themselves(stats):
    made = Plan("stun", {}, {0: LayerPlan(0, 8, [0, 1, 2, 3]), 1: LayerPlan(1, 8, [0, 1, 2, 3, 4, 5])}, top_k=2)
    with pytest.raises(PlanError, match="per-layer budget"):
        uniform_from(stats, "stun", made)


def test_prune_uniform_flag_gives_equal_counts(tmp_path):
    from test_fault_injection import TEXT, run_cli

    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "in")
    (tmp_path / "c.txt").write_text(TEXT)
    args = ["prune", src, "--strategy", "soft-frequency", "--ratio", 0.5, "--budget", "global", "--calibration", tmp_path / "c.txt",
            "--samples", 4, "--seq-len", 16, "--uniform", "--no-offload"]
    assert run_cli(*[a for a in args if a != "--uniform"], "--output", tmp_path / "plain")[0] == 0
    plain = json.loads((tmp_path / "plain" / "moeprune_plan.json").read_text())
    assert plain["uniform"] is False  # the global budget alone gives unequal counts on this model
    assert run_cli(*args, "--output", tmp_path / "mem")[0] == 0
    assert run_cli(*args[:-1], "--offload", "--output", tmp_path / "streamed")[0] == 0
    for out in ("mem", "streamed"):
        saved = json.loads((tmp_path / out / "moeprune_plan.json").read_text())
        assert saved["uniform"] is True and len(set(saved["experts_per_layer"].values())) == 1
