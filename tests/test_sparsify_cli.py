"""`moeprune prune ... --sparsify wanda --sparsity 0.5` end to end on a tiny checkpoint, and reload."""

from __future__ import annotations

import json
import random

from click.testing import CliRunner

from moeprune.cli import main
from moeprune.io.checkpoint import load_pruned
from moeprune.sparsify.expert_weights import read_expert_linears
from moeprune.adapters import find_moe_layers
from moeprune.sparsity_report import measured_sparsity
from moeprune.testing.tiny_models import save_tiny_checkpoint


def test_prune_with_wanda_end_to_end(tmp_path):
    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "moe"]
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(20))
    (tmp_path / "cal.txt").write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "prune", str(ckpt), "--strategy", "reap", "--ratio", "0.25", "--sparsify", "wanda", "--sparsity", "0.5",
        "--output", str(out), "--calibration", str(tmp_path / "cal.txt"), "--samples", "4", "--seq-len", "32",
    ])
    assert result.exit_code == 0, result.output
    assert "intra-expert wanda" in result.output

    done = json.loads((out / "moeprune_plan.json").read_text())["params"]["sparsity"]
    assert done["method"] == "wanda" and done["removed_share"] == 0.25
    model = load_pruned(out)
    protected = {int(k): v for k, v in done["protected_super"].items()}
    for moe in find_moe_layers(model):
        assert moe.num_experts == 6
        for name, w in read_expert_linears(moe.experts).items():
            for e in range(moe.num_experts):
                zeros = (w[e] == 0).sum(-1)
                want = 0 if e in protected.get(moe.layer, []) else round(0.5 * w.shape[-1])
                assert (zeros == want).all(), (moe.layer, name, e)
    measured = measured_sparsity(model)
    assert measured["routed_experts"] == done["expert_sparsity"]
    assert measured["tensors"] == done["tensors"]

    shown = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["expert_sparsity"]["routed_experts"] == measured["routed_experts"]


def test_recipes_parse_and_reject_bad_combinations(tmp_path):
    from pathlib import Path

    import pytest
    from pydantic import ValidationError

    from moeprune.config import load_recipe

    recipes = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    parsed = [load_recipe(p) for p in recipes]
    assert any(r.sparsify is not None and r.sparsify.method == "wanda" and r.ratio == 0.25 for r in parsed)
    with pytest.raises(ValidationError):
        load_recipe(None, {"sparsify.nm": "2:4", "sparsify.owl": True})
    with pytest.raises(ValidationError):
        load_recipe(None, {"sparsify.method": "obs"})


def test_expert_removal_plus_sparsity_reaches_the_same_total_as_sparsity_alone(tmp_path):
    # the benchmark's comparison rows, through the one pipeline: 25% of experts + 50% inside the
    # survivors vs 62.5% unstructured alone; the model handed in is a copy, the original untouched
    import copy

    import pytest
    import torch

    import moeprune
    from moeprune.config import load_recipe
    from moeprune.io.loading import load_model
    from moeprune.testing.tiny_models import save_tiny_checkpoint

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    model, tokenizer, _ = load_model(str(path))
    before = [p.clone() for p in model.parameters()]

    def variant(ratio, **sparsify):
        recipe = load_recipe(None, {"model": str(path), "strategy": "frequency", "ratio": ratio, "calibration.samples": 4,
                                    "calibration.seq_len": 32, "sparsify": {"method": "wanda", "protect_super": False, **sparsify}})
        result = moeprune.prune(recipe, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
        return result.model, result.plan.params["sparsity"]

    mixed, r1 = variant(0.25, sparsity=0.5)
    flat, r2 = variant(0.0, total_sparsity=0.625)
    assert r1["total_sparsity"] == pytest.approx(0.625) and r2["total_sparsity"] == pytest.approx(0.625)
    assert r2["removed_share"] == 0.0 and find_moe_layers(flat)[0].num_experts == 8
    assert find_moe_layers(mixed)[0].num_experts == 6
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
