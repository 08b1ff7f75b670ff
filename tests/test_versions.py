"""moeprune warns about transformers releases outside the tested range, which is pyproject.toml's pin."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.specifiers import SpecifierSet

from moeprune.adapters.versions import TESTED_TRANSFORMERS, untested_transformers


def test_the_tested_range_is_the_pinned_one():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pinned = re.search(r'"transformers([^"]+)"', pyproject).group(1)
    assert SpecifierSet(pinned) == SpecifierSet(TESTED_TRANSFORMERS)


def test_releases_outside_it_are_named_in_one_line():
    assert untested_transformers("5.24.0") is None and untested_transformers("5.25.1") is None
    assert untested_transformers("5.25.0.dev0") is None  # a pre-release of a tested line
    for version in ("5.26.0", "5.23.2", "6.0.0"):
        reason = untested_transformers(version)
        assert reason is not None and version in reason and "\n" not in reason and "survey_families" in reason


def test_the_warning_is_logged_once(monkeypatch, caplog):
    import moeprune.adapters.versions as versions

    monkeypatch.setattr(versions, "_warned", False)
    with caplog.at_level("WARNING", logger="moeprune.adapters.versions"):
        assert versions.warn_if_untested("5.26.0")
        assert not versions.warn_if_untested("5.26.0")  # once per process
    assert [r.getMessage() for r in caplog.records] == [untested_transformers("5.26.0")]
    monkeypatch.setattr(versions, "_warned", False)
    assert not versions.warn_if_untested()  # the installed release is a tested one
