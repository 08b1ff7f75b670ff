"""One layer runner for every layer-by-layer path (streamed calibration, sparsify, streamed prune).

Several passes need the same thing: take every calibration batch through the decoder layers one
layer at a time, with something attached to the layer while the batches go through it. This module
is that loop, once:

1. `capture_calls` runs the model once per batch with every decoder layer's `forward` replaced by a
   recorder: it keeps the first layer's input hidden states and each layer's other call arguments
   (rotary embeddings, position ids, the mask of its layer type), so nothing is re-derived by hand.
   The last recorder stops the forward, so the final norm and head are never needed.
2. `LayerRunner.run` visits the layers in order. For each: `load(index)` makes it resident (nothing
   for an in-memory model; streamed paths materialise it from the shards and may edit it, e.g.
   apply the expert plan); `visit(index, layer, run_all)` lets the run attach its passes and call
   `run_all()` (every cached batch through the layer, outputs dropped: sparsify collectors, then
   "prune this layer"); then all batches go through the layer once more with whatever hooks are
   installed (observer statistics fire here) and its outputs become the next layer's inputs;
   `release(index)` frees it (streamed: write it, send it back to meta).

The in-memory model is the special case where every layer is already resident. Hidden states live
in a store with `put(b, t)` / `get(b)` (`ListStore` here; `engine.activations.ActivationStore`
spills to disk). A family whose layers hand the next one more than the hidden states (ZAYA's router
state, `adapters.carried_state`) keeps (hidden, carried) pairs there instead. The package is below
calibration, plan and apply: it imports only the adapters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.adapters import find_moe_layers
from moeprune.adapters.carried_state import CarriedState, carried_state
from moeprune.adapters.forward_patches import patch_forward
from moeprune.engine.skeleton import to_host

Batch = dict[str, torch.Tensor]
Call = tuple[tuple, dict[str, Any]]  # a decoder layer's call arguments besides the hidden states
LayerState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # hidden states, or (hidden, carried state)

__all__ = ["Batch", "Call", "LayerState", "ListStore", "LayerRunner", "as_batches", "capture_calls", "decoder_layers",
           "hidden_of", "layer_output"]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder layers holding the MoE blocks."""
    block = find_moe_layers(model)[0].block_name
    parts = block.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        module = model.get_submodule(parent) if parent else model
        if isinstance(module, nn.ModuleList) and parts[cut].isdigit():
            return parent, module
    raise ValueError(f"cannot find the decoder layer list above MoE block {block!r}")


def as_batches(data: torch.Tensor | Iterable[Batch], batch_size: int,
               attention_mask: torch.Tensor | None = None) -> list[Batch]:
    """Token ids [samples, seq_len] cut into {"input_ids"[, "attention_mask"]} batches of
    `batch_size` rows, in order (dict batches pass through). The one batching of every pass."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"calibration ids must be [samples, seq_len], got shape {tuple(data.shape)}")
        if attention_mask is not None and attention_mask.shape != data.shape:
            raise ValueError(f"attention mask {tuple(attention_mask.shape)} does not match ids {tuple(data.shape)}")
        return [{"input_ids": data[i : i + batch_size],
                 **({} if attention_mask is None else {"attention_mask": attention_mask[i : i + batch_size]})}
                for i in range(0, data.shape[0], batch_size)]
    return list(data)


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's return value (a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def hidden_of(state: LayerState) -> torch.Tensor:
    """The hidden states of a stored layer state (a tensor, or (hidden, carried))."""
    return state[0] if isinstance(state, tuple) else state


class _Captured(Exception):
    """Raised by the last layer's recorder to stop a capture forward early."""


@torch.no_grad()
def capture_calls(model: nn.Module, layers: nn.ModuleList, batch: Batch, device: torch.device | str) -> tuple[torch.Tensor, list[Call]]:
    """(first layer's input hidden states, every layer's other call arguments) for one batch.

    A family's carried argument (`adapters.carried_state.CARRIED_STATE`) is recorded as its `CarriedState`, and the
    recorder hands the model's loop a tuple with the carried input at the carried output's place."""
    carried = carried_state(model)
    calls: list[Call] = []
    first: list[torch.Tensor] = []

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first.append(hidden)
            rest, passed = list(args[1:]), None
            if carried is not None:
                if carried.argument >= len(rest):
                    raise RuntimeError(f"decoder layer {index} got no positional argument {carried.argument + 1} "
                                       "to carry state in")
                passed, rest[carried.argument] = rest[carried.argument], carried
            calls.append((tuple(rest), kwargs))
            if index == len(layers) - 1:
                raise _Captured
            return hidden if carried is None else (hidden, *([None] * (carried.output - 1)), passed)

        return forward

    undos = [patch_forward(layer, recorder(index), "layer capture") for index, layer in enumerate(layers)]
    try:
        mask = batch.get("attention_mask")
        model(input_ids=batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        for undo in reversed(undos):
            undo()
    if len(calls) != len(layers):
        raise RuntimeError(f"captured {len(calls)} decoder layer calls, expected {len(layers)}")
    return first[0], calls


class Store(Protocol):
    def put(self, index: int, state: LayerState) -> None: ...

    def get(self, index: int) -> LayerState: ...


class ListStore:
    """Layer states of every batch, in memory, where they were computed."""

    def __init__(self, items: Iterable[LayerState] = ()) -> None:
        self.items: dict[int, LayerState] = dict(enumerate(items))

    def put(self, index: int, state: LayerState) -> None:
        self.items[index] = state

    def get(self, index: int) -> LayerState:
        return self.items[index]


Visit = Callable[[int, nn.Module, Callable[[], None]], None]


@dataclass
class LayerRunner:
    """Visit `layers` in order with the cached `calls` ([batch][layer]) of every batch.

    `load(i)` / `release(i)` bracket layer i (None: already resident); `before_batch(b)` runs before
    batch b enters a layer (e.g. the observer's token mask); `host=True` keeps the hidden states
    between layers on the CPU (streamed paths), else where they were computed.
    """

    layers: nn.ModuleList
    calls: list[list[Call]]
    device: torch.device | str = "cpu"
    load: Callable[[int], None] | None = None
    release: Callable[[int], None] | None = None
    before_batch: Callable[[int], None] | None = None
    host: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "forward": 0.0})

    def forward(self, index: int, inputs: Store, outputs: Store | None = None) -> None:
        """Every cached batch through layer `index`; its outputs into `outputs` (or dropped)."""
        layer, tick = self.layers[index], time.perf_counter()
        for b, batch_calls in enumerate(self.calls):
            if self.before_batch is not None:
                self.before_batch(b)
            args, kwargs = batch_calls[index]
            state = inputs.get(b)
            hidden, carried = state if isinstance(state, tuple) else (state, None)
            spec = next((a for a in args if isinstance(a, CarriedState)), None)
            if spec is not None:  # the predecessor's carried state (None into the first layer) goes in its place
                args = tuple((None if carried is None else carried.to(self.device)) if a is spec else a for a in args)
            out = layer(hidden.to(self.device), *args, **kwargs)
            out = layer_output(out) if spec is None else (layer_output(out), out[spec.output])
            if outputs is not None:
                outputs.put(b, (tuple(to_host(t) for t in out) if isinstance(out, tuple) else to_host(out))
                            if self.host else out)
        self.seconds["forward"] += time.perf_counter() - tick

    @torch.no_grad()
    def step(self, index: int, inputs: Store, visit: Visit | None = None, outputs: Store | None = None) -> Store:
        """Layer `index` alone: load, `visit(index, layer, run_all)`, outputs into `outputs`, release."""
        tick = time.perf_counter()
        if self.load is not None:
            self.load(index)
        self.seconds["load"] += time.perf_counter() - tick
        if visit is not None:
            visit(index, self.layers[index], lambda: self.forward(index, inputs))
        outputs = ListStore() if outputs is None else outputs
        self.forward(index, inputs, outputs)
        if self.release is not None:
            self.release(index)
        return outputs

    def run(
        self, inputs: Store, visit: Visit | None = None, start: int = 0,
        new_store: Callable[[int], Store] | None = None, after: Callable[[int, Store], None] | None = None,
        progress: bool = True, desc: str = "layers",
    ) -> Store:
        """Layers `start`.. in order (`step` each); returns the last layer's outputs.

        `visit(i, layer, run_all)` runs after layer i is loaded and before its outputs are computed;
        `new_store(i)` makes the store for layer i's outputs; `after(i, outputs)` runs once layer i
        is released (e.g. a resumable commit)."""
        for index in tqdm(range(start, len(self.layers)), desc=desc, unit="layer", disable=not progress):
            inputs = self.step(index, inputs, visit, new_store(index) if new_store is not None else None)
            if after is not None:
                after(index, inputs)
        return inputs
