"""A seeded sample of calibration tokens per MoE layer, with what NAEE needs to score expert subsets.

NAEE (algorithms.md section 3) keeps the expert subset S minimising ||Y - Y_S||_F, Y_S being the MoE
output with dropped experts' logits at -inf. That is not reducible to per-expert sums, but on a
token sample it is a function of, per token x:

- the router logits l(x) [E] (to redo the top-k among the survivors and renormalise),
- the model's own gates g(x) [E] (zero outside the selected set: Y(x) = sum_j g_j f_j(x)),
- the Gram matrix of every expert's output on x, G(x)_ij = <f_i(x), f_j(x)> [E, E],

because ||Y(x) - Y_S(x)||^2 = d^T G(x) d with d = g(x) - g_S(x) (shared experts cancel). Storing G
instead of the E outputs costs E^2 floats per token instead of E x hidden.

The sample is a reservoir over the whole calibration run: every valid token gets a uniform key from
a generator seeded with (seed, batch number), identical across layers, and each layer keeps the
`size` tokens with the smallest keys; only tokens that enter the reservoir run through all experts
(about size x (1 + ln(N / size)) expert evaluations per layer, not N). Hooks: a forward hook on the
router (logits) and a forward pre-hook on the experts module (its inputs: hidden states, selected
indices, gates), so this runs next to the `Observer`'s own patch and in the streamed layer loop.

Fields added to each layer's statistics (float64, rows sorted by key): `sample_keys` [n],
`sample_logits` [n, E], `sample_gates` [n, E], `sample_gram` [n, E, E]. Merging statistics keeps
the smallest keys of the union (`LayerStats.merge_`); distributed ranks draw the same key sequence,
so a merged sample is a fair subset of the union but not a uniform sample of it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moeprune.adapters import MoELayer
from moeprune.calibration.capture import run_experts
from moeprune.calibration.stats import SAMPLE_FIELDS, LayerStats


def empty_sample(num_experts: int) -> dict[str, torch.Tensor]:
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    e = num_experts
    return {"sample_keys": z(0), "sample_logits": z(0, e), "sample_gates": z(0, e), "sample_gram": z(0, e, e)}


def keep_smallest(tensors: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The `size` rows with the smallest keys, sorted by key (a reservoir of the union)."""
    keys = tensors["sample_keys"]
    order = torch.argsort(keys, stable=True)[:size]
    return {name: tensors[name][order] for name in SAMPLE_FIELDS}


def expert_gram(experts: nn.Module, hidden: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, E, E] Gram matrices of every expert's (un-gated) output on each row of `hidden` [n, H]."""
    n = hidden.shape[0]
    ids = torch.arange(num_experts, device=hidden.device).repeat_interleave(n)
    _, out = run_experts(experts, hidden.repeat(num_experts, 1), ids)
    f = out.double().view(num_experts, n, -1).transpose(0, 1)  # [n, E, H]
    return (f @ f.transpose(1, 2)).cpu()


class TokenSampler:
    """Context manager filling `stats[layer].tensors` with a token sample of `size` rows per layer."""

    def __init__(self, layers: list[MoELayer], stats: dict[int, LayerStats], size: int, seed: int,
                 valid: Callable[[int, torch.device], torch.Tensor]) -> None:
        self.layers = layers
        self.stats = stats
        self.size = int(size)
        self.seed = int(seed)
        self.valid = valid
        self._logits: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> "TokenSampler":
        for layer in self.layers:
            self.stats[layer.layer].tensors.update(empty_sample(layer.num_experts))
            self._calls[layer.layer] = 0
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _router_hook(self, layer: MoELayer):
        index = layer.routing.logits_index

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            logits = output[index] if isinstance(output, (tuple, list)) else output
            logits = logits.detach().reshape(-1, logits.shape[-1])
            if layer.routing.identity_experts:  # LongCat: the real experts' columns (identity ones after them)
                logits = logits[:, : layer.num_experts]
            self._logits[layer.layer] = logits
            return None

        return hook

    def _experts_hook(self, layer: MoELayer):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = list(args) + [kwargs[n] for n in names[len(args):]]
            hidden, index, weights = values[:3]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            tokens = hidden.shape[0]
            self._add(layer, hidden, index.reshape(tokens, -1), weights.reshape(tokens, -1))
            return None

        return hook

    @torch.no_grad()
    def _add(self, layer: MoELayer, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        call = self._calls[layer.layer]
        self._calls[layer.layer] = call + 1
        logits = self._logits.pop(layer.layer, None)
        if logits is None or logits.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"layer {layer.layer}: token sample saw no router logits for this batch")
        valid = self.valid(hidden.shape[0], hidden.device).cpu()
        rows = torch.nonzero(valid).reshape(-1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + call)
        keys = torch.rand(rows.numel(), generator=generator, dtype=torch.float64)
        t = self.stats[layer.layer].tensors
        if t["sample_keys"].numel() >= self.size:
            below = keys < t["sample_keys"].max()
            rows, keys = rows[below], keys[below]
        if rows.numel() > self.size:
            best = torch.argsort(keys, stable=True)[: self.size]
            rows, keys = rows[best], keys[best]
        if rows.numel() == 0:
            return
        dev_rows = rows.to(hidden.device)
        gates = torch.zeros(rows.numel(), layer.num_experts, dtype=torch.float64)
        picks, picked = index[dev_rows].long().cpu(), weights[dev_rows].double().cpu()
        identity = picks >= layer.num_experts  # LongCat's identity picks: no real expert's gate
        gates.scatter_add_(1, picks.masked_fill(identity, 0), picked.masked_fill(identity, 0))
        new = {
            "sample_keys": keys,
            "sample_logits": logits[dev_rows].double().cpu(),
            "sample_gates": gates,
            "sample_gram": expert_gram(layer.experts, hidden[dev_rows].detach(), layer.num_experts),
        }
        joined = {name: torch.cat([t[name], new[name]]) for name in SAMPLE_FIELDS}
        t.update(keep_smallest(joined, self.size))
