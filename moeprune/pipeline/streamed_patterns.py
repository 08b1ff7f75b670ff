"""`prune --patterns FILE --query TEXT --offload`: pick the task pattern without loading the model.

The plan itself comes from the stored per-task scores (`patterns.pattern_plan`), so no calibration
runs; only the retrieval key needs the model: the first MoE layer's PEU vector over the query's
tokens, from that layer's router logits (`patterns.first_router_logits`, which stops the forward
right after the first router). Streamed, the model is a meta skeleton in which only the input
embeddings and the decoder layers up to and including the first MoE layer are read from the shards;
the forward stops before it reaches anything still on the meta device. `retrieve_plan` then runs
unchanged on that skeleton, so the chosen task, distance and plan equal the in-memory ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moeprune.adapters import find_moe_layers
from moeprune.plan import Plan
from moeprune.engine.runner import decoder_layers
from moeprune.io.lazy_load import build_skeleton
from moeprune.engine.skeleton import materialise_prelude, resident_to_device, to_device
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, materialise, release


def streamed_pattern_plan(path: str | Path, tokenizer: Any, patterns: dict[str, Any], query: str, ratio: float,
                          dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Plan:
    """The plan of the task pattern nearest to `query` for checkpoint directory `path` (bound to it)."""
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.loading import resolve_dtype
    from moeprune.patterns import retrieve_plan

    path, device = Path(path), torch.device(device)
    dtype = resolve_dtype(dtype, path)
    model = build_skeleton(path, dtype)
    resident_to_device(model, device)
    ckpt = LazyCheckpoint(path)
    try:
        keymap = KeyMap(model, ckpt.keys())
        prefix, _ = decoder_layers(model)
        block = find_moe_layers(model)[0].block_name
        first = int(re.match(rf"^{re.escape(prefix)}\.(\d+)(\.|$)", block).group(1))  # decoder index of the first MoE layer
        layer_names = [n for i in range(first + 1) for n in materialise(model, keymap, ckpt, f"{prefix}.{i}", dtype)]
        to_device(model, layer_names, device)
        names = materialise_prelude(model, keymap, ckpt, prefix, device, dtype) + layer_names
        try:
            result = retrieve_plan(model, tokenizer, patterns, query, ratio)[0]
        finally:
            release(model, names)
    finally:
        ckpt.close()
    result.model = checkpoint_fingerprint(path)
    return result
