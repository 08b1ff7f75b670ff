"""Channel slimming and PreMoE task patterns through the CLI, recipes and `moeprune.api.prune`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import moeprune
from moeprune.adapters import find_moe_layers
from moeprune.cli import main
from moeprune.config import PruneRecipe
from moeprune.io.checkpoint import load_pruned
from moeprune.testing.tiny_models import save_tiny_checkpoint

CODE = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}" for i in range(60))
PROSE = "\n\n".join(f"The river ran past the old mill, and the town of {i} slept under the hills." for i in range(60))
CAL = ("--samples", 4, "--seq-len", 32)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("slim")
    save_tiny_checkpoint("qwen3_moe", root / "model")
    (root / "code.txt").write_text(CODE)
    (root / "prose.txt").write_text(PROSE)
    return root


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_reap_plus_uniform_slim_is_stock_loadable(workspace):
    out = workspace / "reap25-slim"
    result = _run("prune", workspace / "model", "--strategy", "reap", "--ratio", 0.25, "--slim-channels", 1 / 3,
                  "--calibration", workspace / "code.txt", *CAL, "-o", out)
    assert result.exit_code == 0, result.output
    assert "channel slimming camera/uniform" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 16 and config["num_experts"] == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert find_moe_layers(model)[0].layout.intermediate_dim == 16


def test_api_slim_expert_mode_with_sparsify_reloads(workspace, tmp_path):
    recipe = PruneRecipe(model=str(workspace / "model"), strategy="reap", ratio=0.25, output=str(tmp_path / "o"),
                         calibration={"source": str(workspace / "code.txt"), "samples": 4, "seq_len": 32},
                         slim={"ratio": 0.5, "method": "camera", "mode": "expert"},
                         sparsify={"method": "magnitude", "sparsity": 0.5})
    result = moeprune.prune(recipe, progress=False)
    assert result.plan.params["slim"]["removed_share"] == pytest.approx(0.5, abs=0.02)
    assert "sparsity" in result.plan.params
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    loaded = load_pruned(result.output, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model.float()(ids).logits)


def test_cli_patterns_then_query_prunes_to_nearest_task(workspace):
    pats = workspace / "patterns.json"
    result = _run("patterns", workspace / "model", "--task", f"code={workspace / 'code.txt'}",
                  "--task", f"prose={workspace / 'prose.txt'}", *CAL, "-o", pats)
    assert result.exit_code == 0, result.output
    data = json.loads(pats.read_text())
    assert set(data["tasks"]) == {"code", "prose"} and len(data["tasks"]["code"]["key"]) == 8
    query = workspace / "q.txt"
    query.write_text(CODE[:400])
    out = workspace / "by-query"
    result = _run("prune", workspace / "model", "--patterns", pats, "--query", f"@{query}", "--ratio", 0.5, "-o", out)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "moeprune_plan.json").read_text())
    task = plan["params"]["task"]
    assert f"matched task {task!r}" in result.output
    for i, lp in plan["layers"].items():
        assert lp["kept"] == sorted(data["tasks"][task]["ranking"][i][:4])


def test_patterns_need_a_query():
    with pytest.raises(ValueError, match="patterns and query go together"):
        PruneRecipe(patterns="p.json")
