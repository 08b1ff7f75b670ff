"""Building a model from its checkpoint without `from_pretrained`'s memory residue.

`build_skeleton` is the model of a checkpoint with every parameter on the meta device: the start
of every layer-wise path, and of `load_lazily`, the in-memory loader of stock local checkpoints.
`from_pretrained` keeps the memory-mapped shards alive through the tensors it did not convert
(they are views of the map), so the pages of every tensor it read, including the per-expert
tensors it fused into other ones, stay resident: about 1.7x the weights in RSS after loading a
bf16 Qwen3-MoE. `load_lazily` fills the skeleton tensor by tensor through `LazyCheckpoint`
(owned copies, the map reopened every 256 MiB) with the same key conversions (`KeyMap`), so what
stays resident is the weights. It answers None, and the caller uses `from_pretrained`, where its
equality with `from_pretrained` is not established: quantized checkpoints, repository code,
families whose parameters are not the checkpoint's tensors (DBRX), checkpoints that leave
parameters to be initialised.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, set_tensor

logger = logging.getLogger(__name__)


def build_skeleton(path: str | Path, dtype: torch.dtype = torch.float32, remote_code: bool | None = None) -> nn.Module:
    """The model of checkpoint `path` with every parameter on the meta device (`remote_code`:
    run the checkpoint's own code; None: the process-wide `loading.trust_remote_code()`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from moeprune.io.auto_class import auto_model_class

    from moeprune.io.loading import trust_remote_code

    remote = trust_remote_code() if remote_code is None else remote_code  # never a y/N prompt
    config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    with init_empty_weights():
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=remote)
    return model.eval()


def load_lazily(path: str | Path, dtype: torch.dtype) -> nn.Module | None:
    """The checkpoint at `path` in memory in `dtype`, equal to `from_pretrained(path, dtype=dtype)`;
    None when this loader does not apply (see the module docstring)."""
    from transformers import AutoConfig, GenerationConfig

    from moeprune.adapters import NotAnMoEModelError
    from moeprune.io.loading import trust_remote_code

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code())
    if getattr(config, "quantization_config", None) is not None or getattr(config, "auto_map", None):
        return None
    model = build_skeleton(path, dtype)
    ckpt = LazyCheckpoint(path, remap_bytes=32 * 2**20, owned=True)  # mapped pages: at most ~32 MiB + one tensor
    try:
        keymap = KeyMap(model, ckpt.keys())
    except NotAnMoEModelError:  # DBRX: re-parameterised in memory; the stock loader reads it
        return None
    try:
        for name, value in keymap.iter_state(ckpt, keymap.keys_under(""), dtype):
            set_tensor(model, name, value)
    finally:
        ckpt.close()
    if getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:  # from_pretrained would initialise them; leave that to it
        logger.info("%s: %d tensors not in the checkpoint (e.g. %s); loading with from_pretrained", path, len(missing),
                    missing[0])
        return None
    model.config._name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
