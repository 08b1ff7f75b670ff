"""The transformers releases moeprune is tested on, and a warning outside them.

moeprune reaches into transformers' modeling code (experts layouts, routers, shims for undecorated
families), and a release can change it without any error: 5.25 moved LongCat-Flash's identity
experts into the block, and the old shim then produced garbage. `pyproject.toml` pins the releases
the family survey passes on; an install that bypasses the pin (`--no-deps`, a newer release
installed afterwards) gets one warning at the first discovery.
"""

from __future__ import annotations

import logging

from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ">=5.24,<5.26"  # the same range as pyproject.toml's (tests/test_versions.py)
_warned = False


def untested_transformers(version: str) -> str | None:
    """Why transformers `version` is not one moeprune was tested on, or None when it is."""
    if Version(Version(version).base_version) in SpecifierSet(TESTED_TRANSFORMERS):  # 5.25.0.dev0 -> 5.25.0
        return None
    return (f"transformers {version} is outside the releases moeprune is tested on ({TESTED_TRANSFORMERS}): its modeling "
            "code may have changed under moeprune; check with `python scripts/survey_families.py` before trusting outputs")


def warn_if_untested(version: str | None = None) -> bool:
    """Log `untested_transformers` for the installed transformers (or `version`), once per process;
    True when this call warned."""
    global _warned
    if _warned:
        return False
    _warned = True
    if version is None:
        from importlib.metadata import version as installed

        version = installed("transformers")
    reason = untested_transformers(version)
    if reason is not None:
        logger.warning(reason)
    return reason is not None
