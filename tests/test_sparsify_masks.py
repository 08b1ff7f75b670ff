"""Pure math of intra-expert sparsity: masks, Wanda / MoE-Pruner scores, SparseGPT, OWL, budgets."""

from __future__ import annotations

import pytest
import torch

from moeprune.sparsify.budget import BudgetError, intra_sparsity_for_total, total_sparsity
from moeprune.sparsify.masks import make_mask, nm_mask, parse_nm, unstructured_mask, wanda_scores
from moeprune.sparsify.owl import owl_layer_sparsity
from moeprune.sparsify.prune_layer import prune_matrix
from moeprune.sparsify.sparsegpt import sparsegpt_prune


def test_wanda_mask_matches_hand_computation():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.1, 3.0, -2.0, 8.0]])
    sq = torch.tensor([16.0, 1.0, 4.0, 0.0625])  # column norms 4, 1, 2, 0.25
    # row 0 scores 4, 2, 6, 1 -> drop cols 3, 1; row 1 scores 0.4, 3, 4, 2 -> drop cols 0, 3
    mask = unstructured_mask(wanda_scores(w, sq), 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, True, True, False]]
    # magnitude alone would keep the two largest |W| per row: a different mask
    assert unstructured_mask(w.abs(), 0.5).tolist() == [[False, False, True, True], [False, True, False, True]]


def test_moe_pruner_mask_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    g = torch.tensor([0.1, 1.0, 1.0])
    w = torch.tensor([[4.0, 3.0, 2.0, 1.2]])
    plain = (x * x).sum(0)  # 1, 1, 1, 4 -> scores 4, 3, 2, 2.4
    weighted = ((g.unsqueeze(1) * x) ** 2).sum(0)  # 0.01, 1, 1, 0.04 -> scores 0.4, 3, 2, 0.24
    assert torch.allclose(weighted, torch.tensor([0.01, 1.0, 1.0, 0.04]))
    assert unstructured_mask(wanda_scores(w, plain), 0.5).tolist() == [[True, True, False, False]]
    assert unstructured_mask(wanda_scores(w, weighted), 0.5).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_unstructured_exact_per_row(sparsity):
    scores = torch.rand(13, 40, generator=torch.Generator().manual_seed(0))
    mask = unstructured_mask(scores, sparsity)
    assert ((~mask).sum(1) == round(sparsity * 40)).all()
    # the pruned weights are the lowest of their row
    for row, m in zip(scores, mask):
        assert row[~m].max() <= row[m].min()


def test_nm_exact_per_group():
    scores = torch.rand(6, 24, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(6, 6, 4).sum(2) == 2).all()
    groups, kept = scores.reshape(6, 6, 4), mask.reshape(6, 6, 4)
    # every kept score is at least every dropped score of its group
    assert (groups.masked_fill(~kept, 2).amin(2) >= groups.masked_fill(kept, -1).amax(2)).all()
    assert parse_nm("2:4") == (2, 4)
    with pytest.raises(ValueError):
        parse_nm("4:2")
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 6), 2, 4)


def _layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(64, generator=gen) * 0.8)  # uneven input channels, like LLM activations
    mix = torch.eye(64) + torch.randn(64, 64, generator=gen) / 8  # correlated channels
    x = (torch.randn(512, 64, generator=gen) @ mix) * scales
    w = torch.randn(24, 64, generator=gen) * 0.1
    return w, x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_error_order(nm, seed):
    w, x = _layer(seed)
    sq, hess = (x * x).sum(0), x.T @ x
    ref = x @ w.T

    def err(pruned):
        return float(((x @ pruned.T - ref) ** 2).sum())

    mag = w * make_mask(w.abs(), 0.5, nm)
    wanda = w * make_mask(wanda_scores(w, sq), 0.5, nm)
    sgpt = sparsegpt_prune(w, hess, 0.5, nm=nm)
    assert err(sgpt) <= err(wanda) <= err(mag)
    if nm is None:
        assert ((sgpt == 0).sum(1) == 32).all()  # exact per row, also for SparseGPT
    else:
        assert ((sgpt.reshape(24, 16, 4) != 0).sum(2) <= 2).all()


def test_sparsegpt_without_pruning_is_identity_and_prune_matrix_dispatch():
    w, x = _layer(2)
    out = sparsegpt_prune(w, x.T @ x, 0.0)
    assert torch.allclose(out, w)
    assert torch.equal(prune_matrix(w, "wanda", 0.0, (x * x).sum(0)), w)
    with pytest.raises(ValueError):
        prune_matrix(w, "nope", 0.5, (x * x).sum(0))


def test_owl_layer_sparsity_hand_values():
    result = owl_layer_sparsity({0: 0.1, 1: 0.3, 2: 0.2}, 0.5, 0.08)
    # normalised ratios 0, 0.16, 0.08 (mean 0.08): more outliers -> less pruning, mean = target
    assert result == pytest.approx({0: 0.58, 1: 0.42, 2: 0.5})
    assert owl_layer_sparsity({0: 0.2, 1: 0.2}, 0.5) == {0: 0.5, 1: 0.5}


def test_total_budget():
    assert intra_sparsity_for_total(0.625, 0.25) == pytest.approx(0.5)
    assert total_sparsity(0.5, 0.25) == pytest.approx(0.625)
    assert intra_sparsity_for_total(0.3, 0.0) == pytest.approx(0.3)
    with pytest.raises(BudgetError):
        intra_sparsity_for_total(0.2, 0.25)  # the plan alone already removes more
