"""`--strategy auto`: the candidate with the lowest held-out KL wins, and the report lists them all."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from moeprune import plan
from moeprune.api import prune
from moeprune.apply.surgery import apply_plan
from moeprune.auto.select import split_validation
from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.config import PruneRecipe, load_recipe
from moeprune.evaluation.agreement import compare_models
from moeprune.testing.tiny_models import save_tiny_checkpoint, tiny_model
from moeprune.testing.tiny_tokenizer import byte_tokenizer

TEXT = "\n\n".join(f"def g{i}(y):\n    return y - {i} * {i % 5}  # note {i}" for i in range(80))
CANDIDATES = ["frequency", "reap", "man", "aimer"]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def _recipe(corpus, out, **auto):
    return PruneRecipe(strategy="auto", ratio=0.5, output=str(out), auto={"candidates": CANDIDATES, **auto},
                       calibration={"source": str(corpus), "samples": 8, "seq_len": 32, "seed": 3, "batch_size": 4})


def test_auto_picks_lowest_validation_kl(corpus, tmp_path):
    recipe = _recipe(corpus, tmp_path / "out")
    result = prune(recipe, model=tiny_model("qwen3_moe"), tokenizer=byte_tokenizer(), progress=False)
    report = json.loads((tmp_path / "out" / "moeprune_report.json").read_text())
    assert [r["strategy"] for r in report["candidates"]] == CANDIDATES
    assert report["validation"]["sequences"] == 1 and report["planning_sequences"] == 7
    # every KL again, independently: same split, a fresh calibration of the dense model, one copy each
    dense = tiny_model("qwen3_moe")
    ids = calibration_ids(str(corpus), byte_tokenizer(), 8, 32, 3)
    planning, validation = split_validation(ids, 0.125, 3)
    stats = calibrate(dense, planning, batch_size=4, progress=False)
    assert result.stats.digest() == stats.digest()
    kls = {}
    for name in CANDIDATES:
        p = plan(stats, name, 0.5, model=dense)
        candidate = apply_plan(copy.deepcopy(dense), p)
        kls[name] = compare_models(dense, candidate, validation, seq_len=32)["kl"]
    reported = {r["strategy"]: r["kl"] for r in report["candidates"]}
    assert reported == pytest.approx(kls, rel=1e-5)
    best = min(kls, key=kls.get)
    assert len(set(round(v, 6) for v in kls.values())) > 1  # the candidates really differ
    assert report["selected"]["strategy"] == best == result.plan.strategy
    assert result.plan.params["auto"]["selected"]["strategy"] == best
    saved = json.loads((tmp_path / "out" / "moeprune_plan.json").read_text())
    assert saved["layers"] == result.plan.to_dict()["layers"]


def test_auto_budget_tries_global_where_supported(corpus, tmp_path):
    recipe = _recipe(corpus, tmp_path / "out", budgets=["layer", "global"])
    result = prune(recipe, model=tiny_model("qwen3_moe"), tokenizer=byte_tokenizer(), progress=False)
    tried = [(r["strategy"], r["budget"]) for r in result.report["candidates"]]
    assert ("frequency", "global") in tried and ("man", "global") in tried
    assert ("aimer", "global") not in tried and ("aimer", "layer") in tried


def test_auto_recipe_validation():
    with pytest.raises(ValueError, match="unknown auto candidate"):
        load_recipe(None, {"strategy": "auto", "auto.candidates": ["reap", "nope"]})
    with pytest.raises(ValueError, match="keyed by candidate name"):
        load_recipe(None, {"strategy": "auto", "params": {"min_share": 0.1}})
    with pytest.raises(ValueError, match="no parameter 'bogus'"):
        load_recipe(None, {"strategy": "auto", "params": {"man": {"bogus": 1}}})
    ok = load_recipe(None, {"strategy": "auto", "params": {"man": {"min_share": 0.1}}})
    assert ok.strategy_params() == {}


def test_cli_prints_table_and_writes_report(corpus, tmp_path):
    from moeprune.cli import main

    model = save_tiny_checkpoint("qwen3_moe", tmp_path / "model")
    out = tmp_path / "auto"
    result = CliRunner().invoke(main, ["prune", str(model), "--strategy", "auto", "--auto-candidates", "frequency,aimer",
                                       "--calibration", str(corpus), "--samples", "8", "--seq-len", "32",
                                       "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "moeprune_report.json").read_text())
    assert {r["strategy"] for r in report["candidates"]} == {"frequency", "aimer"}
    assert "<- selected" in result.output and "aimer" in result.output


def test_auto_val_source_scores_on_that_text_and_plans_from_all(corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"class K{i}:\n    value = '{'xyz' * (i % 7)}'  # other text {i}" for i in range(60)))
    recipe = _recipe(corpus, tmp_path / "out", val_source=str(other), val_samples=3)
    result = prune(recipe, model=tiny_model("qwen3_moe"), tokenizer=byte_tokenizer(), progress=False)
    report = result.report
    assert report["planning_sequences"] == 8 and report["validation"]["sequences"] == 3
    assert report["validation"]["source"] == str(other)
    dense = tiny_model("qwen3_moe")
    stats = calibrate(dense, calibration_ids(str(corpus), byte_tokenizer(), 8, 32, 3), batch_size=4, progress=False)
    assert result.stats.digest() == stats.digest()  # every calibration sequence planned
    validation = calibration_ids(str(other), byte_tokenizer(), 3, 32, 3)
    kls = {n: compare_models(dense, apply_plan(copy.deepcopy(dense), plan(stats, n, 0.5, model=dense)), validation,
                             seq_len=32)["kl"] for n in CANDIDATES}
    assert {r["strategy"]: r["kl"] for r in report["candidates"]} == pytest.approx(kls, rel=1e-5)
    assert report["selected"]["strategy"] == min(kls, key=kls.get)
