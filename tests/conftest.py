"""Shared fixtures: tiny models of every family, built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from moeprune.testing.tiny_models import FAMILY_CONFIGS  # noqa: E402

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def code_file(tmp_path_factory) -> str:
    """A small local .txt corpus of fixed standard-library sources (blank lines separate documents)."""
    import argparse
    import difflib
    import json
    import textwrap

    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    sources = sorted(Path(json.__file__).parent.glob("*.py")) + [Path(m.__file__) for m in (textwrap, difflib, argparse)]
    path.write_text("\n\n".join(f.read_text() for f in sources))
    return str(path)
