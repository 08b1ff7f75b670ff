"""The model as a meta-device skeleton, and moving its tensors between host and compute device.

Every layer-wise path (streamed calibration, apply, evaluation, sparsify, router KD, dynamic
skipping, task patterns) builds the model of a checkpoint with no weights (`io.lazy_load.build_skeleton`),
materialises one module at a time into it (`io.lazy_reader.materialise`) and moves what it
materialised to the compute device (`to_device`); these helpers are the one copy of that.
"""

from __future__ import annotations


import torch
from torch import nn

from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, set_tensor


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.to("cpu")


def resident_to_device(model: nn.Module, device: torch.device) -> None:
    """Move the skeleton's real (non-meta) tensors, e.g. rotary `inv_freq`, to the compute device."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, value in list(store.items()):
                if value is not None and value.device.type != "meta":
                    moved = value.data.to(device) if isinstance(value, nn.Parameter) else value.to(device)
                    store[key] = nn.Parameter(moved, requires_grad=False) if isinstance(value, nn.Parameter) else moved


def to_device(model: nn.Module, names: list[str], device: torch.device) -> None:
    if device.type == "cpu":
        return
    for name in names:
        set_tensor(model, name, model.get_parameter(name).data.to(device) if is_param(model, name) else model.get_buffer(name).to(device))


def is_param(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    return leaf in (model.get_submodule(module_name) if module_name else model)._parameters


def materialise_prelude(model: nn.Module, keymap: KeyMap, ckpt: LazyCheckpoint, layers_prefix: str,
                        device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    """Load, onto `device`, every checkpoint tensor outside the decoder layers and the output head:
    what the forward needs before the first layer (the input embeddings, and e.g. Gemma-4's per-layer
    input embeddings or ZAYA's input bias; the final norm comes along, being small). A head tied to
    the input embeddings is loaded with them. Returns the names loaded (for `release`)."""
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    skip = (layers_prefix + ".",) + (() if tied else (module_name(model, head) + ".",))
    keys = [k for k, t in keymap.targets.items() if not t.model_key.startswith(skip)]
    names = []
    for name, value in keymap.iter_state(ckpt, keys, dtype):
        set_tensor(model, name, value)
        names.append(name)
    to_device(model, names, device)
    return names
