"""The strategy registry: explicit imports, parameters checked against signatures, declared needs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from moeprune.config import load_recipe
from moeprune.plan import PlanError
from moeprune.strategies import available_strategies, get_strategy, register_strategy
from moeprune.strategies import registry


def test_builtin_strategies_are_registered_on_import():
    # Importing the package registers everything (no lazy loading hiding import errors).
    assert {"frequency", "soft-frequency", "ean", "reap", "hc-smoe", "m-smoe", "stun", "mone", "dern"} <= set(
        registry._REGISTRY
    )
    assert available_strategies() == sorted(registry._REGISTRY)


def test_declared_needs():
    assert get_strategy("stun").needs_weights and not get_strategy("stun").in_memory_only  # weights streamed
    assert not get_strategy("mone").in_memory_only and not get_strategy("mone").needs_weights
    assert get_strategy("hc-smoe").dense_tokens > 0
    assert all(get_strategy(s).needs_calibration for s in ("reap", "frequency", "hc-smoe", "mone", "dern"))
    assert not get_strategy("reap").in_memory_only
    memory_only = registry.StrategySpec("x", lambda stats, ratio: None, "test", in_memory_only=True)
    with pytest.raises(PlanError, match="'x' needs the model in memory"):
        memory_only.check_streamable()
    get_strategy("reap").check_streamable()


def test_parameters_come_from_the_signature():
    assert list(get_strategy("reap").parameters) == ["budget", "protect_super", "gate"]
    assert list(get_strategy("dern").parameters) == ["budget", "protect_super", "threshold"]
    assert "model" not in get_strategy("stun").parameters


def test_bad_param_names_the_key_and_accepted_ones():
    with pytest.raises(PlanError) as err:
        get_strategy("reap").check_params({"gate": "model", "tresh": 0.3})
    assert str(err.value) == "strategy 'reap' has no parameter 'tresh'; accepted: budget, protect_super, gate"
    with pytest.raises(PlanError, match="no parameter 'model'"):
        get_strategy("stun").check_params({"model": None})


def test_recipe_params_are_checked_when_read(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: dern\nparams:\n  treshold: 0.5\n")
    with pytest.raises(ValidationError, match="strategy 'dern' has no parameter 'treshold'; accepted: budget, protect_super, threshold"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text("strategy: dern\nbudget: global\nparams:\n  threshold: 0.5\n")
    assert load_recipe(good).strategy_params() == {"budget": "global", "threshold": 0.5}


def test_registration_validates_defaults_and_names():
    with pytest.raises(ValueError, match="no parameter 'alpha'"):
        register_strategy("test-bad-defaults", "x", alpha=1.0)(lambda stats, ratio, beta=1.0: None)
    with pytest.raises(ValueError, match="takes no `model`"):
        register_strategy("test-no-model", "x", needs_weights=True)(lambda stats, ratio: None)
    with pytest.raises(ValueError, match="registered twice"):
        register_strategy("reap", "again")(lambda stats, ratio: None)
    assert "test-bad-defaults" not in registry._REGISTRY and "test-no-model" not in registry._REGISTRY


def test_strategy_without_budget_gets_no_budget_key():
    def fixed(stats, ratio, keep_first: bool = True):
        return None

    spec = registry.StrategySpec("fixed", fixed, "test")
    assert spec.common_params("layer", None) == {}
    with pytest.raises(PlanError, match="no global budget"):
        spec.common_params("global", None)
    with pytest.raises(PlanError, match="no parameter 'protect_super'; accepted: keep_first"):
        spec.common_params("layer", True)


def test_cli_plan_refuses_before_loading(tmp_path):
    from moeprune.cli import main

    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"")  # never read: the strategy check comes first
    result = CliRunner().invoke(main, ["plan", str(stats), "--strategy", "stun", "-o", str(tmp_path / "p.json")])
    assert result.exit_code != 0 and "pass --model CHECKPOINT" in result.output


def test_import_errors_are_not_swallowed():
    import ast
    import inspect as _inspect

    tree = ast.parse(_inspect.getsource(registry))
    handlers = [h for node in ast.walk(tree) if isinstance(node, ast.Try) for h in node.handlers]
    assert not any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in handlers)
