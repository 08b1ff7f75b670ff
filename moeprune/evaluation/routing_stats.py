"""Routing statistics used to describe a model: selection frequencies, entropy, domain shift.

This is deliberately small and read-only (a forward hook on each router that counts top-k picks):
enough for model cards, plots and sanity tests. The full calibration statistics used by pruning
strategies live in ``moeprune.calibration``.
"""

from __future__ import annotations

import torch
from torch import nn

from moeprune.evaluation.perplexity import iter_windows
from moeprune.evaluation.routing_mask import find_routers


@torch.no_grad()
def routing_frequencies(model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> torch.Tensor:
    """Share of top-k selections per expert, shape ``[layers, experts]`` (rows sum to 1)."""
    routers = find_routers(model)
    if not routers:
        raise ValueError("no supported routers found in the model")
    layers = sorted(routers)
    counts = {i: torch.zeros(routers[i].weight.shape[0], dtype=torch.float64) for i in layers}
    handles = []

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            index = output[2].reshape(-1).cpu()
            counts[layer] += torch.bincount(index, minlength=counts[layer].numel()).double()

        return hook

    for layer in layers:
        handles.append(routers[layer].register_forward_hook(make_hook(layer)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in iter_windows(ids, seq_len, batch_size):
            model(input_ids=batch.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    freq = torch.stack([counts[i] for i in layers])
    return freq / freq.sum(dim=1, keepdim=True).clamp_min(1e-12)


def routing_entropy(freq: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a ``[layers, experts]`` frequency table (max log2 E)."""
    p = freq / freq.sum(dim=-1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=-1)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row total variation distance ½·Σ|a - b| between two frequency tables."""
    return 0.5 * (a - b).abs().sum(dim=-1)


def experts_by_frequency(freq: torch.Tensor, fraction: float, highest: bool) -> dict[int, list[int]]:
    """Per layer, the ``round(fraction·E)`` most (``highest``) or least used experts."""
    n_drop = round(fraction * freq.shape[1])
    order = torch.argsort(freq, dim=1, descending=highest, stable=True)
    return {layer: sorted(order[layer, :n_drop].tolist()) for layer in range(freq.shape[0])}
