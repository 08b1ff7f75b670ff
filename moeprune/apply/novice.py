"""MoNE novices: dropped experts replaced by constant vectors, router unchanged.

A novice layer keeps its router at full width (E rows), so tokens still pick novices in their
top-k; the experts module holds only the P kept experts. Its forward is wrapped on the instance:
router indices are mapped to kept slots (novice slots get weight 0 there) and every token routed to
novice j receives g_j(x) * mu_j, mu_j being expert j's mean output over its routed calibration tokens.

Stock transformers cannot express this, so it is saved as a documented extension:
- `moeprune_novices.safetensors` in the output directory: per layer `layer.<i>.novice_vectors`
  [n, H], `layer.<i>.expert_map` [E] (kept slot, or -(novice position + 1)) and the full-width
  routing tensors `layer.<i>.router.<name>` (E rows, or E + the router's extra rows) and
  `layer.<i>.block.<name>` (a block's own per-expert tensors, e.g. AFMoE's expert_bias);
- config key `moeprune_novices` = {layer: {num_experts, kept, novices}}; the config's expert count
  is P while the checkpoint's router has E rows, so plain `from_pretrained` fails loudly with a size
  mismatch instead of silently loading a different model. `load_pruned` loads it with
  `ignore_mismatched_sizes=True` and `restore_novices` then puts the real routers and novices back.

The novice vectors travel in the plan (each layer's `novice_vectors`, base64 float32), so
a saved plan applies without the statistics file; each costs H floats per novice.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeprune.adapters import MoELayer, find_moe_layers
from moeprune.adapters.layout import EXPERT_COUNT_ATTRS, NOVICE_MAP_BUFFER, NOVICE_VECTOR_BUFFER
from moeprune.plan import LayerPlan, PlanError, decode_vectors, encode_vectors  # noqa: F401 (re-exported)
from moeprune.adapters.forward_patches import install_forward

logger = logging.getLogger(__name__)

NOVICE_FILE = "moeprune_novices.safetensors"
CONFIG_KEY = "moeprune_novices"
MAP_BUFFER = NOVICE_MAP_BUFFER
VECTOR_BUFFER = NOVICE_VECTOR_BUFFER


# ---- forward -------------------------------------------------------------------------------
def novice_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Kept experts through the module's own implementation, novices as g * mu."""
    mapping = getattr(experts, MAP_BUFFER)[top_k_index]
    novice = mapping < 0
    inner = type(experts).forward(experts, hidden, mapping.clamp_min(0), top_k_weights.masked_fill(novice, 0))
    vectors = getattr(experts, VECTOR_BUFFER).to(inner.dtype)[(-mapping - 1).clamp_min(0)]
    gates = top_k_weights.masked_fill(~novice, 0).to(inner.dtype).unsqueeze(-1)
    return inner + (gates * vectors).sum(dim=1)


def _wrap(experts: nn.Module, expert_map: torch.Tensor, vectors: torch.Tensor) -> None:
    device = experts.down_proj.device
    experts.register_buffer(MAP_BUFFER, expert_map.to(device=device, dtype=torch.long), persistent=False)
    experts.register_buffer(VECTOR_BUFFER, vectors.to(device=device, dtype=experts.down_proj.dtype), persistent=False)
    install_forward(experts, lambda inner: functools.partial(novice_forward, experts), "novices")


def expert_map(num_experts: int, kept: list[int], novices: list[int]) -> torch.Tensor:
    mapping = torch.zeros(num_experts, dtype=torch.long)
    for slot, j in enumerate(kept):
        mapping[j] = slot
    for pos, j in enumerate(novices):
        mapping[j] = -(pos + 1)
    return mapping


def _record(model: nn.Module, layer: int, entry: dict[str, Any]) -> None:
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    for config in configs:
        current = dict(getattr(config, CONFIG_KEY, None) or {})
        current[str(layer)] = entry
        setattr(config, CONFIG_KEY, current)


# ---- apply ---------------------------------------------------------------------------------
def install_novices(model: nn.Module, layer: MoELayer, lp: LayerPlan, vectors: torch.Tensor | None = None) -> None:
    """Slice `layer`'s experts to `lp.kept` and route `lp.novices` to constant vectors (router untouched)."""
    from moeprune.apply.surgery import slice_experts

    e = layer.num_experts
    novices = list(lp.novices or [])
    where = f"layer {lp.layer}"
    if layer.routing.identity_experts:
        raise PlanError(f"{where}: MoNE novices do not support routers with identity (zero-compute) experts "
                        "(LongCat-Flash); use a selection or merging strategy")
    if sorted(lp.kept + novices) != list(range(e)):
        raise PlanError(f"{where}: with novices, every expert must be kept or a novice (router keeps all {e} rows)")
    if vectors is None:
        raise PlanError(f"{where}: the plan has novices but no novice vectors (novice_vectors)")
    if tuple(vectors.shape) != (len(novices), layer.layout.hidden_dim):
        raise PlanError(f"{where}: novice vectors have shape {tuple(vectors.shape)}, expected ({len(novices)}, {layer.layout.hidden_dim})")
    slice_experts(layer.experts, torch.tensor(lp.kept, dtype=torch.long), e)
    _wrap(layer.experts, expert_map(e, lp.kept, novices), vectors)
    _record(model, lp.layer, {"num_experts": e, "kept": list(lp.kept), "novices": novices})
    logger.info("%s: %d experts kept, %d novices", where, len(lp.kept), len(novices))


def _novice_layers(model: nn.Module) -> dict[int, MoELayer]:
    entries = getattr(model.config, CONFIG_KEY, None) or {}
    layers = {layer.layer: layer for layer in find_moe_layers(model)}
    missing = [i for i in map(int, entries) if i not in layers]
    if missing:
        raise ValueError(f"novice layers {missing} not found in the model")
    return {int(i): layers[int(i)] for i in entries}


def _full_width(layer: MoELayer, num_experts: int) -> list[tuple[str, str, torch.Tensor]]:
    """(kind, name under the router or block, tensor) of every per-expert routing tensor the novice layer keeps
    at full width: router tensors with E rows (or E + the rows after the routed experts': Inkling,
    ZAYA) or 1 x E, and the block's own E-row tensors (AFMoE's expert_bias)."""
    from moeprune.adapters.layout import router_extra_rows

    widths = {num_experts, num_experts + router_extra_rows(layer.router, num_experts)}
    found = []
    for module_name, module in layer.router.named_modules():
        for attr, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t.dim() >= 1 and (t.shape[0] in widths or (t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == num_experts)):
                found.append(("router", f"{module_name}.{attr}" if module_name else attr, t))
    for attr, t in [*layer.block.named_parameters(recurse=False), *layer.block.named_buffers(recurse=False)]:
        if t.dim() >= 1 and t.shape[0] == num_experts:
            found.append(("block", attr, t))
    return found


def novice_tensors(layer: MoELayer, num_experts: int) -> dict[str, torch.Tensor]:
    """The extension-file tensors of one installed novice layer (expert map, vectors, full routers)."""
    index = layer.layer
    tensors = {f"layer.{index}.expert_map": getattr(layer.experts, MAP_BUFFER).cpu(),
               f"layer.{index}.novice_vectors": getattr(layer.experts, VECTOR_BUFFER).cpu()}
    for kind, name, t in _full_width(layer, num_experts):
        tensors[f"layer.{index}.{kind}.{name}"] = t.detach().cpu()
    return tensors


def write_novice_file(tensors: dict[str, torch.Tensor], output_dir: str | Path) -> Path:
    path = Path(output_dir) / NOVICE_FILE
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "moeprune-novices"})
    return path


def save_novices(model: nn.Module, output_dir: str | Path) -> Path:
    """Write the novice extension file next to a saved checkpoint."""
    entries = getattr(model.config, CONFIG_KEY)
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in _novice_layers(model).items():
        tensors.update(novice_tensors(layer, int(entries[str(index)]["num_experts"])))
    return write_novice_file(tensors, output_dir)


def restore_novices(model: nn.Module, path: str | Path) -> nn.Module:
    """Put full-width routers and novice vectors back into a model loaded from a novice checkpoint."""
    from moeprune.adapters.layout import router_extra_rows
    from moeprune.apply.surgery import ROUTER_COLUMN_ATTRS

    file = Path(path) / NOVICE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: config lists novices but {NOVICE_FILE} is missing")
    tensors = load_file(str(file))
    entries = getattr(model.config, CONFIG_KEY)
    for index, layer in _novice_layers(model).items():
        entry = entries[str(index)]
        e, kept = int(entry["num_experts"]), list(entry["kept"])
        if layer.num_experts != len(kept):
            raise ValueError(f"{path}: layer {index} has {layer.num_experts} experts, the novice record says {len(kept)}")
        with torch.no_grad():
            for kind, root in (("router", layer.router), ("block", layer.block)):
                prefix = f"layer.{index}.{kind}."
                for key, value in tensors.items():
                    if not key.startswith(prefix):
                        continue
                    owner_name, _, attr = key[len(prefix):].rpartition(".")
                    owner = root.get_submodule(owner_name) if owner_name else root
                    current = getattr(owner, attr)
                    value = value.to(device=current.device, dtype=current.dtype)
                    if isinstance(current, nn.Parameter):
                        setattr(owner, attr, nn.Parameter(value, requires_grad=current.requires_grad))
                    else:
                        owner._buffers[attr] = value
        extra = router_extra_rows(layer.router, e)  # the router is full width again
        for module in [layer.block, *layer.router.modules()]:
            for attr in EXPERT_COUNT_ATTRS:
                if getattr(module, attr, None) == len(kept) and module is not layer.experts:
                    setattr(module, attr, e)
            for attr in ROUTER_COLUMN_ATTRS:
                if extra and getattr(module, attr, None) == len(kept) + extra:
                    setattr(module, attr, e + extra)
            if isinstance(module, nn.Linear) and module.out_features in (len(kept), len(kept) + extra):
                module.out_features = module.weight.shape[0]
        _wrap(layer.experts, tensors[f"layer.{index}.expert_map"], tensors[f"layer.{index}.novice_vectors"])
    return model
