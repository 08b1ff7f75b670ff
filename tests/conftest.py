"""Shared fixtures: tiny models of every family, built locally."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from moeprune.testing.tiny_models import FAMILY_CONFIGS  # noqa: E402

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
