"""`prune --offload --eval`: perplexity streamed one decoder layer at a time equals the in-memory one."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moeprune.cli import main
from moeprune.evaluation.perplexity import nll_from_ids
from moeprune.io.loading import load_model
from moeprune.evaluation.streamed_perplexity import check_streamable_output, streamed_nll
from moeprune.testing.tiny_models import random_batch, save_tiny_checkpoint


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_streamed_nll_equals_in_memory(family, tmp_path):
    path = save_tiny_checkpoint(family, tmp_path / family, max_shard_size="20KB")
    ids = random_batch(272, 1, 100, seed=4).reshape(-1)  # 6 full windows of 16 + a partial one
    reference = nll_from_ids(load_model(str(path))[0], ids, seq_len=16, batch_size=3, progress=False)
    assert streamed_nll(path, ids, seq_len=16, batch_size=3, progress=False, memory_budget=3000) == reference


@pytest.mark.parametrize("edit", ["non-uniform", "slimmed", "dynamic-skip"])
def test_moeprune_outputs_stream_as_they_reload(edit, tmp_path):
    # outputs whose layers differ from a stock config are rebuilt as load_pruned rebuilds them
    from moeprune import apply, calibrate, plan, save
    from moeprune.apply.dynamic_skip import install_dynamic_skip
    from moeprune.io.checkpoint import load_pruned

    model, tok, _ = load_model(str(save_tiny_checkpoint("qwen3_moe", tmp_path / "src")))
    ids = random_batch(272, 4, 16, seed=2)
    stats = calibrate(model, ids, progress=False)
    p = plan(stats, "frequency", 0.5, budget="global") if edit == "non-uniform" else plan(stats, "frequency", 0.25)
    apply(model, p)
    if edit == "slimmed":
        from moeprune.slimming.run import slim_channels

        slim_channels(model, stats, p, ratio=0.5, method="coverage")
    if edit == "dynamic-skip":
        install_dynamic_skip(model, {0: 0.5, 1: 0.3}, True)
    out = save(model, tmp_path / "out", plan=p, tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    key = {"non-uniform": "moeprune_experts_per_layer", "slimmed": "moeprune_expert_widths",
           "dynamic-skip": "moeprune_dynamic_skip"}[edit]
    assert config.get(key), (edit, sorted(config))
    check_streamable_output(out)
    text = random_batch(272, 1, 70, seed=4).reshape(-1)
    reference = nll_from_ids(load_pruned(out), text, seq_len=16, batch_size=3, progress=False)
    total, count = streamed_nll(out, text, seq_len=16, batch_size=3, progress=False, memory_budget=3000)
    assert count == reference[1] and total == pytest.approx(reference[0], rel=1e-6)


def test_novice_outputs_are_refused(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "moeprune_novices": {"0": [1]}}))
    with pytest.raises(ValueError, match="moeprune_novices in config: streamed evaluation cannot rebuild it"):
        check_streamable_output(path)


@pytest.mark.slow  # two prunes and eight held-out evaluations (~40 s on the shared machine)
def test_prune_offload_eval_matches_in_memory_eval(tmp_path):
    save_tiny_checkpoint("qwen3_moe", tmp_path / "model", max_shard_size="20KB")
    (tmp_path / "calib.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(80)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"strategy: frequency\nratio: 0.5\neval_max_tokens: 600\ncalibration:\n  source: {tmp_path / 'calib.txt'}\n"
                      "  samples: 4\n  seq_len: 16\n")
    runner = CliRunner()
    figures = {}
    for mode in ("--offload", "--no-offload"):
        out = tmp_path / mode.strip("-")
        res = runner.invoke(main, ["prune", str(tmp_path / "model"), "--config", str(recipe), "--eval", mode, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert "held-out perplexity" in res.output
        figures[mode] = json.loads((out / "moeprune_eval.json").read_text())
    streamed, in_memory = figures["--offload"], figures["--no-offload"]
    assert streamed.pop("streamed") is True
    assert streamed == in_memory  # same windows, same layers, same bits
