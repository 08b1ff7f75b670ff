"""The second, sequential calibration pass on the (expert-compressed) model.

Dropping or merging experts changes routing, so intra-expert pruning statistics are collected again
on the compressed model, layer by layer (the "catcher" loop of Wanda/SparseGPT):

1. one forward with every decoder layer's `forward` replaced by the identity records each layer's
   call arguments (masks, position embeddings differ per layer type, e.g. gpt-oss) and the first
   layer's input hidden states for every calibration batch;
2. for each decoder layer: run it over all cached batches with collectors installed (the caller
   prunes it from what they saw), then run it again and feed its already-pruned outputs onward.

Both steps are `moeprune.engine.runner`'s (`capture_calls`, `LayerRunner`), the loop the streamed
paths use too; here every layer is already resident.

Expert statistics come from ROUTED tokens only, through `capture.patch_forward`: gate/up inputs are
the hidden rows of the tokens routed to an expert, down inputs its activations a. Per expert and
linear: sum x^2 per input channel (Wanda), sum g^2 x^2 (MoE-Pruner), and optionally the Hessian
sum x x^T (SparseGPT). Plain linears (shared experts, attention) use forward pre-hooks on all tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.calibration.capture import patch_forward
from moeprune.engine.runner import LayerRunner, ListStore, as_batches, capture_calls, decoder_layers

logger = logging.getLogger(__name__)


@dataclass
class ExpertInputStats:
    """Routed-token input statistics of one experts module (float64, on CPU)."""

    count: torch.Tensor  # [E] routed (token, slot) pairs
    gu_sq: torch.Tensor  # [E, H] sum x^2 of gate/up inputs
    gu_gsq: torch.Tensor  # [E, H] sum g^2 x^2
    dn_sq: torch.Tensor  # [E, I] sum a^2 of down inputs
    dn_gsq: torch.Tensor  # [E, I] sum g^2 a^2
    gu_hess: torch.Tensor | None = None  # [E, H, H] sum x x^T
    dn_hess: torch.Tensor | None = None  # [E, I, I] sum a a^T

    @classmethod
    def zeros(cls, experts: int, hidden: int, inter: int, hessian: bool) -> "ExpertInputStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(
            z(experts), z(experts, hidden), z(experts, hidden), z(experts, inter), z(experts, inter),
            z(experts, hidden, hidden) if hessian else None, z(experts, inter, inter) if hessian else None,
        )

    def sq(self, linear: str, router_weighted: bool = False) -> torch.Tensor:
        """[E, in] channel statistic of `linear` ("gate"/"up"/"down")."""
        if linear == "down":
            return self.dn_gsq if router_weighted else self.dn_sq
        return self.gu_gsq if router_weighted else self.gu_sq

    def hessian(self, linear: str) -> torch.Tensor | None:
        return self.dn_hess if linear == "down" else self.gu_hess


@dataclass
class LinearInputStats:
    """All-token input statistics of one plain nn.Linear."""

    sq: torch.Tensor
    hess: torch.Tensor | None
    tokens: int = 0


@dataclass
class LayerCollector:
    """Installs statistic collectors on one decoder layer while it runs."""

    moe: MoELayer | None
    plain: dict[str, nn.Linear]
    hessian: bool = False
    experts: ExpertInputStats | None = None
    linears: dict[str, LinearInputStats] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def __enter__(self) -> "LayerCollector":
        if self.moe is not None:
            layout = self.moe.layout
            self.experts = ExpertInputStats.zeros(layout.num_experts, layout.hidden_dim, layout.intermediate_dim, self.hessian)
            self._undo.append(patch_forward(self.moe.experts, self._sink, owner="sparsify"))
        for name, linear in self.plain.items():
            n_in = linear.in_features
            stats = LinearInputStats(
                torch.zeros(n_in, dtype=torch.float64),
                torch.zeros(n_in, n_in, dtype=torch.float64) if self.hessian else None,
            )
            self.linears[name] = stats
            self._undo.append(linear.register_forward_pre_hook(self._linear_hook(stats)).remove)
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()

    def _sink(self, expert_ids, token_ids, gates, act, out, top_k_index, hidden) -> None:
        s = self.experts
        ids = expert_ids.cpu()
        x = hidden[token_ids].detach().double().cpu()
        a = act.detach().double().cpu()
        g2 = (gates.detach().double().cpu() ** 2).unsqueeze(1)
        counts = torch.bincount(ids, minlength=s.count.numel())
        s.count += counts.double()
        s.gu_sq.index_add_(0, ids, x * x)
        s.gu_gsq.index_add_(0, ids, g2 * x * x)
        s.dn_sq.index_add_(0, ids, a * a)
        s.dn_gsq.index_add_(0, ids, g2 * a * a)
        if self.hessian:
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    xe, ae = x[start : start + n], a[start : start + n]
                    s.gu_hess[e] += xe.T @ xe
                    s.dn_hess[e] += ae.T @ ae
                start += n

    def _linear_hook(self, stats: LinearInputStats):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            stats.sq += (x * x).sum(0)
            if stats.hess is not None:
                stats.hess += x.T @ x
            stats.tokens += x.shape[0]
            return None

        return hook


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    ids: torch.Tensor,
    visit: Callable[[int, nn.Module, Callable[[], None]], None],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "sparsify",
) -> None:
    """Call `visit(index, decoder_layer, run_all)` for every decoder layer in order (`LayerRunner`).

    `run_all()` runs the layer over every cached calibration batch (with whatever collectors the
    visitor installed); after `visit` returns, the layer's outputs (as the visitor left the layer,
    i.e. pruned) become the next layer's inputs.
    """
    device = next(model.parameters()).device
    batches = as_batches(ids, batch_size)
    _, layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    hidden, calls = [], []
    for batch in batches:
        first, batch_calls = capture_calls(model, layers, batch, device)
        hidden.append(first)
        calls.append(batch_calls)
    LayerRunner(layers, calls, device).run(ListStore(hidden), visit, progress=progress, desc=desc)
    model.train(was_training)


def plain_linears(model: nn.Module, index: int, moe: MoELayer | None, shared: bool, attention: bool) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear of decoder layer `index` to prune as ordinary linears."""
    list_name, layers = decoder_layers(model)
    prefix = f"{list_name}.{index}"
    result: dict[str, nn.Linear] = {}
    if shared and moe is not None:
        for module in moe.shared:
            for name, sub in model.named_modules():
                if sub is module:
                    for child, linear in module.named_modules():
                        if isinstance(linear, nn.Linear):
                            result[f"{name}.{child}"] = linear
    if attention:
        for name, sub in layers[index].named_modules():
            if isinstance(sub, nn.Linear) and "attn" in name.split(".")[0]:
                result[f"{prefix}.{name}"] = sub
    return result


def moe_by_decoder_index(model: nn.Module) -> dict[int, MoELayer]:
    list_name, layers = decoder_layers(model)
    result: dict[int, MoELayer] = {}
    for moe in find_moe_layers(model):
        for index in range(len(layers)):
            if moe.block_name == f"{list_name}.{index}" or moe.block_name.startswith(f"{list_name}.{index}."):
                result[index] = moe
    return result
