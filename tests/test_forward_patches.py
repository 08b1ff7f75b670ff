"""`adapters.forward_patches`: one owner per patch, undone in order, restoring exactly what was
replaced; permanent installs replace their own earlier install and wrap the others'."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moeprune.adapters.forward_patches import current_forward, install_forward, patch_forward, patch_owners


def test_patches_stack_and_undo_exactly():
    module = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    stock = module(x)
    undo_a = patch_forward(module, lambda x: x * 0, "a")
    undo_b = patch_forward(module, lambda x: x + 1, "b")
    assert patch_owners(module) == ["a", "b"] and torch.equal(module(x), x + 1)
    with pytest.raises(RuntimeError, match="already patched by a"):
        patch_forward(module, lambda x: x, "a")
    with pytest.raises(RuntimeError, match="out of order"):
        undo_a()
    undo_b()
    assert torch.equal(module(x), x * 0)
    undo_a()
    assert current_forward(module) is None and patch_owners(module) == [] and torch.equal(module(x), stock)


def test_a_permanent_install_is_replaced_not_stacked_and_survives_temporary_patches():
    module = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    install_forward(module, lambda inner: (lambda x: x * 2), "novices")
    install_forward(module, lambda inner: (lambda x: inner(x) + 1), "skip")
    install_forward(module, lambda inner: (lambda x: inner(x) + 10), "skip")  # again: replaces, wraps novices
    assert patch_owners(module) == ["novices", "skip"] and torch.equal(module(x), x * 2 + 10)
    undo = patch_forward(module, lambda x: x * 0, "calibration")
    undo()
    assert torch.equal(module(x), x * 2 + 10)  # the calibration undo kept the others' wrappers
    clone = copy.deepcopy(module)
    assert patch_owners(clone) == ["novices", "skip"] and torch.equal(clone(x), x * 2 + 10)
