"""Router KD with the sample count chosen by validation KL (`router_kd.samples: [a, b]`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moeprune.recover.router_params import router_parameters
from moeprune.testing.tiny_models import sharp_tiny_model
from moeprune.testing.tiny_tokenizer import byte_tokenizer


def _recipe(code_file: str, samples, **extra):
    from moeprune.config import load_recipe

    return load_recipe(None, {
        "strategy": "frequency", "ratio": 0.5, "calibration.source": code_file, "calibration.samples": 4,
        "calibration.seq_len": 32, "router_kd.steps": 6, "router_kd.lr": 1e-2, "router_kd.samples": samples,
        "router_kd.batch_size": 2, "router_kd.top_k": 8, "router_kd.val_samples": 6, **extra,
    })


def _routers(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in router_parameters(model).items()}


def test_samples_list_validates():
    from moeprune.recover.config import RouterKDConfig

    assert RouterKDConfig(steps=1, samples="64,512").samples == [64, 512]
    assert RouterKDConfig(steps=1, samples="64").samples == 64
    assert RouterKDConfig(steps=1, samples=[64]).samples == 64
    assert RouterKDConfig(steps=1, samples=[8, 2]).sample_choices == [8, 2]
    for bad in ([2, 2], [], [0, 4], "4,x"):
        with pytest.raises(ValueError, match="router_kd.samples"):
            RouterKDConfig(steps=1, samples=bad)
    with pytest.raises(ValueError, match="local: false"):
        RouterKDConfig(steps=1, samples=[2, 4], local=True)
    with pytest.raises(ValueError, match="steps > 0"):
        RouterKDConfig(samples=[2, 4], local=True)


def test_validation_sequences_come_from_documents_no_candidate_trains_on(code_file):
    from moeprune.evaluation.text_sources import load_texts
    from moeprune.recover.choose import prepare_kd_choice
    from moeprune.recover.config import RouterKDConfig
    from moeprune.recover.kd_data import held_apart_ids, validation_documents

    tok = byte_tokenizer()
    planning = held_apart_ids(code_file, tok, 4, 32, seed=0)
    config = RouterKDConfig(steps=1, samples=[3, 7], top_k=8, val_samples=5)
    choice = prepare_kd_choice(sharp_tiny_model("qwen3_moe"), tok, config, code_file, 32, seed=0,
                               planning_ids=planning, progress=False)
    documents, val_ids = validation_documents(code_file, tok, 5, 32, seed=0)
    assert choice.info["documents"] == len(documents) and torch.equal(choice.validation.input_ids, val_ids)
    texts = load_texts(code_file, split="train")
    held = [texts[i] for i in documents]
    assert tok.decode(val_ids[0].tolist()).startswith(held[0][:16])  # the windows are those documents' text
    assert [c.cache.num_sequences for c in choice.candidates] == [3, 7]
    for candidate in choice.candidates:  # drawn from the other documents, apart from planning
        alone = held_apart_ids(code_file, tok, candidate.cache.num_sequences, 32, seed=0, exclude=planning,
                               skip_documents=documents)
        assert torch.equal(candidate.cache.input_ids, alone)
    other = held_apart_ids(code_file, tok, 7, 32, seed=0, exclude=planning)
    assert not torch.equal(choice.candidates[1].cache.input_ids, other)  # skipping the documents changed the draw


def test_the_lowest_validation_kl_wins_and_equals_the_one_count_recipe(code_file):
    from moeprune.api import prune

    dense = sharp_tiny_model("qwen3_moe")
    tok = byte_tokenizer()
    chosen = prune(_recipe(code_file, [2, 8]), model=copy.deepcopy(dense), tokenizer=tok, progress=False)
    choice = chosen.plan.params["router_kd"]["choice"]
    kls = {row["samples"]: row["kl"] for row in choice["candidates"]}
    assert set(kls) == {2, 8} and kls[2] != kls[8]
    winner = min(kls, key=kls.get)
    assert choice["selected"] == {"samples": winner, "kl": kls[winner]}
    assert choice["kl_uncalibrated"] not in kls.values()  # measured before any candidate trained
    assert chosen.plan.params["router_kd"]["sequences"] == winner
    routers = _routers(chosen.model)
    assert any(not torch.equal(routers[k], v) for k, v in _routers(dense).items())  # KD moved them
    # the same recipe again: the same choice and routers (deterministic for a seed)
    again = prune(_recipe(code_file, [2, 8]), model=copy.deepcopy(dense), tokenizer=tok, progress=False)
    assert again.plan.params["router_kd"]["choice"]["candidates"] == [
        {**row, "seconds": again_row["seconds"]} for row, again_row in
        zip(choice["candidates"], again.plan.params["router_kd"]["choice"]["candidates"])]
    assert all(torch.equal(routers[k], v) for k, v in _routers(again.model).items())


def _compressed_with_trained_candidates(code_file: str, **config):
    """A compressed sharp tiny model, its KD choice (candidates 8 and 2 sequences), and each
    candidate's routers trained alone on a copy."""
    from moeprune import apply, calibrate, plan
    from moeprune.recover.choose import prepare_kd_choice
    from moeprune.recover.config import RouterKDConfig
    from moeprune.recover.kd_data import held_apart_ids
    from moeprune.recover.run import run_router_kd

    tok = byte_tokenizer()
    planning = held_apart_ids(code_file, tok, 4, 32, seed=0)
    model = sharp_tiny_model("qwen3_moe")
    kd = RouterKDConfig(steps=6, lr=1e-2, samples=[8, 2], top_k=8, val_samples=6, **config)
    choice = prepare_kd_choice(model, tok, kd, code_file, 32, seed=0, planning_ids=planning, progress=False)
    apply(model, plan(calibrate(model, planning, progress=False), "frequency", 0.5, model=model))
    alone = []
    for candidate in choice.candidates:
        trained = copy.deepcopy(model)
        run_router_kd(trained, candidate, progress=False, measure=False)
        alone.append(_routers(trained))
    return model, choice, alone


def test_the_winners_routers_are_copied_back(code_file):
    from moeprune.recover.choose import run_kd_choice

    model, choice, alone = _compressed_with_trained_candidates(code_file)
    report = run_kd_choice(model, choice, progress=False)
    kls = [row["kl"] for row in report["choice"]["candidates"]]
    winner = kls.index(min(kls))
    routers = _routers(model)
    for i, other in enumerate(alone):
        assert all(torch.equal(routers[k], v) for k, v in other.items()) == (i == winner), i


def test_cli_router_kd_samples_list(tmp_path, code_file):
    from click.testing import CliRunner

    from moeprune.cli import main
    from moeprune.testing.tiny_models import save_tiny_checkpoint

    model = save_tiny_checkpoint("qwen3_moe", tmp_path / "model")
    args = ["prune", str(model), "--strategy", "frequency", "--ratio", "0.5", "--calibration", code_file, "--samples", "4",
            "--seq-len", "32", "--router-kd", "2", "--router-kd-lr", "1e-2", "--router-kd-samples", "2,4",
            "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "router KD samples chosen by validation KL on 32 sequences of" in result.output
    saved = json.loads((tmp_path / "out" / "moeprune_plan.json").read_text())["params"]["router_kd"]
    assert [row["samples"] for row in saved["choice"]["candidates"]] == [2, 4]
    assert saved["sequences"] == saved["choice"]["selected"]["samples"]
    bad = CliRunner().invoke(main, args[:-2] + ["--router-kd-samples", "2,2", "-o", str(tmp_path / "out2")])
    assert bad.exit_code != 0 and "distinct counts" in bad.output


def test_the_average_of_the_candidates_is_scored_and_kept_when_lowest(code_file):
    from moeprune.recover.choose import run_kd_choice
    from moeprune.recover.config import RouterKDConfig
    from moeprune.recover.router_kd import cache_kl

    with pytest.raises(ValueError, match="give samples as a list"):
        RouterKDConfig(steps=1, samples=64, average=True)
    model, choice, alone = _compressed_with_trained_candidates(code_file, average=True)
    soup = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in soup.named_parameters():
            if name in alone[0]:
                param.copy_((alone[0][name] + alone[1][name]) / 2)
    soup_kl = cache_kl(soup, choice.validation)
    report = run_kd_choice(model, choice, progress=False)
    rows = report["choice"]["candidates"]
    assert [row["samples"] for row in rows] == [8, 2, "mean of [8, 2]"]
    assert rows[2]["kl"] == pytest.approx(soup_kl, rel=1e-6)
    kls = [row["kl"] for row in rows]
    winner = kls.index(min(kls))
    expected = _routers(soup) if winner == 2 else alone[winner]
    routers = _routers(model)
    assert all(torch.allclose(routers[k], v, rtol=0, atol=1e-7) for k, v in expected.items())
    assert report["choice"]["selected"]["samples"] == rows[winner]["samples"]
