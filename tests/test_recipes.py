"""Every shipped recipe validates, and bad recipes fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from moeprune.config import load_recipe

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert 0 <= recipe.ratio < 1 and recipe.strategy


def test_overrides_and_errors(tmp_path):
    recipe = load_recipe(CONFIGS[0], {"ratio": 0.25, "calibration.samples": 8, "strategy": None})
    assert recipe.ratio == 0.25 and recipe.calibration.samples == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: reap\ncalibration:\n  samples: 0\n")
    with pytest.raises(ValidationError, match="samples"):
        load_recipe(bad)
    bad.write_text("strategy: magic\n")
    with pytest.raises(ValidationError, match="unknown strategy"):
        load_recipe(bad)
