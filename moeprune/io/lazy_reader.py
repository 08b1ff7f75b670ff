"""Lazy, shard-at-a-time access to a safetensors checkpoint, and hub-key -> module-key mapping.

`LazyCheckpoint` reads the index once and then single tensors (or row ranges of a tensor through
`get_slice`), keeping at most one shard open, so memory stays bounded by one tensor, never the
checkpoint. Every failure to open or read a shard raises `CorruptCheckpointError` naming the file.

`KeyMap` applies transformers' own load-time conversions (`get_model_conversion_mapping`: renames
such as Mixtral's `block_sparse_moe` -> `mlp`, and converters such as per-expert
`experts.{j}.gate_proj.weight` -> fused `experts.gate_up_proj [E, 2I, H]`) to the checkpoint's key
names only, against a meta-device model; `load_state` then loads and converts just the tensors of
one module (a decoder layer, the embeddings) exactly as `from_pretrained` would. Families the
adapters re-parameterise in memory (DBRX) are refused here, in one line.
"""

from __future__ import annotations

import logging
import re
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from moeprune.io.safetensors_io import CorruptCheckpointError, open_shard, shard_map

logger = logging.getLogger(__name__)


class LazyCheckpoint:
    """Tensor-by-tensor reader of a (sharded) safetensors checkpoint directory.

    `safe_open` memory-maps the shard, and the pages a read touches stay resident (and count in
    the process's RSS) until the map is closed, so the handle is reopened after every
    `remap_bytes` read: resident mapped pages stay bounded however large the shards are (for
    tensors kept beyond the read, `owned=True` copies them out of the map; `get` returns views).
    """

    def __init__(self, path: str | Path, remap_bytes: int = 256 * 2**20, owned: bool = False) -> None:
        self.path = Path(path)
        self.owned = owned  # copy every tensor read out of the map (tensors that outlive the reader)
        self.shards: dict[str, Path] = shard_map(self.path)
        self.remap_bytes = remap_bytes
        self._file: Path | None = None
        self._handle: Any = None
        self._mapped = 0
        self.bytes_read = 0
        self._headers: dict[Path, dict] = {}  # shard -> its header (io.direct_read), read on first use

    # ---- handles ----------------------------------------------------------------------------
    def _handle_for(self, name: str) -> Any:
        if name not in self.shards:
            raise KeyError(f"{self.path}: no tensor named {name}")
        file = self.shards[name]
        if file != self._file:
            self.close()
            self._handle = open_shard(file)
            self._file = file
        return self._handle

    def close(self) -> None:
        self._handle, self._file, self._mapped = None, None, 0

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- metadata ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.shards)

    def keys_by_shard(self, names: Iterable[str] | None = None) -> list[str]:
        """`names` (default: all) ordered shard by shard, so each shard is opened once."""
        names = self.keys() if names is None else list(names)
        return sorted(names, key=lambda n: (str(self.shards[n]), n))

    def shape(self, name: str) -> list[int]:
        return list(self._guard(name, lambda h: h.get_slice(name).get_shape()))

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.shards.values()))

    # ---- reads ------------------------------------------------------------------------------
    def _guard(self, name: str, fn):
        handle = self._handle_for(name)
        try:
            return fn(handle)
        except Exception as err:
            raise CorruptCheckpointError(f"{self.shards[name]}: cannot read tensor {name} ({err})") from err

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, read straight into a tensor of its own (`io.direct_read`: one pread, the
        file not mapped). Dtypes the direct reader does not handle go through `safe_open`, which
        returns views of the map: kept, they pin the whole mapped shard in RSS; with `owned` each
        is copied out so the map can go."""
        entry = self._entry(name)
        if entry is not None and entry.dtype is not None and entry.dtype != torch.bool:
            out = torch.empty(entry.shape, dtype=entry.dtype)
            if self.read_into(name, out):
                return out
        tensor = self._guard(name, lambda h: h.get_tensor(name).clone() if self.owned else h.get_tensor(name))
        self._count(tensor)
        return tensor

    def _entry(self, name: str):
        """Where tensor `name`'s bytes are (`io.direct_read.TensorEntry`), from its shard's header."""
        from moeprune.io.direct_read import read_header

        file = self.shards.get(name)
        if file is None:
            raise KeyError(f"{self.path}: no tensor named {name}")
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file].get(name)

    def _count(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.bytes_read += size
        self._mapped += size
        if self._mapped >= self.remap_bytes:
            self.close()

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Read tensor `name` straight into `out` (same dtype and size; `io.direct_read`, no map);
        False when it cannot (the caller copies from `get` instead)."""
        from moeprune.io.direct_read import read_into

        entry = self._entry(name)
        if entry is None or not read_into(self.shards[name], entry, out):
            return False
        self.bytes_read += entry.nbytes
        return True

    def dtype(self, name: str) -> torch.dtype | None:
        """Tensor `name`'s dtype from its shard's header (None: one the direct reader does not handle)."""
        entry = self._entry(name)
        return None if entry is None else entry.dtype

    def get_rows(self, name: str, rows: list[int], dim: int = 0) -> torch.Tensor:
        """Rows `rows` (in that order) of dimension `dim` (0 or 1), reading only those rows."""
        runs: list[tuple[int, int]] = []
        for r in rows:
            if runs and runs[-1][1] == r:
                runs[-1] = (runs[-1][0], r + 1)
            else:
                runs.append((r, r + 1))

        def read(handle):
            sl = handle.get_slice(name)
            parts = [sl[a:b] if dim == 0 else sl[:, a:b] for a, b in runs]
            return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()

        tensor = self._guard(name, read)
        self._count(tensor)
        return tensor


@dataclass(frozen=True)
class KeyTarget:
    """Where one checkpoint tensor goes in the module tree."""

    disk_key: str
    model_key: str
    source_pattern: str | None  # the converter pattern that matched, None for a plain rename
    expert_index: int | None  # j of a per-expert key `...experts.{j}...`, else None
    renamed: str | None = None  # SHIM_SOURCE targets: the stock name, under `shim_module`, the shim converts
    shim_module: str | None = None  # SHIM_SOURCE targets: the shimmed module that converts its stock tensors


SHIM_SOURCE = "<shim>"  # source_pattern of tensors a shimmed module converts itself (adapters.shims)


def _expert_regex(pattern: str) -> re.Pattern | None:
    if "*" not in pattern:
        return None
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))


class KeyMap:
    """Checkpoint key -> module key, using the model's registered load-time conversions."""

    def __init__(self, model: nn.Module, disk_keys: Iterable[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        from moeprune.adapters import NotAnMoEModelError
        from moeprune.adapters.shims import install_shims, loaded_trims, stock_source, streamable

        install_shims(model)
        if (reason := streamable(model)) is not None:  # DBRX: parameters are not the checkpoint's tensors
            raise NotAnMoEModelError(reason)
        self.model = model
        self.trims = loaded_trims(model)  # LongCat: its gate_up_proj is the real rows of the stock tensor
        self._fp32_plans: dict[torch.dtype, Any] = {}
        conversions = get_model_conversion_mapping(model)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.pattern_to_converter = {p: c for c in self.converters for p in c.source_patterns}
        meta = dict(model.state_dict())
        prefix = getattr(model, "base_model_prefix", None)
        self.targets: dict[str, KeyTarget] = {}
        self.unexpected: list[str] = []
        for key in disk_keys:
            renamed, pattern = rename_source_key(key, self.renamings, self.converters, prefix, meta)
            if renamed not in meta and key in meta:
                renamed, pattern = key, None
            if (source := stock_source(model, renamed)) is not None:
                # a shimmed module's stock tensor (DBRX mlp.w1/v1/w2; its state dict names them too,
                # through the shim's hook, but its parameters are the converted ones): the shim converts
                self.targets[key] = KeyTarget(key, f"{source[0]}.{source[1]}", SHIM_SOURCE, None,
                                              renamed[len(source[0]) + 1:], source[0])
                continue
            if renamed not in meta:
                self.unexpected.append(key)
                continue
            index = None
            if pattern is not None and (rx := _expert_regex(pattern)) is not None:
                match = rx.search(key)
                index = int(match.group(1)) if match else None
            self.targets[key] = KeyTarget(key, renamed, pattern, index)
        if self.unexpected:
            logger.info("%d checkpoint tensors match no module (e.g. %s)", len(self.unexpected), self.unexpected[:3])

    def keys_under(self, prefix: str) -> list[str]:
        """Checkpoint keys whose module key lies under module `prefix` ('' = all)."""
        dot = prefix + "." if prefix else ""
        return [k for k, t in self.targets.items() if t.model_key.startswith(dot)]

    def _stack_direct(self, ckpt: LazyCheckpoint, keys: list[str], converter: Any, dtype: torch.dtype | None) -> torch.Tensor | None:
        """The fused [E, rows, cols] tensor that `MergeModulelist(dim=0)` (+ `Concatenate(dim=1)` over
        the source patterns) builds from per-expert 2-D tensors, filled by copying each expert's
        tensor into its slot: the same bits without the stacked and concatenated temporaries
        (~0.9 GB of peak RSS and two copies per 128-expert bf16 layer). None (use the converter)
        for any other conversion or an irregular set of keys."""
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in converter.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            return None
        patterns = list(converter.source_patterns)
        slots: dict[str, dict[int, str]] = {p: {} for p in patterns}
        for key in keys:
            target = self.targets[key]
            if target.source_pattern not in slots or target.expert_index is None:
                return None
            slots[target.source_pattern][target.expert_index] = key
        experts = sorted(slots[patterns[0]])
        if not experts or experts != list(range(len(experts))) or any(sorted(slots[p]) != experts for p in patterns):
            return None
        shapes = {key: ckpt.shape(key) for key in keys}
        rows = [shapes[slots[p][0]][0] for p in patterns]
        cols = shapes[keys[0]][-1]
        if any(len(shapes[slots[p][j]]) != 2 or shapes[slots[p][j]] != [r, cols]
               for p, r in zip(patterns, rows) for j in experts):
            return None
        offset = {p: sum(rows[:i]) for i, p in enumerate(patterns)}
        stored, first = ckpt.dtype(keys[0]), None
        if stored is None:  # a dtype the direct reader does not know: its first tensor is read once here
            first = ckpt.get(keys[0])
            stored = first.dtype
        kind = dtype if dtype is not None and stored.is_floating_point else stored
        out = torch.empty(len(experts), sum(rows), cols, dtype=kind)
        for key in ckpt.keys_by_shard(keys):
            target = self.targets[key]
            start = offset[target.source_pattern]
            slot = out[target.expert_index, start : start + shapes[key][0]]
            if key == keys[0] and first is not None:
                slot.copy_(first)
            elif not ckpt.read_into(key, slot):  # another dtype (a cast) or layout: through the map
                slot.copy_(ckpt.get(key))
        return out

    def load_state(
        self, ckpt: LazyCheckpoint, disk_keys: Iterable[str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """{module key: tensor} for `disk_keys`, converted as `from_pretrained` converts them."""
        return dict(self.iter_state(ckpt, disk_keys, dtype))

    def iter_state(
        self, ckpt: LazyCheckpoint, disk_keys: Iterable[str], dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(module key, tensor) pairs, one converted target at a time, so that only one target's
        source tensors are in memory at once. Floating tensors are cast to `dtype` after the
        conversion (cast-then-stack and stack-then-cast give the same bits; this order keeps the
        temporaries in the narrower checkpoint dtype)."""
        from transformers.core_model_loading import dot_natural_key

        groups: dict[str, list[str]] = {}
        for key in sorted(disk_keys, key=dot_natural_key):  # the loader's (natural) order
            groups.setdefault(self.targets[key].model_key, []).append(key)
        for first, keys in groups.items():
            pattern = self.targets[keys[0]].source_pattern
            if pattern == SHIM_SOURCE:  # the shim's own conversion of its stock tensors (adapters.shims)
                from moeprune.adapters.shims import from_stock

                module_name = self.targets[keys[0]].shim_module
                stock = {self.targets[k].renamed: ckpt.get(k) for k in ckpt.keys_by_shard(keys)}
                results = {f"{module_name}.{n}": v for n, v in from_stock(self.model.get_submodule(module_name), stock).items()}
            elif pattern is None:
                if len(keys) > 1:
                    raise CorruptCheckpointError(f"{ckpt.path}: tensors {keys} all load into {first}")
                results = {first: ckpt.get(keys[0])}
            elif (fused := self._stack_direct(ckpt, keys, self.pattern_to_converter[pattern], self.dtype_for(first, dtype))) is not None:
                results = {first: fused}
            else:
                mapping = deepcopy(self.pattern_to_converter[pattern])
                tensors = {key: ckpt.get(key) for key in ckpt.keys_by_shard(keys)}
                for key in keys:
                    mapping.add_tensor(first, key, self.targets[key].source_pattern, tensors.pop(key))
                results = mapping.convert(first, model=self.model, config=self.model.config)
            for name, value in results.items():
                value = value[0] if isinstance(value, list) else value
                if name in self.trims:
                    value = self.trims[name](value)
                if dtype is not None and value.is_floating_point():
                    value = value.to(self.dtype_for(name, dtype))
                yield name, value

    def dtype_for(self, name: str, dtype: torch.dtype | None) -> torch.dtype | None:
        """`dtype`, or float32 for the tensors transformers keeps in float32 when it loads the model
        in `dtype` (`_keep_in_fp32_modules_strict` in bf16/fp16, `_keep_in_fp32_modules` in fp16:
        e.g. Inkling-2's routers, AFMoE's expert_bias), so that moeprune's loads equal `from_pretrained`'s."""
        if dtype not in (torch.float16, torch.bfloat16):
            return dtype
        if dtype not in self._fp32_plans:
            self._fp32_plans[dtype] = kept_in_fp32(self.model, dtype)
        pattern = self._fp32_plans[dtype]
        return torch.float32 if pattern is not None and pattern.search(name) else dtype


def kept_in_fp32(model: nn.Module, dtype: torch.dtype) -> "re.Pattern | None":
    """The pattern of the tensor names transformers keeps in float32 when it loads `model` in
    `dtype` (its dtype plan from `_keep_in_fp32_modules(_strict)`), or None when there are none."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return None
    from transformers.core_model_loading import build_glob_alternation

    return build_glob_alternation(list(plan))[0]


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` at parameter/buffer `name` of `model` (replacing a meta tensor)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def release(model: nn.Module, names: Iterable[str]) -> None:
    """Send tensors `names` back to the meta device, freeing their memory."""
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        store = module._parameters if leaf in module._parameters else module._buffers
        old = store[leaf]
        meta = torch.empty(old.shape, dtype=old.dtype, device="meta")
        store[leaf] = nn.Parameter(meta, requires_grad=False) if isinstance(old, nn.Parameter) else meta


def materialise(
    model: nn.Module, keymap: KeyMap, ckpt: LazyCheckpoint, prefix: str, dtype: torch.dtype | None = None
) -> list[str]:
    """Load every checkpoint tensor of module `prefix` into `model`; returns the names loaded.

    Raises `CorruptCheckpointError` when a parameter of that module has no tensor in the checkpoint.
    """
    module = model.get_submodule(prefix) if prefix else model
    dot = prefix + "." if prefix else ""
    names = []
    for name, value in keymap.iter_state(ckpt, keymap.keys_under(prefix), dtype):
        set_tensor(model, name, value)
        names.append(name)
    missing = [f"{dot}{n}" for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CorruptCheckpointError(f"{ckpt.path}: no tensors for {missing[:4]} in the checkpoint")
    return names
